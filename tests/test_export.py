"""The circuit's exports from the session's refusal-tiny run: circuit-tracer's graph validated by
circuit-tracer's own schema and opened in its own viewer (headless chromium, served on 127.0.0.1), MIB's
importances named as MIB names them, and `patchsweep export` writing both for a run made before them.

circuit-tracer is installed without its dependencies (`make setup`); its viewer page loads d3, d3-jetpack,
dagre and pako from sites this machine cannot reach, so the test serves the npm packages of those libraries
in their place (`make viewer-libs`)."""
import functools
import json
import re
import socketserver
import subprocess
import sys
import threading
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO
from pipeline.analysis.circuit.result import read_circuit
from pipeline.outputs.export import SLUG, graph_json, mib_name, plain_token, viewer_query

MIB_NODE = re.compile(r"^(input|logits|m\d+|a\d+\.h\d+)$")
MIB_EDGE = re.compile(r"^(input|m\d+|a\d+\.h\d+)->(logits|m\d+|a\d+\.h\d+<[qkv]>)$")
VIEWER_LIBS = REPO / ".venv" / "viewer-libs" / "node_modules"


def _graph_model():
    try:
        from circuit_tracer.frontend.graph_models import Model
    except ImportError:
        pytest.fail("circuit-tracer is missing: `make setup` installs it (pip install --no-deps circuit-tracer==0.5.0)")
    return Model


def test_circuit_run_writes_a_graph_circuit_tracers_schema_accepts(tiny_sweep):
    """The circuit stage's circuit_graph.json validates as circuit-tracer's `Model`; it has each circuit
    node at its layer and position, an embedding per position, the refusal logit, a link per measured path
    effect between them, the supernodes in qParams; graph-metadata.json lists it."""
    run_dir = tiny_sweep["outcome"].run_dir
    circuit = read_circuit(run_dir / "circuit.json")
    graph = json.loads((run_dir / "circuit_graph.json").read_text())
    model = _graph_model().model_validate(graph)
    assert model.metadata.slug == SLUG
    assert model.metadata.prompt_tokens == [plain_token(p.label) for p in circuit.positions]
    by_id = {n.node_id: n for n in model.nodes}
    contexts = {p.name: i for i, p in enumerate(circuit.positions)}
    for node in circuit.nodes:
        feature = node.head if node.component == "head" else circuit.n_heads
        drawn = by_id[f"{node.layer}_{feature}_{contexts[node.position]}"]
        assert (drawn.layer, drawn.ctx_idx) == (str(node.layer), contexts[node.position])
        assert node.id.split("@")[0] in drawn.clerp
    embeddings = [n for n in model.nodes if n.feature_type == "embedding"]
    assert sorted(n.ctx_idx for n in embeddings) == list(range(len(circuit.positions)))
    [logit] = [n for n in model.nodes if n.feature_type == "logit"]
    assert logit.is_target_logit and logit.layer == str(circuit.n_layers + 1)
    assert len(model.nodes) == circuit.size + len(circuit.positions) + 1
    links = {(link["source"], link["target"]): link["weight"] for link in model.links}
    assert len(links) == len([e for e in circuit.edges if e.sender != e.receiver]) > 0
    assert any(source.startswith("E_") for source, _ in links)
    assert set(links) <= {(s, t) for s in by_id for t in by_id}
    assert [group[0] for group in model.qParams.supernodes] == [g.id for g in circuit.supernodes]
    assert sum(len(group) - 1 for group in model.qParams.supernodes) == circuit.size
    index = json.loads((run_dir / "graph-metadata.json").read_text())
    assert [g["slug"] for g in index["graphs"]] == [SLUG]
    assert "circuit_graph.json" in json.loads((run_dir / "_manifest.json").read_text())["files"]


