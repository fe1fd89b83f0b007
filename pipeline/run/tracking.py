"""MLflow: a run per model's sweep, live; a --multirun's sweeps are the children of a parent run named after
the multirun. Only the driver talks to MLflow.

A sweep's run is created when the sweep starts (RUNNING, with the config as params, system metrics
sampled while it runs), gets each stage's time and work counts as the stage finishes, and ends FINISHED
with the per-layer curves (metrics with step = layer, drawn by the UI as line charts), the summary and
the circuit's nodes as tables the UI shows (the columns that tell rows apart first), report.md's headline
as its description with a link to the whole report, the run folder's files as artifacts, lineage tags
(patchsweep's version and commit, weights and pairs hashes, library versions) and the pairs as a dataset
input; or FAILED (KILLED on Ctrl-C) with the error as its description and run.log beside it.

The default store is an SQLite file under the output root; `tracking.uri` points elsewhere (another
SQLite file, or a team's server). An experiment patchsweep creates in an SQLite store keeps its artifacts
beside the database (a server keeps its own); every artifact goes to its run's artifact location.

MLflow's usage telemetry is off in the command and in the UI server it starts (`make ui`):
MLFLOW_DISABLE_TELEMETRY=false turns it back on.

`python -m pipeline.run.tracking ui [--output-root outputs]` (`make ui`) serves the UI on 127.0.0.1 and
prints the address of the patchsweep experiment's runs, in MLflow's model-training view.
"""
from __future__ import annotations

import argparse
import fcntl
import logging
import os
import re
import sys
import threading
import time
import uuid
import warnings
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read when mlflow is imported
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # MLflow reports usage unless told not to

import mlflow  # noqa: E402
import mlflow.data  # noqa: E402
import pandas as pd  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from pipeline import provenance  # noqa: E402
from pipeline.messages import first_line, redact  # noqa: E402
from pipeline.outputs.files import ARTIFACTS, RUN_LOG, RunFolder  # noqa: E402
from pipeline.run.runner import SweepOutcome  # noqa: E402
from pipeline.run.sweep import Interrupted  # noqa: E402
from pipeline.run.workers import StageStats  # noqa: E402
from pipeline.schema import PatchsweepConfig, flatten, to_plain, tracking_uri  # noqa: E402
from pipeline.store import read_table  # noqa: E402

# Its start and stop notices would land between the progress bars, and a failing store would repeat its
# failure every few seconds; the store's own errors, tracebacks and all, come back as the exceptions the
# command reports in one line (`StoreFailed`).
logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
log = logging.getLogger(__name__)

SWEEP_TAG = "patchsweep.sweep"
UI_HOST, UI_PORT = "127.0.0.1", 5000  # `make ui`: this machine only
SYSTEM_METRICS_INTERVAL_S = 5.0  # a sweep of a minute still gets a curve
DESCRIPTION = "mlflow.note.content"  # the run page's description (markdown)
TABLES = {"summary": "tables/summary.json", "circuit_nodes": "tables/circuit_nodes.json"}
# A page address's query that opens MLflow's UI in its model-training view (a fresh browser opens the
# GenAI view: traces and evaluations).
MODEL_TRAINING = "workflowType=machine_learning"


def _experiment_id(client, cfg: PatchsweepConfig) -> str:
    return open_experiment(client, tracking_uri(cfg), cfg.tracking.experiment)


def store_client(uri: str) -> MlflowClient:
    """A client of the store at `uri`, the store opened: a new SQLite store gets its schema from MLflow
    then, under an flock of its folder, so commands started together on a new store do not race."""
    with _store_lock(uri):
        client = MlflowClient(uri)
        client.search_experiments(max_results=1)
        return client


def open_experiment(client, uri: str, name: str) -> str:
    """The id of experiment `name` in the store at `uri`, created if it has none (under the store's lock;
    one another process created meanwhile, as a server may have, is read back)."""
    with _store_lock(uri):
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            # A training-style experiment: the UI opens on runs, metrics and artifacts (not GenAI traces).
            return client.create_experiment(name, artifact_location=artifact_location(uri),
                                            tags={"mlflow.experimentKind": "custom_model_development"})
        except MlflowException as err:
            found = client.get_experiment_by_name(name) if err.error_code == "RESOURCE_ALREADY_EXISTS" else None
            if found is None:
                raise
            return found.experiment_id


