"""Validation of a composed config: everything that can be checked before compute.

`validate` checks what types cannot (components, ranges, the machine, the output folder, the model's
shape from its config.json, the user's pairs under the model's tokenizer) and raises a one-line
`ConfigError` naming the problem and the key to fix. No weights are loaded.
"""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from pipeline.analysis.pairs import file_pairs, tokenize_pairs
from pipeline.config import config_hash, to_dict, tracking_uri
from pipeline.engine.adapters import FAMILIES
from pipeline.engine.hooks import COMPONENTS
from pipeline.engine.metrics import DIRECTIONS, METRICS
from pipeline.organisms import ORGANISMS, resolve


class ConfigError(ValueError):
    """A config the pipeline cannot run; the message names the problem and the key to fix."""


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def validate(cfg: DictConfig | dict) -> dict:
    """Check everything that can be checked before compute; returns the resolved plain config."""
    try:
        plain = to_dict(cfg)
    except Exception as err:  # missing values, bad interpolations
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    _check_patching(plain)
    _check_sizes(plain)
    _check_resources(plain)
    _check_prompts(plain)
    _check_tracking(plain)
    _check_output_dir(plain)
    folder = _check_model(plain)
    _check_pairs_file(plain, folder)
    return plain


def validate_screen(cfg: DictConfig | dict) -> dict:
    """The checks that apply to `patchsweep screen` (a model, a prompt file, somewhere to write)."""
    try:
        plain = to_dict(cfg)
    except Exception as err:
        raise ConfigError(f"config does not resolve: {err}".splitlines()[0]) from None
    if not plain["prompts"]["path"]:
        raise ConfigError("patchsweep screen needs a prompt file: set prompts.path=<JSONL/CSV/Parquet with "
                          "columns prompt, harmful>")
    _check_resources(plain)
    _check_prompts(plain)
    if not _writable_folder(Path(plain["output_dir"])):
        raise ConfigError(f"output folder {plain['output_dir']} cannot be written: set output_dir to a writable folder")
    _check_model(plain)
    return plain


def _check_patching(cfg: dict) -> None:
    patching = cfg["patching"]
    if not patching["components"]:
        raise ConfigError(f"patching.components is empty: choose some of {list(COMPONENTS)}")
    for key, allowed in (("components", COMPONENTS), ("per_position", COMPONENTS), ("directions", DIRECTIONS)):
        for value in patching[key]:
            if value not in allowed:
                raise ConfigError(f"unknown {key[:-1] if key != 'per_position' else 'component'} {value!r} in "
                                  f"patching.{key}: choose from {list(allowed)}")
    if not patching["directions"]:
        raise ConfigError(f"patching.directions is empty: choose some of {list(DIRECTIONS)}")
    if patching["metric"] not in METRICS:
        raise ConfigError(f"unknown metric {patching['metric']!r} in patching.metric: choose from {list(METRICS)}")


