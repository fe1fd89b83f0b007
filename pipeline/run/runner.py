"""What the stages of one model's sweep share on the driver, and how their items are run: each item on
the model actors (pipeline.run.workers) unless its outputs are already finished.

Shard-like items (pairs batches, activation and effect shards) publish one file named by a content key
and are listed in their folder's manifest; run-folder items (summary, circuit, direction) are recorded in
the run folder's manifest under the content key the item carries. A re-run reuses every output listed
under the same key with its bytes intact, and recomputes the rest. Each file is recorded with the code
identity of the stage module that computed it (store.code_identity, also part of its content key): where
a stage recomputes what the folder holds from other code, the run says so once, naming the changed files.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import pandas as pd

from pipeline.analysis.circuit.result import Circuit
from pipeline.analysis.statistics import LayerPoint
from pipeline.outputs.files import RunFolder
from pipeline.run.workers import StageStats, WorkerPool, notice, timed
from pipeline.schema import PatchsweepConfig
from pipeline.store import Manifest

log = logging.getLogger(__name__)


class Tracker(Protocol):
    """What follows a sweep while it runs (pipeline.run.tracking.LiveRun: an MLflow run)."""

    @property
    def run_id(self) -> str:
        """The run's id, written into its tables (read once the model is loaded: it may wait for it)."""

    def stage_finished(self, stats: StageStats) -> None:
        """A stage is done (its time and work counts)."""


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
    circuit: Circuit | None


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
    stats: dict[str, StageStats] = field(default_factory=dict)
    labels_hash: str = ""  # content key of the pairs' category labels (set by the pairs stage)
    transfer_hash: str | None = None  # the transfer pairs' content (set by the pairs stage; None: none)
    code_noticed: set[str] = field(default_factory=set)  # stage modules whose changed code the run has told of

    @property
    def folder(self) -> RunFolder:
        return RunFolder(self.run_dir)

    @property
    def weights_hash(self) -> str:
        return self.model_info["weights_hash"]

    def stage(self, name: str) -> StageStats:
        return self.stats.setdefault(name, StageStats(name))

    def finished(self, name: str) -> None:
        """A stage is done: into run.log, and to the live run's tracking."""
        stats = self.stage(name)
        log.info("%s: %d computed, %d reused, %d retried, %.1f s", name, stats.computed, stats.reused, stats.retried,
                 stats.seconds)
        if self.tracker is not None:
            self.tracker.stage_finished(stats)

    def reusable(self, stage: str, module: str, key: str, outputs: tuple[str, ...]) -> bool:
        """Whether every one of `outputs` (run-folder files) is finished under content key `key`; where
        not, tell of results there computed by other code than `module`'s (`code_changed`)."""
        if all(self.manifest.is_valid(name, key) for name in outputs):
            return True
        self.code_changed(stage, self.manifest, module, 1, outputs)
        return False

    def record(self, entry: dict, key: str, module: str) -> None:
        """A run-folder file `module` computed, into the run folder's manifest under content key `key`."""
        self.manifest.record(entry, module, key=key)

    def code_changed(self, stage: str, manifest: Manifest, module: str, n_items: int, names=None) -> None:
        """One line, once per stage module, where `manifest` lists results (`names`, default all) computed by
        other code than `module`'s that the stage is about to recompute: numbers a folder holds are
        never silently replaced by the current code's."""
        changed = None if module in self.code_noticed else manifest.other_code(module, names)
        if changed is None:
            return
        self.code_noticed.add(module)
        files = ", ".join(changed[:3]) + (f" and {len(changed) - 3} more" if len(changed) > 3 else "")
        message = (f"{stage}: the code that computes it changed since this folder's results"
                   f"{f' ({files})' if files else ''}: recomputing {n_items} item{'s' if n_items != 1 else ''}")
        log.info(message)
        notice(message)

    def run_once(self, stage: str, compute: Callable, item, outputs: tuple[str, ...]) -> None:
        """Run one item whose `outputs` (run-folder files) are recorded under its content key `item.key`,
        unless every one of them is already finished under that key."""
        with timed(self.stage(stage)) as stats:
            if self.reusable(stage, compute.__module__, item.key, outputs):
                stats.reused += 1
                return
            [files] = self.pool.map(compute, [item], stats=stats)
            for entry in files:
                self.record(entry, item.key, compute.__module__)

    def run_sharded(self, stage: str, folder: Path, compute: Callable, items: list) -> list[Path]:
        """Run the items whose content-keyed output `item.out` is not already finished (listed in the
        folder's manifest, checksum intact); returns every item's output, in item order."""
        stats = self.stage(stage)
        manifest = Manifest(folder, stage, {"config_hash": self.provenance["config_hash"]})
        with timed(stats):
            todo = []
            for item in items:
                if manifest.is_valid(Path(item.out).name):
                    stats.reused += 1
                else:
                    todo.append(item)
            if todo:
                self.code_changed(stage, manifest, compute.__module__, len(todo))

            def record(item, files: list[dict]) -> None:
                for entry in files:
                    manifest.record(entry, compute.__module__)

            self.pool.map(compute, todo, on_result=record, stats=stats)
            manifest.finish([Path(item.out).name for item in items])
        return [Path(item.out) for item in items]

    def run_phase(self, stage: str, phase: str, folder: Path, compute: Callable, items: list) -> list[Path]:
        """`run_sharded` for one phase of a stage: a progress bar of its own, its counts and time the stage's."""
        if phase == stage:
            return self.run_sharded(stage, folder, compute, items)
        paths = self.run_sharded(phase, folder, compute, items)
        done, total = self.stats.pop(phase), self.stage(stage)
        total.computed += done.computed
        total.reused += done.reused
        total.retried += done.retried
        total.seconds += done.seconds
        return paths
