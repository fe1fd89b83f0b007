"""What every part of the engine shares: hook points, capture, layer replay and prefix reuse.

Hook points, per layer l (adapters.py names the modules):
  resid_pre  the hidden state entering decoder layer l
  attn_out   the attention module's output
  mlp_out    the MLP module's output
  head       the input to the attention output projection: the heads' outputs side by side

`edit_activation` is the one place that knows how each point is hooked; `capture` records them through
it, for the cached runs of the fast paths, for the plain references and for attribution's graph.

Replay: the model passes each decoder layer extra arguments (rotary embeddings, causal masks,
per-layer attention types). They are recorded once per sequence length and replayed on any batch of
residuals, so a run can start at any layer from a cached residual (`run_layers`).

Prefix reuse: causal attention leaves every position before a run's first change as it is at every
layer, so such rows compute only the positions from there on and attend to the base run's cached
keys and values for the rest (`PrefixReuse`; `first_difference` says where a pair's prompts part).

Also shared: `Rows` (patch variants and circuit nodes are tables of parallel tensors) and
`rows_that_fit` (how many rows one batch holds).
"""
from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, fields

import torch
from torch import nn

from .adapters import Adapter

COMPONENTS = ("resid_pre", "attn_out", "mlp_out", "head")


class Rows:
    """Parallel int64 tensors, one entry per row (patch variants, circuit nodes); subclasses are dataclasses."""

    def __len__(self) -> int:
        return len(getattr(self, fields(self)[0].name))

    def select(self, idx):
        idx = torch.as_tensor(idx, dtype=torch.long)
        return type(self)(*(getattr(self, f.name)[idx] for f in fields(self)))

    @classmethod
    def concat(cls, parts: list):
        return cls(*(torch.cat([getattr(p, f.name) for p in parts]) for f in fields(cls)))


def output_tensor(output) -> torch.Tensor:
    """The tensor a module returns (attention modules, and decoder layers in some versions, return tuples)."""
    return output[0] if isinstance(output, tuple) else output


