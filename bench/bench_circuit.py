"""The circuit step on a shipped organism, outside the pipeline.

    python bench/bench_circuit.py circuit refusal-tiny --n-pairs 64 --out outputs/circuit-bench
    python bench/bench_circuit.py verify smollm2-refusal --pairs outputs/refusal_smol/.../pairs.parquet --max-pairs 8

`circuit`: pairs -> circuit.json + diagram, and what a reviewer of a circuit asks for: its size vs the
candidates, faithfulness with its interval, stability over resampled pairs, the random control,
attribution agreement, the refusal direction, and the time each part took.

`verify`: exact single-node verification of every candidate node on every pair, three ways side by side
in one process on the same pairs: the circuit step's path before single-node verification (one masked
circuit per node, every node kept but one, through `CircuitRunner.metrics` of pipeline/engine/circuits.py
as of commit --baseline, loaded from git, one runner per token length), `CircuitRunner.single_node_metrics`
with one runner per token length, and the evaluator's (every pair in one left-padded batch). Prints wall
and CPU times (this process's, less moved by other jobs), rows (node x pair) per second, the ratios to the
path before and the largest differences, the (position, layer) cells each path computes (`token_layers`:
how much of the ratio is work left out, how much is work done faster) and the cells per CPU-second, with
the load average before and after (the machine is shared: ratios within one run are what counts).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import yaml


def screened_pairs(organism: str, n_pairs: int, seed: int, path: str | None):
    """(model, pairs table with clean_tokens): a run's pairs.parquet when given, else built and screened here."""
    import tempfile

    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve
    from pipeline.schema import PromptsConfig
    from pipeline.stages.pairs import run_in_process
    from pipeline.store import read_table

    model, tokenizer = load_model(resolve(organism))
    if path:
        return model, read_table(path)
    with tempfile.TemporaryDirectory() as folder:  # the pairs stage run in this process
        return model, run_in_process(model, tokenizer, organism, PromptsConfig(n_pairs=n_pairs, seed=seed),
                                     Path(folder))[0]


def circuit(args) -> None:
    from pipeline.analysis.circuit.method import find_circuit
    from pipeline.analysis.circuit.progress import Progress
    from pipeline.analysis.circuit.result import circuit_from_json
    from pipeline.outputs.diagram import render_circuit
    from pipeline.schema import CircuitConfig, SummaryConfig
    from pipeline.store import publish_json

    start = time.perf_counter()
    model, pairs = screened_pairs(args.organism, args.n_pairs, args.seed, args.pairs)
    screened = time.perf_counter()
    chosen = {key: yaml.safe_load(value) for key, value in (option.split("=", 1) for option in args.option)}
    options = CircuitConfig(**{"max_pairs": args.max_pairs, "seed": args.seed, "target": args.target, **chosen})
    progress = Progress(lambda state: print(json.dumps(state), file=sys.stderr, flush=True))
    found = find_circuit(model, pairs, options, SummaryConfig(), "logit_diff", args.organism, progress).to_json()
    built = time.perf_counter()
    out = Path(args.out)
    publish_json(out / "circuit.json", found)
    render_circuit(circuit_from_json(found), out)
    rendered = time.perf_counter()

    agree, rnd, direction = found["attribution"], found["random_control"], found["mean_difference"]
    best = next(r for r in direction["per_layer"] if r["layer"] == direction["best_layer"])
    stability = found["stability"]
    report = {
        "organism": args.organism, "pairs": found["n_pairs"],
        "candidates": found["candidates"], "size": found["size"], "fraction": round(found["fraction"], 4),
        "faithfulness": round(found["faithfulness"], 4),
        "faithfulness_ci": [round(x, 4) for x in found["faithfulness_ci"]],
        "faithfulness_held_out": found["faithfulness_held_out"], "search_pairs": found["n_search_pairs"],
        "core": stability["core_size"], "resamples": stability["n_resamples"],
        "resample_size_median": stability["size_median"],
        "random_mean": round(rnd["mean"], 4), "random_std": round(rnd["std"], 4), "random_max": round(rnd["max"], 4),
        "cpr": round(found["mib"]["cpr"], 4), "cmd": round(found["mib"]["cmd"], 4),
        "spearman": round(agree["spearman"], 4), "top_k_recall": agree["top_k_recall"], "k": agree["k"],
        "verified": agree["n_verified"], "missed_strong_estimate": agree["missed_strong_estimate"],
        "missed_strong_upper95": round(agree["missed_strong_upper95"], 2),
        "mean_difference_layer": direction["best_layer"], "ablation": round(best["ablation_effect"], 4),
        "addition": round(best["addition_effect"], 4),
        "nodes": [n["id"] for n in found["nodes"]],
        "edges_drawn": sum(e["drawn"] for e in found["edges"]),
        "seconds": {"load and pairs": round(screened - start, 1), "circuit": round(built - screened, 1),
                    "render": round(rendered - built, 1), **found["seconds"]},
        "forward_rows": found["forward_rows"], "out": str(out),
    }
    print(json.dumps(report, indent=2))


