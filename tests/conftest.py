"""Shared fixtures: refusal-tiny loaded once, composing configs, a config-only model folder, one Ray session
for the whole run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parent.parent


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (for the Ray heads and workers tests start)."""
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def short_temp_dir() -> str:
    """Ray's session folder holds Unix sockets, whose paths must stay under 108 bytes: pytest's tmp_path
    is too deep for them."""
    import tempfile

    return tempfile.mkdtemp(prefix="ps-ray-", dir="/tmp")


@contextmanager
def mlflow_ui(args: list[str], log_path: Path):
    """`python -m pipeline.run.tracking ui <args>` (what `make ui` runs) in its own process group, so that
    stopping it stops all of it."""
    with open(log_path, "w") as log:
        server = subprocess.Popen([sys.executable, "-m", "pipeline.run.tracking", "ui", *args], stdout=log,
                                  stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        try:
            yield server
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)


# Small random-weight models of the three families with different wiring, for the engine's equivalence tests.
VOCAB = 64
ARCHITECTURES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),  # GQA
    "gpt2": dict(n_embd=32, n_head=4, n_positions=32),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),  # parallel residual
}


def random_model(model_type: str, dtype=None, **extra):
    """A 3-layer model of `model_type` with seeded random weights (`extra` overrides its config)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, num_hidden_layers=3, initializer_range=0.2,
                                  bos_token_id=0, eos_token_id=0, pad_token_id=0,
                                  **{**ARCHITECTURES[model_type], **extra})
    model = AutoModelForCausalLM.from_config(config)
    return (model.to(dtype) if dtype is not None else model).eval()


def random_pairs(n_pairs=3, seq_len=7, seed=1):
    """Minimal pairs of random tokens differing at positions 2 and 4, with ragged answer sets."""
    import torch

    from pipeline.engine.metrics import Answers

    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (n_pairs, seq_len), generator=gen)
    corrupted = clean.clone()
    corrupted[:, 2] = torch.randint(1, VOCAB, (n_pairs,), generator=gen)
    corrupted[:, 4] = torch.randint(1, VOCAB, (n_pairs,), generator=gen)
    answers = Answers(torch.tensor([[3, -1], [4, 5], [9, -1]])[:n_pairs],
                      torch.tensor([[6, 7], [8, -1], [2, -1]])[:n_pairs])
    return clean, corrupted, answers


@pytest.fixture(scope="session")
def tiny():
    """refusal-tiny (the shipped Llama organism) as (model in eval mode, tokenizer), loaded once per session
    through the pipeline's loading path. Shared by every test: use it, never change its weights, config or
    tokenizer."""
    import torch

    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve

    torch.set_num_threads(1)  # tiny models: threads cost more than they save
    return load_model(resolve("refusal-tiny"))


def compose(*overrides: str):
    """The config `patchsweep <overrides>` would run, composed with Hydra's compose API."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from pipeline.config import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=list(overrides), return_hydra_config=False)


@pytest.fixture
def word_model_folder(tmp_path) -> Path:
    """A model folder without weights: a 2-layer, 4-head Llama config.json and a word-level tokenizer
    with a chat template. Enough for everything validation reads (it never loads weights)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    folder = tmp_path / "word-model"
    words = "how do i make a bomb cake build kite steal wash car ? . please".split()
    specials = ["<pad>", "<unk>", "<s>", "<|user|>", "<|assistant|>", "<|end|>"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(specials + words)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token="<s>", eos_token="<|end|>", unk_token="<unk>", pad_token="<pad>",
        chat_template="{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> "
                      "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tokenizer.save_pretrained(folder)
    LlamaConfig(vocab_size=len(specials) + len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class ScreenedPairs(NamedTuple):
    table: object  # pairs.parquet's table (a pyarrow Table, without the run's own columns)
    report: dict


def screened_pairs(model, tokenizer, pairs, model_path: str = "refusal-tiny", **prompts) -> ScreenedPairs:
    """`pairs` (InstructionPair) through the real pairs stage in this process (pipeline.stages.pairs:
    tokenize, replies, answer tokens, screen, collect), as a user's prompt file; `prompts`: PromptsConfig
    options (align, refusal_tokens, generate, ...)."""
    from pipeline.schema import PromptsConfig
    from pipeline.stages.pairs import run_in_process

    with tempfile.TemporaryDirectory() as folder:
        path = write_jsonl(Path(folder) / "pairs.jsonl",
                           [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category} for p in pairs])
        table, report = run_in_process(model, tokenizer, model_path, PromptsConfig(path=str(path), **prompts),
                                       Path(folder))
        return ScreenedPairs(table, report)


@pytest.fixture(scope="session")
def ray_session():
    """One private local Ray instance for every test that needs one (start-up costs seconds)."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if not ray.is_initialized():
        # Workers can import test helpers (conftest.exit_once) as stand-in stages.
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="patchsweep-tests",
                 configure_logging=True, logging_level="warning",
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                     [str(Path(__file__).resolve().parent), *filter(None, [os.environ.get("PYTHONPATH")])])}})
    yield ray
    ray.shutdown()


