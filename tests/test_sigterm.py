"""SIGTERM, what Slurm and Kubernetes send to stop a job, stops a sweep as Ctrl-C does (pipeline.sigterm):
one line saying how much finished, exit status 143, no traceback; the same command then resumes."""
import signal
import subprocess
import time

import psutil
import pytest
from test_fail_fast import CHEAP, Ran, check_refused, command, succeeds, wait_for_shards

from conftest import REPO


@pytest.mark.slow
def test_sigterm_stops_a_sweep_that_then_resumes(tmp_path):
    """SIGTERM to the driver alone (as Kubernetes sends it to a container's first process) once the patch
    stage computes: one line, exit 143, nothing of its Ray instance left running; the same command then
    reuses every finished item."""
    out = tmp_path / "out"
    args = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "resources.shard_size=1"]
    with open(tmp_path / "terminated.log", "w+") as log:
        sweep = subprocess.Popen(command(*args), stdout=log, stderr=log, cwd=REPO, start_new_session=True)
        wait_for_shards(out / "effects", 2, sweep)
        family = psutil.Process(sweep.pid).children(recursive=True)
        sweep.send_signal(signal.SIGTERM)
        signalled = time.perf_counter()
        status = sweep.wait(timeout=120)
        log.seek(0)
        ran = Ran(status, "", log.read(), time.perf_counter() - signalled)
    check_refused("SIGTERM", ran, "patchsweep: SIGTERM: interrupted: ",
                  "work items finished; run the same command to resume", within=60, status=143, alone=False)
    finished = int(ran.line.split("interrupted: ")[1].split()[0])
    assert finished >= 2
    _, alive = psutil.wait_procs(family, timeout=30)
    assert not alive, [p.cmdline() for p in alive]
    assert not (out / ".patchsweep.lock").exists()

    resumed = succeeds(*args)
    work = dict(part.strip().split(" ", 1) for part in resumed.stdout.split("Work: ")[1].splitlines()[0].split(","))
    # The pairs and every activation shard were finished before SIGTERM, and the patch shards it waited for.
    assert work["pairs"].startswith("0 computed/1 reused") and work["cache"].startswith("0 computed/"), resumed.stdout
    assert int(work["patch"].split(" reused")[0].split("/")[1]) >= 2, resumed.stdout
