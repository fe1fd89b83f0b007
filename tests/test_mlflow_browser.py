"""The MLflow UI, served on 127.0.0.1 for the sweep's SQLite store, opened in headless Debian chromium:
the per-layer metric chart and the diagrams are on the run's pages. Screenshots go to test-artifacts/.

`make test` installs chromium (Debian package) when it is missing.
"""
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import REPO, free_ports, mlflow_ui
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
    [port] = free_ports(1)
    base = f"http://127.0.0.1:{port}"
    log_path = tiny_sweep["root"] / "ui.log"
    with mlflow_ui(["--output-root", str(tiny_sweep["root"]), "--port", str(port)], log_path) as server:
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
        yield base


def open_page(url: str, expect: list[str], screenshot: Path, tmp_path: Path, height: int = 1000, attempts: int = 4) -> str:
    """Load `url` in headless chromium and return its DOM once it shows every string in `expect`, with a
    screenshot of that same load. The UI fetches and draws asynchronously, so each retry grants more
    virtual time (virtual time runs ahead of the clock while the page is idle)."""
    binary = chromium_binary()
    ARTIFACTS.mkdir(exist_ok=True)
    dom = ""
    for attempt in range(attempts):
        profile = tmp_path / f"profile-{screenshot.stem}-{attempt}"
        dom = subprocess.run([binary, *CHROMIUM_FLAGS, f"--window-size=1400,{height}", f"--user-data-dir={profile}",
                              f"--virtual-time-budget={60000 * (attempt + 1)}", "--dump-dom",
                              f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=240).stdout
        if all(s in dom for s in expect):
            break
    return dom


def test_run_page_shows_layer_metric_and_diagrams(ui, tiny_sweep, tmp_path):
    tracking = tiny_sweep["tracking"]
    run_url = f"{ui}/#/experiments/{tracking['experiment_id']}/runs/{tracking['run_id']}"
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