@contextmanager
def _store_lock(uri: str):
    """Hold the folder of an SQLite store (an flock, released when the process ends however it ends);
    a server orders its own writes."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    folder = Path(uri[len("sqlite:///"):]).absolute().parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def artifact_location(uri: str) -> str | None:
    """Where a new experiment of an SQLite store keeps its artifacts: mlartifacts/ beside the database
    (MLflow would otherwise pick ./mlruns of the working folder). A server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    return None


class StoreFailed(RuntimeError):
    """The MLflow store failed once the results were on disk; the message says why in words."""


def store_file(uri: str) -> tuple[int, int] | None:
    """The identity (device, inode) of an SQLite store's file (None: not SQLite, or no file yet)."""
    try:
        found = os.stat(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None
    except OSError:
        return None
    return (found.st_dev, found.st_ino) if found else None


def store_failure(uri: str, err: BaseException, opened: tuple[int, int] | None) -> str:
    """What a failed MLflow store did, in words for one line: an SQLite store whose file (`opened`: its
    identity when the run began) went away or was replaced, or whose disk is full, is named so (MLflow's
    own message is about SQL flushes); anything else by its first line."""
    text = str(err)
    if opened is not None and store_file(uri) != opened:
        return f"its database file {uri[len('sqlite:///'):]} was removed or replaced while the sweep ran"
    if "database or disk is full" in text or "No space left on device" in text:
        return "the disk holding it is full"
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("(raised as")]
    return lines[0] if lines else first_line(err)


DESCRIPTION_LIMIT = 8000  # MLflow keeps at most this many characters of a tag's value
# report.md's level-2 sections that the description shows (their subsections left to the report).
HEADLINE_SECTIONS = ("What matters most", "Circuit")


def description(report: str, report_page: str, limit: int = DESCRIPTION_LIMIT) -> str:
    """The run page's description: report.md's opening (the run, the pairs kept) and its headline sections
    without their subsections, then a link to the whole report (`report_page`: its address in the UI, an
    artifact of the run). Images are left out: their relative links point nowhere in the UI, and the
    figures are the run's artifacts. Sections that would pass MLflow's limit are left to the report."""
    link = f"\n\n**The whole report:** [report.md]({report_page}) (among the run's artifacts)."
    parts, shown = re.split(r"(?m)^(?=##+ )", report), []
    for part in parts:
        heading = part.splitlines()[0] if part.startswith("#") else ""
        if part is parts[0] or (heading.startswith("## ") and heading[3:].strip() in HEADLINE_SECTIONS):
            text = "\n".join(line for line in part.splitlines() if not line.startswith("![")).strip()
            if sum(len(p) + 2 for p in shown) + len(text) + len(link) > limit:
                break
            shown.append(text)
    return "\n\n".join(shown)[:limit - len(link)] + link


def informative_first(frame: pd.DataFrame) -> pd.DataFrame:
    """The columns whose values differ between rows first, those with one value for every row (the run id,
    the model) last: the UI's table shows the first columns."""
    constant = [c for c in frame.columns if frame[c].astype(str).nunique(dropna=False) <= 1]
    return frame[[c for c in frame.columns if c not in constant] + constant]


def lineage_tags(provenance: dict) -> dict[str, str]:
    return {
        "model.weights_sha256": provenance["weights_hash"],
        "pairs.sha256": provenance["pairs_hash"],
        "config.hash": provenance["config_hash"],
    }


def start_tags(cfg: PatchsweepConfig, overrides: list[str]) -> dict[str, str]:
    """What is known when the run starts: code (the installed package's version and the commit it was built
    from: pipeline.provenance), model, output folder, command line."""
    commit = provenance.commit()
    known = {"mlflow.source.git.commit": commit} if commit != provenance.NOT_RECORDED else {}
    return {
        "patchsweep.version": provenance.version(),
        "git.commit": commit,
        **known,
        "model.id": redact(cfg.model.path),
        "versions": " ".join(f"{m.__name__}={m.__version__}" for m in (torch, transformers, ray, pa, mlflow)),
        "patchsweep.output_dir": str(Path(cfg.output_dir).resolve()),
        "patchsweep.overrides": redact(" ".join(overrides)),
    }


