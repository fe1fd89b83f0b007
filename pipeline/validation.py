"""Validation of a composed config: everything that can be checked before compute.

`validate` checks what types cannot (components, ranges, the machine, the output folder, the MLflow
store, the model's shape from its config.json, the user's pairs under the model's tokenizer) and raises
a one-line `ConfigError` naming the problem and the key to fix. No weights are loaded, Ray is not
started and nothing is written: a refused command leaves every folder as it found it.
"""
from __future__ import annotations

import os
import re
import socket
import sqlite3
import sys
import tempfile
from contextlib import closing
from pathlib import Path
from urllib.parse import urlsplit

import torch
from omegaconf import DictConfig, OmegaConf
from transformers import AutoConfig, AutoTokenizer

from pipeline.analysis.directions import direction_summary
from pipeline.analysis.pairs import file_pairs, tokenize_pairs
from pipeline.analysis.prompt_files import FILE_FORMATS
from pipeline.config import to_dict
from pipeline.engine.adapters import FAMILIES
from pipeline.engine.directions import INTERVENTIONS
from pipeline.engine.hooks import COMPONENTS
from pipeline.engine.loading import DTYPES
from pipeline.engine.metrics import ANSWER_METRICS, DIRECTIONS, METRICS
from pipeline.messages import first_line
from pipeline.organisms import GRAMMAR_ORGANISMS, ORGANISMS, checkpoint_problem, resolve
from pipeline.organisms.instructions import minimal_pairs
from pipeline.organisms.refusal_tiny import grammar
from pipeline.outputs.files import MARKER, RunFolder
from pipeline.run.folder import checked_direction, foreign_files
from pipeline.run.workers import RayUnavailable, check_room
from pipeline.schema import PatchsweepConfig, config_hash, from_plain, tracking_uri


class ConfigError(ValueError):
    """A config the pipeline cannot run; the message names the problem and the key to fix."""


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def typed(cfg: DictConfig | dict) -> PatchsweepConfig:
    """A composed config (or its plain dict) resolved into the typed config."""
    if isinstance(cfg, PatchsweepConfig):
        return cfg
    try:
        return from_plain(to_dict(cfg))
    except Exception as err:  # missing values, bad interpolations, keys the schema lacks
        raise ConfigError(f"config does not resolve: {first_line(err)}") from None


def validate(cfg: DictConfig | dict) -> PatchsweepConfig:
    """Check everything that can be checked before compute; returns the typed config."""
    cfg = typed(cfg)
    _check_patching(cfg)
    _check_sizes(cfg)
    _check_circuit(cfg)
    _check_direction(cfg)
    _check_resources(cfg)
    _check_ray(cfg)
    _check_prompts(cfg)
    validate_tracking(cfg)
    _check_output_dir(cfg)
    folder, max_positions = _check_model(cfg)
    _check_pairs_file(cfg, folder, max_positions)
    return cfg


def validate_screen(cfg: DictConfig | dict) -> PatchsweepConfig:
    """The checks that apply to `patchsweep screen` (a model, a prompt file, somewhere to write)."""
    cfg = typed(cfg)
    if not cfg.prompts.path:
        raise ConfigError("patchsweep screen needs a prompt file: set prompts.path=<JSONL/CSV/Parquet with "
                          "columns prompt, harmful>")
    _check_resources(cfg)
    _check_prompts(cfg)
    problem = _unwritable(Path(cfg.output_dir))
    if problem:
        raise ConfigError(f"output folder {cfg.output_dir} cannot be written ({problem}): set output_dir to "
                          "a writable folder")
    _check_model(cfg)
    _check_intervention(cfg)
    return cfg


