"""How busy the multirun scheduler keeps a cluster: 4 models of unequal work on 16 one-CPU workers.

Each model is a real organism loaded by real model actors (pipeline.run.workers.WorkerPool) in a private
local Ray instance of 16 logical CPUs; the four pools share one Room (pipeline.run.scheduler) as a
--multirun's jobs do, each in a driver thread of its own running a sweep's stage shape: one item (pairs),
many (the patch items; 150, 300, 450, 600 by model), one (summary), one (circuit). Only the compute of a
work item is replaced, by a timed wait (time.sleep) that records when it ran: the scheduling, the actors,
Ray and the files are the real ones.

Reported: worker utilisation, the items' compute time over the time workers were ready (from each
actor's model loaded, i.e. its first item's start, to the pool letting it go: waiting for work, being
drained and idle between stages count as idle); the actors started and their start-up (placement to
first item: importing torch and loading the model, which on this 2-core machine runs for all new actors
at once); slot utilisation, the compute over 16 slots x the whole run, start-ups included; the makespan
against the ideal (total compute / 16).

    python bench/bench_scheduler.py [--json]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

SLOTS = 16
MODELS = {"refusal-tiny": "refusal-tiny", "refusal-tiny-gpt2": "refusal-tiny-gpt2",
          "refusal-tiny-neox": "refusal-tiny-neox", "refusal-tiny-b": "refusal-tiny"}  # name -> organism
PATCH_ITEMS = (150, 300, 450, 600)  # unequal work: the patch items of each model
ITEM_S = 0.4  # one patch item's compute
SINGLE_S = 1.0  # one pairs / summary / circuit item's compute


def timed_wait(model, tokenizer, item: dict) -> list[Path]:
    """The compute of a work item, replaced: wait `seconds`, record when (the file the item publishes)."""
    start = time.time()
    time.sleep(item["seconds"])
    out = Path(item["out"])
    out.write_text(json.dumps({"pid": os.getpid(), "start": start, "end": time.time()}))
    return [out]


def stage_shape(folder: Path, n_patch: int) -> dict[str, list[dict]]:
    """A sweep's stages as work items (pipeline.run.sweep): stage -> items."""
    def items(stage: str, n: int, seconds: float) -> list[dict]:
        return [{"name": f"{stage} {i}", "seconds": seconds, "out": str(folder / f"{stage}-{i}.json")}
                for i in range(n)]
    return {"pairs": items("pairs", 1, SINGLE_S), "patch": items("patch", n_patch, ITEM_S),
            "summary": items("summary", 1, SINGLE_S), "circuit": items("circuit", 1, SINGLE_S)}


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the numbers as one JSON line")
    args = parser.parse_args()

    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR
    from pipeline.run.scheduler import Room
    from pipeline.run.workers import WorkerPool, start_ray
    from pipeline.validation import typed

    root = Path(tempfile.mkdtemp(prefix="bench-scheduler-"))
    cfgs = []
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for name, organism in MODELS.items():
            cfgs.append(typed(compose("config", overrides=[
                "experiment=refusal_tiny", f"model.name={name}", f"model.path={organism}", f"resources.actors={SLOTS}",
                f"resources.num_cpus={SLOTS}", "resources.cpus_per_actor=1", "ray.log_to_driver=false",
                f"output_root={root}", f"output_dir={root}/{name}"])))
    for cfg in cfgs:
        Path(cfg.output_dir).mkdir(parents=True)
    start_ray(cfgs[0])
    room = Room.of_cluster()
    pools = [WorkerPool(cfg, room) for cfg in cfgs]
    errors = []

    def sweep(pool: WorkerPool, n_patch: int) -> None:
        try:
            for stage, items in stage_shape(Path(pool.cfg.output_dir), n_patch).items():
                if stage == "summary":
                    pool.keep(1)  # as the sweep does: the rest is one item at a time
                pool.map(timed_wait, items)
            pool.close()
        except BaseException as err:  # reported after the others finish
            errors.append(err)

    started = time.time()
    threads = [threading.Thread(target=sweep, args=(pool, n)) for pool, n in zip(pools, PATCH_ITEMS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ended = time.time()
    if errors:
        raise errors[0]
    runs = [json.loads(p.read_text()) for p in root.rglob("*.json")]
    busy = sum(r["end"] - r["start"] for r in runs)
    # A worker is ready once its model has loaded: its first item starts then (the model loads on first use).
    first_item = {}
    for r in runs:
        first_item[r["pid"]] = min(first_item.get(r["pid"], r["start"]), r["start"])
    actors = [life for pool in pools for life in pool.lifetimes.values()]
    ready = sum(life["retired"] - first_item.get(life["pid"], life["retired"]) for life in actors)
    start_up = [first_item[life["pid"]] - life["placed"] for life in actors if life["pid"] in first_item]
    result = {
        "workers": SLOTS, "models": len(MODELS), "items": len(runs), "compute_s": round(busy, 1),
        "ready_worker_s": round(ready, 1), "worker_utilisation": round(busy / ready, 3),
        "actors_started": len(actors), "actors_never_used": sum(life["pid"] not in first_item for life in actors),
        "start_up_s_mean": round(sum(start_up) / len(start_up), 1), "start_up_s_max": round(max(start_up), 1),
        "held_worker_s": round(sum(life["retired"] - life["placed"] for life in actors), 1),
        "makespan_s": round(ended - started, 1), "ideal_s": round(busy / SLOTS, 1),
        "slot_utilisation": round(busy / (SLOTS * (ended - started)), 3),
    }
    print(json.dumps(result) if args.json else "\n".join(f"{k}: {v}" for k, v in result.items()), flush=True)
    return result


if __name__ == "__main__":
    main()
