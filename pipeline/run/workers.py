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
import os
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Union

import ray
import torch
from tqdm import tqdm

from pipeline.engine.adapters import get_adapter
from pipeline.engine.loading import load_model
from pipeline.organisms import resolve
from pipeline.run.logs import LOG_FILE, actor_logging
from pipeline.stages import STAGES
from pipeline.store import file_entry

# A stage's name in pipeline.stages.STAGES, or any callable (model, tokenizer, item) -> published paths
# (the scheduler's tests use stand-ins whose compute is a wait or a crash).
Stage = Union[str, Callable[..., "list[Path]"]]


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

    def __init__(self, model: dict, resources: dict, log_path: str):
        actor_logging(log_path)
        torch.set_num_threads(resources["torch_threads"])
        self.model, self.tokenizer = load_model(resolve(model["path"]), dtype=model["dtype"],
                                                device=resources["device"],
                                                trust_remote_code=model["trust_remote_code"])
        self._weights_hash = None

    def describe(self) -> dict:
        """The model's shape and the hash of its weights as loaded (adapters merged, dtype applied)."""
        adapter = get_adapter(self.model)
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.model)
        return {"n_layers": adapter.n_layers, "n_heads": adapter.n_heads, "d_model": adapter.d_model,
                "family": adapter.family, "weights_hash": self._weights_hash, "pid": os.getpid()}

    def ping(self) -> int:
        return os.getpid()

    def run(self, stage: Stage, item: dict) -> list[dict]:
        """Run one work item of `stage`; returns each file it published as {"path", "sha256", "rows"},
        the entries the driver records in its manifest."""
        compute = STAGES[stage] if isinstance(stage, str) else stage
        return [file_entry(path) for path in compute(self.model, self.tokenizer, item)]


def weights_hash(model) -> str:
    """sha256 over the parameter names and bytes, in name order."""
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
        log_path = str(Path(self.cfg["output_dir"]).resolve() / LOG_FILE)
        self.actors = [ModelWorker.options(**options).remote(self.cfg["model"], res, log_path)
                       for _ in range(res["actors"])]

    def describe(self) -> dict:
        try:
            return ray.get(self.actors[0].describe.remote())
        except ray.exceptions.RayActorError as err:
            raise WorkFailed(f"the model actor could not start ({_first_line(err)}): check model.path "
                             "and resources") from None

    def map(self, stage: Stage, items: list[dict], on_result: Callable[[dict, list[dict]], None] | None = None,
            stats: StageStats | None = None) -> list[list[dict]]:
        """Run `stage`'s work items on the actors, at most resources.max_in_flight queued per actor.

        Results (each item's published files) come back in item order; `on_result(item, files)` runs on
        the driver as each finishes (to update a manifest). When an actor dies, Ray restarts it (reloading the model); its items are
        resubmitted, up to resources.max_retries times each, once a ping says it is back.
        """
        res = self.cfg["resources"]
        stats = stats or StageStats(stage if isinstance(stage, str) else stage.__name__)
        results: list[list[dict] | None] = [None] * len(items)
        pending = deque(range(len(items)))
        attempts = [0] * len(items)
        load = [0] * len(self.actors)
        in_flight: dict = {}  # object ref -> (item index, actor index)
        recovering: dict = {}  # ping ref -> actor index, for actors being restarted
        with tqdm(total=len(items) + stats.reused, initial=stats.reused, desc=f"{stats.stage:>9}", unit="item",
                  dynamic_ncols=True, leave=True) as bar:
            while pending or in_flight:
                ready = [a for a in range(len(self.actors)) if a not in recovering.values()]
                while pending and ready and min(load[a] for a in ready) < res["max_in_flight"]:
                    actor = min(ready, key=lambda a: load[a])
                    index = pending.popleft()
                    in_flight[self.actors[actor].run.remote(stage, items[index])] = (index, actor)
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
                        raise WorkFailed(f"{stats.stage} item {items[index].get('name', index)} failed "
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
