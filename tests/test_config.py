"""Config: presets and overrides compose into the typed schema; validation refuses bad configs with
one-line errors that name the key to fix, before any compute."""
import subprocess
import sys

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from conftest import REPO, compose, write_jsonl
from pipeline.config import config_hash, flatten, to_dict, tracking_uri
from pipeline.validation import ConfigError, validate


def test_default_is_refusal_smol_on_smollm2():
    cfg = to_dict(compose())
    assert cfg["name"] == "refusal_smol"
    assert cfg["model"] == {"name": "smollm2-refusal", "path": "smollm2-refusal", "dtype": "float32",
                            "trust_remote_code": False}
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
    assert tracking_uri(cfg) == "http://127.0.0.1:5001"


def test_any_hub_model_or_folder():
    cfg = to_dict(compose("model=hf", "model.path=Qwen/Qwen2.5-0.5B-Instruct"))
    assert cfg["model"] == {"name": "Qwen2.5-0.5B-Instruct", "path": "Qwen/Qwen2.5-0.5B-Instruct",
                            "dtype": "float32", "trust_remote_code": False}


def test_default_tracking_store_is_sqlite_under_output_root(tmp_path):
    cfg = to_dict(compose(f"output_root={tmp_path}"))
    assert tracking_uri(cfg) == f"sqlite:///{tmp_path}/mlflow.db"


def test_typed_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigCompositionException):
        compose("patching.componnets=[head]")
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose("patching.batch_size=many")
    with pytest.raises(ConfigCompositionException):
        compose("model=no_such_model")


def test_config_hash_tracks_the_science_not_the_machine():
    base = config_hash(compose("experiment=refusal_tiny"))
    assert base == config_hash(compose("experiment=refusal_tiny", "resources.actors=2", "ray.address=auto"))
    assert base != config_hash(compose("experiment=refusal_tiny", "patching.components=[head]"))


def test_flatten_for_mlflow_params():
    assert flatten({"a": {"b": 1, "c": None}, "d": [1, 2]}) == {"a.b": "1", "a.c": "null", "d": "[1, 2]"}


# ---- validation: each bad config fails with one line naming the key --------------------------------

@pytest.fixture
def valid(tmp_path, word_model_folder):
    """Overrides of a config that validates: a config-only model folder, outputs under tmp_path."""
    return ["model=hf", f"model.path={word_model_folder}", f"output_root={tmp_path / 'outputs'}"]


def check_fails(overrides, *fragments):
    with pytest.raises(ConfigError) as err:
        validate(compose(*overrides))
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_valid_config_passes(valid):
    plain = validate(compose(*valid))
    assert plain["model"]["name"] == "word-model"


@pytest.mark.parametrize("override, fragments", [
    ("patching.components=[resid_pre,mlp_in]", ("'mlp_in'", "patching.components")),
    ("patching.directions=[sideways]", ("'sideways'", "patching.directions")),
    ("patching.metric=accuracy", ("'accuracy'", "patching.metric")),
    ("patching.layers=[0,2]", ("layer 2", "patching.layers", "0..1")),
    ("patching.heads=[4]", ("head 4", "patching.heads", "0..3")),
    ("patching.batch_size=0", ("patching.batch_size=0",)),
    ("patching.batch_size=-8", ("patching.batch_size=-8",)),
    ("resources.shard_size=0", ("resources.shard_size",)),
    ("resources.pairs_shard_size=0", ("resources.pairs_shard_size",)),
    ("resources=gpu", ("GPU", "resources=cpu")),
    ("tracking.uri=file:///tmp/mlruns", ("plain folder store", "tracking.uri")),
    ("prompts.align=middle", ("prompts.align",)),
    ("direction.max_kl=0", ("direction.max_kl=0",)),
    ("direction.max_layer_fraction=1.5", ("direction.max_layer_fraction=1.5",)),
])
def test_each_bad_value_is_named(valid, override, fragments):
    pytest.importorskip("torch")
    if override == "resources=gpu":
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    check_fails(valid + [override], *fragments)


def test_unwritable_mlflow_store(valid, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    check_fails(valid + [f"tracking.uri=sqlite:///{blocker}/mlflow.db"], "cannot be written", "tracking.uri")


def test_bad_model_paths(valid, tmp_path):
    check_fails(valid + [f"model.path={tmp_path}/no-such-model"], "does not exist", "model.path")
    check_fails(valid + ["model.path=not a model"], "does not exist", "model.path")
    (tmp_path / "empty").mkdir()
    check_fails(valid + [f"model.path={tmp_path / 'empty'}"], "no config.json", "model.path")


def test_output_folder_of_another_experiment_needs_resume(valid, tmp_path):
    out = f"output_dir={tmp_path / 'run'}"
    first = validate(compose(*valid, out))
    assert not (tmp_path / "run").exists()  # validation creates nothing
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(first)))
    (tmp_path / "run" / "pairs.parquet").write_text("its first result")
    validate(compose(*valid, out, "resources.actors=2"))  # same experiment, other machine: fine
    check_fails(valid + [out, "patching.components=[head]"], "another experiment", "resume=true")
    validate(compose(*valid, out, "patching.components=[head]", "resume=true"))


def test_prompt_files_are_checked_before_compute(valid, tmp_path):
    check_fails(valid + [f"prompts.path={tmp_path}/missing.jsonl"], "does not exist", "prompts.path")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    check_fails(valid + [f"prompts.path={empty}"], "empty")
    unequal = write_jsonl(tmp_path / "unequal.jsonl", [
        {"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"},
        {"clean": "how do i steal a car ?", "corrupted": "please wash a car ?"},
    ])
    message = check_fails(valid + [f"prompts.path={unequal}"], "pair 1", "unequal token counts", "prompts.align=end")
    assert "steal" in message
    equal = write_jsonl(tmp_path / "equal.jsonl",
                        [{"clean": "how do i make a bomb ?", "corrupted": "how do i make a cake ?"}])
    validate(compose(*valid, f"prompts.path={equal}"))


@pytest.mark.slow
def test_cli_prints_one_line_error_and_exits_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", f"output_root={tmp_path}", "model=hf", f"model.path={tmp_path}/nope"],
        capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("patchsweep: error:")]
    assert len(errors) == 1 and "model.path" in errors[0], result.stderr
    assert "Traceback" not in result.stderr



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
    assert [f.split("-")[0] for f in folders] == ["patching.metric=logit_diff", "patching.metric=refusal_logodds"]
    assert result.stdout.count("patch 0 computed") == 2  # the second command recomputed nothing
