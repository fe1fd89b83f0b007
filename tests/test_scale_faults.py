"""Scale out and survive: a sweep over two models and many shards on a real three-node Ray cluster
(a head and two 1-CPU workers, started with `ray start` on this machine, token authentication on),
through the real command; a model worker killed with SIGKILL mid-sweep; the driver killed mid-sweep
and the same command run again; damaged shards. Every disturbed run must end with exactly the
effects of an undisturbed one: the same rows, none missing, none twice, the same numbers."""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from conftest import REPO, free_ports, short_temp_dir, write_jsonl
from pipeline import store

pytestmark = pytest.mark.slow  # a three-node cluster and six sweeps: about 5 min on 2 busy cores

KEY = ["model", "pair_id", "direction", "component", "layer", "head", "position", "position_class"]
VALUES = ["metric_clean", "metric_corrupted", "metric_patched", "effect"]
N_PAIRS = 12  # one pair per shard: many small work items, spread over the cluster's two workers


class LocalCluster:
    """A Ray head (no CPUs: drivers only) and worker nodes of 1 CPU each, every node a `ray start --block`
    process in its own session, all sharing one short temp folder (socket paths must stay < 108 bytes).
    Stopped by those processes' ids: `ray stop` would stop every Ray instance on the machine."""

    def __init__(self, n_workers: int, env: dict):
        self.temp = short_temp_dir()
        self.env = env
        self.nodes: list[subprocess.Popen] = []
        ports = free_ports(4 + n_workers)
        self.port, dashboard, client, head_agent = ports[:4]
        self.address = f"127.0.0.1:{self.port}"
        try:
            self._start("head", "--head", f"--port={self.port}", "--num-cpus=0", "--include-dashboard=false",
                        f"--dashboard-port={dashboard}", f"--ray-client-server-port={client}",
                        f"--dashboard-agent-listen-port={head_agent}")
            for i, agent in enumerate(ports[4:]):
                self._start(f"worker{i}", f"--address={self.address}", "--num-cpus=1",
                            f"--dashboard-agent-listen-port={agent}")
            self.wait_for_nodes(1 + n_workers)
        except BaseException:
            self.stop()
            raise

    def _start(self, name: str, *args: str) -> None:
        log = open(Path(self.temp) / f"{name}.log", "w")
        self.nodes.append(subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--block", f"--temp-dir={self.temp}",
             "--disable-usage-stats", "--object-store-memory=100000000", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))
        # One node at a time: on a busy machine, nodes starting together time out waiting for the GCS.
        deadline = time.time() + 180
        while "Ray runtime started" not in (Path(self.temp) / f"{name}.log").read_text():
            assert self.nodes[-1].poll() is None and time.time() < deadline, self.log(name)
            time.sleep(0.5)

    def log(self, name: str) -> str:
        return (Path(self.temp) / f"{name}.log").read_text()[-3000:]

    def wait_for_nodes(self, expected: int) -> None:
        probe = ("import ray, sys, time\nray.init(address=sys.argv[1], logging_level='error', log_to_driver=False)\n"
                 "deadline = time.time() + 180\n"
                 "while sum(n['Alive'] for n in ray.nodes()) < int(sys.argv[2]) and time.time() < deadline:\n"
                 "    time.sleep(0.5)\n"
                 "print(sum(n['Alive'] for n in ray.nodes()), ray.cluster_resources().get('CPU'))\n")
        out = subprocess.run([sys.executable, "-c", probe, self.address, str(expected)], capture_output=True,
                             text=True, env=self.env, timeout=240)
        logs = "\n".join(f"--- {name}:\n{self.log(name)}" for name in ("worker0", "worker1"))
        assert out.stdout.split()[:2] == [str(expected), "2.0"], out.stdout + out.stderr[-3000:] + logs

    def model_workers(self) -> list[psutil.Process]:
        """The ModelWorker actor processes on the worker nodes (descendants of their `ray start`)."""
        found = []
        for node in self.nodes[1:]:
            for child in psutil.Process(node.pid).children(recursive=True):
                try:
                    if "ModelWorker" in " ".join(child.cmdline()):
                        found.append(child)
                except psutil.NoSuchProcess:
                    pass
        return found

    def stop(self) -> None:
        for node in reversed(self.nodes):
            node.terminate()
        for node in self.nodes:
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        shutil.rmtree(self.temp, ignore_errors=True)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The cluster, the second model, the pairs file, and the environment every command runs in."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.organisms import resolve
    from pipeline.organisms.refusal_tiny import grammar

    root = tmp_path_factory.mktemp("scale")
    # The second model: refusal-tiny with every weight perturbed by 2% seeded noise, saved with
    # save_pretrained and loaded by path (model=hf): other weights, the same refusal behaviour.
    source = resolve("refusal-tiny")
    model, tokenizer = AutoModelForCausalLM.from_pretrained(source), AutoTokenizer.from_pretrained(source)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1 + 0.02 * torch.randn(parameter.shape, generator=generator))
    second = root / "tiny-perturbed"
    model.save_pretrained(second)
    tokenizer.save_pretrained(second)
    pairs = write_jsonl(root / "pairs.jsonl", [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category}
                                              for p in grammar.pairs(N_PAIRS, 0, "heldout")])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}:{env['PATH']}", HOME=str(root), PYTHONUNBUFFERED="1")
    cluster = LocalCluster(2, env)
    try:
        yield {"root": root, "cluster": cluster, "env": env, "models": ["refusal-tiny", str(second)], "pairs": pairs}
    finally:
        cluster.stop()


