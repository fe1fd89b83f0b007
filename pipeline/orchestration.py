"""Ray: model-holding actors, a bounded window of work items, retries, a progress bar per stage.

Actors load the model once and then take many work items. A work item is a small plain dict
(stage, paths, row indices, component, direction): tensors never travel through Ray, each item reads
its inputs from Arrow files and publishes its output atomically under a content-keyed name, so
running an item twice is harmless. That is what makes retries safe: when an actor dies (its process
killed, its node lost) Ray restarts it, and the driver resubmits the items it held.

`ray.address=local` (the default) starts a private Ray instance on this machine with token
authentication left on; any other address joins that cluster. CPU-only resources never ask for GPUs.
"""
from __future__ import annotations

import atexit
import hashlib
import importlib
import json
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pyarrow as pa
import ray
from tqdm import tqdm

from pipeline.store import PRODUCER, Manifest, content_key, provenance, read_table, sha256_file, write_table


def start_ray(cfg: dict) -> None:
    """Join the configured Ray cluster, or start a private local instance; reused across calls."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from an offline machine
    options = dict(namespace=cfg["ray"]["namespace"], log_to_driver=cfg["ray"]["log_to_driver"],
                   include_dashboard=False, configure_logging=True, logging_level="warning")
    if cfg["ray"]["address"] == "local":
        # address="local": a private instance even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=cfg["resources"]["num_cpus"], num_gpus=None if cfg["resources"]["gpus_per_actor"] else 0,
                 **options)
    else:
        ray.init(address=cfg["ray"]["address"], **options)
    atexit.register(ray.shutdown)


@ray.remote
class ModelWorker:
    """Holds one model (and tokenizer) and runs work items of any stage on it."""

    def __init__(self, model: dict, resources: dict):
        import torch

        from pipeline.engine.loading import load_model
        from pipeline.organisms import resolve

        torch.set_num_threads(resources["torch_threads"])
        self.model, self.tokenizer = load_model(resolve(model["path"]), dtype=model["dtype"],
                                                device=resources["device"],
                                                trust_remote_code=model["trust_remote_code"])
        self._weights_hash = None

    def describe(self) -> dict:
        """The model's shape and the hash of its weights as loaded (adapters merged, dtype applied)."""
        from pipeline.engine.adapters import get_adapter

        adapter = get_adapter(self.model)
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.model)
        return {"n_layers": adapter.n_layers, "n_heads": adapter.n_heads, "d_model": adapter.d_model,
                "family": adapter.family, "weights_hash": self._weights_hash, "pid": os.getpid()}

    def ping(self) -> int:
        return os.getpid()

    def run(self, task: str, item: dict) -> dict:
        """Call `task` ("module:function") as function(model, tokenizer, item) -> a small result dict."""
        module, function = task.split(":")
        return getattr(importlib.import_module(module), function)(self.model, self.tokenizer, item)


