"""`patchsweep compare RUN_A RUN_B [RUN_C ...]`: finished runs against the first (the reference), each
measure against the null band of the runs' own resamples (pipeline.analysis.compare), one verdict; the
compare folder (compare.json, compare.md, compare.png) and an MLflow run linking the compared runs.

`compare_runs` reads like the method: `read_runs` refuses what cannot be compared (an unfinished or damaged
folder, a run without a circuit, runs of different experiments) before any model loads; `load_models` loads
each run's model as its sweep did and checks the weights are the ones the run was computed on; `compare_pair`
measures one run against the reference; `write` and `track` publish.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import yaml

from pipeline.analysis.circuit.result import Circuit
from pipeline.analysis.compare import (
    Measure,
    Verdict,
    band,
    faithfulness_band,
    jaccard_measure,
    rank_measures,
    refusal_measures,
    resampled_circuits,
    site_matrix,
    size_measure,
    verdict,
)
from pipeline.analysis.compare_model import RunModel
from pipeline.analysis.directions import selection_summary
from pipeline.analysis.statistics import read_effects
from pipeline.messages import first_line
from pipeline.outputs.files import RunFolder
from pipeline.outputs.load import Run, load_run
from pipeline.schema import CompareConfig, PatchsweepConfig, TrackingConfig, from_plain
from pipeline.store import MANIFEST, Manifest, read_table, tensor_numpy

FAIL_ON_DRIFT_STATUS = 3  # compare.fail_on_drift=true and the verdict is drift: schedulers see a failed job


class NotComparable(ValueError):
    """Runs that cannot be compared; the message is one line naming the run and the fix."""


@dataclass
class ComparedRun:
    """A finished run, as the comparison reads it."""
    path: Path
    run: Run
    cfg: PatchsweepConfig
    circuit: Circuit
    stability: dict  # circuit.json's stability as stored: older runs lack the keys the honest bands read
    direction: dict | None  # direction.arrow's summary with its chosen vector, None when it chose none
    model: RunModel | None = None

    @property
    def label(self) -> str:
        return self.path.name

    @property
    def nodes(self) -> list[str]:
        return [n.id for n in self.circuit.nodes]

    @property
    def circuits(self) -> list[list[str]] | None:
        """The node ids of the circuits of the independent re-searches (None: an older run)."""
        return self.stability.get("circuits")

    @property
    def supernode_circuits(self) -> list[list[str]] | None:
        return self.stability.get("supernode_circuits")

    @property
    def supernodes(self) -> set[str]:
        """The circuit's supernodes, keyed as supernode_circuits are where the run has them."""
        keyed = self.stability.get("supernodes")
        return set(keyed["circuit"]) if isinstance(keyed, dict) else {g.id for g in self.circuit.supernodes}

    def null_circuits(self, rng: np.random.Generator) -> tuple[list[set[str]], list[int], bool]:
        """(circuits, their sizes, honest): the re-searched circuits, else drawn from inclusion frequencies."""
        frequency = {n.id: n.inclusion_frequency for n in self.circuit.nodes} | {
            n["id"]: n["frequency"] for n in self.stability["frequent_outside"]}
        null, honest = resampled_circuits(self.circuits, frequency, self.stability["n_resamples"], rng)
        return null, list(self.stability.get("sizes") or [len(c) for c in null]), honest


@dataclass
class Comparison:
    """One run against the reference."""
    run: str
    measures: list[Measure]
    reported: list[Measure]  # not deciding: per-layer ranks, the direction's best-layer shift
    verdict: Verdict
    not_compared: list[str] = field(default_factory=list)  # what could not be compared, in words
    honest: bool = True  # every band from the runs' independent re-searches


@dataclass
class Compared:
    reference: ComparedRun
    runs: list[ComparedRun]
    comparisons: list[Comparison]
    folder: Path
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)
    tracking: dict | None = None  # the MLflow run: uri, run_id, ui_path
    tracking_error: str | None = None  # why the store failed, in words

    @property
    def verdict(self) -> Verdict:
        drifted = [m for c in self.comparisons if c.verdict.drift for m in c.verdict.measures]
        checked = [m for c in self.comparisons for m in c.verdict.measures]
        return Verdict(bool(drifted), tuple(dict.fromkeys(drifted or checked)))


