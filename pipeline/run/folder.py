"""The run folder on the driver's side: one sweep at a time holds it (`folder_lock`), the project's marker
and the config that mark it as one experiment's (`write_config`), files the project did not write found
before any is overwritten (`foreign_files`), the run columns of reused tables brought up to date
(`stamp_run_tables`), what a finished run no longer holds taken out (`drop_skipped_outputs`,
`remove_stale_shards`), and a finished sweep read back from it (`finished_run`, what `patchsweep log` logs).
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipeline.analysis.circuit.result import read_circuit
from pipeline.analysis.statistics import layer_curves, read_summary
from pipeline.messages import redact
from pipeline.outputs.files import (
    ACTIVATIONS,
    CIRCUIT,
    CIRCUIT_DOT,
    CIRCUIT_NODES_PNG,
    CIRCUIT_NODES_SVG,
    CIRCUIT_PNG,
    CIRCUIT_PROGRESS,
    CIRCUIT_SVG,
    DIRECTION,
    EFFECT_SHARDS,
    EFFECTS,
    OUTPUT_FILES,
    PAIRS,
    PAIRS_BATCHES,
    SUMMARY,
    TRANSFER_PAIRS,
    RunFolder,
)
from pipeline.run.runner import Sweep, SweepOutcome
from pipeline.run.workers import notice
from pipeline.schema import PatchsweepConfig, config_hash, from_plain, to_plain
from pipeline.store import (
    MANIFEST,
    PRODUCER,
    Manifest,
    file_entry,
    provenance,
    publish_bytes,
    publish_json,
    read_schema,
    read_table,
    with_columns,
    write_table,
)

# The tables whose rows say which run and config they belong to (RUN_COLUMNS first).
RUN_TABLES = (PAIRS.name, EFFECTS.name, SUMMARY.name)
RUN_COLUMNS = ("run_id", "config_hash", "model")


class FolderBusy(RuntimeError):
    """Another sweep holds the output folder's lock; the message names it."""


@contextmanager
def folder_lock(run_dir: Path):
    """Hold `run_dir` for one sweep: a second sweep into the same folder is refused, naming the holder.

    The lock is an flock on `run_dir/.patchsweep.lock`, which records the holder's pid, host and start
    time. The kernel drops an flock when its process dies, however it dies, so the lock of a dead sweep
    is taken over by the next one (and said so); the file is removed when the sweep ends. Folders the
    lock had to create are removed again if the sweep left them empty."""
    created = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]  # deepest first
    run_dir.mkdir(parents=True, exist_ok=True)
    path = RunFolder(run_dir).lock
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
    manifest.refuse_malformed()
    if not manifest.complete:
        raise ValueError(f"{run_dir} is not a finished sweep's folder (no complete {MANIFEST} there): run the sweep "
                         "to its end first (the same command resumes it)")
    damaged = [name for name in manifest.files if not manifest.is_valid(name)]
    if damaged:
        raise ValueError(f"{run_dir} has files that no longer match its {MANIFEST} ({', '.join(damaged)}): run "
                         "the sweep again (the same command) to recompute them")
    folder = RunFolder(run_dir)
    cfg = from_plain(OmegaConf.to_container(OmegaConf.load(folder.config), resolve=True))
    pairs_report = json.loads(provenance(read_schema(folder.pairs))["pairs_report"])
    summary = read_summary(folder.summary)
    circuit = read_circuit(folder.circuit) if CIRCUIT.name in manifest.files else None
    lineage = json.loads(folder.manifest.read_text())["provenance"]
    return cfg, SweepOutcome(run_dir, str(summary["run_id"].iloc[0]), {}, lineage, pairs_report, [], summary,
                             layer_curves(summary), circuit)


def checked_direction(run_dir: Path) -> str:
    """direction.arrow of a finished run, checked against the run's manifest (sha256) before anything reads
    it; returns the weights digest of the model it was found on ("" where the manifest records none). A
    file the manifest does not list, or whose bytes differ, is refused in one line (ValueError)."""
    manifest = Manifest(run_dir, "run")
    manifest.refuse_malformed()
    path = RunFolder(run_dir).direction
    if DIRECTION.name not in manifest.files:
        raise ValueError(f"{path} is not listed in {manifest.path} (its sweep did not finish, or did not write it): "
                         "run that sweep to its end with direction.enabled=true, or set intervention.run to another "
                         "run folder")
    if not manifest.is_valid(DIRECTION.name):
        raise ValueError(f"{path} does not match its sha256 in {manifest.path} (damaged or changed since its sweep): "
                         "run that sweep again (the same command recomputes it), or set intervention.run to another "
                         "run folder")
    return str(json.loads(manifest.path.read_text()).get("provenance", {}).get("weights_hash", ""))


