"""The refusal direction: the difference of means between harmful and harmless residuals, and the
metric with a direction projected out of the residual stream everywhere or added at one layer.

Both replay the decoder layers on the cached base run's residuals, batched as (direction, pair) rows;
adding at layer l starts at l.
"""
from __future__ import annotations

import torch
from torch import nn

from .adapters import get_adapter
from .hooks import edit_activation, installed, output_tensor, rows_that_fit, run_layers, run_with_cache
from .metrics import Answers, check_metric, measure


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[P, L, d] residuals of each kind -> [L, d] mean(harmful) - mean(harmless) per layer."""
    return harmful.float().mean(0) - harmless.float().mean(0)


@torch.no_grad()
def ablate_direction_metrics(model: nn.Module, ids: torch.Tensor, answers: Answers, directions: torch.Tensor,
                             metric: str = "logit_diff", max_batch_rows: int | None = None) -> torch.Tensor:
    """The metric [D, P] with direction d projected out of the residual stream everywhere: from the
    input of every layer, every attention output and the final residual (so no sublayer reads it)."""
    check_metric(metric)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    units = directions.float().to(device)
    units = units / units.norm(dim=-1, keepdim=True)
    base = run_with_cache(model, adapter, ids)
    n_pairs, seq_len = ids.shape
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)
    out = torch.empty(len(directions) * n_pairs)
    n_rows = len(directions) * n_pairs
    for start in range(0, n_rows, batch_rows):
        flat = torch.arange(start, min(start + batch_rows, n_rows))
        unit, pair = units[(flat // n_pairs).to(device)][:, None], (flat % n_pairs).to(device)  # [R, 1, d]

        def ablate(x):
            return x - (x * unit).sum(-1, keepdim=True).to(x.dtype) * unit.to(x.dtype)

        with installed([edit_activation(adapter, "attn_out", layer, ablate) for layer in range(adapter.n_layers)]):
            resid = base.acts["resid_pre"][pair, 0]
            for layer in range(adapter.n_layers):
                args, kwargs = base.layer_inputs[layer]
                resid = output_tensor(adapter.layers[layer](ablate(resid), *args, **kwargs))
        final = ablate(resid)[:, -1]
        out[flat] = measure(adapter, metric, answers, final, pair.cpu()).cpu()
    return out.reshape(len(directions), n_pairs)


@torch.no_grad()
def add_direction_metrics(model: nn.Module, ids: torch.Tensor, answers: Answers, vectors: torch.Tensor,
                          layers: list[int], metric: str = "logit_diff",
                          max_batch_rows: int | None = None) -> torch.Tensor:
    """The metric [D, P] with vectors[d] added to the residual entering layers[d], at every position."""
    check_metric(metric)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    base = run_with_cache(model, adapter, ids)
    n_pairs, seq_len = ids.shape
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)
    out = torch.empty(len(vectors), n_pairs)
    for d, layer in enumerate(layers):
        for start in range(0, n_pairs, batch_rows):
            pair = torch.arange(start, min(start + batch_rows, n_pairs))
            resid = base.acts["resid_pre"][pair.to(device), layer] + vectors[d].to(device, base.final_resid.dtype)
            final = run_layers(adapter, resid, layer, base.layer_inputs)
            out[d, pair] = measure(adapter, metric, answers, final, pair).cpu()
    return out
