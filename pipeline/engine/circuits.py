"""Circuits: masked multi-node patching, path patching, and the refusal direction.

A node is one attention head or one MLP at one layer, over one *position class*: a set of positions
given per pair as a [P, T] map (for example "the harmful word", "the instruction after it", "the
final token"), so that pairs of different lengths and layouts line up. A circuit C is a set of nodes.
It is evaluated on the base run (the clean, harmful prompt) with every head and MLP output outside C
taking its value from the source run (the harmless twin); the nodes inside C compute from whatever
reaches them. Positions in no class (class -1) are always outside. Faithfulness

    f(C) = (m(C) - m(empty)) / (m(full) - m(empty))

where m(full) is the base run's metric and m(empty), every node patched, is the source run's: the
final position's residual is then the final token's embedding plus source outputs only.

How it stays fast, each step exact:
- Masked packing: each batch row is one (circuit, pair) and carries its own keep-mask over nodes, so
  a whole circuit costs one row of one forward pass: per layer, one `torch.where` on the heads'
  outputs (the input of the attention output projection) and one on the MLP output.
- Prefix reuse: positions before the first token where base and source differ are identical in both
  runs, so rows start there and attend to the base run's cached keys/values.
- Layer skip: when every node below layer l is kept, the residual entering l is the base run's; when
  every node below l is patched, it is the source run's plus the difference of the token embeddings
  (every sublayer output below l is the source's, the embeddings are the base's). Rows start at l.
- Path patching adds a sender's output difference straight into one receiver's input norm, so its
  first pass is a single layer, and the second starts at the receiver's layer from the cached residual.

`reference_circuit_metrics` and `reference_path_patch` are the plain versions (one full forward per
pair and circuit, one hook per node) that the fast ones must match to float tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, UnsupportedArchitecture, get_adapter
from .metrics import Answers, answer_metric
from .patching import (RunCache, bind_cache, prefix_cache, record_layer_inputs, rows_that_fit,
                       run_layers, run_with_cache)

HEAD, MLP, EMBED = 0, 1, 2
KINDS = ("head", "mlp", "embed")  # embed: the token embeddings at a class, an input (path-patching sender only)
ANSWER_METRICS = ("logit_diff", "refusal_logodds")


@dataclass
class Nodes:
    """Circuit nodes as parallel int64 tensors: kind (HEAD/MLP/EMBED), layer (-1 for EMBED), head (-1
    unless a head), position class."""

    kind: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    cls: torch.Tensor

    def __len__(self) -> int:
        return len(self.kind)

    def select(self, idx) -> "Nodes":
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Nodes(self.kind[idx], self.layer[idx], self.head[idx], self.cls[idx])

    @staticmethod
    def grid(adapter: Adapter, classes: list[int]) -> "Nodes":
        """Every head and MLP at every layer and class: per layer, heads (class-major) then the MLP's classes."""
        rows = []
        for layer in range(adapter.n_layers):
            rows += [(HEAD, layer, h, c) for c in classes for h in range(adapter.n_heads)]
            rows += [(MLP, layer, -1, c) for c in classes]
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        return Nodes(t[:, 0], t[:, 1], t[:, 2], t[:, 3])

    @staticmethod
    def embeddings(classes: list[int]) -> "Nodes":
        """Input nodes: the token embeddings at each class (senders for path patching)."""
        n = len(classes)
        return Nodes(torch.full((n,), EMBED), torch.full((n,), -1), torch.full((n,), -1), torch.tensor(classes).long())

    @staticmethod
    def concat(parts: list["Nodes"]) -> "Nodes":
        return Nodes(*(torch.cat([getattr(p, f) for p in parts]) for f in ("kind", "layer", "head", "cls")))

    def key(self, i: int) -> tuple[int, int, int, int]:
        return int(self.kind[i]), int(self.layer[i]), int(self.head[i]), int(self.cls[i])


def check_metric(metric: str) -> None:
    if metric not in ANSWER_METRICS:
        raise ValueError(f"circuits need an answer-token metric, got {metric!r}: set patching.metric to one of "
                         f"{list(ANSWER_METRICS)}")


