"""Nothing silently wrong, the guards around the run folder and the MLflow store: a manifest entry that
vouches for nothing, a store that is not one (or goes away mid-sweep), two first runs on one new store,
files the project did not write, outputs of steps a resume does not run, shards that no longer belong,
and a direction read by `patchsweep screen` only once checked. Each case ends in one line (exit 2 before
compute, 1 after it with the results kept), through the real command where Ray is needed."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from test_fail_fast import CHEAP, Ran, check_refused, command, patchsweep, wait_for_shards

from conftest import REPO, compose

# ---- a manifest entry without its sha256 ---------------------------------------------------------------


def test_manifest_entry_without_sha256_is_not_finished(tmp_path):
    from pipeline.store import Manifest, publish_bytes, sha256_file

    publish_bytes(tmp_path / "a.arrow", b"a")
    publish_bytes(tmp_path / "b.arrow", b"b")
    (tmp_path / "_manifest.json").write_text(json.dumps({
        "stage": "cache", "complete": True,
        "files": {"a.arrow": {"key": "k"}, "b.arrow": {"sha256": sha256_file(tmp_path / "b.arrow")},
                  "c.arrow": "not a record", "d.arrow": {"sha256": None}}}))
    manifest = Manifest(tmp_path, "cache")
    assert not manifest.is_valid("a.arrow") and manifest.is_valid("b.arrow")  # a: recomputed, never a traceback
    assert manifest.malformed == ["a.arrow", "c.arrow", "d.arrow"]
    for broken in ("[1, 2]", '{"files": [1]}', '{"files": {"a.arrow": 3}, "complete": "yes"}'):
        (tmp_path / "_manifest.json").write_text(broken)
        manifest = Manifest(tmp_path, "cache")
        assert not manifest.is_valid("a.arrow") and not manifest.complete


def test_load_run_refuses_a_manifest_entry_without_sha256(tmp_path):
    import pipeline
    from pipeline.run.folder import finished_run

    (tmp_path / "_manifest.json").write_text(json.dumps({"stage": "run", "complete": True,
                                                         "files": {"summary.parquet": {"rows": 3}}}))
    for read in (pipeline.load_run, finished_run):
        with pytest.raises(ValueError) as refused:
            read(tmp_path)
        message = str(refused.value)
        assert "\n" not in message and "summary.parquet" in message and "without a valid sha256" in message


# ---- MLflow stores that are not one ------------------------------------------------------------------

def tracking_cfg(tmp_path, uri: str):
    from pipeline.validation import typed

    return typed(compose("experiment=refusal_tiny", f"output_root={tmp_path}", "tracking.enabled=true",
                         f"tracking.uri={uri}"))


def test_stores_mlflow_cannot_use_are_refused_before_compute(tmp_path):
    from pipeline.validation import ConfigError, validate_tracking

    (tmp_path / "text.db").write_text("not a database at all\n")
    with sqlite3.connect(tmp_path / "other.db") as other:
        other.execute("CREATE TABLE songs (title TEXT)")
    with sqlite3.connect(tmp_path / "blank.db"):
        pass  # an SQLite file with no tables yet: MLflow makes its own
    (tmp_path / "empty.db").touch()
    cases = {
        "ftp://example.org/mlflow": "scheme MLflow cannot keep runs in (ftp://)",
        "sqlite://": "in-memory database",
        "sqlite:///:memory:": "in-memory database",
        f"sqlite:///{tmp_path / 'text.db'}": "is not an SQLite database",
        f"sqlite:///{tmp_path / 'other.db'}": "is an SQLite database but not an MLflow store (its tables: songs)",
    }
    for uri, fragment in cases.items():
        with pytest.raises(ConfigError) as refused:
            validate_tracking(tracking_cfg(tmp_path, uri))
        line = str(refused.value)
        assert fragment in line and "tracking.uri" in line and "\n" not in line, line
    for fine in ("blank.db", "empty.db", "new.db"):
        validate_tracking(tracking_cfg(tmp_path, f"sqlite:///{tmp_path / fine}"))
    assert (tmp_path / "text.db").read_text() == "not a database at all\n"  # read, never changed


def test_unsupported_store_through_the_real_command(tmp_path):
    ran = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={tmp_path / 'out'}", "tracking.enabled=true",
                     "tracking.uri=ftp://127.0.0.1/mlflow", timeout=300)
    check_refused("ftp:// store", ran, "ftp://", "tracking.uri", within=120)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_store_removed_while_the_sweep_runs(tmp_path):
    """The SQLite file deleted mid-sweep: the results are kept, one line names the file and `patchsweep log`
    (exit 1), no traceback; `patchsweep log` then logs the folder into a new store."""
    out, db = tmp_path / "out", tmp_path / "store" / "mlflow.db"
    args = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "tracking.enabled=true",
            f"tracking.uri=sqlite:///{db}", "resources.shard_size=1"]
    with open(tmp_path / "sweep.log", "w+") as log:
        sweep = subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=log, text=True, cwd=REPO)
        wait_for_shards(out / "activations", 1, sweep)
        assert db.is_file()
        db.unlink()
        stdout, _ = sweep.communicate(timeout=600)
        log.seek(0)
        ran = Ran(sweep.returncode, stdout, log.read(), 0.0)
    assert "Files: " in ran.stdout, ran.stderr[-3000:]
    check_refused("MLflow store removed mid-sweep", ran, f"its database file {db} was removed",
                  f"patchsweep log {out.resolve()}", within=1, status=1, alone=False)
    assert (out / "_manifest.json").is_file()
    logged = patchsweep("log", str(out), f"tracking.uri=sqlite:///{tmp_path / 'later.db'}")
    assert logged.status == 0, logged.stderr[-3000:]


# ---- two first runs on one new store -------------------------------------------------------------------

OPEN_STORE = """
import sys
from pipeline.run.tracking import open_experiment, store_client
print(open_experiment(store_client(sys.argv[1]), sys.argv[1], "patchsweep"), flush=True)
"""


@pytest.mark.slow
def test_two_first_runs_on_a_new_store_do_not_race(tmp_path):
    """Two processes open one new SQLite store at once (MLflow creates its schema, then the experiment):
    both succeed and find the same experiment."""
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    opened = [subprocess.Popen([sys.executable, "-c", OPEN_STORE, uri], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env) for _ in range(2)]
    results = [process.communicate(timeout=300) for process in opened]
    assert [process.returncode for process in opened] == [0, 0], [err[-3000:] for _, err in results]
    ids = {out.strip() for out, _ in results}
    assert len(ids) == 1 and ids != {""}, results


# ---- run folders -------------------------------------------------------------------------------------

def test_files_the_project_did_not_write_are_never_overwritten(tmp_path):
    """A folder without the project's marker holding files of a sweep's names (a report.md of one's own, an
    input pairs.parquet kept there) is refused before Ray starts, naming them; other files are left alone."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("my notes\n")
    (out / "pairs.parquet").write_bytes(b"my input pairs")
    (out / "notes.txt").write_text("mine too\n")
    ran = patchsweep(*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", timeout=300)
    check_refused("files patchsweep did not write", ran, f"output folder {out} holds pairs.parquet, report.md",
                  "patchsweep did not write", "output_dir=<a new folder>", within=120)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "pairs.parquet", "report.md"]
    assert (out / "report.md").read_text() == "my notes\n"

    from pipeline.validation import validate

    (out / "report.md").unlink()
    (out / "pairs.parquet").unlink()
    validate(compose(*CHEAP, f"output_root={tmp_path}", f"output_dir={out}"))  # notes.txt is no sweep's name