def _check_sizes(cfg: dict) -> None:
    positive = {
        "patching.batch_size": cfg["patching"]["batch_size"],
        "prompts.n_pairs": cfg["prompts"]["n_pairs"],
        "resources.shard_size": cfg["resources"]["shard_size"],
        "prompts.answer_top_k": cfg["prompts"]["answer_top_k"],
        "resources.actors": cfg["resources"]["actors"],
        "resources.cpus_per_actor": cfg["resources"]["cpus_per_actor"],
        "resources.torch_threads": cfg["resources"]["torch_threads"],
        "resources.max_in_flight": cfg["resources"]["max_in_flight"],
        "summary.n_bootstrap": cfg["summary"]["n_bootstrap"],
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive: set {key} to 1 or more")
    if not 0 < cfg["summary"]["ci"] < 1:
        raise ConfigError(f"summary.ci={cfg['summary']['ci']} must be between 0 and 1 (e.g. 0.95)")
    if not 0 < cfg["circuit"]["target"] <= 1:
        raise ConfigError(f"circuit.target={cfg['circuit']['target']} must be in (0, 1]: faithfulness is a share "
                          "of the refusal gap (e.g. 0.8)")
    if cfg["resources"]["gpus_per_actor"] < 0 or cfg["resources"]["max_retries"] < 0:
        raise ConfigError("resources.gpus_per_actor and resources.max_retries must not be negative")


def _check_resources(cfg: dict) -> None:
    res = cfg["resources"]
    if res["device"] not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {res['device']!r} in resources.device: choose cpu or cuda")
    wants_gpu = res["device"] == "cuda" or res["gpus_per_actor"] > 0
    if wants_gpu and res["device"] != "cuda":
        raise ConfigError("resources.gpus_per_actor > 0 with resources.device=cpu: use resources=gpu "
                          "(device cuda) or set resources.gpus_per_actor=0")
    if res["device"] == "cuda" and res["gpus_per_actor"] <= 0:
        raise ConfigError("resources.device=cuda needs resources.gpus_per_actor > 0: use resources=gpu")
    # A cluster's GPUs are the cluster's business; on a private local instance this machine must have one.
    if wants_gpu and cfg["ray"]["address"] == "local":
        if not torch.cuda.is_available():
            raise ConfigError("a GPU was asked for (resources.device=cuda) but this machine has none: "
                              "use resources=cpu, or ray.address=<a cluster with GPUs>")


def _check_prompts(cfg: dict) -> None:
    prompts = cfg["prompts"]
    if prompts["align"] not in ("none", "end"):
        raise ConfigError(f"unknown alignment {prompts['align']!r} in prompts.align: choose none or end")
    path = prompts["path"]
    if path is None:
        return
    if not Path(path).is_file():
        raise ConfigError(f"prompts file {path!r} does not exist: set prompts.path to a JSONL, CSV or Parquet file")
    if Path(path).suffix.lower() not in (".jsonl", ".json", ".csv", ".parquet"):
        raise ConfigError(f"prompts file {path!r} is not JSONL, CSV or Parquet: fix prompts.path")


def _check_tracking(cfg: dict) -> None:
    if not cfg["tracking"]["enabled"]:
        return
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        writable = _writable_folder(db.parent) and (not db.exists() or os.access(db, os.W_OK))
        if not writable:
            raise ConfigError(f"MLflow store {uri} cannot be written: set tracking.uri to a writable "
                              "sqlite:///<path>/mlflow.db or a server URI, or tracking.enabled=false")
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise ConfigError(f"MLflow store {uri!r} is a plain folder store, which MLflow 3 no longer accepts: "
                          "set tracking.uri=sqlite:///<path>/mlflow.db or a server URI (http://host:port)")


def _writable_folder(folder: Path) -> bool:
    """Create `folder` if needed and prove a file can be made in it (permission bits mean little to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".patchsweep-probe-"):
            return True
    except OSError:
        return False


def _check_output_dir(cfg: dict) -> None:
    out = Path(cfg["output_dir"])
    if not _writable_folder(out):
        raise ConfigError(f"output folder {out} cannot be written: set output_dir to a writable folder")
    saved = out / "config.yaml"
    if cfg["resume"] or not saved.is_file():
        return
    try:
        saved_hash = config_hash(OmegaConf.load(saved))
    except Exception:
        saved_hash = "unreadable"
    if saved_hash != config_hash(cfg):
        raise ConfigError(f"output folder {out} holds another experiment's results (config hash {saved_hash}, "
                          f"this one {config_hash(cfg)}): set output_dir=<a new folder>, or resume=true to "
                          "reuse it")


def _check_model(cfg: dict) -> str:
    """The model exists and the layers/heads asked for are in range; returns its folder or hub id."""
    path = cfg["model"]["path"]
    if path in ORGANISMS:
        folder = resolve(path)  # a shipped organism: its folder (built on first use is set-up, not compute)
    elif Path(path).expanduser().exists():
        folder = str(Path(path).expanduser())
        if not (Path(folder) / "config.json").is_file():
            raise ConfigError(f"model folder {path!r} has no config.json: set model.path to a folder saved with "
                              f"save_pretrained, a hub id, or one of {sorted(ORGANISMS)}")
    elif path.startswith((".", "/", "~")) or not HUB_ID.match(path):
        raise ConfigError(f"model path {path!r} does not exist: set model.path to a model folder, a hub id "
                          f"(org/name), or one of {sorted(ORGANISMS)}")
    else:
        folder = path  # a hub id: AutoConfig fetches config.json only (or reads it from the local cache)
    n_layers, n_heads = _model_shape(folder, cfg)
    for layer in cfg["patching"]["layers"] or []:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} in patching.layers is out of range: {path} has layers 0..{n_layers - 1}")
    for head in cfg["patching"]["heads"] or []:
        if not 0 <= head < n_heads:
            raise ConfigError(f"head {head} in patching.heads is out of range: {path} has heads 0..{n_heads - 1}")
    return folder


def _check_pairs_file(cfg: dict, folder: str) -> None:
    """The user's pairs file reads, and every pair has equal token counts under the model's tokenizer and
    chat template (unless prompts.align=end): the tokenizer alone, no weights."""
    if cfg["prompts"]["path"] is None:
        return
    try:
        pairs = file_pairs(cfg["prompts"]["path"])
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg["model"]["trust_remote_code"])
        tokenize_pairs(tokenizer, pairs, cfg["prompts"]["align"])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _model_shape(folder: str, cfg: dict) -> tuple[int, int]:
    """(layers, heads) from config.json alone, after checking that the engine knows the architecture:
    no weights are loaded."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg["model"]["trust_remote_code"])
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"cannot read the model config of {cfg['model']['path']!r} ({first}): "
                          "fix model.path") from None
    if config.model_type not in FAMILIES:
        raise ConfigError(f"unsupported architecture {config.model_type!r} of model.path {cfg['model']['path']!r}: "
                          f"use a causal LM whose model_type is one of {sorted(FAMILIES)} (or add it to "
                          "pipeline/engine/adapters.py)")
    return config.num_hidden_layers, config.num_attention_heads
