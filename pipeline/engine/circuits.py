"""Circuits: masked multi-node patching and path patching.

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
- Mixed lengths: pairs of different token lengths share a batch left-padded, each row with its own
  attention mask and positions (padding.py), so batches stay large when every length has few pairs.
- Path patching adds a sender's output difference straight into one receiver's input norm, so its
  first pass is a single layer, and the second starts at the receiver's layer from the cached residual.

`reference.reference_circuit_metrics` and `reference.reference_path_patch` are the plain versions (one
full forward per pair and circuit, one hook per node) that the fast ones must match to float tolerance.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .adapters import Adapter, UnsupportedArchitecture, get_adapter
from .hooks import (
    PrefixReuse,
    Rows,
    RunCache,
    capture,
    edit_activation,
    first_difference,
    installed,
    output_tensor,
    rows_that_fit,
    run_layers,
    run_with_cache,
)
from .metrics import Answers, check_metric, measure
from .padding import Padding, RowPrefixReuse, run_padded_with_cache

HEAD, MLP, EMBED = 0, 1, 2
KINDS = ("head", "mlp", "embed")  # embed: the token embeddings at a class, an input (path-patching sender only)
OUTPUT = {HEAD: "head", MLP: "mlp_out"}  # per kind: the hook point that holds a node's output


@dataclass
class Nodes(Rows):
    """Circuit nodes as parallel int64 tensors: kind (HEAD/MLP/EMBED), layer (-1 for EMBED), head (-1
    unless a head), position class."""

    kind: torch.Tensor
    layer: torch.Tensor
    head: torch.Tensor
    cls: torch.Tensor

    @staticmethod
    def grid(adapter: Adapter, classes: list[int]) -> Nodes:
        """Every head and MLP at every layer and class: per layer, heads (class-major) then the MLP's classes."""
        rows = []
        for layer in range(adapter.n_layers):
            rows += [(HEAD, layer, h, c) for c in classes for h in range(adapter.n_heads)]
            rows += [(MLP, layer, -1, c) for c in classes]
        t = torch.tensor(rows, dtype=torch.long).reshape(-1, 4)
        return Nodes(t[:, 0], t[:, 1], t[:, 2], t[:, 3])

    @staticmethod
    def embeddings(classes: list[int]) -> Nodes:
        """Input nodes: the token embeddings at each class (senders for path patching)."""
        n = len(classes)
        return Nodes(torch.full((n,), EMBED), torch.full((n,), -1), torch.full((n,), -1), torch.tensor(classes).long())

    def key(self, i: int) -> tuple[int, int, int, int]:
        return int(self.kind[i]), int(self.layer[i]), int(self.head[i]), int(self.cls[i])


def _shared_first(prefix: PrefixReuse, base_ids: torch.Tensor, source_ids: torch.Tensor) -> int:
    """Where every row starts: the first position at which any pair's two prompts differ (0 without prefix reuse)."""
    if not prefix.enabled:
        return 0
    first = int(first_difference(base_ids, source_ids).min())
    if first == base_ids.shape[1]:
        raise ValueError("base and source prompts are identical in every pair: nothing to patch")
    return first


def _check_shapes(base_ids, source_ids, answers: Answers, position_classes):
    if base_ids.shape != source_ids.shape:
        raise ValueError(f"base {tuple(base_ids.shape)} and source {tuple(source_ids.shape)} token ids differ in "
                         "shape: circuits patch position by position, so pairs need equal token counts")
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


SMALL_BATCH_SLACK = 16  # positions per layer a batch may compute for rows that do not change them
FIRST_SLACK = 2  # positions a circuit row may compute before its pair's first difference (batches stay large)


def _computed_only(module: nn.Module, computed: torch.Tensor, source: torch.Tensor, keep: torch.Tensor | None = None,
                   before=None) -> list:
    """Hooks that run a position-wise `module` (an MLP, an output projection) only at the positions where
    `computed` [R, T] is set, packed into one sequence, and give the `source` output [R, T, d] elsewhere.
    `before` edits the input first; a float `keep` [R, T] mixes the computed output with the source's."""
    def pack(module, args):
        x = args[0] if before is None else before(args[0])
        return (x[computed][None],) + tuple(args[1:])

    def scatter(module, args, output):
        out = output_tensor(output)[0]  # [computed positions, d]
        full = source.clone()
        if keep is not None and keep.dtype != torch.bool:
            out = full[computed] + keep[computed][:, None].to(out.dtype) * (out - full[computed])
        full[computed] = out
        return full

    return [module.register_forward_pre_hook(pack), module.register_forward_hook(scatter)]


