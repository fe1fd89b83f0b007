"""The stage graph of one model's sweep: pairs -> cache -> patch -> summary -> direction -> render, and the
circuit step after pairs (beside cache, patch and summary on an actor of its own where the pool has one to spare).

Each stage's work items go to the model actors (pipeline.run.workers); what they publish is recorded
with its checksum in a manifest, so a re-run reuses every finished file (listed, under the same content
key, bytes intact) and recomputes the rest. Pair shards and effect shards are named by a content key
(the hash of everything that determines them) and listed in their folder's manifest; the run folder's
manifest lists the rest (pipeline.outputs.files), written last. The heatmaps, the circuit diagram and
the report are drawn on the driver from the files.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipeline.analysis.pairs import ScreenCounts, pairs_report, with_report
from pipeline.analysis.statistics import LayerPoint, layer_curves, read_summary
from pipeline.outputs.diagram import render_circuit
from pipeline.outputs.files import MANIFESTED
from pipeline.outputs.heatmaps import layers_png
from pipeline.outputs.report import write_report
from pipeline.run.logs import run_log
from pipeline.run.scheduler import Room
from pipeline.run.workers import StageStats, WorkerPool, notice, start_ray, timed
from pipeline.schema import PatchsweepConfig, config_hash, from_plain, to_plain
from pipeline.stages import pairs as pairs_stage
from pipeline.stages.circuit import follow_progress
from pipeline.store import (MANIFEST, PRODUCER, Manifest, content_key, file_entry, provenance, publish_bytes,
                            read_schema, read_table, sha256_file, with_columns, write_table)

log = logging.getLogger(__name__)
# The tables whose rows say which run and config they belong to (RUN_COLUMNS first).
RUN_TABLES = ("pairs.parquet", "effects.parquet", "summary.parquet")
RUN_COLUMNS = ("run_id", "config_hash", "model")


@dataclass
class Sweep:
    """What the stages of one model's sweep share."""

    cfg: PatchsweepConfig
    run_dir: Path
    pool: WorkerPool
    manifest: Manifest  # the run folder's
    run: dict = field(default_factory=dict)  # the run's own columns (RUN_COLUMNS) of every table in RUN_TABLES
    tracker: Tracker | None = None
    model_info: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    pairs_report: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    stats: dict[str, StageStats] = field(default_factory=dict)

    def stage(self, name: str) -> StageStats:
        return self.stats.setdefault(name, StageStats(name))

    def finished(self, name: str) -> None:
        """A stage is done: into run.log, and to the live run's tracking."""
        stats = self.stage(name)
        log.info("%s: %d computed, %d reused, %d retried, %.1f s", name, stats.computed, stats.reused, stats.retried,
                 stats.seconds)
        if self.tracker is not None:
            self.tracker.stage_finished(stats)

    def run_once(self, stage: str, item: dict, key: str, outputs: tuple[str, ...]) -> None:
        """Run one work item whose `outputs` (run-folder files) are recorded under content key `key`,
        unless every one of them is already finished under that key."""
        with timed(self.stage(stage)) as stats:
            if all(self.manifest.is_valid(name, key) for name in outputs):
                stats.reused += 1
                return
            [files] = self.pool.map(stage, [item], stats=stats)
            for entry in files:
                self.manifest.record(entry, key=key)


@dataclass
class SweepOutcome:
    run_dir: Path
    run_id: str
    model_info: dict
    provenance: dict
    pairs_report: dict
    stats: list[StageStats]
    summary: pd.DataFrame
    curves: dict[tuple[str, str], list[LayerPoint]]
    circuit: dict | None