def test_mib_export_names_nodes_and_edges_as_mib_does(tiny_sweep):
    """circuit_mib.json: a score for every (layer, head) and MLP of the model, `in_graph` for those the
    circuit holds at some position; the path effects as edges `sender->receiver` (a head's inputs <q>, <k>,
    <v>), summed over the position classes."""
    run_dir = tiny_sweep["outcome"].run_dir
    circuit = read_circuit(run_dir / "circuit.json")
    mib = json.loads((run_dir / "circuit_mib.json").read_text())
    assert mib["cfg"] == {"n_layers": circuit.n_layers, "n_heads": circuit.n_heads, "parallel_attn_mlp": False}
    assert all(MIB_NODE.match(name) for name in mib["nodes"])
    assert mib["nodes"]["input"]["in_graph"] and mib["nodes"]["logits"]["in_graph"]
    components = {n for n in mib["nodes"] if n not in ("input", "logits")}
    assert len(components) == circuit.n_layers * (circuit.n_heads + 1)
    assert {n for n in components if mib["nodes"][n]["in_graph"]} == {mib_name(circuit, n.id) for n in circuit.nodes}
    assert all(MIB_EDGE.match(name) for name in mib["edges"])
    for edge in circuit.edges:
        sender, receiver = mib_name(circuit, edge.sender), mib_name(circuit, edge.receiver)
        suffix = "<q>" if receiver.startswith("a") else ""
        if sender != receiver:
            assert f"{sender}->{receiver}{suffix}" in mib["edges"]
    total = sum(e.effect for e in circuit.edges if mib_name(circuit, e.sender) != mib_name(circuit, e.receiver))
    one_input = [v["score"] for k, v in mib["edges"].items() if not k.endswith(("<k>", "<v>"))]
    assert sum(one_input) == pytest.approx(total)


