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
from pipeline.outputs.export import SLUG, graph_json, mib_name, viewer_query

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
    assert model.metadata.prompt_tokens == [p.label for p in circuit.positions]
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
    components = {n for n in mib["nodes"] if n != "input"}
    assert len(components) == circuit.n_layers * (circuit.n_heads + 1)
    assert {n for n, v in mib["nodes"].items() if v["in_graph"]} == {mib_name(circuit, n.id) for n in circuit.nodes}
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
    the MIB file, and `--viewer <folder>` adds the graph under the run folder's name to that folder's index;
    a folder without circuit.json is refused in one line, exit status 2."""
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
    refused = subprocess.run([sys.executable, "-m", "pipeline", "export", str(viewer)], capture_output=True,
                             text=True, cwd=REPO, timeout=300)
    assert refused.returncode == 2
    assert refused.stderr.strip().count("\n") == 0 and "no circuit.json" in refused.stderr


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
