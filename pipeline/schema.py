"""The typed configuration of a sweep: the single source of every default.

These dataclasses import nothing of Hydra or OmegaConf, so a notebook that reads a run folder or calls the
analysis does not load them; pipeline.config registers `PatchsweepConfig` as Hydra's schema, and
`pipeline.validation.validate` returns it filled in. After validation the config travels as this object
(attribute access); `to_plain` gives the plain dict where one is written (config.yaml, MLflow params).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.messages import redact

MISSING = "???"  # OmegaConf's mark of a value that must be given


@dataclass
class ModelConfig:
    name: str = MISSING  # label in tables, folder names and MLflow, e.g. "refusal-tiny"
    path: str = MISSING  # a shipped organism name, a local Hugging Face folder, or a hub id
    checkpoint: int | None = None  # an organism's adapter at this percent of its tune (0 = base); None = final
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    name: str = "${stem:${prompts.path},generated}"  # label of the prompt set (the file's stem)
    path: str | None = None  # JSONL/CSV/Parquet with clean, corrupted[, category]; None = generated
    n_pairs: int = 64  # pairs to generate (before the behaviour screen)
    seed: int = 0
    split: str = "heldout"  # refusal-tiny's grammar: combinations held out of training, or "train"
    align: str = "none"  # "none": unequal token counts are an error; "end": align them from the end
    generate: bool = True  # the screen also checks short greedy replies, not only the first-token metric
    max_new_tokens: int = 8
    refusal_tokens: list[Any] | None = None  # answer tokens (ids or vocabulary strings) overriding
    compliance_tokens: list[Any] | None = None  # the ones derived from the model's own replies
    answer_top_k: int = 1  # derived answer tokens: the k most common first tokens of each kind of reply
    # Transfer pairs, on which the circuit's faithfulness is measured again: a pair file like `path`, or None =
    # the model's own (pipeline.analysis.pairs.transfer_source); at most `transfer_pairs` of them, 0 = none.
    transfer: str | None = None
    transfer_pairs: int = 24


@dataclass
class PatchingConfig:
    components: list[str] = field(default_factory=lambda: ["resid_pre", "attn_out", "mlp_out", "head"])
    per_position: list[str] = field(default_factory=lambda: ["resid_pre"])  # the rest: all positions at once
    # also patched at each position class at once (harmful tokens, rest of instruction, template end):
    # the headline's effects
    per_class: list[str] = field(default_factory=lambda: ["resid_pre", "attn_out", "mlp_out"])
    directions: list[str] = field(default_factory=lambda: ["denoise", "noise"])
    layers: list[int] | None = None  # None = every layer
    heads: list[int] | None = None  # None = every head
    metric: str = "logit_diff"
    batch_size: int | None = None  # patch rows per forward pass; None = chosen from free memory


@dataclass
class SummaryConfig:
    """Effects -> per-site means with bootstrap confidence intervals over pairs."""
    n_bootstrap: int = 1000  # bootstrap resamples over pairs for the confidence intervals
    ci: float = 0.95
    seed: int = 0
    top_k: int = 5  # strongest layers listed in the printed summary and report.md


@dataclass
class CircuitConfig:
    """The circuit search (pipeline.analysis.circuit): its intervals follow `summary`."""
    enabled: bool = True  # run the circuit step after the summary
    seed: int = 0  # the pair sample, the verified nodes' random sample, the random control circuits
    target: float = 0.8  # faithfulness the circuit must reach
    max_fraction: float = 0.1  # the size a circuit should stay under, as a fraction of candidate nodes
    max_pairs: int = 64  # pairs used by the circuit step (a seeded sample when there are more)
    # The search (verification, growth, pruning, stability) on at most this many of them (a seeded sample;
    # None = all); faithfulness, its interval and the controls are measured on all, and on the rest alone.
    search_pairs: int | None = None
    n_random: int = 32  # random circuits of the same size (the control)
    prune_rounds: int = 6  # pruning rounds (each after the first measures the circuit without each node)
    n_resamples: int = 8  # resamples of the search's pairs, the whole search re-run on each (stability)
    core_threshold: float = 0.8  # core nodes: found in at least this share of the resamples
    verify_top: int = 64  # attribution's strongest nodes verified exactly ...
    verify_random: int = 32  # ... plus this many random others
    verify_all_rows: int = 20000  # verify every node when nodes x pairs is at most this
    strong_effect: float = 0.05  # a node is strong when its exact single-node effect reaches this
    recall_k: int = 20  # top-k recall of attribution uses k = min(circuit size, recall_k)
    edge_min: float = 0.02  # path effects below this are recorded but not drawn
    edges: bool = True  # path patching between circuit nodes
    edge_nodes: int = 16  # edges are measured among at most this many of the circuit's strongest nodes
    edge_pairs: int = 64  # edges (path patching) are measured on at most this many of the pairs
    group_gap: int = 2  # supernodes: one kind at one position class, split where more layers pass without one
    direction_layers: int = 16  # layers whose refusal direction gets an addition test
    max_batch_rows: int | None = None  # rows per forward in the circuit step; None = from free memory


@dataclass
class DirectionConfig:
    """The refusal direction in two roles, after Arditi et al. (pipeline.analysis.directions) -> direction.arrow."""
    enabled: bool = False  # the default experiment turns it on; off, a sweep writes no direction.arrow
    max_kl: float = 1.0  # ablation's budget: KL(plain || ablated) of harmless prompts' next token, nats
    max_ce_change: float = 0.5  # addition's budget: cross-entropy change on the general text sample, nats/token
    induce_target: float = 0.9  # addition's scale: the smallest reaching this share of harmless prompts refused
    ablation_target: float = 0.1  # a subspace when one direction leaves more of the harmful prompts refusing
    max_subspace: int = 3  # directions in the ablation subspace at most
    n_verified: int = 6  # candidates per role scored exactly, the best by their first-order estimates
    budget_windows: int = 16  # 64-token windows of the general text that measure addition's budget
    max_layer_fraction: float = 0.8  # candidates at layers >= this fraction of the depth are out (not scored)
    seed: int = 0  # the split of the pairs into the half that gives the means and the half that scores them
    max_batch_rows: int | None = None  # rows per forward; None = from free memory


@dataclass
class InterventionConfig:
    """`patchsweep screen` under the run's refusal direction: intervention.run=<a run folder with direction.arrow>."""
    run: str | None = None  # None = the plain screen
    mode: str = "ablate"  # "ablate": the ablation subspace projected out everywhere; "add": the addition direction
    scale: float | None = None  # addition's multiple of the unit direction; None = the run's recorded scale
    max_new_tokens: int = 24  # reply length judged under the intervention: long enough to see compliance


