"""Exact activation patching of a bucket of pair shards, one (component, direction) -> an effect shard.

An effect shard is a long table, one row per (pair, variant): model, pair_id, direction, component,
layer, head (null unless a head), position (absolute, 0-based; null = all positions at once), seq_len,
metric_clean, metric_corrupted, metric_patched and effect = (patched - base) / (source - base).
The summary stage concatenates the shards into effects.arrow.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from pipeline.analysis.pairs import pair_batch
from pipeline.engine.adapters import get_adapter
from pipeline.engine.patching import ALL, sweep, variants_for
from pipeline.store import write_table

EFFECTS_SCHEMA = pa.schema([
    ("model", pa.string()), ("pair_id", pa.int32()), ("direction", pa.string()), ("component", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("seq_len", pa.int32()),
    ("metric_clean", pa.float32()), ("metric_corrupted", pa.float32()), ("metric_patched", pa.float32()),
    ("effect", pa.float32()),
])


def effects_table(model_name: str, columns: dict[str, np.ndarray], seq_len: int) -> pa.Table:
    """The engine's long columns -> the effects schema (ALL heads / positions become null)."""
    n = len(columns["pair_id"])

    def nullable(values):
        return pa.array(values, pa.int32(), mask=values == ALL)

    return pa.table({
        "model": pa.array([model_name] * n, pa.string()),
        "pair_id": pa.array(columns["pair_id"], pa.int32()),
        "direction": pa.array(columns["direction"], pa.string()),
        "component": pa.array(columns["component"], pa.string()),
        "layer": pa.array(columns["layer"], pa.int32()),
        "head": nullable(columns["head"]),
        "position": nullable(columns["position"]),
        "seq_len": pa.array(np.full(n, seq_len), pa.int32()),
        **{k: pa.array(columns[k], pa.float32())
           for k in ("metric_clean", "metric_corrupted", "metric_patched", "effect")},
    }, schema=EFFECTS_SCHEMA)


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: pairs, shards (row lists, each of one token length), out, model, component, per_position,
    direction, layers, heads, metric, batch_size, provenance. One engine sweep per shard, one effects file."""
    adapter = get_adapter(model)
    tables = []
    for rows in item["shards"]:
        batch = pair_batch(item["pairs"], rows)
        seq_len = batch["clean_ids"].shape[1]
        variants = variants_for(adapter, item["component"], seq_len, per_position=item["per_position"],
                                layers=item["layers"], heads=item["heads"])
        result = sweep(model, batch["clean_ids"], batch["corrupted_ids"], batch["answers"], variants,
                       direction=item["direction"], metric=item["metric"], max_batch_rows=item["batch_size"],
                       align_end=batch["clean_ids"].shape[1] != batch["corrupted_ids"].shape[1])
        tables.append(effects_table(item["model"], result.to_columns(batch["pair_id"]), seq_len))
    return [write_table(item["out"], pa.concat_tables(tables), item["provenance"])]
