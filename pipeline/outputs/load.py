"""A finished run folder, loaded back for a notebook: `pipeline.load_run(path)`.

    run = pipeline.load_run("outputs/refusal_tiny/refusal-tiny-generated")
    run.summary                 # pandas: one row per site, mean effect and its interval
    run.effects, run.pairs      # pandas (nullable integers stay integers)
    run.circuit                 # circuit.json as a typed Circuit (None when the circuit step was off)
    run.circuit.nodes[0].id, run.circuit.faithfulness, run.circuit.stability.core
    run.config, run.overrides   # the resolved config and the command line it came from
    run.activations()           # a pyarrow dataset over every activation shard

The tables are the run folder's Parquet files (pipeline.outputs.files lists them) and are read on first
use. By default every file the run's manifest lists is checked against its sha256 first, so a damaged
or half-copied folder is refused rather than read.
"""
from __future__ import annotations

from functools import cached_property
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import yaml

from pipeline.analysis.circuit.result import Circuit, read_circuit
from pipeline.outputs.files import CIRCUIT, EFFECTS, PAIRS, SUMMARY, RunFolder
from pipeline.store import MANIFEST, Manifest, read_table

TABLES = {Path(f.name).stem: f for f in (PAIRS, EFFECTS, SUMMARY)}


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
