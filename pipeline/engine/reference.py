"""The plain references: one full forward pass per pair and patch (or circuit, or edge), one hook per
patched activation, as the classic experiments do it. Every fast path is checked against one of them
to float tolerance:

  reference_sweep            patching.sweep
  reference_circuit_metrics  circuits.CircuitRunner.metrics
  reference_path_patch       circuits.path_patch
  reference_group_path_patch circuits.group_path_patch
  interpolated_metric        attribution.attribution_patching: the exact metric of a patch scaled by
                             alpha, whose slope at alpha -> 0 the estimate must equal
  orthogonalised_copy        directions.ablation_hooks: the direction taken out of the weights that
                             write to the residual stream instead (Arditi et al.'s weight orthogonalisation)
  reference_greedy           generation under hooks (model.generate, KV-cached): one full forward per
                             new token, no cache
  reference_prompt_patched_greedy  circuits.prompt_patch_hooks during generation: the same, with one hook
                             per head or MLP setting its patched prompt positions at every step
"""
from __future__ import annotations

import copy

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters import Adapter, get_adapter
from .circuits import EMBED, HEAD, MLP, OUTPUT, Nodes, is_path
from .hooks import COMPONENTS, capture, edit_activation, installed, run_with_cache
from .metrics import Answers, answer_metric, kl_to_source, measure
from .patching import ALL, SweepResult, Variants, check_position_groups, check_sweep_inputs


