"""`patchsweep --multirun`: the jobs run at once on one Ray instance (pipeline.run.multirun), each with the
results it gets alone; the parent MLflow run compares them; a job that fails ends alone; a job whose
config is wrong stops the command before anything runs. Real command, real organisms, real Ray, a real
SQLite MLflow store."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import REPO, TINY_MODELS, TINY_SWEEP, compose, write_jsonl
from pipeline import store
from pipeline.run.tracking import SWEEP_TAG

KEY = ["model", "pair_id", "direction", "component", "layer", "head", "position"]
VALUES = ["metric_clean", "metric_corrupted", "metric_patched", "effect"]
NAMES = {"refusal_tiny": "refusal-tiny", "refusal_tiny_gpt2": "refusal-tiny-gpt2",
         "refusal_tiny_neox": "refusal-tiny-neox"}


def job_folder(root: Path, name: str) -> Path:
    [folder] = (root / "refusal_tiny" / f"{name}-generated").glob("model-*")
    return folder


def runs_of_command(root: Path):
    """The command's parent run and its children, from the store under `root`."""
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "patchsweep"]
    runs = client.search_runs([experiment.experiment_id])
    [parent] = [r for r in runs if SWEEP_TAG in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    return client, parent, children


@pytest.mark.slow
def test_multirun_results_are_those_of_sequential_runs(tiny_multirun, ray_session, tmp_path):
    """Each model of the three-family multirun has, in its own folder, the effects, summary and circuit
    that the same sweep run alone gets."""
    from pipeline.run.sweep import run_sweep
    from pipeline.validation import validate

    for model in TINY_MODELS:
        name = NAMES[model]
        cfg = validate(compose(*TINY_SWEEP, f"model={model}", f"output_root={tmp_path}", "tracking.enabled=false"))
        alone = run_sweep(cfg).run_dir
        together = job_folder(tiny_multirun["root"], name)
        got = store.read_table(together / "effects.parquet").to_pandas().sort_values(KEY, na_position="first")
        want = store.read_table(alone / "effects.parquet").to_pandas().sort_values(KEY, na_position="first")
        assert len(got) == len(want) > 0 and set(got["model"]) == {name}
        assert got[KEY].astype(str).reset_index(drop=True).equals(want[KEY].astype(str).reset_index(drop=True))
        for column in VALUES:
            np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-6, atol=1e-6)
        circuit, circuit_alone = (json.loads((f / "circuit.json").read_text()) for f in (together, alone))
        assert [n["id"] for n in circuit["nodes"]] == [n["id"] for n in circuit_alone["nodes"]]
        assert circuit["faithfulness"] == pytest.approx(circuit_alone["faithfulness"], abs=1e-6)


@pytest.mark.slow
def test_multirun_parent_run_compares_its_children(tiny_multirun):
    root = tiny_multirun["root"]
    assert tiny_multirun["stdout"].count("\nWork: ") == 3  # a summary per model, then the comparison
    assert "Comparison of the 3 finished sweeps" in tiny_multirun["stdout"]
    client, parent, children = runs_of_command(root)
    assert sorted(r.info.run_name for r in children) == sorted(NAMES.values())
    assert {r.info.status for r in children} == {"FINISHED"} and parent.info.status == "FINISHED"
    assert parent.data.params["jobs"] == "3" and parent.data.params["jobs.swept"].startswith("model.")
    assert parent.data.params["patching.metric"] == "logit_diff"  # what the jobs share
    for name in NAMES.values():
        assert 0 < parent.data.metrics[f"{name}/faithfulness"] <= 1.5
        assert parent.data.metrics[f"{name}/circuit_nodes"] >= 1
        assert 0 <= parent.data.metrics[f"{name}/direction_best_depth"] <= 1
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"comparison.png", "comparison.md", "tables"} <= artifacts
    table = json.loads(Path(client.download_artifacts(parent.info.run_id, "tables/comparison.json",
                                                      str(root / "download"))).read_text())
    assert [row[table["columns"].index("model")] for row in table["data"]] == list(NAMES.values())
    assert "| refusal-tiny-gpt2 |" in parent.data.tags["mlflow.note.content"]
    [folder] = (root / "refusal_tiny").glob("comparison-*")
    assert (folder / "comparison.png").stat().st_size > 20_000


@pytest.mark.slow
def test_multirun_over_a_non_model_key_completes_every_job(tmp_path):
    command = [sys.executable, "-m", "pipeline", "--multirun", "experiment=refusal_tiny", "patching=resid",
               "circuit.enabled=false", "patching.metric=logit_diff,kl", f"output_root={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    folders = sorted(p.parent.name.rsplit("-", 1)[0] for p in (tmp_path / "refusal_tiny").rglob("_manifest.json")
                     if p.parent.parent.name.endswith("-generated"))
    assert folders == ["patching.metric-kl", "patching.metric-logit_diff"]
    _, parent, children = runs_of_command(tmp_path)
    assert len(children) == 2 and {r.info.status for r in children} == {"FINISHED"}
    assert parent.data.params["jobs.labels"] == "patching.metric=logit_diff | patching.metric=kl"
    assert "patching.metric_kl/resid_pre_peak_depth" in parent.data.metrics  # "=" is no metric-name character


