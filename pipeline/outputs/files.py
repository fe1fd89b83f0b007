"""The files of a run folder: one registry, read by the report's file table, the run manifest, the MLflow
artifacts and `pipeline.load_run` (the README's output files lists the same files), and `RunFolder`, the
one place their names are written: the rest of the package asks it for a path by what the file holds."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.store import MANIFEST


@dataclass(frozen=True)
class OutputFile:
    name: str  # relative to the run folder; a trailing "/" marks a folder of shards
    contents: str
    artifact: bool = True  # logged to MLflow (shard folders stay on disk)
    checked: bool = True  # listed with its sha256 in the run's _manifest.json (run.log grows after it)


CONFIG = OutputFile("config.yaml", "the resolved config")
OVERRIDES = OutputFile("overrides.yaml", "the command-line overrides the config was composed with")
PAIRS = OutputFile("pairs.parquet", "the screened prompt pairs: texts, token ids, answer tokens, spans")
TRANSFER_PAIRS = OutputFile("transfer_pairs.parquet", "the transfer pairs: from another source than pairs.parquet's, "
                            "sharing no prompt with them, screened alike; the circuit's faithfulness is measured "
                            "on them too")
PAIRS_BATCHES = OutputFile("pairs/", "the pairs stage's batch files: the tokenized pairs, greedy replies, answer "
                           "tokens, screened rows", artifact=False)
ACTIVATIONS = OutputFile("activations/", "cached residual streams, one row per (pair, prompt, layer, position), "
                         "Arrow IPC shards", artifact=False)
EFFECT_SHARDS = OutputFile("effects/", "the effect shards, one per (pair shard, component, direction), Arrow IPC",
                           artifact=False)
EFFECTS = OutputFile("effects.parquet", "one row per (model, pair, direction, component, layer, head, position)")
SUMMARY = OutputFile("summary.parquet", "mean effect, 95% bootstrap CI and n per site")
SITES = OutputFile("sites.json", "the strongest sites per direction: the fraction of pairs whose behaviour the patch "
                   "flips, the mean effect per prompt category")
LAYERS_PNG = OutputFile("layers.png", "layer x position / head heatmaps")
CIRCUIT = OutputFile("circuit.json", "the minimal circuit: nodes, edges, faithfulness, controls, refusal direction")
CIRCUIT_SVG = OutputFile("circuit.svg", "the circuit diagram: supernodes and the path effects between them")
CIRCUIT_PNG = OutputFile("circuit.png", "the circuit diagram: supernodes and the path effects between them")
CIRCUIT_NODES_SVG = OutputFile("circuit_nodes.svg", "the circuit diagram: every node")
CIRCUIT_NODES_PNG = OutputFile("circuit_nodes.png", "the circuit diagram: every node")
CIRCUIT_DOT = OutputFile("circuit.dot", "the circuit as Graphviz DOT (a cluster per supernode)")
CIRCUIT_GRAPH = OutputFile("circuit_graph.json", "the circuit as circuit-tracer's attribution graph (its local viewer "
                           "opens this folder; docs/export.md)")
GRAPH_INDEX = OutputFile("graph-metadata.json", "circuit-tracer's index of the graphs in this folder")
CIRCUIT_MIB = OutputFile("circuit_mib.json", "the node scores and the circuit as MIB's node and edge importances "
                         "(a{layer}.h{head}, m{layer})")
DIRECTION = OutputFile("direction.arrow", "the refusal direction: every candidate (layer x post-instruction position), "
                       "its scores, the ablation and addition directions, the addition's scale (direction.enabled)")
REPORT = OutputFile("report.md", "this report: what a person reads first")
RUN_LOG = OutputFile("run.log", "what the driver and the model actors logged, run after run", checked=False)
RUN_MANIFEST = OutputFile(MANIFEST, "every file above with its sha256, written last")

OUTPUT_FILES = (CONFIG, OVERRIDES, PAIRS, TRANSFER_PAIRS, PAIRS_BATCHES, ACTIVATIONS, EFFECT_SHARDS, EFFECTS, SUMMARY,
                SITES, LAYERS_PNG, CIRCUIT, CIRCUIT_SVG, CIRCUIT_PNG, CIRCUIT_NODES_SVG, CIRCUIT_NODES_PNG, CIRCUIT_DOT,
                CIRCUIT_GRAPH, GRAPH_INDEX, CIRCUIT_MIB, DIRECTION, REPORT, RUN_LOG, RUN_MANIFEST)
ARTIFACTS = tuple(f.name for f in OUTPUT_FILES if f.artifact)
# Files listed in the run folder's own manifest (the shard folders keep manifests of their own).
MANIFESTED = tuple(f.name for f in OUTPUT_FILES if f.artifact and f.checked and f.name != MANIFEST)
# The project's own mark on a run folder, written before anything else with the run's identity (config
# hash, experiment, model): only a folder that has it (or a manifest patchsweep wrote) is taken for a run's,
# so files of the names above that the project did not write are never overwritten (pipeline.run.folder).
MARKER = ".patchsweep-run"
# Working files a sweep keeps in the folder while it runs (never results).
LOCK = ".patchsweep.lock"  # the sweep that holds the folder (pipeline.run.folder.folder_lock)
CIRCUIT_PROGRESS = "circuit.progress.json"  # where the circuit step is, drawn on the driver
DIRECTION_PROGRESS = "direction.progress.json"  # the direction stage's candidates scored, drawn on the driver


@dataclass(frozen=True)
class RunFolder:
    """One run folder's paths, named by what they hold."""

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __truediv__(self, file: OutputFile) -> Path:
        return self.root / file.name.rstrip("/")

    config = property(lambda self: self / CONFIG)
    overrides = property(lambda self: self / OVERRIDES)
    pairs = property(lambda self: self / PAIRS)
    transfer_pairs = property(lambda self: self / TRANSFER_PAIRS)
    pairs_batches = property(lambda self: self / PAIRS_BATCHES)
    activations = property(lambda self: self / ACTIVATIONS)
    effect_shards = property(lambda self: self / EFFECT_SHARDS)
    effects = property(lambda self: self / EFFECTS)
    summary = property(lambda self: self / SUMMARY)
    sites = property(lambda self: self / SITES)
    layers_png = property(lambda self: self / LAYERS_PNG)
    circuit = property(lambda self: self / CIRCUIT)
    direction = property(lambda self: self / DIRECTION)
    report = property(lambda self: self / REPORT)
    run_log = property(lambda self: self / RUN_LOG)
    manifest = property(lambda self: self / RUN_MANIFEST)
    marker = property(lambda self: self.root / MARKER)
    lock = property(lambda self: self.root / LOCK)
    circuit_progress = property(lambda self: self.root / CIRCUIT_PROGRESS)
    direction_progress = property(lambda self: self.root / DIRECTION_PROGRESS)
