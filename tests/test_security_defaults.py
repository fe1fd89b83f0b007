"""Security defaults: Ray's token authentication stays on; the MLflow UI binds 127.0.0.1 unless told
otherwise; nothing unpickles files; trust_remote_code is off unless the user turns it on.
(The jobs keep token auth on too: tests/test_jobs.py; a multi-node cluster refuses a driver without
the token: tests/test_scale_faults.py.)"""
from __future__ import annotations

import ast
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from conftest import REPO, compose, free_ports, mlflow_ui
from pipeline.config import to_dict
from pipeline.run.tracking import UI_HOST

SOURCES = sorted((REPO / "pipeline").rglob("*.py"))


def calls_and_imports(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            module = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names = [a.name for a in node.names] + module
            yield "import", names, node
        elif isinstance(node, ast.Call):
            yield "call", ast.unparse(node.func), node


# ---- Ray -----------------------------------------------------------------------------------------

@pytest.mark.slow
def test_private_ray_instance_has_token_auth(tmp_path):
    """`ray.address=local` starts Ray with token authentication on (Ray's default for a new local
    instance, which the pipeline never turns off), with no dashboard to expose."""
    probe = ("from pipeline.validation import typed\n"
             "from conftest import compose\n"
             "from pipeline.run.workers import start_ray\n"
             "start_ray(typed(compose('experiment=refusal_tiny', 'resources.num_cpus=1')))\n"
             "import os, ray\n"
             "from ray._raylet import AuthenticationMode, get_authentication_mode\n"
             "print(get_authentication_mode() == AuthenticationMode.TOKEN, os.environ.get('RAY_AUTH_MODE'))\n"
             "print(ray.get_runtime_context().gcs_address)\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path), RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=f"{REPO / 'tests'}:{REPO}")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env,
                            timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.splitlines()[0] == "True token", result.stdout
    assert (tmp_path / ".ray" / "auth_token").is_file()  # a fresh token, generated for this user


def test_pipeline_never_disables_ray_auth_or_exposes_the_dashboard():
    from pipeline.run import workers

    for path in SOURCES:
        assert not re.search(r"RAY_AUTH_MODE[^\n]{0,60}disabled", path.read_text()), path
    source = inspect.getsource(workers.start_ray)
    assert "include_dashboard=False" in source


# ---- MLflow --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_mlflow_ui_binds_localhost_by_default(tmp_path):
    """`python -m pipeline.run.tracking ui` (what `make ui` runs) serves on 127.0.0.1 and nowhere else."""
    assert UI_HOST == "127.0.0.1"
    assert to_dict(compose("tracking=server"))["tracking"]["uri"].startswith("http://127.0.0.1:")
    assert "--host" not in (REPO / "Makefile").read_text().split("\nui:")[1].split("\n\n")[0]

    [port] = free_ports(1)
    db = tmp_path / "mlflow.db"
    db.touch()
    with mlflow_ui(["--uri", f"sqlite:///{db}", "--port", str(port)], tmp_path / "ui.log") as ui:
        deadline = time.time() + 120
        listening = []
        while not listening:
            assert ui.poll() is None and time.time() < deadline, (tmp_path / "ui.log").read_text()[-3000:]
            time.sleep(0.5)
            listening = [c.laddr.ip for c in psutil.net_connections("inet")
                         if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
        assert set(listening) == {"127.0.0.1"}, listening


# ---- files ---------------------------------------------------------------------------------------

UNPICKLERS = {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "joblib", "shelve", "marshal"}


def test_nothing_unpickles():
    """No pickle-based reader anywhere in the package: tables are Arrow, configs YAML/JSON, weights
    safetensors (transformers' fallback for .bin checkpoints loads with weights_only=True)."""
    for path in SOURCES:
        for kind, what, node in calls_and_imports(path):
            if kind == "import":
                assert not UNPICKLERS & {name.split(".")[0] for name in what}, f"{path}:{node.lineno} imports {what}"
            else:
                assert what not in {"torch.load", "pd.read_pickle", "pandas.read_pickle"}, f"{path}:{node.lineno}"
                if what in {"np.load", "numpy.load"}:
                    assert not any(k.arg == "allow_pickle" for k in node.keywords), f"{path}:{node.lineno}"
    from transformers import modeling_utils

    assert inspect.signature(modeling_utils.load_state_dict).parameters["weights_only"].default is True


# ---- remote code ---------------------------------------------------------------------------------

def test_trust_remote_code_is_off_unless_turned_on():
    from pipeline.engine.loading import load_model

    for preset in sorted((REPO / "conf" / "model").glob("*.yaml")):
        overrides = [f"model={preset.stem}"] + (["model.path=some/model"] if preset.stem == "hf" else [])
        assert to_dict(compose(*overrides))["model"]["trust_remote_code"] is False, preset.name
    assert to_dict(compose("model.trust_remote_code=true"))["model"]["trust_remote_code"] is True
    assert inspect.signature(load_model).parameters["trust_remote_code"].default is False
    for path in SOURCES:
        for kind, _, node in calls_and_imports(path):
            if kind == "call":
                for keyword in node.keywords:
                    if keyword.arg == "trust_remote_code":
                        value = ast.unparse(keyword.value)
                        assert value != "True", f"{path}:{node.lineno} hard-codes trust_remote_code=True"