def _activations(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Every hook point at every layer (component -> per layer [1, T, width]) of one plain forward pass."""
    with capture(adapter, COMPONENTS, keep=torch.Tensor.clone) as run:
        model(input_ids=ids, use_cache=False)
    return run.acts


def _final_logits(model: nn.Module, ids: torch.Tensor, handles: list = ()) -> torch.Tensor:
    """The final position's logits [R, V] of one full forward pass with `handles` in place (removed after)."""
    with installed(list(handles)):
        return model(input_ids=ids, use_cache=False).logits[:, -1].float()


def _metric(metric: str, logits: torch.Tensor, answers: Answers, source_logits: torch.Tensor | None = None):
    """The metric [R] from full final-position logits [R, V]; KL needs the source run's logits."""
    if metric == "kl":
        return kl_to_source(source_logits, logits)
    return answer_metric(metric, logits.gather(1, answers.token_ids().clamp(min=0)), answers)


@torch.no_grad()
def reference_sweep(model: nn.Module, clean_ids: torch.Tensor, corrupted_ids: torch.Tensor, answers: Answers,
                    variants: Variants, direction: str = "denoise", metric: str = "logit_diff",
                    align_end: bool = False, position_groups: torch.Tensor | None = None) -> SweepResult:
    """`patching.sweep` the plain way: per pair and variant, one full forward of the base prompt with one
    hook setting the patched activation to the source run's (at a position group's positions, one by one
    in a list)."""
    check_sweep_inputs(clean_ids, corrupted_ids, answers, direction, metric, align_end)
    check_position_groups(position_groups, variants, clean_ids)
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
        answer = answers.index(torch.tensor([p])).to(device)
        source_acts = _activations(model, adapter, source_ids)
        source_logits = _final_logits(model, source_ids)
        metric_clean[p] = _metric(metric, _final_logits(model, clean), answer, source_logits)[0]
        metric_corrupted[p] = _metric(metric, _final_logits(model, corrupted), answer, source_logits)[0]
        for v in range(len(variants)):
            component = COMPONENTS[int(variants.component[v])]
            layer, head, position = int(variants.layer[v]), int(variants.head[v]), int(variants.position[v])
            source = source_acts[component][layer]
            if position <= -2:
                members = position_groups[p, -2 - position].nonzero().squeeze(1).tolist()
                base_slice, source_slice = _aligned_lists(members, base_shift, source_shift,
                                                          base_ids.shape[1], source_ids.shape[1])
            else:
                base_slice, source_slice = _aligned_slices(position, base_shift, source_shift,
                                                           base_ids.shape[1], source_ids.shape[1])
            hook = _sweep_hook(adapter, component, layer, head, base_slice, source_slice, source)
            patched[p, v] = _metric(metric, _final_logits(model, base_ids, [hook]), answer, source_logits)[0]
    return SweepResult(direction=direction, metric=metric, metric_clean=metric_clean, metric_corrupted=metric_corrupted,
                       variants=variants, metric_patched=patched, seq_len=clean_ids.shape[1])


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


def _aligned_lists(positions: list[int], base_shift, source_shift, base_len, source_len) -> tuple[list, list]:
    """Base and source positions of a group's clean positions, those with a counterpart in both runs."""
    kept = [p for p in positions if 0 <= p - base_shift < base_len and 0 <= p - source_shift < source_len]
    return [p - base_shift for p in kept], [p - source_shift for p in kept]


def _sweep_hook(adapter: Adapter, component, layer, head, base_slice, source_slice, source):
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

    return edit_activation(adapter, component, layer, overwrite)


def _node_hook(adapter: Adapter, kind: int, layer: int, head: int, where: torch.Tensor, value: torch.Tensor):
    """A hook setting one head (or the MLP) at positions `where` [T] to `value` (same shape as the activation)."""
    d_head = adapter.d_head
    cols = slice(None) if kind == MLP else slice(head * d_head, (head + 1) * d_head)

    def overwrite(tensor):
        tensor = tensor.clone()
        tensor[:, where, cols] = value[:, where, cols]
        return tensor

    return edit_activation(adapter, OUTPUT[kind], layer, overwrite)


def _embedding_hook(adapter: Adapter, where: torch.Tensor, value: torch.Tensor):
    """A hook setting the residual layer 0 receives (the embeddings) to `value` at `where`."""

    def overwrite(hidden):
        hidden = hidden.clone()
        hidden[:, where] = value[:, where]
        return hidden

    return edit_activation(adapter, "resid_pre", 0, overwrite)


def _every_node(adapter: Adapter) -> list[tuple[int, int, int]]:
    """(kind, layer, head) of every head and MLP of the model."""
    heads = [(HEAD, layer, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads)]
    return heads + [(MLP, layer, -1) for layer in range(adapter.n_layers)]


def _patched_metric(model: nn.Module, ids: torch.Tensor, answer: Answers, metric: str, handles: list) -> float:
    """The answer-token metric of one full forward pass of one pair with `handles` in place (removed after)."""
    return float(_metric(metric, _final_logits(model, ids, handles), answer)[0])


@torch.no_grad()
def reference_circuit_metrics(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                              position_classes: torch.Tensor, nodes: Nodes, masks: torch.Tensor,
                              metric: str = "logit_diff") -> torch.Tensor:
    """`CircuitRunner.metrics` the plain way: per pair and circuit, one full forward of the base prompt
    with one hook per head or MLP of the model setting it to the source value wherever it is not kept."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_pairs, seq_len = base_ids.shape
    out = torch.empty(masks.shape[0], n_pairs)
    everything = _every_node(adapter)
    for p in range(n_pairs):
        source = _activations(model, adapter, source_ids[p:p + 1].to(device))
        answer = answers.index(torch.tensor([p])).to(device)
        for c in range(masks.shape[0]):
            kept = torch.zeros(len(everything), seq_len, dtype=torch.bool)
            for n in range(len(nodes)):
                if bool(masks[c, n]):
                    kind, layer, head, cls = nodes.key(n)
                    kept[everything.index((kind, layer, head))] |= position_classes[p] == cls
            handles = []
            for i, (kind, layer, head) in enumerate(everything):
                where = ~kept[i]
                if where.any():
                    handles.append(_node_hook(adapter, kind, layer, head, where, source[OUTPUT[kind]][layer]))
            out[c, p] = _patched_metric(model, base_ids[p:p + 1].to(device), answer, metric, handles)
    return out


@torch.no_grad()
def reference_path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                         position_classes: torch.Tensor, senders: Nodes, receivers: Nodes,
                         metric: str = "logit_diff") -> torch.Tensor:
    """`path_patch(...).metric_path`: `reference_group_path_patch` with a group per node."""
    return reference_group_path_patch(model, base_ids, source_ids, answers, position_classes,
                                      [senders.select([i]) for i in range(len(senders))],
                                      [receivers.select([i]) for i in range(len(receivers))], metric)


@torch.no_grad()
def reference_group_path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                               position_classes: torch.Tensor, senders: list[Nodes], receivers: list[Nodes],
                               metric: str = "logit_diff") -> torch.Tensor:
    """`group_path_patch(...).metric_path` the classic way (Wang et al. 2022), per receiver member: pass 1
    freezes every head and MLP to its base value except the sender group's members (set to their source
    values) and the one receiver member (free), and records that member; pass 2 is the base run with
    every member of the receiver group set to what was recorded for it."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_pairs, seq_len = base_ids.shape
    everything = _every_node(adapter)
    out = torch.full((len(senders), len(receivers) + 1, n_pairs), float("nan"))
    for p in range(n_pairs):
        ids = base_ids[p:p + 1].to(device)
        base = _activations(model, adapter, ids)
        source = _activations(model, adapter, source_ids[p:p + 1].to(device))
        answer = answers.index(torch.tensor([p])).to(device)
        classes = position_classes[p]
        for s, group in enumerate(senders):
            sent = {group.key(j) for j in range(len(group))}

            def frozen(free: tuple | None, free_where: torch.Tensor | None) -> list:
                """Hooks freezing everything to base, the senders to source, except `free` at `free_where`."""
                handles = [_embedding_hook(adapter, classes == cls, source["resid_pre"][0])
                           for kind, _, _, cls in sent if kind == EMBED]
                for kind, layer, head in everything:
                    value = base[OUTPUT[kind]][layer].clone()
                    cols = slice(None) if kind == MLP else slice(head * adapter.d_head, (head + 1) * adapter.d_head)
                    for s_kind, s_layer, s_head, s_cls in sent:
                        if (s_kind, s_layer, s_head) == (kind, layer, head):
                            where = classes == s_cls
                            value[:, where, cols] = source[OUTPUT[kind]][layer][:, where, cols]
                    where = torch.ones(seq_len, dtype=torch.bool)
                    if (kind, layer, head) == free:
                        where = ~free_where
                    handles.append(_node_hook(adapter, kind, layer, head, where, value))
                return handles

            out[s, -1, p] = _patched_metric(model, ids, answer, metric, frozen(None, None))
            for r, members in enumerate(receivers):
                if not any(is_path(model, group, j, members, i)
                           for j in range(len(group)) for i in range(len(members))):
                    continue
                patches = []
                for i in range(len(members)):
                    r_kind, r_layer, r_head, r_cls = members.key(i)
                    r_where = classes == r_cls
                    with capture(adapter, (OUTPUT[r_kind],), keep=torch.Tensor.clone, layers=[r_layer]) as recorded:
                        _final_logits(model, ids, frozen((r_kind, r_layer, r_head), r_where))
                    patches.append((r_kind, r_layer, r_head, r_where, recorded.acts[OUTPUT[r_kind]][r_layer]))
                handles = [_node_hook(adapter, kind, layer, head, where, value)
                           for kind, layer, head, where, value in patches]
                out[s, r, p] = _patched_metric(model, ids, answer, metric, handles)
    return out


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

    with installed([edit_activation(adapter, component, layer, move)]), capture(adapter, ()) as run:
        model.base_model(input_ids=base_ids, use_cache=False)
    return measure(adapter, metric, answers, run.final, torch.arange(base_ids.shape[0])).cpu()


