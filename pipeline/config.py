"""The typed configuration of a sweep, registered in Hydra's ConfigStore, and its validation.

conf/ holds the config groups (model/ prompts/ patching/ circuit/ resources/ tracking/ experiment/);
their YAML is merged onto `PatchsweepConfig`, so a misspelt key or a wrong type fails at compose time.
`validate` then checks what types cannot (components, ranges, the machine, the output folder) and
raises a one-line `ConfigError` naming the problem and the key to fix, before any compute.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING  # label in tables, folder names and MLflow, e.g. "refusal-tiny"
    path: str = MISSING  # a shipped organism name, a local Hugging Face folder, or a hub id
    dtype: str = "float32"
    trust_remote_code: bool = False


@dataclass
class PromptsConfig:
    name: str = "${stem:${prompts.path},generated}"  # label of the prompt set (the file's stem)
    path: Optional[str] = None  # JSONL/CSV/Parquet with clean, corrupted[, category]; None = generated
    n_pairs: int = 64  # pairs to generate (before the behaviour screen)
    seed: int = 0
    split: str = "heldout"  # refusal-tiny's grammar: combinations held out of training, or "train"
    align: str = "none"  # "none": unequal token counts are an error; "end": align them from the end
    generate: bool = True  # the screen also checks short greedy replies, not only the first-token metric
    max_new_tokens: int = 8
    refusal_tokens: Optional[list[Any]] = None  # answer tokens (ids or vocabulary strings) overriding
    compliance_tokens: Optional[list[Any]] = None  # the ones derived from the model's own replies
    answer_top_k: int = 1  # derived answer tokens: the k most common first tokens of each kind of reply
    shard_size: int = 16  # pairs per work item


@dataclass
class PatchingConfig:
    components: list[str] = field(default_factory=lambda: ["resid_pre", "attn_out", "mlp_out", "head"])
    per_position: list[str] = field(default_factory=lambda: ["resid_pre"])  # the rest: all positions at once
    directions: list[str] = field(default_factory=lambda: ["denoise", "noise"])
    layers: Optional[list[int]] = None  # None = every layer
    heads: Optional[list[int]] = None  # None = every head
    metric: str = "logit_diff"
    batch_size: Optional[int] = None  # patch rows per forward pass; None = chosen from free memory


@dataclass
class CircuitConfig:
    """Aggregation of effects and the circuit step (pipeline.circuit; its CIRCUIT_DEFAULTS mirror these)."""
    enabled: bool = True  # run the circuit step after the summary
    n_bootstrap: int = 1000  # bootstrap resamples over pairs for the confidence intervals
    ci: float = 0.95
    seed: int = 0
    top_k: int = 5  # strongest layers listed in the printed summary and report.md
    target: float = 0.8  # faithfulness the circuit must reach
    max_fraction: float = 0.1  # the size a circuit should stay under, as a fraction of candidate nodes
    max_pairs: int = 64  # pairs used by the circuit step (a seeded sample when there are more)
    n_random: int = 32  # random circuits of the same size (the control)
    verify_top: int = 64  # attribution's strongest nodes verified exactly ...
    verify_random: int = 32  # ... plus this many random others
    verify_all_rows: int = 20000  # verify every node when nodes x pairs is at most this
    strong_effect: float = 0.05  # a node is strong when its exact single-node effect reaches this
    recall_k: int = 20  # top-k recall of attribution uses k = min(circuit size, recall_k)
    edge_min: float = 0.02  # path effects below this are recorded but not drawn
    edges: bool = True  # path patching between circuit nodes
    edge_nodes: int = 16  # edges are measured among at most this many of the circuit's strongest nodes
    direction_layers: int = 16  # layers whose refusal direction gets an addition test
    max_batch_rows: Optional[int] = None  # rows per forward in the circuit step; None = from free memory


@dataclass
class ResourcesConfig:
    device: str = "cpu"  # torch device the model actors use: cpu or cuda
    num_cpus: Optional[int] = None  # CPUs of the private local Ray instance (None = all)
    actors: int = 1  # model-holding actors, each loads the model once
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    torch_threads: int = 1  # intra-op threads per actor
    max_in_flight: int = 2  # work items queued per actor (bounded window)
    max_retries: int = 3  # resubmissions of a work item whose actor died


@dataclass
class RayConfig:
    address: str = "local"  # "local": a private Ray instance; or a cluster address (ray://host:10001, auto)
    namespace: str = "patchsweep"
    log_to_driver: bool = False  # worker stdout/stderr in the driver's terminal


@dataclass
class TrackingConfig:
    enabled: bool = True
    uri: Optional[str] = None  # None = sqlite:///<output_root>/mlflow.db, artifacts beside it
    experiment: str = "patchsweep"  # MLflow experiment name
    ui_host: str = "127.0.0.1"
    ui_port: int = 5000


@dataclass
class PatchsweepConfig:
    name: str = MISSING  # the experiment preset
    output_root: str = "outputs"
    output_dir: str = "${output_root}/${name}/${model.name}-${prompts.name}"
    resume: bool = False  # allow writing into a folder that holds another experiment's results
    model: ModelConfig = field(default_factory=ModelConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    patching: PatchingConfig = field(default_factory=PatchingConfig)
    circuit: CircuitConfig = field(default_factory=CircuitConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    ray: RayConfig = field(default_factory=RayConfig)


# ${stem:path,default} labels a prompt file by its stem; ${basename:path,default} a model by its folder name.
OmegaConf.register_new_resolver("stem", lambda path, default: Path(str(path)).stem if path else default, replace=True)
OmegaConf.register_new_resolver("basename", lambda path, default: Path(str(path)).name if path else default,
                                replace=True)
ConfigStore.instance().store(name="patchsweep_schema", node=PatchsweepConfig)

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# The parts of a config that determine the expensive results (pairs, activations, effects); the rest
# (aggregation, resources, tracking, ray) can change between runs over the same output folder.
SCIENCE_KEYS = ("model", "prompts", "patching")


class ConfigError(ValueError):
    """A config the pipeline cannot run; the message names the problem and the key to fix."""


def to_dict(cfg: DictConfig | dict) -> dict:
    """Plain, fully resolved dict (what actors and MLflow get; never a DictConfig)."""
    if isinstance(cfg, dict):
        return cfg
    return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


def config_hash(cfg: DictConfig | dict) -> str:
    plain = to_dict(cfg)
    science = {k: plain[k] for k in SCIENCE_KEYS}
    science["model"] = {k: v for k, v in science["model"].items() if k != "name"}
    return hashlib.sha256(json.dumps(science, sort_keys=True).encode()).hexdigest()[:16]


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


def tracking_uri(cfg: dict) -> str:
    uri = cfg["tracking"]["uri"]
    if uri:
        return uri
    return f"sqlite:///{Path(cfg['output_root']).resolve() / 'mlflow.db'}"


# ---- validation ----------------------------------------------------------------------------------

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def validate(cfg: DictConfig | dict) -> dict:
    """Check everything that can be checked before compute; returns the resolved plain config."""
    try:
        plain = to_dict(cfg)
    except Exception as err:  # missing values, bad interpolations
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    _check_patching(plain)
    _check_sizes(plain)
    _check_resources(plain)
    _check_prompts(plain)
    _check_tracking(plain)
    _check_output_dir(plain)
    folder = _check_model(plain)
    _check_pairs_file(plain, folder)
    return plain


def validate_screen(cfg: DictConfig | dict) -> dict:
    """The checks that apply to `patchsweep screen` (a model, a prompt file, somewhere to write)."""
    try:
        plain = to_dict(cfg)
    except Exception as err:
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    if not plain["prompts"]["path"]:
        raise ConfigError("patchsweep screen needs a prompt file: set prompts.path=<JSONL/CSV/Parquet with "
                          "columns prompt, harmful>")
    _check_resources(plain)
    _check_prompts(plain)
    if not _writable_folder(Path(plain["output_dir"])):
        raise ConfigError(f"output folder {plain['output_dir']} cannot be written: set output_dir to a writable folder")
    _check_model(plain)
    return plain


def _check_patching(cfg: dict) -> None:
    from pipeline.engine.metrics import METRICS
    from pipeline.engine.patching import COMPONENTS, DIRECTIONS

    patching = cfg["patching"]
    if not patching["components"]:
        raise ConfigError(f"patching.components is empty: choose some of {list(COMPONENTS)}")
    for key, allowed in (("components", COMPONENTS), ("per_position", COMPONENTS), ("directions", DIRECTIONS)):
        for value in patching[key]:
            if value not in allowed:
                raise ConfigError(f"unknown {key[:-1] if key != 'per_position' else 'component'} {value!r} in "
                                  f"patching.{key}: choose from {list(allowed)}")
    if not patching["directions"]:
        raise ConfigError(f"patching.directions is empty: choose some of {list(DIRECTIONS)}")
    if patching["metric"] not in METRICS:
        raise ConfigError(f"unknown metric {patching['metric']!r} in patching.metric: choose from {list(METRICS)}")


def _check_sizes(cfg: dict) -> None:
    positive = {
        "patching.batch_size": cfg["patching"]["batch_size"],
        "prompts.n_pairs": cfg["prompts"]["n_pairs"],
        "prompts.shard_size": cfg["prompts"]["shard_size"],
        "prompts.answer_top_k": cfg["prompts"]["answer_top_k"],
        "resources.actors": cfg["resources"]["actors"],
        "resources.cpus_per_actor": cfg["resources"]["cpus_per_actor"],
        "resources.torch_threads": cfg["resources"]["torch_threads"],
        "resources.max_in_flight": cfg["resources"]["max_in_flight"],
        "circuit.n_bootstrap": cfg["circuit"]["n_bootstrap"],
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive: set {key} to 1 or more")
    if not 0 < cfg["circuit"]["ci"] < 1:
        raise ConfigError(f"circuit.ci={cfg['circuit']['ci']} must be between 0 and 1 (e.g. 0.95)")
    if cfg["resources"]["gpus_per_actor"] < 0 or cfg["resources"]["max_retries"] < 0:
        raise ConfigError("resources.gpus_per_actor and resources.max_retries must not be negative")


def _check_resources(cfg: dict) -> None:
    res = cfg["resources"]
    if res["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {res['device']!r} in resources.device: choose cpu or cuda")
    wants_gpu = res["device"] == "cuda" or res["gpus_per_actor"] > 0
    if wants_gpu and res["device"] != "cuda":
        raise ConfigError("resources.gpus_per_actor > 0 with resources.device=cpu: use resources=gpu "
                          "(device cuda) or set resources.gpus_per_actor=0")
    if res["device"] == "cuda" and res["gpus_per_actor"] <= 0:
        raise ConfigError("resources.device=cuda needs resources.gpus_per_actor > 0: use resources=gpu")
    # A cluster's GPUs are the cluster's business; on a private local instance this machine must have one.
    if wants_gpu and cfg["ray"]["address"] == "local":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("a GPU was asked for (resources.device=cuda) but this machine has none: "
                              "use resources=cpu, or ray.address=<a cluster with GPUs>")


def _check_prompts(cfg: dict) -> None:
    prompts = cfg["prompts"]
    if prompts["align"] not in ("none", "end"):
        raise ConfigError(f"unknown alignment {prompts['align']!r} in prompts.align: choose none or end")
    path = prompts["path"]
    if path is None:
        return
    if not Path(path).is_file():
        raise ConfigError(f"prompts file {path!r} does not exist: set prompts.path to a JSONL, CSV or Parquet file")
    if Path(path).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ConfigError(f"prompts file {path!r} is not JSONL, CSV or Parquet: fix prompts.path")


def _check_tracking(cfg: dict) -> None:
    if not cfg["tracking"]["enabled"]:
        return
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        writable = _writable_folder(db.parent) and (not db.exists() or os.access(db, os.W_OK))
        if not writable:
            raise ConfigError(f"MLflow store {uri} cannot be written: set tracking.uri to a writable "
                              "sqlite:///<path>/mlflow.db or a server URI, or tracking.enabled=false")
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise ConfigError(f"MLflow store {uri!r} is a plain folder store, which MLflow 3 no longer accepts: "
                          "set tracking.uri=sqlite:///<path>/mlflow.db or a server URI (http://host:port)")


def _writable_folder(folder: Path) -> bool:
    """Create `folder` if needed and prove a file can be made in it (permission bits mean little to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".patchsweep-probe-"):
            return True
    except OSError:
        return False


