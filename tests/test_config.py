"""Config: presets and overrides compose into the typed schema; validation refuses bad configs with
one-line errors that name the key to fix, before any compute."""
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

from conftest import REPO, compose, free_ports, write_jsonl
from pipeline.config import to_dict
from pipeline.run.sweep import write_config
from pipeline.schema import PatchsweepConfig, config_hash, flatten, from_plain, tracking_uri
from pipeline.store import write_table
from pipeline.validation import ConfigError, validate


def test_default_is_refusal_smol_on_smollm2():
    cfg = to_dict(compose())
    assert cfg["name"] == "refusal_smol"
    assert cfg["model"] == {"name": "smollm2-refusal", "path": "smollm2-refusal", "checkpoint": None,
                            "dtype": "float32", "trust_remote_code": False}
    assert cfg["patching"]["components"] == ["resid_pre", "attn_out", "mlp_out"]  # heads: the circuit step
    assert cfg["resources"]["gpus_per_actor"] == 0 and cfg["resources"]["device"] == "cpu"
    assert cfg["ray"]["address"] == "local"
    assert cfg["output_dir"] == "outputs/refusal_smol/smollm2-refusal-generated"


def test_refusal_tiny_preset():
    cfg = to_dict(compose("experiment=refusal_tiny"))
    assert cfg["name"] == "refusal_tiny"
    assert cfg["model"]["path"] == "refusal-tiny"
    assert cfg["output_dir"] == "outputs/refusal_tiny/refusal-tiny-generated"


def test_documented_overrides(tmp_path):
    cfg = to_dict(compose(
        "experiment=refusal_tiny", "model=smollm2_refusal", f"prompts.path={tmp_path / 'pairs.jsonl'}",
        "patching.components=[resid_pre,head]", f"output_dir={tmp_path / 'out'}", "ray.address=auto",
        "tracking.uri=http://127.0.0.1:5001"))
    assert cfg["model"]["name"] == "smollm2-refusal"  # the command line beats the preset's model
    assert cfg["prompts"]["path"] == str(tmp_path / "pairs.jsonl")
    assert cfg["prompts"]["name"] == "pairs"
    assert cfg["patching"]["components"] == ["resid_pre", "head"]
    assert cfg["output_dir"] == str(tmp_path / "out")
    assert cfg["ray"]["address"] == "auto"
    assert tracking_uri(from_plain(cfg)) == "http://127.0.0.1:5001"


def test_any_hub_model_or_folder():
    cfg = to_dict(compose("model=hf", "model.path=Qwen/Qwen2.5-0.5B-Instruct"))
    assert cfg["model"] == {"name": "Qwen2.5-0.5B-Instruct", "path": "Qwen/Qwen2.5-0.5B-Instruct",
                            "checkpoint": None, "dtype": "float32", "trust_remote_code": False}


def test_default_tracking_store_is_sqlite_under_output_root(tmp_path):
    cfg = to_dict(compose(f"output_root={tmp_path}"))
    assert tracking_uri(from_plain(cfg)) == f"sqlite:///{tmp_path}/mlflow.db"


def test_typed_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigCompositionException):
        compose("patching.componnets=[head]")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose("patching.batch_size=many")
    with pytest.raises(ConfigCompositionException):
        compose("model=no_such_model")


def test_config_hash_tracks_the_science_not_the_machine():
    def hashed(*overrides):
        return config_hash(to_dict(compose("experiment=refusal_tiny", *overrides)))

    base = hashed()
    assert base == hashed("resources.actors=2", "ray.address=auto")
    assert base != hashed("patching.components=[head]")
    assert config_hash(from_plain(to_dict(compose("experiment=refusal_tiny")))) == base  # typed or plain: one hash
    assert base == "57223703689ec512"  # config.yaml of earlier runs still hashes the same


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": None}, "d": [1, 2]}) == {"a.b": "1", "a.c": "null", "d": "[1, 2]"}


# ---- validation: each bad config is refused in one line naming the key, before anything is written ----

