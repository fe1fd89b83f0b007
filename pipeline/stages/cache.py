"""Clean and corrupted forward passes of one pair shard -> an activation shard.

One row per pair, fixed-shape tensor columns:
  resid_pre_clean, resid_pre_corrupted    [n_layers, seq_len, d_model]  the residual entering each layer
  final_resid_clean, final_resid_corrupted [d_model]  the final position's residual after the last layer
These feed the refusal direction (difference of means between harmful and harmless residuals) and the
circuit step. Files are uncompressed Arrow IPC, so readers memory-map them (`store.read_table`).
"""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from pipeline.analysis.pairs import pair_batch
from pipeline.engine.adapters import get_adapter
from pipeline.engine.hooks import run_with_cache
from pipeline.store import tensor_column, write_table


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: pairs, rows, out, provenance."""
    batch = pair_batch(item["pairs"], item["rows"])
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    columns = {"pair_id": pa.array(batch["pair_id"], pa.int32())}
    for run in ("clean", "corrupted"):
        cache = run_with_cache(model, adapter, batch[f"{run}_ids"].to(device), ("resid_pre",))
        columns[f"resid_pre_{run}"] = tensor_column(cache.acts["resid_pre"].float().cpu().numpy())
        columns[f"final_resid_{run}"] = tensor_column(cache.final_resid.float().cpu().numpy())
    meta = {**item["provenance"], "seq_len": batch["clean_ids"].shape[1], "n_layers": adapter.n_layers,
            "d_model": adapter.d_model}
    return [write_table(item["out"], pa.table(columns), meta)]