def measure(adapter: Adapter, metric: str, answers: Answers, final_resid: torch.Tensor,
            pair_idx: torch.Tensor) -> torch.Tensor:
    """The answer-token metric [R] of final residuals [R, d] belonging to pairs `pair_idx`."""
    device = final_resid.device
    rows = answers.index(pair_idx.cpu())
    rows = Answers(rows.refusal.to(device), rows.compliance.to(device))
    value = answer_metric(metric, adapter.logits(final_resid, rows.token_ids()), rows)
    return value.to(torch.promote_types(value.dtype, torch.float32))  # half precision -> float32, float64 stays


def first_difference(base_ids: torch.Tensor, source_ids: torch.Tensor) -> int:
    """The first position at which any pair's two prompts differ (activations before it are identical)."""
    differs = (base_ids != source_ids).any(0).nonzero()
    if len(differs) == 0:
        raise ValueError("base and source prompts are identical in every pair: nothing to patch")
    return int(differs[0])


def _check_shapes(base_ids, source_ids, answers: Answers, position_classes):
    if base_ids.shape != source_ids.shape:
        raise ValueError(f"base {tuple(base_ids.shape)} and source {tuple(source_ids.shape)} token ids differ in shape: "
                         "circuits patch position by position, so pairs need equal token counts")
    if position_classes.shape != base_ids.shape:
        raise ValueError(f"position classes {tuple(position_classes.shape)} do not match the token ids "
                         f"{tuple(base_ids.shape)}: give one class per position (-1 = no class)")
    if answers.refusal.shape[0] != base_ids.shape[0]:
        raise ValueError(f"{answers.refusal.shape[0]} answer rows for {base_ids.shape[0]} pairs")


def _dense_keep(nodes: Nodes, masks: torch.Tensor, n_layers: int, n_classes: int, n_heads: int):
    """masks [R, N] over `nodes` -> keep tables [R, L, K + 1, H] (heads) and [R, L, K + 1] (MLPs);
    the extra class K stands for "no class" and is never kept. Nodes not listed are never kept."""
    rows = masks.shape[0]
    keep_head = torch.zeros(rows, n_layers, n_classes + 1, n_heads, dtype=masks.dtype)
    keep_mlp = torch.zeros(rows, n_layers, n_classes + 1, dtype=masks.dtype)
    is_head = nodes.kind == HEAD
    keep_head[:, nodes.layer[is_head], nodes.cls[is_head], nodes.head[is_head]] = masks[:, is_head]
    keep_mlp[:, nodes.layer[~is_head], nodes.cls[~is_head]] = masks[:, ~is_head]
    return keep_head, keep_mlp


