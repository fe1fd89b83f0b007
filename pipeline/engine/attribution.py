"""Attribution patching: a first-order estimate of every patch at once (Nanda 2023; Syed et al. 2023).

Patching activation a from its base value to its source value changes the metric by about
    (a_source - a_base) . d metric / d a  |_base
so one forward pass on the source input (its activations), one forward pass on the base input with
gradients on, and one backward pass score every head, MLP, attention output and residual at every
layer and position. It is an estimate: rank with it, then verify the strongest exactly (the circuit
step does, and reports how well the two agree). `reference.interpolated_metric` is the exact metric of
a patch scaled by alpha, whose slope at alpha -> 0 the estimate must equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import get_adapter
from .hooks import COMPONENTS, capture, rows_that_fit, run_with_cache
from .metrics import DIRECTIONS, Answers, DirectedMetrics, check_metric, measure, normalised_effect


@dataclass
class AttributionResult(DirectedMetrics):
    scores: dict[str, torch.Tensor]  # component -> [P, L, T] ([P, L, T, H] for heads): estimated patched - base

    def effects(self, component: str) -> torch.Tensor:
        """Estimated normalised effects, the shape of scores[component]: (estimate) / (source - base)."""
        score = self.scores[component]
        shape = (-1,) + (1,) * (score.ndim - 1)
        base = self.metric_base.reshape(shape)
        return normalised_effect(base + score, base, self.metric_source.reshape(shape))


def attribution_patching(model: nn.Module, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, answers: Answers,
                         direction: str = "denoise", metric: str = "logit_diff", components=COMPONENTS,
                         max_batch_rows: int | None = None) -> AttributionResult:
    """Estimated effect of patching every component at every layer and position (heads one by one)."""
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {list(DIRECTIONS)}")
    check_metric(metric)
    unknown = set(components) - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {list(COMPONENTS)}")
    if clean_ids.shape != corrupted_ids.shape:
        raise ValueError(f"clean {tuple(clean_ids.shape)} and corrupted {tuple(corrupted_ids.shape)} token ids differ "
                         "in shape: pairs need equal token counts")
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    clean_ids, corrupted_ids = clean_ids.to(device), corrupted_ids.to(device)
    base_ids, source_ids = (corrupted_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupted_ids)
    n_pairs, seq_len = base_ids.shape
    # A backward pass keeps every layer's activations: budget a few times a forward row.
    batch = max_batch_rows or max(1, rows_that_fit(model, adapter, seq_len) // 4)
    parts: dict[str, list[torch.Tensor]] = {c: [] for c in components}
    metric_base, metric_source = [], []
    for start in range(0, n_pairs, batch):
        rows = torch.arange(start, min(start + batch, n_pairs))
        source = run_with_cache(model, adapter, source_ids[rows.to(device)], components)
        metric_source.append(measure(adapter, metric, answers, source.final_resid, rows).detach().cpu())
        # The activations stay in the graph; the residual entering layer 0 becomes a leaf that needs a
        # gradient, so the graph exists even when the weights are frozen (nothing upstream is scored).
        with torch.enable_grad(), capture(adapter, components, keep=lambda t: t,
                                          first_input=lambda h: h.detach().requires_grad_(True)) as run:
            model.base_model(input_ids=base_ids[rows.to(device)], use_cache=False)
            value = measure(adapter, metric, answers, run.final, rows)
            wanted = [(c, layer) for c in components for layer in range(adapter.n_layers)]
            grads = torch.autograd.grad(value.sum(), [run.acts[c][layer] for c, layer in wanted], allow_unused=True)
        metric_base.append(value.detach().cpu())
        for component in components:
            per_layer = []
            for layer in range(adapter.n_layers):
                grad = grads[wanted.index((component, layer))]
                live = run.acts[component][layer].detach()
                delta = source.acts[component][:, layer] - live
                if grad is None:  # the component cannot reach the metric (e.g. past the final position)
                    grad = torch.zeros_like(live)
                product = grad * delta
                product = product.to(torch.promote_types(product.dtype, torch.float32))
                if component == "head":
                    product = product.reshape(*product.shape[:-1], adapter.n_heads, -1)
                per_layer.append(product.sum(-1))
            parts[component].append(torch.stack(per_layer, dim=1).cpu())
    scores = {c: torch.cat(parts[c]) for c in components}
    base_metric, source_metric = torch.cat(metric_base), torch.cat(metric_source)
    clean, corrupted = (source_metric, base_metric) if direction == "denoise" else (base_metric, source_metric)
    return AttributionResult(direction=direction, metric=metric, metric_clean=clean, metric_corrupted=corrupted,
                             scores=scores)
