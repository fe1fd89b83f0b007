"""MLflow: one parent run per sweep, one child run per model. Only the driver talks to MLflow.

The default store is an SQLite file under the output root with artifacts beside it (no server);
`tracking.uri` points elsewhere (a team's server). Params are the flattened config; per-layer curves are
metrics with step = layer, so the UI draws them as line charts; artifacts are the run folder's
diagrams, tables, report and config; tags carry the lineage (git commit, weights and pairs hashes,
library versions); the pairs are logged as a dataset input.

`python -m pipeline.run.tracking ui [--output-root outputs]` (`make ui`) serves the UI on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # read when mlflow is imported

import mlflow  # noqa: E402
import mlflow.data  # noqa: E402
import pyarrow as pa  # noqa: E402
import ray  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from mlflow.entities import DatasetInput, InputTag, Metric, Param, RunTag  # noqa: E402

from pipeline.config import flatten, tracking_uri  # noqa: E402
from pipeline.outputs.files import ARTIFACTS  # noqa: E402
from pipeline.run.sweep import SweepOutcome  # noqa: E402
from pipeline.store import read_table  # noqa: E402

SWEEP_TAG = "patchsweep.sweep"
UI_HOST, UI_PORT = "127.0.0.1", 5000  # `make ui`: this machine only


def _client(cfg: dict) -> MlflowClient:
    return MlflowClient(tracking_uri(cfg))


def prepare_store(cfg: dict) -> threading.Thread:
    """Create (or migrate) the store and the experiment in the background while the sweep computes:
    a new SQLite store takes MLflow several seconds of schema migrations. A store that fails here fails
    again when the run is logged, and is reported there."""

    def prepare():
        with contextlib.suppress(Exception):
            _experiment_id(_client(cfg), cfg)

    thread = threading.Thread(target=prepare, name="mlflow-store", daemon=True)
    thread.start()
    return thread


def _experiment_id(client, cfg: dict) -> str:
    name = cfg["tracking"]["experiment"]
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    uri = tracking_uri(cfg)
    # A SQLite store keeps its artifacts beside the database (MLflow's default is ./mlruns under whatever
    # folder the command ran in).
    if uri.startswith("sqlite:///"):
        artifact_location = (Path(uri[len("sqlite:///"):]).resolve().parent / "mlartifacts").as_uri()
    # A training-style experiment: the UI opens on runs, metrics and artifacts (not GenAI traces).
    return client.create_experiment(name, artifact_location=artifact_location,
                                    tags={"mlflow.experimentKind": "custom_model_development"})


def _parent_run(client, experiment_id: str, cfg: dict, sweep_key: str) -> str:
    """The sweep's parent run: found by its tag (a multirun's jobs share it) or created."""
    found = client.search_runs([experiment_id], filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_key}'", max_results=1)
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=f"{cfg['name']} sweep", tags={SWEEP_TAG: sweep_key})
    return run.info.run_id


def lineage_tags(cfg: dict, provenance: dict) -> dict[str, str]:
    return {
        "git.commit": git_commit(),
        "model.id": cfg["model"]["path"],
        "model.weights_sha256": provenance["weights_hash"],
        "pairs.sha256": provenance["pairs_hash"],
        "config.hash": provenance["config_hash"],
        "versions": " ".join(f"{m.__name__}={m.__version__}"
                             for m in (torch, transformers, ray, pa, mlflow)),
        "mlflow.source.git.commit": git_commit(),
    }


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_name(cfg: dict) -> str:
    """The child run's name: the model, and the prompt set when it is not the generated one."""
    prompts = cfg["prompts"]["name"]
    return cfg["model"]["name"] if prompts == "generated" else f"{cfg['model']['name']} / {prompts}"


def sweep_metrics(outcome: SweepOutcome) -> tuple[dict[str, list[tuple[int, float]]], dict[str, float]]:
    """Per-layer curves (step = layer) and scalars: fraction of pairs kept, stage times, faithfulness."""
    curves = {}
    for (direction, component), points in outcome.curves.items():
        curves[f"{direction}/{component}"] = [(p.layer, p.mean) for p in points]
        curves[f"{direction}_ci/{component}_low"] = [(p.layer, p.ci_low) for p in points]
        curves[f"{direction}_ci/{component}_high"] = [(p.layer, p.ci_high) for p in points]
    scalars = {f"time/{s.stage}_s": s.seconds for s in outcome.stats}
    scalars.update({f"work/{s.stage}_computed": s.computed for s in outcome.stats})
    scalars.update({f"work/{s.stage}_reused": s.reused for s in outcome.stats})
    report = outcome.pairs_report
    scalars.update({"pairs/kept": report["n_kept"], "pairs/fraction_kept": report["fraction_kept"]})
    if outcome.circuit is not None:
        scalars["circuit/faithfulness"] = outcome.circuit["faithfulness"]
    return curves, scalars


