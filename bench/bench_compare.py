"""patchsweep against TransformerLens, nnsight and the plain loop, side by side on one sweep in one process.

The sweep: an organism's full exact sweep, `resid_pre`, `attn_out`, `mlp_out` at every layer x position
and every head at every layer x position, denoising (clean into corrupted), logit difference at the final
position, over N screened pairs of one length. Every method runs on the same weights and the same
inputs; their per-pair patched metrics are checked to agree before any time is printed.

  plain             one full forward per (pair, patch) with one hook (pipeline.engine.reference.reference_sweep)
  transformer_lens  TransformerLens 4.x `get_act_patch_*` on a TransformerBridge booted from the same weights
                    (one forward per patch over the batch of pairs: TransformerLens's own batching)
  nnsight           nnsight 0.8 on a `TransformersModel` of the same weights: one trace per (component,
                    layer[, head]) holding one invoke per position, which nnsight batches into one forward
                    over positions x pairs (its idiom for patching sweeps)
  patchsweep        pipeline.engine.patching.sweep

Each method's time includes loading its own copy of the model (milliseconds for refusal-tiny).

    make bench-compare            # refusal-tiny, 32 pairs (needs the optional bench extras: .venv-bench)
    python bench/bench_compare.py --model refusal-tiny --pairs 32 --methods plain,transformer_lens,nnsight,patchsweep
"""
from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from pipeline.engine.adapters import get_adapter
from pipeline.engine.hooks import COMPONENTS
from pipeline.engine.loading import load_model
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import Variants, sweep, variants_for
from pipeline.engine.reference import reference_sweep
from pipeline.organisms import resolve
from pipeline.schema import PromptsConfig
from pipeline.stages.pairs import run_in_process


def screened_pairs(model, tokenizer, n_pairs: int):
    """n screened refusal-tiny pairs of the most common length, as tensors."""
    with tempfile.TemporaryDirectory() as folder:  # the pairs stage, run in this process
        table = run_in_process(model, tokenizer, "refusal-tiny", PromptsConfig(n_pairs=16 * n_pairs, seed=0),
                               Path(folder))[0].to_pylist()
    length = Counter(r["seq_len"] for r in table).most_common(1)[0][0]
    rows = [r for r in table if r["seq_len"] == length][:n_pairs]
    clean = torch.tensor([r["clean_ids"] for r in rows])
    corrupted = torch.tensor([r["corrupted_ids"] for r in rows])
    answers = Answers(torch.tensor([r["refusal_ids"] for r in rows]), torch.tensor([r["compliance_ids"] for r in rows]))
    return clean, corrupted, answers


def full_variants(adapter, seq_len) -> Variants:
    return Variants.concat([variants_for(adapter, c, seq_len) for c in COMPONENTS])


def transformer_lens_sweep(path, clean, corrupted, answers) -> torch.Tensor:
    """TransformerLens's per-component patching functions -> [P, V] in `full_variants` order.

    The bridge gets its own copy of the weights: booting wraps the model's modules in hook points, which
    would otherwise slow down (and could change) every other method run on the same model object."""
    from transformer_lens import patching
    from transformer_lens.model_bridge import TransformerBridge

    model, _ = load_model(path)
    bridge = TransformerBridge.boot_transformers(path, hf_model=model, device=str(clean.device))
    bridge.enable_compatibility_mode()
    bridge.eval()
    refusal, compliance = answers.refusal, answers.compliance

    def logit_diff(logits):  # per pair, as patchsweep's logit_diff (answer sets here have no padding)
        final = logits[:, -1]
        return final.gather(1, refusal).mean(-1) - final.gather(1, compliance).mean(-1)

    with torch.no_grad():
        _, clean_cache = bridge.run_with_cache(clean)
    quiet = contextlib.redirect_stderr(io.StringIO())  # its progress bars
    with quiet, torch.no_grad():
        by_position = [
            getattr(patching, f"get_act_patch_{name}")(bridge, corrupted, clean_cache, logit_diff, reduce="none").values
            for name in ("resid_pre", "attn_out", "mlp_out")
        ]  # each [layer, pos, pair]
        heads = patching.get_act_patch_attn_head_out_by_pos(
            bridge, corrupted, clean_cache, logit_diff, reduce="none").values  # [layer, pos, head, pair]
    n_pairs = clean.shape[0]
    parts = [v.reshape(-1, n_pairs) for v in by_position]  # layer-major, then position: as variants_for
    parts.append(heads.permute(0, 2, 1, 3).reshape(-1, n_pairs))  # -> layer, head, position
    return torch.cat(parts).T.float()


