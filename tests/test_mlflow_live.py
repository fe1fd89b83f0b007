"""MLflow follows a sweep live (pipeline.run.tracking.LiveRun) through a real SQLite store: the run is
created before the compute, gets each stage's metrics as the stage ends and system metrics while it runs,
and ends FINISHED with its tables, description and dataset, or FAILED with its error. Artifacts go where
the store's experiment keeps them, never into the working folder. Telemetry is off unless asked for.
Also: the run folder's run.log and overrides.yaml, and actor warnings on the console."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow import MlflowClient

from conftest import REPO, TINY_SWEEP, free_ports
from pipeline import store
from pipeline.run.tracking import DESCRIPTION_LIMIT, SWEEP_TAG, description, multirun_name

CLEAN_ENV_DROPS = ("PYTEST_CURRENT_TEST", "CI", "MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK")


def clean_env(**extra) -> dict:
    """The environment of a person's shell: no test or CI markers (MLflow keeps quiet under those anyway)."""
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV_DROPS}
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **extra}


@pytest.mark.parametrize("setting, disabled", [(None, True), pytest.param("false", False, marks=pytest.mark.slow)])
def test_telemetry_is_off_unless_turned_back_on(setting, disabled):
    code = ("import pipeline.run.tracking\nfrom mlflow.telemetry.utils import is_telemetry_disabled\n"
            "print(is_telemetry_disabled())")
    env = clean_env(**({"MLFLOW_DISABLE_TELEMETRY": setting} if setting else {}))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(disabled)


def test_live_run(tiny_sweep):
    tracking, outcome = tiny_sweep["tracking"], tiny_sweep["outcome"]
    client = MlflowClient(tracking["uri"])
    run = client.get_run(tracking["run_id"])
    assert run.info.status == "FINISHED"
    # A single sweep is one top-level run, the command's: no empty parent row above it.
    assert "mlflow.parentRunId" not in run.data.tags and run.data.tags[SWEEP_TAG] == "test-session"
    assert "parent_run_id" not in tracking
    # Stage metrics were logged as each stage ended, not all at the end: their times increase.
    stamps = {key: client.get_metric_history(run.info.run_id, key)[0].timestamp
              for key in ("time/load_s", "time/pairs_s", "time/patch_s", "time/circuit_s", "time/render_s")}
    order = list(stamps.values())
    assert order == sorted(order) and len(set(order)) == len(order)
    assert run.info.start_time <= stamps["time/load_s"]
    assert stamps["time/render_s"] < client.get_metric_history(run.info.run_id, "denoise/resid_pre")[0].timestamp
    assert client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    # report.md's headline is the run's description, within MLflow's limit, linking the whole report; the
    # run folder's tables named this run.
    shown = run.data.tags["mlflow.note.content"]
    page = f"#/experiments/{tracking['experiment_id']}/runs/{run.info.run_id}/artifacts/report.md?"
    assert shown.startswith(tiny_sweep["report"].split("\n## ")[0].strip()) and "![" not in shown
    assert f"[report.md]({page}" in shown and len(shown) <= DESCRIPTION_LIMIT
    assert tiny_sweep["tables_run_id"] == outcome.run_id == run.info.run_id
    # The summary and the circuit's nodes as MLflow tables (what the UI shows as tables).
    logged = {a["path"]: a["type"] for a in json.loads(run.data.tags["mlflow.loggedArtifacts"])}
    assert logged == {"tables/summary.json": "table", "tables/circuit_nodes.json": "table"}
    summary = client.load_table(tracking["experiment_id"], "tables/summary.json", run_ids=[run.info.run_id])
    on_disk = store.read_table(outcome.run_dir / "summary.parquet").to_pandas()
    assert len(summary) == len(on_disk) and sorted(summary.columns) == sorted(on_disk.columns)
    # The columns that tell the rows apart first; those of one value (the run id, config hash, model) last.
    constant = [c for c in on_disk.columns if on_disk[c].astype(str).nunique(dropna=False) == 1]
    assert {"run_id", "config_hash", "model"} <= set(constant) and list(summary.columns[-len(constant):]) == constant
    assert list(summary.columns[:2]) == ["direction", "component"]
    np.testing.assert_allclose(summary["mean"], on_disk["mean"], atol=1e-9)  # JSON keeps 10 digits
    nodes = client.load_table(tracking["experiment_id"], "tables/circuit_nodes.json", run_ids=[run.info.run_id])
    assert sorted(nodes["id"]) == sorted(n.id for n in outcome.circuit.nodes)
    # The pairs as a dataset input, and the command line in the run folder and on the run.
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "pairs" and "pairs.parquet" in dataset.dataset.source
    assert [t.value for t in dataset.tags if t.key == "mlflow.data.context"] == ["pairs"]
    overrides = tiny_sweep["overrides"]
    assert yaml.safe_load((outcome.run_dir / "overrides.yaml").read_text()) == overrides
    assert run.data.params["overrides"] == " ".join(overrides)
    # Artifacts beside the default store, under the run's own location.
    assert run.info.artifact_uri == (tiny_sweep["root"] / "mlartifacts" / run.info.run_id / "artifacts").as_uri()


