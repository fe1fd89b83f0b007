"""refusal-tiny: a ~1M-parameter Llama chat model trained from scratch on a synthetic refusal grammar.

The weights ship in `model/` (see MODEL_CARD.md); `grammar.py` generates its data and minimal pairs,
`train.py` rebuilds the folder.
"""
from __future__ import annotations

from pathlib import Path

MODEL_DIR = Path(__file__).resolve().parent / "model"


def model_dir() -> Path:
    """The shipped Hugging Face model folder (config, safetensors weights, tokenizer, chat template)."""
    if not (MODEL_DIR / "model.safetensors").is_file():
        raise FileNotFoundError(f"refusal-tiny weights are missing from {MODEL_DIR}: rebuild them with "
                                "`python -m pipeline.organisms.refusal_tiny.train`")
    return MODEL_DIR
