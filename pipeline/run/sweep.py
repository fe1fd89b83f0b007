"""The stage graph of one model's sweep: pairs -> cache -> patch -> summary -> direction -> render, and the
circuit step after pairs (beside cache, patch and summary on an actor of its own where the pool has one to spare).

Each stage module (pipeline.stages) plans its work items and computes them on the model actors; the
runner (pipeline.run.runner) reuses every output already finished under the same content key and
records the rest in a manifest. The run folder's manifest lists its files (pipeline.outputs.files),
written last. The heatmaps, the circuit diagram and the report are drawn on the driver from the files.
"""
from __future__ import annotations

import json
import logging
import uuid
from contextlib import contextmanager
from pathlib import Path

import pandas as pd
import pyarrow as pa
from omegaconf import OmegaConf

from pipeline.analysis.circuit.result import Circuit, read_circuit
from pipeline.analysis.statistics import layer_curves, read_summary
from pipeline.messages import redact
from pipeline.outputs.diagram import render_circuit
from pipeline.outputs.files import CIRCUIT, DIRECTION, MANIFESTED
from pipeline.outputs.heatmaps import layers_png
from pipeline.outputs.report import write_report
from pipeline.run.folder import (
    drop_skipped_outputs,
    folder_lock,
    remove_stale_shards,
    stamp_run_tables,
    write_config,
)
from pipeline.run.logs import ThrottledLines, run_log
from pipeline.run.runner import Sweep, SweepOutcome, Tracker
from pipeline.run.scheduler import Room
from pipeline.run.workers import WorkerPool, start_ray, timed
from pipeline.schema import PatchsweepConfig, config_hash
from pipeline.stages import cache, circuit, direction, pairs, patch, summary
from pipeline.stages.shards import PairShard, pairs_hash, plan_shards
from pipeline.store import Manifest, content_key, file_entry, provenance, publish_bytes, read_table

log = logging.getLogger(__name__)


def run_sweep(cfg: PatchsweepConfig, tracker: Tracker | None = None, overrides: list[str] | None = None,
              room: Room | None = None) -> SweepOutcome:
    """Every stage of one model's sweep, into cfg.output_dir. `cfg` is validated.

    The folder is locked for the whole sweep (`folder_lock`). Nothing is written into it until Ray has
    placed a model actor and the model has loaded, so a sweep that cannot start leaves the folder as it
    found it. Ctrl-C raises `Interrupted`, saying how much finished work a re-run will reuse.
    `tracker` names the run and hears of each finished stage (untracked: the run gets a fresh id);
    `overrides` are the command line's (saved as overrides.yaml); `room`, the cluster's room when other
    sweeps run at once on the same Ray instance (pipeline.run.multirun). Everything is logged to the run
    folder's run.log, an error with its traceback included.
    """
    run_dir = Path(cfg.output_dir)
    # A cluster is joined before the folder is locked: a cluster that never answers ends the process at
    # ray.connect_timeout_s, which would leave the lock behind. A private instance is started after, so
    # that a folder in use is refused before Ray starts.
    joins_cluster = cfg.ray.address != "local"
    if joins_cluster:
        start_ray(cfg)
    with folder_lock(run_dir):
        if not joins_cluster:
            start_ray(cfg)
        return _run_stages(cfg, run_dir, tracker, overrides or [], room)


