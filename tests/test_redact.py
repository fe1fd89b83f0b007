"""Credentials in URIs never reach a line, a log, a config copy, a report or MLflow (pipeline.messages.redact)."""
import os
import signal
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_fail_fast import BEFORE_RAY_S, CHEAP, check_refused, patchsweep

from conftest import free_ports
from pipeline.messages import error_line, notice_line, redact

CASES = {
    "user and password": ("http://user:s3cret@127.0.0.1:5000/api", "http://***@127.0.0.1:5000/api"),
    "a token alone": ("https://ghp_T0KEN@mlflow.example.org", "https://***@mlflow.example.org"),
    "an @ inside the password": ("ray://admin:p@ss@head:10001", "ray://***@head:10001"),
    "no credentials": ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
    "an SQLite store": ("sqlite:////data/runs/mlflow.db", "sqlite:////data/runs/mlflow.db"),
    "an @ in the path, not the authority": ("https://host/models/org@v2", "https://host/models/org@v2"),
    "an address that is not a URI": ("mail x@y.org or git@github.com:a/b", "mail x@y.org or git@github.com:a/b"),
    "several URIs in one line": ("tracking.uri=http://u:p1@h:1 ray.address=ray://tok@h:2 model.path=https://a:b@hf/x",
                                 "tracking.uri=http://***@h:1 ray.address=ray://***@h:2 model.path=https://***@hf/x"),
    "quoted in YAML": ("uri: 'https://u:p@host:443'\n", "uri: 'https://***@host:443'\n"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_redact(case):
    text, expected = CASES[case]
    assert redact(text) == expected
    assert redact(expected) == expected  # redacting twice changes nothing


def test_lines_are_redacted():
    line = error_line("MLflow store http://u:s3cret@h:1 failed")
    assert line == "patchsweep: error: MLflow store http://***@h:1 failed"
    assert "s3cret" not in notice_line("joining ray://u:s3cret@h:2")


SECRET = "s3cret-Pa55"


@contextmanager
def mlflow_server(folder: Path):
    """A real MLflow server on 127.0.0.1 (no authentication: it ignores the credentials a client sends), its
    store and artifacts in `folder`; yields its port."""
    folder.mkdir()
    [port] = free_ports(1)
    with open(folder / "server.log", "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server",
                                   "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
                                   "--artifacts-destination", str(folder / "artifacts"),
                                   "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                  stdout=log, stderr=subprocess.STDOUT, cwd=folder, start_new_session=True)
        try:
            deadline = time.time() + 180
            while True:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).close()
                    break
                except OSError:
                    assert server.poll() is None and time.time() < deadline, (folder / "server.log").read_text()
                    time.sleep(1)
            yield port
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=60)


@pytest.mark.slow
def test_no_password_in_any_line_file_or_store(tmp_path):
    """tracking.uri with a password, through the real command: refused in one line when nothing answers
    there; then a whole sweep logged with it to a real MLflow server. The password is nowhere: not on the
    console, not in the run folder (config.yaml, overrides.yaml, run.log, report.md, the tables'
    provenance), not in the server's store or artifacts; the params show the URI redacted."""
    from mlflow import MlflowClient

    [closed_port] = free_ports(1)
    refused = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={tmp_path / 'refused'}",
                         "tracking.enabled=true", f"tracking.uri=http://user:{SECRET}@127.0.0.1:{closed_port}")
    check_refused("MLflow server down, credentials in its URI", refused, "does not answer",
                  f"tracking.uri=http://***@127.0.0.1:{closed_port}", within=BEFORE_RAY_S)
    assert SECRET not in refused.stdout + refused.stderr
    refused = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={tmp_path / 'refused'}",
                         f"ray.address=ray://token{SECRET}@127.0.0.1:{closed_port}")
    check_refused("Ray cluster down, credentials in its address", refused, "ray://***@127.0.0.1",
                  within=BEFORE_RAY_S)
    assert SECRET not in refused.stdout + refused.stderr

    out = tmp_path / "out"
    with mlflow_server(tmp_path / "server") as port:
        uri = f"http://user:{SECRET}@127.0.0.1:{port}"
        ran = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "tracking.enabled=true",
                         f"tracking.uri={uri}")
        assert ran.status == 0, ran.stderr[-3000:]
        assert f"MLflow: http://***@127.0.0.1:{port}  run " in ran.stdout  # connected with the real URI
        client = MlflowClient(f"http://127.0.0.1:{port}")
        [run] = client.search_runs([client.get_experiment_by_name("patchsweep").experiment_id],
                                   filter_string="tags.`patchsweep.output_dir` != ''")
        assert run.info.status == "FINISHED"
        assert run.data.params["tracking.uri"] == f"http://***@127.0.0.1:{port}"
        assert f"tracking.uri=http://***@127.0.0.1:{port}" in run.data.tags["patchsweep.overrides"]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"config.yaml", "report.md", "run.log"}
    assert SECRET not in ran.stdout + ran.stderr
    assert "127.0.0.1" in (out / "config.yaml").read_text() and (out / "run.log").is_file()
    leaked = [str(p) for p in tmp_path.rglob("*") if p.is_file() and SECRET.encode() in p.read_bytes()]
    assert leaked == []
