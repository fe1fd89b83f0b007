"""Attribution patching: a first-order estimate of every patch at once (Nanda 2023; Syed et al. 2023).

Patching activation a from its base value to its source value changes the metric by about
    (a_source - a_base) . d metric / d a  |_base
so one forward pass on the source input (its activations), one forward pass on the base input with
gradients on, and one backward pass score every head, MLP, attention output and residual at every
layer and position. It is an estimate: rank with it, then verify the strongest exactly (the circuit
step does, and reports how well the two agree). `interpolated_metric` is the exact metric of a patch
scaled by alpha, whose slope at alpha -> 0 the estimate must equal.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .metrics import Answers, DirectedMetrics, normalised_effect
from .patching import DIRECTIONS, rows_that_fit, run_with_cache
from .circuits import check_metric, measure

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")


@dataclass
class AttributionResult(DirectedMetrics):
    scores: dict[str, torch.Tensor]  # component -> [P, L, T] ([P, L, T, H] for heads): estimated patched - base

    def effects(self, component: str) -> torch.Tensor:
        """Estimated normalised effects, the shape of scores[component]: (estimate) / (source - base)."""
        score = self.scores[component]
        shape = (-1,) + (1,) * (score.ndim - 1)
        base = self.metric_base.reshape(shape)
        return normalised_effect(base + score, base, self.metric_source.reshape(shape))


def _hooks(adapter: Adapter, components, store: dict, replace_first_input: bool):
    """Hooks recording each component's activation at every layer into store[component][layer]."""
    handles = []

    def keep(component, layer, tensor):
        store[component][layer] = tensor

    def first_input(module, args, kwargs):
        # Make the residual entering layer 0 a leaf that needs a gradient, so the graph exists even
        # when the weights are frozen; nothing upstream of it is scored.
        hidden = (args[0] if args else kwargs["hidden_states"]).detach().requires_grad_(True)
        keep("resid_pre", 0, hidden)
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    for layer in range(adapter.n_layers):
        if layer == 0 and replace_first_input:
            handles.append(adapter.layers[0].register_forward_pre_hook(first_input, with_kwargs=True))
        elif "resid_pre" in components:
            handles.append(adapter.layers[layer].register_forward_pre_hook(
                lambda m, a, k, layer=layer: keep("resid_pre", layer, a[0] if a else k["hidden_states"]),
                with_kwargs=True))
        if "attn_out" in components:
            handles.append(adapter.attn[layer].register_forward_hook(
                lambda m, a, o, layer=layer: keep("attn_out", layer, o[0] if isinstance(o, tuple) else o)))
        if "mlp_out" in components:
            handles.append(adapter.mlp[layer].register_forward_hook(
                lambda m, a, o, layer=layer: keep("mlp_out", layer, o[0] if isinstance(o, tuple) else o)))
        if "head" in components:
            handles.append(adapter.out_proj[layer].register_forward_pre_hook(
                lambda m, a, layer=layer: keep("head", layer, a[0])))
    return handles


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
        store = {c: [None] * adapter.n_layers for c in set(components) | {"resid_pre"}}
        final = {}
        handles = _hooks(adapter, components, store, replace_first_input=True)
        handles.append(adapter.layers[-1].register_forward_hook(
            lambda m, a, o: final.__setitem__("resid", (o[0] if isinstance(o, tuple) else o)[:, -1])))
        try:
            with torch.enable_grad():
                model.base_model(input_ids=base_ids[rows.to(device)], use_cache=False)
                value = measure(adapter, metric, answers, final["resid"], rows)
                wanted = [(c, layer) for c in components for layer in range(adapter.n_layers)]
                grads = torch.autograd.grad(value.sum(), [store[c][layer] for c, layer in wanted], allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        metric_base.append(value.detach().cpu())
        for component in components:
            per_layer = []
            for layer in range(adapter.n_layers):
                grad = grads[wanted.index((component, layer))]
                live = store[component][layer].detach()
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


@torch.no_grad()
def interpolated_metric(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                        component: str, layer: int, position: int, head: int | None, alpha: float,
                        metric: str = "logit_diff") -> torch.Tensor:
    """The exact metric [P] of the base run with one activation moved a fraction alpha toward its source
    value: a = a_base + alpha (a_source - a_base). Its slope at alpha = 0 is what attribution estimates."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    base_ids, source_ids = base_ids.to(device), source_ids.to(device)
    source = run_with_cache(model, adapter, source_ids, (component,))
    target = source.acts[component][:, layer, position]
    cols = slice(None) if component != "head" else slice(head * adapter.d_head, (head + 1) * adapter.d_head)

    def move(x):
        x = x.clone()
        x[:, position, cols] += alpha * (target[:, cols] - x[:, position, cols])
        return x

    if component == "resid_pre":
        def pre(m, args, kwargs):
            if args:
                return (move(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": move(kwargs["hidden_states"])}
        handle = adapter.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    elif component == "head":
        handle = adapter.out_proj[layer].register_forward_pre_hook(lambda m, a: (move(a[0]),) + tuple(a[1:]))
    else:
        module = adapter.hook_module(component, layer)
        handle = module.register_forward_hook(
            lambda m, a, o: (move(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else move(o))
    final = {}
    last = adapter.layers[-1].register_forward_hook(
        lambda m, a, o: final.__setitem__("resid", (o[0] if isinstance(o, tuple) else o)[:, -1]))
    try:
        model.base_model(input_ids=base_ids, use_cache=False)
    finally:
        handle.remove()
        last.remove()
    return measure(adapter, metric, answers, final["resid"], torch.arange(base_ids.shape[0])).cpu()
