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
    output_tensor,
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


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """[k, d] directions -> [k, d] orthonormal rows spanning them, by Gram-Schmidt in order: the first row is
    the first direction's unit vector, each next row what its direction adds to the ones before."""
    basis: list[torch.Tensor] = []
    for v in directions.float():
        for b in basis:
            v = v - (v @ b) * b
        basis.append(v / v.norm().clamp(min=1e-12))
    return torch.stack(basis)


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """x [R, T, d] (or [R, d]: final positions) minus its component in the span of orthonormal basis rows:
    [d] or [k, d] for every row, or [R, k, d] one per row; in x's dtype."""
    basis = basis.to(x.device, x.dtype)
    if basis.ndim == 1:
        basis = basis[None]
    if basis.ndim == 2:
        return x - (x @ basis.T) @ basis
    if x.ndim == 2:
        return x - torch.einsum("rk,rkd->rd", torch.einsum("rd,rkd->rk", x, basis), basis)
    return x - torch.einsum("rtk,rkd->rtd", torch.einsum("rtd,rkd->rtk", x, basis), basis)


def ablation_hooks(adapter: Adapter, basis: torch.Tensor) -> list:
    """Hooks projecting the orthonormal basis ([d], [k, d], or [R, k, d]: one per batch row) out of the
    residual stream everywhere.

    Every write is projected (layer 0's input is the embeddings' write; attn_out and mlp_out at every
    layer), which for a residual stream that is the sum of its writes removes the subspace from every
    residual. Every read is projected too (each layer's input, the final norm's input): projection is
    idempotent, so it changes nothing there, and it keeps the subspace out where a family transforms a
    write before adding it (a post-sublayer norm)."""
    ablate = lambda x: project_out(x, basis)  # noqa: E731
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
    """One intervention: "ablate" projects a direction [d] (or the span of k directions [k, d]) out
    everywhere; "add" adds scale * the unit vector of one direction [d] to the residual entering `layer`, at
    every position."""

    mode: str
    direction: torch.Tensor  # [d], or [k, d] for a subspace ablation
    layer: int
    scale: float

    def __post_init__(self):
        if self.mode not in INTERVENTIONS:
            raise ValueError(f"unknown intervention {self.mode!r}: choose one of {list(INTERVENTIONS)}")
        if self.mode == "add" and self.direction.ndim != 1:
            raise ValueError(f"addition adds one direction [d], got shape {tuple(self.direction.shape)}: "
                             "pass a single direction")

    def hooks(self, adapter: Adapter) -> list:
        if self.mode == "ablate":
            return ablation_hooks(adapter, orthonormal_basis(self.direction.reshape(-1, self.direction.shape[-1])))
        return addition_hooks(adapter, self.scale * unit_vectors(self.direction), self.layer)


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
                             metric: str = "logit_diff", max_batch_rows: int | None = None,
                             lengths: torch.Tensor | None = None) -> torch.Tensor:
    """The metric [D, P] with direction d ([D, d]; or subspace d: [D, k, d]) projected out of the residual
    stream everywhere (`ablation_hooks`). `lengths` [P]: prompts of several lengths padded on the right."""
    check_metric(metric)
    return _under_ablation(model, ids, directions, max_batch_rows,
                           lambda adapter, final, pair: measure(adapter, metric, answers, final, pair.cpu()), lengths)


