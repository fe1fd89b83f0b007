"""Finished run folders, loaded back for a notebook: `pipeline.load_run(path)` one run,
`pipeline.load_runs(root)` every run under an output root.

    run = pipeline.load_run("outputs/refusal_smol/smollm2-refusal-generated")
    run.summary                 # pandas: one row per site, mean effect and its interval
    run.effects, run.pairs      # pandas (nullable integers stay integers)
    run.circuit                 # circuit.json as a typed Circuit (None when the circuit step was off)
    run.circuit.nodes[0].id, run.circuit.faithfulness, run.circuit.stability.core
    run.config, run.overrides   # the resolved config and the command line it came from
    run.activations()           # a pyarrow dataset over every activation shard

    runs = pipeline.load_runs("outputs")
    runs.summary, runs.effects  # every run's rows in one pandas frame (their run_id, config_hash, model say whose)
    runs.files("effects")       # the runs' effects.parquet paths, for DuckDB or polars (hive_partitioning off)

The tables are the run folder's Parquet files (pipeline.outputs.files lists them) and are read on first
use. By default every file the run's manifest lists is checked against its sha256 first, so a damaged
or half-copied folder is refused rather than read.

An output root holds run folders at <experiment>/<model>-<prompts>, a --multirun's jobs one level deeper,
and the MLflow store's copies of their files (mlartifacts/ beside an SQLite store). A glob such as
`outputs/**/effects.parquet` reads those copies too, every row twice; `*/*/` misses the --multirun jobs.
`load_runs` takes the folders that carry a sweep's mark (.patchsweep-run), which MLflow's copies do not.
"""
from __future__ import annotations

import os
from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from pipeline.analysis.circuit.result import Circuit, read_circuit
from pipeline.outputs.files import CIRCUIT, EFFECTS, MARKER, OUTPUT_FILES, PAIRS, SUMMARY, RunFolder
from pipeline.store import MANIFEST, Manifest, read_table

TABLES = {Path(f.name).stem: f for f in (PAIRS, EFFECTS, SUMMARY)}
SHARD_FOLDERS = {f.name.rstrip("/") for f in OUTPUT_FILES if f.name.endswith("/")}  # a run's own work files


class Run:
    """The files of one finished run (see the module docstring)."""

    def __init__(self, path: str | Path, verify: bool = True):
        self.path = Path(path)
        self.folder = RunFolder(self.path)
        manifest = Manifest(self.path, "run")
        manifest.refuse_malformed()
        if not manifest.complete:
            raise ValueError(f"{self.path} holds no finished run ({MANIFEST} missing or incomplete): "
                             "give a run folder, e.g. outputs/<experiment>/<model>-<prompts>")
        if verify:
            damaged = [name for name in list(manifest.files) if not manifest.is_valid(name)]
            if damaged:
                raise ValueError(f"{self.path}: {', '.join(damaged)} no longer match their checksums in {MANIFEST} "
                                 "(damaged or changed): run the sweep again to recompute them, or pass verify=False")
        self.files = manifest.files
        self.provenance = manifest.provenance

    def read(self, name: str) -> pa.Table:
        """A table as pyarrow, by its name: "pairs", "effects" or "summary"."""
        if name not in TABLES:
            raise ValueError(f"no table {name!r}: choose from {sorted(TABLES)}")
        return read_table(self.folder / TABLES[name])

    @cached_property
    def pairs(self) -> pd.DataFrame:
        return self.read("pairs").to_pandas()

    @cached_property
    def effects(self) -> pd.DataFrame:
        return self.read("effects").to_pandas()

    @cached_property
    def summary(self) -> pd.DataFrame:
        return self.read("summary").to_pandas()

    @cached_property
    def circuit(self) -> Circuit | None:
        return read_circuit(self.folder.circuit) if CIRCUIT.name in self.files else None

    @cached_property
    def config(self) -> dict:
        return yaml.safe_load(self.folder.config.read_text())

    @cached_property
    def overrides(self) -> list[str]:
        return yaml.safe_load(self.folder.overrides.read_text())

    @cached_property
    def run_id(self) -> str:
        return self.read("summary")["run_id"][0].as_py()

    @property
    def report(self) -> str:
        return self.folder.report.read_text()

    def activations(self) -> ds.Dataset:
        """Every activation shard of this run as one dataset: one row per (pair, prompt, layer, position), the
        residual a [d_model] tensor (`pipeline.store.tensor_numpy(column)` makes it numpy). The shards are
        those the cache stage's manifest lists: a shard of earlier pairs left in the folder is never read."""
        listed = Manifest(self.folder.activations, "cache")
        listed.refuse_malformed()
        return ds.dataset([str(self.folder.activations / name) for name in sorted(listed.files)], format="ipc")

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, run_id={self.run_id!r})"


def load_run(path: str | Path, verify: bool = True) -> Run:
    return Run(path, verify)


class Runs:
    """Every finished run under an output root (see the module docstring), in path order; `unfinished`
    names the run folders left out because their sweep has not finished (running, failed, interrupted)."""

    def __init__(self, root: str | Path, verify: bool = True):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ValueError(f"{self.root} is not a folder: give an output root, e.g. outputs")
        folders = run_folders(self.root)
        finished = {f for f in folders if Manifest(f, "run").complete}
        self.runs = [Run(f, verify) for f in folders if f in finished]
        self.unfinished = [f for f in folders if f not in finished]
        if not self.runs:
            raise ValueError(f"{self.root} holds no finished run ({len(self.unfinished)} unfinished): give the "
                             "output_root of finished sweeps, e.g. outputs")

    def read(self, name: str) -> pa.Table:
        """A table of every run as one pyarrow table: "pairs", "effects" or "summary"."""
        return pa.concat_tables([run.read(name) for run in self.runs], promote_options="default")

    def files(self, name: str) -> list[str]:
        """The path of table `name` in each run: what DuckDB's or polars' read_parquet takes."""
        if name not in TABLES:
            raise ValueError(f"no table {name!r}: choose from {sorted(TABLES)}")
        return [str(run.folder / TABLES[name]) for run in self.runs]

    def _frame(self, name: str) -> pd.DataFrame:
        return pd.concat([getattr(run, name) for run in self.runs], ignore_index=True)

    pairs = cached_property(lambda self: self._frame("pairs"))
    effects = cached_property(lambda self: self._frame("effects"))
    summary = cached_property(lambda self: self._frame("summary"))

    def __iter__(self):
        return iter(self.runs)

    def __len__(self) -> int:
        return len(self.runs)

    def __repr__(self) -> str:
        return f"Runs({str(self.root)!r}: {len(self.runs)} finished, {len(self.unfinished)} unfinished)"


def run_folders(root: Path) -> list[Path]:
    """The folders under `root` (itself included) that carry a sweep's mark, in path order; a run's own
    shard folders are not searched."""
    found = []
    for folder, subfolders, names in os.walk(root):
        if MARKER in names:
            found.append(Path(folder))
            subfolders[:] = [d for d in subfolders if d not in SHARD_FOLDERS]
    return sorted(found)


def load_runs(root: str | Path, verify: bool = True) -> Runs:
    return Runs(root, verify)