# The modules that write to the residual stream, by the last part of their name, per family: the
# embeddings, the attention output projection, the MLP's output projection.
RESIDUAL_WRITERS = {"llama": ("embed_tokens", "o_proj", "down_proj"), "gpt2": ("wte", "wpe", "c_proj"),
                    "gpt_neox": ("embed_in", "dense", "dense_4h_to_h")}


@torch.no_grad()
def orthogonalised_copy(model: nn.Module, direction: torch.Tensor) -> nn.Module:
    """A copy of `model` whose every residual-stream writer has `direction` [d] removed from its output
    space (W <- W - u u^T W, and its bias): a model that can never write the direction, with no hooks.
    A tied unembedding is untied first (it reads the stream; it must stay as it was)."""
    adapter = get_adapter(model)
    out = copy.deepcopy(model)
    unembed = out.get_output_embeddings()
    unembed.weight = nn.Parameter(unembed.weight.detach().clone())
    unit = (direction.float() / direction.float().norm()).to(unembed.weight.device)
    for name, module in out.named_modules():
        if name.split(".")[-1] not in RESIDUAL_WRITERS[adapter.family]:
            continue
        weight = module.weight
        u = unit.to(weight.dtype)
        if isinstance(module, (nn.Embedding, Conv1D)):
            weight -= (weight @ u)[:, None] * u  # rows (Embedding [V, d]) or columns' outputs (Conv1D [in, d])
        else:  # nn.Linear [d, in]
            weight -= u[:, None] * (u @ weight)
        bias = getattr(module, "bias", None)
        if bias is not None:
            bias -= (bias @ u) * u
    return out


