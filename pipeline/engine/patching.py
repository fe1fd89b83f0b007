"""Exact activation patching, packed: many patch variants per forward pass.

Each batch row is one (pair, variant); a variant is (component, layer, head, position). The three
ideas that make it fast, each exact:

1. Packing: all rows of a batch are patched by one vectorised `torch.where` per hook point, so there
   is no Python loop, hook registration or device sync per patch.
2. Layer skip: a patch at layer l leaves layers < l unchanged, so a row starts from the base run's
   cached residual entering layer l and only layers l..L-1 are computed.
3. Answer-only unembedding: the metric needs the final position and a few answer tokens, so only
   those rows of the unembedding are multiplied.

`reference_sweep` is the plain method (one full forward and one hook per patch) that the packed
sweep must match to float tolerance.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .metrics import METRICS, Answers, DirectedMetrics, answer_metric, kl_to_source, normalised_effect

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")
DIRECTIONS = ("denoise", "noise")
ALL = -1  # head or position: the variant covers all heads / all positions


@dataclass
class Variants:
    """Patch variants as parallel int64 tensors (CPU); component indexes COMPONENTS."""

    component: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    position: torch.Tensor

    def __len__(self) -> int:
        return len(self.component)

    def select(self, idx: torch.Tensor) -> "Variants":
        return Variants(self.component[idx], self.layer[idx], self.head[idx], self.position[idx])

    @staticmethod
    def concat(parts: list["Variants"]) -> "Variants":
        return Variants(*(torch.cat([getattr(p, f) for p in parts]) for f in ("component", "layer", "head", "position")))

    def names(self) -> list[str]:
        return [COMPONENTS[c] for c in self.component.tolist()]


def variants_for(
    adapter: Adapter,
    component: str,
    seq_len: int,
    per_position: bool = True,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
) -> Variants:
    """Every (layer[, head][, position]) variant of one component, layer-major."""
    if component not in COMPONENTS:
        raise ValueError(f"unknown component {component!r}; choose from {list(COMPONENTS)}")
    layers = list(range(adapter.n_layers)) if layers is None else layers
    for layer in layers:
        if not 0 <= layer < adapter.n_layers:
            raise ValueError(f"layer {layer} out of range: the model has layers 0..{adapter.n_layers - 1}")
    if component == "head":
        heads = list(range(adapter.n_heads)) if heads is None else heads
        for head in heads:
            if not 0 <= head < adapter.n_heads:
                raise ValueError(f"head {head} out of range: the model has heads 0..{adapter.n_heads - 1}")
    else:
        heads = [ALL]
    positions = list(range(seq_len)) if per_position else [ALL]
    grid = torch.cartesian_prod(torch.tensor(layers), torch.tensor(heads), torch.tensor(positions)).reshape(-1, 3)
    code = torch.full((len(grid),), COMPONENTS.index(component), dtype=torch.long)
    return Variants(code, grid[:, 0].long(), grid[:, 1].long(), grid[:, 2].long())


@dataclass
class RunCache:
    """What one forward pass over a set of pairs leaves behind for patching."""

    acts: dict[str, torch.Tensor]  # component -> [P, L, T, width]; resid_pre always present
    final_resid: torch.Tensor  # [P, d]: the final position's residual after the last layer
    layer_inputs: list[tuple[tuple, dict]]  # per layer: the extra args and kwargs the model passes it
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: keys, values [P, kv_heads, T, d_head]


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _hidden_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


_CACHE = object()  # stands for "this row batch's KV cache" in recorded layer inputs


@torch.no_grad()
def record_layer_inputs(model: nn.Module, adapter: Adapter, ids: torch.Tensor, cache=None) -> list[tuple[tuple, dict]]:
    """The extra arguments the model passes each decoder layer (rotary embeddings, causal masks,
    per-layer attention types) for one row of this length, so layers can be replayed on any batch.
    With a prefix `cache`, they are those of a suffix attending to the cached prefix."""
    recorded: list[tuple[tuple, dict]] = [((), {})] * adapter.n_layers
    swap = lambda v: _CACHE if cache is not None and v is cache else v  # noqa: E731

    def record(args, kwargs, layer):
        kwargs = {k: swap(v) for k, v in kwargs.items() if k != "hidden_states"}
        recorded[layer] = (tuple(swap(a) for a in args[1:]), kwargs)

    handles = [adapter.layers[layer].register_forward_pre_hook(
        lambda m, a, k, layer=layer: record(a, k, layer), with_kwargs=True) for layer in range(adapter.n_layers)]
    try:
        model.base_model(input_ids=ids, cache=cache, use_cache=cache is not None)
    finally:
        for h in handles:
            h.remove()
    return recorded


def bind_cache(layer_inputs, cache):
    swap = lambda v: cache if v is _CACHE else v  # noqa: E731
    return [(tuple(swap(a) for a in args), {k: swap(v) for k, v in kwargs.items()}) for args, kwargs in layer_inputs]


def prefix_cache(model: nn.Module, kv, rows: torch.Tensor, prefix_len: int, first_layer: int = 0):
    """A KV cache holding the base run's keys/values of positions < prefix_len, for layers >= first_layer."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(first_layer, len(kv)):
        keys, values = kv[layer]
        cache.layers[layer].update(keys[rows, :, :prefix_len], values[rows, :, :prefix_len])
    return cache


