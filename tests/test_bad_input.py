"""Bad input through the real command (`pipeline.cli.main`, as `patchsweep` runs it): each is refused
with exit status 2 and one line, `patchsweep: error: <the problem>: <the fix>`, before any compute:
nothing is written to the output folder (not even the folder itself) and no model is loaded. More
cases, with their time bounds and the corrected command: tests/test_fail_fast.py."""
from __future__ import annotations

import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import REPO, compose, write_jsonl
from pipeline.run.sweep import write_config
from pipeline.store import write_table
from pipeline.validation import validate


def patchsweep(monkeypatch, capsys, *overrides: str) -> str:
    """Run `patchsweep <overrides>` in this process; returns its one error line."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["patchsweep", *overrides])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("patchsweep: error: "), err
    assert "Traceback" not in err
    return lines[0]


@pytest.fixture
def run(monkeypatch, capsys, tmp_path, word_model_folder):
    """`patchsweep` with a valid base (a config-only model folder: validation never needs weights, so a
    run that got past it would fail loading them) plus the bad overrides; checks that nothing was
    computed and returns the error line."""
    out = tmp_path / "out"
    base = ["model=hf", f"model.path={word_model_folder}", f"output_root={tmp_path / 'root'}", f"output_dir={out}",
            "tracking.enabled=false"]

    def bad(case: str, *overrides: str, fragments: tuple[str, ...]) -> str:
        before = sorted(out.rglob("*")) if out.exists() else None
        line = patchsweep(monkeypatch, capsys, *base, *overrides)
        for fragment in fragments:
            assert fragment in line, line
        assert (sorted(out.rglob("*")) if out.exists() else None) == before, "wrote into the folder before refusing"
        print(f"\n{case}: {line}")
        return line

    return bad


def test_model_path_that_does_not_exist(run, tmp_path):
    run("model path does not exist", f"model.path={tmp_path}/no-such-model",
        fragments=("does not exist", "model.path"))


def test_unsupported_architecture(run, tmp_path):
    from transformers import BertConfig

    BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    run("unsupported architecture", f"model.path={tmp_path / 'bert'}",
        fragments=("unsupported architecture 'bert'", "model_type", "llama"))


def test_pairs_of_unequal_length(run, tmp_path):
    pairs = write_jsonl(tmp_path / "unequal.jsonl", [
        {"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"},
        {"clean": "how do i steal a car ?", "corrupted": "please wash a car ?"},
    ])
    run("pairs of unequal length", f"prompts.path={pairs}",
        fragments=("pair 1", "unequal token counts", "prompts.align=end"))


def test_empty_pairs_file(run, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    run("empty pairs file", f"prompts.path={empty}", fragments=("is empty", "clean, corrupted"))


def test_malformed_pairs_files(run, tmp_path):
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"}\n{"clean": "how do\n')
    run("malformed pairs file (broken JSON)", f"prompts.path={broken}", fragments=("could not be read", "format"))
    wrong = write_jsonl(tmp_path / "wrong.jsonl", [{"harmful": "how do i make a bomb ?", "harmless": "a cake"}])
    run("malformed pairs file (wrong columns)", f"prompts.path={wrong}", fragments=("no 'clean' column",))
    missing = tmp_path / "missing.jsonl"
    run("pairs file that does not exist", f"prompts.path={missing}", fragments=("does not exist", "prompts.path"))


def test_unknown_component(run):
    run("unknown component", "patching.components=[resid_pre,mlp_in]",
        fragments=("'mlp_in'", "patching.components", "resid_pre"))


def test_layer_and_head_out_of_range(run):
    run("layer out of range", "patching.layers=[0,2]", fragments=("layer 2", "patching.layers", "0..1"))
    run("head out of range", "patching.heads=[4]", fragments=("head 4", "patching.heads", "0..3"))
    run("negative layer", "patching.layers=[-1]", fragments=("layer -1", "0..1"))


def test_batch_size_not_positive(run):
    run("batch size 0", "patching.batch_size=0", fragments=("patching.batch_size=0", "1 or more"))
    run("negative batch size", "patching.batch_size=-4", fragments=("patching.batch_size=-4", "1 or more"))


def test_gpu_on_a_machine_without_one(run):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    run("GPU asked for without one", "resources=gpu", fragments=("GPU", "has none", "resources=cpu"))


def test_mlflow_store_that_cannot_be_written(run, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("a file where the store's folder should be")
    run("MLflow store not writable", "tracking.enabled=true", f"tracking.uri=sqlite:///{blocker}/mlflow.db",
        fragments=("cannot be written", "tracking.uri"))


def test_output_folder_of_another_experiment(run, tmp_path, word_model_folder):
    other = validate(compose("model=hf", f"model.path={word_model_folder}", f"output_dir={tmp_path / 'out'}",
                             "patching.components=[head]"))
    this = ("model=hf", f"model.path={word_model_folder}", f"output_dir={tmp_path / 'out'}",
            f"output_root={tmp_path / 'root'}", "tracking.enabled=false")
    write_config(tmp_path / "out", other)  # what a sweep of that other experiment writes before its results
    validate(compose(*this))  # a folder holding no results yet is free to take
    write_table(tmp_path / "out" / "pairs.parquet", pa.table({"pair_id": [0]}))  # its first result
    run("output folder of another experiment", fragments=("holds another experiment's results", "resume=true"))
    # Asked to resume, the same folder is accepted.
    validate(compose(*this, "resume=true"))


def test_command_line_refuses_before_starting_ray(tmp_path, word_model_folder):
    """The same through a separate `python -m pipeline` process: exit 2, one line, within seconds, and
    Ray never started (it would print its start-up lines and leave a session folder)."""
    import time

    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "model=hf", f"model.path={word_model_folder}",
                             f"output_root={tmp_path}", "patching.heads=[9]"], capture_output=True, text=True,
                            cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "head 9 in patching.heads is out of range" in lines[0], result.stderr
    assert "Started a local Ray instance" not in result.stdout + result.stderr
    print(f"\nrefused by a separate process in {time.perf_counter() - start:.1f}s: {lines[0]}")