# ---- the command's phases -----------------------------------------------------------------------------

def read_runs(paths: list[Path]) -> list[ComparedRun]:
    """Each folder as a finished run with a circuit, all of one experiment; else one line (NotComparable)."""
    if len(paths) < 2:
        raise NotComparable("patchsweep compare needs at least two run folders: the reference first, then the runs "
                            "to compare with it")
    runs = [read_run(path) for path in paths]
    reference = runs[0]
    for other in runs[1:]:
        if other.cfg.name != reference.cfg.name:
            raise NotComparable(f"{other.path} is a run of experiment {other.cfg.name!r}, the reference "
                                f"{reference.path} of {reference.cfg.name!r}: compare runs of one experiment (their "
                                "prompts and circuit options differ otherwise)")
    return runs


def read_run(path: Path) -> ComparedRun:
    if not path.is_dir():
        raise NotComparable(f"{path} is not a folder: give a sweep's run folder (the one it printed under Files:)")
    try:
        run = load_run(path)
    except ValueError as err:
        raise NotComparable(str(err)) from None
    cfg = from_plain(run.config)
    try:
        circuit = run.circuit
    except (KeyError, TypeError):
        raise NotComparable(f"{path}: its circuit.json is of a format this version cannot read: run its sweep again "
                            "(the same command recomputes the circuit step)") from None
    if circuit is None:
        raise NotComparable(f"{path} has no circuit.json (its sweep ran with circuit.enabled=false): run it with "
                            "circuit.enabled=true (the same command resumes it)")
    stability = json.loads(run.folder.circuit.read_text())["stability"]
    return ComparedRun(path, run, cfg, circuit, stability,
                       chosen_direction(path))


def chosen_direction(path: Path) -> dict | None:
    summary = selection_summary(path)
    if summary is None or summary["chosen"] is None:
        return None
    table = read_table(RunFolder(path).direction)
    row = table.column("chosen").to_pylist().index(True)
    return summary["chosen"] | {"vector": np.array(tensor_numpy(table.column("direction"))[row], dtype=float)}


def load_models(runs: list[ComparedRun], device: str) -> None:
    """Each run's model, loaded as its sweep's actors load it, with the run's circuit pairs; refused in one
    line when its weights are not those the run was computed on."""
    from pipeline.run.workers import load_configured, weights_hash

    for run in runs:
        spec = run.cfg.model
        model, _ = load_configured(spec, device)
        recorded = run.run.provenance.get("weights_hash")
        if recorded and weights_hash(model) != recorded:
            raise NotComparable(f"{run.path}: model {spec.path!r} has other weights now than the run was computed on: "
                                "run its sweep again (the same command), or restore those weights")
        run.model = RunModel(model, run.run.read("pairs"), run.cfg.circuit, run.cfg.patching.metric)