def _check_padding(lengths: torch.Tensor, position_classes: torch.Tensor) -> Padding | None:
    """The left padding `lengths` [P] describe (None when every row is full length)."""
    n_pairs, seq_len = position_classes.shape
    if lengths.shape != (n_pairs,) or int(lengths.min()) < 1 or int(lengths.max()) > seq_len:
        raise ValueError(f"lengths must give each of the {n_pairs} pairs its token count, 1..{seq_len}")
    padding = Padding(lengths.cpu().long())
    if bool((padding.lengths == seq_len).all()):
        return None
    if padding.seq_len != seq_len:
        raise ValueError(f"the longest pair has {padding.seq_len} tokens but the batch {seq_len}: pad to the longest")
    if bool((position_classes.cpu()[~padding.real()] >= 0).any()):
        raise ValueError("a pad position has a position class: pads (left of each row's tokens) take class -1")
    return padding


class CircuitRunner:
    """Evaluates many circuits on one batch of pairs, packed.

    `metrics(nodes, masks)` -> [C, P]: the metric of every pair with circuit c (row c of masks [C, N],
    bool or float in [0, 1]) kept and every other node patched from the source run (`pairs`: of some).
    Pairs of different token lengths come left-padded to the longest ([P, T], pads of class -1) with
    `lengths` [P] their own token counts.
    """

    @torch.no_grad()
    def __init__(self, model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                 position_classes: torch.Tensor, n_classes: int, metric: str = "logit_diff",
                 max_batch_rows: int | None = None, lengths: torch.Tensor | None = None):
        check_metric(metric)
        _check_shapes(base_ids, source_ids, answers, position_classes)
        padding = None if lengths is None else _check_padding(lengths, position_classes)
        self.model, self.adapter = model, get_adapter(model)
        self.answers, self.metric, self.n_classes = answers, metric, n_classes
        device = next(model.parameters()).device
        base_ids, source_ids = base_ids.to(device), source_ids.to(device)
        if padding is None:
            self.base = run_with_cache(model, self.adapter, base_ids, ("head", "mlp_out"), keep_kv=True)
            self.source = run_with_cache(model, self.adapter, source_ids, ("head", "mlp_out"))
            self.prefix = PrefixReuse(model, self.adapter, self.base)
        else:
            self.base = run_padded_with_cache(model, self.adapter, base_ids, padding, ("head", "mlp_out"), keep_kv=True)
            self.source = run_padded_with_cache(model, self.adapter, source_ids, padding, ("head", "mlp_out"))
            self.prefix = RowPrefixReuse(model, self.adapter, self.base, padding)
        # What the attention output projection makes of the source run's heads: [P, L, T, d]
        self.source_out = torch.stack([proj(self.source.acts["head"][:, layer].contiguous())
                                       for layer, proj in enumerate(self.adapter.out_proj)], dim=1)
        self.n_pairs, seq_len = base_ids.shape
        self.first = _shared_first(self.prefix, base_ids, source_ids)
        # Each pair's own first differing position: rows of pairs that part later can start later.
        self.pair_first = (first_difference(base_ids, source_ids).cpu().clamp(self.first, seq_len - 1)
                           if self.prefix.enabled else torch.zeros(self.n_pairs, dtype=torch.long))
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

    def _run(self, pair_idx: torch.Tensor, keep_head: torch.Tensor, keep_mlp: torch.Tensor, resid: torch.Tensor,
             layer: int, layer_inputs) -> torch.Tensor:
        """Layers layer..L-1 on residuals [R, T'', d] (the last T'' positions) of base rows `pair_idx` with per-row
        keep tables (see `_dense_keep`); the final position's residual [R, d].

        A patched output is the source run's whatever its input, so the attention output projection
        and the MLP run only at the positions where something is kept (packed, all rows at once), the
        last layer only at the final position; a layer that keeps everything runs unhooked."""
        adapter, device = self.adapter, resid.device
        n_heads, last, offset = (adapter.n_heads, adapter.n_layers - 1,
                                 self.base.acts["resid_pre"].shape[2] - resid.shape[1])
        rows = pair_idx.to(device)
        classes = self.classes[pair_idx, offset - self.first:]  # [R, T'']
        final = torch.arange(classes.shape[1]) == classes.shape[1] - 1  # [T'']
        handles = []
        with installed(handles):
            for at in range(layer, adapter.n_layers):
                keep_h = keep_head[:, at].gather(1, classes[..., None].expand(-1, -1, n_heads))  # [R, T'', H]
                keep_m = keep_mlp[:, at].gather(1, classes)  # [R, T'']
                if bool((keep_h == 1).all()) and bool((keep_m == 1).all()) and at < last:
                    continue
                computed_h, computed_m = (keep_h != 0).any(-1), keep_m != 0  # [R, T'']
                if at == last:
                    computed_h, computed_m = computed_h & final, computed_m & final
                source_z = self.source.acts["head"][rows, at, offset:]
                source_z = source_z.reshape(*source_z.shape[:-1], n_heads, -1)  # [R, T'', H, d_head]
                keep_heads = keep_h[..., None].to(device)  # [R, T'', H, 1]

                def mix_heads(z, keep=keep_heads, source=source_z):
                    return _mix(keep, z.reshape(source.shape), source).reshape(z.shape)

                handles += _computed_only(adapter.out_proj[at], computed_h.to(device),
                                          self.source_out[rows, at, offset:], before=mix_heads)
                handles += _computed_only(adapter.mlp[at], computed_m.to(device),
                                          self.source.acts["mlp_out"][rows, at, offset:], keep=keep_m.to(device))
            return run_layers(adapter, resid, layer, layer_inputs, final_only=False)

    @torch.no_grad()
    def _final_resid(self, pair_idx: torch.Tensor, keep_head: torch.Tensor, keep_mlp: torch.Tensor, start: int,
                     from_base: torch.Tensor, record: bool = False, first: int | None = None):
        """Final residuals [R, d] of base rows `pair_idx` with per-row keep tables, computed from layer
        `start` (rows `from_base` start from the base run's residual there, the others from the source
        run's plus the embedding difference) and position `first` (default: the first that differs in any
        pair; a later one when these pairs all part after it). With `record`, also what a run relative to
        this one reuses: the residual entering every layer [R, L, T', d] and every layer's keys and values
        (positions before `first` are the base run's; layers below `start` too, when they keep everything)."""
        adapter = self.adapter
        first = self.first if first is None else first
        rows = pair_idx.to(self.base.final_resid.device)
        layer_inputs, cache = self.prefix.with_cache(pair_idx, first, start)  # before the hooks: it may run the model
        base_resid = self.base.acts["resid_pre"]
        resid = base_resid[rows, start, first:]
        if start > 0 and not bool(from_base.all()):
            source_resid = self.source.acts["resid_pre"]
            embedding_difference = base_resid[rows, 0, first:] - source_resid[rows, 0, first:]
            resid = torch.where(from_base.to(resid.device)[:, None, None], resid,
                                source_resid[rows, start, first:] + embedding_difference)
        if not record:
            return self._run(pair_idx, keep_head, keep_mlp, resid, start, layer_inputs)
        with capture(adapter, ("resid_pre",), layers=range(start, adapter.n_layers)) as seen:
            final = self._run(pair_idx, keep_head, keep_mlp, resid, start, layer_inputs)
        entering = torch.stack([base_resid[rows, layer, first:] if layer < start else seen.acts["resid_pre"][layer]
                                for layer in range(adapter.n_layers)], dim=1)
        kv = None
        if cache is not None:
            kv = [(k[rows], v[rows]) if layer < start else (cache.layers[layer].keys, cache.layers[layer].values)
                  for layer, (k, v) in enumerate(self.base.kv)]
        return final, entering, kv

    def _check_nodes(self, nodes: Nodes) -> None:
        if len(nodes) and (int(nodes.cls.max()) >= self.n_classes or int(nodes.cls.min()) < 0):
            raise ValueError(f"node classes must lie in 0..{self.n_classes - 1}")
        if bool((nodes.kind == EMBED).any()):
            raise ValueError("embedding nodes are inputs, not circuit members: leave them out of circuit masks")

    @torch.no_grad()
    def metrics(self, nodes: Nodes, masks: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """masks [C, N] (bool, or float for interpolation) -> metric [C, P'] on `pairs` (indices, default all P)."""
        masks = masks.cpu()
        if masks.ndim != 2 or masks.shape[1] != len(nodes):
            raise ValueError(f"masks must be [circuits, {len(nodes)} nodes], got {tuple(masks.shape)}")
        self._check_nodes(nodes)
        pairs = torch.arange(self.n_pairs) if pairs is None else pairs.cpu().long()
        n_circuits, n_pairs = masks.shape[0], len(pairs)
        keep_head, keep_mlp = _dense_keep(nodes, masks, self.adapter.n_layers, self.n_classes, self.adapter.n_heads)
        start_layer, from_base = self._start_layers(keep_head, keep_mlp)
        # Rows (circuit, pair) in order of the pair's first differing position, then the circuit's start layer:
        # a batch starts at its first row's position and holds rows that part at most FIRST_SLACK later.
        n_rows = n_circuits * n_pairs
        circuit_of = torch.arange(n_circuits).repeat_interleave(n_pairs)
        column_of = torch.arange(n_pairs).repeat(n_circuits)
        pair_first = self.pair_first[pairs][column_of]
        order = torch.argsort(pair_first * (self.adapter.n_layers + 1) + start_layer[circuit_of], stable=True)
        sorted_first = pair_first[order]
        out = torch.empty(n_circuits, n_pairs, dtype=self.metric_full.dtype)
        begin = 0
        while begin < n_rows:
            first = int(sorted_first[begin])
            stop = min(begin + self.batch_rows, int(torch.searchsorted(sorted_first, first + FIRST_SLACK, right=True)))
            flat = order[begin:stop]
            circuit, column = circuit_of[flat], column_of[flat]
            pair = pairs[column]
            final = self._final_resid(pair, keep_head[circuit], keep_mlp[circuit], int(start_layer[circuit].min()),
                                      from_base[circuit], first=first)
            out[circuit, column] = measure(self.adapter, self.metric, self.answers, final, pair).cpu()
            begin = stop
        return out

    @torch.no_grad()
    def without_each(self, nodes: Nodes, circuit: torch.Tensor | None = None,
                     batch_tokens: int | None = None) -> torch.Tensor:
        """[M, P]: the metric of a circuit without each of its M members in turn; equal to `metrics` of
        those M masks, computed relative to the circuit's own run. `circuit` is a bool mask [N] over
        `nodes`; None stands for every head and MLP of the model (the base run), whose members are `nodes`.

        The circuit runs once, recording its residuals and keys/values. A row is one (member, pair): below
        the member's layer and before the first position of its class nothing changes, so the row starts
        from the circuit's residual there and attends to the circuit's cached keys and values for the rest
        (layer skip, prefix reuse, as the sweep does from the base run); a pair without a position of the
        member's class (or, at the last layer, without the final position in it) keeps the circuit's
        metric. A batch holds rows of one layer from one first position on, at most about `batch_tokens`
        computed tokens; rows that start later join it while the positions they compute without changing
        them stay under SMALL_BATCH_SLACK (a batch costs a fixed overhead per layer too).
        """
        self._check_nodes(nodes)
        n_layers, n_heads, device = self.adapter.n_layers, self.adapter.n_heads, self.base.final_resid.device
        all_pairs = torch.arange(self.n_pairs)
        if circuit is None and not self.all_classified:
            # positions in no class are patched in every circuit: the full circuit is not the base run
            everything = torch.ones(len(nodes), dtype=torch.bool)
            return self.metrics(nodes, everything[None] & ~torch.eye(len(nodes), dtype=torch.bool))
        if circuit is None:  # the base run; positions in no class hold the same values in both runs
            members = torch.arange(len(nodes))
            keep_head = torch.ones(1, n_layers, self.n_classes + 1, n_heads, dtype=torch.bool)
            keep_mlp = torch.ones(1, n_layers, self.n_classes + 1, dtype=torch.bool)
            metric_circuit, entering, kv = (self.metric_full, self.base.acts["resid_pre"][:, :, self.first:],
                                            self.base.kv)
        else:
            circuit = circuit.cpu().bool()
            if circuit.shape != (len(nodes),):
                raise ValueError(f"the circuit must be a mask over the {len(nodes)} nodes, got {tuple(circuit.shape)}")
            members = circuit.nonzero().squeeze(1)
            keep_head, keep_mlp = _dense_keep(nodes, circuit[None], n_layers, self.n_classes, n_heads)  # [1, ...]
            start, from_base = self._start_layers(keep_head, keep_mlp)
            final, entering, kv = self._final_resid(all_pairs, keep_head.expand(self.n_pairs, -1, -1, -1),
                                                    keep_mlp.expand(self.n_pairs, -1, -1), int(start),
                                                    from_base.expand(self.n_pairs), record=True)
            metric_circuit = measure(self.adapter, self.metric, self.answers, final, all_pairs).cpu()
        out = metric_circuit[None].repeat(len(members), 1)
        member = nodes.select(members)
        in_class = self.classes[None] == member.cls[:, None, None]  # [M, P, T']
        in_class[member.layer == n_layers - 1, :, :-1] = False  # at the last layer only the final position is read
        if kv is None:  # no prefix to reuse: every row computes every position from `first`
            in_class[..., 0] |= in_class.any(-1)
        member_rows, pair_rows = in_class.any(-1).nonzero(as_tuple=True)
        begin = in_class[member_rows, pair_rows].float().argmax(-1)  # from self.first
        layer = member.layer[member_rows]
        order = torch.argsort(layer * (in_class.shape[-1] + 1) + begin, stable=True)
        member_rows, pair_rows, begin, layer = member_rows[order], pair_rows[order], begin[order], layer[order]
        token_budget = batch_tokens or (32768 if device.type == "cuda" else 2048)
        n_computed = in_class.shape[-1]
        start, n_rows = 0, len(member_rows)
        while start < n_rows:
            at, b = int(layer[start]), int(begin[start])
            most = min(self.batch_rows, max(1, token_budget // (n_computed - b)))
            stop, waste = start, 0
            while stop < n_rows and int(layer[stop]) == at and stop - start < most:
                run = int(((layer[stop:] == at) & (begin[stop:] == begin[stop])).sum())  # sorted: contiguous
                extra = run * (int(begin[stop]) - b)  # positions computed that these rows do not change
                if stop > start and waste + extra > SMALL_BATCH_SLACK:
                    break
                stop, waste = min(stop + run, start + most), waste + extra
            idx, pair_idx = member_rows[start:stop], pair_rows[start:stop]
            head, mlp = keep_head.repeat(len(idx), 1, 1, 1), keep_mlp.repeat(len(idx), 1, 1)
            removed = member.select(idx)
            is_head, rows = removed.kind == HEAD, torch.arange(len(idx))
            head[rows[is_head], at, removed.cls[is_head], removed.head[is_head]] = False
            mlp[rows[~is_head], at, removed.cls[~is_head]] = False
            rows_on = pair_idx.to(device)
            layer_inputs = (self.prefix.layer_inputs(pair_idx, self.first + b, at, kv) if kv is not None
                            else self.prefix.layer_inputs(pair_idx, self.first, at))
            final = self._run(pair_idx, head, mlp, entering[rows_on, at, b:], at, layer_inputs)
            out[idx, pair_idx] = measure(self.adapter, self.metric, self.answers, final, pair_idx).cpu()
            start = stop
        return out

    def single_node_metrics(self, nodes: Nodes, batch_tokens: int | None = None) -> torch.Tensor:
        """[N, P]: the metric with node n alone patched from the source run and every other node kept: the
        full circuit (the base run) without each node."""
        return self.without_each(nodes, None, batch_tokens)


def faithfulness(metric_circuit: torch.Tensor, metric_full: torch.Tensor,
                 metric_empty: torch.Tensor) -> torch.Tensor:
    """f per circuit from metrics [C, P]: ratio of pair means,
    (mean m(C) - mean m(empty)) / (mean m(full) - mean m(empty))."""
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
    # [S, R + 1, P]: metric with only the path s -> r patched (r = R: the logits); nan = no path
    metric_path: torch.Tensor
    metric_base: torch.Tensor  # [P]
    metric_source: torch.Tensor  # [P]

    def effects(self) -> torch.Tensor:
        """Normalised path effects [S, R + 1, P]: (m_path - m_base) / (m_source - m_base)."""
        return (self.metric_path - self.metric_base) / (self.metric_source - self.metric_base)


@torch.no_grad()
def path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
               position_classes: torch.Tensor, senders: Nodes, receivers: Nodes, metric: str = "logit_diff",
               max_batch_rows: int | None = None) -> PathResult:
    """Path patching between single nodes: `group_path_patch` with a group per node."""
    return group_path_patch(model, base_ids, source_ids, answers, position_classes,
                            [senders.select([i]) for i in range(len(senders))],
                            [receivers.select([i]) for i in range(len(receivers))], metric, max_batch_rows)


@torch.no_grad()
def group_path_patch(model: nn.Module, base_ids: torch.Tensor, source_ids: torch.Tensor, answers: Answers,
                     position_classes: torch.Tensor, senders: list[Nodes], receivers: list[Nodes],
                     metric: str = "logit_diff", max_batch_rows: int | None = None) -> PathResult:
    """Path patching between groups of nodes: for every sender group S and receiver group R (and the
    logits as a last receiver), the base run's metric when only the inputs of R's members see the
    source-run outputs of S's members (each member r through the direct paths from the members of S that
    come before it), everything else as in the base run.

    Pass 1 (one layer per member r): r's layer runs on the base residual with the summed output
    differences of its senders added to the input of r's norm only; r's output at its positions is kept.
    Pass 2: the base run from R's lowest layer and the first position of its members' classes (the
    cached keys and values before it), with every member's output at its positions replaced by that.
    The logits as receiver: S's summed difference at the final position added to the base run's final
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
    prefix = PrefixReuse(model, adapter, base)
    n_pairs, seq_len = base_ids.shape
    all_pairs = torch.arange(n_pairs)
    metric_base = measure(adapter, metric, answers, base.final_resid, all_pairs).cpu()
    metric_source = measure(adapter, metric, answers, source.final_resid, all_pairs).cpu()
    classes = position_classes.to(device)
    members = Nodes.concat(senders)
    owner = torch.cat([torch.full((len(g),), s) for s, g in enumerate(senders)])  # each sender member's group
    deltas = (node_writes(adapter, source, members, classes)
              - node_writes(adapter, base, members, classes))  # [M, P, T, d]
    batch_rows = max_batch_rows or rows_that_fit(model, adapter, seq_len)
    out = torch.full((len(senders), len(receivers) + 1, n_pairs), float("nan"))

    # The logits as receiver: the direct paths from the final position.
    for s in range(len(senders)):
        final = base.final_resid + deltas[owner == s, :, -1].sum(0)
        out[s, -1] = measure(adapter, metric, answers, final, all_pairs).cpu()

    for r, group in enumerate(receivers):
        reach = torch.tensor([[is_path(model, members, j, group, i) for i in range(len(group))]
                              for j in range(len(members))], dtype=torch.bool).reshape(len(members), len(group))
        valid = [s for s in range(len(senders)) if bool(reach[owner == s].any())]
        n_rows = len(valid) * n_pairs
        for start in range(0, n_rows, batch_rows):
            flat = torch.arange(start, min(start + batch_rows, n_rows))
            sender_idx, pair_idx = torch.tensor(valid)[flat // n_pairs], flat % n_pairs
            rows = pair_idx.to(device)
            received = []
            for i in range(len(group)):
                delta = torch.zeros_like(deltas[0, rows])  # [R, T, d]
                for j in (reach[:, i] & torch.isin(owner, sender_idx)).nonzero().squeeze(1).tolist():
                    delta += (sender_idx == owner[j]).to(device)[:, None, None] * deltas[j, rows]
                received.append(_receiver_output(adapter, base, group, i, delta, rows))
            final = _with_receiver_outputs(adapter, base, prefix, group, received, classes, pair_idx)
            out[sender_idx, r, pair_idx] = measure(adapter, metric, answers, final, pair_idx).cpu()
    return PathResult(out, metric_base, metric_source)


def _receiver_output(adapter: Adapter, base: RunCache, receivers: Nodes, r: int, delta: torch.Tensor,
                     rows: torch.Tensor) -> torch.Tensor:
    """Pass 1: receiver r's output [R, T, width] when its input norm alone sees base + delta."""
    kind, layer, head = int(receivers.kind[r]), int(receivers.layer[r]), int(receivers.head[r])
    block = adapter.layers[layer]
    norm = getattr(block, INPUT_NORMS[adapter.family][0 if kind == HEAD else 1])
    add_delta = norm.register_forward_pre_hook(lambda m, args: (args[0] + delta,) + tuple(args[1:]))
    with installed([add_delta]), capture(adapter, (OUTPUT[kind],), layers=[layer]) as run:
        args, kwargs = base.layer_inputs[layer]
        block(base.acts["resid_pre"][rows, layer], *args, **kwargs)
    out = run.acts[OUTPUT[kind]][layer]
    if kind == HEAD:
        d_head = adapter.d_head
        return out[..., head * d_head:(head + 1) * d_head]
    return out


def _with_receiver_outputs(adapter: Adapter, base: RunCache, prefix: PrefixReuse, receivers: Nodes,
                           received: list[torch.Tensor], classes: torch.Tensor, pair_idx: torch.Tensor) -> torch.Tensor:
    """Pass 2: the base run from the receivers' lowest layer and the first position of their classes (in
    these pairs), with receiver i's output at its positions replaced by received[i] [R, T, width]."""
    rows = pair_idx.to(classes.device)
    where = classes[rows][None] == receivers.cls.to(classes.device)[:, None, None]  # [m, R, T]
    first = prefix.start(int(where.any(0).any(0).float().argmax()))
    layer = int(receivers.layer.min())

    def last(x, n):  # the last n positions (the last layer sees the final position alone)
        return x[:, x.shape[1] - n:]

    def replace(i):
        kind, head, d_head = int(receivers.kind[i]), int(receivers.head[i]), adapter.d_head
        mask, value = where[i, :, first:, None], received[i][:, first:]

        def patch_head(z):
            z = z.clone()
            n = z.shape[1]
            part = z[..., head * d_head:(head + 1) * d_head]
            z[..., head * d_head:(head + 1) * d_head] = torch.where(last(mask, n), last(value, n), part)
            return z

        def patch_mlp(live):
            n = live.shape[1]
            return torch.where(last(mask, n), last(value, n), live)

        return edit_activation(adapter, OUTPUT[kind], int(receivers.layer[i]),
                               patch_head if kind == HEAD else patch_mlp)

    layer_inputs = prefix.layer_inputs(pair_idx, first, layer)  # before the hooks: it may run the model
    with installed([replace(i) for i in range(len(receivers))]):
        return run_layers(adapter, base.acts["resid_pre"][rows, layer, first:], layer, layer_inputs)


# ---- a circuit at generation time ------------------------------------------------------------------

def node_masks(adapter: Adapter, nodes: Nodes, selected: torch.Tensor, position_classes: torch.Tensor):
    """Where the `selected` nodes ([N] bool) act, per pair: heads [P, L, T, H] and MLPs [P, L, T] bool
    (a node covers its layer, its head or the MLP, and every position of its class)."""
    n_pairs, seq_len = position_classes.shape
    heads = torch.zeros(n_pairs, adapter.n_layers, seq_len, adapter.n_heads, dtype=torch.bool)
    mlps = torch.zeros(n_pairs, adapter.n_layers, seq_len, dtype=torch.bool)
    for n in torch.nonzero(selected).flatten().tolist():
        kind, layer, head, cls = nodes.key(n)
        where = position_classes == cls  # [P, T]
        if kind == HEAD:
            heads[:, layer, :, head] |= where
        elif kind == MLP:
            mlps[:, layer] |= where
    return heads, mlps


def prompt_patch_hooks(adapter: Adapter, source: RunCache, patched_heads: torch.Tensor,
                       patched_mlps: torch.Tensor) -> list:
    """Hooks setting each head and MLP output to the source run's wherever patched_heads [P, L, T, H] /
    patched_mlps [P, L, T] say, on a forward over the whole T-token prompt (a generation's first pass).
    The passes after it compute one new token each from the KV cache and are not patched: a generated
    position has no source counterpart, and it reads the patched prompt through the cached keys/values."""
    n_pairs, n_layers, seq_len, n_heads = patched_heads.shape
    device = source.final_resid.device
    heads, mlps = patched_heads.to(device), patched_mlps.to(device)

    def patch_heads(layer):
        def edit(x):  # [P, T, H * d_head]
            if x.shape[1] != seq_len:
                return x
            split = lambda t: t.reshape(n_pairs, seq_len, n_heads, -1)  # noqa: E731
            return torch.where(heads[:, layer, :, :, None], split(source.acts["head"][:, layer]),
                               split(x)).reshape(x.shape)
        return edit

    def patch_mlp(layer):
        def edit(x):  # [P, T, d]
            if x.shape[1] != seq_len:
                return x
            return torch.where(mlps[:, layer, :, None], source.acts["mlp_out"][:, layer], x)
        return edit

    handles = []
    for layer in range(n_layers):
        if heads[:, layer].any():
            handles.append(edit_activation(adapter, "head", layer, patch_heads(layer)))
        if mlps[:, layer].any():
            handles.append(edit_activation(adapter, "mlp_out", layer, patch_mlp(layer)))
    return handles