def nnsight_sweep(path, clean, corrupted, answers, n_heads: int) -> torch.Tensor:
    """nnsight's activation patching -> [P, V] in `full_variants` order (Llama-family module names)."""
    from nnsight import TransformersModel
    from transformers import AutoTokenizer

    lm = TransformersModel(path, task="text-generation", tokenizer=AutoTokenizer.from_pretrained(path))
    n_layers, seq_len = len(lm.model.layers), clean.shape[1]
    refusal, compliance = answers.refusal, answers.compliance

    def site(layer: int, component: str):
        """The activation a component patches: the block's input (resid_pre), the attention output
        projection's input (heads: [.., n_heads x head_dim]), the attention and MLP outputs."""
        block = lm.model.layers[layer]
        if component == "resid_pre":
            return block.input
        if component == "head":
            return block.self_attn.o_proj.input
        return block.self_attn.output[0] if component == "attn_out" else block.mlp.output

    cache = {}
    with torch.no_grad(), lm.trace(clean):
        for layer in range(n_layers):
            for component in ("resid_pre", "head", "attn_out", "mlp_out"):  # nnsight wants the forward's order
                cache[component, layer] = site(layer, component).save()
    head_dim = cache["head", 0].shape[-1] // n_heads
    columns = []
    for component in COMPONENTS:
        for layer in range(n_layers):
            for head in range(n_heads) if component == "head" else [None]:
                width = slice(None) if head is None else slice(head * head_dim, (head + 1) * head_dim)
                final = []
                with torch.no_grad(), lm.trace() as tracer:
                    for position in range(seq_len):
                        with tracer.invoke(corrupted):
                            site(layer, component)[:, position, width] = cache[component, layer][:, position, width]
                            final.append(lm.lm_head.output[:, -1].save())
                columns += [logits.gather(1, refusal).mean(-1) - logits.gather(1, compliance).mean(-1)
                            for logits in final]
    return torch.stack(columns, dim=1).float()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="refusal-tiny")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--methods", default="plain,transformer_lens,nnsight,patchsweep")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")

    path = resolve(args.model)
    model, tokenizer = load_model(path)
    adapter = get_adapter(model)
    clean, corrupted, answers = screened_pairs(model, tokenizer, args.pairs)
    variants = full_variants(adapter, clean.shape[1])
    n_patches = clean.shape[0] * len(variants)
    print(f"{args.model}: {adapter.n_layers} layers, {adapter.n_heads} heads, {clean.shape[1]} tokens, "
          f"{clean.shape[0]} pairs; resid_pre + attn_out + mlp_out + head at every position = {n_patches} patches")

    runners = {
        "patchsweep": lambda: sweep(model, clean, corrupted, answers, variants).metric_patched,
        "plain": lambda: reference_sweep(model, clean, corrupted, answers, variants).metric_patched,
        "transformer_lens": lambda: transformer_lens_sweep(path, clean, corrupted, answers),
        "nnsight": lambda: nnsight_sweep(path, clean, corrupted, answers, adapter.n_heads),
    }
    results, seconds = {}, {}
    for name in methods:
        start = time.perf_counter()
        results[name] = runners[name]()
        seconds[name] = time.perf_counter() - start
    reference = results[methods[0]]
    diffs = {name: (results[name] - reference).abs().max().item() for name in methods}
    disagree = [f"{name} (max |diff| {diff:.1e})" for name, diff in diffs.items() if diff > 1e-4]
    if disagree:  # times of methods that compute something else mean nothing
        raise SystemExit(f"{', '.join(disagree)} disagree with {methods[0]}: no times printed")
    for name in methods:
        print(f"{name:>17}: {seconds[name]:8.2f} s  {n_patches / seconds[name]:10.0f} patches/s  "
              f"max |diff| vs {methods[0]}: {diffs[name]:.1e}")
    if "patchsweep" in seconds:
        for name in methods:
            if name != "patchsweep":
                print(f"patchsweep is {seconds[name] / seconds['patchsweep']:.1f}x faster than {name}")
    attribution_cost(model, clean, corrupted, answers)


def attribution_cost(model, clean, corrupted, answers, repeats: int = 5):
    """Attribution patching (every component at once) in forward-pass equivalents: its time over the time
    of one plain forward pass on the same [P, T] batch, best of `repeats` each."""
    from pipeline.engine.attribution import attribution_patching

    def best(fn):
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    with torch.no_grad():
        t_forward = best(lambda: model(clean))
    t_attribution = best(lambda: attribution_patching(model, clean, corrupted, answers))
    print(f"attribution patching (every component, every position): {t_attribution:.3f} s = "
          f"{t_attribution / t_forward:.1f} forward-pass equivalents (one forward: {t_forward * 1e3:.1f} ms)")


if __name__ == "__main__":
    main()
