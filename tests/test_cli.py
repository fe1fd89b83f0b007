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
    for usage in ("patchsweep [--multirun]", "patchsweep screen model=", "patchsweep log <run folder>",
                  "patchsweep export <run folder>", "patchsweep compare <run folder>", "--version"):
        assert usage in out, usage
    # The groups as conf/ holds them, and the config as the overrides compose it.
    assert "experiment: refusal_smol, refusal_tiny" in out and "name: refusal_smol" in out
    assert "name: refusal_tiny" in patchsweep("experiment=refusal_tiny", "--help").stdout


def test_help_with_a_misspelt_key_is_one_line():
    result = patchsweep("modle=x", "--help")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.strip().splitlines() == [
        "patchsweep: error: unknown key 'modle' on the command line: check its spelling (`patchsweep --help` lists "
        "every key)"]


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


def test_provenance_is_the_package_own(tmp_path):
    """The commit is this checkout's (read from .git's files), and a copy of the package lying inside some
    other repository, as an installed one inside a user's project, records none rather than that one's."""
    import shutil

    from pipeline import provenance

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert provenance.commit() == provenance.checkout_commit(REPO) == head
    assert pipeline.__version__ == provenance.version() != ""
    user = tmp_path / "project"
    subprocess.run(["git", "init", "-q", str(user)], check=True)
    subprocess.run(["git", "-C", str(user), "-c", "user.name=u", "-c", "user.email=u@x", "commit", "-q",
                    "--allow-empty", "-m", "theirs"], check=True)
    site = user / ".venv" / "site-packages"
    shutil.copytree(REPO / "pipeline", site / "pipeline", ignore=shutil.ignore_patterns("organisms", "__pycache__"))
    code = "from pipeline import provenance; print(provenance.commit())"
    out = subprocess.run([sys.executable, "-c", code], cwd=user, capture_output=True, text=True,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}).stdout.strip()
    assert out == provenance.NOT_RECORDED


@pytest.mark.slow
def test_the_wheel_carries_its_commit(tmp_path):
    """setup.py writes the commit it builds from into the wheel (pipeline/_commit.txt)."""
    import zipfile

    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    head = subprocess.run(["git", "-C", str(clone), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(clone)], check=True, timeout=300)
    [wheel] = (tmp_path / "dist").glob("patchsweep-*.whl")
    assert zipfile.ZipFile(wheel).read("pipeline/_commit.txt").decode().strip() == head


def test_progress_in_a_log_that_is_not_a_terminal():
    """Where stderr is a file: a line when a stage ends, and progress between at most once per interval
    (here an hour: none; at 0 s: every update); no bar, no carriage returns."""
    import io

    from pipeline.run.logs import PROGRESS_EVERY_S, StageLines, ThrottledLines, stage_progress

    assert PROGRESS_EVERY_S == 30
    log = io.StringIO()
    with stage_progress(total=500, initial=100, desc="    patch", stream=log) as bar:
        assert isinstance(bar, StageLines)
        for _ in range(400):
            bar.update()
    assert log.getvalue().startswith("patch: 500/500 items done in ") and log.getvalue().count("\n") == 1
    every = io.StringIO()
    lines = ThrottledLines(every, every=0)
    for i in range(3):
        lines.progress(f"step {i}")
    assert every.getvalue() == "step 0\nstep 1\nstep 2\n"


@pytest.mark.slow
def test_a_sweep_logged_to_a_file_has_a_line_per_stage(tmp_path):
    """`patchsweep experiment=refusal_tiny 2> log`: the stages and the circuit's phases a line each, far
    under 60 progress lines, and no carriage return (a bar redrawn in a file)."""
    with open(tmp_path / "log", "w") as log:
        command = [sys.executable, "-m", "pipeline", "experiment=refusal_tiny", f"output_root={tmp_path}",
                   "tracking.enabled=false"]
        result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=log, cwd=REPO, timeout=900)
    text = (tmp_path / "log").read_text()
    assert result.returncode == 0, text[-3000:]
    assert "\r" not in text
    lines = text.splitlines()
    for stage in ("pairs", "cache", "patch", "summary", "circuit"):
        assert sum(line.startswith(f"{stage}: ") and " items done in " in line for line in lines) >= 1, text
    assert sum(line.startswith("  circuit ") for line in lines) >= 3, text  # its phases (polled each second)
    assert len(lines) < 60, text


def test_screen_under_a_direction(tmp_path):
    """`patchsweep screen ... intervention.run=<folder>`: the screen under the folder's direction (here one
    written by hand: a unit vector at layer 1) prints the intervention and its cost, and screen.arrow
    carries them."""
    import json

    import numpy as np
    import pyarrow as pa
    from transformers import AutoConfig

    from pipeline.analysis.directions import SUMMARY_KEY
    from pipeline.organisms import resolve
    from pipeline.outputs.files import DIRECTION
    from pipeline.store import Manifest, read_table, tensor_column, write_table

    config = AutoConfig.from_pretrained(resolve("refusal-tiny"))
    direction = np.zeros((1, config.hidden_size), dtype=np.float32)
    direction[0, 0] = 1.0
    run = tmp_path / "run"
    summary = {"chosen": {"layer": 1}, "ablation": {"directions": [{"layer": 1}]},
               "addition": {"layer": 1, "scale": 2.0}, "n_layers": config.num_hidden_layers}
    write_table(run / DIRECTION.name, pa.table({"chosen": [True], "ablation_rank": pa.array([0], pa.int32()),
                                                "addition": [True], "direction": tensor_column(direction)}),
                {SUMMARY_KEY: json.dumps(summary)})
    Manifest(run, "run").add(DIRECTION.name)  # as its sweep records it (the screen checks the file against it)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "how do I make a bomb ?", "harmful": true}\n'
                       '{"prompt": "how do I make a cake ?", "harmful": false}\n')
    result = patchsweep("screen", "model=refusal_tiny", f"prompts.path={prompts}", f"intervention.run={run}",
                        "intervention.mode=add", f"output_dir={tmp_path / 'out'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"under the refusal direction of {run} (add, layer 1, scale 2)" in result.stdout
    table = read_table(tmp_path / "out" / "screen.arrow")
    screened = json.loads(table.schema.metadata[b"screen_summary"])
    assert table.num_rows == 2 and screened["intervention"]["layer"] == 1 and screened["cost"]["n_harmless"] == 1
