"""The circuit for other people's tools, written from circuit.json: circuit-tracer's attribution graph
(circuit_graph.json with its index graph-metadata.json: the folder opens in circuit-tracer's local viewer)
and MIB's node and edge importances (circuit_mib.json).

circuit-tracer's graph (schema: `circuit_tracer.frontend.graph_models.Model`) has a context position per
prompt token; a patchsweep circuit has one per position class (the harmful tokens, the rest of the
instruction, each chat-template token up to the final one), so each class is one "token" of the graph's
prompt, labelled with its tokens. Its rows are layers: the harmful tokens' embeddings below layer 0, each
head and MLP at its layer, the refusal logit above the last layer. Links are the measured path effects
(circuit.json's edges: the share of the refusal gap that flows along them), and the viewer's subgraph opens
with every circuit node pinned and the circuit's supernodes grouped.

MIB names a node by its place in the model only (`a{layer}.h{head}`, `m{layer}`, "input", "logits"), so a
node's score there is the sum of its single-node effects over the position classes (exact where verified,
else attribution's estimate), and an edge's the sum of its path effects over them. An edge into a head is
written for each of its inputs (`<q>`, `<k>`, `<v>`) with the same score: a path effect patches the
receiver's whole input.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlencode

from pipeline.analysis.circuit.result import Circuit, CircuitNode, read_circuit
from pipeline.outputs.files import CIRCUIT_GRAPH, CIRCUIT_MIB, GRAPH_INDEX, RunFolder
from pipeline.store import publish_bytes

LOGITS = "logits"  # circuit.json's receiver name for the refusal logit
EMBEDDING = "EMB@"  # circuit.json's prefix for the embeddings of a position class
SLUG = Path(CIRCUIT_GRAPH.name).stem  # the graph's name in the viewer: its file is <slug>.json


@dataclass(frozen=True)
class ExportFiles:
    graph: Path  # circuit-tracer's graph
    index: Path  # graph-metadata.json: the graphs the viewer lists
    mib: Path  # MIB's node and edge importances

    @property
    def paths(self) -> list[Path]:
        return [self.graph, self.index, self.mib]


# ---- circuit-tracer's graph ----------------------------------------------------------------------

def graph_node_id(circuit: Circuit, node: str) -> str:
    """circuit.json's node name -> the graph's node_id, named as circuit-tracer names its own:
    "{layer}_{feature}_{ctx}" (a head's feature is its index, an MLP's n_heads), "E_0_{ctx}" for the
    embeddings and "{n_layers + 1}_0_{ctx}" for the logit."""
    contexts = {p.name: i for i, p in enumerate(circuit.positions)}
    if node == LOGITS:
        return f"{circuit.n_layers + 1}_0_{len(circuit.positions) - 1}"
    if node.startswith(EMBEDDING):
        return f"E_0_{contexts[node[len(EMBEDDING):]]}"
    by_id = {n.id: n for n in circuit.nodes}
    n = by_id[node]
    return f"{n.layer}_{_feature(circuit, n)}_{contexts[n.position]}"


def _feature(circuit: Circuit, node: CircuitNode) -> int:
    return node.head if node.component == "head" else circuit.n_heads


def _circuit_node(circuit: Circuit, node: CircuitNode, ctx: int) -> dict:
    kind = f"H{node.head}" if node.component == "head" else "MLP"
    effect = node.effect if node.effect is not None else node.attribution
    in_circuit = node.in_circuit_effect or 0.0
    clerp = (f"L{node.layer}.{kind} @{node.position}: in-circuit {in_circuit:+.2f}, single-node "
             f"{'n/a' if effect is None else f'{effect:+.2f}'}{', core' if node.core else ''}")
    feature = _feature(circuit, node)
    return {"node_id": f"{node.layer}_{feature}_{ctx}", "feature": feature, "layer": str(node.layer), "ctx_idx": ctx,
            "feature_type": "cross layer transcoder", "jsNodeId": f"{node.layer}_{feature}-0", "clerp": clerp,
            "influence": None, "activation": effect}


def graph_json(circuit: Circuit, slug: str = SLUG) -> dict:
    """The circuit as circuit-tracer's graph (its `Model`)."""
    last = len(circuit.positions) - 1
    contexts = {p.name: i for i, p in enumerate(circuit.positions)}
    # An embedding node at every position, as circuit-tracer writes them: the viewer labels a position
    # by its embedding node; only the differing tokens' have measured links.
    nodes = [{"node_id": f"E_0_{ctx}", "feature": ctx, "layer": "E", "ctx_idx": ctx, "feature_type": "embedding",
              "jsNodeId": f"E_0-{ctx}"} for ctx in range(len(circuit.positions))]
    nodes += [_circuit_node(circuit, node, contexts[node.position]) for node in circuit.nodes]
    # The viewer reads a logit's probability from its label's "(p=...)" and fails without one; the circuit's
    # target is a logit difference, not a token's probability, so p=1 marks it as the one target.
    nodes.append({"node_id": graph_node_id(circuit, LOGITS), "feature": 0, "layer": str(circuit.n_layers + 1),
                  "ctx_idx": last, "feature_type": "logit", "token_prob": 1.0, "is_target_logit": True,
                  "jsNodeId": f"L_0-{last}",
                  "clerp": 'Output "refusal" (p=1.000): the refusal-logit difference'})
    known = {n["node_id"] for n in nodes}
    links = []
    for edge in circuit.edges:
        source, target = graph_node_id(circuit, edge.sender), graph_node_id(circuit, edge.receiver)
        if source in known and target in known and source != target:
            links.append({"source": source, "target": target, "weight": edge.effect})
    linked = {end for link in links for end in (link["source"], link["target"])}
    pinned = [n["node_id"] for n in nodes if n["feature_type"] != "embedding" or n["node_id"] in linked]
    supernodes = [[group.id, *(graph_node_id(circuit, m) for m in group.members)] for group in circuit.supernodes]
    prompt = " | ".join(plain_token(p.label) for p in circuit.positions)
    return {
        "metadata": {"slug": slug, "scan": circuit.model or "model", "transcoder_list": [],
                     "prompt_tokens": [plain_token(p.label) for p in circuit.positions],
                     "prompt": f"refusal circuit ({circuit.size} of {circuit.candidates} nodes, faithfulness "
                               f"{circuit.faithfulness:.2f}): {prompt}",
                     "node_threshold": None, "schema_version": 1},
        "qParams": {"pinnedIds": pinned, "supernodes": supernodes, "linkType": "both", "clickedId": "",
                    "sg_pos": ""},
        "nodes": nodes,
        "links": links,
    }


