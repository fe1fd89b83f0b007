"""The refusal direction: the difference of means between harmful and harmless residuals, and the two
interventions on it (Arditi et al. 2024), as hooks usable around any forward pass or generation:

- directional ablation (`ablation_hooks`): the direction projected out of every write to the residual
  stream (the embeddings entering layer 0, every attention and MLP output) and out of every read of it
  (each layer's input, the final norm's input), at every layer and position, so no sublayer sees it;
- activation addition (`addition_hooks`): a vector added to the residual entering one layer, at every
  position (generated positions included).

Both act on whatever the model computes while they are installed, so a KV-cached generation computes
each new token under the intervention, and its cached keys and values come from intervened residuals.
`ablate_direction_metrics` / `ablate_direction_kl` / `add_direction_metrics` are the batched metric
paths, as (direction, pair) rows: ablation computes the positions every prompt shares once per direction;
addition replays the decoder layers from layer l on the cached base run's residuals.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .hooks import (
    capture,
    edit_activation,
    first_difference,
    installed,
    prefix_cache,
    rows_that_fit,
    run_layers,
    run_with_cache,
)
from .metrics import Answers, check_metric, kl_to_source, measure


def mean_difference(harmful: torch.Tensor, harmless: torch.Tensor) -> torch.Tensor:
    """[P, ..., d] residuals of each kind -> [..., d] mean(harmful) - mean(harmless)."""
    return harmful.float().mean(0) - harmless.float().mean(0)


def unit_vectors(directions: torch.Tensor) -> torch.Tensor:
    """[..., d] -> the same directions with norm 1 (float32)."""
    directions = directions.float()
    return directions / directions.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def project_out(x: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """x [R, T, d] (or [R, d]: final positions) minus its component along unit [d] (or one per row:
    [R, 1, d]), in x's dtype."""
    unit = unit.to(x.device, x.dtype)
    if unit.ndim > x.ndim:
        unit = unit[:, 0]
    return x - (x * unit).sum(-1, keepdim=True) * unit


def ablation_hooks(adapter: Adapter, unit: torch.Tensor) -> list:
    """Hooks projecting unit [d] (or [R, 1, d], one per batch row) out of the residual stream everywhere.

    Every write is projected (layer 0's input is the embeddings' write; attn_out and mlp_out at every
    layer), which for a residual stream that is the sum of its writes removes the direction from every
    residual. Every read is projected too (each layer's input, the final norm's input): projection is
    idempotent, so it changes nothing there, and it keeps the direction out where a family transforms a
    write before adding it (a post-sublayer norm)."""
    ablate = lambda x: project_out(x, unit)  # noqa: E731
    handles = []
    for layer in range(adapter.n_layers):
        handles += [edit_activation(adapter, c, layer, ablate) for c in ("resid_pre", "attn_out", "mlp_out")]
    handles.append(adapter.final_norm.register_forward_pre_hook(lambda m, args: (ablate(args[0]),) + tuple(args[1:])))
    return handles


def addition_hooks(adapter: Adapter, vector: torch.Tensor, layer: int) -> list:
    """A hook adding vector [d] (or [R, 1, d]) to the residual entering `layer`, at every position."""
    return [edit_activation(adapter, "resid_pre", layer, lambda x: x + vector.to(x.device, x.dtype))]


INTERVENTIONS = ("ablate", "add")


@dataclass(frozen=True)
class Intervention:
    """One intervention on one direction: "ablate" projects it out everywhere; "add" adds
    scale * its unit vector to the residual entering `layer`, at every position."""

    mode: str
    direction: torch.Tensor  # [d]
    layer: int
    scale: float

    def __post_init__(self):
        if self.mode not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.mode!r}: choose one of {list(INTERVENTIONS)}")

    def hooks(self, adapter: Adapter) -> list:
        unit = unit_vectors(self.direction)
        if self.mode == "ablate":
            return ablation_hooks(adapter, unit)
        return addition_hooks(adapter, self.scale * unit, self.layer)


@contextmanager
def intervened(model: nn.Module, intervention: Intervention | None):
    """Everything the model computes in the with-block is under `intervention` (nothing when None)."""
    if intervention is None:
        yield
        return
    adapter = get_adapter(model)
    if intervention.direction.shape[-1] != adapter.d_model:
        raise ValueError(f"the direction has {intervention.direction.shape[-1]} dimensions but the model's residual "
                         f"stream has {adapter.d_model}: use a direction found on this model")
    with installed(intervention.hooks(adapter)):
        yield


def ablate_direction_metrics(model: nn.Module, ids: torch.Tensor, answers: Answers, directions: torch.Tensor,
                             metric: str = "logit_diff", max_batch_rows: int | None = None) -> torch.Tensor:
    """The metric [D, P] with direction d projected out of the residual stream everywhere (`ablation_hooks`)."""
    check_metric(metric)
    return _under_ablation(model, ids, directions, max_batch_rows,
                           lambda adapter, final, pair: measure(adapter, metric, answers, final, pair.cpu()))


def ablate_direction_kl(model: nn.Module, ids: torch.Tensor, directions: torch.Tensor,
                        max_batch_rows: int | None = None) -> torch.Tensor:
    """[D, P]: KL(plain run || run with direction d ablated) of the next-token distribution at the final
    position, over the whole vocabulary (the cost of the ablation on these prompts)."""
    with torch.no_grad():
        plain = model(input_ids=ids.to(next(model.parameters()).device), use_cache=False).logits[:, -1]  # [P, V]
    return _under_ablation(model, ids, directions, max_batch_rows,
                           lambda adapter, final, pair: kl_to_source(plain[pair], adapter.logits(final)))


@torch.no_grad()
def _under_ablation(model: nn.Module, ids: torch.Tensor, directions: torch.Tensor, max_batch_rows: int | None,
                    read) -> torch.Tensor:
    """read(adapter, final residuals [R, d], pair rows [R]) -> [R], for every (direction, pair) row run with
    that direction ablated (inside the hooks: the final norm reads the residual ablated); [D, P].

    The positions every prompt shares (a chat template's system prompt, often most of a short prompt) are
    the same in every row of one direction, ablated or not: they run once per direction, and each row runs
    its own positions after them on those keys and values."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    units = unit_vectors(directions).to(device)
    n_pairs, seq_len = ids.shape
    shared = min(int(first_difference(ids[:1].expand_as(ids), ids).min()), seq_len - 1)  # positions in every row
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len - shared)
    n_rows = len(directions) * n_pairs
    out = torch.empty(n_rows)
    for start in range(0, n_rows, batch_rows):
        flat = torch.arange(start, min(start + batch_rows, n_rows))
        direction, pair = flat // n_pairs, (flat % n_pairs).to(device)
        used, row_direction = torch.unique(direction, return_inverse=True)  # the chunk's directions; each row's
        cache = None
        if shared:
            with installed(ablation_hooks(adapter, units[used.to(device)][:, None])):  # [D', shared] prefix rows
                prefix = model.base_model(input_ids=ids[:1, :shared].expand(len(used), -1), use_cache=True)
            prefix_kv = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
            kv = [(layer.keys, layer.values) for layer in prefix_kv.layers]
            cache = prefix_cache(model, kv, row_direction.to(device), shared)
        with installed(ablation_hooks(adapter, units[direction.to(device)][:, None])):  # [R, 1, d]
            with capture(adapter, ()) as run:
                model.base_model(input_ids=ids[pair, shared:], cache=cache, use_cache=cache is not None)
            out[flat] = read(adapter, run.final, pair).float().cpu()
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