def _run_stages(cfg: PatchsweepConfig, run_dir: Path, tracker: Tracker | None, overrides: list[str],
                room: Room | None) -> SweepOutcome:
    pool = WorkerPool(cfg, room)
    sweep = Sweep(cfg, run_dir, pool, Manifest(run_dir, "run"), tracker=tracker)
    try:
        with timed(sweep.stage("load")):
            sweep.model_info = pool.describe()
        # run.log begins once the model has loaded: a sweep refused before that leaves the folder as it was
        with run_log(run_dir):
            begin(sweep, overrides)
            table = stage_pairs(sweep)
            shards = plan_shards(table, cfg.resources.shard_size)
            with stage_circuit(sweep):  # it needs only the pairs: it runs beside these stages where it can
                activations = stage_cache(sweep, shards)
                effect_shards = stage_patch(sweep, shards)
                pool.keep(1)  # the summary is one work item
                stage_summary(sweep, effect_shards)
            stage_direction(sweep, activations)
            pool.close()
            with timed(sweep.stage("render")):
                stamp_run_tables(sweep)
                dropped = drop_skipped_outputs(sweep)
                if dropped:
                    log.info("removed the outputs of steps this config does not run: %s", ", ".join(dropped))
                summary_frame, found_circuit = render(sweep)
            sweep.finished("render")
            sweep.manifest.provenance = sweep.provenance
            sweep.manifest.finish([name for name in MANIFESTED if name in sweep.manifest.files])
            stale = remove_stale_shards(run_dir)
            if stale:
                log.info("removed %d shards that no longer belong to this run", stale)
            log.info("run %s finished", sweep.run["run_id"])
    except KeyboardInterrupt:
        finished = sum(stats.computed for stats in sweep.stats.values())
        raise Interrupted(f"interrupted: {finished} work item{'s' if finished != 1 else ''} finished; run the "
                          "same command to resume") from None
    finally:
        pool.close()
    return SweepOutcome(run_dir, sweep.run["run_id"], sweep.model_info, sweep.provenance, sweep.pairs_report,
                        list(sweep.stats.values()), summary_frame, layer_curves(summary_frame), found_circuit)


class Interrupted(Exception):
    """The sweep was stopped by Ctrl-C; the message says how many work items finished (a re-run reuses them)."""


def begin(sweep: Sweep, overrides: list[str]) -> None:
    """config.yaml and overrides.yaml, the run's own columns and the provenance every file carries."""
    cfg, run_dir = sweep.cfg, sweep.run_dir
    write_config(run_dir, cfg)
    publish_bytes(sweep.folder.overrides, redact(OmegaConf.to_yaml(OmegaConf.create(overrides))).encode())
    sweep.run = {"run_id": sweep.tracker.run_id if sweep.tracker is not None else uuid.uuid4().hex,
                 "config_hash": config_hash(cfg), "model": cfg.model.name}
    log.info("%s on %s (config %s, run %s) into %s; overrides: %s", cfg.name, cfg.model.name, config_hash(cfg),
             sweep.run["run_id"], run_dir.resolve(), " ".join(overrides) or "none")
    sweep.finished("load")
    sweep.provenance = {"config_hash": config_hash(cfg), "model_id": redact(cfg.model.path),
                        "weights_hash": sweep.weights_hash}


# ---- the stages ---------------------------------------------------------------------------------------

def stage_pairs(sweep: Sweep) -> pa.Table:
    """pairs.parquet, reused when finished under the same content key, else screened in batches."""
    cfg, out = sweep.cfg, sweep.folder.pairs
    key = pairs.content_key_of(cfg.model.path, cfg.prompts, sweep.weights_hash, sweep.model_info["tokenizer_hash"])
    transfer = sweep.folder.transfer_pairs if pairs.has_transfer(cfg.model.path, cfg.prompts) else None
    if sweep.reusable("pairs", pairs.__name__, key, (out.name,) + ((transfer.name,) if transfer else ())):
        sweep.stage("pairs").reused += 1
    else:
        screened = pairs.screen_pairs(
            lambda phase, folder, compute, items: sweep.run_phase("pairs", phase, folder, compute, items),
            sweep.folder.pairs_batches, key, cfg.model.path, cfg.prompts, cfg.resources.pairs_shard_size,
            sweep.provenance)
        with timed(sweep.stage("pairs")):
            path, _ = pairs.collect(screened, cfg.prompts, out, sweep.run, sweep.provenance)
            sweep.record(file_entry(path), key, pairs.__name__)
            if transfer:
                sweep.record(file_entry(pairs.collect_transfer(screened, transfer, sweep.provenance)), key,
                             pairs.__name__)
    sweep.transfer_hash = pairs_hash(read_table(transfer)) if transfer else None
    table = read_table(out)
    sweep.pairs_report = json.loads(provenance(table)["pairs_report"])
    sweep.provenance["pairs_hash"] = pairs_hash(table)
    sweep.labels_hash = content_key(table.column("category").to_pylist())
    sweep.finished("pairs")
    return table