def run_name(cfg: PatchsweepConfig) -> str:
    """The child run's name: the model, and the prompt set when it is not the generated one."""
    prompts = cfg.prompts.name
    return cfg.model.name if prompts == "generated" else f"{cfg.model.name} / {prompts}"


def stage_metrics(stats: StageStats) -> dict[str, float]:
    return {f"time/{stats.stage}_s": stats.seconds, f"work/{stats.stage}_computed": stats.computed,
            f"work/{stats.stage}_reused": stats.reused, f"work/{stats.stage}_retried": stats.retried}


def result_metrics(outcome: SweepOutcome) -> tuple[dict[str, list[tuple[int, float]]], dict[str, float]]:
    """Per-layer curves (step = layer) and scalars: pairs kept, faithfulness."""
    curves = {}
    for (direction, component), points in outcome.curves.items():
        curves[f"{direction}/{component}"] = [(p.layer, p.mean) for p in points]
        curves[f"{direction}_ci/{component}_low"] = [(p.layer, p.ci_low) for p in points]
        curves[f"{direction}_ci/{component}_high"] = [(p.layer, p.ci_high) for p in points]
    report = outcome.pairs_report
    scalars = {"pairs/kept": report["n_kept"], "pairs/fraction_kept": report["fraction_kept"]}
    circuit = outcome.circuit
    if circuit is not None:
        scalars["circuit/faithfulness"] = circuit.faithfulness
        for condition, rate in (circuit.knockout.refusal_rate if circuit.knockout else {}).items():
            # by generation: plain, circuit_knocked_out, circuit_alone
            scalars[f"circuit/refusal_rate_{condition}"] = rate
    return curves, scalars


