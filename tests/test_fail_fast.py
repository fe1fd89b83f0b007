"""Fail fast, in one line, and never lose work: the cases of a careful user and an attacker, each
through the real command (`python -m pipeline` in its own process, or `pipeline.cli.main` in this one
for checks that need no Ray), each with its exit status, its one line, a time bound generous enough for
a loaded 2-core machine, the folder left as it was, and the corrected command then succeeding in the
same folder. Refusals of a config that `validate` makes are one table in tests/test_config.py."""
from __future__ import annotations

import http.server
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from conftest import REPO, free_ports
from pipeline.store import read_table

# A small but complete sweep: refusal-tiny, one component, one direction, 8 pairs, no circuit.
CHEAP = ["experiment=refusal_tiny", "patching.components=[attn_out]", "patching.directions=[denoise]",
         "circuit.enabled=false", "prompts.n_pairs=8", "tracking.enabled=false", "summary.n_bootstrap=200"]
BEFORE_RAY_S = 90  # a refusal before Ray starts: imports, Hydra and validation on a loaded machine


@dataclass
class Ran:
    status: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def line(self) -> str:
        """The command's own line on stderr (Ray may add its start-up warning; progress bars are not lines)."""
        lines = [line for line in self.stderr.splitlines() if line.startswith("patchsweep: ")]
        assert len(lines) == 1, self.stderr[-3000:]
        assert "Traceback" not in self.stderr, self.stderr[-3000:]
        return lines[0]


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", *args]


def patchsweep(*args: str, timeout: float = 600, env: dict | None = None, cwd: Path = REPO) -> Ran:
    """The real command in its own process."""
    start = time.perf_counter()
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))  # this tree, from any folder
    result = subprocess.run(command(*args), capture_output=True, text=True, cwd=cwd, timeout=timeout,
                            env={**os.environ, "PYTHONPATH": path, **(env or {})})
    return Ran(result.returncode, result.stdout, result.stderr, time.perf_counter() - start)


