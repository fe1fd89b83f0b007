"""Cluster jobs (jobs/): the Kubernetes manifests parse and carry what KubeRay and Kubernetes need, the
Slurm script is valid bash that starts Ray on its nodes, and jobs/submit.sh submits a real sweep to a
real local Ray head with token authentication on."""
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, free_ports, short_temp_dir

JOBS = REPO / "jobs"
VENV_BIN = Path(sys.executable).parent


def load(name: str) -> list[dict]:
    return [doc for doc in yaml.safe_load_all((JOBS / name).read_text()) if doc]


def check_rayjob_spec(spec: dict) -> None:
    """A RayJob spec that runs a patchsweep sweep on GPU workers with token auth from a Secret."""
    assert spec["entrypoint"].startswith("python -m pipeline ")
    assert "ray.address=auto" in spec["entrypoint"] and "resources=gpu" in spec["entrypoint"]
    assert "output_root=" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    yaml.safe_load(spec["runtimeEnvYAML"])
    cluster = spec["rayClusterSpec"]
    assert cluster["authOptions"]["mode"] == "token"
    secret = cluster["authOptions"]["secretName"]
    head = cluster["headGroupSpec"]
    [head_container] = head["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in str(head_container["resources"])
    [group] = cluster["workerGroupSpecs"]
    assert group["replicas"] >= 1 and group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    [worker] = group["template"]["spec"]["containers"]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    actors = re.search(r"resources\.actors=(\d+)", spec["entrypoint"])
    assert actors and int(actors.group(1)) == group["replicas"] * int(worker["resources"]["limits"]["nvidia.com/gpu"])
    for container in (head_container, worker):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": secret, "key": "auth_token"}
        assert container["image"] == head_container["image"]
        assert container["volumeMounts"][0]["mountPath"] == "/data"
    assert re.search(r"output_root=/data/", spec["entrypoint"])


def test_rayjob_manifest():
    [job] = load("rayjob.yaml")
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    assert job["metadata"]["name"]
    check_rayjob_spec(job["spec"])


NIGHTLY_COMPARE = " && python -m pipeline compare --newest /data/patchsweep/nightly"


def cron_spec(spec: dict) -> dict:
    """A scheduled run's spec, minus the dated output folder it adds to the entrypoint and the compare with
    the night before that follows the sweep (in the folder holding the dated ones)."""
    entry = spec["entrypoint"]
    assert "'output_dir=/data/patchsweep/nightly/${now:%Y-%m-%d}'" in entry
    assert entry.endswith(NIGHTLY_COMPARE)
    entry = entry.removesuffix(NIGHTLY_COMPARE)
    return {**spec, "entrypoint": entry.replace(" 'output_dir=/data/patchsweep/nightly/${now:%Y-%m-%d}'", "")}


def test_raycronjob_manifest():
    [rayjob] = load("rayjob.yaml")
    [cron] = load("raycronjob.yaml")
    assert (cron["apiVersion"], cron["kind"]) == ("ray.io/v1", "RayCronJob")
    assert len(cron["spec"]["schedule"].split()) == 5
    template = cron["spec"]["jobTemplate"]  # a RayJobSpec, as in KubeRay's RayCronJobSpec
    check_rayjob_spec(template)
    assert cron_spec(template) == rayjob["spec"]


def test_cronjob_fallback_creates_the_rayjob():
    docs = {doc["kind"]: doc for doc in load("cronjob.yaml")}
    assert set(docs) == {"ServiceAccount", "Role", "RoleBinding", "ConfigMap", "CronJob"}
    [rayjob] = load("rayjob.yaml")
    [cron] = load("raycronjob.yaml")

    cronjob = docs["CronJob"]
    assert (cronjob["apiVersion"], cronjob["kind"]) == ("batch/v1", "CronJob")
    assert len(cronjob["spec"]["schedule"].split()) == 5
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == docs["ServiceAccount"]["metadata"]["name"]
    [container] = pod["containers"]
    assert "kubectl" in container["image"] and container["args"][:2] == ["create", "-f"]
    manifest_path = Path(container["args"][2])
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == str(manifest_path.parent))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    configmap = docs["ConfigMap"]
    assert volume["configMap"]["name"] == configmap["metadata"]["name"]

    # The RayJob it creates: a fresh name per run, the same spec as the RayCronJob's template.
    created = yaml.safe_load(configmap["data"][manifest_path.name])
    assert (created["apiVersion"], created["kind"]) == ("ray.io/v1", "RayJob")
    assert created["metadata"]["generateName"] and "name" not in created["metadata"]
    check_rayjob_spec(created["spec"])
    assert created["spec"] == cron["spec"]["jobTemplate"]
    assert cron_spec(created["spec"]) == rayjob["spec"]

    # Least privilege: the ServiceAccount may create (and read) RayJobs, nothing else.
    [rule] = docs["Role"]["rules"]
    assert rule["apiGroups"] == ["ray.io"] and rule["resources"] == ["rayjobs"] and "create" in rule["verbs"]
    assert set(rule["verbs"]) <= {"create", "get", "list"}
    binding = docs["RoleBinding"]
    assert binding["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert binding["subjects"][0]["name"] == docs["ServiceAccount"]["metadata"]["name"]


def test_slurm_script():
    text = (JOBS / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(JOBS / "slurm.sbatch")], check=True)
    directives = [line for line in text.splitlines() if line.startswith("#SBATCH ")]
    assert any("--nodes=" in d for d in directives) and any("--gpus-per-node=" in d for d in directives)
    # The directives must come before the first command, or sbatch ignores them.
    first_command = next(i for i, line in enumerate(text.splitlines()) if line and not line.startswith("#"))
    assert all(text.splitlines().index(d) < first_command for d in directives)
    assert re.search(r"srun .*ray_bin\" start --head --block", text)
    assert re.search(r"srun .*ray_bin\" start --block --address=", text)
    assert "RAY_AUTH_MODE=token" in text
    assert re.search(r'-m pipeline "ray\.address=\$address"', text)
    assert "stop_ray" in text and "trap stop_ray EXIT" in text
    assert re.search(r'-m pipeline compare --newest "\$PATCHSWEEP_COMPARE_IN"', text)