def compare_pair(a: ComparedRun, b: ComparedRun, options: CompareConfig) -> Comparison:
    """Run `b` against the reference `a`: every measure with its null band."""
    rng = np.random.default_rng(options.seed)
    level, n = options.level, options.n_draws
    measures, reported, missing = [], [], []

    # circuits: nodes, supernodes, size
    null_a, sizes_a, honest_a = a.null_circuits(rng)
    null_b, sizes_b, honest_b = b.null_circuits(rng)
    honest = honest_a and honest_b
    source = ("pairs of circuits from independent re-searches" if honest else
              "circuits drawn from the nodes' stored inclusion frequencies")
    measures.append(jaccard_measure("node_jaccard", set(a.nodes), set(b.nodes), null_a, null_b, level, honest, source))
    if a.supernode_circuits and b.supernode_circuits:
        measures.append(jaccard_measure("supernode_jaccard", a.supernodes, b.supernodes,
                                        [set(c) for c in a.supernode_circuits], [set(c) for c in b.supernode_circuits],
                                        level, True, "pairs of supernode circuits from independent re-searches"))
    else:
        reported.append(Measure("supernode_jaccard", _jaccard(a.supernodes, b.supernodes), None, False,
                                "no band: a run stores no stability.supernode_circuits"))
    measures.append(size_measure(a.circuit.size, b.circuit.size, sizes_a, sizes_b, level, honest))

    # effect ranks per component and layer
    wide_a, wide_b = site_matrix(read_effects(a.run.folder.effects)), site_matrix(read_effects(b.run.folder.effects))
    deciding, per_layer = rank_measures(wide_a, wide_b, level, n, rng)
    measures += deciding
    reported += per_layer

    # cross-faithfulness: each circuit on the other run's model and pairs
    own = [r.model.faithfulness(r.circuits or []) for r in (a, b)]
    draws = [f for e in own for f in e.faithfulness if f is not None]
    f_band = faithfulness_band(draws, [a.circuit.faithfulness_ci, b.circuit.faithfulness_ci], level,
                               bool(a.circuits and b.circuits))
    for name, run in (("faithfulness_recomputed/a", a), ("faithfulness_recomputed/b", b)):  # the evaluator agrees
        [f] = run.model.faithfulness([run.nodes]).faithfulness
        reported.append(Measure(name, f, None, False, f"circuit.json: {run.circuit.faithfulness:.3f}"))
    for name, circuit, target in (("cross_faithfulness/a_on_b", a, b), ("cross_faithfulness/b_on_a", b, a)):
        evaluated = target.model.faithfulness([circuit.nodes])
        if evaluated.missing:
            missing.append(f"{name}: {target.label}'s model has no node {', '.join(evaluated.missing)}")
        measures.append(Measure(name, evaluated.faithfulness[0], f_band))

    # behaviour: refusal rates plain and with the circuit knocked out
    ka, kb = a.circuit.knockout, b.circuit.knockout
    if ka and kb:
        measures += refusal_measures(ka.refusal_rate, ka.n_pairs, kb.refusal_rate, kb.n_pairs, level, rng)
    else:
        missing.append("refusal rates: a run has no knockout_generation in its circuit.json")

    # refusal direction
    if a.direction and b.direction:
        da, db = a.direction, b.direction
        if len(da["vector"]) == len(db["vector"]):
            cosine = float(da["vector"] @ db["vector"] / (np.linalg.norm(da["vector"]) * np.linalg.norm(db["vector"])))
            null = np.concatenate([r.model.direction_cosines(r.direction["layer"], r.direction["position_from_end"], n,
                                                             rng) for r in (a, b)])
            source = "mean differences of two independent bootstrap draws of each run's pairs"
            measures.append(Measure("direction_cosine", cosine, band(null, level, source)))
        else:
            missing.append(f"direction_cosine: the models' widths differ ({len(da['vector'])}, {len(db['vector'])})")
        reported.append(Measure("direction_best_layer_shift", float(db["layer"] - da["layer"]), None, False,
                                f"layer {da['layer']} -> {db['layer']}; no band: a selection is not re-drawn"))
    else:
        missing.append("refusal direction: a run has no chosen direction (direction.enabled=true chooses one)")
    return Comparison(b.label, measures, reported, verdict(measures), missing, honest)


def _jaccard(a: set, b: set) -> float:
    return len(a & b) / len(a | b) if a | b else 1.0


def compare_folder(runs: list[ComparedRun], options: CompareConfig) -> Path:
    if options.output_dir:
        return Path(options.output_dir)
    return Path(runs[0].cfg.output_root) / "compare" / "-vs-".join(r.label for r in runs)


def compare_runs(paths: list[Path], options: CompareConfig, tracking: list[str] = ()) -> Compared:
    """The whole command but the printing (see the module's docstring). `tracking`: tracking.<key>=<value>
    overrides of the reference's MLflow store; tracking.enabled=false logs nothing. A store that fails leaves
    the compare folder written and says why in `tracking_error`."""
    from pipeline.outputs.compare import write

    start = time.perf_counter()
    runs = read_runs(paths)
    cfg = tracked_config(runs[0].cfg, tracking)
    load_models(runs, options.device)
    comparisons = [compare_pair(runs[0], run, options) for run in runs[1:]]
    compared = Compared(runs[0], runs[1:], comparisons, compare_folder(runs, options), time.perf_counter() - start)
    compared.files = write(compared)
    if cfg.tracking.enabled:
        try:
            compared.tracking = track(compared, cfg, compared.files)
        except Exception as err:  # the store's own errors are many: the results are on disk
            compared.tracking_error = first_line(err)
    return compared


