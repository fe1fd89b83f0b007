"""Effect shards -> effects.arrow (one table, shards in plan order) and summary.arrow: per site, the
mean normalised effect over pairs with its bootstrap confidence interval (pipeline.analysis.statistics)."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.analysis.positions import position_tokens
from pipeline.analysis.statistics import read_effects, summarise
from pipeline.store import read_table, write_table

SUMMARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("direction", pa.string()), ("component", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("token", pa.string()),
    ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("std", pa.float64()),
    ("n", pa.int32()),
])


def summary_table(summary: pd.DataFrame) -> pa.Table:
    frame = summary[SUMMARY_SCHEMA.names].astype({"head": "Int32", "position": "Int32", "layer": "int32"})
    return pa.Table.from_pandas(frame, schema=SUMMARY_SCHEMA, preserve_index=False).replace_schema_metadata(None)


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: shards (effect shard paths), pairs, effects and summary (the outputs), options (the
    summary config), provenance. The model is not used: the summary is arithmetic over pairs."""
    effects = pa.concat_tables([read_table(p) for p in item["shards"]]).replace_schema_metadata(None)
    effects_path = write_table(item["effects"], effects, item["provenance"])
    options = item["options"]
    summary = summarise(read_effects(effects_path), options["n_bootstrap"], options["ci"], options["seed"],
                        position_tokens(read_table(item["pairs"])))
    meta = {**item["provenance"], "n_bootstrap": options["n_bootstrap"], "ci": options["ci"],
            "positions": "counted from the end: -1 = final token; null = all positions"}
    return [effects_path, write_table(item["summary"], summary_table(summary), meta)]