def test_export_command_writes_an_older_runs_files(tiny_sweep, tmp_path):
    """`patchsweep export <run folder>` on a run with circuit.json alone writes the graph, its index and
    the MIB file, and `--viewer <folder>` adds the graph under the run folder's name to that folder's index."""
    older = tmp_path / "older-run"
    older.mkdir()
    (older / "circuit.json").write_bytes((tiny_sweep["outcome"].run_dir / "circuit.json").read_bytes())
    viewer = tmp_path / "viewer"
    command = [sys.executable, "-m", "pipeline", "export", str(older), "--viewer", str(viewer)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert {p.name for p in older.iterdir()} == {"circuit.json", "circuit_graph.json", "graph-metadata.json",
                                                 "circuit_mib.json"}
    assert json.loads((older / "circuit_graph.json").read_text()) == json.loads(
        (tiny_sweep["outcome"].run_dir / "circuit_graph.json").read_text())
    _graph_model().model_validate(json.loads((viewer / "older-run.json").read_text()))
    assert [g["slug"] for g in json.loads((viewer / "graph-metadata.json").read_text())["graphs"]] == ["older-run"]
    assert "index.html?slug=older-run&supernodes=" in result.stdout


def test_export_command_refuses_a_folder_without_a_circuit(tmp_path, capsys):
    """A folder without circuit.json: one line naming it, exit status 2; --help prints the usage."""
    from pipeline.cli import export_command

    with pytest.raises(SystemExit) as stopped:
        export_command([str(tmp_path)])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and err.strip().count("\n") == 0 and "no circuit.json" in err
    export_command(["--help"])
    assert capsys.readouterr().out.startswith("usage: patchsweep export <run folder>")


# ---- circuit-tracer's viewer ----------------------------------------------------------------------

# The page's scripts from other sites, in its order, replaced by the npm packages' files; d3-jetpack's
# browser build assigns a new empty `d3` (and its d3 v7 bundle extends a second copy of d3-selection), so
# its CommonJS build is loaded onto the real d3, with `c.drawAxis(svg)` as the page's newer jetpack has it.
VIEWER_SCRIPTS = "".join(f"<script src='/lib/{path}'></script>" for path in (
    "d3/dist/d3.min.js", "d3-collection/dist/d3-collection.min.js", "dagre/dist/dagre.min.js", "pako/dist/pako.min.js"))
VIEWER_SCRIPTS += (
    "<script>var module = {exports: {}}, exports = module.exports, require = function () { return d3 }</script>"
    "<script src='/lib/d3-jetpack/build/d3-jetpack.cjs'></script>"
    "<script>Object.assign(d3, module.exports); module = exports = require = undefined;"
    "var conventions = d3.conventions; d3.conventions = function (c) { c = conventions(c);"
    "c.drawAxis = function (svg) { return d3.drawAxis(Object.assign({}, c, {svg: svg || c.svg})) }; return c }"
    "</script>")


@contextmanager
def serve_viewer(data_dir: Path):
    """circuit-tracer's own request handler serving its viewer and `data_dir` on a free port of 127.0.0.1,
    the page's remote scripts replaced (VIEWER_SCRIPTS), while the block runs; yields the base address."""
    from circuit_tracer.frontend.local_server import DEFAULT_FRONTEND_DIR, CircuitGraphHandler

    if not (VIEWER_LIBS / "d3-jetpack").is_dir():
        pytest.fail(f"the viewer's libraries are missing from {VIEWER_LIBS}: `make viewer-libs` installs them")
    page = (Path(str(DEFAULT_FRONTEND_DIR)) / "index.html").read_text()
    page = re.sub(r"<script src='https://[^']+'></script>\n?", "", page)
    page = page.replace("<script src='./feature_examples/", VIEWER_SCRIPTS + "<script src='./feature_examples/", 1)

    class Handler(CircuitGraphHandler):
        def do_GET(self):
            path = self.path.split("?")[0]
            if path in ("/", "/index.html"):
                return self.send(page.encode(), "text/html")
            if path.startswith("/lib/"):
                return self.send((VIEWER_LIBS / path[len("/lib/"):]).read_bytes(), "application/javascript")
            return super().do_GET()

        def send(self, body: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    handler = functools.partial(Handler, frontend_dir=DEFAULT_FRONTEND_DIR, data_dir=str(data_dir))
    with socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler) as server:
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            # 127.0.0.1, not localhost: on localhost the page fetches graphs from circuit-tracer's own site.
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            server.shutdown()


@pytest.mark.browser
def test_circuit_tracers_viewer_draws_the_exported_graph(tiny_sweep, tmp_path):
    """The run folder served to circuit-tracer's viewer in headless chromium: the graph view draws every
    node of the export, the subgraph every supernode with its members and the logit's label."""
    from test_mlflow_browser import ARTIFACTS, open_page, text_of

    run_dir = tiny_sweep["outcome"].run_dir
    circuit = read_circuit(run_dir / "circuit.json")
    graph = graph_json(circuit)
    with serve_viewer(run_dir) as base:
        dom = open_page(f"{base}/index.html?{viewer_query(graph)}", ["member-circle", "Output"],
                        ARTIFACTS / "circuit-tracer-viewer.png", tmp_path, height=1000)
    text = text_of(dom)
    assert len(re.findall(r'<text class="node\b', dom)) == len(graph["nodes"])
    assert len(re.findall(r'class="member-circle"', dom)) == circuit.size
    assert all(group.id in text for group in circuit.supernodes)
    assert 'Output "refusal"' in text and "Emb:" in text
    assert (ARTIFACTS / "circuit-tracer-viewer.png").stat().st_size > 10_000


# ---- the diagram at 125+ nodes --------------------------------------------------------------------

def deep_circuit(base: dict) -> dict:
    """The session run's circuit.json with its nodes, supernodes and edges replaced by a circuit of 130
    nodes over 30 layers (the default run's scale and more): heads and MLPs at the harmful tokens, the final
    position and one between, grouped as the circuit step groups them, path effects of both signs."""
    names = [p["name"] for p in base["positions"]]
    harm, middle, final = names[0], names[1], names[-1]
    cells = ([(harm, "mlp", layer, None) for layer in range(30)]
             + [(harm, "head", layer, h) for layer in range(15) for h in (0, 4)]
             + [(final, "head", layer, h) for layer in range(15, 30) for h in (1, 3, 7)]
             + [(final, "mlp", layer, None) for layer in range(15, 30)]
             + [(middle, "head", layer, 2) for layer in range(10, 20)])
    nodes = []
    for i, (position, component, layer, head) in enumerate(cells):
        place = f"L{layer}.H{head}" if component == "head" else f"L{layer}.MLP"
        nodes.append({"id": f"{place}@{position}", "component": component, "layer": layer, "head": head,
                      "position": position, "token": position, "effect": 0.01 * (i % 7 - 2), "effect_ci": [0, 0],
                      "attribution": 0.0, "in_circuit_effect": 0.02 * (i % 5 - 1),
                      "mean_difference_projection": None, "mean_difference_cosine": None,
                      "inclusion_frequency": 1.0 if i % 4 else 0.5, "core": bool(i % 4)})
    groups = {}
    for node in nodes:
        half = "low" if node["layer"] < 15 else "high"
        groups.setdefault((node["component"], node["position"], half), []).append(node)
    supernodes = []
    for (component, position, _), members in groups.items():
        low, high = min(n["layer"] for n in members), max(n["layer"] for n in members)
        kind = "heads" if component == "head" else "MLP"
        supernodes.append({"id": f"L{low}-{high}.{kind}@{position}", "component": component, "position": position,
                           "token": position, "layers": [low, high], "members": [n["id"] for n in members],
                           "in_circuit_effect": 0.1 * (len(supernodes) % 4 - 1), "effect_sum": 0.1})
    ids = [g["id"] for g in supernodes]
    group_edges = [{"from": "EMB@" + harm, "to": ids[0], "effect": 0.9, "drawn": True}]
    group_edges += [{"from": a, "to": b, "effect": (0.3 if i % 3 else -0.2) / (i + 1), "drawn": True}
                    for i, (a, b) in enumerate(zip(ids, ids[1:]))]
    group_edges += [{"from": ids[-1], "to": "logits", "effect": 0.6, "drawn": True}]
    node_ids = [n["id"] for n in nodes]
    edges = [{"from": node_ids[i], "to": node_ids[i + 37], "effect": 0.05 * (i % 5 - 1), "drawn": True}
             for i in range(0, 90, 3)] + [{"from": node_ids[-1], "to": "logits", "effect": 0.4, "drawn": True}]
    return base | {"n_layers": 30, "n_heads": 9, "size": len(nodes), "nodes": nodes, "supernodes": supernodes,
                   "supernode_edges": group_edges, "edges": edges}


def _texts(figure) -> list:
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    [ax] = [a for a in figure.axes if a.get_label() != "<colorbar>"]
    return [(t, t.get_window_extent(renderer)) for t in ax.texts if t.get_visible()], ax


def test_diagrams_stay_readable_at_130_nodes(tiny_sweep):
    """A 130-node circuit over 30 layers: every supernode's label sits inside its box at >= 5 points,
    no label covers another, edges are coloured by sign with the legend of their scale, the strongest
    labelled, and the position columns without a node are left out."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import FancyArrowPatch

    from pipeline.analysis.circuit.result import circuit_from_json
    from pipeline.outputs.diagram import LABEL_MIN, NEGATIVE, POSITIVE, draw, draw_groups

    base = json.loads((tiny_sweep["outcome"].run_dir / "circuit.json").read_text())
    circuit = circuit_from_json(deep_circuit(base))
    used = {n.position for n in circuit.nodes} | {circuit.positions[-1].name}
    for figure in (draw_groups(circuit), draw(circuit)):
        texts, ax = _texts(figure)
        assert len(ax.get_xticklabels()) == len([p for p in circuit.positions if p.name in used])
        labels = [(t, box) for t, box in texts if t.get_label().startswith("label:")]
        assert min(t.get_fontsize() for t, _ in labels) >= LABEL_MIN
        for i, (text, box) in enumerate(texts):
            assert not any(box.overlaps(other) for _, other in texts[i + 1:]), text.get_text()
        assert any(t.get_label() == "edge-label" for t, _ in texts)
        colours = {patch.get_edgecolor()[:3] for patch in ax.patches if isinstance(patch, FancyArrowPatch)}
        assert {tuple(int(255 * c + 0.5) for c in colour) for colour in colours} == {
            tuple(int(h[i:i + 2], 16) for i in (1, 3, 5)) for h in (POSITIVE, NEGATIVE)}
        [legend] = figure.legends
        assert "carries refusal" in " ".join(t.get_text() for t in legend.get_texts())
        if figure.axes[0].get_ylabel().startswith("layer (heads left"):
            renderer = figure.canvas.get_renderer()
            boxes = {p.get_label()[len("box:"):]: p.get_window_extent(renderer) for p in ax.patches
                     if p.get_label().startswith("box:")}
            assert len(labels) == len(boxes) == len(circuit.supernodes)
            for text, extent in labels:
                box = boxes[text.get_label()[len("label:"):]]
                assert box.x0 - 1 <= extent.x0 and extent.x1 <= box.x1 + 1
                assert box.y0 - 1 <= extent.y0 and extent.y1 <= box.y1 + 1
        plt.close(figure)