def weights_hash(model) -> str:
    """sha256 over the parameter names and bytes, in name order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


class WorkFailed(RuntimeError):
    """A work item could not be completed within resources.max_retries resubmissions."""


@dataclass
class StageStats:
    stage: str
    computed: int = 0
    reused: int = 0
    retried: int = 0
    seconds: float = 0.0


@dataclass
class WorkerPool:
    """A fixed set of model actors fed from a bounded window of work items."""

    cfg: dict
    actors: list = field(default_factory=list)

    def __post_init__(self):
        res = self.cfg["resources"]
        options = dict(num_cpus=res["cpus_per_actor"], num_gpus=res["gpus_per_actor"],
                       max_restarts=res["max_retries"])
        self.actors = [ModelWorker.options(**options).remote(self.cfg["model"], res) for _ in range(res["actors"])]

    def describe(self) -> dict:
        try:
            return ray.get(self.actors[0].describe.remote())
        except ray.exceptions.RayActorError as err:
            raise WorkFailed(f"the model actor could not start ({_first_line(err)}): check model.path "
                             "and resources") from None

    def map(self, task: str, items: list[dict], on_result: Callable[[dict, dict], None] | None = None,
            stats: StageStats | None = None, label: str | None = None) -> list[dict]:
        """Run `task` ("module:function") on each item on the actors, at most resources.max_in_flight
        queued per actor; `label` names the progress bar.

        Results come back in item order; `on_result(item, result)` runs on the driver as each finishes
        (to update a manifest). When an actor dies, Ray restarts it (reloading the model); its items are
        resubmitted, up to resources.max_retries times each, once a ping says it is back.
        """
        res = self.cfg["resources"]
        stage = label or task
        stats = stats or StageStats(stage)
        results: list[dict | None] = [None] * len(items)
        pending = deque(range(len(items)))
        attempts = [0] * len(items)
        load = [0] * len(self.actors)
        in_flight: dict = {}  # object ref -> (item index, actor index)
        recovering: dict = {}  # ping ref -> actor index, for actors being restarted
        with tqdm(total=len(items) + stats.reused, initial=stats.reused, desc=f"{stage:>9}", unit="item",
                  dynamic_ncols=True, leave=True) as bar:
            while pending or in_flight:
                ready = [a for a in range(len(self.actors)) if a not in recovering.values()]
                while pending and ready and min(load[a] for a in ready) < res["max_in_flight"]:
                    actor = min(ready, key=lambda a: load[a])
                    index = pending.popleft()
                    in_flight[self.actors[actor].run.remote(task, items[index])] = (index, actor)
                    load[actor] += 1
                [ref], _ = ray.wait(list(in_flight) + list(recovering), num_returns=1)
                if ref in recovering:
                    self._recovered(recovering, ref)
                    continue
                index, actor = in_flight.pop(ref)
                load[actor] -= 1
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as err:
                    attempts[index] += 1
                    if attempts[index] > res["max_retries"]:
                        raise WorkFailed(f"{stage} item {items[index].get('name', index)} failed "
                                         f"{attempts[index]} times, last: {_first_line(err)}") from None
                    stats.retried += 1
                    pending.appendleft(index)
                    if actor not in recovering.values():
                        recovering[self.actors[actor].ping.remote()] = actor
                    continue
                except ray.exceptions.RayTaskError as err:
                    raise _user_error(err) from None
                results[index] = result
                stats.computed += 1
                if on_result is not None:
                    on_result(items[index], result)
                bar.update()
        return results

    def _recovered(self, recovering: dict, ping) -> None:
        """A restarting actor answered its ping (back in service), or is still coming up (ping again)."""
        actor = recovering.pop(ping)
        try:
            ray.get(ping)
        except ray.exceptions.ActorUnavailableError:
            time.sleep(0.5)
            recovering[self.actors[actor].ping.remote()] = actor
        except ray.exceptions.ActorDiedError as err:
            raise WorkFailed(f"a model actor died for good (restarted resources.max_retries times): "
                             f"{_first_line(err)}") from None

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
        self.actors = []


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _user_error(err: ray.exceptions.RayTaskError) -> BaseException:
    """Bad input found inside a stage (a ValueError naming the problem) surfaces as itself, without
    Ray's remote traceback; anything else keeps the full remote traceback."""
    cause = getattr(err, "cause", None)
    if isinstance(cause, (ValueError, FileNotFoundError)):
        return cause
    return err


@contextmanager
def timed(stats: StageStats):
    """Add the wall time of the block to `stats.seconds`."""
    start = time.perf_counter()
    try:
        yield stats
    finally:
        stats.seconds += time.perf_counter() - start


# ---- the stage graph -----------------------------------------------------------------------------

@dataclass
class Sweep:
    """What the stages of one model's sweep share; the circuit step (issue 5) takes it too."""

    cfg: dict
    run_dir: Path
    pool: WorkerPool
    model_info: dict = field(default_factory=dict)
    provenance: dict = field(default_factory=dict)
    pairs_report: dict = field(default_factory=dict)
    shards: list[dict] = field(default_factory=list)
    stats: dict[str, StageStats] = field(default_factory=dict)

    def stage(self, name: str) -> StageStats:
        return self.stats.setdefault(name, StageStats(name))


def plan_shards(pairs: pa.Table, shard_size: int) -> list[dict]:
    """Pair shards: rows of one clean and one corrupted token length (the engine batches [P, T]), at
    most shard_size each, named by their pair ids (written into every output row) and the content of
    their token ids and answers."""
    by_length: dict[tuple[int, int], list[int]] = {}
    lengths = zip(pairs.column("seq_len").to_pylist(), pairs.column("align_offset").to_pylist())
    for row, (seq_len, offset) in enumerate(lengths):
        by_length.setdefault((seq_len, offset), []).append(row)
    columns = {c: pairs.column(c).to_pylist()
               for c in ("pair_id", "clean_ids", "corrupted_ids", "refusal_ids", "compliance_ids")}
    shards = []
    for seq_len, offset in sorted(by_length):
        rows = by_length[seq_len, offset]
        for start in range(0, len(rows), shard_size):
            part = rows[start:start + shard_size]
            content = {c: [values[r] for r in part] for c, values in columns.items()}
            shards.append({"rows": part, "seq_len": seq_len, "key": content_key(content)})
    return shards