def test_runtime_env():
    env = yaml.safe_load((JOBS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert {".git", ".venv"} <= set(env["excludes"])
    assert not {"RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"} & set(env["env_vars"])  # secrets stay out of runtime envs


def submit_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update({"PATH": f"{VENV_BIN}:{env['PATH']}", "RAY_USAGE_STATS_ENABLED": "0", **extra})
    return env


def test_submit_refuses_without_token_or_output_folder(tmp_path):
    home = tmp_path / "home"  # no ~/.ray/auth_token here
    home.mkdir()
    result = subprocess.run(["bash", str(JOBS / "submit.sh"), f"output_root={tmp_path}"], capture_output=True,
                            text=True, env=submit_env(HOME=str(home)), timeout=30)
    assert result.returncode == 2 and "no Ray auth token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    result = subprocess.run(["bash", str(JOBS / "submit.sh"), "experiment=refusal_tiny"], capture_output=True,
                            text=True, env=submit_env(HOME=str(home), RAY_AUTH_TOKEN="x"), timeout=30)
    assert result.returncode == 2 and "output_root=" in result.stderr


def dashboard_answers(address: str) -> bool:
    """The job server is up (an unauthenticated request is answered, if only with 401)."""
    import urllib.error
    import urllib.request

    try:
        urllib.request.urlopen(f"{address}/api/version", timeout=5)
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    """A real Ray head (`ray start --head --block`, 1 CPU) with token authentication on; stopped by its
    own process id at the end (`ray stop` would stop every Ray instance on the machine)."""
    root = tmp_path_factory.mktemp("ray-head")
    token = secrets.token_hex(32)
    env = submit_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, HOME=str(root), PYTHONUNBUFFERED="1")
    # Free ports: the defaults (8265, 10001, 52365) may belong to another Ray instance on this machine.
    dashboard_port, client_port, agent_port = free_ports(3)
    ray_temp = short_temp_dir()
    log = open(root / "head.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--port=0", "--num-cpus=1", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={client_port}",
         f"--dashboard-agent-listen-port={agent_port}", f"--temp-dir={ray_temp}", "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    address = f"http://127.0.0.1:{dashboard_port}"
    try:
        deadline = time.time() + 180
        while not dashboard_answers(address):
            assert head.poll() is None and time.time() < deadline, (root / "head.log").read_text()[-3000:]
            time.sleep(1)
        yield {"address": address, "token": token, "root": root, "env": env}
    finally:
        head.terminate()
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        log.close()
        shutil.rmtree(ray_temp, ignore_errors=True)


@pytest.mark.slow
def test_head_refuses_unauthenticated_jobs(ray_head, tmp_path):
    """Token auth stays on: a submission without the token is turned away."""
    home = tmp_path / "home"
    home.mkdir()
    result = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", ray_head["address"], "--",
                             "python", "-c", "print(1)"], capture_output=True, text=True,
                            env=submit_env(HOME=str(home)), timeout=60)
    assert result.returncode != 0
    assert "Unauthorized" in result.stdout + result.stderr or "Authentication" in result.stdout + result.stderr


