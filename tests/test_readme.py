"""The documentation's Python examples run as written: every ```python block of a document, in order, in one
fresh interpreter whose working folder holds `outputs/` laid out as `make run` lays it out (the default
experiment's run folder, here holding the session's refusal_tiny run, and the MLflow store's copies of its
files beside it). The README holds the user's examples (the outputs tree's tables, `load_run`);
docs/design.md the engine used from a notebook."""
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from conftest import REPO, compose

RUNNER = """
import re, sys, traceback
blocks = re.findall(r"^```python\\n(.*?)^```", open(sys.argv[1]).read(), flags=re.S | re.M)
print(f"{len(blocks)} blocks")
namespace = {}
for i, block in enumerate(blocks, 1):
    try:
        exec(compile(block, f"{sys.argv[1]} python block {i}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"{sys.argv[1]} python block {i} failed")
"""

# Each document and the examples it must hold (a document that lost its examples fails here, not silently).
DOCUMENTS = {"README.md": ["load_run(", "load_runs(", "duckdb"], "docs/design.md": ["pipeline.engine.patching"]}


def default_run_layout(tiny_sweep, folder: Path) -> Path:
    """`folder`/outputs as `make run` (`patchsweep`, no overrides) leaves it: the run folder at the default
    config's output_dir, and the MLflow store's artifact copies under mlartifacts/. Returns the run folder."""
    run_dir = folder / OmegaConf.select(compose(), "output_dir")
    shutil.copytree(tiny_sweep["outcome"].run_dir, run_dir)
    shutil.copytree(tiny_sweep["root"] / "mlartifacts", folder / "outputs" / "mlartifacts")
    return run_dir


@pytest.mark.parametrize("document", DOCUMENTS)
def test_python_blocks_run(document, tiny_sweep, tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / document).read_text(), flags=re.S | re.M)
    for needle in DOCUMENTS[document]:
        assert any(needle in block for block in blocks), f"{document} has no python example using {needle}"
    run_dir = default_run_layout(tiny_sweep, tmp_path)
    if document == "README.md":  # the folder its load_run example opens is the one `make run` writes
        assert f'load_run("{run_dir.relative_to(tmp_path)}")' in "".join(blocks)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(REPO / document)], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"{len(blocks)} blocks" in result.stdout


def headings(page) -> set[str]:
    """The anchors a Markdown page's headings get (GitHub's rule: lower case, punctuation dropped, - for space)."""
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
            for h in re.findall(r"^#+ (.*)$", page.read_text(), re.M)}


def test_readme_is_a_short_guide_and_its_links_resolve():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    for doc in ("docs/findings.md", "docs/performance.md", "docs/statistics.md", "docs/design.md"):
        assert f"]({doc}" in readme, f"README does not link {doc}"
    for page in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]+))?\)", page.read_text()):
            if target.startswith("http"):
                continue
            linked = page.parent / target if target else page
            assert linked.exists(), f"{page.name} links to a missing {target}"
            assert not anchor or anchor in headings(linked), \
                f"{page.name} links to a missing #{anchor} in {linked.name}"