@torch.no_grad()
def run_with_cache(
    model: nn.Module, adapter: Adapter, ids: torch.Tensor, components=("resid_pre",), keep_kv: bool = False
) -> RunCache:
    """Forward `ids` [P, T] through the model body, caching `components` at every layer (and the
    keys/values, when `keep_kv`, so that patched rows can reuse the unchanged prefix)."""
    wanted = set(components) | {"resid_pre"}
    per_layer: dict[str, list[torch.Tensor | None]] = {c: [None] * adapter.n_layers for c in wanted}
    handles, final = [], {}

    def store(component, layer, tensor):
        per_layer[component][layer] = tensor.detach()

    for layer in range(adapter.n_layers):
        handles.append(adapter.layers[layer].register_forward_pre_hook(
            lambda m, a, k, layer=layer: store("resid_pre", layer, _hidden_arg(a, k)), with_kwargs=True))
        if "attn_out" in wanted:
            handles.append(adapter.attn[layer].register_forward_hook(
                lambda m, a, o, layer=layer: store("attn_out", layer, _first(o))))
        if "mlp_out" in wanted:
            handles.append(adapter.mlp[layer].register_forward_hook(
                lambda m, a, o, layer=layer: store("mlp_out", layer, _first(o))))
        if "head" in wanted:
            handles.append(adapter.out_proj[layer].register_forward_pre_hook(
                lambda m, a, layer=layer: store("head", layer, a[0])))
    handles.append(adapter.layers[-1].register_forward_hook(
        lambda m, a, o: final.__setitem__("resid", _first(o)[:, -1])))
    try:
        out = model.base_model(input_ids=ids, use_cache=keep_kv)
    finally:
        for h in handles:
            h.remove()
    kv = None
    if keep_kv:
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        # Sliding-window caches keep only the last window of positions: no full prefix to reuse.
        if any(k is None or k.shape[-2] != ids.shape[1] for k, _ in kv):
            kv = None
    acts = {c: torch.stack(per_layer[c], dim=1) for c in wanted}
    return RunCache(acts=acts, final_resid=final["resid"], layer_inputs=record_layer_inputs(model, adapter, ids[:1]), kv=kv)


def run_layers(adapter: Adapter, resid: torch.Tensor, start: int, layer_inputs) -> torch.Tensor:
    """Run decoder layers start..L-1 on residuals [R, T, d]; returns the final position's residual [R, d].

    Only the final position's output is read, so the last layer's attention output projection and MLP
    see that position alone (the residual add broadcasts it back); its keys and values still cover
    every position the final query attends to.
    """
    last = adapter.n_layers - 1
    handles = []
    if start <= last and resid.shape[1] > 1:
        handles = [adapter.out_proj[last].register_forward_pre_hook(_final_position_only),
                   adapter.mlp[last].register_forward_pre_hook(_final_position_only)]
    try:
        for layer in range(start, adapter.n_layers):
            args, kwargs = layer_inputs[layer]
            resid = _first(adapter.layers[layer](resid, *args, **kwargs))
    finally:
        for h in handles:
            h.remove()
    return resid[:, -1]