def _check_patching(cfg: PatchsweepConfig) -> None:
    patching = cfg.patching
    if not patching.components:
        raise ConfigError(f"patching.components is empty: choose some of {list(COMPONENTS)}")
    for key, allowed in (("components", COMPONENTS), ("per_position", COMPONENTS), ("per_class", COMPONENTS),
                         ("directions", DIRECTIONS)):
        for value in getattr(patching, key):
            if value not in allowed:
                kind = "component" if key.startswith("per_") else key[:-1]
                raise ConfigError(f"unknown {kind} {value!r} in patching.{key}: choose from {list(allowed)}")
    if not patching.directions:
        raise ConfigError(f"patching.directions is empty: choose some of {list(DIRECTIONS)}")
    if patching.metric not in METRICS:
        raise ConfigError(f"unknown metric {patching.metric!r} in patching.metric: choose from {list(METRICS)}")
    # A site named twice would be patched twice and counted twice in effects.parquet: each is kept once
    # (lists in their given order; layers and heads sorted), so [0, 0, 0] and [0] are one experiment.
    for key in ("components", "per_position", "per_class", "directions"):
        setattr(patching, key, list(dict.fromkeys(getattr(patching, key))))
    for key in ("layers", "heads"):
        if getattr(patching, key) is not None:
            setattr(patching, key, sorted(set(getattr(patching, key))))


def _check_sizes(cfg: PatchsweepConfig) -> None:
    positive = {
        "patching.batch_size": cfg.patching.batch_size,
        "prompts.n_pairs": cfg.prompts.n_pairs,
        "resources.shard_size": cfg.resources.shard_size,
        "resources.pairs_shard_size": cfg.resources.pairs_shard_size,
        "prompts.answer_top_k": cfg.prompts.answer_top_k,
        "resources.actors": cfg.resources.actors,
        "resources.cpus_per_actor": cfg.resources.cpus_per_actor,
        "resources.torch_threads": cfg.resources.torch_threads,
        "resources.max_in_flight": cfg.resources.max_in_flight,
        "summary.n_bootstrap": cfg.summary.n_bootstrap,
        "resources.placement_timeout_s": cfg.resources.placement_timeout_s,
        "ray.connect_timeout_s": cfg.ray.connect_timeout_s,
        "prompts.max_new_tokens": cfg.prompts.max_new_tokens,
    }
    for key, value in positive.items():
        if value is not None and value <= 0:
            raise ConfigError(f"{key}={value} must be positive: set {key} to 1 or more")
    if not 0 < cfg.summary.ci < 1:
        raise ConfigError(f"summary.ci={cfg.summary.ci} must be between 0 and 1 (e.g. 0.95)")
    if cfg.resources.gpus_per_actor < 0 or cfg.resources.max_retries < 0:
        raise ConfigError("resources.gpus_per_actor and resources.max_retries must not be negative")
    if cfg.model.dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {cfg.model.dtype!r} in model.dtype: choose from {sorted(DTYPES)}")


def _check_circuit(cfg: PatchsweepConfig) -> None:
    """The circuit search's options (checked with the step off too: a later run of the folder may turn it on)."""
    circuit = cfg.circuit
    if circuit.enabled and cfg.patching.metric not in ANSWER_METRICS:  # else found after the patch stage
        raise ConfigError(f"the circuit step needs an answer-token metric, not patching.metric="
                          f"{cfg.patching.metric}: set patching.metric to one of {list(ANSWER_METRICS)}, or "
                          "circuit.enabled=false")
    shares = {"circuit.target": "faithfulness is a share of the refusal gap (e.g. 0.8)",
              "circuit.max_fraction": "a fraction of the candidate nodes (e.g. 0.1)"}
    for key, meaning in shares.items():
        value = getattr(circuit, key.split(".")[1])
        if not 0 < value <= 1:
            raise ConfigError(f"{key}={value} must be in (0, 1]: {meaning}")
    # n_resamples=0 and search_pairs=0 would fail only after the whole search (no stability, no pairs to search)
    for key in ("max_pairs", "recall_k", "n_resamples"):
        if getattr(circuit, key) < 1:
            raise ConfigError(f"circuit.{key}={getattr(circuit, key)} must be positive: set circuit.{key} to 1 or more")
    for key in ("n_random", "verify_top", "verify_random", "verify_all_rows", "edge_nodes", "direction_layers",
                "strong_effect", "edge_min"):
        if getattr(circuit, key) < 0:
            raise ConfigError(f"circuit.{key}={getattr(circuit, key)} must not be negative: "
                              f"set circuit.{key} to 0 or more")
    if circuit.max_batch_rows is not None and circuit.max_batch_rows < 1:
        raise ConfigError(f"circuit.max_batch_rows={circuit.max_batch_rows} must be positive (or null: "
                          "chosen from free memory)")
    if circuit.search_pairs is not None and circuit.search_pairs < 1:
        raise ConfigError(f"circuit.search_pairs={circuit.search_pairs} must be positive (or null: the search on "
                          "every pair)")