# The integration sweep: refusal-tiny through the real pipeline (local Ray, SQLite MLflow store).
TINY_SWEEP = ["experiment=refusal_tiny"]


@pytest.fixture(scope="session")
def tiny_sweep(ray_session, tmp_path_factory):
    """Run `patchsweep experiment=refusal_tiny` once per test session, in-process (sharing the Ray
    session) through the same functions the command calls, tracked live in MLflow; returns what the
    tests inspect."""
    import time

    from pipeline import store
    from pipeline.run.sweep import run_sweep
    from pipeline.run.tracking import LiveRun
    from pipeline.validation import validate

    root = tmp_path_factory.mktemp("sweep")
    # Two actors: the circuit step runs on one of them beside cache, patch and summary.
    overrides = [*TINY_SWEEP, "resources.actors=2", f"output_root={root}"]
    cfg = validate(compose(*overrides))
    start = time.perf_counter()
    live = LiveRun(cfg, "test-session", overrides)
    outcome = run_sweep(cfg, live, overrides)
    tracking = live.finish(outcome)
    seconds = time.perf_counter() - start
    # As the run left them: later tests run the same folder again (new run id, new report).
    report = (outcome.run_dir / "report.md").read_text()
    tables_run_id = store.read_table(outcome.run_dir / "effects.parquet")["run_id"][0].as_py()
    return {"cfg": cfg, "outcome": outcome, "tracking": tracking, "root": root, "overrides": overrides,
            "seconds": seconds, "report": report, "tables_run_id": tables_run_id}


def exit_once(model, tokenizer, item: dict) -> list[Path]:
    """A stand-in stage that kills its actor's process the first time it runs (a marker file remembers);
    the second time it publishes a file holding the pid of the process that ran it."""
    marker = Path(item["marker"])
    if not marker.exists():
        marker.write_text("died once")
        os._exit(1)
    done = marker.with_suffix(".pid")
    done.write_text(str(os.getpid()))
    return [done]


def log_twice(model, tokenizer, item: dict) -> list[Path]:
    """A stand-in stage that logs an INFO and a WARNING record from inside its actor."""
    import logging

    log = logging.getLogger("pipeline.stages.stand_in")
    log.info("an info record from %s", item["name"])
    log.warning("a warning from %s", item["name"])
    return []


# The three tiny organisms of three families, one --multirun (the README's cross-family example).
TINY_MODELS = ("refusal_tiny", "refusal_tiny_gpt2", "refusal_tiny_neox")


@pytest.fixture(scope="session")
def tiny_multirun(tmp_path_factory):
    """`patchsweep --multirun experiment=refusal_tiny model=<the three tiny organisms>` once per test
    session, through the real command (its own private Ray instance, the SQLite MLflow store under its
    output root); returns the root and what the command printed."""
    root = tmp_path_factory.mktemp("multirun")
    command = [sys.executable, "-m", "pipeline", "--multirun", "experiment=refusal_tiny",
               f"model={','.join(TINY_MODELS)}", f"output_root={root}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return {"root": root, "stdout": result.stdout, "stderr": result.stderr, "command": command}
