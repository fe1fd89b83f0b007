"""Exact activation patching, packed: many patch variants per forward pass.

Each batch row is one (pair, variant); a variant is (component, layer, head, position). A position is
one token, every token (ALL), or one of the caller's position groups (`group_position(k)`): a set of
positions per pair, such as the harmful tokens of each pair, patched together. The ideas that make it
fast, each exact:

1. Packing: all rows of a batch are patched by one vectorised `torch.where` per hook point, so there
   is no Python loop, hook registration or device sync per patch.
2. Layer skip: a patch at layer l leaves layers < l unchanged, so a row starts from the base run's
   cached residual entering layer l and only layers l..L-1 are computed. Rows of every layer share a
   batch: a row joins it at its own layer, so each layer runs once for them all.
3. Prefix reuse: a patch changes nothing before its first patched position (nor before the pair's
   first differing token), so a row computes the positions from there on only, attending to the base
   run's cached keys and values; a batch holds rows that change from about the same position.
4. Answer-only unembedding: the metric needs the final position and a few answer tokens, so only
   those rows of the unembedding are multiplied.
5. Patches that replace the input (the residual stream at every position) take the source run's
   metric without a patch run.

`reference.reference_sweep` is the plain method (one full forward and one hook per patch) that the
packed sweep must match to float tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch
from torch import nn

from .adapters import Adapter, get_adapter
from .hooks import (
    COMPONENTS,
    PrefixReuse,
    Rows,
    RunCache,
    edit_activation,
    first_difference,
    installed,
    one_token_inputs,
    output_tensor,
    rows_that_fit,
    run_layers,
    run_layers_joining,
    run_with_cache,
    run_with_cache_after,
)
from .metrics import DIRECTIONS, METRICS, Answers, DirectedMetrics, kl_to_source, measure, normalised_effect

ALL = -1  # head or position: the variant covers all heads / all positions


def group_position(k: int) -> int:
    """The position code of position group k (the sweep's `position_groups[:, k]`): -2, -3, ..."""
    return -2 - k


def group_index(position: torch.Tensor) -> torch.Tensor:
    """Position codes -> the position group each one names (-1 where it names none)."""
    return torch.where(position <= -2, -2 - position, -1)


@dataclass
class Variants(Rows):
    """Patch variants as parallel int64 tensors (CPU); component indexes COMPONENTS."""

    component: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    position: torch.Tensor

    def names(self) -> list[str]:
        return [COMPONENTS[c] for c in self.component.tolist()]


def variants_for(
    adapter: Adapter,
    component: str,
    seq_len: int,
    per_position: bool = True,
    layers: list[int] | None = None,
    heads: list[int] | None = None,
    n_groups: int = 0,
) -> Variants:
    """Every (layer[, head][, position]) variant of one component, layer-major: every position on its own
    (`per_position`), all at once, or with `n_groups`, each of that many position groups."""
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
    if n_groups:
        positions = [group_position(k) for k in range(n_groups)]
    else:
        positions = list(range(seq_len)) if per_position else [ALL]
    grid = torch.cartesian_prod(torch.tensor(layers), torch.tensor(heads), torch.tensor(positions)).reshape(-1, 3)
    code = torch.full((len(grid),), COMPONENTS.index(component), dtype=torch.long)
    return Variants(code, grid[:, 0].long(), grid[:, 1].long(), grid[:, 2].long())


def _position_mask(position: torch.Tensor, seq_len: int, groups: torch.Tensor | None = None,
                   pair_idx: torch.Tensor | None = None) -> torch.Tensor:
    """[R] positions (ALL = every position, a group code = that group's positions in the row's pair
    `pair_idx`, from `groups` [P, K, T]) -> [R, T] bool."""
    mask = (position[:, None] == ALL) | (position[:, None] == torch.arange(seq_len))
    group = group_index(position)
    if groups is not None and bool((group >= 0).any()):
        in_group = groups[pair_idx.cpu(), group.clamp(min=0)]  # [R, T]
        mask |= in_group & (group >= 0)[:, None]
    return mask


def _where(mask: torch.Tensor, source: torch.Tensor):
    """An edit taking the source's values where mask (broadcast over the activation) is set."""
    return lambda live: torch.where(mask, source, live)


def _heads_where(mask: torch.Tensor, source: torch.Tensor, n_heads: int):
    """An edit of the attention output projection's input (the heads' outputs side by side [R, T, H * d_head]):
    heads where mask [R, T, H, 1] from source."""

    def edit(z):
        shape = z.shape
        z = z.reshape(*shape[:-1], n_heads, -1)
        return torch.where(mask, source.reshape(z.shape), z).reshape(shape)

    return edit


def _is_local(variants: Variants) -> torch.Tensor:
    """Single-position patches of a layer's attention, heads or MLP: they change one position of one layer."""
    return (variants.component != COMPONENTS.index("resid_pre")) & (variants.position >= 0)


@torch.no_grad()
def patched_final_resid(
    model: nn.Module,
    adapter: Adapter,
    base: RunCache,
    source: RunCache,
    layer: int,
    pair_idx: torch.Tensor,
    variants: Variants,
    prefix: PrefixReuse | None = None,
    first: int | None = None,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Final residuals [R, d] of base rows `pair_idx` with `variants` (all at `layer`) patched from source
    (a variant's position group: its positions in `groups` [P, K, T] for the row's pair).

    Causal attention: a patch at position p leaves positions < p unchanged at every layer, so with a
    `prefix` (reuse of the base run's cached keys/values; None computes every position) only positions
    >= the earliest patched position are computed. `first` overrides that earliest position when the
    caller knows more: a whole-sequence patch changes nothing before the position where its pair's two
    prompts first differ.
    """
    device = base.final_resid.device
    seq_len = base.acts["resid_pre"].shape[2]
    rows = pair_idx.to(device)
    prefix = prefix or PrefixReuse(model, adapter, base, enabled=False)
    if bool(_is_local(variants).all()) and "head" in base.acts:
        return _patched_final_resid_local(model, adapter, base, source, layer, rows, variants, prefix)
    first = prefix.start(max(int(variants.position.min()), 0) if first is None else first)
    layer_inputs = prefix.layer_inputs(rows, first, layer)
    pos_mask = _position_mask(variants.position, seq_len, groups, pair_idx)[:, first:]  # [R, T - first], on CPU
    resid = base.acts["resid_pre"][rows, layer, first:]
    handles = []
    with installed(handles):
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
                handles.append(edit_activation(adapter, "head", layer, _heads_where(mask, src, adapter.n_heads)))
            else:
                handles.append(edit_activation(adapter, component, layer, _where(mask[..., None].to(device), src)))
        return run_layers(adapter, resid, layer, layer_inputs)


@torch.no_grad()
def patched_final_resid_joining(
    model: nn.Module,
    adapter: Adapter,
    base: RunCache,
    source: RunCache,
    pair_idx: torch.Tensor,
    variants: Variants,
    prefix: PrefixReuse,
    first: int,
    groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """`patched_final_resid` of whole-layer patches at several layers in one batch, `variants` in layer
    order: each layer runs once on the rows patched at it or before (layer skip: a row joins at its layer
    from the base run's residual, patched there); positions first..T-1 only, attending to the base
    run's cached prefix (no row changes anything before `first`)."""
    device = base.final_resid.device
    seq_len = base.acts["resid_pre"].shape[2]
    rows = pair_idx.to(device)
    first = prefix.start(first)
    layer = variants.layer.tolist()
    joined = torch.searchsorted(variants.layer, torch.arange(adapter.n_layers), right=True).tolist()  # per layer
    start = layer[0]
    layer_inputs = prefix.layer_inputs_joining(rows, joined, first, start)
    pos_mask = _position_mask(variants.position, seq_len, groups, pair_idx)[:, first:]  # [R, T - first], on CPU
    component = variants.component
    resid_code = COMPONENTS.index("resid_pre")

    def entering(at: int) -> tuple[int, int]:
        return (joined[at - 1] if at > start else 0), joined[at]

    def join(at: int, resid: torch.Tensor | None) -> torch.Tensor | None:
        lo, hi = entering(at)
        if hi == lo:
            return resid
        new = base.acts["resid_pre"][rows[lo:hi], at, first:]
        mask = (pos_mask[lo:hi] & (component[lo:hi] == resid_code)[:, None])[..., None].to(device)
        if bool(mask.any()):
            new = torch.where(mask, source.acts["resid_pre"][rows[lo:hi], at, first:], new)
        return new if resid is None else torch.cat([resid, new])

    handles = []
    with installed(handles):
        for at in sorted(set(layer)):
            lo, hi = entering(at)
            for code, name in enumerate(COMPONENTS):
                is_component = component[lo:hi] == code
                if name == "resid_pre" or not bool(is_component.any()):
                    continue
                mask = pos_mask[lo:hi] & is_component[:, None]
                src = source.acts[name][rows[lo:hi], at, first:]
                if name == "head":
                    heads = _head_mask(variants.select(torch.arange(lo, hi)), adapter.n_heads)
                    mask = (mask[:, :, None] & heads[:, None, :])[..., None].to(device)
                    edit = _heads_where(mask, src, adapter.n_heads)
                else:
                    edit = _where(mask[..., None].to(device), src)
                handles.append(edit_activation(adapter, name, at, _on_rows(lo, edit)))
        return run_layers_joining(adapter, join, start, layer_inputs)


def _on_rows(lo: int, edit):
    """An edit of the batch's rows from `lo` on (those joining at the edited layer); the rows before stay."""

    def on_rows(live):
        edited = edit(live[lo:])
        if live.shape[1] == 1:  # the last layer's final position only: the edit broadcast it over the source's
            edited = edited[:, -1:]
        return torch.cat([live[:lo], edited]) if lo else edited

    return on_rows


def _head_mask(variants: Variants, n_heads: int) -> torch.Tensor:
    return (variants.head[:, None] == ALL) | (variants.head[:, None] == torch.arange(n_heads))  # [R, H]


def _patched_final_resid_local(model, adapter, base, source, layer, rows, variants, prefix: PrefixReuse):
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
        z = _heads_where(head_mask, at_p(source, "head"), adapter.n_heads)(z)
    args, kwargs = one_token_inputs(model, adapter)  # before the hooks: it may run the model
    handles = [edit_activation(adapter, "head", layer, lambda _: z)]
    for component in ("attn_out", "mlp_out"):
        if bool(code[component].any()):
            handles.append(edit_activation(adapter, component, layer, _where(code[component], at_p(source, component))))
    with installed(handles):
        new = output_tensor(adapter.layers[layer](at_p(base, "resid_pre"), *args, **kwargs))[:, 0]  # [R, d]
    if layer == adapter.n_layers - 1:
        return torch.where((position == seq_len - 1)[:, None], new, base.final_resid[rows])
    first = prefix.start(int(variants.position.min()))
    resid = base.acts["resid_pre"][rows, layer + 1, first:].clone()
    resid[torch.arange(len(rows), device=device), position - first] = new
    return run_layers(adapter, resid, layer + 1, prefix.layer_inputs(rows, first, layer + 1))


@dataclass
class PatchRows(Rows):
    """Rows of patch runs, one per (variant, pair) that changes anything, with the first position it changes."""

    variant: torch.Tensor
    pair: torch.Tensor
    begin: torch.Tensor

    def by_first(self, budget, seq_len: int, reuse_prefix: bool):
        """Batches of rows in order of their first change, each of rows that change from about the same
        position (a row computes its positions from the batch's first, wasting those before its own: at
        most an eighth of the batch's), at most budget(first) rows."""
        ordered = self.select(torch.argsort(self.begin, stable=True))
        start = 0
        while start < len(ordered):
            first = int(ordered.begin[start])
            stop = min(len(ordered), start + budget(first))
            if reuse_prefix:
                stop = start + int((ordered.begin[start:stop] <= first + (seq_len - first) // 8).sum())
            yield ordered.select(torch.arange(start, stop))
            start = stop


def _changing_rows(variants: Variants, n_pairs: int, seq_len: int, differ_at: torch.Tensor, groups, unmatched):
    """Every (variant, pair) row that changes anything, with the first position it changes: its patched
    position, or for a whole-sequence patch its pair's first differing token (before it the patch writes
    the values already there), or its group's first position in the pair (an empty group changes nothing).
    `unmatched`: variants at positions without a counterpart in the other run (they change nothing)."""
    variant_rows = torch.arange(len(variants)).repeat_interleave(n_pairs)
    pair_rows = torch.arange(n_pairs).repeat(len(variants))
    position, differ_from = variants.position[variant_rows], differ_at[pair_rows]
    begin = torch.where(position == ALL, differ_from, position)
    changes = torch.where(position == ALL, differ_from < seq_len, position >= differ_from)
    grouped = group_index(position) >= 0
    if bool(grouped.any()):
        members = groups[pair_rows[grouped], group_index(position[grouped])]  # [G, T]
        begin[grouped] = torch.where(members, torch.arange(seq_len), seq_len).min(dim=1).values
        changes[grouped] = (members & (torch.arange(seq_len) >= differ_from[grouped, None])).any(dim=1)
    if unmatched is not None:
        changes &= ~unmatched[variant_rows]
    keep = changes.nonzero().squeeze(1)
    return PatchRows(variant_rows[keep], pair_rows[keep], begin[keep])


@dataclass
class SweepResult(DirectedMetrics):
    variants: Variants
    metric_patched: torch.Tensor  # [P, V]
    seq_len: int  # the clean prompts' token count (variant positions are clean positions)

    def effects(self) -> torch.Tensor:
        return normalised_effect(self.metric_patched, self.metric_base[:, None], self.metric_source[:, None])

    def to_columns(self, pair_ids, model: str, group_names: tuple[str, ...] = ()) -> dict[str, np.ndarray | pa.Array]:
        """Long format, one row per (pair, variant): the columns of effects.parquet but the run's own
        (run_id, config_hash). `head`, `position` and `position_from_end` are masked arrays, masked = null
        (all heads / all positions / a position group); `pyarrow.table(columns)` turns the mask into nulls.
        `position_class` names a position group's variants (`group_names[k]`), None elsewhere."""
        n_pairs, n_variants = self.metric_patched.shape
        pair_ids = np.asarray(pair_ids)
        tile = lambda t: np.tile(t.numpy(), n_pairs)  # noqa: E731
        rep = lambda t: np.repeat(t.float().cpu().numpy(), n_variants)  # noqa: E731
        nullable = lambda values: np.ma.masked_array(values.astype(np.int32), mask=values < 0)  # noqa: E731
        position = tile(self.variants.position)
        group = tile(group_index(self.variants.position))
        return {
            "model": np.full(n_pairs * n_variants, model),
            "pair_id": np.repeat(pair_ids, n_variants).astype(np.int32),
            "direction": np.full(n_pairs * n_variants, self.direction),
            "component": np.array(COMPONENTS)[tile(self.variants.component)],
            "layer": tile(self.variants.layer).astype(np.int32),
            "head": nullable(tile(self.variants.head)),
            "position": nullable(position),
            "position_from_end": np.ma.masked_array((position - self.seq_len).astype(np.int32), mask=position < 0),
            "position_class": pa.array([group_names[g] if g >= 0 else None for g in group], pa.string()),
            "seq_len": np.full(n_pairs * n_variants, self.seq_len, dtype=np.int32),
            "metric_clean": rep(self.metric_clean),
            "metric_corrupted": rep(self.metric_corrupted),
            "metric_patched": self.metric_patched.float().cpu().numpy().reshape(-1),
            "effect": self.effects().float().cpu().numpy().reshape(-1),
        }


def check_sweep_inputs(clean_ids, corrupted_ids, answers: Answers, direction: str, metric: str,
                       align_end: bool = False):
    """The checks `sweep` and its reference share, with messages that name the setting to change."""
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
        if self.name == "kl":
            return kl_to_source(self.source_logits[pair_idx.to(final_resid.device)], self.adapter.logits(final_resid))
        return measure(self.adapter, self.name, self.answers, final_resid, pair_idx).float()


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
    position_groups: torch.Tensor | None = None,
) -> SweepResult:
    """Patch every variant into every pair, packed; exact (equal to `reference.reference_sweep` to float tolerance).

    With `align_end`, clean and corrupted prompts may differ in length: they are aligned from the end
    (clean position p pairs with corrupted position p - offset, offset = clean length - corrupted length),
    variant positions are clean positions, and a patch at a position without a counterpart changes nothing.
    `position_groups` [P, K, T] bool (clean positions) are the position groups that variants at
    `group_position(k)` patch, each pair its own.
    """
    check_sweep_inputs(clean_ids, corrupted_ids, answers, direction, metric, align_end)
    check_position_groups(position_groups, variants, clean_ids)
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    clean_ids, corrupted_ids = clean_ids.to(device), corrupted_ids.to(device)
    components = {COMPONENTS[c] for c in variants.component.unique().tolist()}
    base_ids, source_ids = (corrupted_ids, clean_ids) if direction == "denoise" else (clean_ids, corrupted_ids)
    local = _is_local(variants)
    offset = clean_ids.shape[1] - corrupted_ids.shape[1]
    base_components = components | ({"head"} if bool(local.any()) else set())
    differ_at = (first_difference(clean_ids, corrupted_ids).cpu() if not offset
                 else torch.zeros(clean_ids.shape[0], dtype=torch.long))
    # The source run shares the base run's tokens up to the shard's first differing one: it computes the
    # positions from there on only (the base run caches every component for it to copy the rest).
    base = run_with_cache(model, adapter, base_ids, base_components, keep_kv=reuse_prefix)
    source = run_with_cache_after(model, adapter, source_ids, components, base, int(differ_at.min()))
    clean, corrupted = (source, base) if direction == "denoise" else (base, source)
    metric_of = _Metric(metric, adapter, answers, source)
    all_pairs = torch.arange(clean_ids.shape[0])
    n_pairs, seq_len = base_ids.shape
    reported = variants
    if offset:  # work in the base run's positions, with the source's activations aligned to them
        shift = source_ids.shape[1] - seq_len  # base position q <-> source position q + shift
        base_shift = offset if direction == "denoise" else 0  # clean position p -> base position p - base_shift
        single = variants.position >= 0  # ALL and position groups keep their codes
        position = variants.position - base_shift
        unmatched = single & ((position < max(0, -shift)) | (position >= min(seq_len, source_ids.shape[1] - shift)))
        position = torch.where(single, torch.where(unmatched, 0, position), variants.position)
        variants = Variants(variants.component, variants.layer, variants.head, position)
        source = _aligned_to_base(source, base, shift)
        if position_groups is not None:  # clean positions -> base positions; those without one drop out
            position_groups = _shifted(position_groups.bool(), base_shift, seq_len)
    groups = None if position_groups is None else position_groups.bool().cpu()  # [P, K, T] base positions
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)

    metric_clean, metric_corrupted = (metric_of(clean.final_resid, all_pairs),
                                      metric_of(corrupted.final_resid, all_pairs))
    metric_base, metric_source = (metric_corrupted, metric_clean) if direction == "denoise" else (metric_clean,
                                                                                              metric_corrupted)

    # Rows are (variant, pair). Before the first position where a pair's clean and corrupted tokens
    # differ, every activation is the same in both runs (causal attention), so a patch there changes
    # nothing: such rows take the base metric without a forward pass, and a whole-sequence patch need only
    # be computed from there (chat templates put a long shared prefix first). A batch computes positions
    # from its earliest changed one, so batches are cut at about `batch_tokens` computed tokens: big enough
    # to keep the matrix units busy, small enough that few positions are recomputed.
    token_budget = batch_tokens or (32768 if device.type == "cuda" else 2048)
    patched = metric_base[:, None].repeat(1, len(variants))
    # The residual stream patched at every position is the source run's from that layer on: its metric is
    # the source's, computed by no patch run. (Aligned from the end, positions without a counterpart keep
    # the base's values, so there it is computed.)
    replaces_input = (variants.component == COMPONENTS.index("resid_pre")) & (variants.position == ALL) & (offset == 0)
    patched[:, replaces_input.to(device)] = metric_source[:, None]
    rows = _changing_rows(variants, n_pairs, seq_len, differ_at, groups, unmatched if offset else None)
    rows = rows.select((~replaces_input[rows.variant]).nonzero().squeeze(1))
    prefix = PrefixReuse(model, adapter, base, enabled=reuse_prefix)
    budget = lambda first: min(batch_rows, max(1, token_budget // (seq_len - prefix.start(first))))  # noqa: E731

    # Single-position local patches, by layer: each runs one token at its layer.
    is_local = local[rows.variant]
    for layer in variants.layer[rows.variant[is_local]].unique().tolist():
        at_layer = rows.select((is_local & (variants.layer[rows.variant] == layer)).nonzero().squeeze(1))
        for batch in at_layer.by_first(budget, seq_len, reuse_prefix):
            final = patched_final_resid(model, adapter, base, source, layer, batch.pair,
                                        variants.select(batch.variant), prefix, groups=groups)
            patched[batch.pair.to(device), batch.variant.to(device)] = metric_of(final, batch.pair)
    # Whole-layer patches of every layer together: a batch of rows that change from about the same position
    # on runs each layer once, a row joining it at its own layer from the base run's residual (the rows
    # of all layers make one batch big enough for the matrix units where one layer's rows are few).
    for batch in rows.select((~is_local).nonzero().squeeze(1)).by_first(budget, seq_len, reuse_prefix):
        batch = batch.select(torch.argsort(variants.layer[batch.variant], stable=True))
        final = patched_final_resid_joining(model, adapter, base, source, batch.pair, variants.select(batch.variant),
                                            prefix, int(batch.begin.min()), groups)
        patched[batch.pair.to(device), batch.variant.to(device)] = metric_of(final, batch.pair)
    return SweepResult(
        direction=direction,
        metric=metric,
        variants=reported,
        metric_clean=metric_clean.cpu(),
        metric_corrupted=metric_corrupted.cpu(),
        metric_patched=patched.cpu(),
        seq_len=clean_ids.shape[1],
    )


def check_position_groups(position_groups: torch.Tensor | None, variants: Variants, clean_ids: torch.Tensor) -> None:
    """Variants that name position groups need `position_groups` [P, K, T] with a group for each."""
    named = group_index(variants.position)
    if not bool((named >= 0).any()):
        return
    if position_groups is None:
        raise ValueError("variants patch position groups (group_position) but no position_groups were given")
    n_pairs, seq_len = clean_ids.shape
    if position_groups.dim() != 3 or position_groups.shape[0] != n_pairs or position_groups.shape[2] != seq_len:
        raise ValueError(f"position_groups {tuple(position_groups.shape)} must be [pairs {n_pairs}, groups, "
                         f"clean positions {seq_len}]")
    if int(named.max()) >= position_groups.shape[1]:
        raise ValueError(f"a variant names position group {int(named.max())}; only {position_groups.shape[1]} given")


def _shifted(groups: torch.Tensor, shift: int, length: int) -> torch.Tensor:
    """[P, K, T] positions p -> [P, K, length] positions p - shift (those out of range dropped)."""
    out = torch.zeros(*groups.shape[:2], length, dtype=torch.bool)
    lo, hi = max(0, shift), min(groups.shape[2], length + shift)
    if hi > lo:
        out[:, :, lo - shift : hi - shift] = groups[:, :, lo:hi]
    return out


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
