"""The stage graph of one model's sweep: pairs -> cache -> patch -> summary -> circuit -> render.

Each stage's work items go to the model actors (pipeline.run.workers); what they publish is recorded
with its checksum in a manifest, so a re-run reuses every finished file (listed, under the same content
key, bytes intact) and recomputes the rest. Pair shards and effect shards are named by a content key
(the hash of everything that determines them) and listed in their folder's manifest; the run folder's
manifest lists the rest (pipeline.outputs.files), written last. The heatmaps, the circuit diagram and
the report are drawn on the driver from the files.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
from omegaconf import OmegaConf

from pipeline.analysis.statistics import LayerPoint, layer_curves
from pipeline.config import config_hash
from pipeline.outputs.diagram import render_circuit
from pipeline.outputs.files import MANIFESTED
from pipeline.outputs.heatmaps import layers_png
from pipeline.outputs.report import write_report
from pipeline.run.workers import StageStats, WorkerPool, start_ray, timed
from pipeline.stages.circuit import follow_progress
from pipeline.store import (PRODUCER, Manifest, content_key, file_entry, provenance, publish_bytes, read_table,
                            sha256_file)


@dataclass
class Sweep:
    """What the stages of one model's sweep share."""

    cfg: dict
    run_dir: Path
    pool: WorkerPool
    manifest: Manifest  # the run folder's
    model_info: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    pairs_report: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    stats: dict[str, StageStats] = field(default_factory=dict)

    def stage(self, name: str) -> StageStats:
        return self.stats.setdefault(name, StageStats(name))

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
    model_info: dict
    provenance: dict
    pairs_report: dict
    stats: list[StageStats]
    summary: pd.DataFrame
    curves: dict[tuple[str, str], list[LayerPoint]]
    circuit: dict | None


def run_sweep(cfg: dict) -> SweepOutcome:
    """Every stage of one model's sweep, into cfg["output_dir"]. `cfg` is validated and plain."""
    run_dir = Path(cfg["output_dir"])
    write_config(run_dir, cfg)
    start_ray(cfg)
    pool = WorkerPool(cfg)
    try:
        sweep = Sweep(cfg, run_dir, pool, Manifest(run_dir, "run"))
        with timed(sweep.stage("load")):
            sweep.model_info = pool.describe()
        sweep.provenance = {"config_hash": config_hash(cfg), "model_id": cfg["model"]["path"],
                            "weights_hash": sweep.model_info["weights_hash"]}
        pairs = stage_pairs(sweep)
        sweep.provenance["pairs_hash"] = pairs_hash(pairs)
        sweep.shards = plan_shards(pairs, cfg["resources"]["shard_size"])
        stage_cache(sweep)
        stage_summary(sweep, stage_patch(sweep))
        stage_circuit(sweep)
    finally:
        pool.close()
    with timed(sweep.stage("render")):
        summary, circuit = render(sweep)
    sweep.manifest.provenance = sweep.provenance
    sweep.manifest.finish([name for name in MANIFESTED if name in sweep.manifest.files])
    return SweepOutcome(run_dir, sweep.model_info, sweep.provenance, sweep.pairs_report, list(sweep.stats.values()),
                        summary, layer_curves(summary), circuit)


def write_config(run_dir: Path, cfg: dict) -> None:
    """config.yaml, written first: it marks the folder as this experiment's (pipeline.validation)."""
    publish_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())


# ---- the stages ---------------------------------------------------------------------------------------