@dataclass
class ResourcesConfig:
    device: str = "cpu"  # torch device the model actors use: cpu or cuda
    num_cpus: int | None = None  # CPUs of the private local Ray instance (None = all)
    actors: int = 1  # model-holding actors, each loads the model once
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    torch_threads: int = 1  # intra-op threads per actor
    max_in_flight: int = 2  # work items queued per actor (bounded window)
    max_retries: int = 3  # resubmissions of a work item whose actor died
    shard_size: int = 16  # pairs per work item
    pairs_shard_size: int = 128  # pairs per work item of the pairs stage (greedy replies, screen)
    placement_timeout_s: float = 600.0  # how long the sweep waits for room for its first model actor


@dataclass
class RayConfig:
    address: str = "local"  # "local": a private Ray instance; or a cluster address (ray://host:10001, auto)
    namespace: str = "patchsweep"
    log_to_driver: bool = True  # the model actors' output (their warnings and errors) in the driver's terminal
    connect_timeout_s: float = 60.0  # how long joining a cluster may take before the sweep gives up


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: str | None = None  # None = sqlite:///<output_root>/mlflow.db, artifacts beside it
    experiment: str = "patchsweep"  # MLflow experiment name


@dataclass
class CompareConfig:
    """`patchsweep compare RUN_A RUN_B ...` (pipeline.run.compare): its own keys, given as compare.<key>=<value>."""
    output_dir: str | None = None  # None = <the reference run's output_root>/compare/<a>-vs-<b>
    fail_on_drift: bool = False  # exit status 3 when the verdict is drift (else 0 either way)
    level: float = 0.99  # share of the null draws a measure's band holds
    n_draws: int = 200  # bootstrap draws per run for the effect-rank and direction bands
    seed: int = 0
    device: str = "cpu"  # torch device the runs' models are loaded on

    def __post_init__(self):
        """A wrong value is refused in one line before any run is read."""
        checks = {"fail_on_drift": (isinstance(self.fail_on_drift, bool), "true or false"),
                  "level": (isinstance(self.level, float | int) and 0 < self.level < 1, "a number in (0, 1)"),
                  "n_draws": (isinstance(self.n_draws, int) and self.n_draws >= 10, "a whole number >= 10"),
                  "seed": (isinstance(self.seed, int), "a whole number"),
                  "output_dir": (self.output_dir is None or isinstance(self.output_dir, str), "a folder")}
        for key, (ok, wanted) in checks.items():
            if not ok:
                raise ValueError(f"compare.{key}={getattr(self, key)!r}: give {wanted}")