@pytest.mark.slow
def test_submit_script_runs_a_sweep(ray_head):
    """jobs/submit.sh against the head: a refusal_tiny sweep (fewer pairs, the residual stream only, to
    keep it short) runs as a Ray job and succeeds."""
    out = ray_head["root"] / "outputs"
    submission = f"patchsweep-test-{secrets.token_hex(4)}"
    env = submit_env(HOME=str(ray_head["root"]), RAY_ADDRESS=ray_head["address"], RAY_AUTH_TOKEN=ray_head["token"],
                     SUBMISSION_ID=submission)
    start = time.perf_counter()
    result = subprocess.run(["bash", str(JOBS / "submit.sh"), f"output_root={out}", "experiment=refusal_tiny",
                             "prompts.n_pairs=16", "patching.components=[resid_pre]", "tracking.enabled=false"],
                            capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in result.stdout + result.stderr
    status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", "--address", ray_head["address"], submission],
                            capture_output=True, text=True, env={**env, "RAY_AUTH_MODE": "token"}, timeout=60)
    assert f"Job '{submission}' succeeded" in status.stdout + status.stderr, status.stdout + status.stderr
    run_dir = out / "refusal_tiny" / "refusal-tiny-generated"
    for name in ("config.yaml", "pairs.parquet", "effects.parquet", "summary.parquet", "report.md"):
        assert (run_dir / name).is_file(), name
    assert "ray.address=auto" in result.stdout + result.stderr  # the job joined the head's cluster
    print(f"submit.sh refusal_tiny job: {seconds:.0f}s")


@pytest.mark.slow
def test_slurm_script_runs_on_a_two_node_allocation(tmp_path):
    """jobs/slurm.sbatch for real on this machine: Slurm's srun/scontrol stand-ins run each job step
    locally, so the script starts a real Ray head and worker, runs a sweep, and stops them."""
    shims = tmp_path / "bin"
    shims.mkdir()
    # srun [--nodes=N --ntasks=N -w NODE] command...: run the command here.
    (shims / "srun").write_text('#!/bin/bash\nwhile [[ "$1" == -* ]]; do [[ "$1" == -w ]] && shift; shift; done\n'
                                'exec "$@"\n')
    (shims / "scontrol").write_text('#!/bin/bash\nprintf "node-a\\nnode-b\\n"\n')
    for shim in shims.iterdir():
        shim.chmod(0o755)
    port, dashboard_port, client_port, head_agent_port, worker_agent_port = free_ports(5)
    env = submit_env(PATH=f"{shims}:{VENV_BIN}:{os.environ['PATH']}", HOME=str(tmp_path), SLURM_JOB_ID="4242",
                     SLURM_JOB_NODELIST="node-[a-b]", SLURM_CPUS_PER_TASK="1", SLURM_GPUS_PER_NODE="0",
                     RAY_PORT=str(port),
                     RAY_HEAD_ARGS=f"--dashboard-port={dashboard_port} --ray-client-server-port={client_port} "
                                   f"--dashboard-agent-listen-port={head_agent_port}",
                     RAY_WORKER_ARGS=f"--dashboard-agent-listen-port={worker_agent_port}",
                     PATCHSWEEP_PYTHON=sys.executable)
    out = tmp_path / "outputs"
    ray_temp = short_temp_dir()
    env["RAY_TEMP_DIR"] = ray_temp
    script = subprocess.Popen(["bash", str(JOBS / "slurm.sbatch"), f"output_root={out}", "experiment=refusal_tiny",
                               "tracking.enabled=false", "patching.components=[resid_pre]"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
                              start_new_session=True)
    try:
        stdout, stderr = script.communicate(timeout=400)
    finally:
        if script.poll() is None:  # timed out: stop the script and the Ray nodes it started (its own group)
            os.killpg(script.pid, signal.SIGTERM)
            script.wait(timeout=60)
    assert script.returncode == 0, (stdout + stderr)[-4000:]
    assert "Ray cluster up: 2 nodes" in stdout
    assert (out / "refusal_tiny" / "refusal-tiny-generated" / "effects.parquet").is_file()
    time.sleep(3)
    leftover = subprocess.run(["pgrep", "-f", ray_temp], capture_output=True, text=True).stdout.split()
    shutil.rmtree(ray_temp, ignore_errors=True)
    assert not leftover, f"Ray processes still running: {leftover}"


def test_jobs_are_documented():
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Cluster jobs", 1)[1].split("\n## ", 1)[0]
    for name in ("submit.sh", "runtime_env.yaml", "rayjob.yaml", "raycronjob.yaml", "cronjob.yaml", "slurm.sbatch"):
        assert name in section, name
