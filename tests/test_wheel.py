"""The built package works without the repository: conf/ ships inside the wheel (as pipeline/conf),
so `pip install` of the wheel into a fresh virtualenv runs a sweep from any folder."""
import fnmatch
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

from conftest import REPO

TORCH = "torch==2.13.0"  # a CPU build on local disk here, as the Makefile installs it


def test_package_list_covers_every_folder():
    """pyproject.toml lists the packages (a find directive cannot be combined with the conf/ mapping):
    every folder of pipeline/ and conf/ that holds files must be in the list, and nothing else."""
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    data_folders = {f"{package}.{Path(pattern).parent}" for package, patterns in setuptools["package-data"].items()
                    if package != "*" for pattern in patterns}  # e.g. ...adapter.checkpoints/*
    tracked = subprocess.run(["git", "ls-files", "pipeline", "conf"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    folders = {str(Path(f).parent) for f in tracked if "__pycache__" not in f}
    expected = {"pipeline.conf" + folder[len("conf"):].replace("/", ".") if folder.startswith("conf")
                else folder.replace("/", ".") for folder in folders}
    expected = {folder for folder in expected
                if not any(fnmatch.fnmatch(folder.replace(".", "/"), data.replace(".", "/")) for data in data_folders)}
    assert listed == expected


@pytest.mark.slow
def test_wheel_installs_and_runs_from_another_folder(tmp_path):
    """Build the wheel from the tracked files, install it (and its dependencies) into a fresh virtualenv,
    run `patchsweep experiment=refusal_tiny` from an unrelated folder."""
    source = tmp_path / "source"
    source.mkdir()
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                           text=True, check=True).stdout.splitlines()
    subprocess.run(["tar", "-cf", str(tmp_path / "src.tar"), "--", *[f for f in files if (REPO / f).exists()]],
                   cwd=REPO, check=True)
    subprocess.run(["tar", "-xf", str(tmp_path / "src.tar"), "-C", str(source)], check=True)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, TORCH], check=True, timeout=600)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "dist"),
                    str(source)], check=True, timeout=600)
    [wheel] = (tmp_path / "dist").glob("patchsweep-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "pipeline/conf/config.yaml" in names and "pipeline/conf/experiment/refusal_tiny.yaml" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("conf/", "tests/")) for n in names)
    subprocess.run([*pip, str(wheel)], check=True, timeout=900)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # The installed package only: the repository is not on the path and not the working folder.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([str(venv / "bin" / "patchsweep"), "experiment=refusal_tiny", "output_root=out"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    run_dir = elsewhere / "out" / "refusal_tiny" / "refusal-tiny-generated"
    assert str(run_dir) in result.stdout
    for name in ("report.md", "circuit.json", "effects.parquet", "run.log", "_manifest.json"):
        assert (run_dir / name).is_file(), name
    assert (elsewhere / "out" / "mlflow.db").is_file() and not (elsewhere / "mlruns").exists()
    shown = subprocess.run([str(venv / "bin" / "patchsweep"), "--help"], cwd=elsewhere, env=env, capture_output=True,
                           text=True, timeout=120)
    assert shown.returncode == 0 and "experiment: refusal_smol, refusal_tiny" in shown.stdout
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import pipeline.config as c; print(c.CONF_DIR)"],
                           cwd=elsewhere, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)) and where.endswith("pipeline/conf")