def plain_token(token: str) -> str:
    """A token as text: byte-level BPE spells a newline "Ċ" and a leading space "Ġ" (the viewer shows a
    newline as ⏎, as for circuit-tracer's own graphs)."""
    return token.replace("Ċ", "\n").replace("Ġ", " ")


def graph_index(graphs: list[dict], index: dict | None = None) -> dict:
    """graph-metadata.json (the graphs the viewer offers): `index` with each of `graphs`' metadata added
    or replaced by slug."""
    slugs = {g["metadata"]["slug"] for g in graphs}
    kept = [g for g in (index or {}).get("graphs", []) if g["slug"] not in slugs]
    return {"graphs": kept + [g["metadata"] for g in graphs]}


def viewer_query(graph: dict) -> str:
    """The viewer page's query string that opens `graph` with its supernodes grouped: circuit-tracer's page
    takes the subgraph's supernodes from its address and leaves qParams' unread."""
    return urlencode({"slug": graph["metadata"]["slug"], "supernodes": json.dumps(graph["qParams"]["supernodes"])})


# ---- MIB -----------------------------------------------------------------------------------------

def mib_name(circuit: Circuit, node: str) -> str:
    """circuit.json's node name -> MIB's: "a{layer}.h{head}", "m{layer}", "input", "logits"."""
    if node == LOGITS:
        return "logits"
    if node.startswith(EMBEDDING):
        return "input"
    place = node.split("@")[0]  # "L3.H1" or "L3.MLP"
    layer, kind = place[1:].split(".")
    return f"m{layer}" if kind == "MLP" else f"a{layer}.h{kind[1:]}"