def command(setup, output_root: Path, models: list[str]) -> list[str]:
    """`patchsweep` over `models` (a --multirun when several) on the cluster, 2 actors (one per worker)."""
    return [sys.executable, "-m", "pipeline", *(["--multirun"] if len(models) > 1 else []),
            "experiment=refusal_tiny", "model=hf", f"model.path={','.join(models)}",
            f"prompts.path={setup['pairs']}", "resources.shard_size=1", "prompts.generate=false",
            "prompts.refusal_tokens=[I]", "prompts.compliance_tokens=[Sure]", "summary.n_bootstrap=100",
            f"ray.address={setup['cluster'].address}", "resources.actors=2", "tracking.enabled=false",
            f"output_root={output_root}"]


def run_dir(output_root: Path, model: str) -> Path:
    """The model's run folder; a --multirun job's is inside it, named by the model path it sweeps."""
    folder = output_root / "refusal_tiny" / f"{Path(model).name}-pairs"
    jobs = sorted(folder.glob(f"model.path-{Path(model).name}-*"))
    return jobs[0] if jobs else folder


def effects(output_root: Path, model: str) -> pd.DataFrame:
    frame = store.read_table(run_dir(output_root, model) / "effects.parquet").to_pandas()
    return frame.sort_values(KEY, na_position="first").reset_index(drop=True)


def assert_same_effects(got, want) -> None:
    """Same rows (keys), each exactly once, none missing, the same numbers."""
    assert not got.duplicated(KEY).any()
    assert len(got) == len(want)
    assert got[KEY].astype(str).equals(want[KEY].astype(str))
    for column in VALUES:
        np.testing.assert_allclose(got[column].to_numpy(), want[column].to_numpy(), rtol=1e-6, atol=1e-6)


def work_counts(stdout: str) -> list[dict[str, tuple[int, int]]]:
    """The printed summaries' `Work:` lines -> per model, stage -> (computed, reused)."""
    return [{m.group(1): (int(m.group(2)), int(m.group(3)))
             for m in re.finditer(r"(\w+) (\d+) computed/(\d+) reused", line)}
            for line in stdout.splitlines() if line.startswith("Work:")]