def log_model_run(cfg: dict, outcome: SweepOutcome, sweep_key: str) -> dict[str, str]:
    """Log one model's sweep as a child of the sweep's parent run; returns the ids and the UI path."""
    run_dir, provenance = outcome.run_dir, outcome.provenance
    curves, scalars = sweep_metrics(outcome)
    client = _client(cfg)
    experiment_id = _experiment_id(client, cfg)
    parent_id = _parent_run(client, experiment_id, cfg, sweep_key)
    tags = {"mlflow.parentRunId": parent_id, SWEEP_TAG + ".member": sweep_key, **lineage_tags(cfg, provenance)}
    run = client.create_run(experiment_id, run_name=run_name(cfg), tags=tags)
    run_id = run.info.run_id
    try:
        now = int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in flatten({k: v for k, v in cfg.items() if k != "hydra"}).items()]
        metrics = [Metric(key, float(value), now, int(layer)) for key, points in curves.items() for layer, value in points]
        metrics += [Metric(key, float(value), now, 0) for key, value in scalars.items()]
        for start in range(0, len(params), 100):  # MLflow's batch limits: 100 params, 1000 metrics
            client.log_batch(run_id, params=params[start:start + 100])
        for start in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[start:start + 1000])
        _log_pairs_dataset(client, run_id, run_dir / "pairs.arrow")
        for name in ARTIFACTS:
            if (run_dir / name).is_file():
                client.log_artifact(run_id, str(run_dir / name))
        client.log_batch(run_id, tags=[RunTag("patchsweep.output_dir", str(run_dir.resolve()))])
        client.set_terminated(run_id)
    except BaseException:
        client.set_terminated(run_id, status="FAILED")
        raise
    finally:
        client.set_terminated(parent_id)  # the parent's end time follows its latest child
    return {"experiment_id": experiment_id, "parent_run_id": parent_id, "run_id": run_id,
            "uri": tracking_uri(cfg), "ui_path": f"#/experiments/{experiment_id}/runs/{run_id}"}


def _log_pairs_dataset(client, run_id: str, pairs_path: Path) -> None:
    """The pairs as an MLflow dataset input: name, digest, schema, and the file as its source."""
    if not pairs_path.is_file():
        return
    table = read_table(pairs_path)
    text_columns = [f.name for f in table.schema if not pa.types.is_list(f.type)
                    and not isinstance(f.type, pa.ExtensionType)]
    frame = table.select(text_columns).to_pandas()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # schema inference hints about integer columns
        dataset = mlflow.data.from_pandas(frame, source=pairs_path.resolve().as_uri(), name="pairs")
        entity = dataset._to_mlflow_entity()
    client.log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag("mlflow.data.context", "pairs")])])


# ---- the UI --------------------------------------------------------------------------------------

def ui_command(uri: str, host: str = UI_HOST, port: int = UI_PORT) -> list[str]:
    # One worker: a single user's browser, and a light footprint on a small machine.
    return [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
            "--workers", "1"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pipeline.run.tracking", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ui = sub.add_parser("ui", help="serve the MLflow UI for a patchsweep store (bound to 127.0.0.1)")
    ui.add_argument("--output-root", default="outputs", help="the output_root whose mlflow.db to open")
    ui.add_argument("--uri", default=None, help="an MLflow store URI instead (sqlite:///... or http://...)")
    ui.add_argument("--host", default=UI_HOST)
    ui.add_argument("--port", type=int, default=UI_PORT)
    args = parser.parse_args(argv)
    uri = args.uri or f"sqlite:///{Path(args.output_root).resolve() / 'mlflow.db'}"
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        sys.exit(f"no MLflow store at {uri}: run a sweep first (make run), or pass --output-root/--uri")
    print(f"MLflow UI for {uri} at http://{args.host}:{args.port} (Ctrl-C to stop)", flush=True)
    # The server's background job runner (GenAI scorers, prompt optimisation) is not needed to browse runs.
    os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    os.execv(sys.executable, ui_command(uri, args.host, args.port))


if __name__ == "__main__":
    main()