class LiveRun:
    """One model's sweep as an MLflow run, from its start to its end: the command's own run, or in a
    --multirun a child of its parent run (`parent_id`, which the multirun's `ParentRun` ends).

    The run is created in the background (a new SQLite store takes MLflow seconds of schema migrations)
    while the sweep starts Ray and loads the model; `run_id` waits for it. A store that fails never stops
    the sweep: the run then gets an id of its own, and `finish` raises the store's error once the results
    are on disk (the command says how to log them later).
    """

    def __init__(self, cfg: PatchsweepConfig, sweep_key: str, overrides: list[str], parent_id: str | None = None):
        self.cfg, self.uri, self.parent_id = cfg, tracking_uri(cfg), parent_id
        self.client: MlflowClient | None = None  # opened in the background (`store_client`)
        self._ids: dict[str, str] = {}
        self._error: BaseException | None = None
        self._own_id = uuid.uuid4().hex  # the run's id should the store fail
        self._store_file: tuple[int, int] | None = None  # the SQLite file the run was created in
        self._monitor: SystemMetricsMonitor | None = None
        self._thread = threading.Thread(target=self._create, args=(sweep_key, overrides), name="mlflow-run",
                                        daemon=True)
        self._thread.start()

    def _create(self, sweep_key: str, overrides: list[str]) -> None:
        try:
            self.client = client = store_client(self.uri)
            cfg = self.cfg
            experiment_id = _experiment_id(client, cfg)
            command = ({SWEEP_TAG: sweep_key} if self.parent_id is None else
                       {"mlflow.parentRunId": self.parent_id, SWEEP_TAG + ".member": sweep_key})
            tags = {**command, **start_tags(cfg, overrides),
                    DESCRIPTION: f"Running since {time.strftime('%Y-%m-%d %H:%M:%S')}: stage times appear as metrics "
                                 f"(`time/...`) as the stages finish. Files: `{Path(cfg.output_dir).resolve()}`."}
            run_id = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags).info.run_id
            self._ids = {"experiment_id": experiment_id, "run_id": run_id}
            self._store_file = store_file(self.uri)
            params = flatten(to_plain(cfg))
            params["overrides"] = " ".join(overrides)
            items = [mlflow.entities.Param(k, redact(v)[:6000]) for k, v in params.items()]
            for start in range(0, len(items), 100):  # MLflow's batch limit: 100 params
                client.log_batch(run_id, params=items[start:start + 100])
            self._monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                                 tracking_uri=self.uri)
            self._monitor.start()
        except BaseException as err:  # re-raised in the driver's thread by `ids`
            self._error = err

    @property
    def ids(self) -> dict[str, str]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._ids

    @property
    def run_id(self) -> str:
        self._thread.join()
        return self._ids["run_id"] if self._error is None else self._own_id

    def stage_finished(self, stats: StageStats) -> None:
        self._thread.join()
        if self._error is not None:
            return
        try:
            self._log_metrics({key: [(0, value)] for key, value in stage_metrics(stats).items()})
        except Exception as err:  # reported by `finish`, once the results are on disk
            self._error = err

    def _log_metrics(self, series: dict[str, list[tuple[int, float]]]) -> None:
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(key, float(value), now, int(step))
                   for key, points in series.items() for step, value in points]
        for start in range(0, len(metrics), 1000):  # MLflow's batch limit: 1000 metrics
            self.client.log_batch(self.run_id, metrics=metrics[start:start + 1000])

    def finish(self, outcome: SweepOutcome) -> dict[str, str]:
        """The results, then FINISHED; returns the ids, the store's URI and the run's path in the UI. A store
        that fails raises `StoreFailed`, saying why in words."""
        try:
            return self._finish(outcome)
        except Exception as err:
            raise StoreFailed(store_failure(self.uri, err, self._store_file)) from err

    def _finish(self, outcome: SweepOutcome) -> dict[str, str]:
        ids = self.ids  # a store that failed as the run began raises its own error here
        client, run_id, folder = self.client, self.run_id, RunFolder(outcome.run_dir)
        curves, scalars = result_metrics(outcome)
        self._log_metrics({**curves, **{key: [(0, value)] for key, value in scalars.items()}})
        page = f"#/experiments/{ids['experiment_id']}/runs/{run_id}/artifacts/{folder.report.name}?{MODEL_TRAINING}"
        tags = lineage_tags(outcome.provenance) | {DESCRIPTION: description(redact(folder.report.read_text()), page)}
        client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in tags.items()])
        for name, frame in tables(outcome).items():
            client.log_table(run_id, frame, TABLES[name])
        for name in ARTIFACTS:
            if (folder.root / name).is_file():
                client.log_artifact(run_id, str(folder.root / name))
        self._end("FINISHED", dataset=pairs_dataset(folder.pairs))
        return {**ids, "uri": redact(self.uri),
                "ui_path": f"#/experiments/{ids['experiment_id']}/runs/{run_id}?{MODEL_TRAINING}"}

    def fail(self, err: BaseException) -> None:
        """FAILED (KILLED when interrupted), the error as the description, run.log as an artifact."""
        self._thread.join()
        if self._error is not None:
            return  # the store failed: nothing to mark
        run_id = self.run_id
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, Interrupted)) else "FAILED"
        error = redact(f"{type(err).__name__}: {err}".strip())
        run_log = RunFolder(self.cfg.output_dir).run_log
        try:
            self.client.log_batch(run_id, tags=[
                mlflow.entities.RunTag("patchsweep.error", error[:5000]),
                mlflow.entities.RunTag(DESCRIPTION, f"**{status}**: `{error[:2000]}`\n\nThe run's log: "
                                                    f"`{RUN_LOG.name}` (artifacts; also `{run_log.resolve()}`)."),
            ])
            if run_log.is_file():
                self.client.log_artifact(run_id, str(run_log))
            self._end(status)
        except Exception:  # a store that fails now must not hide the error that ended the sweep
            log.warning("the MLflow run %s could not be marked %s", run_id, status, exc_info=True)

    def _end(self, status: str, dataset=None) -> None:
        """Stop the system metrics, log the dataset input (MLflow's public API logs datasets to the active
        run: the run is resumed for it) and end the run with `status`."""
        if self._monitor is not None:
            self._monitor.finish()
        mlflow.set_tracking_uri(self.uri)
        mlflow.start_run(run_id=self.run_id)
        try:
            if dataset is not None:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # schema inference hints about integer columns
                    mlflow.log_input(dataset, context="pairs")
        finally:
            mlflow.end_run(status)