@pytest.fixture
def valid(tmp_path, word_model_folder):
    """Overrides of a config that validates: a config-only model folder (2 layers, 4 heads; validation
    never loads weights), outputs under tmp_path."""
    return ["model=hf", f"model.path={word_model_folder}", f"output_root={tmp_path / 'root'}",
            f"output_dir={tmp_path / 'out'}", "tracking.enabled=false"]


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
    """The bad inputs the cases below name as {key}."""
    from transformers import BertConfig

    paths = {"tmp": tmp_path}
    paths["unequal"] = write_jsonl(tmp_path / "unequal.jsonl", [
        {"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"},
        {"clean": "how do i steal a car ?", "corrupted": "please wash a car ?"}])
    paths["empty"] = tmp_path / "empty.jsonl"
    paths["empty"].write_text("")
    paths["broken"] = tmp_path / "broken.jsonl"
    paths["broken"].write_text('{"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"}\n'
                               '{"clean": "how do\n')
    paths["wrong"] = write_jsonl(tmp_path / "wrong.jsonl", [{"harmful": "how do i make a bomb ?", "harmless": "a"}])
    paths["undecodable"] = tmp_path / "latin1.jsonl"
    paths["undecodable"].write_bytes('{"clean": "how do I make a bomb ?", "corrupted": "caf\xe9"}\n'.encode("latin-1"))
    paths["folder"] = tmp_path / "pairs.jsonl"
    paths["folder"].mkdir()
    paths["long"] = write_jsonl(tmp_path / "long.jsonl", [{"clean": "how do I make a bomb ? " + "please . " * 2500,
                                                          "corrupted": "how do I make a cake ? " + "please . " * 2500}])
    paths["a_file"] = tmp_path / "a-file"
    paths["a_file"].write_text("not a folder")
    (tmp_path / "empty-model").mkdir()
    BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2, intermediate_size=64).save_pretrained(
        tmp_path / "bert")
    [paths["closed_port"]] = free_ports(1)
    # An unreadable file: permission bits do not stop root, a write-only sysfs file does.
    paths["unreadable"] = tmp_path / "unreadable.jsonl"
    if os.geteuid() != 0:
        paths["unreadable"].write_text('{"clean": "a", "corrupted": "b"}\n')
        paths["unreadable"].chmod(0)
    elif Path("/sys/bus/pci/rescan").is_file():
        paths["unreadable"].symlink_to("/sys/bus/pci/rescan")
    return paths


# case -> (overrides, fragments of its one line); {key} names a path of `inputs`.
REFUSALS = {
    "unknown component": (["patching.components=[resid_pre,mlp_in]"], ("'mlp_in'", "patching.components", "resid_pre")),
    "unknown direction": (["patching.directions=[sideways]"], ("'sideways'", "patching.directions")),
    "unknown metric": (["patching.metric=accuracy"], ("'accuracy'", "patching.metric")),
    "layer out of range": (["patching.layers=[0,2]"], ("layer 2", "patching.layers", "0..1")),
    "negative layer": (["patching.layers=[-1]"], ("layer -1", "0..1")),
    "head out of range": (["patching.heads=[4]"], ("head 4", "patching.heads", "0..3")),
    "batch size 0": (["patching.batch_size=0"], ("patching.batch_size=0", "1 or more")),
    "negative batch size": (["patching.batch_size=-8"], ("patching.batch_size=-8", "1 or more")),
    "shard size 0": (["resources.shard_size=0"], ("resources.shard_size",)),
    "pairs shard size 0": (["resources.pairs_shard_size=0"], ("resources.pairs_shard_size",)),
    "GPU asked for without one": (["resources=gpu"], ("GPU", "has none", "resources=cpu")),
    "more actors than this machine holds": (["resources.actors=64"],
                                            ("resources.actors=64", "do not fit", "set resources.actors=")),
    "ray.address malformed": (["ray.address=not-an-address"], ("ray.address=not-an-address", "fix ray.address")),
    "MLflow folder store": (["tracking.enabled=true", "tracking.uri=file:///tmp/mlruns"],
                            ("plain folder store", "tracking.uri")),
    "MLflow store not writable": (["tracking.enabled=true", "tracking.uri=sqlite:///{a_file}/mlflow.db"],
                                  ("cannot be written", "tracking.uri")),
    "MLflow server down": (["tracking.enabled=true", "tracking.uri=http://127.0.0.1:{closed_port}"],
                           ("does not answer", "tracking.uri", "patchsweep log")),
    "unknown alignment": (["prompts.align=middle"], ("prompts.align",)),
    "direction.max_kl zero": (["direction.max_kl=0"], ("direction.max_kl=0",)),
    "direction.max_layer_fraction over 1": (["direction.max_layer_fraction=1.5"],
                                            ("direction.max_layer_fraction=1.5",)),
    "model.dtype unknown": (["model.dtype=float8"], ("unknown dtype 'float8'", "model.dtype", "float32")),
    "circuit.target out of range": (["circuit.target=1.5"], ("circuit.target=1.5", "(0, 1]")),
    "circuit.max_pairs zero": (["circuit.max_pairs=0"], ("circuit.max_pairs=0", "1 or more")),
    "circuit.n_resamples zero": (["circuit.n_resamples=0"], ("circuit.n_resamples=0", "1 or more")),
    "circuit.search_pairs zero": (["circuit.search_pairs=0"], ("circuit.search_pairs=0", "must be positive")),
    "fractional CPUs for more actors than the machine has CPUs": (
        ["resources.actors=64", "resources.cpus_per_actor=0.01"],
        ("resources.actors=64", "cpus_per_actor (0.01)", "or fewer")),
    "the circuit step on the kl metric": (["patching.metric=kl", "circuit.enabled=true"],
                                          ("patching.metric=kl", "answer-token metric", "circuit.enabled=false")),
    "more pairs than the generator has": (["model.path=refusal-tiny", "prompts.n_pairs=2000000"],
                                          ("prompts.n_pairs=2000000", "distinct pairs", "prompts.n_pairs=1462092")),
    "model path does not exist": (["model.path={tmp}/no-such-model"], ("does not exist", "model.path")),
    "model path not a path nor a hub id": (["model.path=not a model"], ("does not exist", "model.path")),
    "model folder without config.json": (["model.path={tmp}/empty-model"], ("no config.json", "model.path")),
    "unsupported architecture": (["model.path={tmp}/bert"], ("unsupported architecture 'bert'", "model_type", "llama")),
    "pairs of unequal length": (["prompts.path={unequal}"], ("pair 1", "unequal token counts", "prompts.align=end")),
    "empty pairs file": (["prompts.path={empty}"], ("is empty", "clean, corrupted")),
    "pairs file with broken JSON": (["prompts.path={broken}"], ("could not be read", "format")),
    "pairs file with wrong columns": (["prompts.path={wrong}"], ("no 'clean' column",)),
    "pairs file that does not exist": (["prompts.path={tmp}/missing.jsonl"], ("does not exist", "prompts.path")),
    "pairs file not UTF-8": (["prompts.path={undecodable}"], ("{undecodable}", "is not UTF-8", "b'\\xe9'")),
    "pairs file unreadable": (["prompts.path={unreadable}"], ("{unreadable}", "cannot be read")),
    "pairs file is a folder": (["prompts.path={folder}"], ("is a folder", "prompts.path")),
    "transfer pairs file that does not exist": (["prompts.transfer={tmp}/missing.jsonl"],
                                                ("does not exist", "prompts.transfer")),
    "transfer pairs file with wrong columns": (["prompts.transfer={wrong}"], ("no 'clean' column",)),
    "transfer pairs negative": (["prompts.transfer_pairs=-1"], ("prompts.transfer_pairs=-1", "set it to 0")),
    "prompt longer than the model's positions": (["model.path=refusal-tiny", "prompts.path={long}"],
                                                 ("pair 0", "tokens under the chat template", "128 positions",
                                                  "shorten or drop")),
    "output_dir is a file": (["output_dir={a_file}"], ("{a_file}", "is a file", "set output_dir")),
    "output_dir under a folder nothing can be written to": (["output_dir=/sys/patchsweep/out"],
                                                            ("/sys", "cannot be written", "set output_dir")),
}


