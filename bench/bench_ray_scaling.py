"""Ray scaling of the patching stage: 1, 2 and 4 model workers on one machine, side by side in one run.

One sweep (refusal-tiny, `resid_pre` and every head at every position, both directions) runs through
the project's own stage graph (pipeline.run: WorkerPool, Sweep, stage_patch) once per worker
count, with only `resources.actors` (and the per-actor share of the machine) changed. The pairs stage
runs once and every worker count patches the same pairs.parquet, each into an effects folder of its own
(shards are content-keyed, so a shared folder would be reused, not recomputed). The clock covers the
patch stage only, after every actor has loaded its model and run one tiny warm-up item; that start-up
is reported beside it.
Effects must be identical across worker counts: a work item is the same computation whichever
actor runs it.

    python bench/bench_ray_scaling.py                            # CPU workers, 128 pairs, 1 2 4 workers
    python bench/bench_ray_scaling.py --workers 1,2 --repeats 3 prompts.n_pairs=64
    python bench/bench_ray_scaling.py --device cuda              # GPU workers sharing this machine's GPUs

Trailing key=value arguments are Hydra overrides of the sweep (as on the `patchsweep` command line).
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import ray

from pipeline.config import CONF_DIR
from pipeline.run.runner import Sweep
from pipeline.run.sweep import stage_pairs, stage_patch
from pipeline.run.workers import WorkerPool, start_ray
from pipeline.schema import PatchsweepConfig, ResourcesConfig, config_hash
from pipeline.stages import patch
from pipeline.stages.shards import PairShard, plan_shards
from pipeline.store import Manifest, read_table
from pipeline.validation import validate

COMPARED = ("metric_clean", "metric_corrupted", "metric_patched", "effect")


def compose(overrides: list[str]) -> PatchsweepConfig:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return validate(hydra_compose("config", overrides=overrides))


def worker_resources(cfg: PatchsweepConfig, workers: int, most_workers: int, device: str) -> ResourcesConfig:
    """resources for `workers` actors: the machine's CPUs (or GPUs) split so the most workers fit at once."""
    import torch

    cpus = cfg.resources.num_cpus or os.cpu_count()
    res = replace(cfg.resources, actors=workers, cpus_per_actor=min(1.0, cpus / most_workers))
    if device == "cuda":
        res = replace(res, gpus_per_actor=min(1.0, torch.cuda.device_count() / workers))
    return res


def prepare_pairs(cfg: PatchsweepConfig, root: Path) -> tuple[Sweep, list[PairShard]]:
    """Stage 1 once, on one worker: the pairs, their shards and the provenance every run shares."""
    run_dir = root / "pairs"
    run_dir.mkdir(parents=True)
    pool = WorkerPool(cfg)
    try:
        run = {"run_id": "bench-ray-scaling", "config_hash": config_hash(cfg), "model": cfg.model.name}
        sweep = Sweep(cfg, run_dir, pool, Manifest(run_dir, "run"), run, model_info=pool.describe())
        sweep.provenance = {"config_hash": config_hash(cfg), "model_id": cfg.model.path,
                            "weights_hash": sweep.weights_hash}
        pairs = stage_pairs(sweep)
    finally:
        pool.close()
    return sweep, plan_shards(pairs, cfg.resources.shard_size)


def patch_run(base: Sweep, shards: list[PairShard], cfg: PatchsweepConfig, run_dir: Path) -> dict:
    """The patch stage with cfg's worker count, timed after every actor has loaded the model."""
    run_dir.mkdir(parents=True)
    shutil.copy(base.run_dir / "pairs.parquet", run_dir / "pairs.parquet")
    load_average = os.getloadavg()[0]
    start = time.perf_counter()
    pool = WorkerPool(cfg)
    try:
        ray.get([actor.describe.remote() for actor in pool.actors])
        warm_up(pool, base, shards[0], run_dir / "warm-up")
        started = time.perf_counter()
        sweep = Sweep(cfg, run_dir, pool, Manifest(run_dir, "run"), base.run, model_info=base.model_info,
                      provenance=base.provenance, pairs_report=base.pairs_report)
        effect_shards = stage_patch(sweep, shards)
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    effects = pa.concat_tables([read_table(p).replace_schema_metadata(None) for p in effect_shards])
    return {"seconds": seconds, "start_seconds": started - start, "items": sweep.stage("patch").computed,
            "load_average": load_average, "effects": effects}