def log_finished(cfg: PatchsweepConfig, outcome: SweepOutcome, sweep_key: str) -> dict[str, str]:
    """Log a sweep that finished without its MLflow run (`patchsweep log <run folder>`): the run is created,
    filled as `LiveRun.finish` fills one and ended; returns what `finish` returns."""
    overrides = OmegaConf.to_container(OmegaConf.load(RunFolder(outcome.run_dir).overrides))
    live = LiveRun(cfg, sweep_key, overrides)
    for stats in outcome.stats:
        live.stage_finished(stats)
    return live.finish(outcome)


NODE_COLUMNS = ("id", "component", "layer", "head", "position", "token", "effect", "effect_ci")  # shown first


def tables(outcome: SweepOutcome) -> dict[str, pd.DataFrame]:
    """The MLflow tables of a finished run: the summary (every site's mean and interval) and the
    circuit's nodes, the columns that tell rows apart first."""
    summary = read_table(RunFolder(outcome.run_dir).summary).to_pandas()
    summary = informative_first(summary)
    out = {"summary": summary.astype(object).where(summary.notna(), None)}
    if outcome.circuit is not None:
        nodes = pd.DataFrame([asdict(node) for node in outcome.circuit.nodes])
        first = [c for c in NODE_COLUMNS if c in nodes.columns]
        nodes = informative_first(nodes[first + [c for c in nodes.columns if c not in first]])
        out["circuit_nodes"] = nodes.astype(object).where(nodes.notna(), None)
    return out


def pairs_dataset(pairs_path: Path):
    """The pairs as an MLflow dataset: name, digest, schema (the text and scalar columns), the file as
    its source."""
    if not pairs_path.is_file():
        return None
    table = read_table(pairs_path)
    columns = [f.name for f in table.schema
               if not pa.types.is_list(f.type) and not isinstance(f.type, pa.ExtensionType)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return mlflow.data.from_pandas(table.select(columns).to_pandas(), source=pairs_path.resolve().as_uri(),
                                       name="pairs")


# ---- the UI --------------------------------------------------------------------------------------

def ui_command(uri: str, host: str = UI_HOST, port: int = UI_PORT) -> list[str]:
    # One worker: a single user's browser, and a light footprint on a small machine.
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def experiment_url(uri: str, experiment: str, base: str) -> str:
    """The address of `experiment`'s runs in the model-training view (MLflow's UI otherwise opens on its
    GenAI home page), or the UI's root when the store has no such experiment yet."""
    found = MlflowClient(uri).get_experiment_by_name(experiment)
    if found is None:
        return base
    return f"{base}/#/experiments/{found.experiment_id}/runs?{MODEL_TRAINING}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run.tracking", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="serve the MLflow UI for a patchsweep store (bound to 127.0.0.1)")
    ui.add_argument("--output-root", default="outputs", help="the output_root whose mlflow.db to open")
    ui.add_argument("--uri", default=None, help="an MLflow store URI instead (sqlite:///... or http://...)")
    ui.add_argument("--experiment", default="patchsweep", help="the experiment whose runs to open on")
    ui.add_argument("--host", default=UI_HOST)
    ui.add_argument("--port", type=int, default=UI_PORT)
    args = parser.parse_args(argv)
    uri = args.uri or f"sqlite:///{Path(args.output_root).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        sys.exit(redact(f"no MLflow store at {uri}: run a sweep first (make run), or pass --output-root/--uri"))
    url = experiment_url(uri, args.experiment, f"http://{args.host}:{args.port}")
    print(redact(f"MLflow UI for {uri}: open {url} (Ctrl-C to stop)"), flush=True)
    # The server's background job runner (GenAI scorers, prompt optimisation) is not needed to browse runs.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, ui_command(uri, args.host, args.port))


