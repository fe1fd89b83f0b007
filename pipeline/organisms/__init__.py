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
    "smollm2-refusal-v2": partial(smollm2_refusal.model_dir, smollm2_refusal.ADAPTER_V2_DIR),
}
# Organisms trained on refusal-tiny's grammar: their prompt pairs come from it (held-out combinations).
GRAMMAR_ORGANISMS = ("refusal-tiny", "refusal-tiny-gpt2", "refusal-tiny-neox")
# Organisms whose pairs come from smollm2_refusal/study.py's study pool (requests they never trained on).
STUDY_POOL_ORGANISMS = ("smollm2-refusal",)
# Organisms whose tune saved checkpoints -> the checkpoints shipped (model.checkpoint: percent of the tune's steps,
# 0 = the base model); their folder functions take `checkpoint`.
CHECKPOINTS: dict[str, Callable[[], tuple[int, ...]]] = {"smollm2-refusal": smollm2_refusal.shipped_checkpoints}


def checkpoint_problem(name_or_path: str, checkpoint: int | None) -> str | None:
    """One line naming what is wrong with `model.checkpoint` for this model, or None."""
    if checkpoint is None:
        return None
    if name_or_path not in CHECKPOINTS:
        return (f"model.checkpoint={checkpoint} but {name_or_path!r} has no checkpoints: drop model.checkpoint, or "
                f"use one of {sorted(CHECKPOINTS)}")
    shipped = CHECKPOINTS[name_or_path]()
    if checkpoint not in shipped:
        return (f"unknown model.checkpoint={checkpoint} for {name_or_path}: use one of {', '.join(map(str, shipped))} "
                "(percent of the tune's steps; 0 = the base model) or null (the final adapter)")
    return None


def resolve(name_or_path: str, checkpoint: int | None = None) -> str:
    """An organism name (at a checkpoint of its tune, if given) -> its model folder; anything else (a folder, a
    hub id) is returned unchanged."""
    problem = checkpoint_problem(name_or_path, checkpoint)
    if problem:
        raise ValueError(problem)
    if checkpoint is not None:
        return str(ORGANISMS[name_or_path](checkpoint=checkpoint))
    if name_or_path in ORGANISMS:
        return str(ORGANISMS[name_or_path]())
    return name_or_path