def _check_direction(cfg: PatchsweepConfig) -> None:
    """The refusal direction's filters (checked with the step off too: a later run may turn it on)."""
    direction = cfg.direction
    if direction.max_kl <= 0:
        raise ConfigError(f"direction.max_kl={direction.max_kl} must be positive: it is the largest KL (nats) a "
                          "candidate's ablation may cause on harmless prompts (e.g. 0.1)")
    if not 0 < direction.max_layer_fraction <= 1:
        raise ConfigError(f"direction.max_layer_fraction={direction.max_layer_fraction} must be in (0, 1]: "
                          "candidates are taken at layers below this fraction of the depth (e.g. 0.8)")
    if direction.max_batch_rows is not None and direction.max_batch_rows < 1:
        raise ConfigError(f"direction.max_batch_rows={direction.max_batch_rows} must be positive (or null: "
                          "chosen from free memory)")
    for name in ("induce_target", "ablation_target"):
        if not 0 <= getattr(direction, name) <= 1:
            raise ConfigError(f"direction.{name}={getattr(direction, name)} must be a share of prompts in [0, 1] "
                              "(e.g. 0.9 and 0.1)")
    for name in ("max_subspace", "n_verified", "budget_windows"):
        if getattr(direction, name) < 1:
            raise ConfigError(f"direction.{name}={getattr(direction, name)} must be at least 1")


def _check_intervention(cfg: PatchsweepConfig) -> None:
    """`patchsweep screen` under a run's direction: the mode is known and the run folder has a chosen
    direction found on a model of this one's depth (its file's metadata only: no weights, no tensors)."""
    intervention = cfg.intervention
    if intervention.mode not in INTERVENTIONS:
        raise ConfigError(f"unknown intervention.mode {intervention.mode!r}: choose from {list(INTERVENTIONS)}")
    if intervention.run is None:
        if intervention.scale is not None:
            raise ConfigError("intervention.scale is set but intervention.run is not: set intervention.run=<a run "
                              "folder with direction.arrow>")
        return
    try:
        if RunFolder(intervention.run).direction.is_file():
            checked_direction(Path(intervention.run))  # before its schema is read: a damaged file is refused
        summary = direction_summary(intervention.run, intervention.mode)
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from None
    n_layers = _model_shape(resolve(cfg.model.path, cfg.model.checkpoint), cfg)[0]
    if summary["n_layers"] != n_layers:
        raise ConfigError(f"the direction in {intervention.run} was found on a model with {summary['n_layers']} "
                          f"layers, but {cfg.model.path} has {n_layers}: set intervention.run to a run of "
                          "this model")


def _check_resources(cfg: PatchsweepConfig) -> None:
    res = cfg.resources
    if res.device not in ("cpu", "cuda"):
        raise ConfigError(f"unknown device {res.device!r} in resources.device: choose cpu or cuda")
    wants_gpu = res.device == "cuda" or res.gpus_per_actor > 0
    if wants_gpu and res.device != "cuda":
        raise ConfigError("resources.gpus_per_actor > 0 with resources.device=cpu: use resources=gpu "
                          "(device cuda) or set resources.gpus_per_actor=0")
    if res.device == "cuda" and res.gpus_per_actor <= 0:
        raise ConfigError("resources.device=cuda needs resources.gpus_per_actor > 0: use resources=gpu")
    # A cluster's GPUs are the cluster's business; on a private local instance this machine must have one.
    if wants_gpu and cfg.ray.address == "local":
        if not torch.cuda.is_available():
            raise ConfigError("a GPU was asked for (resources.device=cuda) but this machine has none: "
                              "use resources=cpu, or ray.address=<a cluster with GPUs>")