if __name__ == "__main__":
    main()


# ---- the parent run of a --multirun ------------------------------------------------------------------

COMPARISON_TABLE = "tables/comparison.json"


class ParentRun:
    """The parent run of a --multirun whose jobs run at once (pipeline.run.multirun): created before they
    start (their runs are its children; this ends it), named after the multirun (the experiment and its
    jobs' labels), with the params the jobs share and what tells them apart. Once they end: the comparison
    (comparison.png, the table as an MLflow table and as comparison.md; the table is also the run's
    description), each sweep's summary metrics, FINISHED or FAILED when a job failed."""

    def __init__(self, cfgs: list[PatchsweepConfig], sweep_key: str, labels: list[str]):
        self.cfg, self.uri = cfgs[0], tracking_uri(cfgs[0])
        self.client = store_client(self.uri)
        self.experiment_id = _experiment_id(self.client, self.cfg)
        self.run_id = self.client.create_run(self.experiment_id, run_name=multirun_name(self.cfg.name, labels),
                                             tags={SWEEP_TAG: sweep_key}).info.run_id
        flat = [flatten(to_plain(cfg)) for cfg in cfgs]
        shared = {k: v for k, v in flat[0].items() if all(f.get(k) == v for f in flat[1:])}
        params = {**shared, "jobs": str(len(cfgs)), "jobs.labels": " | ".join(labels),
                  "jobs.swept": ", ".join(sorted({k for f in flat for k in f if k not in shared}))}
        items = [mlflow.entities.Param(k, redact(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow's batch limit: 100 params
            self.client.log_batch(self.run_id, params=items[start:start + 100])

    def finish(self, compared: list, table: pd.DataFrame, files: dict[str, Path], description: str,
               failed: list[str]) -> dict[str, str]:
        """`compared`: the finished sweeps (pipeline.outputs.comparison.Compared) in job order, `table` their
        comparison, `files` the comparison's files (figure, markdown), `description` the run's (markdown),
        `failed` a line per job that failed."""
        metrics = {"jobs/finished": len(compared), "jobs/failed": len(failed)}
        for run, row in zip(compared, table.itertuples(index=False)):
            name = _metric_name(run.label)
            metrics[f"{name}/pairs_kept"] = run.n_pairs
            for column in ("faithfulness", "circuit_nodes", "direction_best_depth", "resid_pre_peak_depth",
                           "attn_out_peak_depth", "mlp_out_peak_depth"):
                value = getattr(row, column)
                if value is not None and not pd.isna(value):
                    metrics[f"{name}/{column}"] = float(value)
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[mlflow.entities.Metric(k, float(v), now, 0)
                                                    for k, v in metrics.items()])
        self.client.log_table(self.run_id, table.astype(object).where(table.notna(), None), COMPARISON_TABLE)
        for path in files.values():
            self.client.log_artifact(self.run_id, str(path))
        if failed:
            description += "\n**Failed jobs**\n\n" + "\n".join(f"- `{line}`" for line in failed) + "\n"
        self.client.set_tag(self.run_id, DESCRIPTION, redact(description))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
        return {"uri": redact(self.uri), "run_id": self.run_id, "experiment_id": self.experiment_id,
                "ui_path": f"#/experiments/{self.experiment_id}/runs/{self.run_id}?{MODEL_TRAINING}"}

    def fail(self, status: str = "FAILED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def multirun_name(experiment: str, labels: list[str], limit: int = 120) -> str:
    """A --multirun's parent run name: "refusal_tiny --multirun: refusal-tiny, refusal-tiny-gpt2, ..."."""
    name = f"{experiment} --multirun: {', '.join(labels)}"
    return name if len(name) <= limit else name[:limit - len(f"... ({len(labels)} jobs)")] + f"... ({len(labels)} jobs)"


def _metric_name(label: str) -> str:
    """A sweep's label as a metric-name prefix (MLflow allows letters, digits, _ - . / and spaces)."""
    return re.sub(r"[^\w\-. /]", "_", label)