def stage_cache(sweep: Sweep, shards: list[PairShard]) -> list[Path]:
    items = cache.plan(sweep.run_dir, shards, sweep.weights_hash, sweep.provenance)
    paths = sweep.run_sharded("cache", sweep.folder.activations, cache.run, items)
    sweep.finished("cache")
    return paths


def stage_patch(sweep: Sweep, shards: list[PairShard]) -> list[Path]:
    cfg = sweep.cfg
    items = patch.plan(sweep.run_dir, shards, cfg.patching, cfg.resources.shard_size, cfg.model.name,
                       sweep.weights_hash, sweep.provenance)
    return sweep.run_sharded("patch", sweep.folder.effect_shards, patch.run, items)


def stage_summary(sweep: Sweep, effect_shards: list[Path]) -> None:
    """Effect shards -> effects.parquet, summary.parquet and sites.json."""
    item = summary.plan(sweep.run_dir, effect_shards, sweep.cfg.summary, sweep.labels_hash, sweep.run, sweep.provenance)
    sweep.run_once("summary", summary.run, item, summary.OUTPUTS)
    sweep.finished("patch")
    sweep.finished("summary")


@contextmanager
def stage_circuit(sweep: Sweep):
    """The circuit search on a model actor (it needs forward passes). It reads only the screened pairs, so
    it runs on an actor of its own beside the stages in the block (the sweep's cache, patch and summary)
    where the pool has one to spare, else after them; the block's end waits for it."""
    if not sweep.cfg.circuit.enabled:
        yield
        return
    item = circuit.plan(sweep.run_dir, sweep.cfg, sweep.weights_hash, sweep.labels_hash, sweep.transfer_hash,
                        sweep.provenance)
    stats = sweep.stage("circuit")  # listed after pairs, where it starts
    with circuit.follow_progress(sweep.run_dir, lines=ThrottledLines()):
        reusable = sweep.reusable("circuit", circuit.__name__, item.key, (CIRCUIT.name,))
        job = None if reusable else sweep.pool.start(circuit.run, item)
        if job is not None:
            log.info("circuit: on an actor of its own, beside the cache, patch and summary stages")
        yield
        if job is None:
            sweep.run_once("circuit", circuit.run, item, (CIRCUIT.name,))
        else:
            for entry in sweep.pool.finish(job, stats):
                sweep.record(entry, item.key, circuit.__name__)
    sweep.finished("circuit")


def stage_direction(sweep: Sweep, activations: list[Path]) -> None:
    """The refusal direction on a model actor (direction.enabled), its means from the cache stage's shards."""
    if not sweep.cfg.direction.enabled:
        return
    item = direction.plan(sweep.run_dir, sweep.cfg.direction, sweep.weights_hash, sweep.provenance, activations)
    with direction.follow_progress(sweep.run_dir, lines=ThrottledLines()):
        sweep.run_once("direction", direction.run, item, (DIRECTION.name,))
    sweep.finished("direction")


def render(sweep: Sweep) -> tuple[pd.DataFrame, Circuit | None]:
    """layers.png, the circuit diagram and report.md, from the run folder's files."""
    cfg, folder = sweep.cfg, sweep.folder
    summary_frame = read_summary(folder.summary)
    found_circuit = read_circuit(folder.circuit) if sweep.manifest.is_valid(CIRCUIT.name) else None
    written = [layers_png(summary_frame, folder.layers_png, f"{cfg.name}: {cfg.model.name}")]
    if found_circuit is not None:
        written += render_circuit(found_circuit, folder.root).values()
    written.append(write_report(folder.report, cfg, sweep.model_info, sweep.pairs_report,
                                list(sweep.stats.values()), summary_frame, layer_curves(summary_frame), found_circuit))
    for path in [folder.config, folder.overrides, *written]:
        sweep.manifest.record(file_entry(path))
    return summary_frame, found_circuit