def pairs_item(model, tokenizer, item: dict) -> dict:
    """Stage 1 as a work item: source the pairs, screen them on the model, publish pairs.arrow."""
    from pipeline.stages.pairs import build_pairs, source_pairs

    prompts = item["prompts"]
    pairs = source_pairs(item["model_path"], tokenizer, path=prompts["path"], n=prompts["n_pairs"],
                         seed=prompts["seed"], split=prompts["split"])
    result = build_pairs(model, tokenizer, pairs, align=prompts["align"], refusal_tokens=prompts["refusal_tokens"],
                         compliance_tokens=prompts["compliance_tokens"], answer_top_k=prompts["answer_top_k"],
                         generate=prompts["generate"],
                         max_new_tokens=prompts["max_new_tokens"])
    # The clean prompt's tokens as strings: labels for positions in heatmaps and diagrams.
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in result.table.column("clean_ids").to_pylist()]
    table = result.table.append_column("clean_tokens", pa.array(tokens, pa.list_(pa.string())))
    write_table(item["out"], table, {**item["provenance"], "pairs_report": json.dumps(result.report)})
    return {"path": item["out"], "sha256": sha256_file(item["out"]), "rows": table.num_rows,
            "report": result.report}


def pairs_hash(pairs: pa.Table) -> str:
    """sha256 of the pairs' content (ids, answers), independent of file metadata."""
    columns = ("pair_id", "clean_ids", "corrupted_ids", "refusal_ids", "compliance_ids")
    blob = json.dumps({c: pairs.column(c).to_pylist() for c in columns}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def stage_pairs(sweep: Sweep, manifest: Manifest) -> pa.Table:
    cfg, stats = sweep.cfg, sweep.stage("pairs")
    path = sweep.run_dir / "pairs.arrow"
    # A user's prompt file counts by its content: an edited file gives new pairs, never the old ones.
    prompts_file = sha256_file(cfg["prompts"]["path"]) if cfg["prompts"]["path"] else None
    key = content_key("pairs", PRODUCER, sweep.model_info["weights_hash"], cfg["model"]["path"], cfg["prompts"],
                      prompts_file)
    with timed(stats):
        if manifest.is_valid("pairs.arrow", key):
            stats.reused += 1
        else:
            item = {"name": "pairs", "model_path": cfg["model"]["path"], "prompts": cfg["prompts"],
                    "out": str(path), "provenance": sweep.provenance}
            [result] = sweep.pool.map("pipeline.orchestration:pairs_item", [item], stats=stats, label="pairs")
            manifest.add("pairs.arrow", result["sha256"], key=key, rows=result["rows"])
    pairs = read_table(path)
    sweep.pairs_report = json.loads(provenance(pairs).get("pairs_report", "{}"))
    return pairs


def run_sharded(sweep: Sweep, stage: str, folder: Path, items: list[dict]) -> list[Path]:
    """Run the items whose content-keyed output is not already finished (listed, checksum intact)."""
    stats = sweep.stage(stage)
    manifest = Manifest(folder, stage, {"config_hash": sweep.provenance["config_hash"]})
    with timed(stats):
        todo = []
        for item in items:
            if manifest.is_valid(Path(item["out"]).name):
                stats.reused += 1
            else:
                todo.append(item)

        def record(item, result):
            manifest.add(Path(result["path"]).name, result["sha256"], rows=result["rows"])

        sweep.pool.map(f"pipeline.stages.{stage}:run_item", todo, on_result=record, stats=stats, label=stage)
        manifest.finish([Path(item["out"]).name for item in items])
    return [Path(item["out"]) for item in items]


def stage_cache(sweep: Sweep) -> list[Path]:
    folder = sweep.run_dir / "activations"
    weights = sweep.model_info["weights_hash"]
    items = [{"name": f"cache {shard['key']}", "pairs": str(sweep.run_dir / "pairs.arrow"), "rows": shard["rows"],
              "out": str(folder / f"{content_key('cache', PRODUCER, weights, shard['key'])}.arrow"),
              "provenance": sweep.provenance} for shard in sweep.shards]
    return run_sharded(sweep, "cache", folder, items)


def stage_patch(sweep: Sweep) -> list[Path]:
    folder = sweep.run_dir / "effects"
    patching, weights = sweep.cfg["patching"], sweep.model_info["weights_hash"]
    items = []
    for shard in sweep.shards:
        for component in patching["components"]:
            for direction in patching["directions"]:
                work = {"component": component, "direction": direction, "metric": patching["metric"],
                        "per_position": component in patching["per_position"], "layers": patching["layers"],
                        "heads": patching["heads"] if component == "head" else None}
                key = content_key("patch", PRODUCER, weights, shard["key"], work)
                items.append({**work, "name": f"patch {component} {direction} {shard['key']}",
                              "pairs": str(sweep.run_dir / "pairs.arrow"), "rows": shard["rows"],
                              "model": sweep.cfg["model"]["name"], "batch_size": patching["batch_size"],
                              "out": str(folder / f"{key}.arrow"), "provenance": sweep.provenance})
    return run_sharded(sweep, "patch", folder, items)


def merge_effects(sweep: Sweep, shards: list[Path], manifest: Manifest) -> Path:
    """Effect shards -> effects.arrow (one table, shards in plan order)."""
    path = sweep.run_dir / "effects.arrow"
    key = content_key([p.name for p in shards])
    if not manifest.is_valid("effects.arrow", key):
        table = pa.concat_tables([read_table(p) for p in shards]).replace_schema_metadata(None)
        write_table(path, table, sweep.provenance)
        manifest.add("effects.arrow", key=key, rows=table.num_rows)
    return path


CIRCUIT_FILES = ("circuit.json", "circuit.svg", "circuit.png", "circuit.dot")


def stage_circuit(sweep: Sweep, manifest: Manifest) -> None:
    """The circuit step (pipeline.circuit) on a model actor: it needs forward passes (faithfulness,
    path patching), so it runs while the actors are up; skipped when its inputs are unchanged."""
    cfg = sweep.cfg
    if not cfg["circuit"]["enabled"]:
        return
    options = {**{k: v for k, v in cfg["circuit"].items() if k != "enabled"}, "metric": cfg["patching"]["metric"]}
    key = content_key("circuit", PRODUCER, sweep.model_info["weights_hash"], sweep.provenance["pairs_hash"], options)
    with timed(sweep.stage("circuit")) as stats:
        if all(manifest.is_valid(name, key) for name in CIRCUIT_FILES):
            stats.reused += 1
            return
        item = {"name": "circuit", "run_dir": str(sweep.run_dir), "model": cfg["model"]["name"], "cfg": options,
                "provenance": sweep.provenance}
        sweep.pool.map("pipeline.circuit:run_item", [item], stats=stats, label="circuit")
        for name in CIRCUIT_FILES:
            manifest.add(name, key=key)


@dataclass
class SweepOutcome:
    run_dir: Path
    model_info: dict
    provenance: dict
    pairs_report: dict
    stats: list[StageStats]
    summary: "pd.DataFrame"
    curves: dict
    circuit: dict | None


def write_config(run_dir: Path, cfg: dict) -> None:
    from omegaconf import OmegaConf

    from pipeline.store import publish_bytes

    publish_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(cfg)).encode())