class Tracker(Protocol):
    """What follows a sweep while it runs (pipeline.run.tracking.LiveRun: an MLflow run)."""

    @property
    def run_id(self) -> str:
        """The run's id, written into its tables (read once the model is loaded: it may wait for it)."""

    def stage_finished(self, stats: StageStats) -> None:
        """A stage is done (its time and work counts)."""


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
            write_config(run_dir, cfg)
            publish_bytes(run_dir / "overrides.yaml", OmegaConf.to_yaml(OmegaConf.create(overrides)).encode())
            sweep.run = {"run_id": tracker.run_id if tracker is not None else uuid.uuid4().hex,
                         "config_hash": config_hash(cfg), "model": cfg.model.name}
            log.info("%s on %s (config %s, run %s) into %s; overrides: %s", cfg.name, cfg.model.name,
                     config_hash(cfg), sweep.run["run_id"], run_dir.resolve(), " ".join(overrides) or "none")
            sweep.finished("load")
            sweep.provenance = {"config_hash": config_hash(cfg), "model_id": cfg.model.path,
                                "weights_hash": sweep.model_info["weights_hash"]}
            pairs = stage_pairs(sweep)
            sweep.finished("pairs")
            sweep.provenance["pairs_hash"] = pairs_hash(pairs)
            sweep.shards = plan_shards(pairs, cfg.resources.shard_size)
            with stage_circuit(sweep):  # it needs only the pairs: it runs beside these stages where it can
                stage_cache(sweep)
                sweep.finished("cache")
                effect_shards = stage_patch(sweep)
                pool.keep(1)  # the summary is one work item
                stage_summary(sweep, effect_shards)
                sweep.finished("patch")
                sweep.finished("summary")
            stage_direction(sweep)
            if cfg.direction.enabled:
                sweep.finished("direction")
            pool.close()
            with timed(sweep.stage("render")):
                stamp_run_tables(sweep)
                summary, circuit = render(sweep)
            sweep.finished("render")
            sweep.manifest.provenance = sweep.provenance
            sweep.manifest.finish([name for name in MANIFESTED if name in sweep.manifest.files])
            log.info("run %s finished", sweep.run["run_id"])
    except KeyboardInterrupt:
        finished = sum(stats.computed for stats in sweep.stats.values())
        raise Interrupted(f"interrupted: {finished} work item{'s' if finished != 1 else ''} finished; run the "
                          "same command to resume") from None
    finally:
        pool.close()
    return SweepOutcome(run_dir, sweep.run["run_id"], sweep.model_info, sweep.provenance, sweep.pairs_report,
                        list(sweep.stats.values()), summary, layer_curves(summary), circuit)


class Interrupted(Exception):
    """The sweep was stopped by Ctrl-C; the message says how many work items finished (a re-run reuses them)."""


class FolderBusy(RuntimeError):
    """Another sweep holds the output folder's lock; the message names it."""


LOCK_FILE = ".patchsweep.lock"


@contextmanager
def folder_lock(run_dir: Path):
    """Hold `run_dir` for one sweep: a second sweep into the same folder is refused, naming the holder.

    The lock is an flock on `run_dir/.patchsweep.lock`, which records the holder's pid, host and start
    time. The kernel drops an flock when its process dies, however it dies, so the lock of a dead sweep
    is taken over by the next one (and said so); the file is removed when the sweep ends. Folders the
    lock had to create are removed again if the sweep left them empty."""
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FolderBusy(f"output folder {run_dir} is in use by another sweep ({holder or 'holder unknown'}): "
                             "wait for it to finish, or set output_dir=<another folder>") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # the previous holder removed this file as we locked it: lock the new one
    previous = _lock_holder(fd)
    if previous:
        notice(f"the sweep that held {run_dir} ({previous}) is no longer running: its lock is taken over and its "
               "finished work reused")
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                              "since": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        for folder in created:
            if any(folder.iterdir()):
                break
            folder.rmdir()


def _lock_holder(fd: int) -> str:
    """The holder a lock file records, in words ("" when it records none)."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0) or b"null")
        return f"pid {holder['pid']} on {holder['host']}, since {holder['since']}"
    except (ValueError, TypeError, KeyError):
        return ""


def finished_run(run_dir: Path) -> tuple[PatchsweepConfig, SweepOutcome]:
    """The config and outcome of a finished sweep, read back from its folder (what `patchsweep log`
    logs): its manifest must be complete and every file it lists intact. Stage times are not kept in
    the folder's files (report.md lists them), so the outcome has none."""
    manifest = Manifest(run_dir, "run")
    if not manifest.complete:
        raise ValueError(f"{run_dir} is not a finished sweep's folder (no complete {MANIFEST} there): run the sweep "
                         "to its end first (the same command resumes it)")
    damaged = [name for name in manifest.files if not manifest.is_valid(name)]
    if damaged:
        raise ValueError(f"{run_dir} has files that no longer match its {MANIFEST} ({', '.join(damaged)}): run "
                         "the sweep again (the same command) to recompute them")
    cfg = from_plain(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"), resolve=True))
    pairs_report = json.loads(provenance(read_schema(run_dir / "pairs.parquet"))["pairs_report"])
    summary = read_summary(run_dir / "summary.parquet")
    circuit = json.loads((run_dir / "circuit.json").read_text()) if "circuit.json" in manifest.files else None
    lineage = json.loads((run_dir / MANIFEST).read_text())["provenance"]
    return cfg, SweepOutcome(run_dir, str(summary["run_id"].iloc[0]), {}, lineage, pairs_report, [], summary,
                             layer_curves(summary), circuit)


def write_config(run_dir: Path, cfg: PatchsweepConfig) -> None:
    """config.yaml, written before any result: it marks the folder as this experiment's (pipeline.validation)."""
    publish_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg))).encode())