def stage_pairs(sweep: Sweep) -> pa.Table:
    cfg = sweep.cfg
    # A user's prompt file counts by its content: an edited file gives new pairs, never the old ones.
    prompts_file = sha256_file(cfg["prompts"]["path"]) if cfg["prompts"]["path"] else None
    key = content_key("pairs", PRODUCER, sweep.model_info["weights_hash"], cfg["model"]["path"], cfg["prompts"],
                      prompts_file)
    item = {"name": "pairs", "model_path": cfg["model"]["path"], "prompts": cfg["prompts"],
            "out": str(sweep.run_dir / "pairs.arrow"), "provenance": sweep.provenance}
    sweep.run_once("pairs", item, key, ("pairs.arrow",))
    pairs = read_table(sweep.run_dir / "pairs.arrow")
    sweep.pairs_report = json.loads(provenance(pairs)["pairs_report"])
    return pairs


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
    items = [{"name": f"cache {shard['key']}", "pairs": str(sweep.run_dir / "pairs.arrow"), "rows": shard["rows"],
              "out": str(folder / f"{content_key('cache', PRODUCER, weights, shard['key'])}.arrow"),
              "provenance": sweep.provenance} for shard in sweep.shards]
    return run_sharded(sweep, "cache", folder, items)


def stage_patch(sweep: Sweep) -> list[Path]:
    folder = sweep.run_dir / "effects"
    patching, weights = sweep.cfg["patching"], sweep.model_info["weights_hash"]
    items = []
    for bucket in bucket_shards(sweep.shards, sweep.cfg["resources"]["shard_size"]):
        for component in patching["components"]:
            for direction in patching["directions"]:
                work = {"component": component, "direction": direction, "metric": patching["metric"],
                        "per_position": component in patching["per_position"], "layers": patching["layers"],
                        "heads": patching["heads"] if component == "head" else None}
                key = content_key("patch", PRODUCER, weights, [shard["key"] for shard in bucket], work)
                items.append({**work, "name": f"patch {component} {direction} {key}",
                              "pairs": str(sweep.run_dir / "pairs.arrow"), "shards": [shard["rows"] for shard in bucket],
                              "model": sweep.cfg["model"]["name"], "batch_size": patching["batch_size"],
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
    """Effect shards -> effects.arrow and summary.arrow."""
    options = sweep.cfg["summary"]
    item = {"name": "summary", "shards": [str(p) for p in effect_shards], "pairs": str(sweep.run_dir / "pairs.arrow"),
            "effects": str(sweep.run_dir / "effects.arrow"), "summary": str(sweep.run_dir / "summary.arrow"),
            "options": options, "provenance": sweep.provenance}
    key = content_key("summary", PRODUCER, [p.name for p in effect_shards], options)
    sweep.run_once("summary", item, key, ("effects.arrow", "summary.arrow"))


def stage_circuit(sweep: Sweep) -> None:
    """The circuit search on a model actor (it needs forward passes), while the actors are up."""
    cfg = sweep.cfg
    if not cfg["circuit"]["enabled"]:
        return
    item = {"name": "circuit", "run_dir": str(sweep.run_dir), "model": cfg["model"]["name"],
            "circuit": cfg["circuit"], "summary": cfg["summary"], "metric": cfg["patching"]["metric"],
            "provenance": sweep.provenance}
    key = content_key("circuit", PRODUCER, sweep.model_info["weights_hash"], sweep.provenance["pairs_hash"],
                      cfg["circuit"], cfg["summary"], cfg["patching"]["metric"])
    with follow_progress(sweep.run_dir):
        sweep.run_once("circuit", item, key, ("circuit.json",))


def render(sweep: Sweep) -> tuple[pd.DataFrame, dict | None]:
    """layers.png, the circuit diagram and report.md, from the run folder's files."""
    cfg, run_dir = sweep.cfg, sweep.run_dir
    summary = read_table(run_dir / "summary.arrow").to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    circuit_path = run_dir / "circuit.json"
    circuit = json.loads(circuit_path.read_text()) if sweep.manifest.is_valid("circuit.json") else None
    written = [layers_png(summary, run_dir / "layers.png", f"{cfg['name']}: {cfg['model']['name']}")]
    if circuit is not None:
        written += render_circuit(circuit, run_dir).values()
    written.append(write_report(run_dir / "report.md", cfg, sweep.model_info, sweep.pairs_report,
                                list(sweep.stats.values()), summary, layer_curves(summary), circuit))
    for path in [run_dir / "config.yaml", *written]:
        sweep.manifest.record(file_entry(path))
    return summary, circuit