def _mix(keep: torch.Tensor, live: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """Kept entries from the live run, the rest from the source; float masks interpolate. When the live
    tensor holds only the last positions (run_layers feeds the last layer the final position alone),
    the mask and source are cut to match."""
    keep, source = keep[:, keep.shape[1] - live.shape[1]:], source[:, source.shape[1] - live.shape[1]:]
    if keep.dtype == torch.bool:
        return torch.where(keep, live, source)
    return source + keep.to(live.dtype) * (live - source)


class Suffix:
    """Runs from the first position where base and source differ: earlier positions hold the same
    activations in both runs, so rows attend to the base run's cached keys/values for them."""

    def __init__(self, model: nn.Module, adapter: Adapter, base: RunCache, base_ids: torch.Tensor,
                 source_ids: torch.Tensor):
        self.model, self.base = model, base
        self.first = first_difference(base_ids, source_ids) if base.kv is not None else 0
        if self.first > 0:
            zeros = torch.zeros(1, base_ids.shape[1] - self.first, dtype=torch.long, device=base_ids.device)
            one_row = prefix_cache(model, base.kv, torch.tensor([0]), self.first)
            self.inputs = record_layer_inputs(model, adapter, zeros, one_row)

    def layer_inputs(self, rows: torch.Tensor, start: int):
        """Per-layer inputs for rows `rows` running layers start..L-1 on positions first..T-1."""
        if self.first == 0:
            return self.base.layer_inputs
        return bind_cache(self.inputs, prefix_cache(self.model, self.base.kv, rows, self.first, start))


class CircuitRunner:
    """Evaluates many circuits on one group of pairs of equal length, packed.

    `metrics(nodes, masks)` -> [C, P]: the metric of every pair with circuit c (row c of masks [C, N],
    bool or float in [0, 1]) kept and every other node patched from the source run.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                 position_classes: torch.Tensor, n_classes: int, metric: str = "logit_diff",
                 max_batch_rows: int | None = None):
        check_metric(metric)
        _check_shapes(base_ids, source_ids, answers, position_classes)
        self.model, self.adapter = model, get_adapter(model)
        self.answers, self.metric, self.n_classes = answers, metric, n_classes
        device = next(model.parameters()).device
        base_ids, source_ids = base_ids.to(device), source_ids.to(device)
        self.base = run_with_cache(model, self.adapter, base_ids, ("head", "mlp_out"), keep_kv=True)
        self.source = run_with_cache(model, self.adapter, source_ids, ("head", "mlp_out"))
        self.n_pairs, seq_len = base_ids.shape
        self.suffix = Suffix(model, self.adapter, self.base, base_ids, source_ids)
        self.first = self.suffix.first
        classes = position_classes.clone()
        classes[classes < 0] = n_classes
        if int(classes.max()) > n_classes:
            raise ValueError(f"position classes go up to {int(classes.max())} but n_classes={n_classes}")
        self.classes = classes[:, self.first:]  # [P, T'] (CPU)
        # "Every node below l kept" means the base run below l only if no position that differs between
        # the runs lies in no class (such positions are always patched).
        differs = (base_ids != source_ids).cpu()
        live = torch.arange(seq_len)[None] >= differs.float().argmax(1, keepdim=True)
        self.all_classified = not bool(((position_classes < 0) & live).any())
        self.batch_rows = max_batch_rows or rows_that_fit(model, self.adapter, seq_len - self.first)
        all_pairs = torch.arange(self.n_pairs)
        self.metric_full = measure(self.adapter, metric, answers, self.base.final_resid, all_pairs).cpu()
        self.metric_empty = measure(self.adapter, metric, answers, self.source.final_resid, all_pairs).cpu()

    def _start_layers(self, keep_head: torch.Tensor, keep_mlp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per circuit: the first layer that must be computed, and whether the residual entering it is
        the base run's (every node below kept) rather than the source run's (every node below patched)."""
        n_classes, n_layers = self.n_classes, self.adapter.n_layers
        head, mlp = keep_head[:, :, :n_classes].float(), keep_mlp[:, :, :n_classes].float()
        all_kept = (head == 1).flatten(2).all(2) & (mlp == 1).all(2)  # [C, L]
        none_kept = (head == 0).flatten(2).all(2) & (mlp == 0).all(2)
        leading = lambda x: x.long().cumprod(1).sum(1)  # noqa: E731
        below_kept = leading(all_kept) if self.all_classified else torch.zeros(len(head), dtype=torch.long)
        below_patched = leading(none_kept)
        start = torch.maximum(below_kept, below_patched).clamp(max=n_layers - 1)
        return start, below_kept >= below_patched

    @torch.no_grad()
    def _final_resid(self, pair_idx: torch.Tensor, keep_head: torch.Tensor, keep_mlp: torch.Tensor, start: int,
                     from_base: torch.Tensor) -> torch.Tensor:
        """Final residuals [R, d] of base rows `pair_idx` with per-row keep tables (see `_dense_keep`),
        computed from layer `start` (rows `from_base` start from the base run's residual there, the
        others from the source run's plus the embedding difference)."""
        adapter, first = self.adapter, self.first
        device = self.base.final_resid.device
        rows = pair_idx.to(device)
        classes = self.classes[pair_idx]  # [R, T']
        n_heads = adapter.n_heads
        handles = []

        def heads_hook(layer, keep):
            def hook(module, args):
                z = args[0]
                source = self.source.acts["head"][rows, layer, first:]
                source = source.reshape(*source.shape[:-1], n_heads, -1)
                mixed = _mix(keep, z.reshape(*z.shape[:-1], n_heads, -1), source)
                return (mixed.reshape(z.shape),) + tuple(args[1:])
            return hook

        def mlp_hook(layer, keep):
            def hook(module, args, output):
                live = output[0] if isinstance(output, tuple) else output
                mixed = _mix(keep, live, self.source.acts["mlp_out"][rows, layer, first:])
                return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed
            return hook

        try:
            for layer in range(start, adapter.n_layers):
                keep_h = keep_head[:, layer].gather(1, classes[..., None].expand(-1, -1, n_heads))  # [R, T', H]
                keep_m = keep_mlp[:, layer].gather(1, classes)  # [R, T']
                handles.append(adapter.out_proj[layer].register_forward_pre_hook(
                    heads_hook(layer, keep_h[..., None].to(device))))
                handles.append(adapter.mlp[layer].register_forward_hook(mlp_hook(layer, keep_m[..., None].to(device))))
            base_resid = self.base.acts["resid_pre"]
            resid = base_resid[rows, start, first:]
            if start > 0 and not bool(from_base.all()):
                source_resid = self.source.acts["resid_pre"]
                embedding_difference = base_resid[rows, 0, first:] - source_resid[rows, 0, first:]
                resid = torch.where(from_base.to(device)[:, None, None], resid,
                                    source_resid[rows, start, first:] + embedding_difference)
            return run_layers(adapter, resid, start, self.suffix.layer_inputs(pair_idx, start))
        finally:
            for h in handles:
                h.remove()

    @torch.no_grad()
    def metrics(self, nodes: Nodes, masks: torch.Tensor) -> torch.Tensor:
        """masks [C, N] (bool, or float for interpolation) -> metric [C, P]."""
        masks = masks.cpu()
        if masks.ndim != 2 or masks.shape[1] != len(nodes):
            raise ValueError(f"masks must be [circuits, {len(nodes)} nodes], got {tuple(masks.shape)}")
        if len(nodes) and (int(nodes.cls.max()) >= self.n_classes or int(nodes.cls.min()) < 0):
            raise ValueError(f"node classes must lie in 0..{self.n_classes - 1}")
        if bool((nodes.kind == EMBED).any()):
            raise ValueError("embedding nodes are inputs, not circuit members: leave them out of circuit masks")
        n_circuits, n_pairs = masks.shape[0], self.n_pairs
        keep_head, keep_mlp = _dense_keep(nodes, masks, self.adapter.n_layers, self.n_classes, self.adapter.n_heads)
        start_layer, from_base = self._start_layers(keep_head, keep_mlp)
        # Circuits in order of their start layer, so a batch's rows share (nearly) one start layer.
        order = torch.argsort(start_layer, stable=True)
        out = torch.empty(n_circuits, n_pairs)
        n_rows = n_circuits * n_pairs
        for begin in range(0, n_rows, self.batch_rows):
            flat = torch.arange(begin, min(begin + self.batch_rows, n_rows))
            circuit, pair = order[flat // n_pairs], flat % n_pairs
            final = self._final_resid(pair, keep_head[circuit], keep_mlp[circuit], int(start_layer[circuit].min()),
                                      from_base[circuit])
            out[circuit, pair] = measure(self.adapter, self.metric, self.answers, final, pair).cpu()
        return out


def faithfulness(metric_circuit: torch.Tensor, metric_full: torch.Tensor, metric_empty: torch.Tensor) -> torch.Tensor:
    """f per circuit from metrics [C, P]: ratio of pair means, (mean m(C) - mean m(empty)) / (mean m(full) - mean m(empty))."""
    empty = metric_empty.mean()
    return (metric_circuit.mean(-1) - empty) / (metric_full.mean() - empty)


# ---------------------------------------------------------------------------------------------------
# Path patching: sender -> receiver through the residual stream.

# Per family: (the norm in front of attention, the norm in front of the MLP), as attribute names on a
# decoder layer. Adding to a norm's input changes what that module reads, not the residual stream.
INPUT_NORMS = {"llama": ("input_layernorm", "post_attention_layernorm"), "gpt2": ("ln_1", "ln_2"),
               "gpt_neox": ("input_layernorm", "post_attention_layernorm")}
# Gemma 2/3 normalise each sublayer's output before the residual add: a head's write is not additive.
NON_ADDITIVE = ("gemma2", "gemma3", "gemma3_text")


def check_path_patching(model: nn.Module, adapter: Adapter) -> None:
    if getattr(model.config, "model_type", None) in NON_ADDITIVE or adapter.family not in INPUT_NORMS:
        raise UnsupportedArchitecture(
            f"path patching needs heads and MLPs that add straight into the residual stream; "
            f"{model.config.model_type!r} normalises sublayer outputs first: leave circuit edges off for it")


def parallel_residual(model: nn.Module) -> bool:
    """GPT-NeoX's parallel block: attention and MLP both read the layer's input."""
    return bool(getattr(model.config, "use_parallel_residual", False))


def is_path(model: nn.Module, senders: Nodes, s: int, receivers: Nodes, r: int) -> bool:
    """Whether sender s's output can reach receiver r's input through the residual stream."""
    if int(receivers.kind[r]) == EMBED:
        raise ValueError("embedding nodes are inputs: they can send, not receive")
    ls, lr = int(senders.layer[s]), int(receivers.layer[r])
    if ls < lr:
        return True
    return (ls == lr and int(senders.kind[s]) == HEAD and int(receivers.kind[r]) == MLP
            and not parallel_residual(model))


def node_writes(adapter: Adapter, cache: RunCache, nodes: Nodes, classes: torch.Tensor) -> torch.Tensor:
    """What each node adds to the residual stream at its class positions: [N, P, T, d] (zero elsewhere).

    A head's write is its slice of the attention output projection (without the bias, which every
    run shares); an MLP's is its output; the embeddings' is the residual entering layer 0. `cache`
    must hold "head" and "mlp_out"."""
    d_head = adapter.d_head
    out = []
    for i in range(len(nodes)):
        kind, layer, head, cls = (int(x) for x in (nodes.kind[i], nodes.layer[i], nodes.head[i], nodes.cls[i]))
        where = (classes == cls).to(cache.final_resid.device)[..., None]  # [P, T, 1]
        if kind == EMBED:
            write = cache.acts["resid_pre"][:, 0]
        elif kind == MLP:
            write = cache.acts["mlp_out"][:, layer]
        else:
            z = cache.acts["head"][:, layer]
            only = torch.zeros_like(z)
            only[..., head * d_head:(head + 1) * d_head] = z[..., head * d_head:(head + 1) * d_head]
            proj = adapter.out_proj[layer]
            write = proj(only) - proj(torch.zeros_like(only[:, :1]))
        out.append(write * where)
    return torch.stack(out) if out else torch.empty(0)


@dataclass
class PathResult:
    metric_path: torch.Tensor  # [S, R + 1, P]: metric with only the path s -> r patched (r = R: the logits); nan = no path
    metric_base: torch.Tensor  # [P]
    metric_source: torch.Tensor  # [P]

    def effects(self) -> torch.Tensor:
        """Normalised path effects [S, R + 1, P]: (m_path - m_base) / (m_source - m_base)."""
        return (self.metric_path - self.metric_base) / (self.metric_source - self.metric_base)


@torch.no_grad()
def path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
               position_classes: torch.Tensor, senders: Nodes, receivers: Nodes, metric: str = "logit_diff",
               max_batch_rows: int | None = None) -> PathResult:
    """Path patching: for every sender s and receiver r (and the logits as a last receiver), the base
    run's metric when only r's input sees s's source-run output, everything else as in the base run.

    Pass 1 (one layer): r's layer runs on the base residual with s's output difference added to the
    input of r's norm only; r's output at its positions is kept. Pass 2 (layers l_r..L-1, positions from
    the first that differs between the runs): the base run with r's output at its positions replaced by
    that. The logits as receiver: s's difference at the final position added to the base run's final
    residual.
    """
    check_metric(metric)
    _check_shapes(base_ids, source_ids, answers, position_classes)
    adapter = get_adapter(model)
    check_path_patching(model, adapter)
    device = next(model.parameters()).device
    base_ids, source_ids = base_ids.to(device), source_ids.to(device)
    base = run_with_cache(model, adapter, base_ids, ("head", "mlp_out"), keep_kv=True)
    source = run_with_cache(model, adapter, source_ids, ("head", "mlp_out"))
    suffix = Suffix(model, adapter, base, base_ids, source_ids)
    n_pairs, seq_len = base_ids.shape
    all_pairs = torch.arange(n_pairs)
    metric_base = measure(adapter, metric, answers, base.final_resid, all_pairs).cpu()
    metric_source = measure(adapter, metric, answers, source.final_resid, all_pairs).cpu()
    classes = position_classes.to(device)
    deltas = node_writes(adapter, source, senders, classes) - node_writes(adapter, base, senders, classes)  # [S, P, T, d]
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)
    out = torch.full((len(senders), len(receivers) + 1, n_pairs), float("nan"))

    # The logits as receiver: the direct path from the final position.
    for s in range(len(senders)):
        final = base.final_resid + deltas[s, :, -1]
        out[s, -1] = measure(adapter, metric, answers, final, all_pairs).cpu()

    for r in range(len(receivers)):
        valid = [s for s in range(len(senders)) if is_path(model, senders, s, receivers, r)]
        n_rows = len(valid) * n_pairs
        for start in range(0, n_rows, batch_rows):
            flat = torch.arange(start, min(start + batch_rows, n_rows))
            sender_idx, pair_idx = torch.tensor(valid)[flat // n_pairs], flat % n_pairs
            received = _receiver_output(adapter, base, receivers, r, deltas[sender_idx.to(device), pair_idx.to(device)],
                                        pair_idx.to(device))
            final = _with_receiver_output(adapter, base, suffix, receivers, r, received, classes, pair_idx)
            out[sender_idx, r, pair_idx] = measure(adapter, metric, answers, final, pair_idx).cpu()
    return PathResult(out, metric_base, metric_source)


def _receiver_output(adapter: Adapter, base: RunCache, receivers: Nodes, r: int, delta: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Pass 1: receiver r's output [R, T, width] when its input norm alone sees base + delta."""
    kind, layer, head = int(receivers.kind[r]), int(receivers.layer[r]), int(receivers.head[r])
    block = adapter.layers[layer]
    norm = getattr(block, INPUT_NORMS[adapter.family][0 if kind == HEAD else 1])
    captured = {}

    def add_delta(module, args):
        return (args[0] + delta,) + tuple(args[1:])

    def keep_heads(module, args):
        captured["out"] = args[0]

    def keep_mlp(module, args, output):
        captured["out"] = output[0] if isinstance(output, tuple) else output

    handles = [norm.register_forward_pre_hook(add_delta)]
    if kind == HEAD:
        handles.append(adapter.out_proj[layer].register_forward_pre_hook(keep_heads))
    else:
        handles.append(adapter.mlp[layer].register_forward_hook(keep_mlp))
    try:
        args, kwargs = base.layer_inputs[layer]
        block(base.acts["resid_pre"][rows, layer], *args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if kind == HEAD:
        d_head = adapter.d_head
        return captured["out"][..., head * d_head:(head + 1) * d_head]
    return captured["out"]


def _with_receiver_output(adapter: Adapter, base: RunCache, suffix: Suffix, receivers: Nodes, r: int,
                          received: torch.Tensor, classes: torch.Tensor, pair_idx: torch.Tensor) -> torch.Tensor:
    """Pass 2: the base run from receiver r's layer (and the first differing position) with r's output at
    its positions replaced."""
    kind, layer, head, cls = (int(x) for x in (receivers.kind[r], receivers.layer[r], receivers.head[r],
                                               receivers.cls[r]))
    first, rows = suffix.first, pair_idx.to(classes.device)
    where = (classes[rows, first:] == cls)[..., None]  # [R, T', 1]
    received = received[:, first:]

    def last(x, n):  # the last n positions (the last layer sees the final position alone)
        return x[:, x.shape[1] - n:]

    def patch_head(module, args):
        z = args[0].clone()
        d_head = adapter.d_head
        n = z.shape[1]
        part = z[..., head * d_head:(head + 1) * d_head]
        z[..., head * d_head:(head + 1) * d_head] = torch.where(last(where, n), last(received, n), part)
        return (z,) + tuple(args[1:])

    def patch_mlp(module, args, output):
        live = output[0] if isinstance(output, tuple) else output
        n = live.shape[1]
        mixed = torch.where(last(where, n), last(received, n), live)
        return (mixed,) + tuple(output[1:]) if isinstance(output, tuple) else mixed

    handle = (adapter.out_proj[layer].register_forward_pre_hook(patch_head) if kind == HEAD
              else adapter.mlp[layer].register_forward_hook(patch_mlp))
    try:
        return run_layers(adapter, base.acts["resid_pre"][rows, layer, first:], layer,
                          suffix.layer_inputs(pair_idx, layer))
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------------
# The refusal direction: difference of means between harmful and harmless residuals.


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

        def ablate_output(module, args, output):
            return (ablate(output[0]),) + tuple(output[1:]) if isinstance(output, tuple) else ablate(output)

        handles = [a.register_forward_hook(ablate_output) for a in adapter.attn]
        try:
            resid = base.acts["resid_pre"][pair, 0]
            for layer in range(adapter.n_layers):
                args, kwargs = base.layer_inputs[layer]
                resid = adapter.layers[layer](ablate(resid), *args, **kwargs)
                resid = resid[0] if isinstance(resid, tuple) else resid
        finally:
            for h in handles:
                h.remove()
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


# ---------------------------------------------------------------------------------------------------
# The plain references: one full forward per pair and circuit (or edge), one hook per node.


def _capture(model: nn.Module, adapter: Adapter, ids: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    acts = {"head": [None] * adapter.n_layers, "mlp_out": [None] * adapter.n_layers, "embed": [None]}
    handles = [adapter.layers[0].register_forward_pre_hook(
        lambda m, a, k: acts["embed"].__setitem__(0, (a[0] if a else k["hidden_states"]).clone()), with_kwargs=True)]
    for layer in range(adapter.n_layers):
        handles.append(adapter.out_proj[layer].register_forward_pre_hook(
            lambda m, a, layer=layer: acts["head"].__setitem__(layer, a[0].clone())))
        handles.append(adapter.mlp[layer].register_forward_hook(
            lambda m, a, o, layer=layer: acts["mlp_out"].__setitem__(layer, (o[0] if isinstance(o, tuple) else o).clone())))
    try:
        model(input_ids=ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return acts


def _overwrite_hook(adapter: Adapter, kind: int, layer: int, head: int, where: torch.Tensor, value: torch.Tensor):
    """A hook setting one head (or the MLP) at positions `where` [T] to `value` (same shape as the activation)."""
    d_head = adapter.d_head
    cols = slice(None) if kind == MLP else slice(head * d_head, (head + 1) * d_head)

    def overwrite(tensor):
        tensor = tensor.clone()
        tensor[:, where, cols] = value[:, where, cols]
        return tensor

    if kind == HEAD:
        return adapter.out_proj[layer].register_forward_pre_hook(lambda m, a: (overwrite(a[0]),) + tuple(a[1:]))
    return adapter.mlp[layer].register_forward_hook(
        lambda m, a, o: (overwrite(o[0]),) + tuple(o[1:]) if isinstance(o, tuple) else overwrite(o))


def _embedding_hook(adapter: Adapter, where: torch.Tensor, value: torch.Tensor):
    """A pre-hook on layer 0 setting the residual it receives (the embeddings) to `value` at `where`."""
    def pre(module, args, kwargs):
        hidden = (args[0] if args else kwargs["hidden_states"]).clone()
        hidden[:, where] = value[:, where]
        if args:
            return (hidden,) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden}

    return adapter.layers[0].register_forward_pre_hook(pre, with_kwargs=True)


def _reference_metric(model, ids, answers: Answers, metric: str, handles: list) -> float:
    try:
        logits = model(input_ids=ids, use_cache=False).logits[:, -1].float()
    finally:
        for h in handles:
            h.remove()
    return float(answer_metric(metric, logits.gather(1, answers.token_ids().clamp(min=0).to(logits.device)), answers)[0])


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
    everything = [(HEAD, layer, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads)]
    everything += [(MLP, layer, -1) for layer in range(adapter.n_layers)]
    for p in range(n_pairs):
        source = _capture(model, adapter, source_ids[p:p + 1].to(device))
        answer = answers.index(torch.tensor([p]))
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
                    value = source["head" if kind == HEAD else "mlp_out"][layer]
                    handles.append(_overwrite_hook(adapter, kind, layer, head, where, value))
            out[c, p] = _reference_metric(model, base_ids[p:p + 1].to(device), answer, metric, handles)
    return out


@torch.no_grad()
def reference_path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                         position_classes: torch.Tensor, senders: Nodes, receivers: Nodes,
                         metric: str = "logit_diff") -> torch.Tensor:
    """`path_patch(...).metric_path` the classic way (Wang et al. 2022): pass 1 freezes every head and
    MLP to its base value except the sender (set to its source value) and the receiver (free), and
    records the receiver; pass 2 is the base run with the receiver set to that."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    n_pairs, seq_len = base_ids.shape
    everything = [(HEAD, layer, head) for layer in range(adapter.n_layers) for head in range(adapter.n_heads)]
    everything += [(MLP, layer, -1) for layer in range(adapter.n_layers)]
    out = torch.full((len(senders), len(receivers) + 1, n_pairs), float("nan"))
    for p in range(n_pairs):
        ids = base_ids[p:p + 1].to(device)
        base = _capture(model, adapter, ids)
        source = _capture(model, adapter, source_ids[p:p + 1].to(device))
        answer = answers.index(torch.tensor([p]))
        classes = position_classes[p]
        for s in range(len(senders)):
            s_kind, s_layer, s_head, s_cls = senders.key(s)

            def frozen(free: tuple | None, free_where: torch.Tensor | None) -> list:
                """Hooks freezing everything to base, the sender to source, except `free` at `free_where`."""
                handles = []
                if s_kind == EMBED:
                    handles.append(_embedding_hook(adapter, classes == s_cls, source["embed"][0]))
                for kind, layer, head in everything:
                    value = base["head" if kind == HEAD else "mlp_out"][layer].clone()
                    if (kind, layer, head) == (s_kind, s_layer, s_head):
                        src = source["head" if kind == HEAD else "mlp_out"][layer]
                        where = classes == s_cls
                        cols = slice(None) if kind == MLP else slice(head * adapter.d_head, (head + 1) * adapter.d_head)
                        value[:, where, cols] = src[:, where, cols]
                    where = torch.ones(seq_len, dtype=torch.bool)
                    if (kind, layer, head) == free:
                        where = ~free_where
                    handles.append(_overwrite_hook(adapter, kind, layer, head, where, value))
                return handles

            out[s, -1, p] = _reference_metric(model, ids, answer, metric, frozen(None, None))
            for r in range(len(receivers)):
                if not is_path(model, senders, s, receivers, r):
                    continue
                r_kind, r_layer, r_head, r_cls = receivers.key(r)
                r_where = classes == r_cls
                recorded = {}
                handles = frozen((r_kind, r_layer, r_head), r_where)
                record = (adapter.out_proj[r_layer].register_forward_pre_hook(
                    lambda m, a: recorded.__setitem__("out", a[0].clone())) if r_kind == HEAD else
                    adapter.mlp[r_layer].register_forward_hook(
                    lambda m, a, o: recorded.__setitem__("out", (o[0] if isinstance(o, tuple) else o).clone())))
                _reference_metric(model, ids, answer, metric, handles + [record])
                patch = _overwrite_hook(adapter, r_kind, r_layer, r_head, r_where, recorded["out"])
                out[s, r, p] = _reference_metric(model, ids, answer, metric, [patch])
    return out