def baseline_runner(revision: str):
    """CircuitRunner of pipeline/engine/circuits.py as of `revision` (git), importing today's engine modules."""
    import importlib.util
    import subprocess
    import sys

    source = subprocess.run(["git", "show", f"{revision}:pipeline/engine/circuits.py"], capture_output=True, text=True,
                            check=True, cwd=Path(__file__).resolve().parent.parent).stdout
    spec = importlib.util.spec_from_loader("pipeline.engine.baseline_circuits", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "pipeline.engine"
    sys.modules[spec.name] = module
    exec(compile(source, f"{revision}:pipeline/engine/circuits.py", "exec"), module.__dict__)
    return module.CircuitRunner


def token_layers(runners, nodes, n_layers: int) -> tuple[int, int]:
    """(before, single-node): the (position, layer) cells each path computes for every (node, pair) row of
    per-length `runners`, counting the last layer as the final position alone (both paths run its MLP and
    output projection there only). Before: from the node's layer at every position from the first differing
    token; single node: from the node's layer at the positions from its class's first one, and nothing for
    a pair without a position of the node's class."""
    before = single = 0
    for runner in runners:
        classes = runner.classes  # [P, T'] from the first differing token
        n_pairs, width = classes.shape
        for i in range(len(nodes)):
            layer, cls = int(nodes.layer[i]), int(nodes.cls[i])
            in_class = classes == cls
            if layer == n_layers - 1:
                in_class[:, :-1] = False
            begin = in_class.float().argmax(1)
            before += n_pairs * ((n_layers - 1 - layer) * width + 1)
            single += int((in_class.any(1) * ((n_layers - 1 - layer) * (width - begin) + 1)).sum())
    return before, single


def gather(groups, parts: list[torch.Tensor]) -> torch.Tensor:
    """Per length group [C, group's pairs] -> [C, P] in the circuit step's pair order."""
    out = torch.empty(parts[0].shape[0], sum(len(g.rows) for g in groups))
    for group, part in zip(groups, parts):
        out[:, group.rows] = part
    return out


def timed(name: str, compute):
    """(result, wall seconds, CPU seconds of this process), the times also printed to stderr as they come."""
    clock, cpu = time.perf_counter(), time.process_time()
    out = compute()
    wall, cpu = time.perf_counter() - clock, time.process_time() - cpu
    print(json.dumps({"path": name, "s": round(wall, 1), "cpu_s": round(cpu, 1)}), file=sys.stderr, flush=True)
    return out, wall, cpu


def verify(args) -> None:
    from pipeline.analysis.circuit.method import prepare
    from pipeline.engine.circuits import CircuitRunner
    from pipeline.schema import CircuitConfig

    model, pairs = screened_pairs(args.organism, args.n_pairs, args.seed, args.pairs)
    setup = prepare(model, pairs, CircuitConfig(max_pairs=args.max_pairs, seed=args.seed), "logit_diff")
    evaluator, n_classes = setup.evaluator, len(setup.names)
    chosen = torch.arange(0, len(setup.nodes), args.node_stride)
    nodes = setup.nodes.select(chosen)
    Baseline = baseline_runner(args.baseline)
    baseline_runners = [Baseline(model, g.clean, g.corrupted, g.answers, g.classes, n_classes, "logit_diff")
                        for g in setup.groups]
    by_length = [CircuitRunner(model, g.clean, g.corrupted, g.answers, g.classes, n_classes, "logit_diff")
                 for g in setup.groups]
    n_rows = len(nodes) * evaluator.n_pairs
    load_before = os.getloadavg()
    one_batch, one_batch_s, one_batch_cpu = timed("one_batch", lambda: evaluator.single_node_metrics(nodes))
    per_length, per_length_s, per_length_cpu = timed(
        "per_length", lambda: gather(setup.groups, [runner.single_node_metrics(nodes) for runner in by_length]))
    every_node_but_one = torch.ones(len(chosen), len(setup.nodes), dtype=torch.bool)  # of every candidate
    every_node_but_one[torch.arange(len(chosen)), chosen] = False
    before, before_s, before_cpu = timed("before", lambda: gather(
        setup.groups, [runner.metrics(setup.nodes, every_node_but_one) for runner in baseline_runners]))
    load_after = os.getloadavg()
    effects_before = evaluator.effects(before)
    cells_before, cells_single = token_layers(by_length, nodes, setup.n_layers)
    paths = {"before": (before, before_s, before_cpu), "per_length": (per_length, per_length_s, per_length_cpu),
             "one_batch": (one_batch, one_batch_s, one_batch_cpu)}
    report = {"organism": args.organism, "pairs": evaluator.n_pairs, "nodes": len(nodes),
              "node_stride": args.node_stride, "rows": n_rows,
              "torch_threads": torch.get_num_threads(), "baseline": args.baseline,
              "length_groups": [len(g.rows) for g in setup.groups],
              "token_layers_before": cells_before, "token_layers_single_node": cells_single,
              "token_layer_ratio": round(cells_before / cells_single, 2)}
    for name, (metric, wall, cpu) in paths.items():
        cells = cells_before if name == "before" else cells_single
        report[name] = {"s": round(wall, 1), "cpu_s": round(cpu, 1), "rows_per_s": round(n_rows / wall, 1),
                        "token_layers_per_cpu_s": round(cells / cpu), "ratio": round(before_s / wall, 2),
                        "ratio_cpu": round(before_cpu / cpu, 2),
                        "max_abs_diff_metric": float((metric - before).abs().max()),
                        "max_abs_diff_effect": float((evaluator.effects(metric) - effects_before).abs().max())}
    report["one_batch_vs_per_length"] = round(per_length_s / one_batch_s, 2)
    report["one_batch_vs_per_length_cpu"] = round(per_length_cpu / one_batch_cpu, 2)
    report["load_average_before"] = [round(x, 2) for x in load_before]
    report["load_average_after"] = [round(x, 2) for x in load_after]
    print(json.dumps(report, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["circuit", "verify"])
    parser.add_argument("organism", help="refusal-tiny, smollm2-refusal, or a model folder")
    parser.add_argument("--pairs", help="a run's pairs.parquet (screened pairs) instead of building them here")
    parser.add_argument("--n-pairs", type=int, default=64, help="pairs to generate before the behaviour screen")
    parser.add_argument("--max-pairs", type=int, default=64, help="pairs the circuit step uses")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.8)
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="circuit: a CircuitConfig field (e.g. search_pairs=12), repeatable")
    parser.add_argument("--out", default="outputs/circuit-bench")
    parser.add_argument("--verbose", action="store_true", help="log the search's steps")
    parser.add_argument("--baseline", default="4dbdef3", help="verify: the git revision of the path before")
    parser.add_argument("--node-stride", type=int, default=1, help="verify: every n-th candidate node only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING, format="%(message)s")
    circuit(args) if args.mode == "circuit" else verify(args)


if __name__ == "__main__":
    main()