def stamp_run_tables(sweep: Sweep) -> None:
    """Tables reused from an earlier run still name that run: rewrite their run columns to this one's
    (the numbers are the same; the manifest keeps their content key, with the new checksum)."""
    for name in RUN_TABLES:
        path = sweep.run_dir / name
        # The run columns are constant: the first row group's say whose the table is (a finished run's
        # effects.parquet is not read whole to find out).
        parquet = pq.ParquetFile(path)
        if parquet.metadata.num_rows == 0:
            continue
        first = parquet.read_row_group(0, columns=list(RUN_COLUMNS))
        if all(first.column(c)[0].as_py() == sweep.run[c] for c in RUN_COLUMNS):
            continue
        table = read_table(path)
        write_table(path, with_columns(table, sweep.run), provenance(table))
        sweep.manifest.record(file_entry(path), key=sweep.manifest.files[name]["key"])


# ---- the stages ---------------------------------------------------------------------------------------

def stage_pairs(sweep: Sweep) -> pa.Table:
    """pairs.parquet, reused when finished under the same content key, else built by `build_pairs_file`."""
    cfg = sweep.cfg
    # A user's prompt file counts by its content: an edited file gives new pairs, never the old ones.
    prompts_file = sha256_file(cfg.prompts.path) if cfg.prompts.path else None
    key = content_key("pairs", PRODUCER, sweep.model_info["weights_hash"], cfg.model.path, asdict(cfg.prompts),
                      prompts_file)
    if sweep.manifest.is_valid("pairs.parquet", key):
        sweep.stage("pairs").reused += 1
    else:
        build_pairs_file(sweep, key)
    pairs = read_table(sweep.run_dir / "pairs.parquet")
    sweep.pairs_report = json.loads(provenance(pairs)["pairs_report"])
    return pairs


def build_pairs_file(sweep: Sweep, key: str) -> None:
    """The pairs stage's phases (pipeline.stages.pairs) as work items spread over the actors: the whole set
    tokenized once (repeats dropped across it), then batches of resources.pairs_shard_size pairs replied to,
    the answer tokens derived once from every batch's replies, the batches screened, and their kept rows
    put together into pairs.parquet. Only a batch's pairs are in an actor's memory at a time, and every
    file is named by a content key, so a resumed run reuses the batches it finished."""
    prompts, folder, prov = asdict(sweep.cfg.prompts), sweep.run_dir / "pairs", sweep.provenance
    [tokens_file] = run_sharded(sweep, "pairs", folder / "tokens", [
        {"name": "pairs", "model_path": sweep.cfg.model.path, "prompts": prompts,
         "out": str(folder / "tokens" / f"{key}.arrow"), "provenance": prov}])
    n, size = read_table(tokens_file).num_rows, sweep.cfg.resources.pairs_shard_size
    batches = [(start, min(start + size, n)) for start in range(0, n, size)]
    replies = run_pairs_phase(sweep, "replies", folder / "replies", [
        {"name": f"replies {start}-{stop}", "tokens": str(tokens_file), "start": start, "stop": stop,
         "max_new_tokens": prompts["max_new_tokens"], "provenance": prov,
         "out": str(folder / "replies" / f"{content_key('replies', key, start, stop)}.arrow")}
        for start, stop in batches] if prompts["generate"] else [])
    answers_key = content_key("answers", key, [path.name for path in replies])
    [answers] = run_pairs_phase(sweep, "answers", folder / "answers", [
        {"name": "answers", "replies": [str(path) for path in replies], "prompts": prompts,
         "out": str(folder / "answers" / f"{answers_key}.json")}])
    screened = run_pairs_phase(sweep, "screen", folder / "screen", [
        {"name": f"screen {start}-{stop}", "tokens": str(tokens_file), "start": start, "stop": stop,
         "replies": str(replies[i]) if replies else None, "answers": str(answers), "provenance": prov,
         "out": str(folder / "screen" / f"{content_key('screen', answers_key, start, stop)}.arrow")}
        for i, (start, stop) in enumerate(batches)])
    with timed(sweep.stage("pairs")):
        counts = sum((pairs_stage.read_counts(path) for path in screened), ScreenCounts())
        report = pairs_report(counts, pairs_stage.n_duplicates(tokens_file), prompts["align"], prompts["generate"],
                              pairs_stage.read_answers(answers))
        kept = pa.concat_tables([read_table(path).replace_schema_metadata(None) for path in screened])
        path = write_table(sweep.run_dir / "pairs.parquet", with_columns(with_report(kept, report), sweep.run),
                           {**prov, "pairs_report": json.dumps(report)})
        sweep.manifest.record(file_entry(path), key=key)