@dataclass
class PatchsweepConfig:
    name: str = MISSING  # the experiment preset
    output_root: str = "outputs"
    # A --multirun job adds a folder named by the values it sweeps (${job_overrides:}): jobs never share one.
    output_dir: str = "${output_root}/${name}/${model.name}-${prompts.name}${job_overrides:}"
    resume: bool = False  # allow writing into a folder that holds another experiment's results
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    summary: SummaryConfig = field(default_factory=SummaryConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    direction: DirectionConfig = field(default_factory=DirectionConfig)
    intervention: InterventionConfig = field(default_factory=InterventionConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# The parts of a config that determine the expensive results (pairs, activations, effects); the rest
# (summary, circuit, direction, intervention, resources, tracking, ray) can change between runs over the
# same output folder.
SCIENCE_KEYS = ("model", "prompts", "patching")


def to_plain(cfg: PatchsweepConfig | dict) -> dict:
    """The config as a plain dict of plain values (config.yaml, MLflow params, hashes)."""
    return cfg if isinstance(cfg, dict) else dataclasses.asdict(cfg)


def from_plain(plain: dict, kind: type = None) -> Any:
    """A plain dict (a resolved composition, a run folder's config.yaml) -> the typed config; a key the
    schema does not have raises ValueError naming it."""
    kind = kind or PatchsweepConfig
    hints = typing.get_type_hints(kind)
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = sorted(set(plain) - names)
    if unknown:
        raise ValueError(f"unknown config key {unknown[0]!r} in {kind.__name__}: choose from {sorted(names)}")
    values = {}
    for name, value in plain.items():
        hint = hints[name]
        values[name] = from_plain(value, hint) if dataclasses.is_dataclass(hint) and isinstance(value, dict) else value
    return kind(**values)


def config_hash(cfg: PatchsweepConfig | dict) -> str:
    """The hash of the science keys (the model's label aside): runs that may share an output folder."""
    plain = to_plain(cfg)
    science = {k: plain[k] for k in SCIENCE_KEYS}
    # the final model (checkpoint None) keeps the hash runs had before checkpoints could be named
    science["model"] = {k: v for k, v in science["model"].items()
                        if k != "name" and not (k == "checkpoint" and v is None)}
    # Position-class patches add sites beside the others and move none of theirs (`per_class`); the transfer
    # pairs feed the circuit step alone, whose keys (circuit.*) do not name the experiment either.
    science["patching"] = {k: v for k, v in science["patching"].items() if k != "per_class"}
    science["prompts"] = {k: v for k, v in science["prompts"].items() if k not in ("transfer", "transfer_pairs")}
    # config.yaml keeps the config with its credentials redacted: its hash is the one the run's own has
    return hashlib.sha256(redact(json.dumps(science, sort_keys=True)).encode()).hexdigest()[:16]


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params)."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        else:
            out[name] = "null" if value is None else str(value)
    return out


def tracking_uri(cfg: PatchsweepConfig) -> str:
    """The MLflow store: tracking.uri, else an SQLite file under the output root."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    return f"sqlite:///{Path(cfg.output_root).resolve() / 'mlflow.db'}"
