"""The patch stage's work on the default run's pairs, two ways side by side in one process.

    python bench/bench_patch_stage.py --pairs outputs/bench-patch/pairs.parquet
    python bench/bench_patch_stage.py --baseline HEAD~3 experiment=refusal_tiny

Composes the run's config (default: `make run`'s, or the Hydra overrides given), builds and screens its
pairs in this process (or reads a pairs.parquet: a run folder's, or the one this script saved before),
plans the patch stage's items as the pipeline does, and runs every item with the stage as of git
revision --baseline (pipeline/stages/patch.py and pipeline/engine/patching.py loaded from git) and with
this checkout's stage. Prints wall and CPU seconds of each (this process's CPU time, less moved by other
jobs: the machine may be shared, so the ratio within one run is what counts), their ratio, the number of
effect rows and the largest difference of metric_patched between the two (float noise only).
One torch thread, as each of the run's model actors has.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

ROOT = Path(__file__).resolve().parent.parent


def load_from_git(revision: str, path: str, name: str, replace: dict[str, str]):
    """Module `name` from `path` as of git `revision`, its source edited by `replace` (import redirection)."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True, check=True,
                            cwd=ROOT).stdout
    for old, new in replace.items():
        source = source.replace(old, new)
    spec = importlib.util.spec_from_loader(name, loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = name.rpartition(".")[0]
    sys.modules[name] = module
    exec(compile(source, f"{revision}:{path}", "exec"), module.__dict__)
    return module


def baseline_stage(revision: str):
    """pipeline.stages.patch as of `revision`, running the engine's patching.py of that revision."""
    load_from_git(revision, "pipeline/engine/patching.py", "pipeline.engine.baseline_patching", {})
    return load_from_git(revision, "pipeline/stages/patch.py", "pipeline.stages.baseline_patch",
                         {"from pipeline.engine.patching import": "from pipeline.engine.baseline_patching import"})


def config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from pipeline.config import CONF_DIR
    from pipeline.validation import validate

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return validate(compose("config", overrides=overrides, return_hydra_config=False))


def pairs_table(model, tokenizer, cfg, path: Path) -> pa.Table:
    """The run's pairs: read from `path`, or built and screened here and saved there."""
    from pipeline.stages.pairs import run_in_process
    from pipeline.store import read_table, write_table

    if path.exists():
        return read_table(path)
    with tempfile.TemporaryDirectory() as folder:
        table = run_in_process(model, tokenizer, cfg.model.path, cfg.prompts, Path(folder))[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    write_table(path, table, {})
    return table


def run_items(stage, model, tokenizer, items) -> tuple[dict, float, float]:
    """(effects per item position, wall s, CPU s) of every item run by `stage`."""
    from pipeline.store import read_table

    wall, cpu = time.perf_counter(), time.process_time()
    tables = {i: read_table(stage.run(model, tokenizer, item)[0]) for i, item in enumerate(items)}
    return tables, time.perf_counter() - wall, time.process_time() - cpu


def flat_effects(tables: dict) -> pa.Table:
    """All items' rows in one order-independent table: sorted by the row's site."""
    keys = ["pair_id", "direction", "component", "layer", "head", "position", "position_class"]
    table = pa.concat_tables([t.replace_schema_metadata(None) for t in tables.values()])
    return table.sort_by([(k, "ascending") for k in keys])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides (default: make run's config)")
    parser.add_argument("--pairs", default=str(ROOT / "outputs/bench-patch/pairs.parquet"),
                        help="pairs.parquet to read, or to write when missing")
    parser.add_argument("--baseline", default="HEAD", help="git revision of the stage to compare against")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-shards", type=int, help="a subset of the pair shards (a quicker comparison)")
    parser.add_argument("--only", choices=["baseline", "new"], help="run one side only (profiling)")
    args = parser.parse_args()

    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve
    from pipeline.stages import patch
    from pipeline.stages.shards import plan_shards

    torch.set_num_threads(args.threads)
    cfg = config(args.overrides)
    model, tokenizer = load_model(resolve(cfg.model.path))
    pairs = pairs_table(model, tokenizer, cfg, Path(args.pairs))
    shards = plan_shards(pairs, cfg.resources.shard_size)
    if args.max_shards:  # evenly spread over the lengths
        shards = [shards[int(i)] for i in np.unique(np.linspace(0, len(shards) - 1, args.max_shards).round())]
    load = os.getloadavg()[0]
    report = {"pairs": sum(len(s.rows) for s in shards), "shards": len(shards), "load_before": round(load, 2)}
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        stages = {"baseline": baseline_stage(args.baseline), "new": patch}
        for side, stage in stages.items():
            if args.only and side != args.only:
                continue
            items = stage.plan(Path(folder) / side, shards, cfg.patching, cfg.resources.shard_size, cfg.model.name,
                               "bench", {})
            (Path(folder) / side).mkdir()
            shutil.copyfile(args.pairs, items[0].pairs)
            tables, wall, cpu = run_items(stage, model, tokenizer, items)
            results[side] = flat_effects(tables)
            report[side] = {"items": len(items), "rows": results[side].num_rows, "wall_s": round(wall, 1),
                            "cpu_s": round(cpu, 1)}
    if len(results) == 2:
        old, new = results["baseline"], results["new"]
        measured = ["metric_patched", "effect", "metric_clean", "metric_corrupted"]
        report["same_sites"] = old.drop_columns(measured).equals(new.drop_columns(measured))
        difference = np.abs(old.column("metric_patched").to_numpy() - new.column("metric_patched").to_numpy())
        report["max_abs_difference"] = float(difference.max())
        report["wall_ratio"] = round(report["new"]["wall_s"] / report["baseline"]["wall_s"], 3)
        report["cpu_ratio"] = round(report["new"]["cpu_s"] / report["baseline"]["cpu_s"], 3)
    report["load_after"] = round(os.getloadavg()[0], 2)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
