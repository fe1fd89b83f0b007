"""A large prompt set end to end: a pairs file of N refusal-tiny grammar pairs (held-out combinations), the
real command on it, its wall time per 1,000 pairs and its peak memory.

    python bench/bench_large_pairs.py [--pairs 2000] [--json] [extra overrides ...]

Memory is sampled every 0.25 s over the command's whole process tree (the driver, its private Ray
instance's daemons and the model actors are all its descendants): the peak of the tree's total resident
memory, of the driver alone and of the largest model actor, overall and per stage (a stage's samples are
those within its time, which run.log's line for it ends). Stage times are the command's own (its `Work:`
line).
"""
from __future__ import annotations

import argparse
import datetime
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent


def sample(process: psutil.Process, peaks: dict, timeline: list, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            tree = [process, *process.children(recursive=True)]
        except psutil.NoSuchProcess:
            return
        total, actor = 0, 0
        for p in tree:
            try:
                rss = p.memory_info().rss
                total += rss
                if "ModelWorker" in " ".join(p.cmdline()):
                    actor = max(actor, rss)
                if p.pid == process.pid:
                    peaks["driver"] = max(peaks["driver"], rss)
            except psutil.NoSuchProcess:
                pass
        peaks["tree"], peaks["actor"] = max(peaks["tree"], total), max(peaks["actor"], actor)
        timeline.append((time.time(), total, actor))
        stop.wait(0.25)


STAGE_LINE = re.compile(r"^(\S+ \S+) INFO .*?: (\w+): \d+ computed, .* ([\d.]+) s$")


def peaks_by_stage(run_log: Path, timeline: list) -> dict:
    """Stage -> the peak of the tree's and of the largest actor's memory (MB) while it ran."""
    out = {}
    for line in run_log.read_text().splitlines():
        match = STAGE_LINE.match(line)
        if not match:
            continue
        end = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        within = [(tree, actor) for t, tree, actor in timeline if end - float(match.group(3)) <= t <= end]
        if within:
            out[match.group(2)] = {"tree_mb": round(max(w[0] for w in within) / 2**20),
                                   "actor_mb": round(max(w[1] for w in within) / 2**20)}
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("overrides", nargs="*", help="extra overrides for the command")
    args = parser.parse_args()

    from pipeline.organisms.refusal_tiny import grammar

    root = Path(tempfile.mkdtemp(prefix="bench-large-"))
    pairs = root / f"pairs-{args.pairs}.jsonl"
    pairs.write_text("".join(json.dumps({"clean": p.clean, "corrupted": p.corrupted, "category": p.category}) + "\n"
                             for p in grammar.pairs(args.pairs, 0, "heldout")))
    command = [sys.executable, "-m", "pipeline", "experiment=refusal_tiny", f"prompts.path={pairs}",
               "tracking.enabled=false", f"output_root={root / 'out'}", *args.overrides]
    peaks, timeline = {"tree": 0, "driver": 0, "actor": 0}, []
    stop = threading.Event()
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sampler = threading.Thread(target=sample, args=(psutil.Process(process.pid), peaks, timeline, stop))
    sampler.start()
    out, err = process.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if process.returncode != 0:
        sys.exit(f"the command failed ({process.returncode}): {err[-3000:]}")
    kept = re.search(r"(\d+) of (\d+) pairs kept", out)
    [work] = [line for line in out.splitlines() if line.startswith("Work:")]
    stages = {m.group(1): float(m.group(2)) for m in re.finditer(r"(\w+) \d+ computed/\d+ reused(?:/\d+ retried)? "
                                                                  r"([\d.]+)s", work)}
    result = {"pairs": args.pairs, "kept": int(kept.group(1)), "wall_s": round(seconds, 1),
              "s_per_1000_pairs": round(1000 * seconds / args.pairs, 1), "stages_s": stages,
              "peak_tree_mb": round(peaks["tree"] / 2**20), "peak_driver_mb": round(peaks["driver"] / 2**20),
              "peak_actor_mb": round(peaks["actor"] / 2**20),
              "peak_by_stage": peaks_by_stage(next((root / "out").rglob("run.log")), timeline)}
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)
    return result


if __name__ == "__main__":
    main()
