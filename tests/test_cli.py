"""The command line itself, through the real command: what Hydra cannot compose is refused in one line
naming the key (exit status 2), `--version` and `log --help` answer, and `--help` and tab completion
answer without importing torch, Ray, MLflow or transformers."""
from __future__ import annotations

import subprocess
import sys

import pytest

import pipeline
from conftest import REPO

HEAVY = ("torch", "ray", "mlflow", "transformers", "scipy", "pandas")


def patchsweep(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=120, env=env)


def in_process(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """`pipeline.cli.main` with these arguments in this process: (exit status, stdout, stderr)."""
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["patchsweep", *args])
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    captured = capsys.readouterr()
    return exit_.value.code, captured.out, captured.err


@pytest.mark.parametrize("args, fragments", [
    (["modle=refusal_tiny"], ("unknown key 'modle'", "spelling")),
    (["patching.layerz=[0]"], ("unknown key 'patching.layerz'",)),
    (["patching.layers=abc"], ("patching.layers=abc", "give patching.layers a value of its type")),
    (["resources.actors=two"], ("resources.actors=two", "could not be converted to Integer")),
    (["model=no_such_model"], ("no option 'no_such_model' in the config group 'model'", "refusal_tiny")),
    (["patching.layers=[0"], ("cannot read the override 'patching.layers=[0'", "key=[a,b]")),
    (["--multirun", "model=refusal_tiny,no_such_model"], ("no option 'no_such_model'",)),
    (["screen", "modle=refusal_tiny"], ("unknown key 'modle'",)),
])
def test_what_hydra_cannot_compose_is_one_line(monkeypatch, capsys, args, fragments):
    status, out, err = in_process(monkeypatch, capsys, *args)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("patchsweep: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in err and out == ""


def test_version(monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["patchsweep", "--version"])
    cli.main()
    assert capsys.readouterr().out.strip() == f"patchsweep {pipeline.__version__}"


def test_log_help_and_usage(monkeypatch, capsys):
    from pipeline import cli

    monkeypatch.setattr(sys, "argv", ["patchsweep", "log", "--help"])
    cli.main()
    assert capsys.readouterr().out.startswith("usage: patchsweep log <run folder>")
    status, _, err = in_process(monkeypatch, capsys, "log")
    assert status == 2 and err.startswith("patchsweep: error: patchsweep log needs a run folder")


def test_help_lists_every_command():
    out = patchsweep("--help").stdout
    for usage in ("patchsweep [--multirun]", "patchsweep screen model=", "patchsweep log <run folder>", "--version"):
        assert usage in out, usage


@pytest.mark.parametrize("args", [["--help"], ["screen", "--help"], ["--shell-completion", "query=bash"]])
def test_help_and_completion_import_no_heavy_library(args):
    """What `patchsweep --help` (and the shell's tab completion, which runs the command) imports: Hydra and
    the config, none of the libraries a sweep needs."""
    code = (f"import sys; sys.argv = ['patchsweep', *{args!r}]\n"
            "from pipeline.cli import main\n"
            "try:\n    main()\nexcept SystemExit:\n    pass\n"
            f"print('HEAVY', sorted(m for m in {HEAVY!r} if m in sys.modules), file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120,
                            env={"PATH": "/usr/bin:/bin", "COMP_LINE": "patchsweep mod", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "HEAVY []" in result.stderr, result.stderr[-2000:]
    if "--shell-completion" in args:
        assert "model=" in result.stdout.split()  # the completion Hydra offers for "mod"
    else:
        assert result.stdout.startswith("patchsweep: activation-patching sweeps")