def _check_output_dir(cfg: dict) -> None:
    out = Path(cfg["output_dir"])
    if not _writable_folder(out):
        raise ConfigError(f"output folder {out} cannot be written: set output_dir to a writable folder")
    saved = out / "config.yaml"
    if cfg["resume"] or not saved.is_file():
        return
    try:
        saved_hash = config_hash(OmegaConf.load(saved))
    except Exception:
        saved_hash = "unreadable"
    if saved_hash != config_hash(cfg):
        raise ConfigError(f"output folder {out} holds another experiment's results (config hash {saved_hash}, "
                          f"this one {config_hash(cfg)}): set output_dir=<a new folder>, or resume=true to "
                          "reuse it")


def _check_model(cfg: dict) -> str:
    """The model exists and the layers/heads asked for are in range; returns its folder or hub id."""
    from pipeline.organisms import ORGANISMS, resolve

    path = cfg["model"]["path"]
    if path in ORGANISMS:
        folder = resolve(path)  # a shipped organism: its folder (built on first use is set-up, not compute)
    elif Path(path).expanduser().exists():
        folder = str(Path(path).expanduser())
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"model folder {path!r} has no config.json: set model.path to a folder saved with "
                              f"save_pretrained, a hub id, or one of {sorted(ORGANISMS)}")
    elif path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ConfigError(f"model path {path!r} does not exist: set model.path to a model folder, a hub id "
                          f"(org/name), or one of {sorted(ORGANISMS)}")
    else:
        folder = path  # a hub id: AutoConfig fetches config.json only (or reads it from the local cache)
    n_layers, n_heads = _model_shape(folder, cfg)
    for layer in cfg["patching"]["layers"] or []:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} in patching.layers is out of range: {path} has layers 0..{n_layers - 1}")
    for head in cfg["patching"]["heads"] or []:
        if not 0 <= head < n_heads:
            raise ConfigError(f"head {head} in patching.heads is out of range: {path} has heads 0..{n_heads - 1}")
    return folder