def warm_up(pool: WorkerPool, base: Sweep, shard: PairShard, folder: Path) -> None:
    """One one-pair, one-layer patch item per actor, outside the clock: each actor's first item pays
    for importing the stage and engine modules and torch's first kernels, which is start-up, not
    throughput."""
    patches = patch.Patches("resid_pre", "denoise", base.cfg.patching.metric, per_position=False, layers=[0],
                            heads=None)
    ray.get([actor.run.remote(patch.run, patch.PatchItem(str(folder.parent / "pairs.parquet"), (shard.rows[:1],),
                                                        patches, base.cfg.model.name, None,
                                                        str(folder / f"{i}.arrow"), base.provenance))
             for i, actor in enumerate(pool.actors)])


def max_difference(a: pa.Table, b: pa.Table) -> float:
    """Largest absolute difference over the metric columns; inf when the rows do not line up."""
    keys = [c for c in a.column_names if c not in COMPARED]
    if a.num_rows != b.num_rows or not a.select(keys).equals(b.select(keys)):
        return float("inf")
    return max(float(np.nanmax(np.abs(a.column(c).to_numpy(zero_copy_only=False)
                                      - b.column(c).to_numpy(zero_copy_only=False)), initial=0.0))
               for c in COMPARED)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=lambda text: [int(n) for n in text.split(",")], default=[1, 2, 4],
                        help="worker counts, comma-separated (default 1,2,4)")
    parser.add_argument("--pairs", type=int, default=128, help="prompt pairs generated before the behaviour screen")
    parser.add_argument("--repeats", type=int, default=1, help="runs per worker count, interleaved; the fastest counts")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. patching.directions=[denoise]")
    args = parser.parse_args()
    if 1 not in args.workers:
        parser.error("--workers must include 1: the ratios are to one worker")

    root = Path(tempfile.mkdtemp(prefix="bench-ray-scaling-"))
    cfg = compose(["experiment=refusal_tiny", "patching=heads_per_position", "tracking.enabled=false",
                   f"resources={'gpu' if args.device == 'cuda' else 'cpu'}", "resources.torch_threads=1",
                   f"prompts.n_pairs={args.pairs}", f"output_root={root}", *args.overrides])
    if cfg.ray.address == "local":
        # ray.init() without an address joins a cluster that `ray start` left on this machine, if any;
        # RAY_ADDRESS=local makes it start the private instance that ray.address=local means.
        os.environ["RAY_ADDRESS"] = "local"
    start_ray(cfg)
    most = max(args.workers)
    try:
        base, shards = prepare_pairs(replace(cfg, resources=worker_resources(cfg, 1, most, args.device)), root)
        runs: dict[int, list[dict]] = {n: [] for n in args.workers}
        for repeat in range(args.repeats):
            for n in args.workers:
                run_cfg = replace(cfg, resources=worker_resources(cfg, n, most, args.device))
                runs[n].append(patch_run(base, shards, run_cfg, root / f"workers-{n}-run-{repeat}"))
                print(f"{n} worker(s), run {repeat + 1}: {runs[n][-1]['seconds']:.1f} s", flush=True)
        print_table(cfg, args, base, len(shards), runs)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def print_table(cfg: PatchsweepConfig, args, base: Sweep, n_shards: int, runs: dict[int, list[dict]]) -> None:
    reference = runs[1][0]["effects"]
    patches = reference.num_rows
    best = {n: min(r["seconds"] for r in rs) for n, rs in runs.items()}
    patching = cfg.patching
    print(f"\nrefusal-tiny, {base.pairs_report['n_kept']} pairs ({n_shards} shards by token length), "
          f"{'+'.join(patching.components)} at every position, {'+'.join(patching.directions)}: "
          f"{runs[1][0]['items']} work items, {patches} patches (effect rows) per run; "
          f"{args.device}, {os.cpu_count()} CPUs, torch threads {cfg.resources.torch_threads} per worker; "
          f"fastest of {args.repeats} run(s)\n")
    print("| workers | cpus / worker | actor start s | patch stage s | patches/s | vs 1 worker | load avg | "
          "effects vs 1 worker |")
    print("|---|---|---|---|---|---|---|---|")
    for n, rs in runs.items():
        fastest = min(rs, key=lambda r: r["seconds"])
        difference = max(max_difference(reference, r["effects"]) for r in rs)
        same = "identical" if difference == 0 else f"max diff {difference:.2g}"
        cpus = worker_resources(cfg, n, max(runs), args.device).cpus_per_actor
        print(f"| {n} | {cpus:g} | {fastest['start_seconds']:.1f} | {best[n]:.1f} | {patches / best[n]:,.0f} | "
              f"{best[1] / best[n]:.2f}x | {fastest['load_average']:.1f} | {same} |")


if __name__ == "__main__":
    main()
