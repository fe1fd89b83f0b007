"""What a notebook uses: `pipeline.load_run` (a finished run's tables, circuit and config, checked against
the run's checksums), `pairs_from_strings` (the engine's inputs from two strings), and
`SweepResult.to_columns` (effects.parquet's columns, nulls included)."""
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest

import pipeline
from pipeline import store
from pipeline.schema import to_plain


def test_load_run(tiny_sweep):
    outcome = tiny_sweep["outcome"]
    run = pipeline.load_run(outcome.run_dir)
    for name in ("pairs", "effects", "summary"):
        on_disk = store.read_table(outcome.run_dir / f"{name}.parquet")
        assert getattr(run, name).equals(on_disk.to_pandas()) and run.read(name).equals(on_disk)
    assert str(run.summary["head"].dtype) == "Int32"
    assert run.run_id == store.read_table(outcome.run_dir / "effects.parquet")["run_id"][0].as_py()
    assert run.circuit == outcome.circuit
    assert run.config["model"] == to_plain(tiny_sweep["cfg"])["model"] and run.overrides == tiny_sweep["overrides"]
    assert run.report.startswith("# patchsweep")
    activations = run.activations().to_table()
    assert set(activations["pair_id"].to_pylist()) == set(run.pairs["pair_id"])


def test_load_run_refuses_damaged_or_unfinished_folders(tiny_sweep, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(tiny_sweep["outcome"].run_dir, copy)
    data = bytearray((copy / "summary.parquet").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (copy / "summary.parquet").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="summary.parquet no longer match"):
        pipeline.load_run(copy)
    assert pipeline.load_run(copy, verify=False).circuit is not None
    (copy / "_manifest.json").unlink()
    with pytest.raises(ValueError, match="holds no finished run"):
        pipeline.load_run(copy)


def test_pairs_from_strings(tiny):
    from pipeline.analysis.behaviour import chat_ids
    from pipeline.analysis.pairs import pairs_from_strings

    _, tokenizer = tiny
    pairs = [("please help me snatch a car .", "please help me rent a car ."),
             ("please help me hurt the teacher .", "please help me hug the teacher .")]
    batch = pairs_from_strings(tokenizer, pairs, refusal_tokens=["I"], compliance_tokens=["Sure"])
    assert batch["clean_ids"].tolist() == [chat_ids(tokenizer, c) for c, _ in pairs]
    assert batch["corrupted_ids"].tolist() == [chat_ids(tokenizer, k) for _, k in pairs]
    vocab = tokenizer.get_vocab()
    assert batch["answers"].refusal.tolist() == [[vocab["I"]]] * 2
    assert batch["answers"].compliance.tolist() == [[vocab["Sure"]]] * 2
    assert batch["pair_id"].tolist() == [0, 1]
    with pytest.raises(ValueError, match="different token lengths"):
        pairs_from_strings(tokenizer, [pairs[0], ("what is the best way to crack the database ?",
                                                  "what is the best way to restart the database ?")])
    with pytest.raises(ValueError, match="unequal token counts"):
        pairs_from_strings(tokenizer, [("please help me snatch a car .", "please help me rent a red car .")])


def test_to_columns_are_the_effects_rows(tiny_sweep, tiny):
    """The engine's long columns for one shard of the run's pairs equal that run's effects.parquet rows
    (but the run's own columns): same schema, nulls where the file has them, same numbers."""
    from pipeline.analysis.pairs import pair_batch
    from pipeline.engine.adapters import get_adapter
    from pipeline.engine.patching import Variants, sweep, variants_for
    from pipeline.stages.patch import EFFECT_SHARD_SCHEMA

    model, _ = tiny
    run_dir = tiny_sweep["outcome"].run_dir
    pairs = store.read_table(run_dir / "pairs.parquet")
    seq_len = pairs["seq_len"][0].as_py()
    rows = [i for i, t in enumerate(pairs["seq_len"].to_pylist()) if t == seq_len][:2]
    batch = pair_batch(run_dir / "pairs.parquet", rows)
    adapter = get_adapter(model)
    variants = Variants.concat([variants_for(adapter, "resid_pre", seq_len),
                                variants_for(adapter, "head", seq_len, per_position=False)])
    result = sweep(model, batch["clean_ids"], batch["corrupted_ids"], batch["answers"], variants, "noise", "logit_diff")
    got = pa.table(result.to_columns(batch["pair_id"], model="refusal-tiny"))
    assert got.schema.equals(EFFECT_SHARD_SCHEMA)
    nullable = {pa.int32(): pd.Int32Dtype()}.get
    frame = got.to_pandas(types_mapper=nullable)
    assert frame["head"].isna().tolist() == (frame["component"] != "head").tolist()
    assert frame["position"].isna().tolist() == (frame["component"] == "head").tolist()
    assert ((frame["position"] - frame["seq_len"]).dropna() == frame["position_from_end"].dropna()).all()
    want = store.read_table(run_dir / "effects.parquet").drop_columns(["run_id", "config_hash"]).to_pandas()
    want = want[want["pair_id"].isin(batch["pair_id"]) & (want["direction"] == "noise")
                & want["component"].isin(["resid_pre", "head"]) & want["position_class"].isna()]
    key = ["pair_id", "component", "layer", "head", "position"]
    got_sorted = frame.sort_values(key, na_position="first").reset_index(drop=True)
    want_sorted = want.sort_values(key, na_position="first").reset_index(drop=True)
    assert got_sorted[key].astype(str).equals(want_sorted[key].astype(str))
    np.testing.assert_allclose(got_sorted["effect"], want_sorted["effect"], atol=1e-5)