@pytest.mark.slow
def test_a_failing_job_ends_alone_and_is_reported(tmp_path):
    """Two jobs, the second model's weights damaged (its config.json is fine, so validation passes): the
    first finishes with its summary, the second is reported in one line at the end, exit status 1; in
    MLflow its child run is FAILED, the other FINISHED, the parent FAILED."""
    from pipeline.organisms import resolve
    from pipeline.organisms.refusal_tiny import grammar

    broken = tmp_path / "broken-tiny"
    shutil.copytree(resolve("refusal-tiny"), broken)
    for weights in broken.glob("*.safetensors"):
        weights.write_bytes(b"not a safetensors file")
    # Models by path get the instruction library's prompts: these two get refusal-tiny's grammar from a file.
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"clean": p.clean, "corrupted": p.corrupted}
                                                   for p in grammar.pairs(16, 0, "heldout")])
    command = [sys.executable, "-m", "pipeline", "--multirun", "experiment=refusal_tiny", "model=hf",
               f"model.path={resolve('refusal-tiny')},{broken}", f"prompts.path={pairs}", "prompts.generate=false",
               "prompts.refusal_tokens=[I]", "prompts.compliance_tokens=[Sure]", "circuit.enabled=false",
               "patching=resid", f"output_root={tmp_path / 'out'}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 1, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("patchsweep: error:")]
    assert len(errors) == 2, result.stderr[-3000:]
    assert "broken-tiny failed: the model could not be loaded" in errors[0]
    assert errors[1] == "patchsweep: error: 1 of 2 jobs failed, the others finished"
    assert result.stdout.count("\nWork: ") == 1
    _, parent, children = runs_of_command(tmp_path / "out")
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"] and parent.info.status == "FAILED"


def test_a_job_with_a_wrong_config_stops_the_multirun_before_anything_runs(tmp_path):
    command = [sys.executable, "-m", "pipeline", "--multirun", "experiment=refusal_tiny", "patching.layers=[0],[9]",
               "tracking.enabled=false", f"output_root={tmp_path}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("patchsweep: error:")]
    assert len(errors) == 2 and "patching.layers=[9]" in errors[0] and "layer 9" in errors[0], errors
    assert errors[1].endswith("1 of 2 jobs refused, nothing was run: fix the overrides named above and run the "
                              "command again")
    assert not list(tmp_path.rglob("config.yaml"))


@pytest.mark.slow
def test_ctrl_c_stops_every_job_and_the_same_command_resumes(tmp_path):
    """Ctrl-C (SIGINT to the command's process group, as a terminal sends it) while two sweeps run at once,
    each with its circuit step beside its patch stage: the command stops every job, says so in a line per
    job, exits with 130; the same command then finishes both, reusing the items they had finished."""
    command = [sys.executable, "-m", "pipeline", "--multirun", *TINY_SWEEP, "model=refusal_tiny,refusal_tiny_gpt2",
               "resources.actors=2", "resources.shard_size=1", "patching.per_position=[resid_pre,head]",
               "tracking.enabled=false", f"output_root={tmp_path}"]
    with open(tmp_path / "interrupted.log", "w+") as log:
        run = subprocess.Popen(command, stdout=log, stderr=log, cwd=REPO, start_new_session=True)
        deadline = time.time() + 300
        while len(list(tmp_path.glob("refusal_tiny/*/*/effects/*.arrow"))) < 4:
            assert run.poll() is None and time.time() < deadline, "the command ended before it could be stopped"
            time.sleep(0.1)
        os.killpg(run.pid, signal.SIGINT)
        signalled = time.perf_counter()
        status = run.wait(timeout=120)
        seconds = time.perf_counter() - signalled
        log.seek(0)
        stopped = log.read()
    assert status == 130, stopped[-3000:]
    assert seconds < 60 and "run the same command to resume" in stopped, stopped[-3000:]
    lines = stopped.splitlines()
    for name in ("refusal-tiny", "refusal-tiny-gpt2"):  # each job by its label, with what it finished
        assert any(line.startswith(f"patchsweep: {name}: interrupted: ") for line in lines), stopped[-3000:]
    resumed = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    works = [line.split("Work: ")[1] for line in resumed.stdout.splitlines() if line.startswith("Work: ")]
    assert len(works) == 2
    reused = sum(int(part.split(" reused")[0].split("/")[1]) for work in works for part in work.split(", "))
    assert reused >= 4, resumed.stdout
    print(f"\nCtrl-C stopped both jobs in {seconds:.1f} s; the same command reused {reused} finished items")
