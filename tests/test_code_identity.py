"""A checkout whose code changed, run again into the same folder, through the real command: the results
that code computes are computed again (the run says so, naming the stage and the file), and the manifests
record the new code; an unchanged checkout reuses everything."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.store import PACKAGE, code_identity

ORGANISMS = PACKAGE / "organisms"


def _copy_checkout(to: Path) -> Path:
    """pipeline/ and conf/ of this checkout (refusal-tiny's weights included; the other organisms' large files
    and bytecode left out): a checkout of its own, which the test may edit."""

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {"__pycache__"}
        if Path(folder).resolve() == (ORGANISMS / "smollm2_refusal").resolve():
            skipped |= {name for name in names if not name.endswith(".py") and name != "MODEL_CARD.md"}
        return skipped & set(names) | {name for name in names if name.endswith(".pyc")}

    shutil.copytree(PACKAGE, to / "pipeline", ignore=ignore)
    shutil.copytree(PACKAGE.parent / "conf", to / "conf")
    return to


def _run(checkout: Path, output_dir: Path) -> str:
    """`python -m pipeline experiment=refusal_tiny ...` in `checkout`, on its own code; its output."""
    env = {**os.environ, "PYTHONPATH": str(checkout), "RAY_USAGE_STATS_ENABLED": "0"}
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment=refusal_tiny", "circuit.enabled=false",
                             f"output_dir={output_dir}", "tracking.enabled=false"],
                            capture_output=True, text=True, cwd=checkout, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _patch_codes(output_dir: Path) -> set[str]:
    manifest = json.loads((output_dir / "effects" / "_manifest.json").read_text())
    return {entry["code"] for entry in manifest["files"].values()}


@pytest.mark.slow
def test_an_edited_engine_recomputes_the_patches_and_says_so(tmp_path):
    checkout, output_dir = _copy_checkout(tmp_path / "checkout"), tmp_path / "run"
    first = _run(checkout, output_dir)
    assert "changed since this folder's results" not in first
    before = code_identity("pipeline.stages.patch", checkout / "pipeline")
    assert _patch_codes(output_dir) == {before}

    same = _run(checkout, output_dir)
    assert "changed since" not in same
    assert "patch 0 computed" in same and "cache 0 computed" in same

    with open(checkout / "pipeline" / "engine" / "patching.py", "a") as f:
        f.write("\nEDITED = True\n")
    code_identity.cache_clear()
    after = code_identity("pipeline.stages.patch", checkout / "pipeline")
    assert after != before
    edited = _run(checkout, output_dir)
    line = ("patch: the code that computes it changed since this folder's results (pipeline/engine/patching.py): "
            "recomputing")
    assert line in edited and line in (output_dir / "run.log").read_text()
    assert "cache 0 computed" in edited and "patch 0 computed" not in edited  # the cache's code did not change
    assert "cache: the code" not in edited
    assert _patch_codes(output_dir) == {after}
    manifest = json.loads((output_dir / "effects" / "_manifest.json").read_text())
    assert set(manifest["code"]) == {after}