def _check_ray(cfg: PatchsweepConfig) -> None:
    """The address has a form Ray takes; a private instance (this machine, as one node) holds the actors."""
    address = cfg.ray.address
    if address == "local":
        res = cfg.resources
        cores = len(os.sched_getaffinity(0))
        machine = {"CPU": res.num_cpus or cores,
                   "GPU": torch.cuda.device_count() if res.gpus_per_actor else 0}
        try:
            check_room(cfg, [machine])
        except RayUnavailable as err:
            raise ConfigError(str(err)) from None
        # Each actor holds a copy of the model and computes with at least one thread: a fraction of a CPU per
        # actor (resources.cpus_per_actor < 1) packs more of them into Ray's count, not into the machine.
        if res.actors > cores:
            raise ConfigError(f"resources.actors={res.actors} model actors on this machine's {cores} CPU"
                              f"{'s' if cores != 1 else ''}: each loads the model and computes, whatever "
                              f"resources.cpus_per_actor ({res.cpus_per_actor:g}) says; set resources.actors="
                              f"{cores} or fewer")
        return
    if address == "auto":
        return
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit() or ("://" in address and not address.startswith("ray://")):
        raise ConfigError(f"ray.address={address} is not local, auto, host:port or ray://host:port: fix ray.address")


def _check_prompts(cfg: PatchsweepConfig) -> None:
    prompts = cfg.prompts
    _check_transfer(prompts)
    if prompts.align not in ("none", "end"):
        raise ConfigError(f"unknown alignment {prompts.align!r} in prompts.align: choose none or end")
    path = prompts.path
    if path is None:
        try:
            supply = _generator_supply(cfg)
        except ValueError as err:  # an unknown grammar split
            raise ConfigError(f"{err}: fix prompts.split") from None
        if prompts.n_pairs > supply:
            raise ConfigError(f"prompts.n_pairs={prompts.n_pairs} is more than the {supply} distinct pairs the "
                              f"generator for {cfg.model.path} can supply: set prompts.n_pairs={supply} or "
                              "less, or give your own pairs (prompts.path)")
        return
    _check_pair_file("prompts.path", path)


def _check_transfer(prompts) -> None:
    if prompts.transfer_pairs < 0:
        raise ConfigError(f"prompts.transfer_pairs={prompts.transfer_pairs} is negative: set it to 0 (no transfer "
                          "pairs) or more")
    if prompts.transfer:
        _check_pair_file("prompts.transfer", prompts.transfer)


def _check_pair_file(key: str, path: str) -> None:
    if Path(path).is_dir():
        raise ConfigError(f"prompts file {path!r} is a folder: set {key} to a JSONL, CSV or Parquet file")
    if not Path(path).exists():
        raise ConfigError(f"prompts file {path!r} does not exist: set {key} to a JSONL, CSV or Parquet file")
    if not Path(path).is_file():
        raise ConfigError(f"prompts file {path!r} is not a regular file (a pipe or device): set {key} to a "
                          "JSONL, CSV or Parquet file")
    if Path(path).suffix.lower() not in FILE_FORMATS:
        raise ConfigError(f"prompts file {path!r} has the extension {Path(path).suffix!r}, not one of "
                          f"{', '.join(FILE_FORMATS)} (JSONL, CSV or Parquet): fix {key}")


def _generator_supply(cfg: PatchsweepConfig) -> int:
    """How many distinct pairs the generated prompt source can give (pipeline.analysis.pairs.source_pairs):
    refusal-tiny's grammar for the organisms trained on it (each twin combination in every phrasing and
    filler), else the instruction library (before its length matching under the model's tokenizer, which
    can only drop some)."""
    if cfg.model.path in GRAMMAR_ORGANISMS:
        return grammar.distinct_pairs(cfg.prompts.split)
    return sum(1 for _ in minimal_pairs())