@pytest.mark.slow
def test_failed_sweep_ends_its_run_failed(tmp_path):
    """A sweep that fails after it started (no pair survives the screen with the answer tokens swapped),
    tracked in an SQLite store named on the command line: one error line, the run FAILED with the error,
    run.log (with the traceback) in the run folder and among the run's artifacts, beside that store;
    nothing in the working folder."""
    store_dir, out = tmp_path / "store", tmp_path / "out"
    workdir = tmp_path / "work"
    workdir.mkdir()
    result = subprocess.run([sys.executable, "-m", "pipeline", *TINY_SWEEP, "prompts.generate=false",
                             "prompts.refusal_tokens=[Sure]", "prompts.compliance_tokens=[I]", f"output_root={out}",
                             f"tracking.uri=sqlite:///{store_dir}/mlflow.db"],
                            cwd=workdir, env=clean_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert errors == [line for line in errors if line.startswith("patchsweep: error: no pair survived")] and errors
    assert "Traceback" not in result.stderr
    assert list(workdir.iterdir()) == []  # no ./mlruns
    client = MlflowClient(f"sqlite:///{store_dir}/mlflow.db")
    [experiment] = [e for e in client.search_experiments() if e.name == "patchsweep"]
    [child] = client.search_runs([experiment.experiment_id])  # the command's one run
    assert child.info.run_name == "refusal-tiny" and child.info.status == "FAILED"
    assert child.data.tags["patchsweep.error"].startswith("ValueError: no pair survived")
    assert child.data.tags["mlflow.note.content"].startswith("**FAILED**")
    assert child.info.artifact_uri.startswith((store_dir / "mlartifacts").as_uri())
    assert [a.path for a in client.list_artifacts(child.info.run_id)] == ["run.log"]
    log = (out / "refusal_tiny" / "refusal-tiny-generated" / "run.log").read_text()
    assert "the run failed: ValueError: no pair survived" in log and "Traceback" in log
    assert "pairs: " not in log  # the pairs stage did not finish


@pytest.mark.slow
def test_actor_records_reach_run_log_and_warnings_the_console(tmp_path):
    """Records logged inside a model actor: INFO and WARNING into the run's run.log, the WARNING (not the
    INFO) onto the driver's console through Ray."""
    out = tmp_path / "out"
    code = f"""
import sys
sys.path.insert(0, {str(REPO / 'tests')!r})
from conftest import compose, log_twice
from pipeline.validation import typed
from pipeline.run.workers import WorkerPool, start_ray
cfg = typed(compose("experiment=refusal_tiny", "output_dir={out}", "resources.num_cpus=1"))
(start_ray(cfg), None)
pool = WorkerPool(cfg)
try:
    pool.map(log_twice, [{{"name": "item-1"}}])
finally:
    pool.close()
import time; time.sleep(3)  # Ray forwards worker output asynchronously
"""
    out.mkdir()
    env = clean_env(PYTHONPATH=os.pathsep.join([str(REPO / "tests"), str(REPO)]))
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    console = result.stdout + result.stderr
    assert "a warning from item-1" in console and "an info record from item-1" not in console
    log = (out / "run.log").read_text()
    assert "INFO pipeline.stages.stand_in" in log and "an info record from item-1" in log
    assert "WARNING pipeline.stages.stand_in" in log and "a warning from item-1" in log


@pytest.mark.slow
@pytest.mark.parametrize("setting, expected", [(None, b"true"), ("false", b"false")])
def test_ui_server_runs_without_telemetry_unless_turned_back_on(tiny_sweep, tmp_path, setting, expected):
    """`make ui`'s server process (the MLflow UI, exec'd by pipeline.run.tracking) carries the setting."""
    [port] = free_ports(1)
    env = clean_env(**({"MLFLOW_DISABLE_TELEMETRY": setting} if setting else {}))
    server = subprocess.Popen([sys.executable, "-m", "pipeline.run.tracking", "ui", "--output-root",
                               str(tiny_sweep["root"]), "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while b"mlflow" not in Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")[1:3]:
            assert server.poll() is None and time.time() < deadline, "the UI server did not start"
            time.sleep(0.5)
        environ = Path(f"/proc/{server.pid}/environ").read_bytes().split(b"\0")
        assert b"MLFLOW_DISABLE_TELEMETRY=" + expected in environ
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def test_the_description_is_the_reports_headline_linking_the_report():
    """The opening and the headline sections (without their subsections or images), then the link; a
    section that would pass MLflow's limit is left to the report."""
    report = ("# run\n\nintro\n![circuit](circuit.svg)\n\n## What matters most\n\n| top |\n\n## Files\n\nmany\n"
              "\n## Circuit\n\n12 nodes\n\n### Stability\n\n" + "s" * 9000 + "\n")
    link = "\n\n**The whole report:** [report.md](#/r) (among the run's artifacts)."
    headline = "# run\n\nintro\n\n## What matters most\n\n| top |\n\n## Circuit\n\n12 nodes"
    assert description(report, "#/r") == headline + link
    long = "# run\n\n## What matters most\n\n" + "x" * 5000 + "\n\n## Circuit\n\n" + "y" * 5000
    shown = description(long, "#/r")
    assert len(shown) <= DESCRIPTION_LIMIT and "x" * 5000 in shown and "y" not in shown and shown.endswith(link)


def test_a_multirun_parent_is_named_after_the_multirun():
    assert multirun_name("refusal_tiny", ["refusal-tiny", "refusal-tiny-gpt2"]) == \
        "refusal_tiny --multirun: refusal-tiny, refusal-tiny-gpt2"
    long = multirun_name("x", [f"patching.metric=m{i}" for i in range(40)])
    assert len(long) == 120 and long.endswith("... (40 jobs)")
