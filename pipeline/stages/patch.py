"""Exact activation patching of a bucket of pair shards, one (component, direction) -> an effect shard.

An effect shard is a long table, one row per (pair, variant), in EFFECT_SHARD_SCHEMA: model, pair_id,
direction, component, layer, head (null unless a head), position (0-based from the start) and
position_from_end (-1 = the final token; both null = all positions at once, or a position class),
position_class (one of positions.HEADLINE_CLASSES, patched at once: the harmful tokens, the rest of the
instruction, the template's end; null otherwise), seq_len, metric_clean,
metric_corrupted, metric_patched and effect = (patched - base) / (source - base). The summary stage
concatenates the shards into effects.parquet, with the run's own columns (run_id, config_hash) first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa

from pipeline.analysis.pairs import pair_batch
from pipeline.analysis.positions import HEADLINE_CLASSES, headline_groups
from pipeline.engine.adapters import get_adapter
from pipeline.engine.patching import Variants, sweep, variants_for
from pipeline.outputs.files import RunFolder
from pipeline.schema import PatchingConfig
from pipeline.stages.shards import PairShard, bucket_shards
from pipeline.store import code_identity, content_key, read_table, write_table

EFFECT_SHARD_SCHEMA = pa.schema([
    ("model", pa.string()), ("pair_id", pa.int32()), ("direction", pa.string()), ("component", pa.string()),
    ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("position_from_end", pa.int32()),
    ("position_class", pa.string()), ("seq_len", pa.int32()), ("metric_clean", pa.float32()),
    ("metric_corrupted", pa.float32()), ("metric_patched", pa.float32()), ("effect", pa.float32()),
])


@dataclass(frozen=True)
class Patches:
    """Which patches an item runs and how they are measured (with the pairs, what names its effect shard)."""

    component: str
    direction: str
    metric: str
    per_position: bool  # every position on its own, or all at once
    layers: list[int] | None  # None = every layer
    heads: list[int] | None  # None = every head (only for component "head")
    by_class: bool = False  # also each of positions.HEADLINE_CLASSES at once


@dataclass(frozen=True)
class PatchItem:
    """A bucket of pair shards patched one way -> effects/<content key>.arrow."""

    pairs: str  # pairs.parquet
    shards: tuple[tuple[int, ...], ...]  # each shard's rows (one token length each)
    patches: Patches
    model: str  # the model's label, written into every row
    batch_size: int | None  # patch rows per forward pass; None = chosen from free memory
    out: str
    provenance: dict

    @property
    def name(self) -> str:
        return f"patch {self.patches.component} {self.patches.direction} {Path(self.out).stem}"


def plan(run_dir: Path, shards: list[PairShard], patching: PatchingConfig, shard_size: int, model: str,
         weights_hash: str, provenance: dict) -> list[PatchItem]:
    """An item per (bucket of at most shard_size pairs, component, direction), its position classes with
    it (one sweep shares the cached runs and batches), named by this stage's code (the engine's included),
    the weights, the shards' content and the patches."""
    items, code = [], code_identity(__name__)
    for bucket in bucket_shards(shards, shard_size):
        for component in patching.components:
            for direction in patching.directions:
                patches = Patches(component, direction, patching.metric, component in patching.per_position,
                                  patching.layers, patching.heads if component == "head" else None,
                                  component in patching.per_class)
                key = content_key("patch", code, weights_hash, [shard.key for shard in bucket], asdict(patches))
                items.append(PatchItem(str(RunFolder(run_dir).pairs), tuple(shard.rows for shard in bucket),
                                       patches, model, patching.batch_size,
                                       str(RunFolder(run_dir).effect_shards / f"{key}.arrow"), provenance))
    return items


def run(model, tokenizer, item: PatchItem) -> list[Path]:
    """One engine sweep per shard, one effects file."""
    adapter, patches = get_adapter(model), item.patches
    tables = []
    for rows in item.shards:
        batch = pair_batch(item.pairs, list(rows))
        seq_len = batch["clean_ids"].shape[1]
        groups = (headline_groups(read_table(item.pairs).take(pa.array(rows, pa.int64())))  # [P, 3, T]
                  if patches.by_class else None)
        variants = variants_for(adapter, patches.component, seq_len, per_position=patches.per_position,
                                layers=patches.layers, heads=patches.heads)
        if patches.by_class:
            variants = Variants.concat([variants, variants_for(adapter, patches.component, seq_len,
                                                               layers=patches.layers, heads=patches.heads,
                                                               n_groups=len(HEADLINE_CLASSES))])
        result = sweep(model, batch["clean_ids"], batch["corrupted_ids"], batch["answers"], variants,
                       direction=patches.direction, metric=patches.metric, max_batch_rows=item.batch_size,
                       align_end=batch["clean_ids"].shape[1] != batch["corrupted_ids"].shape[1],
                       position_groups=groups)
        columns = result.to_columns(batch["pair_id"], item.model, HEADLINE_CLASSES)
        tables.append(pa.table(columns, schema=EFFECT_SHARD_SCHEMA))
    return [write_table(item.out, pa.concat_tables(tables), item.provenance)]