def validate_tracking(cfg: PatchsweepConfig) -> None:
    """The MLflow store can be written (SQLite: a new file, or one that is an MLflow store) or answers (a
    server), when tracking is on; a scheme MLflow cannot keep runs in is refused."""
    if not cfg.tracking.enabled:
        return
    uri = tracking_uri(cfg)
    scheme = urlsplit(uri).scheme.split("+")[0].lower()
    fix = "set tracking.uri=sqlite:///<path>/mlflow.db or a server URI (http://host:port), or tracking.enabled=false"
    if scheme == "sqlite":
        db = uri[len("sqlite:///"):] if uri.startswith("sqlite:///") else ""
        if db in ("", ":memory:") or db.startswith("file::memory:"):
            raise ConfigError(f"MLflow store {uri} is an in-memory database, gone when the command ends: {fix}")
        db = Path(db)
        problem = _unwritable(db.parent) or (db.exists() and not os.access(db, os.W_OK) and f"{db} is read-only")
        if problem:
            raise ConfigError(f"MLflow store {uri} cannot be written ({problem}): {fix}")
        problem = _not_an_mlflow_store(db)
        if problem:
            raise ConfigError(f"MLflow store {uri} cannot be used ({problem}): {fix}")
    elif scheme in ("http", "https"):
        _check_server(uri)
    elif uri.startswith(("file:", "/", ".")) or "://" not in uri:
        raise ConfigError(f"MLflow store {uri!r} is a plain folder store, which MLflow 3 no longer accepts: "
                          "set tracking.uri=sqlite:///<path>/mlflow.db or a server URI (http://host:port)")
    elif scheme not in DATABASE_SCHEMES:
        raise ConfigError(f"MLflow store {uri} has a scheme MLflow cannot keep runs in ({scheme}://): {fix}")


# Database stores MLflow's SQLAlchemy backend accepts besides SQLite (their drivers are the user's to install).
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql", "databricks")
SQLITE_HEADER = b"SQLite format 3\x00"
MLFLOW_TABLES = {"experiments", "runs", "alembic_version"}


def _not_an_mlflow_store(db: Path) -> str | None:
    """Why an existing file cannot be an MLflow SQLite store (None: it is one, or it is new or empty,
    where MLflow creates its tables). Read-only: the file is not changed."""
    if not db.exists():
        return None
    if not db.is_file():
        return f"{db} is not a file"
    with open(db, "rb") as f:
        header = f.read(len(SQLITE_HEADER))
    if not header:
        return None
    if header != SQLITE_HEADER:
        return f"{db} is not an SQLite database"
    try:
        with closing(sqlite3.connect(f"{db.absolute().as_uri()}?mode=ro", uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.Error as err:
        return f"{db} is not a readable SQLite database: {err}"
    if tables and not MLFLOW_TABLES <= tables:
        return f"{db} is an SQLite database but not an MLflow store (its tables: {', '.join(sorted(tables)[:5])})"
    return None


SERVER_PROBE_S = 10.0


def _check_server(uri: str) -> None:
    """An MLflow server must accept a connection before any compute (MLflow's client would otherwise retry
    for minutes once the results are ready)."""
    parts = urlsplit(uri)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=SERVER_PROBE_S).close()
    except (OSError, ValueError) as err:
        reason = getattr(err, "strerror", None) or str(err) or type(err).__name__
        raise ConfigError(f"MLflow server at tracking.uri={uri} does not answer ({reason}): start it, set "
                          "tracking.uri to a running server, or tracking.enabled=false (log the finished run "
                          "later with `patchsweep log <run folder>`)") from None


def _unwritable(folder: Path) -> str | None:
    """Why `folder` could not be created or written ("" or None when it can), found without creating it:
    its nearest existing ancestor must be a folder a file can be made in (proved with a probe file that
    is removed at once; permission bits mean little to root, and a read-only mount shows none)."""
    folder = folder.expanduser().absolute()
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file" if existing.exists() else f"{existing} is not a folder"
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".patchsweep-probe-"):
            return None
    except OSError as err:
        return f"{existing}: {err.strerror or type(err).__name__}"


