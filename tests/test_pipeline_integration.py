"""The whole pipeline on refusal-tiny: a real local Ray instance, real Parquet and Arrow files, a real
SQLite MLflow store. Checks the output contract, the numbers against the engine's plain reference, the
MLflow run, and that re-running reuses finished shards and recomputes a damaged one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pytest
import torch

from conftest import REPO, TINY_SWEEP, compose, write_jsonl
from pipeline import store
from pipeline.outputs.report import console_summary
from pipeline.run.sweep import run_sweep

CONTRACT = ["config.yaml", "overrides.yaml", "pairs.parquet", "activations", "effects.parquet", "summary.parquet",
            "sites.json", "circuit.json", "circuit.svg", "circuit.png", "layers.png", "report.md", "run.log",
            "_manifest.json"]


@pytest.fixture(scope="module")
def run(tiny_sweep):
    return tiny_sweep


@pytest.fixture(scope="module")
def model(run):
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve

    return load_model(resolve(run["cfg"].model.path))[0]


def test_output_contract(run):
    run_dir = run["outcome"].run_dir
    for name in CONTRACT:
        assert (run_dir / name).exists(), name
    manifest = store.Manifest(run_dir, "run")
    for name in CONTRACT:
        if name not in ("activations", "run.log", "_manifest.json"):
            assert manifest.is_valid(name), name
    report = (run_dir / "report.md").read_text()
    assert "## What matters most" in report and "layers.png" in report


def test_pairs_and_provenance(run):
    run_dir, prov = run["outcome"].run_dir, run["outcome"].provenance
    pairs = store.read_table(run_dir / "pairs.parquet")
    assert pairs.num_rows >= 16
    assert all(len(c) == len(k) for c, k in zip(pairs["clean_ids"].to_pylist(), pairs["corrupted_ids"].to_pylist()))
    for name in ("pairs.parquet", "effects.parquet", "summary.parquet"):
        # Which run and config a row came from, as columns (dataset readers drop schema metadata).
        table = store.read_table(run_dir / name)
        assert table.column_names[:3] == ["run_id", "config_hash", "model"]
        assert set(table["run_id"].to_pylist()) == {run["outcome"].run_id}
        assert set(table["config_hash"].to_pylist()) == {prov["config_hash"]}
        assert set(table["model"].to_pylist()) == {run["cfg"].model.name}
    for name in ("effects.parquet", "summary.parquet"):
        meta = store.provenance(store.read_schema(run_dir / name))
        assert meta["config_hash"] == prov["config_hash"]
        assert meta["weights_hash"] == prov["weights_hash"] and len(prov["weights_hash"]) == 64
        assert meta["pairs_hash"] == prov["pairs_hash"]
        assert meta["model_id"] == run["cfg"].model.path


def test_sites_hold_the_strongest_sites_flips_and_categories(run):
    """sites.json: per direction the summary.top_k strongest sites, each with the fraction of pairs whose
    behaviour its patch flips (recounted here from effects.parquet) and its mean effect per category."""
    run_dir = run["outcome"].run_dir
    sites = json.loads((run_dir / "sites.json").read_text())["sites"]
    effects = store.read_table(run_dir / "effects.parquet").to_pandas()
    directions = run["cfg"].patching.directions
    assert sorted({s["direction"] for s in sites}) == sorted(directions)
    assert len(sites) == len(directions) * run["cfg"].summary.top_k
    categories = set(store.read_table(run_dir / "pairs.parquet")["category"].to_pylist())
    for site in sites:
        rows = effects
        for column, value in [("direction", site["direction"]), ("component", site["component"]),
                              ("layer", site["layer"]), ("head", site["head"]),
                              ("position_from_end", site["position"]), ("position_class", site["position_class"])]:
            rows = rows[rows[column].isna() if value is None else rows[column] == value]
        assert len(rows) > 0 and site["mean"] == pytest.approx(rows["effect"].mean(), abs=1e-6)
        base = rows["metric_corrupted"] if site["direction"] == "denoise" else rows["metric_clean"]
        flips = ((rows["metric_patched"] > 0) != (base > 0)).mean()
        assert site["flip_fraction"] == pytest.approx(flips, abs=1e-12)
        assert set(site["per_category"]) <= categories
        assert sum(c["n"] for c in site["per_category"].values()) == len(rows)


@pytest.mark.slow
def test_circuit_beside_the_sweep_is_the_circuit_after_it(run, ray_session, tmp_path):
    """The session's sweep has two actors: its circuit step ran on one of them beside cache, patch and
    summary. With one actor it runs after them, with the same result."""
    from pipeline.validation import validate

    beside = run["outcome"].run_dir
    assert "circuit: on an actor of its own" in (beside / "run.log").read_text()
    cfg = validate(compose(*TINY_SWEEP, "resources.actors=1", f"output_root={tmp_path}", "tracking.enabled=false"))
    after = run_sweep(cfg).run_dir
    assert "circuit: on an actor of its own" not in (after / "run.log").read_text()
    got, want = (json.loads((folder / "circuit.json").read_text()) for folder in (beside, after))
    assert [n["id"] for n in got["nodes"]] == [n["id"] for n in want["nodes"]] and len(got["nodes"]) > 0
    for key in ("faithfulness", "faithfulness_ci", "random_control", "stability"):
        assert got[key] == want[key], key


def test_activation_shards_are_memory_mapped_tensors(run, model):
    """One row per (pair, prompt, layer, position) with the residual as a [d_model] tensor: the shards of
    every token length concatenate into one dataset, and one shard's rows view as [pairs, layers,
    seq_len, d_model] without a copy."""
    import pyarrow.dataset as ds

    from pipeline.stages.cache import residuals

    run_dir = run["outcome"].run_dir
    pairs = store.read_table(run_dir / "pairs.parquet")
    manifest = store.Manifest(run_dir / "activations", "cache")
    assert manifest.complete
    shards = sorted((run_dir / "activations").glob("*.arrow"))
    assert shards and all(manifest.is_valid(p.name) for p in shards)
    n_layers, d_model = model.config.num_hidden_layers, model.config.hidden_size
    lengths = dict(zip(pairs["pair_id"].to_pylist(), pairs["seq_len"].to_pylist()))
    # The whole folder as one dataset (the manifest, `_manifest.json`, is skipped): every pair, every length.
    whole = ds.dataset(run_dir / "activations", format="ipc").to_table()
    assert len(set(lengths.values())) > 1
    assert whole.num_rows == sum(2 * (n_layers * t + 1) for t in lengths.values())
    final = whole.filter(pc.field("layer") == n_layers).to_pandas()
    assert (final["position_from_end"] == -1).all() and len(final) == 2 * pairs.num_rows
    seen = 0
    for path in shards:
        table = store.read_table(path)
        resid, final_resid = residuals(table, "clean")
        assert not resid.flags.owndata and not final_resid.flags.owndata  # views of the mapped file
        pair_ids = list(dict.fromkeys(table["pair_id"].to_pylist()))
        seq_len = lengths[pair_ids[0]]
        assert resid.shape == (len(pair_ids), n_layers, seq_len, d_model)
        assert final_resid.shape == (len(pair_ids), d_model)
        # resid at layer 0 is the token embedding: the shard holds the right pairs' activations, in row order.
        rows = [pairs["pair_id"].to_pylist().index(p) for p in pair_ids]
        for prompt, values in (("clean", resid), ("corrupted", residuals(table, "corrupted")[0])):
            ids = torch.tensor([pairs[f"{prompt}_ids"][r].as_py() for r in rows])
            np.testing.assert_allclose(values[:, 0], model.model.embed_tokens(ids).detach().numpy(), atol=1e-6)
        # The last layer's input, and its output at the final position: what the final norm and the
        # unembedding read (hidden_states ends with the normed output).
        ids = torch.tensor([pairs["clean_ids"][r].as_py() for r in rows])
        with torch.no_grad():
            hidden = model(ids, output_hidden_states=True).hidden_states
            normed = model.model.norm(torch.from_numpy(np.array(final_resid)))
        np.testing.assert_allclose(resid[:, -1], hidden[n_layers - 1].numpy(), atol=1e-5)
        np.testing.assert_allclose(normed.numpy(), hidden[n_layers][:, -1].numpy(), atol=1e-5)
        seen += len(pair_ids)
    assert seen == pairs.num_rows


def test_effects_table(run, model):
    from pipeline.analysis.positions import HEADLINE_CLASSES, headline_groups
    from pipeline.engine.hooks import COMPONENTS
    from pipeline.engine.metrics import Answers
    from pipeline.engine.patching import Variants, group_position
    from pipeline.engine.reference import reference_sweep

    run_dir, cfg = run["outcome"].run_dir, run["cfg"]
    effects = store.read_table(run_dir / "effects.parquet")
    assert effects.schema.names == ["run_id", "config_hash", "model", "pair_id", "direction", "component", "layer",
                                    "head", "position", "position_from_end", "position_class", "seq_len",
                                    "metric_clean", "metric_corrupted", "metric_patched", "effect"]
    frame = effects.to_pandas()
    assert str(frame["head"].dtype) == "Int32" and str(frame["position"].dtype) == "Int32"
    assert (frame["position_from_end"] == frame["position"] - frame["seq_len"]).dropna().all()
    assert frame["position_from_end"].isna().equals(frame["position"].isna())
    key = ["pair_id", "direction", "component", "layer", "head", "position", "position_class"]
    assert not frame.duplicated(key).any()
    assert set(frame["component"]) == set(cfg.patching.components)
    assert set(frame["direction"]) == {"denoise", "noise"}
    n_layers, n_heads = model.config.num_hidden_layers, model.config.num_attention_heads
    per_pair = frame.groupby("pair_id").size()
    seq_len = frame.groupby("pair_id")["seq_len"].first()
    # resid_pre at every layer x position, attn_out/mlp_out per layer, heads per layer x head, and the three
    # per_class components at each layer x position class; two directions.
    n_classes = len(cfg.patching.per_class) * len(HEADLINE_CLASSES)
    assert (per_pair == 2 * (n_layers * seq_len + 2 * n_layers + n_layers * n_heads + n_layers * n_classes)).all()
    assert frame.loc[frame["component"] != "head", "head"].isna().all()
    assert frame.loc[frame["component"] != "resid_pre", "position"].isna().all()
    assert frame.loc[frame["position_class"].notna(), "position"].isna().all()
    assert np.isfinite(frame["effect"]).all()

    # Spot check against the engine's plain reference loop, one pair, a few variants.
    pairs = store.read_table(run_dir / "pairs.parquet")
    pair = pairs.slice(0, 1)
    pair_id = pair["pair_id"][0].as_py()
    ours = frame[(frame["pair_id"] == pair_id) & (frame["direction"] == "denoise")]
    rows = pd.concat([ours[ours["position_class"].isna()].iloc[::37].head(6), ours[ours["position_class"].notna()]])
    grouped = rows["position_class"].map({name: group_position(k) for k, name in enumerate(HEADLINE_CLASSES)})
    variants = Variants(torch.tensor([COMPONENTS.index(c) for c in rows["component"]]),
                        torch.tensor(rows["layer"].to_numpy(dtype=np.int64)),
                        torch.tensor(rows["head"].fillna(-1).to_numpy(dtype=np.int64)),
                        torch.tensor(grouped.fillna(rows["position"]).fillna(-1).to_numpy(dtype=np.int64)))
    answers = Answers(torch.tensor(pair["refusal_ids"].to_pylist()), torch.tensor(pair["compliance_ids"].to_pylist()))
    ref = reference_sweep(model, torch.tensor(pair["clean_ids"].to_pylist()),
                          torch.tensor(pair["corrupted_ids"].to_pylist()),
                          answers, variants, "denoise", cfg.patching.metric, position_groups=headline_groups(pair))
    np.testing.assert_allclose(rows["metric_patched"].to_numpy(), ref.metric_patched[0].numpy(), atol=1e-4)


def test_summary_has_bootstrap_intervals(run):
    run_dir = run["outcome"].run_dir
    summary = store.read_table(run_dir / "summary.parquet").to_pandas()
    effects = store.read_table(run_dir / "effects.parquet").to_pandas()
    n_pairs = effects["pair_id"].nunique()
    from pipeline.analysis.statistics import MIN_PAIRS_FOR_INTERVAL

    enough = summary["n"] >= MIN_PAIRS_FOR_INTERVAL
    with_interval = summary[enough]
    assert (with_interval["ci_low"] <= with_interval["mean"] + 1e-9).all()
    assert (with_interval["mean"] <= with_interval["ci_high"] + 1e-9).all()
    assert summary.loc[~enough, ["ci_low", "ci_high"]].isna().all().all()  # positions few pairs reach
    # Pairs of several lengths: a position from the end has no one position from the start.
    assert effects["seq_len"].nunique() > 1 and summary["position"].isna().all()
    whole = summary[summary["position_from_end"].isna()]
    assert (whole["n"] == n_pairs).all()  # per-layer / per-head sites are measured on every pair
    # A summary mean is the mean over pairs of that site's effects.
    site = whole[(whole["component"] == "mlp_out") & (whole["direction"] == "noise")
                 & whole["position_class"].isna()].iloc[0]
    rows = effects[(effects["component"] == "mlp_out") & (effects["direction"] == "noise")
                   & (effects["layer"] == site["layer"]) & effects["position_class"].isna()]
    assert site["mean"] == pytest.approx(rows["effect"].mean(), abs=1e-6)
    # Final-position resid_pre is present for every pair and labelled with its token.
    final = summary[(summary["component"] == "resid_pre") & (summary["position_from_end"] == -1)]
    assert len(final) == 2 * run["outcome"].model_info["n_layers"] and (final["n"] == n_pairs).all()
    assert final["token"].notna().all()


def test_mlflow_run(run):
    from mlflow import MlflowClient

    tracking, cfg = run["tracking"], run["cfg"]
    assert tracking["uri"] == f"sqlite:///{run['root']}/mlflow.db"
    client = MlflowClient(tracking["uri"])
    child = client.get_run(tracking["run_id"])
    assert child.info.status == "FINISHED"
    assert "mlflow.parentRunId" not in child.data.tags  # a single sweep is one top-level run
    params = child.data.params
    assert params["model.path"] == cfg.model.path and params["name"] == "refusal_tiny"
    assert params["patching.components"] == str(cfg.patching.components)
    n_layers = run["outcome"].model_info["n_layers"]
    history = client.get_metric_history(tracking["run_id"], "denoise/resid_pre")
    assert sorted(m.step for m in history) == list(range(n_layers))
    assert {f"noise/{c}" for c in cfg.patching.components} <= set(child.data.metrics)
    assert "circuit/faithfulness" in child.data.metrics
    artifacts = {a.path for a in client.list_artifacts(tracking["run_id"])}
    assert {"config.yaml", "overrides.yaml", "report.md", "layers.png", "summary.parquet", "effects.parquet",
            "pairs.parquet", "circuit.json", "circuit.svg", "circuit.png", "run.log", "_manifest.json"} <= artifacts
    tags = child.data.tags
    assert tags["model.weights_sha256"] == run["outcome"].provenance["weights_hash"]
    assert tags["pairs.sha256"] == run["outcome"].provenance["pairs_hash"]
    assert len(tags["git.commit"]) == 40 and "torch=" in tags["versions"]
    [dataset] = child.inputs.dataset_inputs
    assert dataset.dataset.name == "pairs" and dataset.tags[0].value == "pairs"


@pytest.mark.slow
def test_rerun_reuses_shards_and_recomputes_a_damaged_one(run):
    """Truncate one effect shard, run again: the checksum catches it, that shard alone is recomputed,
    every other shard is reused, and the results are the same, now named after the new run."""
    cfg, first = run["cfg"], run["outcome"]
    before = {s.stage: s for s in first.stats}
    effects_before = store.read_table(first.run_dir / "effects.parquet")
    shard = sorted((first.run_dir / "effects").glob("*.arrow"))[0]
    os.truncate(shard, shard.stat().st_size // 2)
    outcome = run_sweep(cfg)
    again = {s.stage: s for s in outcome.stats}
    assert again["pairs"].reused == 1 and again["pairs"].computed == 0
    assert again["cache"].computed == 0 and again["cache"].reused == before["cache"].computed
    assert again["patch"].computed == 1 and again["patch"].reused == before["patch"].computed - 1
    effects_after = store.read_table(first.run_dir / "effects.parquet")
    assert set(effects_after["run_id"].to_pylist()) == {outcome.run_id} != {first.run_id}
    for name in ("pairs.parquet", "summary.parquet"):  # reused, renamed: their manifest entries still hold
        assert set(store.read_table(first.run_dir / name)["run_id"].to_pylist()) == {outcome.run_id}
        assert store.Manifest(first.run_dir, "run").is_valid(name)
    assert effects_after.drop_columns("run_id").replace_schema_metadata(None).equals(
        effects_before.drop_columns("run_id").replace_schema_metadata(None))


@pytest.mark.slow
def test_command_line_reuses_the_finished_run(run):
    """`python -m pipeline experiment=refusal_tiny` over the same output root: nothing recomputed, the
    summary printed, a second MLflow run logged."""
    result = subprocess.run([sys.executable, "-m", "pipeline", *run["overrides"]],
                            capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "What matters most" in out and "make ui" in out
    assert "patch 0 computed" in out and "cache 0 computed" in out
    assert str(run["outcome"].run_dir) in out


@pytest.mark.slow
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


@pytest.mark.slow
def test_work_survives_an_actor_death(ray_session, tmp_path):
    """An actor process that dies mid-item is restarted by Ray and the item resubmitted; with no retries
    left the sweep stops with a clear error."""
    from conftest import compose, exit_once
    from pipeline.run.workers import StageStats, WorkerPool, WorkFailed
    from pipeline.validation import typed

    cfg = typed(compose(*TINY_SWEEP, "resources.max_retries=2"))
    pool = WorkerPool(cfg)
    try:
        first_pid = pool.describe()["pid"]
        stats = StageStats("die")
        [[published]] = pool.map(exit_once, [{"name": "die", "marker": str(tmp_path / "a")}], stats=stats)
        assert stats.retried == 1 and stats.computed == 1
        assert int(Path(published["path"]).read_text()) != first_pid  # a restarted actor finished it
    finally:
        pool.close()

    pool = WorkerPool(typed(compose(*TINY_SWEEP, "resources.max_retries=0")))
    try:
        with pytest.raises(WorkFailed, match="failed 1 times"):
            pool.map(exit_once, [{"name": "die", "marker": str(tmp_path / "b")}])
    finally:
        pool.close()


def test_the_sweep_patches_the_study_pairs_and_the_circuit_measures_the_transfer_pairs(run):
    """The cache, patch and summary stages read pairs.parquet alone: every effect belongs to a study pair
    and none to a transfer pair (their ids are numbered after the study's); the circuit is measured on
    every transfer pair, and report.md and the console's circuit line say so beside the faithfulness."""
    run_dir = run["outcome"].run_dir
    study = set(store.read_table(run_dir / "pairs.parquet").column("pair_id").to_pylist())
    transfer = store.read_table(run_dir / "transfer_pairs.parquet")
    effects = set(store.read_table(run_dir / "effects.parquet").column("pair_id").to_pylist())
    assert effects == study and not effects & set(transfer.column("pair_id").to_pylist())
    circuit = json.loads((run_dir / "circuit.json").read_text())
    assert circuit["transfer"]["n_pairs"] == transfer.num_rows >= 16
    assert circuit["transfer"]["source"] == "refusal-tiny grammar, train split"
    assert circuit["cmd"] == abs(1 - circuit["faithfulness"]) <= 1 - circuit["method"]["target"]
    line = (f"transfer (refusal-tiny grammar, train split, {transfer.num_rows} pairs the search never saw): "
            f"faithfulness {circuit['transfer']['faithfulness']:.3f}")
    outcome = run["outcome"]
    console = console_summary(run["cfg"], run_dir, outcome.pairs_report, outcome.stats, outcome.curves,
                              outcome.summary, outcome.circuit, None)
    assert line in run["report"] and line in console
    assert f"(CMD {circuit['cmd']:.3f}, bound 0.200)" in run["report"]


def test_numbers_match_the_stored_digest(run):
    """The refusal_tiny experiment reproduces the stored effects, summary and circuit.json values
    (bench/outputs_digest.py; refresh the digest only for a change meant to move the numbers)."""
    sys.path.insert(0, str(REPO / "bench"))
    from outputs_digest import compare

    assert compare(run["outcome"].run_dir, REPO / "tests" / "data" / "refusal_tiny_digest") == []


def test_patch_items_bucket_short_shards():
    """Pair shards of one token length each go into work items of at most shard_size pairs, in order."""
    from pipeline.stages.shards import PairShard, bucket_shards

    shards = [PairShard(tuple(range(n)), 7, str(i)) for i, n in enumerate([5, 6, 3, 16, 2, 1])]
    buckets = bucket_shards(shards, 16)
    assert [[s.key for s in b] for b in buckets] == [["0", "1", "2"], ["3"], ["4", "5"]]
    assert [[s.key for s in b] for b in bucket_shards(shards, 1)] == [[str(i)] for i in range(6)]