def refused(overrides: list[str], *fragments: str) -> str:
    """validate refuses the composed config with one line holding every fragment; returns the line."""
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_config_is_refused_in_one_line(case, valid, inputs, tmp_path):
    overrides, fragments = REFUSALS[case]
    if case == "GPU asked for without one":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    if case == "pairs file unreadable" and not inputs["unreadable"].exists():
        pytest.skip("no way to make an unreadable file here")
    refused(valid + [o.format(**inputs) for o in overrides], *(f.format(**inputs) for f in fragments))
    assert not (tmp_path / "out").exists() and not (tmp_path / "root").exists()  # nothing written
    assert not Path("/sys/patchsweep").exists() and inputs["a_file"].read_text() == "not a folder"


def test_valid_config_passes(valid):
    cfg = validate(compose(*valid))
    assert isinstance(cfg, PatchsweepConfig) and cfg.model.name == "word-model"


def test_output_folder_of_another_experiment_needs_resume(valid, tmp_path):
    first = validate(compose(*valid, "patching.components=[head]"))
    assert not (tmp_path / "out").exists()  # validation creates nothing
    write_config(tmp_path / "out", first)  # what a sweep of that other experiment writes before its results
    validate(compose(*valid))  # a folder holding no results yet is free to take
    write_table(tmp_path / "out" / "pairs.parquet", pa.table({"pair_id": [0]}))  # its first result
    validate(compose(*valid, "patching.components=[head]", "resources.actors=2"))  # same experiment, other machine
    refused(valid, "holds another experiment's results", "resume=true")
    validate(compose(*valid, "resume=true"))


def test_equal_pairs_file_passes(valid, tmp_path):
    equal = write_jsonl(tmp_path / "equal.jsonl",
                        [{"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"}])
    validate(compose(*valid, f"prompts.path={equal}"))


@pytest.mark.slow
def test_multirun_jobs_get_folders_of_their_own(tmp_path):
    """Two jobs of one --multirun that differ only in a value (one model.name, two metrics) get two folders,
    named by the swept value, and both finish; the same command again reuses both (it resumes)."""
    command = [sys.executable, "-m", "pipeline", "--multirun", "experiment=refusal_tiny", "patching=resid",
               "patching.components=[resid_pre]", "patching.per_position=[]", "circuit.enabled=false",
               "patching.metric=logit_diff,refusal_logodds", "tracking.enabled=false", f"output_root={tmp_path}"]
    for attempt in ("first", "again"):
        result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600)
        assert result.returncode == 0, (attempt, result.stderr[-3000:])
    folders = sorted(p.parent.name for p in (tmp_path / "refusal_tiny").rglob("config.yaml"))
    # key-value, not key=value: Hive-style readers would turn a key=value folder into a column
    assert [f.rsplit("-", 1)[0] for f in folders] == ["patching.metric-logit_diff", "patching.metric-refusal_logodds"]
    assert result.stdout.count("patch 0 computed") == 2  # the second command recomputed nothing
