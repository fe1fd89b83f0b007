"""Stage 2: clean and corrupted forward passes -> activation shards.

One shard per pair shard (pairs of one token length), one row per pair, fixed-shape tensor columns:
  resid_pre_clean, resid_pre_corrupted    [n_layers, seq_len, d_model]  the residual entering each layer
  final_resid_clean, final_resid_corrupted [d_model]  the final position's residual after the last layer
These feed the refusal direction (difference of means between harmful and harmless residuals) and the
circuit step. Files are uncompressed Arrow IPC, so readers memory-map them (`store.read_table`).
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from pipeline.engine.adapters import get_adapter
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import run_with_cache
from pipeline.store import read_table, sha256_file, tensor_column, write_table


def pair_batch(pairs_path: str, rows: list[int]) -> dict:
    """Rows of pairs.arrow as tensors: pair_id [P], clean_ids [P, T] / corrupted_ids [P, T'], answers
    (T' != T only for pairs aligned from the end, prompts.align=end)."""
    table = read_table(pairs_path).take(pa.array(rows, pa.int64()))
    clean = table.column("clean_ids").to_pylist()
    corrupted = table.column("corrupted_ids").to_pylist()
    if len({(len(c), len(k)) for c, k in zip(clean, corrupted)}) != 1:
        raise ValueError(f"a pair shard must hold pairs of one clean and one corrupted token length, got "
                         f"{sorted({(len(c), len(k)) for c, k in zip(clean, corrupted)})}")

    def padded(column: str) -> torch.Tensor:
        lists = table.column(column).to_pylist()
        width = max(len(x) for x in lists)
        return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)

    return {
        "pair_id": np.asarray(table.column("pair_id").to_numpy(), dtype=np.int32),
        "clean_ids": torch.tensor(clean, dtype=torch.long),
        "corrupted_ids": torch.tensor(corrupted, dtype=torch.long),
        "answers": Answers(padded("refusal_ids"), padded("compliance_ids")),
    }


def run_item(model, tokenizer, item: dict) -> dict:
    """Cache one pair shard's residuals; `item`: pairs, rows, out, provenance."""
    batch = pair_batch(item["pairs"], item["rows"])
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    columns = {"pair_id": pa.array(batch["pair_id"], pa.int32())}
    for run in ("clean", "corrupted"):
        cache = run_with_cache(model, adapter, batch[f"{run}_ids"].to(device), ("resid_pre",))
        columns[f"resid_pre_{run}"] = tensor_column(cache.acts["resid_pre"].float().cpu().numpy())
        columns[f"final_resid_{run}"] = tensor_column(cache.final_resid.float().cpu().numpy())
    seq_len = batch["clean_ids"].shape[1]
    write_table(item["out"], pa.table(columns), {**item["provenance"], "seq_len": seq_len,
                                                 "n_layers": adapter.n_layers, "d_model": adapter.d_model})
    return {"path": item["out"], "sha256": sha256_file(item["out"]), "rows": len(batch["pair_id"]),
            "seq_len": seq_len}
