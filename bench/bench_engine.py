"""Packed engine vs the plain one-forward-per-patch reference, side by side in one process.

The full `resid_pre` layer x position sweep over N pairs on a Llama-shaped random-weight model: both
methods run on the same inputs, their metrics are checked to agree, and the speed ratio is printed.
The pairs differ at one token, a third of the way in (as chat-templated minimal pairs do, later).

    python bench/bench_engine.py                      # 4 layers, 32 pairs (the issue's CPU setting)
    python bench/bench_engine.py --layers 8 --pairs 64 --seq-len 48 --device cuda --dtype bfloat16
    python bench/bench_engine.py --component mlp_out --all-positions   # one whole-sequence patch per layer
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.engine.adapters import get_adapter
from pipeline.engine.hooks import COMPONENTS
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import sweep, variants_for
from pipeline.engine.reference import reference_sweep


def build(args):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=4 * args.d_model,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads // 2,
        max_position_embeddings=max(128, args.seq_len), initializer_range=0.1,
    )
    model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype)).eval()
    clean = torch.randint(0, args.vocab, (args.pairs, args.seq_len))
    corrupted = clean.clone()
    corrupted[:, args.seq_len // 3] = torch.randint(0, args.vocab, (args.pairs,))  # a one-token minimal pair
    answers = Answers(torch.randint(0, args.vocab, (args.pairs, 1)), torch.randint(0, args.vocab, (args.pairs, 1)))
    return model, clean, corrupted, answers


def timed(fn):
    start = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--component", default="resid_pre", choices=COMPONENTS)
    parser.add_argument("--all-positions", action="store_true", help="one patch per layer (or head) over all positions")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    model, clean, corrupted, answers = build(args)
    variants = variants_for(get_adapter(model), args.component, args.seq_len, per_position=not args.all_positions)
    n_patches = args.pairs * len(variants)
    where = "all positions" if args.all_positions else f"{args.seq_len} positions"
    print(f"{args.component} sweep: {args.layers} layers x {where} x {args.pairs} pairs = {n_patches} patches "
          f"(d_model {args.d_model}, {args.dtype} on {args.device})")

    sweep(model, clean[:2], corrupted[:2], answers.index(torch.arange(2)), variants)  # warm-up
    fast, t_fast = timed(lambda: sweep(model, clean, corrupted, answers, variants))
    ref, t_ref = timed(lambda: reference_sweep(model, clean, corrupted, answers, variants))

    max_diff = (fast.metric_patched - ref.metric_patched).abs().max().item()
    tolerance = 1e-4 if args.dtype == "float32" else 5e-2 * ref.metric_patched.abs().max().item()
    print(f"reference (one forward per patch): {t_ref:8.2f} s  {n_patches / t_ref:10.0f} patches/s")
    print(f"patchsweep (packed, layer-skip):   {t_fast:8.2f} s  {n_patches / t_fast:10.0f} patches/s")
    print(f"max |difference| of patched metrics: {max_diff:.2e} (tolerance {tolerance:.0e})")
    print(f"speed ratio: {t_ref / t_fast:.1f}x")
    if max_diff > tolerance:
        raise SystemExit("the engine and the reference disagree")


if __name__ == "__main__":
    main()
