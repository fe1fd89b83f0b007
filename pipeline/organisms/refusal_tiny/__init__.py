"""refusal-tiny: small chat models trained from scratch on a synthetic refusal grammar, one per family.

The Llama model is refusal-tiny itself; its GPT-2 and GPT-NeoX siblings learn the same grammar with the
same tokenizer and chat template, so one sweep compares three architectures on one task. The weights ship
in `model/`, `gpt2/model/` and `gpt_neox/model/` (each with a MODEL_CARD.md beside it); `grammar.py`
generates their data and minimal pairs, `train.py --family <family>` rebuilds a folder.
"""
from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).resolve().parent
# family (the transformers model_type) -> its model folder
MODEL_DIRS = {"llama": HERE / "model", "gpt2": HERE / "gpt2" / "model", "gpt_neox": HERE / "gpt_neox" / "model"}


def model_dir(family: str = "llama") -> Path:
    """The shipped Hugging Face model folder (config, safetensors weights, tokenizer, chat template)."""
    folder = MODEL_DIRS[family]
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"refusal-tiny ({family}) weights are missing from {folder}: rebuild them with "
                                f"`python -m pipeline.organisms.refusal_tiny.train --family {family}`")
    return folder
