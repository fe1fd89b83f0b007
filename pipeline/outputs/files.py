"""The files of a run folder: one registry, read by the report's file table, the run manifest and the
MLflow artifacts (the README's output contract lists the same files)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the run folder; a trailing "/" marks a folder of shards
    contents: str
    artifact: bool = True  # logged to MLflow (shard folders stay on disk)


OUTPUT_FILES = (
    OutputFile("config.yaml", "the resolved config"),
    OutputFile("pairs.arrow", "the screened prompt pairs: texts, token ids, answer tokens, spans"),
    OutputFile("activations/", "cached residuals (resid_pre per layer x position), Arrow tensor shards", False),
    OutputFile("effects/", "the effect shards, one per (pair shard, component, direction)", False),
    OutputFile("effects.arrow", "one row per (model, pair, direction, component, layer, head, position)"),
    OutputFile("summary.arrow", "mean effect, 95% bootstrap CI and n per site"),
    OutputFile("layers.png", "layer x position / head heatmaps"),
    OutputFile("circuit.json", "the minimal circuit: nodes, edges, faithfulness, controls, refusal direction"),
    OutputFile("circuit.svg", "the circuit diagram: supernodes and the path effects between them"),
    OutputFile("circuit.png", "the circuit diagram: supernodes and the path effects between them"),
    OutputFile("circuit_nodes.svg", "the circuit diagram: every node"),
    OutputFile("circuit_nodes.png", "the circuit diagram: every node"),
    OutputFile("circuit.dot", "the circuit as Graphviz DOT (a cluster per supernode)"),
    OutputFile("report.md", "this report: what a person reads first"),
    OutputFile("manifest.json", "every file above with its sha256, written last"),
)
ARTIFACTS = tuple(f.name for f in OUTPUT_FILES if f.artifact)
# Files listed in the run folder's own manifest (the shard folders keep manifests of their own).
MANIFESTED = tuple(f.name for f in OUTPUT_FILES if f.artifact and f.name != "manifest.json")
