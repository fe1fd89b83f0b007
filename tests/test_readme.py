"""The README's Python examples run as written: every ```python block, in order, in one fresh interpreter
whose working folder holds `outputs/` (the session's refusal_tiny run)."""
import os
import re
import subprocess
import sys

from conftest import REPO

RUNNER = """
import re, sys, traceback
blocks = re.findall(r"^```python\\n(.*?)^```", open(sys.argv[1]).read(), flags=re.S | re.M)
print(f"{len(blocks)} blocks")
namespace = {}
for i, block in enumerate(blocks, 1):
    try:
        exec(compile(block, f"README python block {i}", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"README python block {i} failed")
"""


def test_readme_python_blocks_run(tiny_sweep, tmp_path):
    blocks = re.findall(r"^```python\n(.*?)^```", (REPO / "README.md").read_text(), flags=re.S | re.M)
    assert len(blocks) >= 3  # the tree readers, load_run, the engine
    (tmp_path / "outputs").symlink_to(tiny_sweep["root"])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", RUNNER, str(REPO / "README.md")], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    assert f"{len(blocks)} blocks" in result.stdout
