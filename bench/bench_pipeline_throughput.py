"""The patch stage through the pipeline vs the bare engine on the same work, side by side in one run.

The pairs stage runs once (refusal-tiny, 128 pairs generated, the full sweep: every component, both
directions, resid_pre at every position). Then:
- bare engine: in this process, one `patching.sweep` per (token length, component, direction) over all
  of that length's pairs;
- pipeline: the patch stage (pipeline.run.sweep.stage_patch: work items, one model actor, Ray, one Arrow
  effects file per item), timed after the actor has loaded the model and run one warm-up item.
Both with one torch thread and at nice 15 (where Ray starts its workers), on the same pairs; their
effects must agree. Prints patches (effect rows) per
second, the pipeline's share of the engine's throughput and the load average.

    python bench/bench_pipeline_throughput.py
    python bench/bench_pipeline_throughput.py --pairs 64 resources.shard_size=8
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_ray_scaling import compose, max_difference, prepare_pairs, worker_resources  # noqa: E402

from pipeline.analysis.pairs import pair_batch  # noqa: E402
from pipeline.engine.adapters import get_adapter  # noqa: E402
from pipeline.engine.loading import load_model  # noqa: E402
from pipeline.engine.patching import sweep, variants_for  # noqa: E402
from pipeline.organisms import resolve  # noqa: E402
from pipeline.run.runner import Sweep  # noqa: E402
from pipeline.run.sweep import stage_patch  # noqa: E402
from pipeline.run.workers import WorkerPool, start_ray  # noqa: E402
from pipeline.schema import PatchsweepConfig  # noqa: E402
from pipeline.stages.patch import EFFECT_SHARD_SCHEMA  # noqa: E402
from pipeline.stages.shards import PairShard  # noqa: E402
from pipeline.store import Manifest, read_table  # noqa: E402

KEY = ["direction", "component", "layer", "head", "position", "pair_id"]


def bare_engine(cfg: PatchsweepConfig, pairs_path: Path) -> tuple[float, pa.Table]:
    """Every (length, component, direction) as one engine sweep; seconds, effects."""
    model, _ = load_model(resolve(cfg.model.path), dtype=cfg.model.dtype)
    adapter, patching = get_adapter(model), cfg.patching
    lengths = read_table(pairs_path).column("seq_len").to_pylist()
    groups: dict[int, list[int]] = {}
    for row, length in enumerate(lengths):
        groups.setdefault(length, []).append(row)
    batches = [(length, pair_batch(pairs_path, rows)) for length, rows in sorted(groups.items())]
    warm = batches[0][1]
    sweep(model, warm["clean_ids"][:1], warm["corrupted_ids"][:1], warm["answers"].index(torch.tensor([0])),
          variants_for(adapter, "resid_pre", warm["clean_ids"].shape[1], per_position=False, layers=[0]))
    tables = []
    start = time.perf_counter()
    for length, batch in batches:
        for component in patching.components:
            variants = variants_for(adapter, component, length, per_position=component in patching.per_position,
                                    layers=patching.layers, heads=patching.heads if component == "head" else None)
            for direction in patching.directions:
                result = sweep(model, batch["clean_ids"], batch["corrupted_ids"], batch["answers"], variants, direction,
                               patching.metric)
                tables.append(pa.table(result.to_columns(batch["pair_id"], cfg.model.name), schema=EFFECT_SHARD_SCHEMA))
    seconds = time.perf_counter() - start
    return seconds, pa.concat_tables(tables)


def pipeline(cfg: PatchsweepConfig, base: Sweep, shards: list[PairShard], run_dir: Path) -> tuple[float, int, pa.Table]:
    """The patch stage on one actor; seconds, work items, effects."""
    from bench_ray_scaling import warm_up

    run_dir.mkdir(parents=True)
    shutil.copy(base.run_dir / "pairs.parquet", run_dir / "pairs.parquet")
    pool = WorkerPool(cfg)
    try:
        warm_up(pool, base, shards[0], run_dir / "warm-up")
        sweep_ = Sweep(cfg, run_dir, pool, Manifest(run_dir, "run"), model_info=base.model_info,
                       provenance=base.provenance, pairs_report=base.pairs_report)
        start = time.perf_counter()
        files = stage_patch(sweep_, shards)
        seconds = time.perf_counter() - start
    finally:
        pool.close()
    effects = pa.concat_tables([read_table(p).replace_schema_metadata(None) for p in files])
    return seconds, sweep_.stage("patch").computed, effects


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=128, help="prompt pairs generated before the behaviour screen")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. resources.shard_size=8")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.nice(15)  # Ray starts its workers at nice 15: the bare engine here runs at the same priority
    root = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    cfg = compose(["experiment=refusal_tiny", "tracking.enabled=false", "resources=cpu", "resources.torch_threads=1",
                   f"prompts.n_pairs={args.pairs}", f"output_root={root}", *args.overrides])
    if cfg.ray.address == "local":
        os.environ["RAY_ADDRESS"] = "local"
    start_ray(cfg)
    try:
        cfg = replace(cfg, resources=worker_resources(cfg, 1, 1, "cpu"))
        base, shards = prepare_pairs(cfg, root)
        load_before = os.getloadavg()
        engine_s, engine_effects = bare_engine(cfg, base.run_dir / "pairs.parquet")
        pipeline_s, items, pipeline_effects = pipeline(cfg, base, shards, root / "pipeline")
        load_after = os.getloadavg()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    order = [(k, "ascending") for k in KEY]
    engine_effects = engine_effects.sort_by(order)
    pipeline_effects = pipeline_effects.sort_by(order)
    difference = max_difference(engine_effects, pipeline_effects)
    patches = engine_effects.num_rows
    print(f"refusal-tiny, {base.pairs_report['n_kept']} pairs in {len(shards)} length shards, "
          f"{'+'.join(cfg.patching.components)}, {'+'.join(cfg.patching.directions)}: {patches:,} patches; "
          f"one torch thread each; load average {np.round(load_before, 1).tolist()} before, "
          f"{np.round(load_after, 1).tolist()} after\n")
    print("| path | work items | seconds | patches/s | vs bare engine | effects vs bare engine |")
    print("|---|---|---|---|---|---|")
    print(f"| bare engine (a sweep per length, component and direction) | - | {engine_s:.1f} "
          f"| {patches / engine_s:,.0f} | 1.00 | |")
    same = "identical" if difference == 0 else f"max diff {difference:.2g}"
    print(f"| pipeline patch stage (1 actor) | {items} | {pipeline_s:.1f} | {patches / pipeline_s:,.0f} | "
          f"{engine_s / pipeline_s:.2f} | {same} |")


if __name__ == "__main__":
    main()
