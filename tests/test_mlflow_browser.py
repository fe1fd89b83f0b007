"""The MLflow UI, served on 127.0.0.1 for the sweep's SQLite store, opened in headless Debian chromium,
each page in a fresh profile (a first visit): `make ui`'s address opens on the patchsweep experiment's runs
in the model-training view without MLflow's telemetry notice; a sweep's run shows as running while the
sweep computes, and once finished its page has the per-layer metric chart, the diagrams and the summary
and circuit tables; a --multirun's parent run shows the comparison of its children. Screenshots go to
test-artifacts/.

`make test` installs chromium (Debian package) when it is missing.
"""
import re
import shutil
import subprocess
import threading
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest

from conftest import REPO, TINY_SWEEP, compose, free_ports, mlflow_ui
from pipeline.run.tracking import run_name as tracking_run_name

pytestmark = pytest.mark.browser

ARTIFACTS = REPO / "test-artifacts"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run"]


def chromium_binary() -> str:
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.fail("headless chromium is missing: `make test` installs it (apt-get install -y chromium)")
    return binary


@pytest.fixture(scope="module")
def ui(tiny_sweep):
    """`python -m pipeline.run.tracking ui` for the sweep's output root, on a free port of 127.0.0.1."""
    with serve_ui(tiny_sweep["root"]) as served:
        yield served


@contextmanager
def serve_ui(root: Path):
    """The MLflow UI for `root`'s store (what `make ui` runs) on a free port of 127.0.0.1, while the block runs."""
    [port] = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    log_path = root / "ui.log"
    with mlflow_ui(["--output-root", str(root), "--port", str(port)], log_path) as server:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.time() > deadline:
                pytest.fail(f"the MLflow UI did not come up: {log_path.read_text()[-2000:]}")
            time.sleep(1)
        # The address the command prints for a person to open.
        [printed] = re.findall(r"open (http://\S+)", log_path.read_text())
        yield {"base": base, "printed": printed}


def open_page(url: str, expect: list[str], screenshot: Path, tmp_path: Path, height: int = 1000, attempts: int = 4,
              text: bool = False) -> str:
    """Load `url` in headless chromium (a fresh profile each time) and return its DOM once it shows every
    string in `expect` (in its visible text, with `text`), with a screenshot of that same load. The UI
    fetches and draws asynchronously, so each retry grants more virtual time (virtual time runs ahead of
    the clock while the page is idle)."""
    binary = chromium_binary()
    ARTIFACTS.mkdir(exist_ok=True)
    dom = ""
    for attempt in range(attempts):
        profile = tmp_path / f"profile-{screenshot.stem}-{attempt}"
        dom = subprocess.run([binary, *CHROMIUM_FLAGS, f"--window-size=1400,{height}", f"--user-data-dir={profile}",
                              f"--virtual-time-budget={60000 * (attempt + 1)}", "--dump-dom",
                              f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=240).stdout
        if all(s in (text_of(dom) if text else dom) for s in expect):
            break
    return dom


def text_of(dom: str) -> str:
    """The visible text of a DOM dump, whitespace collapsed."""
    text = re.sub(r"<(style|script)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", text))


def test_ui_opens_on_the_experiments_runs_in_model_training_view(ui, tiny_sweep, tmp_path):
    """What `make ui` prints opens, in a browser that never saw MLflow, on the patchsweep experiment's runs
    in the model-training view (the sidebar offers Runs, Models, Model registry; the GenAI view would
    offer Observability and Evaluation runs), without the telemetry notice of MLflow's home page."""
    experiment_id = tiny_sweep["tracking"]["experiment_id"]
    assert ui["printed"] == f"{ui['base']}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    run = tiny_sweep["cfg"].model.name  # a single sweep is one top-level run, named after its model
    dom = open_page(ui["printed"], [run, "Model registry"], ARTIFACTS / "mlflow-ui-start.png", tmp_path)
    text = text_of(dom)
    assert run in text and "Model registry" in text and "Runs" in text
    assert "Observability" not in text and "Evaluation runs" not in text
    assert "collects usage data" not in text