def _check_output_dir(cfg: PatchsweepConfig) -> None:
    out = Path(cfg.output_dir)
    problem = _unwritable(out)
    if problem:
        raise ConfigError(f"output folder {out} cannot be written ({problem}): set output_dir to a writable folder")
    foreign = foreign_files(out)
    if foreign:
        raise ConfigError(f"output folder {out} holds {', '.join(foreign)}, which patchsweep did not write (no "
                          f"{MARKER} there) and a sweep would overwrite: set output_dir=<a new folder>, or move "
                          "those files")
    saved = RunFolder(out).config
    # A folder holds results once its pairs are published; a config.yaml alone (a sweep that stopped before
    # computing anything) marks nothing worth protecting.
    if cfg.resume or not saved.is_file() or not RunFolder(out).pairs.is_file():
        return
    try:
        saved_hash = config_hash(OmegaConf.to_container(OmegaConf.load(saved)))
    except Exception:
        saved_hash = "unreadable"
    if saved_hash != config_hash(cfg):
        raise ConfigError(f"output folder {out} holds another experiment's results (config hash {saved_hash}, "
                          f"this one {config_hash(cfg)}): set output_dir=<a new folder>, or resume=true to "
                          "reuse it")


def _check_model(cfg: PatchsweepConfig) -> tuple[str, int | None]:
    """The model exists and the layers/heads asked for are in range; returns its folder or hub id and its
    maximum positions (None when its config names none)."""
    path = cfg.model.path
    problem = checkpoint_problem(path, cfg.model.checkpoint)
    if problem:
        raise ConfigError(problem)
    if path in ORGANISMS:
        # a shipped organism: its folder (built on first use is set-up, not compute)
        folder = resolve(path, cfg.model.checkpoint)
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
    n_layers, n_heads, max_positions = _model_shape(folder, cfg)
    for layer in cfg.patching.layers or []:
        if not 0 <= layer < n_layers:
            raise ConfigError(f"layer {layer} in patching.layers is out of range: {path} has layers 0..{n_layers - 1}")
    for head in cfg.patching.heads or []:
        if not 0 <= head < n_heads:
            raise ConfigError(f"head {head} in patching.heads is out of range: {path} has heads 0..{n_heads - 1}")
    return folder, max_positions


def _check_pairs_file(cfg: PatchsweepConfig, folder: str, max_positions: int | None) -> None:
    """The user's pairs file (and transfer pairs file) reads, every pair has equal token counts under the
    model's tokenizer and chat template (unless prompts.align=end; transfer pairs of unequal length are
    left out, not refused), and fits in the model's positions with the screen's replies: the tokenizer
    alone, no weights."""
    files = [(path, align) for path, align in ((cfg.prompts.path, cfg.prompts.align), (cfg.prompts.transfer, "end"))
             if path is not None]
    if not files:
        return
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    tokenizer.model_max_length = sys.maxsize  # lengths are checked below, naming the pair, not warned about
    for path, align in files:
        try:
            tokenized = tokenize_pairs(tokenizer, file_pairs(path), align)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if max_positions is None:
            continue
        reply = cfg.prompts.max_new_tokens if cfg.prompts.generate else 0
        for pair in tokenized:
            length = max(len(pair.clean_ids), len(pair.corrupted_ids))
            if length + reply > max_positions:
                raise ConfigError(f"pair {pair.pair_id} of {path} is {length} tokens under the chat template; "
                                  f"with the screen's {reply}-token replies (prompts.max_new_tokens) that is more "
                                  f"than the {max_positions} positions {cfg.model.path} has: shorten or drop that "
                                  "pair")


def _model_shape(folder: str, cfg: PatchsweepConfig) -> tuple[int, int, int | None]:
    """(layers, heads, maximum positions) from config.json alone, after checking that the engine knows the
    architecture: no weights are loaded."""
    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=cfg.model.trust_remote_code)
    except Exception as err:
        raise ConfigError(f"cannot read the model config of {cfg.model.path!r} ({first_line(err)}): "
                          "fix model.path") from None
    if config.model_type not in FAMILIES:
        raise ConfigError(f"unsupported architecture {config.model_type!r} of model.path {cfg.model.path!r}: "
                          f"use a causal LM whose model_type is one of {sorted(FAMILIES)} (or add it to "
                          "pipeline/engine/adapters.py)")
    max_positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return config.num_hidden_layers, config.num_attention_heads, max_positions