def edit_activation(adapter: Adapter, component: str, layer: int, edit: Callable[[torch.Tensor], torch.Tensor]):
    """Hook `component` at `layer` so that the model goes on with edit(activation) in its place; the handle."""
    if component == "resid_pre":
        def pre(module, args, kwargs):
            if args:
                return (edit(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": edit(kwargs["hidden_states"])}

        return adapter.layers[layer].register_forward_pre_hook(pre, with_kwargs=True)
    if component == "head":
        return adapter.out_proj[layer].register_forward_pre_hook(lambda m, args: (edit(args[0]),) + tuple(args[1:]))

    def post(module, args, output):
        if isinstance(output, tuple):
            return (edit(output[0]),) + tuple(output[1:])
        return edit(output)

    return adapter.hook_module(component, layer).register_forward_hook(post)


@contextmanager
def installed(handles: list):
    """Hook handles stay in place for the with-block (including any appended inside it), then are removed."""
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@dataclass
class Capture:
    """What `capture` recorded during the forward passes of its with-block."""

    acts: dict[str, list[torch.Tensor | None]]  # component -> per layer [R, T, width]
    final: torch.Tensor | None = None  # [R, d]: the final position's residual after the last layer


@contextmanager
def capture(adapter: Adapter, components: Iterable[str] = COMPONENTS, keep=torch.Tensor.detach,
            first_input: Callable[[torch.Tensor], torch.Tensor] | None = None, layers: Iterable[int] | None = None):
    """Record `components` at `layers` (all by default) and the final position's residual.

    `keep` is what is stored of each activation: detach (cached runs), clone (the references: a copy that
    nothing run later can change), or `lambda t: t` to keep it in the autograd graph (attribution).
    `first_input`, when given, replaces the residual entering layer 0 before anything reads it (attribution
    makes it a leaf that needs a gradient, so the graph exists even when the weights are frozen).
    """
    run = Capture({c: [None] * adapter.n_layers for c in components})

    def recorder(component, layer):
        def record(tensor):
            run.acts[component][layer] = keep(tensor)
            return tensor

        return record

    handles = [edit_activation(adapter, "resid_pre", 0, first_input)] if first_input else []
    for layer in range(adapter.n_layers) if layers is None else layers:
        handles += [edit_activation(adapter, c, layer, recorder(c, layer)) for c in run.acts]
    handles.append(adapter.layers[-1].register_forward_hook(
        lambda m, a, o: setattr(run, "final", output_tensor(o)[:, -1])))
    with installed(handles):
        yield run


@dataclass
class RunCache:
    """What one forward pass over a set of pairs leaves behind for patching."""

    acts: dict[str, torch.Tensor]  # component -> [P, L, T, width]; resid_pre always present
    final_resid: torch.Tensor  # [P, d]: the final position's residual after the last layer
    layer_inputs: list[tuple[tuple, dict]]  # per layer: the extra args and kwargs the model passes it
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: keys, values [P, kv_heads, T, d_head]


@torch.no_grad()
def run_with_cache(
    model: nn.Module, adapter: Adapter, ids: torch.Tensor, components=("resid_pre",), keep_kv: bool = False
) -> RunCache:
    """Forward `ids` [P, T] through the model body, caching `components` at every layer (and the
    keys/values, when `keep_kv`, so that patched rows can reuse the unchanged prefix)."""
    wanted = set(components) | {"resid_pre"}
    with capture(adapter, wanted) as run:
        out = model.base_model(input_ids=ids, use_cache=keep_kv)
    kv = None
    if keep_kv:
        cache = out.cache if hasattr(out, "cache") else out.past_key_values
        kv = [(layer.keys, layer.values) for layer in cache.layers]
        # Sliding-window caches keep only the last window of positions: no full prefix to reuse.
        if any(k is None or k.shape[-2] != ids.shape[1] for k, _ in kv):
            kv = None
    acts = {c: torch.stack(run.acts[c], dim=1) for c in wanted}
    layer_inputs = full_length_inputs(model, adapter, ids.shape[1])
    return RunCache(acts=acts, final_resid=run.final, layer_inputs=layer_inputs, kv=kv)


@torch.no_grad()
def run_with_cache_after(model: nn.Module, adapter: Adapter, ids: torch.Tensor, components, prefix: RunCache,
                         first: int) -> RunCache:
    """`run_with_cache` of `ids` [P, T] whose tokens before `first` are those of the run `prefix` (the same
    rows and length, its keys/values and `components` cached): every activation before `first` is that
    run's (causal attention), so only positions first..T-1 are computed, attending to its keys and values."""
    wanted = set(components) | {"resid_pre"}
    first = min(first, ids.shape[1] - 1)  # the final position is computed always: its residual is the result
    if first == 0 or prefix.kv is None or not wanted <= set(prefix.acts):
        return run_with_cache(model, adapter, ids, components)
    cache = prefix_cache(model, prefix.kv, torch.arange(ids.shape[0]), first)
    with capture(adapter, wanted) as run:
        model.base_model(input_ids=ids[:, first:], cache=cache, use_cache=True)
    acts = {c: torch.cat([prefix.acts[c][:, :, :first], torch.stack(run.acts[c], dim=1)], dim=2) for c in wanted}
    return RunCache(acts=acts, final_resid=run.final, layer_inputs=prefix.layer_inputs)


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
    with installed(handles):
        model.base_model(input_ids=ids, cache=cache, use_cache=cache is not None)
    return recorded


def bind_cache(layer_inputs, cache):
    """Recorded layer inputs with this row batch's KV cache in the place the recording's cache held."""
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


def prefix_cache_joining(model: nn.Module, kv, rows: torch.Tensor, joined: list[int], prefix_len: int,
                         first_layer: int = 0):
    """`prefix_cache` for rows that join a batch at different layers: layer l holds rows[:joined[l]]."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    for layer in range(first_layer, len(kv)):
        keys, values = kv[layer]
        present = rows[:joined[layer]]
        cache.layers[layer].update(keys[present, :, :prefix_len], values[present, :, :prefix_len])
    return cache


def run_layers(adapter: Adapter, resid: torch.Tensor, start: int, layer_inputs,
               final_only: bool = True) -> torch.Tensor:
    """Run decoder layers start..L-1 on residuals [R, T, d]; returns the final position's residual [R, d].

    Only the final position's output is read, so the last layer's attention output projection and MLP
    see that position alone (the residual add broadcasts it back); its keys and values still cover
    every position the final query attends to. `final_only=False` leaves that to the caller's hooks.
    """
    last = adapter.n_layers - 1
    handles = []
    if final_only and start <= last and resid.shape[1] > 1:
        handles = [adapter.out_proj[last].register_forward_pre_hook(_final_position_only),
                   adapter.mlp[last].register_forward_pre_hook(_final_position_only)]
    with installed(handles):
        for layer in range(start, adapter.n_layers):
            args, kwargs = layer_inputs[layer]
            resid = output_tensor(adapter.layers[layer](resid, *args, **kwargs))
    return resid[:, -1]


def run_layers_joining(adapter: Adapter, join: Callable[[int, torch.Tensor | None], torch.Tensor], start: int,
                       layer_inputs) -> torch.Tensor:
    """`run_layers` for rows that join the batch at different layers (one forward per layer for them all):
    join(layer, resid) is the batch entering `layer`, the rows so far (None before the first) with those
    joining there appended; layer_inputs hold each layer's batch. The final position's residual [R, d]."""
    last = adapter.n_layers - 1
    resid = None
    with installed([adapter.out_proj[last].register_forward_pre_hook(_final_position_only),
                    adapter.mlp[last].register_forward_pre_hook(_final_position_only)]):
        for layer in range(start, adapter.n_layers):
            resid = join(layer, resid)
            args, kwargs = layer_inputs[layer]
            resid = output_tensor(adapter.layers[layer](resid, *args, **kwargs))
    return resid[:, -1]


def _final_position_only(module, args):
    return (args[0][:, -1:],) + tuple(args[1:])


_RECORDED: weakref.WeakKeyDictionary[nn.Module, dict] = weakref.WeakKeyDictionary()


def _recorded(model: nn.Module, seq_len: int) -> dict:
    """Per model, sequence length, device and dtype: recorded layer inputs by the first position computed
    ("all": the whole sequence; "layer": one token).
    They depend on positions only (rotary angles, causal masks), never on token values, so every run of
    the model shares them."""
    weight = next(model.parameters())
    return _RECORDED.setdefault(model, {}).setdefault((seq_len, weight.device, weight.dtype), {})


class PrefixReuse:
    """Layer inputs for rows that compute positions first..T-1 only, attending to the base run's cached
    keys and values for positions < first (every activation there is the base run's)."""

    def __init__(self, model: nn.Module, adapter: Adapter, base: RunCache, enabled: bool = True):
        self.model, self.adapter, self.base = model, adapter, base
        self.enabled = enabled and base.kv is not None  # no kv: a sliding-window cache holds no full prefix
        self.seq_len = base.acts["resid_pre"].shape[2]

    def start(self, first: int) -> int:
        """The first position computed by rows that change nothing before `first`."""
        return first if self.enabled else 0

    def layer_inputs(self, rows: torch.Tensor, first: int, layer: int, kv=None):
        """Per-layer inputs for base rows `rows` running layers layer..L-1 on positions first..T-1. The first
        call for a `first` runs the model to record them: call it before installing any edit. `kv` (per
        layer keys, values [P, kv_heads, T, d_head]) reuses another run's prefix than the base run's."""
        return self.with_cache(rows, first, layer, kv)[0]

    def with_cache(self, rows: torch.Tensor, first: int, layer: int, kv=None):
        """(layer inputs, the KV cache they hold, None when first == 0): after the run the cache holds the
        keys and values of every position at layers >= layer."""
        if first == 0:
            return self.base.layer_inputs, None
        cache = prefix_cache(self.model, self.base.kv if kv is None else kv, rows, first, layer)
        return bind_cache(self._suffix_inputs(first), cache), cache

    def layer_inputs_joining(self, rows: torch.Tensor, joined: list[int], first: int, layer: int):
        """`layer_inputs` for rows that join the batch at different layers: layer l's batch is rows[:joined[l]]."""
        if first == 0:
            return self.base.layer_inputs
        cache = prefix_cache_joining(self.model, self.base.kv, rows, joined, first, layer)
        return bind_cache(self._suffix_inputs(first), cache)

    def _suffix_inputs(self, first: int):
        recorded = _recorded(self.model, self.seq_len)
        if first not in recorded:
            one_row = prefix_cache(self.model, self.base.kv, torch.tensor([0]), first)
            # token ids give the suffix its length only
            ids = torch.zeros(1, self.seq_len - first, dtype=torch.long, device=self.base.final_resid.device)
            recorded[first] = record_layer_inputs(self.model, self.adapter, ids, one_row)
        return recorded[first]


def full_length_inputs(model: nn.Module, adapter: Adapter, seq_len: int) -> list[tuple[tuple, dict]]:
    """The layer inputs of a whole sequence of `seq_len` tokens (recorded once per model and length)."""
    recorded = _recorded(model, seq_len)
    if "all" not in recorded:
        weight = next(model.parameters())
        recorded["all"] = record_layer_inputs(model, adapter, torch.zeros(1, seq_len, dtype=torch.long,
                                                                          device=weight.device))
    return recorded["all"]


def one_token_inputs(model: nn.Module, adapter: Adapter) -> tuple[tuple, dict]:
    """A decoder layer's inputs for a one-token sequence (for a layer whose attention output the caller
    sets outright, so the token's position does not matter)."""
    recorded = _recorded(model, 1)
    if "layer" not in recorded:
        weight = next(model.parameters())
        recorded["layer"] = record_layer_inputs(model, adapter,
                                                torch.zeros(1, 1, dtype=torch.long, device=weight.device))[0]
    return recorded["layer"]


def first_difference(a_ids: torch.Tensor, b_ids: torch.Tensor) -> torch.Tensor:
    """[P]: each pair's first position whose tokens differ (the sequence length when none does). Every
    activation before it is the same in both runs."""
    differs = a_ids != b_ids
    seq_len = a_ids.shape[1]
    return torch.where(differs.any(1), differs.int().argmax(1),
                       torch.full_like(differs[:, 0], seq_len, dtype=torch.long))


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
