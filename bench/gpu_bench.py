"""The GPU benchmark: patchsweep against the plain loop and the floating-point floor, bf16.

Prepared to run in a few minutes on one H200-class card (`bash bench/gpu_bench.sh`):
  - a Qwen2.5-0.5B-shaped model (random weights) and a Qwen2.5-1.5B-shaped one;
  - 32 pairs x 48 tokens; the full layer x position `resid_pre` grid, and the heads sweep (every layer x
    head over all positions);
  - methods side by side in one process: the plain one-forward-per-patch loop, per-layer packing (every
    position of a layer in one batch, no layer skip or prefix reuse), and patchsweep;
  - the floor: the FLOPs a patch really changes (layers >= l, positions >= p) at the card's measured
    bf16 matrix rate. Prints each method's time, the ratios, and patchsweep's distance from the floor.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from pipeline.engine.adapters import get_adapter
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import sweep, variants_for
from pipeline.engine.reference import reference_sweep

SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936),
    # a smoke-test shape for checking the script on a CPU
    "qwen-tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=1000),
}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeats=1):
    fn()  # warm-up: kernels, allocator, memoised layer inputs
    sync()
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    sync()
    return out, (time.perf_counter() - start) / repeats


def matmul_rate(device, dtype) -> float:
    n = 8192 if torch.device(device).type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    _, seconds = timed(lambda: a @ b, repeats=20)
    return 2 * n**3 / seconds


def floor_flops(config, n_pairs: int, seq_len: int, heads_sweep: bool) -> float:
    """FLOPs of what patches change: a patch at (layer l, position p) recomputes layers >= l at positions >= p
    (the `resid_pre` grid), or layers >= l at every position (an all-position head patch)."""
    d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
    per_token_layer = 2 * (2 * d * d + 2 * d * kv + 3 * d * config.intermediate_size)
    n_layers = config.num_hidden_layers
    if heads_sweep:  # every head of every layer over all positions
        token_layers = config.num_attention_heads * seq_len * sum(n_layers - layer for layer in range(n_layers))
    else:
        token_layers = sum(n_layers - layer for layer in range(n_layers)) * sum(seq_len - p for p in range(seq_len))
    return n_pairs * token_layers * per_token_layer


def run_shape(name, args, rate):
    torch.manual_seed(0)
    config = Qwen2Config(**SHAPES[name], max_position_embeddings=4096)
    model = Qwen2ForCausalLM(config).to(args.device, torch.bfloat16).eval()
    adapter = get_adapter(model)
    clean = torch.randint(0, config.vocab_size, (args.pairs, args.seq_len))
    corrupted = clean.clone()
    corrupted[:, args.seq_len // 3] = torch.randint(0, config.vocab_size, (args.pairs,))
    answers = Answers(torch.randint(0, config.vocab_size, (args.pairs, 1)),
                      torch.randint(0, config.vocab_size, (args.pairs, 1)))
    rows = []
    for sweep_name, variants, heads in [
        ("resid_pre layer x position", variants_for(adapter, "resid_pre", args.seq_len), False),
        ("heads (layer x head, all positions)", variants_for(adapter, "head", args.seq_len, per_position=False), True),
    ]:
        n = args.pairs * len(variants)
        fast, t_fast = timed(lambda: sweep(model, clean, corrupted, answers, variants))
        _, t_packed = timed(lambda: sweep(model, clean, corrupted, answers, variants, reuse_prefix=False))
        # The plain loop on a slice of the pairs, scaled: it is linear in the number of pairs.
        k = max(1, args.pairs // args.plain_fraction)
        ref, t_plain_k = timed(lambda: reference_sweep(model, clean[:k], corrupted[:k], answers.index(torch.arange(k)),
                                                       variants))
        t_plain = t_plain_k * args.pairs / k
        diff = (fast.metric_patched[:k] - ref.metric_patched).abs().max().item()
        scale = ref.metric_patched.abs().max().item()
        t_floor = floor_flops(config, args.pairs, args.seq_len, heads) / rate
        rows.append(dict(model=name, sweep=sweep_name, patches=n, plain_s=t_plain, packed_per_layer_s=t_packed,
                         patchsweep_s=t_fast, floor_s=t_floor, vs_plain=t_plain / t_fast,
                         vs_floor=t_fast / t_floor, max_abs_diff=diff, metric_scale=scale))
        print(json.dumps(rows[-1]), flush=True)
        if diff > 5e-2 * scale:
            raise SystemExit(f"patchsweep and the plain loop disagree on {name} {sweep_name}: {diff} (scale {scale})")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--pairs", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=48)
    parser.add_argument("--shapes", default="qwen2.5-0.5b,qwen2.5-1.5b")
    parser.add_argument("--plain-fraction", type=int, default=8, help="run the plain loop on pairs/this many pairs")
    parser.add_argument("--out", default=None, help="write the results table here as JSON")
    args = parser.parse_args()
    rate = matmul_rate(args.device, torch.bfloat16)
    print(f"measured bf16 matmul rate: {rate / 1e12:.0f} TFLOP/s on {args.device}", flush=True)
    rows = [r for name in args.shapes.split(",") for r in run_shape(name, args, rate)]
    print("\n| model | sweep | patches | plain loop | per-layer packing | patchsweep | floor | vs plain | vs floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['sweep']} | {r['patches']} | {r['plain_s']:.2f} s | "
              f"{r['packed_per_layer_s']:.2f} s | {r['patchsweep_s']:.2f} s | {r['floor_s']:.2f} s | "
              f"{r['vs_plain']:.1f}x | {r['vs_floor']:.2f}x |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"matmul_tflops": rate / 1e12, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
