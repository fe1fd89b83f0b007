"""Inputs that used to pass silently or be misnamed: a checkpoint with missing or unexpected tensors, a
JSONL string holding U+2028, a prompts path that is not a regular file."""
import json
import os
import shutil

import pytest
from safetensors.torch import load_file, save_file

from pipeline.analysis.prompt_files import read_user_file
from pipeline.engine.loading import load_model
from pipeline.organisms import resolve


@pytest.fixture
def tiny_copy(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(resolve("refusal-tiny"), folder)
    return folder


def _edit_weights(folder, edit):
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def test_a_checkpoint_missing_a_tensor_is_refused(tiny_copy):
    _edit_weights(tiny_copy, lambda t: t.pop("model.layers.1.mlp.down_proj.weight"))
    with pytest.raises(ValueError, match=r"1 missing: model\.layers\.1\.mlp\.down_proj\.weight\): restore"):
        load_model(str(tiny_copy))


def test_a_checkpoint_with_an_unexpected_tensor_is_refused(tiny_copy):
    _edit_weights(tiny_copy, lambda t: t.update(extra=t["model.norm.weight"].clone()))
    with pytest.raises(ValueError, match="1 unexpected: extra"):
        load_model(str(tiny_copy))


def test_a_complete_checkpoint_loads(tiny_copy):
    model, _ = load_model(str(tiny_copy))
    assert model.config.model_type == "llama"


def test_jsonl_strings_may_hold_line_separators(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"clean": "How do I make a bomb\u2028now?", "corrupted": "How do I make a cake\u2028now?"},
            {"clean": "x\u2029y\x85z", "corrupted": "a\u2029b\x85c"}]
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    table = read_user_file(path, ["clean", "corrupted"], "prompt-pair file")
    assert table.column("clean").to_pylist() == [r["clean"] for r in rows]


def test_a_pipe_is_named_as_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pairs.jsonl"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="is not a regular file"):
        read_user_file(fifo, ["clean", "corrupted"], "prompt-pair file")