def mib_json(circuit: Circuit) -> dict:
    """MIB's circuit file: every candidate node's score (its single-node effects summed over the position
    classes) and whether the circuit holds it at any class; the path effects summed likewise per edge (an
    edge not listed was not measured)."""
    scores = circuit.scores
    nodes: dict[str, dict] = {}
    for node, attribution, exact in zip(scores["id"], scores["attribution"], scores["exact"]):
        value = exact if exact is not None else attribution
        entry = nodes.setdefault(mib_name(circuit, node), {"score": 0.0, "in_graph": False})
        entry["score"] += value or 0.0
    for node in circuit.nodes:
        nodes[mib_name(circuit, node.id)]["in_graph"] = True
    # The model's input and output have no score of their own: they are in the circuit where an edge is.
    ends = {mib_name(circuit, name) for e in circuit.edges for name in (e.sender, e.receiver)}
    nodes |= {name: {"score": None, "in_graph": name in ends} for name in ("input", "logits")}
    edges: dict[str, dict] = {}
    for edge in circuit.edges:
        sender, receiver = mib_name(circuit, edge.sender), mib_name(circuit, edge.receiver)
        if sender == receiver:
            continue
        inputs = ("<q>", "<k>", "<v>") if receiver.startswith("a") else ("",)
        for name in (f"{sender}->{receiver}{i}" for i in inputs):
            entry = edges.setdefault(name, {"score": 0.0, "in_graph": True})
            entry["score"] += edge.effect
    return {"cfg": {"n_layers": circuit.n_layers, "n_heads": circuit.n_heads, "parallel_attn_mlp": False},
            "nodes": nodes, "edges": edges}


# ---- files ---------------------------------------------------------------------------------------

def write_exports(circuit: Circuit, run_dir: str | Path) -> ExportFiles:
    """circuit_graph.json, graph-metadata.json and circuit_mib.json into the run folder (each published
    atomically): circuit-tracer's viewer serves the folder as it is."""
    folder = RunFolder(run_dir)
    graph = graph_json(circuit)
    files = ExportFiles(folder / CIRCUIT_GRAPH, folder / GRAPH_INDEX, folder / CIRCUIT_MIB)
    publish_bytes(files.graph, _dumps(graph))
    publish_bytes(files.index, _dumps(graph_index([graph])))
    publish_bytes(files.mib, _dumps(mib_json(circuit)))
    return files


def export_run(run_dir: str | Path, viewer_dir: str | Path | None = None) -> ExportFiles:
    """A finished run's exports from its circuit.json, into the run folder; with `viewer_dir`, the graph also
    goes into that folder under the run folder's name, added to the index of the graphs already there (one
    viewer for several runs)."""
    folder = RunFolder(run_dir)
    if not folder.circuit.is_file():
        raise FileNotFoundError(f"{folder.root} has no {folder.circuit.name}: give a run folder whose circuit step "
                                "finished (circuit.enabled=true)")
    circuit = read_circuit(folder.circuit)
    files = write_exports(circuit, folder.root)
    if viewer_dir is None:
        return files
    viewer = Path(viewer_dir)
    viewer.mkdir(parents=True, exist_ok=True)
    graph = graph_json(circuit, slug=folder.root.resolve().name)
    index_path = viewer / GRAPH_INDEX.name
    index = json.loads(index_path.read_text()) if index_path.is_file() else None
    shared = ExportFiles(viewer / f"{graph['metadata']['slug']}.json", index_path, files.mib)
    publish_bytes(shared.graph, _dumps(graph))
    publish_bytes(shared.index, _dumps(graph_index([graph], index)))
    return shared


def _dumps(data: dict) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()
