"""`patchsweep compare` through the real command on refusal-tiny runs: two runs differing only in their
prompt sample are within noise, refusal-tiny against its GPT-2 sibling drifts, and folders that are not
finished runs are refused in one line. The reference runs are the session's --multirun (tiny_multirun) and,
for the refusals, its sweep (tiny_sweep)."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.run.compare import FAIL_ON_DRIFT_STATUS

REPO = Path(__file__).resolve().parents[1]


def patchsweep(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=timeout)


def multirun_folder(root: Path, model: str) -> Path:
    [folder] = (root / "refusal_tiny" / f"{model}-generated").glob("model[-=]*")  # the job's folder: key and value
    return folder


@pytest.fixture(scope="module")
def other_seed(tmp_path_factory) -> Path:
    """refusal-tiny as the session's --multirun ran it, with another prompt sample (prompts.seed=1)."""
    root = tmp_path_factory.mktemp("seed1")
    folder = root / "seed1"
    result = patchsweep("experiment=refusal_tiny", "prompts.seed=1", f"output_root={root}", f"output_dir={folder}")
    assert result.returncode == 0, result.stderr[-4000:]
    return folder


@pytest.mark.slow
def test_another_prompt_sample_is_within_noise(tiny_multirun, other_seed):
    reference = multirun_folder(tiny_multirun["root"], "refusal-tiny")
    result = patchsweep("compare", other_seed, reference, "compare.n_draws=100")
    assert result.returncode == 0, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: within noise (") and "node_jaccard" in last and "cross_faithfulness/a_on_b" in last
    # The compare folder sits under the reference's output root, named by the runs.
    folder = other_seed.parent / "compare" / f"seed1-vs-{reference.name}"
    assert {p.name for p in folder.iterdir()} >= {"compare.json", "compare.md", "compare.png"}
    compared = json.loads((folder / "compare.json").read_text())
    [pair] = compared["comparisons"]
    measures = {m["name"]: m for m in pair["measures"]}
    assert {"node_jaccard", "size_difference", "effect_rank/head", "cross_faithfulness/a_on_b",
            "cross_faithfulness/b_on_a", "refusal_rate/plain", "refusal_rate/circuit_knocked_out"} <= set(measures)
    assert not any(m["outside"] for m in measures.values())
    assert all(m["band"]["low"] <= m["band"]["high"] for m in measures.values())
    # Each circuit evaluated on the other model and pairs is computed: the same model, so close to its own.
    own = json.loads((other_seed / "circuit.json").read_text())["faithfulness"]
    assert abs(measures["cross_faithfulness/b_on_a"]["value"] - own) < 0.2
    markdown = (folder / "compare.md").read_text()
    assert markdown.rstrip().splitlines()[-1] == compared["verdict"] == last
    # The MLflow run in the reference's store links the compared runs and has the measures as metrics.
    client = MlflowClient(f"sqlite:///{other_seed.parent / 'mlflow.db'}")
    [run] = client.search_runs([client.get_experiment_by_name("patchsweep").experiment_id],
                               filter_string="tags.`patchsweep.compare.reference` != ''")
    assert run.data.tags["patchsweep.compare.reference"] == str(other_seed.resolve())
    assert run.data.tags["patchsweep.compare.runs"] == str(reference.resolve())
    assert run.data.metrics["compare/drift"] == 0.0
    assert run.data.metrics["compare/node_jaccard"] == measures["node_jaccard"]["value"]


@pytest.mark.slow
def test_the_gpt2_sibling_drifts(tiny_multirun, tmp_path):
    root = tiny_multirun["root"]
    reference, sibling = multirun_folder(root, "refusal-tiny"), multirun_folder(root, "refusal-tiny-gpt2")
    result = patchsweep("compare", reference, sibling, "compare.fail_on_drift=true", "compare.n_draws=100",
                        f"compare.output_dir={tmp_path / 'out'}", f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}")
    assert result.returncode == FAIL_ON_DRIFT_STATUS, result.stderr[-4000:]
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("verdict: drift (")
    compared = json.loads((tmp_path / "out" / "compare.json").read_text())
    outside = {m["name"] for m in compared["comparisons"][0]["measures"] if m["outside"]}
    assert outside and set(last[len("verdict: drift ("):].split(" outside")[0].split(", ")) == outside


def test_unfinished_or_damaged_folders_are_refused_in_one_line(tiny_sweep, tmp_path):
    reference = tiny_sweep["outcome"].run_dir
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text("name: refusal_tiny\n")
    damaged = tmp_path / "damaged"
    shutil.copytree(reference, damaged, ignore=shutil.ignore_patterns("activations", "effects", "pairs"))
    (damaged / "circuit.json").write_text((damaged / "circuit.json").read_text().replace('"size"', '"size" ', 1))
    # Another experiment's run: its config names another (its manifest re-signed, so only the name differs).
    foreign = tmp_path / "foreign"
    shutil.copytree(damaged, foreign)
    shutil.copy(reference / "circuit.json", foreign / "circuit.json")
    config = foreign / "config.yaml"
    config.write_text(config.read_text().replace("name: refusal_tiny\n", "name: refusal_smol\n", 1))
    manifest = json.loads((foreign / "_manifest.json").read_text())
    manifest["files"]["config.yaml"]["sha256"] = hashlib.sha256(config.read_bytes()).hexdigest()
    (foreign / "_manifest.json").write_text(json.dumps(manifest))
    for folder, words in ((unfinished, "holds no finished run"), (damaged, "circuit.json no longer match"),
                          (tmp_path / "missing", "is not a folder"), (foreign, "compare runs of one experiment")):
        result = patchsweep("compare", reference, folder, "tracking.enabled=false")
        assert result.returncode == 2, result.stderr[-2000:]
        [line] = result.stderr.strip().splitlines()
        assert words in line and str(folder) in line
    result = patchsweep("compare", reference, reference, "compare.level=2x")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    # A scheduled sweep's first night: nothing before it to compare with.
    nightly = tmp_path / "nightly"
    shutil.copytree(damaged, nightly / "2026-12-07", ignore=shutil.ignore_patterns("circuit.json"))
    result = patchsweep("compare", "--newest", nightly)
    assert result.returncode == 0 and result.stdout.startswith("nothing to compare")
