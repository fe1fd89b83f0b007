"""Clean and corrupted forward passes of one pair shard -> an activation shard.

One row per (pair, prompt, layer, position), in that order, with the residual stream as a fixed-shape
tensor of [d_model]:
  pair_id, prompt ("clean" or "corrupted"), layer, position (0-based), position_from_end (-1 = final),
  seq_len (of that prompt), resid: the residual entering `layer`; layer = n_layers is the residual after
  the last layer, at the final position only (what the unembedding reads).
The tensor's shape does not depend on the prompt's length, so the shards of a run (and of runs of one
model) concatenate: `pyarrow.dataset.dataset(run_dir / "activations", format="ipc")`. These feed the
refusal direction (difference of means between harmful and harmless residuals). Files are uncompressed
Arrow IPC, so readers memory-map them (`store.read_table`); `residuals(table)` views one prompt's rows as
[pairs, layers, seq_len, d_model] without copying.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.analysis.pairs import pair_batch
from pipeline.engine.adapters import get_adapter
from pipeline.engine.hooks import run_with_cache
from pipeline.outputs.files import RunFolder
from pipeline.stages.shards import PairShard
from pipeline.store import code_identity, content_key, tensor_column, tensor_numpy, write_table

PROMPTS = ("clean", "corrupted")


def activation_rows(pair_ids: np.ndarray, prompt: str, resid: np.ndarray, final: np.ndarray) -> dict[str, np.ndarray]:
    """resid [P, L, T, d] and final [P, d] of one prompt -> the shard's columns, per pair its L x T rows
    then its final row."""
    n_pairs, n_layers, seq_len, d_model = resid.shape
    block = n_layers * seq_len + 1
    layer = np.append(np.repeat(np.arange(n_layers), seq_len), n_layers)
    position = np.append(np.tile(np.arange(seq_len), n_layers), seq_len - 1)
    values = np.concatenate([resid.reshape(n_pairs, n_layers * seq_len, d_model), final[:, None]], axis=1)
    return {
        "pair_id": np.repeat(pair_ids, block).astype(np.int32),
        "prompt": np.full(n_pairs * block, prompt),
        "layer": np.tile(layer, n_pairs).astype(np.int32),
        "position": np.tile(position, n_pairs).astype(np.int32),
        "position_from_end": np.tile(position - seq_len, n_pairs).astype(np.int32),
        "seq_len": np.full(n_pairs * block, seq_len, dtype=np.int32),
        "resid": values.reshape(n_pairs * block, d_model),
    }


def residuals(table: pa.Table, prompt: str = "clean") -> tuple[np.ndarray, np.ndarray]:
    """One prompt's rows of an activation shard -> (resid [P, L, T, d], final [P, d]): views of the
    memory-mapped file, no copy (a shard holds one token length, and one prompt's rows lie together)."""
    rows = np.flatnonzero(pc.equal(table["prompt"], prompt).to_numpy())
    first, n_rows = int(rows[0]), len(rows)
    seq_len = table["seq_len"][first].as_py()
    n_pairs = len(np.unique(table["pair_id"].to_numpy()[rows]))
    block = n_rows // n_pairs
    values = tensor_numpy(table["resid"])[first:first + n_rows].reshape(n_pairs, block, -1)
    return values[:, :-1].reshape(n_pairs, (block - 1) // seq_len, seq_len, -1), values[:, -1]


@dataclass(frozen=True)
class CacheItem:
    """One pair shard's forward passes."""

    pairs: str  # pairs.parquet
    rows: tuple[int, ...]  # its rows
    out: str  # activations/<content key>.arrow
    provenance: dict

    @property
    def name(self) -> str:
        return f"cache {Path(self.out).stem}"


def plan(run_dir: Path, shards: list[PairShard], weights_hash: str, provenance: dict) -> list[CacheItem]:
    """An item per pair shard, named by this stage's code, the model's weights and the shard's content."""
    folder, code = RunFolder(run_dir), code_identity(__name__)
    return [CacheItem(str(folder.pairs), shard.rows,
                      str(folder.activations / f"{content_key('cache', code, weights_hash, shard.key)}.arrow"),
                      provenance)
            for shard in shards]


def run(model, tokenizer, item: CacheItem) -> list[Path]:
    batch = pair_batch(item.pairs, list(item.rows))
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    parts = []
    for prompt in PROMPTS:
        cache = run_with_cache(model, adapter, batch[f"{prompt}_ids"].to(device), ("resid_pre",))
        columns = activation_rows(np.asarray(batch["pair_id"]), prompt, cache.acts["resid_pre"].float().cpu().numpy(),
                                  cache.final_resid.float().cpu().numpy())
        parts.append(pa.table({**columns, "resid": tensor_column(columns["resid"])}))
    meta = {**item.provenance, "n_layers": adapter.n_layers, "d_model": adapter.d_model}
    return [write_table(item.out, pa.concat_tables(parts).combine_chunks(), meta)]
