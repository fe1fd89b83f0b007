"""How fast `patchsweep --help` and tab completion answer, side by side in one run.

    python bench/bench_cli.py [--repeats 5]

Times, as the shell sees them (a fresh interpreter each time): `--help` (the config composed once,
pipeline.cli.help_page), Hydra's own help page for the same config (its app_help, which composes the
config again for every option of every group), tab completion of `patchsweep mod`, `--version`, and the
bare import of pipeline.cli (the floor). Wall and CPU (user + system of the child) medians; the machine
may be shared, so the ratios within one run are what counts; the load average is printed before and after.
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Hydra's own --help page: the same config and template, without pipeline.cli's help_page.
HYDRA_HELP = """
import sys
import hydra
from pipeline.config import CONF_DIR
sys.argv = ["patchsweep", "--help"]
hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(lambda cfg: None)()
"""
COMMANDS = {
    "--help": ["-m", "pipeline", "--help"],
    "hydra's --help": ["-c", HYDRA_HELP],
    "completion": ["-m", "pipeline", "--shell-completion", "query=bash"],
    "--version": ["-m", "pipeline", "--version"],
    "import pipeline.cli": ["-c", "import pipeline.cli"],
}


def timed(args: list[str]) -> tuple[float, float]:
    """(wall, CPU) seconds of one run of `python <args>`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    env = {**os.environ, "COMP_LINE": "patchsweep mod", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - start, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    repeats = parser.parse_args().repeats
    print(f"load average before: {os.getloadavg()[0]:.1f}")
    times = {name: [] for name in COMMANDS}
    for _ in range(repeats):  # interleaved, so a burst of load touches every command alike
        for name, args in COMMANDS.items():
            times[name].append(timed(args))
    base = statistics.median(cpu for _, cpu in times["--help"])
    for name, runs in times.items():
        wall, cpu = statistics.median(w for w, _ in runs), statistics.median(c for _, c in runs)
        print(f"{name:>20}: wall {wall:5.2f} s, CPU {cpu:5.2f} s ({cpu / base:4.1f}x --help's CPU)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