def _final_position_only(module, args):
    return (args[0][:, -1:],) + tuple(args[1:])


def _position_mask(position: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[R] positions (ALL = every position) -> [R, T] bool."""
    return (position[:, None] == ALL) | (position[:, None] == torch.arange(seq_len))


def _replace_output(mask: torch.Tensor, source: torch.Tensor):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (torch.where(mask, source, output[0]),) + output[1:]
        return torch.where(mask, source, output)

    return hook


def _replace_heads(mask: torch.Tensor, source: torch.Tensor, n_heads: int):
    """Pre-hook on the attention output projection: its input is the heads' outputs side by side."""

    def hook(module, args):
        z = args[0]
        shape = z.shape
        z = z.reshape(*shape[:-1], n_heads, -1)
        patched = torch.where(mask, source.reshape(z.shape), z)
        return (patched.reshape(shape),) + tuple(args[1:])

    return hook


_SUFFIX_INPUTS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _suffix_memo(model: nn.Module, seq_len: int) -> dict[int, list]:
    """Per model, sequence length, device and dtype: prefix length -> recorded suffix layer inputs. They depend on
    positions only (rotary angles, causal masks), never on token values, so sweeps share them."""
    weight = next(model.parameters())
    return _SUFFIX_INPUTS.setdefault(model, {}).setdefault((seq_len, weight.device, weight.dtype), {})


def _is_local(variants: Variants) -> torch.Tensor:
    """Single-position patches of a layer's attention, heads or MLP: they change one position of one layer."""
    return (variants.component != COMPONENTS.index("resid_pre")) & (variants.position != ALL)


def _layer_inputs(model, adapter, base: RunCache, rows, first: int, first_layer: int, suffix_inputs):
    """Layer inputs for rows computing positions >= first, attending to the base run's cached prefix."""
    if first == 0:
        return base.layer_inputs
    if first not in suffix_inputs:
        one_row = prefix_cache(model, base.kv, torch.tensor([0]), first)
        suffix_inputs[first] = record_layer_inputs(model, adapter, _suffix_ids(base, first), one_row)
    return bind_cache(suffix_inputs[first], prefix_cache(model, base.kv, rows, first, first_layer))


@torch.no_grad()
def patched_final_resid(
    model: nn.Module,
    adapter: Adapter,
    base: RunCache,
    source: RunCache,
    layer: int,
    pair_idx: torch.Tensor,
    variants: Variants,
    suffix_inputs: dict[int, list] | None = None,
    first: int | None = None,
) -> torch.Tensor:
    """Final residuals [R, d] of base rows `pair_idx` with `variants` (all at `layer`) patched from source.

    Causal attention: a patch at position p leaves positions < p unchanged at every layer, so when the
    base run's keys/values are cached, only positions >= the earliest patched position are computed,
    attending to the cached prefix. `suffix_inputs` memoises the layer inputs per prefix length. `first`
    overrides that earliest position when the caller knows more: a whole-sequence patch changes nothing
    before the position where its pair's two prompts first differ.
    """
    device = base.final_resid.device
    seq_len = base.acts["resid_pre"].shape[2]
    rows = pair_idx.to(device)
    if bool(_is_local(variants).all()) and "head" in base.acts:
        return _patched_final_resid_local(model, adapter, base, source, layer, rows, variants, suffix_inputs)
    if base.kv is None or suffix_inputs is None:
        first = 0
    elif first is None:
        first = max(int(variants.position.min()), 0)
    layer_inputs = _layer_inputs(model, adapter, base, rows, first, layer, suffix_inputs)
    pos_mask = _position_mask(variants.position, seq_len)[:, first:]  # [R, T - first], built on CPU
    resid = base.acts["resid_pre"][rows, layer, first:]
    handles = []
    try:
        for code, component in enumerate(COMPONENTS):
            is_component = variants.component == code
            if not bool(is_component.any()):
                continue
            mask = pos_mask & is_component[:, None]
            src = source.acts[component][rows, layer, first:]
            if component == "resid_pre":
                resid = torch.where(mask[..., None].to(device), src, resid)
            elif component == "head":
                mask = (mask[:, :, None] & _head_mask(variants, adapter.n_heads)[:, None, :])[..., None].to(device)
                handles.append(adapter.out_proj[layer].register_forward_pre_hook(
                    _replace_heads(mask, src, adapter.n_heads)))
            else:
                module = adapter.hook_module(component, layer)
                handles.append(module.register_forward_hook(_replace_output(mask[..., None].to(device), src)))
        return run_layers(adapter, resid, layer, layer_inputs)
    finally:
        for h in handles:
            h.remove()


def _head_mask(variants: Variants, n_heads: int) -> torch.Tensor:
    return (variants.head[:, None] == ALL) | (variants.head[:, None] == torch.arange(n_heads))  # [R, H]


def _patched_final_resid_local(model, adapter, base, source, layer, rows, variants, suffix_inputs):
    """Single-position attention / head / MLP patches at (layer, p).

    At `layer` only position p changes: later positions attend to p's keys and values, which come from
    the unchanged resid_pre. So the layer runs on that one token with its attention output set outright
    (the heads' outputs from the caches, one head or the whole output from the source), and the rest of
    the model starts at layer + 1 from the base residual with position p replaced.
    """
    device = rows.device
    seq_len = base.acts["resid_pre"].shape[2]
    position = variants.position.to(device)
    at_p = lambda run, component: run.acts[component][rows, layer, position][:, None]  # noqa: E731  [R, 1, width]
    code = {c: (variants.component == COMPONENTS.index(c)).to(device)[:, None, None] for c in COMPONENTS}
    head_mask = _head_mask(variants, adapter.n_heads)[:, None, :, None].to(device) & code["head"][..., None]
    z = at_p(base, "head")
    if bool(code["head"].any()):
        z = _replace_heads(head_mask, at_p(source, "head"), adapter.n_heads)(None, (z,))[0]
    handles = [adapter.out_proj[layer].register_forward_pre_hook(lambda m, args: (z,) + tuple(args[1:]))]
    for component in ("attn_out", "mlp_out"):
        if bool(code[component].any()):
            module = adapter.hook_module(component, layer)
            handles.append(module.register_forward_hook(_replace_output(code[component], at_p(source, component))))
    try:
        args, kwargs = _one_token_inputs(model, adapter)
        new = _first(adapter.layers[layer](at_p(base, "resid_pre"), *args, **kwargs))[:, 0]  # [R, d]
    finally:
        for h in handles:
            h.remove()
    if layer == adapter.n_layers - 1:
        return torch.where((position == seq_len - 1)[:, None], new, base.final_resid[rows])
    first = int(variants.position.min()) if base.kv is not None and suffix_inputs is not None else 0
    resid = base.acts["resid_pre"][rows, layer + 1, first:].clone()
    resid[torch.arange(len(rows), device=device), position - first] = new
    layer_inputs = _layer_inputs(model, adapter, base, rows, first, layer + 1, suffix_inputs)
    return run_layers(adapter, resid, layer + 1, layer_inputs)


def _one_token_inputs(model, adapter):
    """Layer inputs for a one-token sequence (its attention output is always set outright by the caller)."""
    memo = _suffix_memo(model, 1)
    if "layer" not in memo:
        weight = next(model.parameters())
        memo["layer"] = record_layer_inputs(model, adapter, torch.zeros(1, 1, dtype=torch.long, device=weight.device))[0]
    return memo["layer"]


def _suffix_ids(base: RunCache, first: int) -> torch.Tensor:
    """Token ids are only needed for their shape when recording suffix layer inputs."""
    seq_len = base.acts["resid_pre"].shape[2]
    return torch.zeros(1, seq_len - first, dtype=torch.long, device=base.final_resid.device)


def rows_that_fit(model: nn.Module, adapter: Adapter, seq_len: int, budget_fraction: float | None = None) -> int:
    """How many patch rows one forward can hold, from the memory free on the model's device."""
    device = next(model.parameters()).device
    elem = next(model.parameters()).element_size()
    mlp_width = getattr(model.config, "intermediate_size", None) or 4 * adapter.d_model
    # One layer's live activations per row: residuals, gathered sources, q/k/v, the attention scores, MLP.
    per_row = elem * seq_len * (12 * adapter.d_model + 3 * mlp_width + 2 * adapter.n_heads * seq_len)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
        budget_fraction = budget_fraction or 0.6
    else:
        import psutil

        free = psutil.virtual_memory().available
        budget_fraction = budget_fraction or 0.1  # shared machines: take a modest slice of host memory
    return int(max(1, min(8192, free * budget_fraction // per_row)))


@dataclass
class SweepResult(DirectedMetrics):
    variants: Variants
    metric_patched: torch.Tensor  # [P, V]

    def effects(self) -> torch.Tensor:
        return normalised_effect(self.metric_patched, self.metric_base[:, None], self.metric_source[:, None])

    def to_columns(self, pair_ids) -> dict[str, np.ndarray]:
        """Long format, one row per (pair, variant): the columns of effects.arrow."""
        n_pairs, n_variants = self.metric_patched.shape
        pair_ids = np.asarray(pair_ids)
        tile = lambda t: np.tile(t.numpy(), n_pairs)  # noqa: E731
        rep = lambda t: np.repeat(t.float().cpu().numpy(), n_variants)  # noqa: E731
        return {
            "pair_id": np.repeat(pair_ids, n_variants),
            "direction": np.full(n_pairs * n_variants, self.direction),
            "component": np.array(COMPONENTS)[tile(self.variants.component)],
            "layer": tile(self.variants.layer).astype(np.int32),
            "head": tile(self.variants.head).astype(np.int32),
            "position": tile(self.variants.position).astype(np.int32),
            "metric_clean": rep(self.metric_clean),
            "metric_corrupted": rep(self.metric_corrupted),
            "metric_patched": self.metric_patched.float().cpu().numpy().reshape(-1),
            "effect": self.effects().float().cpu().numpy().reshape(-1),
        }


def _check_inputs(clean_ids, corrupted_ids, answers: Answers, direction: str, metric: str, align_end: bool = False):
    if direction not in DIRECTIONS:
        raise ValueError(f"unknown direction {direction!r}; choose from {list(DIRECTIONS)}")
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {list(METRICS)}")
    if clean_ids.shape[0] != corrupted_ids.shape[0] or (clean_ids.shape != corrupted_ids.shape and not align_end):
        raise ValueError(
            f"clean {tuple(clean_ids.shape)} and corrupted {tuple(corrupted_ids.shape)} token ids differ in shape; "
            "pairs must have equal token counts (or align them from the end: prompts.align=end)"
        )
    if answers.refusal.shape[0] != clean_ids.shape[0]:
        raise ValueError(f"{answers.refusal.shape[0]} answer rows for {clean_ids.shape[0]} pairs")


class _Metric:
    """metric(final residuals of rows) for one sweep: answer-token metrics, or KL to the source run."""

    def __init__(self, name: str, adapter: Adapter, answers: Answers, source: RunCache):
        self.name, self.adapter, self.answers = name, adapter, answers
        if name == "kl":
            self.source_logits = adapter.logits(source.final_resid)

    def __call__(self, final_resid: torch.Tensor, pair_idx: torch.Tensor) -> torch.Tensor:
        rows = pair_idx.to(final_resid.device)
        if self.name == "kl":
            return kl_to_source(self.source_logits[rows], self.adapter.logits(final_resid))
        answers = self.answers.index(pair_idx)
        token_ids = answers.token_ids().to(final_resid.device)
        answers = Answers(answers.refusal.to(final_resid.device), answers.compliance.to(final_resid.device))
        return answer_metric(self.name, self.adapter.logits(final_resid, token_ids), answers).float()


@torch.no_grad()
def sweep(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    answers: Answers,
    variants: Variants,
    direction: str = "denoise",
    metric: str = "logit_diff",
    max_batch_rows: int | None = None,
    reuse_prefix: bool = True,
    batch_tokens: int | None = None,
    align_end: bool = False,
) -> SweepResult:
    """Patch every variant into every pair, packed; exact (equal to `reference_sweep` to float tolerance).

    With `align_end`, clean and corrupted prompts may differ in length: they are aligned from the end
    (clean position p pairs with corrupted position p - offset, offset = clean length - corrupted length),
    variant positions are clean positions, and a patch at a position without a counterpart changes nothing.
    """
    _check_inputs(clean_ids, corrupted_ids, answers, direction, metric, align_end)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    clean_ids, corrupted_ids = clean_ids.to(device), corrupted_ids.to(device)
    components = {COMPONENTS[c] for c in variants.component.unique().tolist()}
    base_ids, source_ids = (corrupted_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupted_ids)
    local = _is_local(variants)
    offset = clean_ids.shape[1] - corrupted_ids.shape[1]
    base_components = components | ({"head"} if bool(local.any()) else set()) | (components if offset else set())
    base = run_with_cache(model, adapter, base_ids, base_components, keep_kv=reuse_prefix)
    source = run_with_cache(model, adapter, source_ids, components)
    clean, corrupted = (source, base) if direction == "denoise" else (base, source)
    measure = _Metric(metric, adapter, answers, source)
    all_pairs = torch.arange(clean_ids.shape[0])
    n_pairs, seq_len = base_ids.shape
    reported = variants
    if offset:  # work in the base run's positions, with the source's activations aligned to them
        shift = source_ids.shape[1] - seq_len  # base position q <-> source position q + shift
        base_shift = offset if direction == "denoise" else 0  # clean position p -> base position p - base_shift
        position = variants.position - base_shift
        unmatched = (variants.position != ALL) & ((position < max(0, -shift)) | (position >= min(seq_len, source_ids.shape[1] - shift)))
        position = torch.where(variants.position == ALL, ALL, torch.where(unmatched, 0, position))
        variants = Variants(variants.component, variants.layer, variants.head, position)
        source = _aligned_to_base(source, base, shift)
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)

    metric_clean, metric_corrupted = measure(clean.final_resid, all_pairs), measure(corrupted.final_resid, all_pairs)
    metric_base = metric_corrupted if direction == "denoise" else metric_clean

    # Rows are (variant, pair), by layer, whole-layer kinds before local ones, then by the first position
    # they change: a batch then shares one layer (layer skip) and a narrow range of positions (prefix
    # reuse). A batch computes positions from its earliest changed one, so batches are cut at about
    # `batch_tokens` computed tokens: big enough to keep the matrix units busy, small enough that few
    # positions are recomputed.
    # Before the first position where a pair's clean and corrupted tokens differ, every activation is
    # the same in both runs (causal attention), so a patch there changes nothing: such rows take the
    # base metric without a forward pass, and a whole-sequence patch need only be computed from there.
    # Chat templates put a long shared prefix first.
    token_budget = batch_tokens or (32768 if device.type == "cuda" else 2048)
    first_difference = _first_difference(clean_ids, corrupted_ids).cpu() if not offset else torch.zeros(n_pairs, dtype=torch.long)
    patched = metric_base[:, None].repeat(1, len(variants))
    suffix_inputs = _suffix_memo(model, seq_len) if reuse_prefix else None
    for layer in variants.layer.unique().tolist():
        at_layer = (variants.layer == layer).nonzero().squeeze(1)
        variant_rows = at_layer.repeat_interleave(n_pairs)
        pair_rows = all_pairs.repeat(len(at_layer))
        position, differ_from = variants.position[variant_rows], first_difference[pair_rows]
        # the first position a row changes: its patched position, or for a whole-sequence patch its pair's
        # first differing token (before it the patch writes the values already there)
        begin = torch.where(position == ALL, differ_from, position)
        changes = torch.where(position == ALL, differ_from < seq_len, position >= differ_from)
        if offset:  # positions with no counterpart in the other run change nothing
            changes &= ~unmatched[variant_rows]
        variant_rows, pair_rows, begin = variant_rows[changes], pair_rows[changes], begin[changes]
        order = torch.argsort(local[variant_rows].long() * (seq_len + 1) + begin, stable=True)
        variant_rows, pair_rows, begin = variant_rows[order], pair_rows[order], begin[order]
        n_rows, start = len(variant_rows), 0
        local_from = int((~local[variant_rows]).sum())
        while start < n_rows:
            computed = seq_len - int(begin[start]) if reuse_prefix else seq_len
            stop = min(n_rows, start + min(batch_rows, max(1, token_budget // computed)))
            if start < local_from:
                stop = min(stop, local_from)
            pair_idx, variant_idx = pair_rows[start:stop], variant_rows[start:stop]
            final = patched_final_resid(model, adapter, base, source, layer, pair_idx, variants.select(variant_idx),
                                        suffix_inputs, first=int(begin[start]))
            patched[pair_idx.to(device), variant_idx.to(device)] = measure(final, pair_idx)
            start = stop
    return SweepResult(
        direction=direction,
        metric=metric,
        variants=reported,
        metric_clean=metric_clean.cpu(),
        metric_corrupted=metric_corrupted.cpu(),
        metric_patched=patched.cpu(),
    )


def _aligned_to_base(source: RunCache, base: RunCache, shift: int) -> RunCache:
    """The source's activations re-indexed to base positions q <- q + shift; where the source has no
    counterpart, the base's own activations (so that patching there changes nothing)."""
    base_len, source_len = base.acts["resid_pre"].shape[2], source.acts["resid_pre"].shape[2]
    lo, hi = max(0, -shift), min(base_len, source_len - shift)
    acts = {}
    for component, tensor in source.acts.items():
        aligned = base.acts[component].clone()
        aligned[:, :, lo:hi] = tensor[:, :, lo + shift : hi + shift]
        acts[component] = aligned
    return RunCache(acts=acts, final_resid=source.final_resid, layer_inputs=source.layer_inputs)


def _first_difference(clean_ids: torch.Tensor, corrupted_ids: torch.Tensor) -> torch.Tensor:
    """[P]: each pair's first position whose tokens differ (the sequence length when none does)."""
    differs = clean_ids != corrupted_ids
    seq_len = clean_ids.shape[1]
    return torch.where(differs.any(1), differs.int().argmax(1), torch.full_like(differs[:, 0], seq_len, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# The reference: one full forward pass with one hook per patch, as the classic experiment does it.


def _final_logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits[:, -1].float()


def _reference_metric(metric, logits, source_logits, answers: Answers):
    if metric == "kl":
        return kl_to_source(source_logits, logits)
    return answer_metric(metric, logits.gather(1, answers.token_ids().clamp(min=0)), answers)


@torch.no_grad()
def reference_sweep(
    model: nn.Module,
    clean_ids: torch.Tensor,
    corrupted_ids: torch.Tensor,
    answers: Answers,
    variants: Variants,
    direction: str = "denoise",
    metric: str = "logit_diff",
    align_end: bool = False,
) -> SweepResult:
    _check_inputs(clean_ids, corrupted_ids, answers, direction, metric, align_end)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_pairs = clean_ids.shape[0]
    offset = clean_ids.shape[1] - corrupted_ids.shape[1]  # clean position p <-> corrupted position p - offset
    base_shift, source_shift = (offset, 0) if direction == "denoise" else (0, offset)
    patched = torch.empty(n_pairs, len(variants))
    metric_clean, metric_corrupted = torch.empty(n_pairs), torch.empty(n_pairs)
    for p in range(n_pairs):
        clean, corrupted = clean_ids[p : p + 1].to(device), corrupted_ids[p : p + 1].to(device)
        base_ids, source_ids = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
        answer = answers.index(torch.tensor([p]))
        answer = Answers(answer.refusal.to(device), answer.compliance.to(device))
        source_acts = _capture_all(model, adapter, source_ids)
        source_logits = _final_logits(model, source_ids)
        metric_clean[p] = _reference_metric(metric, _final_logits(model, clean), source_logits, answer)[0]
        metric_corrupted[p] = _reference_metric(metric, _final_logits(model, corrupted), source_logits, answer)[0]
        for v in range(len(variants)):
            component = COMPONENTS[int(variants.component[v])]
            layer, head, position = int(variants.layer[v]), int(variants.head[v]), int(variants.position[v])
            source = source_acts[component][layer]
            base_slice, source_slice = _aligned_slices(position, base_shift, source_shift,
                                                       base_ids.shape[1], source_ids.shape[1])
            handle = _reference_hook(adapter, component, layer, head, base_slice, source_slice, source)
            try:
                logits = _final_logits(model, base_ids)
            finally:
                handle.remove()
            patched[p, v] = _reference_metric(metric, logits, source_logits, answer)[0]
    return SweepResult(direction=direction, metric=metric, metric_clean=metric_clean, metric_corrupted=metric_corrupted,
                       variants=variants, metric_patched=patched)


def _capture_all(model, adapter: Adapter, ids) -> dict[str, list[torch.Tensor]]:
    acts = {c: [None] * adapter.n_layers for c in COMPONENTS}
    handles = []
    for layer in range(adapter.n_layers):
        def keep(component, layer, tensor):
            acts[component][layer] = tensor.clone()

        handles += [
            adapter.layers[layer].register_forward_pre_hook(
                lambda m, a, k, layer=layer: keep("resid_pre", layer, _hidden_arg(a, k)), with_kwargs=True),
            adapter.attn[layer].register_forward_hook(lambda m, a, o, layer=layer: keep("attn_out", layer, _first(o))),
            adapter.mlp[layer].register_forward_hook(lambda m, a, o, layer=layer: keep("mlp_out", layer, _first(o))),
            adapter.out_proj[layer].register_forward_pre_hook(lambda m, a, layer=layer: keep("head", layer, a[0])),
        ]
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acts


def _aligned_slices(position, base_shift, source_shift, base_len, source_len) -> tuple[slice, slice]:
    """Base and source positions of one patch (a clean position, or ALL aligned from the end); empty
    slices when the position has no counterpart in one of the runs."""
    if position == ALL:
        n = min(base_len, source_len)
        return slice(base_len - n, base_len), slice(source_len - n, source_len)
    qb, qs = position - base_shift, position - source_shift
    if not (0 <= qb < base_len and 0 <= qs < source_len):
        return slice(0, 0), slice(0, 0)
    return slice(qb, qb + 1), slice(qs, qs + 1)


def _reference_hook(adapter: Adapter, component, layer, head, base_slice, source_slice, source):
    """One hook that overwrites one activation (at some positions, one head or all) with the source's."""

    def overwrite(tensor):
        tensor = tensor.clone()
        if component == "head":
            z = tensor.view(*tensor.shape[:-1], adapter.n_heads, adapter.d_head)
            src = source.view(*source.shape[:-1], adapter.n_heads, adapter.d_head)
            h = slice(None) if head == ALL else slice(head, head + 1)
            z[:, base_slice, h] = src[:, source_slice, h]
        else:
            tensor[:, base_slice] = source[:, source_slice]
        return tensor

    if component == "resid_pre":
        def pre(m, args, kwargs):
            if args:
                return (overwrite(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": overwrite(kwargs["hidden_states"])}

        return adapter.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    if component == "head":
        return adapter.out_proj[layer].register_forward_pre_hook(lambda m, args: (overwrite(args[0]),) + tuple(args[1:]))

    def post(m, args, output):
        if isinstance(output, tuple):
            return (overwrite(output[0]),) + tuple(output[1:])
        return overwrite(output)

    return adapter.hook_module(component, layer).register_forward_hook(post)
