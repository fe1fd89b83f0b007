"""Load a causal LM and its tokenizer: one code path for hub ids, local folders and shipped organisms."""
from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """(model in eval mode, tokenizer). `path` is a local folder or a hub id (hub ids need network access)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: set model.dtype to one of {sorted(DTYPES)}")
    looks_local = path.startswith((".", "/", "~")) or Path(path).expanduser().exists()
    if looks_local and not (Path(path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(
            f"model path {path!r} is not a model folder (no config.json there): set model.path to a folder "
            "saved with save_pretrained, a hub id, or a shipped organism name"
        )
    model, info = AutoModelForCausalLM.from_pretrained(
        str(Path(path).expanduser()) if looks_local else path,
        dtype=DTYPES[dtype],
        trust_remote_code=trust_remote_code,
        output_loading_info=True,
    )
    check_loading_info(path, info)
    tokenizer = AutoTokenizer.from_pretrained(
        str(Path(path).expanduser()) if looks_local else path, trust_remote_code=trust_remote_code
    )
    return model.to(device).eval(), tokenizer


def check_loading_info(path: str, info: dict) -> None:
    """Refuse a checkpoint whose tensors do not match the model it declares: transformers would initialise
    the missing ones at random (different numbers every run) and drop the unexpected ones, silently."""
    problems = {what: sorted(info.get(key) or []) for what, key in (
        ("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("of another shape", "mismatched_keys"))}
    problems = {what: names for what, names in problems.items() if names}
    if problems:
        listed = "; ".join(f"{len(names)} {what}: {', '.join(map(str, names[:3]))}{', ...' if len(names) > 3 else ''}"
                           for what, names in problems.items())
        raise ValueError(f"model {path!r} has weights that do not match its config.json ({listed}): restore the "
                         "checkpoint's weight files, or set model.path to a complete checkpoint")
