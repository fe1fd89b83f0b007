"""Content keys cover every input that changes a result, through the real command: relabelled pairs give
sites.json's breakdown by the new labels (the effect shards are reused: the token ids did not change), and
an edited chat template gives new pairs rather than the old token ids, and an edited transfer pair file gives
new transfer pairs and a new circuit.json (the study's pairs and effect shards reused)."""
import json
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, write_jsonl
from pipeline.analysis.pairs import grammar_pairs
from pipeline.organisms import resolve

pytestmark = pytest.mark.slow  # four refusal-tiny sweeps through the real command


def _sweep(*overrides: str, circuit: bool = False) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "pipeline", "experiment=refusal_tiny", f"circuit.enabled={str(circuit).lower()}",
               "tracking.enabled=false", *overrides]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _categories(run_dir) -> set[str]:
    sites = json.loads((run_dir / "sites.json").read_text())["sites"]
    return {category for site in sites for category in site["per_category"]}


def _grammar_pairs() -> list[dict]:
    return [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category} for p in grammar_pairs(16, seed=3)]


def test_relabelled_pairs_give_the_new_breakdown(tmp_path):
    pairs, prompts, run_dir = _grammar_pairs(), tmp_path / "pairs.jsonl", tmp_path / "run"
    write_jsonl(prompts, pairs)
    _sweep(f"prompts.path={prompts}", f"output_dir={run_dir}")
    before, shards = _categories(run_dir), sorted(p.name for p in (run_dir / "effects").glob("*.arrow"))
    write_jsonl(prompts, [dict(p, category=f"relabelled-{p['category']}") for p in pairs])
    _sweep(f"prompts.path={prompts}", f"output_dir={run_dir}")
    assert _categories(run_dir) == {f"relabelled-{c}" for c in before}
    assert sorted(p.name for p in (run_dir / "effects").glob("*.arrow")) == shards  # same token ids: reused


def test_an_edited_chat_template_gives_new_pairs(tmp_path):
    model, run_dir, prompts = tmp_path / "model", tmp_path / "run", tmp_path / "pairs.jsonl"
    shutil.copytree(resolve("refusal-tiny"), model)
    write_jsonl(prompts, _grammar_pairs())  # a model folder by path gets no grammar pairs of its own
    overrides = (f"model.path={model}", "model.name=tiny-copy", f"prompts.path={prompts}", f"output_dir={run_dir}")
    _sweep(*overrides)
    first = json.loads((run_dir / "_manifest.json").read_text())["files"]["pairs.parquet"]["key"]
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{# edited #}" + config["chat_template"]
    config_path.write_text(json.dumps(config))
    _sweep(*overrides)
    assert json.loads((run_dir / "_manifest.json").read_text())["files"]["pairs.parquet"]["key"] != first


def test_an_edited_transfer_file_gives_new_transfer_pairs_and_a_new_circuit(tmp_path):
    transfer, run_dir = tmp_path / "transfer.jsonl", tmp_path / "run"
    rows = [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category}
            for p in grammar_pairs(20, seed=4, split="train")]
    write_jsonl(transfer, rows)
    overrides = (f"prompts.transfer={transfer}", f"output_dir={run_dir}", "circuit.n_resamples=2",
                 "circuit.n_random=2")
    _sweep(*overrides, circuit=True)
    keys = lambda: {n: e.get("key") for n, e in json.loads((run_dir / "_manifest.json").read_text())["files"].items()}  # noqa: E731
    first, shards = keys(), sorted(p.name for p in (run_dir / "effects").glob("*.arrow"))
    assert json.loads((run_dir / "circuit.json").read_text())["transfer"]["source"] == "file transfer.jsonl"
    write_jsonl(transfer, rows[:16])
    _sweep(*overrides, circuit=True)
    second = keys()
    assert second["transfer_pairs.parquet"] != first["transfer_pairs.parquet"]
    assert second["circuit.json"] != first["circuit.json"]
    assert json.loads((run_dir / "circuit.json").read_text())["transfer"]["n_pairs"] <= 16
    assert sorted(p.name for p in (run_dir / "effects").glob("*.arrow")) == shards  # the study's: reused
