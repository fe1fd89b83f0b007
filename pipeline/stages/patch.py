"""Exact activation patching of a bucket of pair shards, one (component, direction) -> an effect shard.

An effect shard is a long table, one row per (pair, variant), in EFFECT_SHARD_SCHEMA: model, pair_id,
direction, component, layer, head (null unless a head), position (0-based from the start) and
position_from_end (-1 = the final token; both null = all positions at once), seq_len, metric_clean,
metric_corrupted, metric_patched and effect = (patched - base) / (source - base). The summary stage
concatenates the shards into effects.parquet, with the run's own columns (run_id, config_hash) first.
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.analysis.pairs import pair_batch
from pipeline.engine.adapters import get_adapter
from pipeline.engine.patching import sweep, variants_for
from pipeline.store import write_table

EFFECT_SHARD_SCHEMA = pa.schema([
    ("model", pa.string()), ("pair_id", pa.int32()), ("direction", pa.string()), ("component", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("position_from_end", pa.int32()),
    ("seq_len", pa.int32()), ("metric_clean", pa.float32()), ("metric_corrupted", pa.float32()),
    ("metric_patched", pa.float32()), ("effect", pa.float32()),
])


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
        tables.append(pa.table(result.to_columns(batch["pair_id"], item["model"]), schema=EFFECT_SHARD_SCHEMA))
    return [write_table(item["out"], pa.concat_tables(tables), item["provenance"])]