def listed(folder: Path) -> int:
    """Shards a stage's manifest vouches for (0 while it does not exist yet)."""
    try:
        return len(json.loads((folder / "_manifest.json").read_text())["files"])
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def run(setup, output_root: Path, models: list[str], timeout: int = 400) -> subprocess.CompletedProcess:
    result = subprocess.run(command(setup, output_root, models), capture_output=True, text=True, cwd=REPO,
                            env=setup["env"], timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return result


def start(setup, output_root: Path, models: list[str]) -> subprocess.Popen:
    log = open(output_root.parent / f"{output_root.name}.log", "w")
    return subprocess.Popen(command(setup, output_root, models), stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                            env=setup["env"], start_new_session=True)


def wait_for_shards(process: subprocess.Popen, folder: Path, at_least: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while (n := listed(folder)) < at_least:
        assert process.poll() is None, "the sweep ended before the fault was injected"
        assert time.time() < deadline, f"only {n} shards in {folder} after {timeout}s"
        time.sleep(0.05)
    return n


@pytest.fixture(scope="module")
def undisturbed(setup):
    """Both models, nothing disturbed: the reference results."""
    output_root = setup["root"] / "undisturbed"
    result = run(setup, output_root, setup["models"])
    return {"root": output_root, "stdout": result.stdout}


def test_two_models_on_a_three_node_cluster(setup, undisturbed):
    counts = work_counts(undisturbed["stdout"])
    assert len(counts) == 2  # one summary per model
    n_items = N_PAIRS * 4 * 2  # pairs x components (each with its position classes) x directions
    for model, count in zip(setup["models"], counts):
        assert count["cache"] == (N_PAIRS, 0) and count["patch"] == (n_items, 0)
        frame = effects(undisturbed["root"], model)
        assert frame["pair_id"].nunique() == N_PAIRS and not frame.duplicated(KEY).any()
        assert set(frame["model"]) == {Path(model).name}
    # The second model is another model: other weights, other numbers.
    a, b = (effects(undisturbed["root"], m) for m in setup["models"])
    assert not np.allclose(a["metric_clean"], b["metric_clean"])


def test_cluster_refuses_a_driver_without_the_token(setup, tmp_path):
    env = {k: v for k, v in setup["env"].items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    probe = "import ray, sys; ray.init(address=sys.argv[1], logging_level='error'); print('connected')"
    result = subprocess.run([sys.executable, "-c", probe, setup["cluster"].address], capture_output=True, text=True,
                            env=env, timeout=120)
    assert result.returncode != 0 and "connected" not in result.stdout
    assert "authentication" in result.stderr.lower() or "token" in result.stderr.lower(), result.stderr[-2000:]


def test_worker_killed_mid_sweep(setup, undisturbed):
    """SIGKILL one model actor while patch shards are being published: Ray restarts it, the driver
    resubmits its items (patch items, or the circuit step it runs beside them), the sweep finishes with the
    undisturbed effects (the second model's)."""
    model = setup["models"][1]
    output_root = setup["root"] / "worker-killed"
    process = start(setup, output_root, [model])
    try:
        published = wait_for_shards(process, run_dir(output_root, model) / "effects", 10)
        cluster = setup["cluster"]
        victims = cluster.model_workers()
        assert len(victims) == 2, victims  # one actor on each worker node
        victims[0].send_signal(signal.SIGKILL)
        assert process.wait(timeout=400) == 0, (output_root.parent / "worker-killed.log").read_text()[-4000:]
    finally:
        if process.poll() is None:
            process.kill()
    log = (output_root.parent / "worker-killed.log").read_text()
    retried = re.search(r"(patch|circuit) \d+ computed/0 reused/([1-9]\d*) retried", log)
    assert retried, log[-3000:]
    got = effects(output_root, model)
    assert_same_effects(got, effects(undisturbed["root"], model))
    print(f"worker killed after {published} published shards, {retried.group(2)} {retried.group(1)} items retried; "
          f"{len(got)} effect rows identical to the undisturbed run's")


@pytest.fixture(scope="module")
def resumed(setup):
    """refusal-tiny's sweep with its driver killed (SIGKILL) once some patch shards are published, then
    the same command run again."""
    model = setup["models"][0]
    output_root = setup["root"] / "driver-killed"
    process = start(setup, output_root, [model])
    try:
        wait_for_shards(process, run_dir(output_root, model) / "effects", 12)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    folder = run_dir(output_root, model)
    finished = {"cache": listed(folder / "activations"), "patch": listed(folder / "effects")}
    assert not (folder / "effects.parquet").exists()
    result = run(setup, output_root, [model])
    return {"root": output_root, "model": model, "finished": finished, "stdout": result.stdout}


def test_driver_killed_then_resumed(setup, undisturbed, resumed):
    [count] = work_counts(resumed["stdout"])
    n_items = N_PAIRS * 4 * 2
    finished = resumed["finished"]
    assert 0 < finished["patch"] < n_items
    # Only the missing shards are computed; the summary says how many were reused.
    assert count["cache"] == (N_PAIRS - finished["cache"], finished["cache"])
    assert count["patch"] == (n_items - finished["patch"], finished["patch"])
    assert count["pairs"] == (0, 1)
    got = effects(resumed["root"], resumed["model"])
    assert_same_effects(got, effects(undisturbed["root"], resumed["model"]))
    print(f"driver killed: {finished['patch']}/{n_items} patch and {finished['cache']}/{N_PAIRS} cache shards reused, "
          f"{n_items - finished['patch']} + {N_PAIRS - finished['cache']} recomputed; {len(got)} effect rows identical")


def test_damaged_shards_are_recomputed_never_read(setup, undisturbed, resumed):
    """A patch shard whose numbers were changed in place (still a valid Arrow file: a reader would not
    notice), a truncated activation shard and a truncated effects.parquet: the manifest checksums catch
    all three, only they are recomputed, and the results are the undisturbed ones."""
    folder = run_dir(resumed["root"], resumed["model"])
    [shard] = sorted((folder / "effects").glob("*.arrow"))[:1]
    original = store.read_table(shard).to_pandas()  # a copy: the table itself maps the file
    value = np.float32(original["metric_patched"].iloc[0])
    data = shard.read_bytes()
    assert data.count(value.tobytes()) >= 1
    shard.write_bytes(data.replace(value.tobytes(), np.float32(value + 100).tobytes()))
    tampered = store.read_table(shard).to_pandas()  # reads fine: only the checksum can tell
    assert tampered["metric_patched"].iloc[0] == value + 100
    [activations] = sorted((folder / "activations").glob("*.arrow"))[:1]
    os.truncate(activations, activations.stat().st_size // 3)
    os.truncate(folder / "effects.parquet", 100)

    result = run(setup, resumed["root"], [resumed["model"]])
    [count] = work_counts(result.stdout)
    assert count["cache"] == (1, N_PAIRS - 1)
    assert count["patch"] == (1, N_PAIRS * 8 - 1)  # 4 components (each with its position classes) x 2 directions
    assert store.read_table(shard).to_pandas().equals(original)
    assert_same_effects(effects(resumed["root"], resumed["model"]), effects(undisturbed["root"], resumed["model"]))


def test_edited_pairs_file_gives_new_pairs(setup, undisturbed, resumed):
    """The same command after the prompt file changed (its last pair dropped): the pairs are rebuilt
    (the file is keyed by content, not by name), the shards of the unchanged pairs are reused, and the
    results are the undisturbed ones without the dropped pair."""
    original = setup["pairs"].read_text()
    lines = original.splitlines(keepends=True)
    try:
        setup["pairs"].write_text("".join(lines[:-1]))
        result = run(setup, resumed["root"], [resumed["model"]])
    finally:
        setup["pairs"].write_text(original)
    [count] = work_counts(result.stdout)
    assert count["pairs"][0] >= 1  # the pairs stage's items (tokens, replies, answer tokens, screen) rerun
    assert count["cache"] == (0, N_PAIRS - 1) and count["patch"] == (0, (N_PAIRS - 1) * 8)
    want = effects(undisturbed["root"], resumed["model"])
    want = want[want["pair_id"] != N_PAIRS - 1].reset_index(drop=True)
    assert_same_effects(effects(resumed["root"], resumed["model"]), want)
