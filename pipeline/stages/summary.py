"""Effect shards -> effects.parquet (one table, shards in plan order) and summary.parquet: per site, the
mean normalised effect over pairs with its bootstrap confidence interval (pipeline.analysis.statistics).
Both start with the run's own columns (run_id, config_hash, model)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa

from pipeline.analysis.positions import position_tokens
from pipeline.analysis.statistics import read_effects, site_breakdown, summarise
from pipeline.outputs.files import EFFECTS, SITES, SUMMARY, RunFolder
from pipeline.schema import SummaryConfig
from pipeline.store import code_identity, content_key, publish_json, read_table, with_columns, write_table

OUTPUTS = (EFFECTS.name, SUMMARY.name, SITES.name)

SUMMARY_SCHEMA = pa.schema([
    ("model", pa.string()), ("direction", pa.string()), ("component", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("position_from_end", pa.int32()),
    ("position_class", pa.string()), ("token", pa.string()), ("mean", pa.float64()), ("ci_low", pa.float64()),
    ("ci_high", pa.float64()), ("std", pa.float64()), ("n", pa.int32()), ("replaces_input", pa.bool_()),
])


def summary_table(summary: pd.DataFrame, seq_lens: set[int]) -> pa.Table:
    """The analysis frame (positions counted from the end) -> SUMMARY_SCHEMA. A site's position from the
    start exists only where every pair has the same length; elsewhere it is null while position_from_end
    is set (both null: all positions at once, or the position class named)."""
    frame = summary.rename(columns={"position": "position_from_end"})
    frame["position"] = frame["position_from_end"] + next(iter(seq_lens)) if len(seq_lens) == 1 else pd.NA
    frame["position_class"] = frame["position_class"].astype(object).where(frame["position_class"].notna(), None)
    frame = frame[SUMMARY_SCHEMA.names].astype({"head": "Int32", "position": "Int32", "position_from_end": "Int32",
                                                "layer": "int32"})
    return pa.Table.from_pandas(frame, schema=SUMMARY_SCHEMA, preserve_index=False).replace_schema_metadata(None)


@dataclass(frozen=True)
class SummaryItem:
    """Every effect shard -> the run folder's OUTPUTS (one item: the summary is arithmetic over pairs)."""

    shards: tuple[str, ...]  # effect shards, in plan order
    run_dir: str
    options: SummaryConfig
    run: dict  # the run's own columns
    provenance: dict
    key: str  # content key of its outputs: the shards and the options

    name = "summary"


def plan(run_dir: Path, effect_shards: list[Path], options: SummaryConfig, labels_hash: str, run: dict,
         provenance: dict) -> SummaryItem:
    """`labels_hash`: the pairs' category labels, which sites.json breaks effects down by (relabelled pairs
    give the same effect shards, not the same breakdown)."""
    key = content_key("summary", code_identity(__name__), [p.name for p in effect_shards], labels_hash,
                      asdict(options))
    return SummaryItem(tuple(str(p) for p in effect_shards), str(run_dir), options, run, provenance, key)


def run(model, tokenizer, item: SummaryItem) -> list[Path]:
    """The model is not used."""
    folder = RunFolder(item.run_dir)
    effects = pa.concat_tables([read_table(p) for p in item.shards]).replace_schema_metadata(None)
    effects_path = write_table(folder.effects, with_columns(effects, item.run), item.provenance)
    options = item.options
    pairs = read_table(folder.pairs)
    effects = read_effects(effects_path)
    summary = summarise(effects, options.n_bootstrap, options.ci, options.seed, position_tokens(pairs))
    meta = {**item.provenance, "n_bootstrap": options.n_bootstrap, "ci": options.ci}
    table = with_columns(summary_table(summary, set(pairs.column("seq_len").to_pylist())), item.run)
    publish_json(folder.sites, {"provenance": item.provenance,
                                         "sites": site_breakdown(effects, pairs, options.top_k)})
    return [effects_path, write_table(folder.summary, table, meta), folder.sites]