def ablate_direction_kl(model: nn.Module, ids: torch.Tensor, directions: torch.Tensor,
                        max_batch_rows: int | None = None, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """[D, P]: KL(plain run || run with direction d ablated) of the next-token distribution at the final
    position, over the whole vocabulary (the cost of the ablation on these prompts)."""
    device = next(model.parameters()).device
    last = _final_positions(ids, lengths).to(device)
    with torch.no_grad():
        plain = model(input_ids=ids.to(device), use_cache=False).logits[torch.arange(len(ids), device=device), last]
    return _under_ablation(model, ids, directions, max_batch_rows,
                           lambda adapter, final, pair: kl_to_source(plain[pair], adapter.logits(final)), lengths)


def _final_positions(ids: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """[P] each prompt's final position: the last one, or lengths - 1 for prompts padded on the right."""
    return torch.full((len(ids),), ids.shape[1] - 1) if lengths is None else lengths.cpu() - 1


@torch.no_grad()
def _under_ablation(model: nn.Module, ids: torch.Tensor, directions: torch.Tensor, max_batch_rows: int | None,
                    read, lengths: torch.Tensor | None = None) -> torch.Tensor:
    """read(adapter, final residuals [R, d], pair rows [R]) -> [R], for every (direction, pair) row run with
    that direction (or subspace: directions [D, k, d]) ablated (inside the hooks: the final norm reads the
    residual ablated); [D, P].

    The positions every prompt shares (a chat template's system prompt, often most of a short prompt) are
    the same in every row of one direction, ablated or not: they run once per direction, and each row runs
    its own positions after them on those keys and values. Prompts of several lengths may share a batch
    padded on the right (`lengths` [P]): no real position attends to a later one in a causal model, so each
    row's final residual is read at its own final position."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    bases = (unit_vectors(directions)[:, None] if directions.ndim == 2
             else torch.stack([orthonormal_basis(d) for d in directions])).to(device)  # [D, k, d]
    n_pairs, seq_len = ids.shape
    last = _final_positions(ids, lengths).to(device)
    shared = min(int(first_difference(ids[:1].expand_as(ids), ids).min()), int(last.min()))  # positions in every row
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len - shared)
    n_rows = len(directions) * n_pairs
    out = torch.empty(n_rows)
    for start in range(0, n_rows, batch_rows):
        flat = torch.arange(start, min(start + batch_rows, n_rows))
        direction, pair = flat // n_pairs, (flat % n_pairs).to(device)
        used, row_direction = torch.unique(direction, return_inverse=True)  # the chunk's directions; each row's
        cache = None
        if shared:
            with installed(ablation_hooks(adapter, bases[used.to(device)])):  # [D', shared] prefix rows
                prefix = model.base_model(input_ids=ids[:1, :shared].expand(len(used), -1), use_cache=True)
            prefix_kv = prefix.cache if hasattr(prefix, "cache") else prefix.past_key_values
            kv = [(layer.keys, layer.values) for layer in prefix_kv.layers]
            cache = prefix_cache(model, kv, row_direction.to(device), shared)
        outputs = []  # the last layer's output [R, T - shared, d]: the final norm reads it
        keep_last = adapter.layers[-1].register_forward_hook(lambda m, a, o: outputs.append(output_tensor(o)))
        with installed([keep_last, *ablation_hooks(adapter, bases[direction.to(device)])]):  # [R, k, d]
            model.base_model(input_ids=ids[pair, shared:], cache=cache, use_cache=cache is not None)
            final = outputs[0][torch.arange(len(flat), device=device), last[pair] - shared]  # [R, d]
            out[flat] = read(adapter, final, pair).float().cpu()
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


@dataclass(frozen=True)
class FirstOrder:
    """Each candidate direction's first-order effect on a metric (attribution: one forward and one backward
    pass for all candidates), to rank candidates before running the best of them exactly."""

    metric: torch.Tensor  # [P] the plain metric
    ablation: torch.Tensor  # [C, P] predicted change with the unit direction projected out of every write
    addition: torch.Tensor  # [C, P] predicted change per unit of scale added at the candidate's layer


def first_order_effects(model: nn.Module, ids: torch.Tensor, answers: Answers, units: torch.Tensor,
                        layers: list[int], metric: str = "logit_diff", max_batch_rows: int | None = None,
                        lengths: torch.Tensor | None = None) -> FirstOrder:
    """Ablating unit u from every write w (the embeddings, each attention and MLP output) changes w by
    -(w.u) u, so the metric moves by about -sum over writes and positions of (g_w.u)(w.u), g_w the metric's
    gradient at that write; adding s u at layer l moves it by about s * sum over positions of g_l.u, g_l
    the gradient at the residual entering l. ids [P, T], units [C, d] with their layers [C].

    Prompts of several lengths go in one batch padded on the right, `lengths` [P] their own lengths: in a
    causal model no real position attends to a later one, so padding changes nothing the metric reads, and
    the padded positions, which the metric does not reach, add nothing to the sums."""
    check_metric(metric)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    ids, units = ids.to(device), units.to(device)
    n_layers, (n_pairs, seq_len) = adapter.n_layers, ids.shape
    last = (torch.full((n_pairs,), seq_len) if lengths is None else lengths.cpu()) - 1  # each prompt's final position
    batch = max_batch_rows or max(1, rows_that_fit(model, adapter, seq_len) // 4)  # a backward keeps every layer
    values, ablation, addition = [], [], []
    for start in range(0, n_pairs, batch):
        rows = torch.arange(start, min(start + batch, n_pairs))
        outputs = []  # the last layer's output at every position [R, T, d]: the final norm reads it
        keep_last = adapter.layers[-1].register_forward_hook(lambda m, a, o: outputs.append(output_tensor(o)))
        with torch.enable_grad(), installed([keep_last]), capture(
                adapter, ("resid_pre", "attn_out", "mlp_out"), keep=lambda t: t,
                first_input=lambda h: h.detach().requires_grad_(True)) as run:
            model.base_model(input_ids=ids[rows.to(device)], use_cache=False)
            final = outputs[0][torch.arange(len(rows), device=device), last[rows].to(device)]  # [R, d]
            value = measure(adapter, metric, answers, final, rows)
            writes = [run.acts["resid_pre"][0]] + [run.acts[c][layer] for layer in range(n_layers)
                                                   for c in ("attn_out", "mlp_out")]
            reads = run.acts["resid_pre"][1:]
            grads = torch.autograd.grad(value.sum(), writes + reads, allow_unused=True)
        change = torch.zeros(len(rows), len(units), device=device)
        for write, grad in zip(writes, grads[:len(writes)]):
            if grad is not None:  # None: the write cannot reach the metric
                change -= ((write.detach().float() @ units.T) * (grad.float() @ units.T)).sum(1)  # [R, C]
        read_grads = [grads[0]] + list(grads[len(writes):])  # the residual entering each layer
        summed = torch.stack([g.float().sum(1) for g in read_grads])  # [L, R, d]
        slopes = torch.einsum("crd,cd->cr", summed[torch.tensor(layers, device=device)], units)
        values.append(value.detach().float().cpu())
        ablation.append(change.T.cpu())
        addition.append(slopes.cpu())
    return FirstOrder(torch.cat(values), torch.cat(ablation, 1), torch.cat(addition, 1))