def listing(folder: Path) -> list[str] | None:
    """Everything under `folder` (None when it does not exist)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) if folder.exists() else None


def record(case: str, ran: Ran) -> None:
    print(f"\n{case}: {ran.status}, {ran.seconds:.1f} s: {ran.line}")


def check_refused(case: str, ran: Ran, *fragments: str, within: float, status: int = 2, alone: bool = True) -> None:
    """`ran` ended with `status` and one line holding every fragment, within `within` seconds; `alone`:
    nothing else on stderr (a sweep that started Ray or showed progress bars has more there)."""
    assert ran.status == status, (ran.status, ran.stderr[-3000:])
    if alone:
        assert [line for line in ran.stderr.splitlines() if line.strip()] == [ran.line], ran.stderr[-3000:]
    for fragment in fragments:
        assert fragment in ran.line, ran.line
    assert ran.seconds < within, (case, ran.seconds)
    record(case, ran)


def succeeds(*args: str, timeout: float = 600) -> Ran:
    ran = patchsweep(*args, timeout=timeout)
    assert ran.status == 0, ran.stderr[-3000:]
    assert "Files: " in ran.stdout
    return ran


class ListeningSocket:
    """Something that accepts TCP connections and never speaks Ray (nor anything else)."""

    def __init__(self):
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.socket.listen(16)
        self.port = self.socket.getsockname()[1]

    def close(self):
        self.socket.close()


@pytest.mark.slow
def test_refused_before_compute_leave_the_folder_untouched(tmp_path, word_model_folder):
    """Refusals that need the real command in a process of its own (validate's cases, one table:
    tests/test_config.py): exit 2, one line, Ray never started, the folder as it was; then the
    corrected command succeeds there."""
    out = tmp_path / "out"
    base = [*CHEAP, f"output_root={tmp_path / 'root'}", f"output_dir={out}"]
    [closed_port] = free_ports(1)
    ran = patchsweep("model=hf", f"model.path={word_model_folder}", f"output_root={tmp_path}", "patching.heads=[9]",
                     timeout=300)
    check_refused("a bad value, by a separate process", ran, "head 9 in patching.heads is out of range",
                  within=BEFORE_RAY_S)
    assert "Started a local Ray instance" not in ran.stdout + ran.stderr

    # Ray refusals need their own process: a cluster that never answers ends it at the deadline.
    listener = ListeningSocket()
    try:
        ran = patchsweep(*base, f"ray.address=127.0.0.1:{closed_port}", timeout=300)
        check_refused("Ray cluster not there", ran, f"ray.address=127.0.0.1:{closed_port}", "cannot reach",
                      "ray.address=local", within=BEFORE_RAY_S)
        ran = patchsweep(*base, f"ray.address=127.0.0.1:{listener.port}", "ray.connect_timeout_s=5", timeout=300)
        check_refused("something that is not Ray at ray.address", ran, "did not answer within 5 s",
                      "ray.connect_timeout_s", within=BEFORE_RAY_S + 5)
    finally:
        listener.close()
    assert listing(out) is None

    ran = succeeds(*base)
    assert (out / "summary.parquet").is_file() and not (out / ".patchsweep.lock").exists()


@pytest.mark.slow
def test_mlflow_store_that_fails_after_compute(tmp_path):
    """A store that answers but fails (here every request gets 404) loses nothing: the summary is
    printed, one line says how to log later, and `patchsweep log` then logs the folder without
    computing anything; its UI hint names the store it used."""
    from mlflow import MlflowClient

    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_error(404)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "out"
    (tmp_path / "elsewhere").mkdir()
    try:
        ran = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "tracking.enabled=true",
                         f"tracking.uri=http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
    assert "What matters most" in ran.stdout and "Files: " in ran.stdout  # the summary, in full
    check_refused("MLflow store failing once the results are in", ran, "MLflow store", "404",
                  f"patchsweep log {out.resolve()}", within=600, status=1, alone=False)
    assert (out / "_manifest.json").is_file()

    store = f"sqlite:///{tmp_path / 'later' / 'mlflow.db'}"
    started = time.perf_counter()
    logged = patchsweep("log", str(out), f"tracking.uri={store}", cwd=tmp_path / "elsewhere")
    assert logged.status == 0, logged.stderr[-3000:]
    assert f"ui --uri {store}" in logged.stdout  # the UI hint names the store actually used
    assert (tmp_path / "later" / "mlartifacts").is_dir() and listing(tmp_path / "elsewhere") == []  # beside the store
    print(f"\nlogged later in {time.perf_counter() - started:.1f} s: {logged.stdout.strip()}")
    client = MlflowClient(store)
    [run] = client.search_runs([client.get_experiment_by_name("patchsweep").experiment_id],
                               filter_string="tags.`patchsweep.output_dir` != ''")
    assert run.data.tags["patchsweep.output_dir"] == str(out.resolve())
    assert run.data.metrics["pairs/kept"] > 0 and "denoise/attn_out" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"report.md", "summary.parquet"}


def loopback_only(root: psutil.Process) -> list[str]:
    """The listening addresses of `root` and its descendants that are not loopback."""
    wide = []
    for process in [root, *root.children(recursive=True)]:
        try:
            connections = process.net_connections("inet")
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        wide += [f"{process.name()} {c.laddr.ip}:{c.laddr.port}" for c in connections
                 if c.status == psutil.CONN_LISTEN and c.laddr.ip not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    return wide


@pytest.mark.slow
def test_two_sweeps_into_one_folder(tmp_path):
    """Started together: one is refused in one line naming the other (pid and host), the other's
    results equal a lone run's. While it runs, its local Ray instance listens on 127.0.0.1 only."""
    out = tmp_path / "out"
    args = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}"]
    logs = [open(tmp_path / f"sweep{i}.log", "w+") for i in range(2)]
    started = time.perf_counter()
    sweeps = [subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
              for log in logs]
    wide, seen_ray = [], False
    while any(s.poll() is None for s in sweeps):
        for sweep in sweeps:
            try:
                root = psutil.Process(sweep.pid)
                seen_ray |= any("raylet" in p.name() for p in root.children(recursive=True))
                wide += loopback_only(root)
            except psutil.NoSuchProcess:
                pass
        time.sleep(1)
    assert seen_ray and wide == [], wide  # a private instance serves this machine alone
    statuses = [s.wait() for s in sweeps]
    assert sorted(statuses) == [0, 2], statuses
    winner, loser = (0, 1) if statuses[0] == 0 else (1, 0)
    logs[loser].seek(0)
    ran = Ran(2, "", logs[loser].read(), time.perf_counter() - started)
    check_refused("second sweep into a folder in use", ran, f"output folder {out} is in use by another sweep",
                  f"pid {sweeps[winner].pid} on {socket.gethostname()}", "output_dir=<another folder>", within=600,
                  alone=False)
    assert not (out / ".patchsweep.lock").exists()

    lone = tmp_path / "lone"
    succeeds(*CHEAP, f"output_root={tmp_path}", f"output_dir={lone}")
    for name in ("pairs.parquet", "effects.parquet", "summary.parquet"):
        # the same rows and numbers; each table names the run that made it
        together, alone = (read_table(folder / name).drop_columns(["run_id"]).replace_schema_metadata(None)
                           for folder in (out, lone))
        assert together.equals(alone), name


def shards(folder: Path) -> int:
    """Shards the folder's manifest lists as finished: a worker publishes its file before the driver
    records it, so a file on disk alone is not yet a result a re-run reuses."""
    try:
        listed = json.loads((folder / "_manifest.json").read_text())["files"]
    except (OSError, ValueError):  # not yet written, or read while it is replaced
        return 0
    return sum(name.endswith(".arrow") for name in listed)