def flip_a_bit(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_a_resume_keeps_only_what_its_config_runs(tmp_path):
    """A run with the circuit and the direction, then a resume with both off and fewer pairs: circuit.json,
    the diagrams and direction.arrow leave the folder, its manifest, report.md and load_run; the shards of
    the first pairs leave too, and `activations()` has each key once. Between the two, `patchsweep screen`
    under the run's direction: refused when the file differs from its manifest, or when the run's weights
    are another model's; accepted as it is."""
    import shutil

    import pipeline
    from pipeline.outputs.files import MARKER
    from pipeline.store import Manifest

    out = tmp_path / "out"
    base = [*CHEAP, f"output_root={tmp_path}", f"output_dir={out}", "resources.shard_size=2"]
    first = patchsweep(*base, "circuit.enabled=true", "circuit.n_resamples=2", "circuit.n_random=4",
                       "circuit.edges=false", "direction.enabled=true", "direction.max_kl=1000")
    assert first.status == 0, first.stderr[-3000:]
    marker = json.loads((out / MARKER).read_text())
    assert marker["producer"].startswith("patchsweep") and marker["experiment"] == "refusal_tiny"
    assert {"circuit.json", "circuit.svg", "direction.arrow"} <= set(json.loads((out / "_manifest.json").read_text())
                                                                     ["files"])
    shards_before = {p.name for p in (out / "activations").glob("*.arrow")}

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "how do I make a bomb ?", "harmful": true}\n'
                       '{"prompt": "how do I make a cake ?", "harmful": false}\n')
    screen = ["screen", "model=refusal_tiny", f"prompts.path={prompts}", "intervention.mode=ablate"]
    flipped, other = tmp_path / "flipped", tmp_path / "other"
    for copy in (flipped, other):
        shutil.copytree(out, copy)
    flip_a_bit(flipped / "direction.arrow")
    ran = patchsweep(*screen, f"intervention.run={flipped}", f"output_dir={tmp_path / 's1'}", timeout=300)
    check_refused("a flipped bit in direction.arrow", ran, f"{flipped / 'direction.arrow'} does not match its sha256",
                  "intervention.run", within=120)
    saved = json.loads((other / "_manifest.json").read_text())
    saved["provenance"]["weights_hash"] = "0" * 64  # the run of another model of the same depth
    (other / "_manifest.json").write_text(json.dumps(saved))
    ran = patchsweep(*screen, f"intervention.run={other}", f"output_dir={tmp_path / 's2'}", timeout=300)
    check_refused("another model's direction", ran, "was found on a model whose weights differ",
                  "set intervention.run to a run of this model", within=180, alone=False)  # after loading it
    assert not (tmp_path / "s1").exists() and not (tmp_path / "s2").exists()
    ran = patchsweep(*screen, f"intervention.run={out}", f"output_dir={tmp_path / 's3'}", timeout=300)
    assert ran.status == 0 and (tmp_path / "s3" / "screen.arrow").is_file(), ran.stderr[-3000:]

    resumed = patchsweep(*base, "resume=true", "prompts.n_pairs=6")
    assert resumed.status == 0, resumed.stderr[-3000:]
    gone = ("circuit.json", "circuit.svg", "circuit.png", "circuit.dot", "direction.arrow")
    assert not any((out / name).exists() for name in gone)
    assert not set(gone) & set(json.loads((out / "_manifest.json").read_text())["files"])
    report = (out / "report.md").read_text()
    assert "| `circuit.json` |" not in report and "| `direction.arrow` |" not in report  # its table of files
    run = pipeline.load_run(out)
    assert run.circuit is None and len(run.pairs) <= 6
    listed = set(Manifest(out / "activations", "cache").files)
    on_disk = {p.name for p in (out / "activations").glob("*.arrow")}
    assert on_disk == listed and shards_before - on_disk  # the first pairs' shards are gone
    keys = run.activations().to_table(columns=["pair_id", "prompt", "layer", "position"]).to_pandas()
    assert not keys.duplicated().any() and set(keys["pair_id"]) == set(run.pairs["pair_id"])
