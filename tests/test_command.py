"""The command's own help: what patchsweep does, its subcommands, main keys and examples, then the
config groups and the full config (Hydra's placeholders filled in)."""
import subprocess
import sys

import pytest

from conftest import REPO


@pytest.mark.parametrize("args", [["--help"], ["screen", "--help"]])
def test_help(args):
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert out.startswith("patchsweep: activation-patching sweeps")
    assert "patchsweep screen model=<name> prompts.path=<file>" in out and "patchsweep --multirun" in out
    for key in ("model.path", "prompts.path", "patching.components", "ray.address", "tracking.uri"):
        assert f"\n  {key}" in out, key
    assert "experiment: refusal_smol, refusal_tiny" in out  # the groups, from conf/
    assert "trust_remote_code: false" in out  # the full config
    assert "$APP_CONFIG_GROUPS" not in out and "$CONFIG" not in out and "powered by Hydra" not in out
