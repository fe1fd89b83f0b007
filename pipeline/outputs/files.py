"""The files of a run folder: one registry, read by the report's file table, the run manifest, the MLflow
artifacts and `pipeline.load_run` (the README's output contract lists the same files)."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.store import MANIFEST


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the run folder; a trailing "/" marks a folder of shards
    contents: str
    artifact: bool = True  # logged to MLflow (shard folders stay on disk)
    checked: bool = True  # listed with its sha256 in the run's _manifest.json (run.log grows after it)


OUTPUT_FILES = (
    OutputFile("config.yaml", "the resolved config"),
    OutputFile("overrides.yaml", "the command-line overrides the config was composed with"),
    OutputFile("pairs.parquet", "the screened prompt pairs: texts, token ids, answer tokens, spans"),
    OutputFile("pairs/", "the pairs stage's batch files: the tokenized pairs, greedy replies, answer tokens, "
               "screened rows", False),
    OutputFile("activations/", "cached residual streams, one row per (pair, prompt, layer, position), Arrow IPC shards",
               False),
    OutputFile("effects/", "the effect shards, one per (pair shard, component, direction), Arrow IPC", False),
    OutputFile("effects.parquet", "one row per (model, pair, direction, component, layer, head, position)"),
    OutputFile("summary.parquet", "mean effect, 95% bootstrap CI and n per site"),
    OutputFile("sites.json", "the strongest sites per direction: the fraction of pairs whose behaviour the patch "
               "flips, the mean effect per prompt category"),
    OutputFile("layers.png", "layer x position / head heatmaps"),
    OutputFile("circuit.json", "the minimal circuit: nodes, edges, faithfulness, controls, refusal direction"),
    OutputFile("circuit.svg", "the circuit diagram: supernodes and the path effects between them"),
    OutputFile("circuit.png", "the circuit diagram: supernodes and the path effects between them"),
    OutputFile("circuit_nodes.svg", "the circuit diagram: every node"),
    OutputFile("circuit_nodes.png", "the circuit diagram: every node"),
    OutputFile("circuit.dot", "the circuit as Graphviz DOT (a cluster per supernode)"),
    OutputFile("direction.arrow", "the refusal direction: every candidate (layer x post-instruction position), its "
               "scores, the chosen one (direction.enabled)"),
    OutputFile("report.md", "this report: what a person reads first"),
    OutputFile("run.log", "what the driver and the model actors logged, run after run", checked=False),
    OutputFile(MANIFEST, "every file above with its sha256, written last"),
)
ARTIFACTS = tuple(f.name for f in OUTPUT_FILES if f.artifact)
# Files listed in the run folder's own manifest (the shard folders keep manifests of their own).
MANIFESTED = tuple(f.name for f in OUTPUT_FILES if f.artifact and f.checked and f.name != MANIFEST)
