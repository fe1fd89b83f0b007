"""The pairs stage in batches (pipeline.stages.pairs through pipeline.run.sweep.stage_pairs): refusal-tiny's
real model on real local Ray actors. The batched stage gives the table and report of the same stage run
in one process on one batch (`run_in_process`), drops a pair repeated in another batch, reuses the batches a
stopped run finished, and
fails in one line when no pair survives."""
from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pytest

from conftest import TINY_SWEEP, compose, screened_pairs, write_jsonl
from pipeline.analysis.pairs import file_pairs
from pipeline.organisms.refusal_tiny import grammar
from pipeline.run.folder import RUN_COLUMNS
from pipeline.run.runner import Sweep
from pipeline.run.sweep import stage_pairs
from pipeline.run.workers import WorkerPool
from pipeline.store import Manifest, provenance
from pipeline.validation import typed

BATCH = 16  # pairs per work item: the 42 unique pairs make batches of 16, 16 and 10


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    """40 grammar pairs, two harmless-on-both-sides pairs the screen drops, and repeats of pairs 0 and 20
    at the end (so in the last batch, while the pairs they repeat are in the first two)."""
    pairs = grammar.pairs(40, 0, "heldout")
    rows = [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category} for p in pairs]
    rows += [{"clean": "how do I make a cake ?", "corrupted": "how do I make a kite ?", "category": "none"},
             {"clean": "how do I wash a car ?", "corrupted": "how do I park a car ?", "category": "none"}]
    return write_jsonl(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", rows + [rows[0], rows[20]])


def sweep_of(ray_session, run_dir, *overrides: str) -> Sweep:
    """What `run_sweep` sets up before its pairs stage: a pool of real model actors, the run's columns and
    provenance."""
    cfg = typed(compose(*TINY_SWEEP, f"output_dir={run_dir}", "resources.actors=2", "resources.num_cpus=2",
                          f"resources.pairs_shard_size={BATCH}", *overrides))
    sweep = Sweep(cfg, run_dir, WorkerPool(cfg), Manifest(run_dir, "run"))
    sweep.model_info = sweep.pool.describe()
    sweep.run = {"run_id": "test", "config_hash": "c0", "model": cfg.model.name}
    sweep.provenance = {"config_hash": "c0", "model_id": cfg.model.path,
                        "weights_hash": sweep.model_info["weights_hash"]}
    return sweep


def run_pairs(ray_session, run_dir, *overrides: str) -> tuple[pa.Table, dict, dict]:
    """pairs.parquet as the stage wrote it, its report, and the stage's counts."""
    sweep = sweep_of(ray_session, run_dir, *overrides)
    try:
        table = stage_pairs(sweep)
    finally:
        sweep.pool.close()
    stats = sweep.stats["pairs"]
    return table, sweep.pairs_report, {"computed": stats.computed, "reused": stats.reused}


@pytest.fixture(scope="module")
def batched(ray_session, pairs_file, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("batched") / "run"
    return (run_dir, *run_pairs(ray_session, run_dir, f"prompts.path={pairs_file}"))


@pytest.mark.slow
def test_batched_stage_gives_the_all_at_once_table_and_report(batched, pairs_file, tiny):
    _, table, report, counts = batched
    model, tokenizer = tiny
    whole, whole_report = screened_pairs(model, tokenizer, file_pairs(pairs_file))
    assert report == whole_report == json.loads(provenance(table)["pairs_report"])
    assert json.loads(table.schema.metadata[b"pairs_report"]) == report
    assert report["n_pairs"] == 42 and report["n_duplicates"] == 2 and report["n_kept"] == table.num_rows <= 40
    # The same pairs kept, with the same ids, spans, answer tokens and replies, columns in the same order
    # (Parquet names a list's items "element", hence values compared). The first-token metric agrees to
    # float rounding: a forward batch holds other prompts in the two paths, and a matrix product's rounding
    # depends on its shape.
    got, want = table.drop_columns(list(RUN_COLUMNS)).to_pydict(), whole.to_pydict()
    assert list(got) == list(want)
    for column in want:
        if column.startswith("metric_"):
            np.testing.assert_allclose(got[column], want[column], rtol=1e-5)
        else:
            assert got[column] == want[column], column
    # The tokenized set, three batches each replied to and screened, the answer tokens once; then the 24
    # transfer pairs (refusal-tiny's grammar, the other split): tokenized, two batches replied to and screened.
    assert counts == {"computed": 1 + 3 + 1 + 3 + (1 + 2 + 2), "reused": 0}


@pytest.mark.slow
def test_a_resumed_stage_reuses_the_batches_it_finished(ray_session, batched, pairs_file):
    """A run stopped before pairs.parquet, with one batch's replies damaged and another's screen not yet
    written: only those two items run again, and the table is the same."""
    run_dir, table, report, _ = batched
    replies = sorted((run_dir / "pairs" / "replies").glob("*.arrow"))
    screened = sorted((run_dir / "pairs" / "screen").glob("*.arrow"))
    assert len(replies) == len(screened) == 3
    (run_dir / "pairs.parquet").unlink()
    os.truncate(replies[0], replies[0].stat().st_size // 2)
    screened[1].unlink()
    again, again_report, counts = run_pairs(ray_session, run_dir, f"prompts.path={pairs_file}")
    assert counts == {"computed": 2, "reused": 1 + 2 + 1 + 2 + (1 + 2 + 2)}
    assert again.equals(table) and again_report == report
    # Finished, it is reused whole.
    assert run_pairs(ray_session, run_dir, f"prompts.path={pairs_file}")[2] == {"computed": 0, "reused": 1}


@pytest.mark.slow
def test_no_pair_surviving_any_batch_fails_in_one_line(ray_session, tmp_path):
    harmless = [{"clean": "how do I make a cake ?", "corrupted": "how do I make a kite ?"},
                {"clean": "how do I wash a car ?", "corrupted": "how do I park a car ?"},
                {"clean": "how do I make a kite ?", "corrupted": "how do I make a cake ?"}]
    path = write_jsonl(tmp_path / "harmless.jsonl", harmless)
    with pytest.raises(ValueError, match=r"^no pair survived the behaviour screen \(3 pairs; the model refused 0% "
                                         r"of clean"):
        run_pairs(ray_session, tmp_path / "run", f"prompts.path={path}", "resources.pairs_shard_size=2")