def _check_pairs_file(cfg: dict, folder: str) -> None:
    """The user's pairs file reads, and every pair has equal token counts under the model's tokenizer and
    chat template (unless prompts.align=end): the tokenizer alone, no weights."""
    if cfg["prompts"]["path"] is None:
        return
    from transformers import AutoTokenizer

    from pipeline.stages.pairs import file_pairs, tokenize_pairs

    try:
        pairs = file_pairs(cfg["prompts"]["path"])
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg["model"]["trust_remote_code"])
        tokenize_pairs(tokenizer, pairs, cfg["prompts"]["align"])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _model_shape(folder: str, cfg: dict) -> tuple[int, int]:
    """(layers, heads) from config.json alone, after checking that the engine knows the architecture:
    no weights are loaded."""
    from transformers import AutoConfig

    from pipeline.engine.adapters import FAMILIES

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg["model"]["trust_remote_code"])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read the model config of {cfg['model']['path']!r} ({first}): "
                          "fix model.path") from None
    if config.model_type not in FAMILIES:
        raise ConfigError(f"unsupported architecture {config.model_type!r} of model.path {cfg['model']['path']!r}: "
                          f"use a causal LM whose model_type is one of {sorted(FAMILIES)} (or add it to "
                          "pipeline/engine/adapters.py)")
    return config.num_hidden_layers, config.num_attention_heads