def wait_for_shards(folder: Path, n: int, sweep: subprocess.Popen, deadline_s: float = 300) -> None:
    deadline = time.time() + deadline_s
    while shards(folder) < n:
        assert sweep.poll() is None and time.time() < deadline, "the sweep ended before it could be stopped"
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_and_interrupted_sweeps_resume(tmp_path):
    """A sweep killed outright leaves its lock behind: the next one takes it over (and says so). Ctrl-C
    (SIGINT to the command's process group, as a terminal sends it) prints one line, exits with 130 and
    loses nothing: the same command then reuses every finished item."""
    out = tmp_path / "out"
    args = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "resources.shard_size=1",
            "patching.components=[resid_pre,attn_out,mlp_out,head]", "patching.per_position=[resid_pre,head]"]
    log = open(tmp_path / "killed.log", "w")
    killed = subprocess.Popen(command(*args), stdout=log, stderr=log, cwd=REPO, start_new_session=True)
    family = []
    try:
        wait_for_shards(out / "activations", 2, killed)
        family = psutil.Process(killed.pid).children(recursive=True)
    finally:
        os.killpg(killed.pid, signal.SIGKILL)
        killed.wait()
        for process in family:  # whatever of its Ray instance outlived the process group
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    assert (out / ".patchsweep.lock").is_file()

    with open(tmp_path / "interrupted.log", "w+") as log:
        sweep = subprocess.Popen(command(*args), stdout=log, stderr=log, cwd=REPO, start_new_session=True)
        wait_for_shards(out / "effects", shards(out / "effects") + 2, sweep)
        os.killpg(sweep.pid, signal.SIGINT)
        signalled = time.perf_counter()
        status = sweep.wait(timeout=120)
        log.seek(0)
        ran = Ran(status, "", log.read(), time.perf_counter() - signalled)
    assert "is no longer running: its lock is taken over" in ran.stderr
    ran.stderr = "\n".join(line for line in ran.stderr.splitlines() if "lock is taken over" not in line)
    check_refused("Ctrl-C", ran, "interrupted: ", "work items finished; run the same command to resume",
                  within=60, status=130, alone=False)
    finished = int(ran.line.split("interrupted: ")[1].split()[0])
    assert finished >= 2

    resumed = succeeds(*args)
    work = dict(part.strip().split(" ", 1) for part in resumed.stdout.split("Work: ")[1].splitlines()[0].split(","))
    reused = sum(int(counts.split(" reused")[0].split("/")[1]) for counts in work.values())
    assert reused >= finished, resumed.stdout


HOLD = """
import ray, sys
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)

@ray.remote(num_cpus=1)
class Hold:
    def ready(self):
        return True

hold = Hold.remote()
ray.get(hold.ready.remote())
print("holding", flush=True)
sys.stdin.read()  # until the test closes it
"""


@pytest.mark.slow
def test_room_for_model_actors_on_a_cluster(tmp_path):
    """A one-node cluster of 1 CPU (`ray start --head`, token authentication on): an actor asking for more
    than a node has is refused at once; with the CPU held by another job the sweep says how long it has
    waited and gives up at resources.placement_timeout_s; with room for one of two actors it starts on that
    one, says so, and finishes in the same folder."""
    import secrets
    import shutil

    from conftest import short_temp_dir

    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}", HOME=str(tmp_path))
    port, client, agent = free_ports(3)
    temp = short_temp_dir()
    log = open(tmp_path / "head.log", "w")
    head = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
                             "--num-cpus=1", "--include-dashboard=false", f"--ray-client-server-port={client}",
                             f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}", "--disable-usage-stats"],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    holder = None
    try:
        deadline = time.time() + 180
        while "Ray runtime started" not in (tmp_path / "head.log").read_text():
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        out = tmp_path / "out"
        base = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", f"ray.address=127.0.0.1:{port}"]

        ran = patchsweep(*base, "resources.cpus_per_actor=2", env=env)
        check_refused("actor larger than any node", ran, "asks 2 CPU (resources.cpus_per_actor)",
                      "more than any node of the Ray cluster has (1 CPU, 0 GPUs over 1 node)", within=120, alone=False)
        assert listing(out) is None

        holder = subprocess.Popen([sys.executable, "-c", HOLD, f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True, env=env)
        assert holder.stdout.readline().strip() == "holding"
        ran = patchsweep(*base, "resources.placement_timeout_s=40", env=env)
        waiting = r"patchsweep: waiting for room: no model actor placed after 3\d s \(each asks 1 CPU"
        assert re.search(waiting, ran.stderr), ran.stderr[-3000:]
        ran.stderr = "\n".join(line for line in ran.stderr.splitlines() if "waiting for room" not in line)
        check_refused("no room on the cluster", ran, "no model actor was placed within "
                      "resources.placement_timeout_s=40 s", "the cluster has 0 CPUs, 0 GPUs free", within=180,
                      alone=False)
        assert listing(out) is None
        holder.stdin.close()
        holder.wait(timeout=60)

        ran = patchsweep(*base, "resources.actors=2", env=env)
        assert ran.status == 0, ran.stderr[-3000:]
        assert "holds 1 of the 2 model actors asked for" in ran.stderr and (out / "summary.parquet").is_file()
        print(f"\nroom for 1 of 2 actors, {ran.seconds:.1f} s: "
              f"{[line for line in ran.stderr.splitlines() if 'holds 1 of' in line][0]}")
    finally:
        if holder is not None and holder.poll() is None:
            holder.kill()
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        log.close()
        shutil.rmtree(temp, ignore_errors=True)
