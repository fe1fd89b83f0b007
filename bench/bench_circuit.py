"""The circuit step on a shipped organism, outside the pipeline: pairs -> circuit.json + diagram.

    python bench/bench_circuit.py refusal-tiny --n-pairs 64 --out outputs/circuit-bench

Prints what a reviewer of a circuit asks for: its size vs the candidates, faithfulness with its interval,
the random control, attribution agreement, the refusal direction, and the time each part took.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pyarrow as pa
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("organism", help="refusal-tiny, smollm2-refusal, or a model folder")
    parser.add_argument("--n-pairs", type=int, default=64, help="pairs to generate before the behaviour screen")
    parser.add_argument("--max-pairs", type=int, default=64, help="pairs the circuit step uses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--out", default="outputs/circuit-bench")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from pipeline.analysis.circuit_search import find_circuit
    from pipeline.analysis.pairs import build_pairs, source_pairs
    from pipeline.config import CircuitConfig, SummaryConfig
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve
    from pipeline.outputs.diagram import render_circuit
    from pipeline.store import publish_json

    start = time.perf_counter()
    model, tokenizer = load_model(resolve(args.organism))
    loaded = time.perf_counter()
    pairs = build_pairs(model, tokenizer, source_pairs(args.organism, tokenizer, n=args.n_pairs, seed=args.seed)).table
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in pairs.column("clean_ids").to_pylist()]
    pairs = pairs.append_column("clean_tokens", pa.array(tokens, pa.list_(pa.string())))
    screened = time.perf_counter()
    options = CircuitConfig(max_pairs=args.max_pairs, seed=args.seed, target=args.target)
    circuit = find_circuit(model, pairs, options, SummaryConfig(), "logit_diff", args.organism).to_json()
    built = time.perf_counter()
    out = Path(args.out)
    publish_json(out / "circuit.json", circuit)
    render_circuit(circuit, out)
    rendered = time.perf_counter()

    agree, rnd, direction = circuit["attribution"], circuit["random_control"], circuit["refusal_direction"]
    best = next(r for r in direction["per_layer"] if r["layer"] == direction["best_layer"])
    report = {
        "organism": args.organism, "pairs": circuit["n_pairs"],
        "candidates": circuit["candidates"], "size": circuit["size"], "fraction": round(circuit["fraction"], 4),
        "faithfulness": round(circuit["faithfulness"], 4), "faithfulness_ci": [round(x, 4) for x in circuit["faithfulness_ci"]],
        "random_mean": round(rnd["mean"], 4), "random_std": round(rnd["std"], 4), "random_max": round(rnd["max"], 4),
        "cpr": round(circuit["mib"]["cpr"], 4), "cmd": round(circuit["mib"]["cmd"], 4),
        "spearman": round(agree["spearman"], 4), "top_k_recall": agree["top_k_recall"], "k": agree["k"],
        "verified": agree["n_verified"], "missed_strong_estimate": agree["missed_strong_estimate"],
        "missed_strong_upper95": round(agree["missed_strong_upper95"], 2),
        "refusal_direction_layer": direction["best_layer"], "ablation": round(best["ablation_effect"], 4),
        "addition": round(best["addition_effect"], 4),
        "nodes": [n["id"] for n in circuit["nodes"]],
        "edges_drawn": sum(e["drawn"] for e in circuit["edges"]),
        "seconds": {"load": round(loaded - start, 1), "pairs": round(screened - loaded, 1),
                    "circuit": round(built - screened, 1), "render": round(rendered - built, 1)},
        "forward_rows": circuit["forward_rows"], "out": str(out),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