def run_pairs_phase(sweep: Sweep, phase: str, folder: Path, items: list[dict]) -> list[Path]:
    """`run_sharded` for one phase of the pairs stage after its first: a progress bar of its own, its
    counts and time the pairs stage's."""
    paths = run_sharded(sweep, phase, folder, items)
    done, pairs = sweep.stats.pop(phase), sweep.stage("pairs")
    pairs.computed += done.computed
    pairs.reused += done.reused
    pairs.retried += done.retried
    pairs.seconds += done.seconds
    return paths


def plan_shards(pairs: pa.Table, shard_size: int) -> list[dict]:
    """Pair shards: rows of one clean and one corrupted token length (the engine batches [P, T]), at
    most shard_size each, named by their pair ids (written into every output row) and the content of
    their token ids and answers."""
    by_length: dict[tuple[int, int], list[int]] = {}
    lengths = zip(pairs.column("seq_len").to_pylist(), pairs.column("align_offset").to_pylist())
    for row, (seq_len, offset) in enumerate(lengths):
        by_length.setdefault((seq_len, offset), []).append(row)
    columns = {c: pairs.column(c).to_pylist() for c in PAIR_CONTENT}
    shards = []
    for seq_len, offset in sorted(by_length):
        rows = by_length[seq_len, offset]
        for start in range(0, len(rows), shard_size):
            part = rows[start:start + shard_size]
            content = {c: [values[r] for r in part] for c, values in columns.items()}
            shards.append({"rows": part, "seq_len": seq_len, "key": content_key(content)})
    return shards


PAIR_CONTENT = ("pair_id", "clean_ids", "corrupted_ids", "refusal_ids", "compliance_ids")


