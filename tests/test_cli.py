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
