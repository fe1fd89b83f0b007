"""Pairs of different token lengths in one batch: left padding with per-row positions.

Each row's tokens are moved to the end of a [P, T] batch (T = the longest row) behind pad tokens that the
attention mask hides, and each row's positions count from its own first token, so every real position
computes what it computes unpadded (rotary angles and learned position embeddings included). Left rather
than right: the final position is T - 1 in every row, so the metric, the last layer's final-position-only
shortcut and the position classes counted from the end (the chat template's closing tokens) line up across
rows, and rows of one class start together.

The per-row attention masks and positions reach the decoder layers as the extra arguments the model passes
them; `RowPrefixReuse` records those for every row once per first computed position and hands each row
batch its rows' slice (`hooks.PrefixReuse` records one row and shares it, which only equal lengths allow).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter
from .hooks import PrefixReuse, RunCache, capture, installed, prefix_cache


@dataclass(frozen=True)
class Padding:
    """Left padding of P rows to T positions."""

    lengths: torch.Tensor  # [P] each row's real token count

    @property
    def seq_len(self) -> int:
        return int(self.lengths.max())

    def real(self) -> torch.Tensor:
        """[P, T] bool: the row's own tokens (pads first)."""
        return torch.arange(self.seq_len)[None] >= (self.seq_len - self.lengths)[:, None]

    def model_inputs(self, device, first: int = 0) -> dict:
        """The attention mask [P, T] and the position ids [P, T - first] of positions first..T-1."""
        real = self.real()
        positions = (real.long().cumsum(1) - 1).clamp(min=0)  # pads take position 0; the mask hides them
        return {"attention_mask": real.long().to(device), "position_ids": positions[:, first:].to(device)}

    def pad(self, rows: list[torch.Tensor], value: int) -> torch.Tensor:
        """Per-length-group tensors [P_g, T_g] (rows in order) -> [P, T], left-padded with `value`."""
        return torch.cat([nn.functional.pad(r, (self.seq_len - r.shape[1], 0), value=value) for r in rows])


@torch.no_grad()
def run_padded_with_cache(model: nn.Module, adapter: Adapter, ids: torch.Tensor, padding: Padding,
                          components=("resid_pre",), keep_kv: bool = False) -> RunCache:
    """`hooks.run_with_cache` of left-padded `ids` [P, T]; `layer_inputs` stays empty: per-row inputs come
    from `RowPrefixReuse`."""
    wanted = set(components) | {"resid_pre"}
    with capture(adapter, wanted) as run:
        out = model.base_model(input_ids=ids, use_cache=keep_kv, **padding.model_inputs(ids.device))
    kv = None
    if keep_kv:
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        if any(k is None or k.shape[-2] != ids.shape[1] for k, _ in kv):  # a sliding window: no full prefix
            kv = None
    acts = {c: torch.stack(run.acts[c], dim=1) for c in wanted}
    return RunCache(acts=acts, final_resid=run.final, layer_inputs=[], kv=kv)


_PREFIX = object()  # stands for "this row batch's KV cache" in recorded layer inputs


def _rows(value, rows: torch.Tensor, n_rows: int, cache):
    """One recorded layer argument for a row batch: per-row tensors [P, ...] cut to `rows`, the batch's KV
    cache in the place the recording's held."""
    if value is _PREFIX:
        return cache
    if isinstance(value, torch.Tensor) and value.ndim >= 2 and value.shape[0] == n_rows:
        return value[rows.to(value.device)]
    if isinstance(value, tuple):
        return tuple(_rows(v, rows, n_rows, cache) for v in value)
    return value


class RowPrefixReuse(PrefixReuse):
    """`PrefixReuse` for left-padded rows: layer inputs carry each row's own attention mask and positions."""

    def __init__(self, model: nn.Module, adapter: Adapter, base: RunCache, padding: Padding, enabled: bool = True):
        super().__init__(model, adapter, base, enabled)
        self.padding = padding
        self._recorded: dict[int, list[tuple[tuple, dict]]] = {}  # first -> every row's layer inputs

    @torch.no_grad()
    def _record(self, first: int) -> list[tuple[tuple, dict]]:
        """Every row's layer inputs for positions first..T-1 attending to a cached prefix (none at first = 0)."""
        n_rows, device = len(self.padding.lengths), self.base.final_resid.device
        cache = prefix_cache(self.model, self.base.kv, torch.arange(n_rows), first) if first else None
        swap = lambda v: _PREFIX if cache is not None and v is cache else v  # noqa: E731
        recorded: list = [((), {})] * self.adapter.n_layers

        def record(layer):
            def hook(module, args, kwargs):
                recorded[layer] = (tuple(swap(a) for a in args[1:]),
                                   {k: swap(v) for k, v in kwargs.items() if k != "hidden_states"})
            return hook

        handles = [self.adapter.layers[layer].register_forward_pre_hook(record(layer), with_kwargs=True)
                   for layer in range(self.adapter.n_layers)]
        ids = torch.zeros(n_rows, self.seq_len - first, dtype=torch.long, device=device)  # gives the length only
        with installed(handles):
            self.model.base_model(input_ids=ids, cache=cache, use_cache=cache is not None,
                                  **self.padding.model_inputs(device, first))
        return recorded

    def with_cache(self, rows: torch.Tensor, first: int, layer: int, kv=None):
        if first not in self._recorded:
            self._recorded[first] = self._record(first)
        cache = prefix_cache(self.model, self.base.kv if kv is None else kv, rows, first, layer) if first else None
        n_rows = len(self.padding.lengths)
        inputs = [(_rows(args, rows, n_rows, cache), {k: _rows(v, rows, n_rows, cache) for k, v in kwargs.items()})
                  for args, kwargs in self._recorded[first]]
        return inputs, cache
