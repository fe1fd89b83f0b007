"""Pair shards: the unit of pairs that the cache and patch stages work on.

A shard holds rows of pairs.parquet of one clean and one corrupted token length (the engine batches
[P, T]), at most resources.shard_size of them, named by a content key of their pair ids, token ids and
answers, so a shard's outputs are found again by a re-run over the same pairs.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import pyarrow as pa

from pipeline.store import content_key

# The columns whose content names a shard (and the pairs as a whole: `pairs_hash`).
PAIR_CONTENT = ("pair_id", "clean_ids", "corrupted_ids", "refusal_ids", "compliance_ids")


@dataclass(frozen=True)
class PairShard:
    rows: tuple[int, ...]  # rows of pairs.parquet
    seq_len: int  # the clean prompts' token count
    key: str  # content key of the rows' PAIR_CONTENT


def plan_shards(pairs: pa.Table, shard_size: int) -> list[PairShard]:
    """The pairs in shards of one (token length, alignment offset), in length order, at most shard_size each."""
    by_length: dict[tuple[int, int], list[int]] = {}
    lengths = zip(pairs.column("seq_len").to_pylist(), pairs.column("align_offset").to_pylist())
    for row, (seq_len, offset) in enumerate(lengths):
        by_length.setdefault((seq_len, offset), []).append(row)
    columns = {c: pairs.column(c).to_pylist() for c in PAIR_CONTENT}
    shards = []
    for seq_len, offset in sorted(by_length):
        rows = by_length[seq_len, offset]
        for start in range(0, len(rows), shard_size):
            part = rows[start:start + shard_size]
            content = {c: [values[r] for r in part] for c, values in columns.items()}
            shards.append(PairShard(tuple(part), seq_len, content_key(content)))
    return shards


def bucket_shards(shards: list[PairShard], pairs_per_item: int) -> list[list[PairShard]]:
    """Pair shards (one token length each) put together, in order, into work items of at most
    `pairs_per_item` pairs: an item pays a fixed cost (a Ray round trip, reading the pairs, writing a
    file), so short lengths with few pairs share one instead of each taking its own."""
    buckets: list[list[PairShard]] = []
    for shard in shards:
        if buckets and sum(len(s.rows) for s in buckets[-1]) + len(shard.rows) <= pairs_per_item:
            buckets[-1].append(shard)
        else:
            buckets.append([shard])
    return buckets


def pairs_hash(pairs: pa.Table) -> str:
    """sha256 of the pairs' content (ids, answers), independent of file metadata."""
    blob = json.dumps({c: pairs.column(c).to_pylist() for c in PAIR_CONTENT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()
