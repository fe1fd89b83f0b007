"""The shipped model organisms.

An organism name resolves to a local Hugging Face model folder, which is then loaded by exactly the
code path a hub id or a user's own folder takes (`pipeline.engine.loading.load_model`).
"""
from __future__ import annotations

import importlib
from pathlib import Path

# name -> "module:function"; the function returns the organism's model folder, building it on first use.
ORGANISMS = {
    "refusal-tiny": "pipeline.organisms.refusal_tiny:model_dir",
    "smollm2-refusal": "pipeline.organisms.smollm2_refusal:model_dir",
}


def resolve(name_or_path: str) -> str:
    """An organism name -> its model folder; anything else (a folder, a hub id) is returned unchanged."""
    if name_or_path in ORGANISMS:
        module, func = ORGANISMS[name_or_path].split(":")
        return str(getattr(importlib.import_module(module), func)())
    return name_or_path


def is_organism(name_or_path: str) -> bool:
    return name_or_path in ORGANISMS and not Path(name_or_path).exists()