def run_sweep(cfg: dict) -> SweepOutcome:
    """Every stage of one model's sweep, into cfg["output_dir"]. `cfg` is validated and plain."""
    from pipeline.config import config_hash
    from pipeline.render import layers_png
    from pipeline.report import write_report
    from pipeline.stages import aggregate

    run_dir = Path(cfg["output_dir"])
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, cfg)
    manifest = Manifest(run_dir, "run")
    start_ray(cfg)
    pool = WorkerPool(cfg)
    try:
        sweep = Sweep(cfg, run_dir, pool)
        with timed(sweep.stage("load")):
            sweep.model_info = pool.describe()
        sweep.provenance = {"config_hash": config_hash(cfg), "model_id": cfg["model"]["path"],
                            "weights_hash": sweep.model_info["weights_hash"]}
        pairs = stage_pairs(sweep, manifest)
        sweep.provenance["pairs_hash"] = pairs_hash(pairs)
        sweep.shards = plan_shards(pairs, cfg["prompts"]["shard_size"])
        stage_cache(sweep)
        effect_shards = stage_patch(sweep)
        with timed(sweep.stage("aggregate")):
            merge_effects(sweep, effect_shards, manifest)
            tokens = aggregate.position_tokens(pairs)
            summary = aggregate.run(run_dir, cfg["circuit"], sweep.provenance, tokens)
            curves = aggregate.layer_curves(summary)
            manifest.add("summary.arrow")
        stage_circuit(sweep, manifest)
        circuit = aggregate.load_circuit(run_dir)
    finally:
        pool.close()
    with timed(sweep.stage("render")):
        layers_png(summary, run_dir / "layers.png", f"{cfg['name']}: {cfg['model']['name']}")
        write_report(run_dir / "report.md", cfg, sweep.model_info, sweep.pairs_report, list(sweep.stats.values()),
                     summary, curves, circuit)
    for name in ("config.yaml", "layers.png", "report.md"):
        manifest.add(name)
    manifest.provenance = sweep.provenance
    manifest.finish(list(manifest.files))
    return SweepOutcome(run_dir, sweep.model_info, sweep.provenance, sweep.pairs_report,
                        list(sweep.stats.values()), summary, curves, circuit)