def tracked_config(cfg: PatchsweepConfig, overrides: list[str]) -> PatchsweepConfig:
    """The reference's config with tracking.<key>=<value> overrides; an unknown key is refused in one line."""
    keys = {f.name: f for f in fields(TrackingConfig)}
    values = {}
    for override in overrides:
        key, _, value = override.partition("=")
        name = key.split(".", 1)[1] if key.startswith("tracking.") else ""
        if name not in keys or not _:
            raise NotComparable(f"unknown override {override!r}: choose from "
                                f"{', '.join('tracking.' + k + '=<value>' for k in keys)}")
        values[name] = yaml.safe_load(value)
    return replace(cfg, tracking=replace(cfg.tracking, **values))


def newest_two(folder: Path) -> list[Path]:
    """The finished runs directly under `folder` (a scheduled sweep's dated folders), the one before the
    newest first: [reference, newest]; fewer when there are fewer."""
    finished = [p for p in folder.iterdir() if (p / MANIFEST).is_file() and Manifest(p, "run").complete]
    return sorted(finished, key=lambda p: (p / MANIFEST).stat().st_mtime)[-2:]


def track(compared: Compared, cfg: PatchsweepConfig, files: dict[str, Path]) -> dict[str, str]:
    """An MLflow run in the reference's store and experiment (cfg: its config, tracking.* overridden): the
    compared runs as tags, each measure and its band as metrics, the compare folder as artifacts, compare.md
    as its description."""
    import mlflow

    from pipeline.messages import redact
    from pipeline.run.tracking import (
        DESCRIPTION,
        MODEL_TRAINING,
        _metric_name,
        description,
        open_experiment,
        store_client,
    )
    from pipeline.schema import tracking_uri

    uri = tracking_uri(cfg)
    client = store_client(uri)
    experiment_id = open_experiment(client, uri, cfg.tracking.experiment)
    runs = [compared.reference, *compared.runs]
    tags = {"patchsweep.compare.reference": str(compared.reference.path.resolve()),
            "patchsweep.compare.runs": " | ".join(str(r.path.resolve()) for r in compared.runs),
            "patchsweep.compare.run_ids": " ".join(r.run.run_id for r in runs),
            "patchsweep.compare.verdict": compared.verdict.line,
            "patchsweep.output_dir": str(compared.folder.resolve())}
    run = client.create_run(experiment_id, run_name=f"compare {' vs '.join(r.label for r in runs)}", tags=tags)
    metrics = {"compare/drift": float(compared.verdict.drift), "compare/seconds": compared.seconds}
    for c in compared.comparisons:
        prefix = _metric_name(c.run) if len(compared.comparisons) > 1 else "compare"
        metrics[f"{prefix}/drift"] = float(c.verdict.drift)
        for m in (*c.measures, *c.reported):
            if m.value is not None:
                metrics[f"{prefix}/{m.name}"] = m.value
            if m.band is not None:
                metrics[f"{prefix}/{m.name}_band_low"] = m.band.low
                metrics[f"{prefix}/{m.name}_band_high"] = m.band.high
    now = int(time.time() * 1000)
    items = [mlflow.entities.Metric(_metric_name(k), float(v), now, 0) for k, v in metrics.items()]
    for start in range(0, len(items), 1000):  # MLflow's batch limit: 1000 metrics
        client.log_batch(run.info.run_id, metrics=items[start:start + 1000])
    for path in files.values():
        client.log_artifact(run.info.run_id, str(path))
    page = f"#/experiments/{experiment_id}/runs/{run.info.run_id}/artifacts/compare.md?{MODEL_TRAINING}"
    client.set_tag(run.info.run_id, DESCRIPTION, redact(description(files["compare.md"].read_text(), page)))
    client.set_terminated(run.info.run_id, status="FINISHED")
    return {"uri": redact(uri), "run_id": run.info.run_id,
            "ui_path": f"#/experiments/{experiment_id}/runs/{run.info.run_id}?{MODEL_TRAINING}"}