def write_config(run_dir: Path, cfg: PatchsweepConfig) -> None:
    """The project's marker (first: the folder is this project's from then on), then config.yaml, before any
    result: they mark the folder as this experiment's (pipeline.validation). Credentials in the config's
    URIs are redacted (`patchsweep log` then takes MLflow's from the environment)."""
    folder = RunFolder(run_dir)
    publish_json(folder.marker, {"producer": PRODUCER, "config_hash": config_hash(cfg), "experiment": cfg.name,
                                 "model": cfg.model.name})
    publish_bytes(folder.config, redact(OmegaConf.to_yaml(OmegaConf.create(to_plain(cfg)))).encode())


# Every name a sweep writes at the top of its folder.
PROJECT_NAMES = tuple(f.name.rstrip("/") for f in OUTPUT_FILES) + (CIRCUIT_PROGRESS,)


def foreign_files(run_dir: Path) -> list[str]:
    """Files in `run_dir` of names a sweep writes that the project did not write: none in a folder that
    has the project's marker or a manifest patchsweep wrote (a run's from before the marker); else every
    such name there."""
    folder = RunFolder(run_dir)
    if not run_dir.is_dir() or folder.marker.is_file() or _written_by_patchsweep(run_dir):
        return []
    return [name for name in PROJECT_NAMES if (run_dir / name).exists()]


def _written_by_patchsweep(run_dir: Path) -> bool:
    """A manifest of the run or of its stages' shard folders that patchsweep wrote is there."""
    for manifest in [run_dir / MANIFEST, *run_dir.glob(f"*/{MANIFEST}"), *run_dir.glob(f"*/*/{MANIFEST}")]:
        try:
            if json.loads(manifest.read_text()).get("producer", "").startswith("patchsweep "):
                return True
        except (OSError, ValueError, AttributeError):
            continue
    return False


def drop_skipped_outputs(sweep: Sweep) -> list[str]:
    """Outputs of steps this run's config does not run (a resume with circuit.enabled=false keeps the last
    run's circuit.json otherwise): the files are removed and dropped from the run's manifest, so the report,
    `load_run` and MLflow never show them. Returns their names."""
    cfg, manifest = sweep.cfg, sweep.manifest
    skipped = []
    if not cfg.circuit.enabled:
        skipped += [CIRCUIT, CIRCUIT_SVG, CIRCUIT_PNG, CIRCUIT_NODES_SVG, CIRCUIT_NODES_PNG, CIRCUIT_DOT]
    if not cfg.direction.enabled:
        skipped.append(DIRECTION)
    if sweep.transfer_hash is None:
        skipped.append(TRANSFER_PAIRS)
    dropped = [f.name for f in skipped if (sweep.run_dir / f.name).exists() or f.name in manifest.files]
    for name in dropped:
        (sweep.run_dir / name).unlink(missing_ok=True)
        manifest.files.pop(name, None)
    if dropped:
        manifest.save()
    return dropped


def remove_stale_shards(run_dir: Path) -> int:
    """Shards of a finished run that no longer belong to it (its pairs or options changed): every file in a
    shard folder whose manifest is complete and does not list it is removed, so readers of the folder
    (`load_run(...).activations()`, a glob) see this run's shards alone. Returns how many were removed."""
    folder, removed = RunFolder(run_dir), 0
    roots = (folder.root / ACTIVATIONS.name, folder.root / EFFECT_SHARDS.name, folder.root / PAIRS_BATCHES.name)
    for manifest_path in [path for root in roots for path in root.rglob(MANIFEST)]:
        manifest = Manifest(manifest_path.parent, "shards")
        if not manifest.complete or manifest.malformed:
            continue
        for path in manifest.folder.iterdir():
            if path.is_file() and path.name != MANIFEST and path.name not in manifest.files:
                path.unlink()
                removed += 1
    return removed


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
        sweep.manifest.rewritten(file_entry(path))
