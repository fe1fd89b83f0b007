"""The whole pipeline on refusal-tiny: a real local Ray instance, real Arrow files, a real SQLite
MLflow store. Checks the output contract, the numbers against the engine's plain reference, the
MLflow run, and that re-running reuses finished shards and recomputes a damaged one."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, TINY_SWEEP, write_jsonl
from pipeline import store
from pipeline.run.sweep import run_sweep

CONTRACT = ["config.yaml", "pairs.arrow", "activations", "effects.arrow", "summary.arrow", "circuit.json",
            "circuit.svg", "circuit.png", "layers.png", "report.md", "manifest.json"]


@pytest.fixture(scope="module")
def run(tiny_sweep):
    return tiny_sweep


@pytest.fixture(scope="module")
def model(run):
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve

    return load_model(resolve(run["cfg"]["model"]["path"]))[0]


def test_output_contract(run):
    run_dir = run["outcome"].run_dir
    for name in CONTRACT:
        assert (run_dir / name).exists(), name
    # The sweep itself (Ray already up) takes ~30 s here; the bound only catches a runaway on a busy CI box.
    assert run["seconds"] < 180, f"refusal_tiny took {run['seconds']:.0f}s"
    manifest = store.Manifest(run_dir, "run")
    for name in CONTRACT:
        if name not in ("activations", "manifest.json"):
            assert manifest.is_valid(name), name
    report = (run_dir / "report.md").read_text()
    assert "## Layers that matter most" in report and "layers.png" in report


def test_pairs_and_provenance(run):
    run_dir, prov = run["outcome"].run_dir, run["outcome"].provenance
    pairs = store.read_table(run_dir / "pairs.arrow")
    assert pairs.num_rows >= 16
    assert all(len(c) == len(k) for c, k in zip(pairs["clean_ids"].to_pylist(), pairs["corrupted_ids"].to_pylist()))
    for name in ("effects.arrow", "summary.arrow"):
        meta = store.provenance(store.read_schema(run_dir / name))
        assert meta["config_hash"] == prov["config_hash"]
        assert meta["weights_hash"] == prov["weights_hash"] and len(prov["weights_hash"]) == 64
        assert meta["pairs_hash"] == prov["pairs_hash"]
        assert meta["model_id"] == run["cfg"]["model"]["path"]


def test_activation_shards_are_memory_mapped_tensors(run, model):
    run_dir = run["outcome"].run_dir
    pairs = store.read_table(run_dir / "pairs.arrow")
    manifest = store.Manifest(run_dir / "activations", "cache")
    assert manifest.complete
    shards = sorted((run_dir / "activations").glob("*.arrow"))
    assert shards and all(manifest.is_valid(p.name) for p in shards)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    seen = 0
    for path in shards:
        table = store.read_table(path)
        resid = store.tensor_numpy(table["resid_pre_clean"])
        assert not resid.flags.owndata  # a view of the mapped file
        seq_len = int(store.provenance(table)["seq_len"])
        assert resid.shape == (table.num_rows, n_layers, seq_len, d_model)
        # resid_pre at layer 0 is the token embedding: the shard holds the right pairs' activations.
        rows = [pairs["pair_id"].to_pylist().index(p) for p in table["pair_id"].to_pylist()]
        ids = torch.tensor([pairs["clean_ids"][r].as_py() for r in rows])
        np.testing.assert_allclose(resid[:, 0], model.model.embed_tokens(ids).detach().numpy(), atol=1e-6)
        seen += table.num_rows
    assert seen == pairs.num_rows


def test_effects_table(run, model):
    from pipeline.engine.hooks import COMPONENTS
    from pipeline.engine.metrics import Answers
    from pipeline.engine.patching import Variants
    from pipeline.engine.reference import reference_sweep

    run_dir, cfg = run["outcome"].run_dir, run["cfg"]
    effects = store.read_table(run_dir / "effects.arrow")
    assert effects.schema.names == ["model", "pair_id", "direction", "component", "layer", "head", "position",
                                    "seq_len", "metric_clean", "metric_corrupted", "metric_patched", "effect"]
    frame = effects.to_pandas()
    key = ["pair_id", "direction", "component", "layer", "head", "position"]
    assert not frame.duplicated(key).any()
    assert set(frame["component"]) == set(cfg["patching"]["components"])
    assert set(frame["direction"]) == {"denoise", "noise"}
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    per_pair = frame.groupby("pair_id").size()
    seq_len = frame.groupby("pair_id")["seq_len"].first()
    # resid_pre at every layer x position, attn_out/mlp_out per layer, heads per layer x head; two directions.
    assert (per_pair == 2 * (n_layers * seq_len + 2 * n_layers + n_layers * n_heads)).all()
    assert frame.loc[frame["component"] != "head", "head"].isna().all()
    assert frame.loc[frame["component"] != "resid_pre", "position"].isna().all()
    assert np.isfinite(frame["effect"]).all()

    # Spot check against the engine's plain reference loop, one pair, a few variants.
    pairs = store.read_table(run_dir / "pairs.arrow")
    pair = pairs.slice(0, 1)
    pair_id = pair["pair_id"][0].as_py()
    rows = frame[(frame["pair_id"] == pair_id) & (frame["direction"] == "denoise")].iloc[::37].head(6)
    variants = Variants(torch.tensor([COMPONENTS.index(c) for c in rows["component"]]),
                        torch.tensor(rows["layer"].to_numpy(dtype=np.int64)),
                        torch.tensor(rows["head"].fillna(-1).to_numpy(dtype=np.int64)),
                        torch.tensor(rows["position"].fillna(-1).to_numpy(dtype=np.int64)))
    answers = Answers(torch.tensor(pair["refusal_ids"].to_pylist()), torch.tensor(pair["compliance_ids"].to_pylist()))
    ref = reference_sweep(model, torch.tensor(pair["clean_ids"].to_pylist()), torch.tensor(pair["corrupted_ids"].to_pylist()),
                          answers, variants, "denoise", cfg["patching"]["metric"])
    np.testing.assert_allclose(rows["metric_patched"].to_numpy(), ref.metric_patched[0].numpy(), atol=1e-4)


def test_summary_has_bootstrap_intervals(run):
    run_dir = run["outcome"].run_dir
    summary = store.read_table(run_dir / "summary.arrow").to_pandas()
    effects = store.read_table(run_dir / "effects.arrow").to_pandas()
    n_pairs = effects["pair_id"].nunique()
    assert (summary["ci_low"] <= summary["mean"] + 1e-9).all() and (summary["mean"] <= summary["ci_high"] + 1e-9).all()
    whole = summary[summary["position"].isna()]
    assert (whole["n"] == n_pairs).all()  # per-layer / per-head sites are measured on every pair
    # A summary mean is the mean over pairs of that site's effects.
    site = whole[(whole["component"] == "mlp_out") & (whole["direction"] == "noise")].iloc[0]
    rows = effects[(effects["component"] == "mlp_out") & (effects["direction"] == "noise") & (effects["layer"] == site["layer"])]
    assert site["mean"] == pytest.approx(rows["effect"].mean(), abs=1e-6)
    # Final-position resid_pre is present for every pair and labelled with its token.
    final = summary[(summary["component"] == "resid_pre") & (summary["position"] == -1)]
    assert len(final) == 2 * run["outcome"].model_info["n_layers"] and (final["n"] == n_pairs).all()
    assert final["token"].notna().all()


def test_mlflow_run(run):
    from mlflow import MlflowClient

    tracking, cfg = run["tracking"], run["cfg"]
    assert tracking["uri"] == f"sqlite:///{run['root']}/mlflow.db"
    client = MlflowClient(tracking["uri"])
    child = client.get_run(tracking["run_id"])
    assert child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == tracking["parent_run_id"]
    params = child.data.params
    assert params["model.path"] == cfg["model"]["path"] and params["name"] == "refusal_tiny"
    assert params["patching.components"] == str(cfg["patching"]["components"])
    n_layers = run["outcome"].model_info["n_layers"]
    history = client.get_metric_history(tracking["run_id"], "denoise/resid_pre")
    assert sorted(m.step for m in history) == list(range(n_layers))
    assert {f"noise/{c}" for c in cfg["patching"]["components"]} <= set(child.data.metrics)
    assert "circuit/faithfulness" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(tracking["run_id"])}
    assert {"config.yaml", "report.md", "layers.png", "summary.arrow", "effects.arrow", "pairs.arrow",
            "circuit.json", "circuit.svg", "circuit.png"} <= artifacts
    tags = child.data.tags
    assert tags["model.weights_sha256"] == run["outcome"].provenance["weights_hash"]
    assert tags["pairs.sha256"] == run["outcome"].provenance["pairs_hash"]
    assert len(tags["git.commit"]) == 40 and "torch=" in tags["versions"]
    [dataset] = child.inputs.dataset_inputs
    assert dataset.dataset.name == "pairs" and dataset.tags[0].value == "pairs"


def test_rerun_reuses_shards_and_recomputes_a_damaged_one(run):
    """Truncate one effect shard, run again: the checksum catches it, that shard alone is recomputed,
    every other shard is reused, and the results are the same."""
    cfg, first = run["cfg"], run["outcome"]
    before = {s.stage: s for s in first.stats}
    effects_before = store.read_table(first.run_dir / "effects.arrow")
    shard = sorted((first.run_dir / "effects").glob("*.arrow"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    again = {s.stage: s for s in run_sweep(cfg).stats}
    assert again["pairs"].reused == 1 and again["pairs"].computed == 0
    assert again["cache"].computed == 0 and again["cache"].reused == before["cache"].computed
    assert again["patch"].computed == 1 and again["patch"].reused == before["patch"].computed - 1
    effects_after = store.read_table(first.run_dir / "effects.arrow")
    assert effects_after.replace_schema_metadata(None).equals(effects_before.replace_schema_metadata(None))


def test_command_line_reuses_the_finished_run(run):
    """`python -m pipeline experiment=refusal_tiny` over the same output root: nothing recomputed, the
    summary printed, a second MLflow run logged."""
    result = subprocess.run([sys.executable, "-m", "pipeline", *TINY_SWEEP, f"output_root={run['root']}"],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "Layers that matter most" in out and "make ui" in out
    assert "patch 0 computed" in out and "cache 0 computed" in out
    assert str(run["outcome"].run_dir) in out


def test_screen_command(tmp_path):
    """`patchsweep screen model=refusal_tiny prompts.path=<file>` writes screen.arrow and prints rates."""
    from pipeline.organisms.refusal_tiny import grammar

    rows = [row for p in grammar.pairs(6, 3, "heldout")
            for row in ({"prompt": p.clean, "harmful": True}, {"prompt": p.corrupted, "harmful": False})]
    prompts = write_jsonl(tmp_path / "screen.jsonl", rows)
    result = subprocess.run([sys.executable, "-m", "pipeline", "screen", *TINY_SWEEP, f"prompts.path={prompts}",
                             f"output_root={tmp_path / 'out'}"], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "harmful  (n=6)" in result.stdout and "harmless (n=6)" in result.stdout
    [path] = list((tmp_path / "out").rglob("screen.arrow"))
    table = store.read_table(path)
    assert table.num_rows == 12
    assert {"prompt", "harmful", "generated", "refused", "metric"} <= set(table.column_names)


def test_work_survives_an_actor_death(ray_session, tmp_path):
    """An actor process that dies mid-item is restarted by Ray and the item resubmitted; with no retries
    left the sweep stops with a clear error."""
    from conftest import compose, exit_once
    from pipeline.config import to_dict
    from pipeline.run.workers import StageStats, WorkerPool, WorkFailed

    cfg = to_dict(compose(*TINY_SWEEP, "resources.max_retries=2"))
    pool = WorkerPool(cfg)
    try:
        first_pid = pool.describe()["pid"]
        stats = StageStats("die")
        [[published]] = pool.map(exit_once, [{"name": "die", "marker": str(tmp_path / "a")}], stats=stats)
        assert stats.retried == 1 and stats.computed == 1
        assert int(Path(published["path"]).read_text()) != first_pid  # a restarted actor finished it
    finally:
        pool.close()

    pool = WorkerPool(to_dict(compose(*TINY_SWEEP, "resources.max_retries=0")))
    try:
        with pytest.raises(WorkFailed, match="failed 1 times"):
            pool.map(exit_once, [{"name": "die", "marker": str(tmp_path / "b")}])
    finally:
        pool.close()


def test_numbers_match_the_stored_digest(run):
    """The refusal_tiny experiment reproduces the stored effects, summary and circuit.json values
    (bench/outputs_digest.py; refresh the digest only for a change meant to move the numbers)."""
    sys.path.insert(0, str(REPO / "bench"))
    from outputs_digest import compare

    assert compare(run["outcome"].run_dir, REPO / "tests" / "data" / "refusal_tiny_digest") == []


def test_patch_items_bucket_short_shards():
    """Pair shards of one token length each go into work items of at most shard_size pairs, in order."""
    from pipeline.run.sweep import bucket_shards

    shards = [{"rows": list(range(n)), "key": str(i)} for i, n in enumerate([5, 6, 3, 16, 2, 1])]
    buckets = bucket_shards(shards, 16)
    assert [[s["key"] for s in b] for b in buckets] == [["0", "1", "2"], ["3"], ["4", "5"]]
    assert [[s["key"] for s in b] for b in bucket_shards(shards, 1)] == [[str(i)] for i in range(6)]
