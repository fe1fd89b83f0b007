"""The shipped model organisms.

An organism name resolves to a local Hugging Face model folder, which is then loaded by exactly the
code path a hub id or a user's own folder takes (`pipeline.engine.loading.load_model`).

This is runtime code: it and each organism's __init__ import only the standard library (the heavy
libraries load inside the functions that build a folder), never an organism's training or data code.
"""
from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path

from pipeline.organisms import refusal_tiny, smollm2_refusal

# name -> the function that returns the organism's model folder, building it on first use.
ORGANISMS: dict[str, Callable[[], Path]] = {
    "refusal-tiny": refusal_tiny.model_dir,
    "refusal-tiny-gpt2": partial(refusal_tiny.model_dir, "gpt2"),
    "refusal-tiny-neox": partial(refusal_tiny.model_dir, "gpt_neox"),
    "smollm2-refusal": smollm2_refusal.model_dir,
    "smollm2-refusal-v1": partial(smollm2_refusal.model_dir, smollm2_refusal.ADAPTER_V1_DIR),
}
# Organisms trained on refusal-tiny's grammar: their prompt pairs come from it (held-out combinations).
GRAMMAR_ORGANISMS = ("refusal-tiny", "refusal-tiny-gpt2", "refusal-tiny-neox")
# Organisms whose pairs come from smollm2_refusal/study.py's study pool (requests they never trained on).
STUDY_POOL_ORGANISMS = ("smollm2-refusal",)


def resolve(name_or_path: str) -> str:
    """An organism name -> its model folder; anything else (a folder, a hub id) is returned unchanged."""
    if name_or_path in ORGANISMS:
        return str(ORGANISMS[name_or_path]())
    return name_or_path