@torch.no_grad()
def reference_greedy(model: nn.Module, ids: torch.Tensor, max_new_tokens: int, handles_for=None) -> torch.Tensor:
    """[R, max_new_tokens] greedy tokens after `ids` [R, T]: each step one full forward pass over the whole
    sequence so far, no KV cache, with the hooks `handles_for(model)` returns in place (none if None)."""
    seq = ids
    with installed(handles_for(model) if handles_for else []):
        for _ in range(max_new_tokens):
            next_token = model(input_ids=seq, use_cache=False).logits[:, -1].argmax(-1)
            seq = torch.cat([seq, next_token[:, None]], dim=1)
    return seq[:, ids.shape[1]:]


@torch.no_grad()
def reference_prompt_patched_greedy(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor,
                                    patched_heads: torch.Tensor, patched_mlps: torch.Tensor,
                                    max_new_tokens: int) -> torch.Tensor:
    """[max_new_tokens] greedy tokens after one base prompt [1, T] whose heads and MLPs are set to the
    source run's at the prompt positions patched_heads [L, T, H] / patched_mlps [L, T] say: every step
    recomputes the whole sequence with those prompt positions overwritten (causal attention leaves them
    the same at every step), the generated positions computed as they come."""
    adapter = get_adapter(model)
    source = _activations(model, adapter, source_ids)
    seq_len = base_ids.shape[1]
    seq = base_ids
    for _ in range(max_new_tokens):
        pad = torch.zeros(seq.shape[1] - seq_len, dtype=torch.bool)
        handles = []
        for layer in range(adapter.n_layers):
            for head in range(adapter.n_heads):
                if patched_heads[layer, :, head].any():
                    where = torch.cat([patched_heads[layer, :, head], pad])
                    value = torch.nn.functional.pad(source["head"][layer], (0, 0, 0, len(pad)))
                    handles.append(_node_hook(adapter, HEAD, layer, head, where, value))
            if patched_mlps[layer].any():
                where = torch.cat([patched_mlps[layer], pad])
                value = torch.nn.functional.pad(source["mlp_out"][layer], (0, 0, 0, len(pad)))
                handles.append(_node_hook(adapter, MLP, layer, -1, where, value))
        next_token = _final_logits(model, seq, handles).argmax(-1)
        seq = torch.cat([seq, next_token[:, None]], dim=1)
    return seq[0, seq_len:]