def test_run_is_running_while_the_sweep_computes_then_shows_tables(ui, tiny_sweep, tmp_path):
    """A sweep tracked as the command tracks it (pipeline.run.tracking.LiveRun), held after its pairs
    stage: its run page says Running and already has the finished stages' times; once the sweep ends,
    Finished, with the summary and the circuit's nodes as tables."""
    from pipeline.run.sweep import run_sweep
    from pipeline.run.tracking import LiveRun
    from pipeline.validation import validate

    overrides = [*TINY_SWEEP, f"output_root={tiny_sweep['root']}", "output_dir=${output_root}/live/run"]
    cfg = validate(compose(*overrides))
    live = LiveRun(cfg, "browser-test", overrides)
    held, release = threading.Event(), threading.Event()

    class HeldAfterPairs:
        run_id = property(lambda self: live.run_id)

        def stage_finished(self, stats):
            live.stage_finished(stats)
            if stats.stage == "pairs":
                held.set()
                release.wait(600)

    outcome = {}
    sweep = threading.Thread(target=lambda: outcome.update(result=run_sweep(cfg, HeldAfterPairs(), overrides)))
    sweep.start()
    try:
        assert held.wait(300), "the sweep did not reach its pairs stage"
        run_url = (f"{ui['base']}/#/experiments/{live.ids['experiment_id']}/runs/{live.run_id}"
                   "?workflowType=machine_learning")
        dom = open_page(run_url, ["Status Running"], ARTIFACTS / "mlflow-run-running.png", tmp_path, text=True)
        assert "Status Running" in text_of(dom)
        # The finished stages' times so far (load, pairs), grouped by prefix; the page keeps refreshing.
        metrics = open_page(run_url.replace("?", "/model-metrics?"), ["time (2)"],
                            ARTIFACTS / "mlflow-run-running-metrics.png", tmp_path, text=True)
        assert "time (2)" in text_of(metrics)
    finally:
        release.set()
        sweep.join(600)
    live.finish(outcome["result"])

    dom = open_page(run_url, ["Status Finished"], ARTIFACTS / "mlflow-run-finished.png", tmp_path, text=True)
    assert "Status Finished" in text_of(dom)
    summary = open_page(run_url.replace("?", "/artifacts/tables/summary.json?"), ["View as table", "position_from_end"],
                        ARTIFACTS / "mlflow-table-summary.png", tmp_path)
    assert "position_from_end" in summary and "ci_high" in summary
    nodes = open_page(run_url.replace("?", "/artifacts/tables/circuit_nodes.json?"), ["L0.H3@end-1"],
                      ARTIFACTS / "mlflow-table-circuit-nodes.png", tmp_path)
    assert "L0.H3@end-1" in nodes and "mean_difference_cosine" in nodes


def test_run_page_shows_layer_metric_and_diagrams(ui, tiny_sweep, tmp_path):
    tracking = tiny_sweep["tracking"]
    run_url = f"{ui['base']}/#/experiments/{tracking['experiment_id']}/runs/{tracking['run_id']}"
    run_name = tracking_run_name(tiny_sweep["cfg"])

    # The per-layer curve: a chart whose legend names the run and the metric, with step = layer.
    # A tall window: the UI draws a chart only once it is scrolled into view.
    dom = open_page(f"{run_url}/model-metrics", [f"{run_name} (denoise/resid_pre)", "Step"],
                    ARTIFACTS / "mlflow-layer-metric.png", tmp_path, height=2400)
    assert f"{run_name} (denoise/resid_pre)" in dom, "the denoise/resid_pre chart did not render"
    assert "main-svg" in dom  # the plotted chart itself
    assert (ARTIFACTS / "mlflow-layer-metric.png").stat().st_size > 10_000

    # The circuit diagram and the heatmaps, previewed from the run's artifacts.
    for name in ("circuit.png", "layers.png"):
        marker = f'alt="{name}" src="blob:'
        dom = open_page(f"{run_url}/artifacts/{name}", [marker], ARTIFACTS / f"mlflow-{name}", tmp_path)
        assert marker in dom, f"{name} is not shown on the run's artifact page"
        assert (ARTIFACTS / f"mlflow-{name}").stat().st_size > 10_000


def test_multirun_parent_run_shows_the_comparison(tiny_multirun, tmp_path):
    """The parent run of `patchsweep --multirun experiment=refusal_tiny model=<three tiny organisms>`: its page
    has the comparison table as its description, the comparison as an MLflow table and the figure."""
    from mlflow import MlflowClient

    from pipeline.run.tracking import SWEEP_TAG

    client = MlflowClient(f"sqlite:///{tiny_multirun['root'] / 'mlflow.db'}")
    [experiment] = [e for e in client.search_experiments() if e.name == "patchsweep"]
    [parent] = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{SWEEP_TAG}` != ''")
    with serve_ui(tiny_multirun["root"]) as served:
        run_url = (f"{served['base']}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
                   "?workflowType=machine_learning")
        expect = ["refusal-tiny-gpt2", "refusal-tiny-neox", "direction_best_depth", "Status Finished"]
        text = text_of(open_page(run_url, expect, ARTIFACTS / "mlflow-multirun-parent.png", tmp_path, height=1600,
                                 text=True))
        assert all(s in text for s in expect), text[:3000]
        table = open_page(run_url.replace("?", "/artifacts/tables/comparison.json?"),
                          ["View as table", "faithfulness_ci"], ARTIFACTS / "mlflow-multirun-comparison-table.png",
                          tmp_path)
        assert "faithfulness_ci" in table and "refusal-tiny-neox" in table
        marker = 'alt="comparison.png" src="blob:'
        figure = open_page(run_url.replace("?", "/artifacts/comparison.png?"), [marker],
                           ARTIFACTS / "mlflow-multirun-comparison.png", tmp_path)
        assert marker in figure