def pairs_hash(pairs: pa.Table) -> str:
    """sha256 of the pairs' content (ids, answers), independent of file metadata."""
    blob = json.dumps({c: pairs.column(c).to_pylist() for c in PAIR_CONTENT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def run_sharded(sweep: Sweep, stage: str, folder: Path, items: list[dict]) -> list[Path]:
    """Run the items whose content-keyed output is not already finished (listed, checksum intact)."""
    stats = sweep.stage(stage)
    manifest = Manifest(folder, stage, {"config_hash": sweep.provenance["config_hash"]})
    with timed(stats):
        todo = []
        for item in items:
            if manifest.is_valid(Path(item["out"]).name):
                stats.reused += 1
            else:
                todo.append(item)

        def record(item: dict, files: list[dict]) -> None:
            for entry in files:
                manifest.record(entry)

        sweep.pool.map(stage, todo, on_result=record, stats=stats)
        manifest.finish([Path(item["out"]).name for item in items])
    return [Path(item["out"]) for item in items]


def stage_cache(sweep: Sweep) -> list[Path]:
    folder = sweep.run_dir / "activations"
    weights = sweep.model_info["weights_hash"]
    items = [{"name": f"cache {shard['key']}", "pairs": str(sweep.run_dir / "pairs.parquet"), "rows": shard["rows"],
              "out": str(folder / f"{content_key('cache', PRODUCER, weights, shard['key'])}.arrow"),
              "provenance": sweep.provenance} for shard in sweep.shards]
    return run_sharded(sweep, "cache", folder, items)


def stage_patch(sweep: Sweep) -> list[Path]:
    folder = sweep.run_dir / "effects"
    patching, weights = asdict(sweep.cfg.patching), sweep.model_info["weights_hash"]
    items = []
    for bucket in bucket_shards(sweep.shards, sweep.cfg.resources.shard_size):
        for component in patching["components"]:
            for direction in patching["directions"]:
                work = {"component": component, "direction": direction, "metric": patching["metric"],
                        "per_position": component in patching["per_position"], "layers": patching["layers"],
                        "heads": patching["heads"] if component == "head" else None}
                key = content_key("patch", PRODUCER, weights, [shard["key"] for shard in bucket], work)
                items.append({**work, "name": f"patch {component} {direction} {key}",
                              "pairs": str(sweep.run_dir / "pairs.parquet"), "shards": [shard["rows"] for shard in bucket],
                              "model": sweep.cfg.model.name, "batch_size": patching["batch_size"],
                              "out": str(folder / f"{key}.arrow"), "provenance": sweep.provenance})
    return run_sharded(sweep, "patch", folder, items)


def bucket_shards(shards: list[dict], pairs_per_item: int) -> list[list[dict]]:
    """Pair shards (one token length each) put together, in order, into work items of at most
    `pairs_per_item` pairs: an item pays a fixed cost (a Ray round trip, reading the pairs, writing a
    file), so short lengths with few pairs share one instead of each taking its own."""
    buckets: list[list[dict]] = []
    for shard in shards:
        if buckets and sum(len(s["rows"]) for s in buckets[-1]) + len(shard["rows"]) <= pairs_per_item:
            buckets[-1].append(shard)
        else:
            buckets.append([shard])
    return buckets


def stage_summary(sweep: Sweep, effect_shards: list[Path]) -> None:
    """Effect shards -> effects.parquet, summary.parquet and sites.json."""
    options = asdict(sweep.cfg.summary)
    item = {"name": "summary", "shards": [str(p) for p in effect_shards], "pairs": str(sweep.run_dir / "pairs.parquet"),
            "effects": str(sweep.run_dir / "effects.parquet"), "summary": str(sweep.run_dir / "summary.parquet"),
            "sites": str(sweep.run_dir / "sites.json"), "options": options, "run": sweep.run, "provenance": sweep.provenance}
    key = content_key("summary", PRODUCER, [p.name for p in effect_shards], options)
    sweep.run_once("summary", item, key, ("effects.parquet", "summary.parquet", "sites.json"))


@contextmanager
def stage_circuit(sweep: Sweep):
    """The circuit search on a model actor (it needs forward passes). It reads only the screened pairs, so
    it runs on an actor of its own beside the stages in the block (the sweep's cache, patch and summary)
    where the pool has one to spare, else after them; the block's end waits for it."""
    cfg = sweep.cfg
    if not cfg.circuit.enabled:
        yield
        return
    item = {"name": "circuit", "run_dir": str(sweep.run_dir), "model": cfg.model.name,
            "circuit": asdict(cfg.circuit), "summary": asdict(cfg.summary), "metric": cfg.patching.metric,
            "max_new_tokens": cfg.prompts.max_new_tokens, "provenance": sweep.provenance}
    key = content_key("circuit", PRODUCER, sweep.model_info["weights_hash"], sweep.provenance["pairs_hash"],
                      asdict(cfg.circuit), asdict(cfg.summary), cfg.patching.metric, cfg.prompts.max_new_tokens)
    stats = sweep.stage("circuit")
    with follow_progress(sweep.run_dir):
        job = None if sweep.manifest.is_valid("circuit.json", key) else sweep.pool.start("circuit", item)
        if job is not None:
            log.info("circuit: on an actor of its own, beside the cache, patch and summary stages")
        yield
        if job is None:
            sweep.run_once("circuit", item, key, ("circuit.json",))
        else:
            for entry in sweep.pool.finish(job, stats):
                sweep.manifest.record(entry, key=key)
    sweep.finished("circuit")


def stage_direction(sweep: Sweep) -> None:
    """The refusal direction on a model actor (opt-in: direction.enabled)."""
    cfg = sweep.cfg
    if not cfg.direction.enabled:
        return
    item = {"name": "direction", "pairs": str(sweep.run_dir / "pairs.parquet"), "options": asdict(cfg.direction),
            "out": str(sweep.run_dir / "direction.arrow"), "provenance": sweep.provenance}
    key = content_key("direction", PRODUCER, sweep.model_info["weights_hash"], sweep.provenance["pairs_hash"],
                      asdict(cfg.direction))
    sweep.run_once("direction", item, key, ("direction.arrow",))


def render(sweep: Sweep) -> tuple[pd.DataFrame, dict | None]:
    """layers.png, the circuit diagram and report.md, from the run folder's files."""
    cfg, run_dir = sweep.cfg, sweep.run_dir
    summary = read_summary(run_dir / "summary.parquet")
    circuit_path = run_dir / "circuit.json"
    circuit = json.loads(circuit_path.read_text()) if sweep.manifest.is_valid("circuit.json") else None
    written = [layers_png(summary, run_dir / "layers.png", f"{cfg.name}: {cfg.model.name}")]
    if circuit is not None:
        written += render_circuit(circuit, run_dir).values()
    written.append(write_report(run_dir / "report.md", cfg, sweep.model_info, sweep.pairs_report,
                                list(sweep.stats.values()), summary, layer_curves(summary), circuit))
    for path in [run_dir / "config.yaml", run_dir / "overrides.yaml", *written]:
        sweep.manifest.record(file_entry(path))
    return summary, circuit
