"""Ray: model-holding actors, a bounded window of work items, retries, a progress bar per stage.

Actors load the model once and then take many work items. A work item is a stage's small frozen
dataclass (paths, row indices, its part of the config), handed over with the stage's compute function
itself (pipeline.stages): tensors never travel through Ray, each item reads
its inputs from Arrow files and publishes its output atomically under a content-keyed name, so
running an item twice is harmless. That is what makes retries safe: when an actor dies (its process
killed, its node lost) Ray restarts it, and the driver resubmits the items it held.

`ray.address=local` (the default) starts a private Ray instance on this machine with token
authentication left on; any other address joins that cluster. CPU-only resources never ask for GPUs.
"""
from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray
import ray._private.ray_constants as ray_constants
import torch
from tqdm import tqdm

from pipeline.engine.adapters import get_adapter
from pipeline.engine.loading import load_model
from pipeline.messages import error_line, first_line, notice_line
from pipeline.organisms import resolve
from pipeline.outputs.files import RunFolder
from pipeline.run.logs import actor_logging, stage_progress
from pipeline.run.scheduler import Room
from pipeline.schema import ModelConfig, PatchsweepConfig, ResourcesConfig
from pipeline.store import file_entry

# A stage's compute function, (model, tokenizer, item) -> the paths it published (pipeline.stages; the
# scheduler's tests hand over stand-ins whose compute is a wait or a crash).
Compute = Callable[..., "list[Path]"]


def start_ray(cfg: PatchsweepConfig) -> None:
    """Join the configured Ray cluster, or start a private local instance; reused across calls.

    A cluster that cannot be reached is named in one line: at once when nothing listens at its address,
    after `ray.connect_timeout_s` when something listens but never answers as Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage reports from an offline machine
    options = dict(namespace=cfg.ray.namespace, log_to_driver=cfg.ray.log_to_driver,
                   include_dashboard=False, configure_logging=True, logging_level="warning")
    address = cfg.ray.address
    with _own_sigterm():
        _init(cfg, address, options)
    atexit.register(ray.shutdown)


@contextmanager
def _own_sigterm():
    """ray.init installs its own SIGTERM handler in the driver (exit at once, with a traceback): the
    command's (pipeline.sigterm: stop as Ctrl-C does) is put back."""
    before = signal.getsignal(signal.SIGTERM)
    try:
        yield
    finally:
        if threading.current_thread() is threading.main_thread() and before is not None:
            signal.signal(signal.SIGTERM, before)


def _init(cfg: PatchsweepConfig, address: str, options: dict) -> None:
    if address == "local":
        # Ray binds every server (GCS, raylet, workers, agents) to the node's IP address, which it takes
        # to be the loopback address only when this flag is off; there is no public option. A private
        # instance serves this machine alone, so it listens on 127.0.0.1 only.
        ray_constants.ENABLE_RAY_CLUSTER = False
        # address="local": a private instance even when a `ray start` cluster runs on this machine.
        ray.init(address="local", num_cpus=cfg.resources.num_cpus,
                 num_gpus=None if cfg.resources.gpus_per_actor else 0, **options)
    else:
        seconds = cfg.ray.connect_timeout_s
        _probe_cluster(address, seconds)
        with _deadline(seconds, f"the Ray cluster at ray.address={address} did not answer within "
                                f"{seconds:g} s (ray.connect_timeout_s): check that it is a Ray head's address"):
            try:
                ray.init(address=address, **options)
            except ConnectionError as err:
                raise RayUnavailable(f"cannot join a Ray cluster at ray.address={address} ({first_line(err)}): "
                                     "start one (ray start --head), or use ray.address=local") from None


class RayUnavailable(RuntimeError):
    """Ray cannot give the sweep what it asks for: a cluster to join, or room for its model actors."""


def _probe_cluster(address: str, seconds: float) -> None:
    """A TCP connection to the cluster's address (host:port, ray://host:port): refused, unresolvable or
    unreachable addresses fail here in seconds rather than in Ray's minutes of retries."""
    if address == "auto":
        return  # Ray looks the address up itself and says at once when it finds none
    host, _, port = address.split("://")[-1].rpartition(":")  # its form is checked by pipeline.validation
    try:
        socket.create_connection((host, int(port)), timeout=min(seconds, 10)).close()
    except (OSError, ValueError) as err:
        raise RayUnavailable(f"cannot reach the Ray cluster at ray.address={address} "
                             f"({getattr(err, 'strerror', None) or err}): start it (ray start --head), fix "
                             "ray.address, or use ray.address=local") from None


@contextmanager
def _deadline(seconds: float, message: str):
    """Leave the process with `message` if the block is still running after `seconds`. Ray's connect
    loop runs in C++ and lets no Python exception in before its own 30-second waits end; nothing has
    been computed while connecting, so exiting at once loses nothing. Meanwhile what the block writes
    to stderr is held back (Ray's C++ client logs every failed attempt): the command's line is the one
    line the user sees, whichever way the block ends."""
    terminal = os.dup(2)
    held = tempfile.TemporaryFile()
    os.dup2(held.fileno(), 2)

    def give_up():
        os.write(terminal, f"{error_line(message)}\n".encode())
        os._exit(2)

    timer = threading.Timer(seconds, give_up)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()
        os.dup2(terminal, 2)
        os.close(terminal)
        held.close()


@ray.remote
class ModelWorker:
    """Holds one model (and tokenizer) and runs work items of any stage on it.

    The model loads on first use, not in the constructor: an actor answers `ping` as soon as Ray has
    placed it, so the pool can tell an actor waiting for room from one loading its model (and a
    restarted actor reloads it with its first item)."""

    def __init__(self, model: ModelConfig, resources: ResourcesConfig, log_path: str):
        actor_logging(log_path)
        torch.set_num_threads(resources.torch_threads)
        self.spec, self.device = model, resources.device
        self.model = self.tokenizer = None
        self._weights_hash = None

    def _load(self) -> None:
        if self.model is None:
            self.model, self.tokenizer = load_configured(self.spec, self.device)

    def describe(self) -> dict:
        """The model's shape, the hash of its weights as loaded (adapters merged, dtype applied) and the
        hash of its tokenizer (vocabulary, special tokens, chat template)."""
        self._load()
        adapter = get_adapter(self.model)
        if self._weights_hash is None:
            self._weights_hash = weights_hash(self.model)
        return {"n_layers": adapter.n_layers, "n_heads": adapter.n_heads, "d_model": adapter.d_model,
                "family": adapter.family, "weights_hash": self._weights_hash,
                "tokenizer_hash": tokenizer_hash(self.tokenizer), "pid": os.getpid()}

    def ping(self) -> int:
        return os.getpid()

    def run(self, compute: Compute, item: Any) -> list[dict]:
        """Run one work item; returns each file it published as {"path", "sha256", "rows"}, the entries
        the driver records in its manifest."""
        self._load()
        return [file_entry(path) for path in compute(self.model, self.tokenizer, item)]


def load_configured(spec: ModelConfig, device: str):
    """(model, tokenizer) as a run's config names them: what every model actor loads, and `patchsweep compare`."""
    return load_model(resolve(spec.path, spec.checkpoint), dtype=spec.dtype, device=device,
                      trust_remote_code=spec.trust_remote_code)


def weights_hash(model) -> str:
    """sha256 over the parameter names and bytes, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 over what turns a prompt into token ids: the tokenizer's own serialisation (vocabulary,
    merges, normalisation), its special tokens and its chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else
                   json.dumps(tokenizer.get_vocab(), sort_keys=True)).encode())
    digest.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    digest.update(str(tokenizer.chat_template or "").encode())
    return digest.hexdigest()


class WorkFailed(RuntimeError):
    """A work item could not be completed within resources.max_retries resubmissions, or the model could
    not be loaded."""


@dataclass
class StageStats:
    stage: str
    computed: int = 0
    reused: int = 0
    retried: int = 0
    seconds: float = 0.0


@dataclass
class Background:
    """One work item on an actor of its own (`WorkerPool.start`) while `map` feeds the pool's other actors."""
    compute: Compute
    item: Any
    actor: int  # its index in the pool
    ref: ray.ObjectRef
    started: float  # time.perf_counter()
    ended: float | None = None  # when the pool saw its result come in


def actors_that_fit(nodes: list[dict], cpus: float, gpus: float) -> int:
    """How many actors of `cpus` CPUs (> 0) and `gpus` GPUs the nodes (each a dict of total resources, as
    `ray.nodes()` reports them) can hold at once. (The small tolerance keeps 0.1 x 10 from falling short of 1.)"""
    fit = 0
    for node in nodes:
        by_cpu = math.floor(node.get("CPU", 0) / cpus + 1e-9)
        fit += min(by_cpu, math.floor(node.get("GPU", 0) / gpus + 1e-9)) if gpus else by_cpu
    return fit


def _asks(res: ResourcesConfig) -> str:
    """What one model actor asks Ray for, in words."""
    gpus = f" and {res.gpus_per_actor:g} GPU" if res.gpus_per_actor else ""
    return f"{res.cpus_per_actor:g} CPU{gpus} (resources.cpus_per_actor{', resources.gpus_per_actor' if gpus else ''})"


def check_room(cfg: PatchsweepConfig, nodes: list[dict] | None = None) -> int:
    """Refuse at once, naming what was asked, what Ray has and which key to lower, a request for model
    actors that can never be placed; returns how many fit. A cluster (which may grow) that fits some
    but not all of them is told so, and the rest wait for room. `nodes`: each node's total resources
    (default: the running Ray's live nodes)."""
    res = cfg.resources
    if nodes is None:
        nodes = [node["Resources"] for node in ray.nodes() if node["Alive"]]
    total_cpus = sum(n.get("CPU", 0) for n in nodes)
    total_gpus = sum(n.get("GPU", 0) for n in nodes)
    has = f"{total_cpus:g} CPU{'s' if total_cpus != 1 else ''}, {total_gpus:g} GPU{'s' if total_gpus != 1 else ''}"
    where = "this machine's Ray instance" if cfg.ray.address == "local" else "the Ray cluster"
    fit = actors_that_fit(nodes, res.cpus_per_actor, res.gpus_per_actor)
    if fit == 0:
        raise RayUnavailable(f"a model actor asks {_asks(res)}, more than any node of {where} has ({has} "
                             f"over {len(nodes)} node{'s' if len(nodes) != 1 else ''}): lower them, or add a node "
                             "that has them")
    if fit < res.actors:
        if cfg.ray.address == "local":  # a private instance never grows
            raise RayUnavailable(f"resources.actors={res.actors} model actors of {_asks(res)} do not fit "
                                 f"in {where} ({has}): set resources.actors={fit} or lower "
                                 "resources.cpus_per_actor")
        notice(f"{where} holds {fit} of the {res.actors} model actors asked for (each {_asks(res)}; it has "
                f"{has}): the sweep starts on those placed, the rest join as room frees up "
                "(lower resources.actors to ask for fewer)")
    return fit


PLACEMENT_NOTICE_S = 30.0


def notice(message: str) -> None:
    """A line on the terminal that leaves the progress bars intact."""
    tqdm.write(notice_line(message), file=sys.stderr)


@dataclass
class _Batch:
    """The items of one `WorkerPool.map` and where each one is."""
    compute: Compute
    items: list
    stats: StageStats
    on_result: Callable[[Any, list[dict]], None] | None
    results: list = field(init=False)  # each item's published files, once it is done
    pending: deque = field(init=False)  # item indices not yet submitted (or to resubmit)
    attempts: list = field(init=False)  # per item, how many times its actor died on it
    in_flight: dict = field(default_factory=dict)  # object ref -> (item index, actor index)

    def __post_init__(self):
        self.results = [None] * len(self.items)
        self.pending = deque(range(len(self.items)))
        self.attempts = [0] * len(self.items)

    def done(self, index: int, files: list[dict]) -> None:
        self.results[index] = files
        self.stats.computed += 1
        if self.on_result is not None:
            self.on_result(self.items[index], files)


@dataclass
class WorkerPool:
    """The model actors of one sweep, fed from a bounded window of work items.

    An actor takes work once Ray has placed it (its first ping answered). While none is placed, the
    pool says every `PLACEMENT_NOTICE_S` how long it has waited and gives up after
    resources.placement_timeout_s. Alone, the pool starts resources.actors actors at once; sharing a
    `room` with other sweeps (pipeline.run.scheduler), it starts as many as its work and its share of the
    room allow, up to resources.actors, and gives actors back when another sweep needs the room."""

    cfg: PatchsweepConfig
    room: Room | None = None
    actors: list = field(default_factory=list)  # every actor started; a retired one stays as None (indices hold)
    placed: set = field(default_factory=set)  # indices of actors Ray has placed
    placing: dict = field(default_factory=dict)  # first-ping ref -> actor index, for actors not yet placed
    created: float = 0.0  # when the pool's first actor was started (its placement time limit counts from then)
    # Actor index -> its process id and when (time.time()) Ray placed it and the pool let it go: what the
    # sweep's actors cost, and how busy they were kept (bench/bench_scheduler.py).
    lifetimes: dict = field(default_factory=dict)
    draining: set = field(default_factory=set)  # actors given back to the room: fed no more, retired once idle
    background: dict = field(default_factory=dict)  # actor index -> the Background item it runs (map skips it)

    def __post_init__(self):
        res = self.cfg.resources
        check_room(self.cfg)
        self._options = dict(num_cpus=res.cpus_per_actor, num_gpus=res.gpus_per_actor,
                             max_restarts=res.max_retries)
        self._log_path = str(RunFolder(self.cfg.output_dir).run_log.resolve())
        if self.room is None:
            self._start(res.actors)
        else:
            self.room.join(self, res.cpus_per_actor, res.gpus_per_actor)

    def _start(self, n: int) -> None:
        if not self.actors:
            self.created = time.monotonic()
        for _ in range(n):
            actor = ModelWorker.options(**self._options).remote(self.cfg.model, self.cfg.resources,
                                                                self._log_path)
            self.placing[actor.ping.remote()] = len(self.actors)
            self.actors.append(actor)

    def _retire(self, index: int) -> None:
        for ref, placing in list(self.placing.items()):
            if placing == index:
                del self.placing[ref]
        self.placed.discard(index)
        if index in self.lifetimes:
            self.lifetimes[index]["retired"] = time.time()
        ray.kill(self.actors[index])
        self.actors[index] = None

    def _rebalance(self, wanted: int, load: list[int], recovering: dict) -> None:
        """Sharing a room: start the actors the pool's work could use and its share allows, or, while another
        sweep waits below its share, stop feeding some (draining) and retire each once its items are done."""
        if self.room is None:
            return
        if self.room.stopping.is_set():
            raise KeyboardInterrupt
        change = self.room.resize(self, min(wanted + len(self.background), self.cfg.resources.actors))
        if change > 0:
            self._start(change)
            load.extend([0] * change)
        elif change < 0:
            # The least loaded drain soonest; actors still waiting for placement have loaded nothing yet.
            fed = [a for a in range(len(self.actors)) if self.actors[a] is not None and a not in self.draining
                   and a not in recovering.values() and a not in self.background]
            self.draining.update(sorted(fed, key=lambda a: (load[a], a in self.placed))[:-change])
        for index in [a for a in self.draining if load[a] == 0 and a not in recovering.values()]:
            self.draining.discard(index)
            self._retire(index)

    def describe(self) -> dict:
        """The model as the first placed actor loaded it (see ModelWorker.describe)."""
        while not self.placed:
            self._rebalance(1, [0] * len(self.actors), {})
            self._await_placement([])
        try:
            return ray.get(self.actors[min(self.placed)].describe.remote())
        except (ray.exceptions.RayActorError, ray.exceptions.RayTaskError) as err:
            cause = getattr(err, "cause", None) or err
            raise WorkFailed(f"the model could not be loaded ({first_line(cause)}): check model.path and "
                             "model.dtype") from None

    def _await_placement(self, others: list) -> list:
        """Wait for an actor to be placed or for one of `others` (object refs) to finish; returns the
        finished ones among `others`. Says how long it has waited while no actor is placed."""
        refs = list(self.placing) + others
        res = self.cfg.resources
        if not refs:  # sharing a room that has none for this pool yet: wait for another pool to give some back
            self.room.wait(PLACEMENT_NOTICE_S)
            return []
        left = res.placement_timeout_s - (time.monotonic() - self.created)
        done, _ = ray.wait(refs, num_returns=1, timeout=PLACEMENT_NOTICE_S if self.placed else
                           min(PLACEMENT_NOTICE_S, max(left, 0.1)))
        for ref in done:
            if ref in self.placing:
                self._placed(ref)
        if not done and not self.placed:
            waited = time.monotonic() - self.created
            free = ray.available_resources()
            room = (f"each asks {_asks(res)} and the cluster has {free.get('CPU', 0):g} CPUs, "
                    f"{free.get('GPU', 0):g} GPUs free")
            if waited >= res.placement_timeout_s:
                raise RayUnavailable(f"no model actor was placed within resources.placement_timeout_s="
                                     f"{res.placement_timeout_s:g} s ({room}): free room on the cluster, or "
                                     "lower resources.cpus_per_actor")
            notice(f"waiting for room: no model actor placed after {waited:.0f} s ({room}); giving up after "
                    f"resources.placement_timeout_s={res.placement_timeout_s:g} s")
        return [ref for ref in done if ref in set(others)]

    def _placed(self, ping) -> None:
        """An actor's first ping answered: Ray has placed it."""
        index = self.placing.pop(ping)
        try:
            pid = ray.get(ping)
        except ray.exceptions.RayActorError as err:
            raise WorkFailed(f"a model actor could not start ({first_line(err)}): check resources") from None
        self.placed.add(index)
        self.lifetimes[index] = {"pid": pid, "placed": time.time(), "retired": None}

    def start(self, compute: Compute, item: Any) -> Background | None:
        """Run one work item on a placed actor of its own, beside the stages `map` runs on the others, until
        `finish`. None when the pool has no actor to spare (fewer than two placed): run it with `map` then."""
        if self.placing:
            done, _ = ray.wait(list(self.placing), num_returns=len(self.placing), timeout=0)
            for ping in done:
                self._placed(ping)
        free = [a for a in sorted(self.placed) if a not in self.draining and a not in self.background]
        if len(free) < 2:
            return None
        actor = free[-1]
        self.background[actor] = Background(compute, item, actor, self.actors[actor].run.remote(compute, item),
                                            time.perf_counter())
        return self.background[actor]

    def finish(self, job: Background, stats: StageStats) -> list[dict]:
        """Wait for a `start`ed item's files. Its seconds count from its start to its result; an actor that
        died on it is restarted by Ray and the item runs again through `map` (resources.max_retries)."""
        # A pool sharing a room looks up every second, as `map` does: Ctrl-C stops every sweep of a multirun.
        while not ray.wait([job.ref], timeout=1.0)[0]:
            if self.room is not None and self.room.stopping.is_set():
                raise KeyboardInterrupt
        try:
            result = ray.get(job.ref)
        except ray.exceptions.RayTaskError as err:
            raise _user_error(err) from None
        except ray.exceptions.RayActorError:
            result = None
        stats.seconds += (job.ended or time.perf_counter()) - job.started
        del self.background[job.actor]
        if result is None:
            stats.retried += 1
            with timed(stats):
                return self.map(job.compute, [job.item], stats=stats)[0]
        stats.computed += 1
        return result

    def map(self, compute: Compute, items: list, on_result: Callable[[Any, list[dict]], None] | None = None,
            stats: StageStats | None = None) -> list[list[dict]]:
        """Run `compute` on each item on the actors, at most resources.max_in_flight queued per actor.

        Results (each item's published files) come back in item order; `on_result(item, files)` runs on
        the driver as each finishes (to update a manifest). When an actor dies, Ray restarts it (reloading
        the model); its items are resubmitted, up to resources.max_retries times each, once a ping says it
        is back. Between waits the pool looks at the room (actors to start, give back, or Ctrl-C)."""
        batch = _Batch(compute, items, stats or StageStats(compute.__name__), on_result)
        load = [0] * len(self.actors)  # items queued on each actor
        recovering: dict = {}  # ping ref -> actor index, for actors being restarted
        with stage_progress(len(items) + batch.stats.reused, batch.stats.reused, f"{batch.stats.stage:>9}") as bar:
            while batch.pending or batch.in_flight:
                self._rebalance(min(self.cfg.resources.actors, len(batch.pending) + len(batch.in_flight)), load,
                                recovering)
                self._dispatch(batch, load, recovering)
                for ref in self._wait(batch, recovering):
                    if self._settle(ref, batch, load, recovering):
                        bar.update()
        # Between stages the sweep keeps one actor (its model loaded); the others may go to another sweep.
        self._rebalance(1, load, recovering)
        return batch.results

    def _dispatch(self, batch: _Batch, load: list[int], recovering: dict) -> None:
        """Queued items to the least loaded actors that take work, up to resources.max_in_flight each."""
        ready = [a for a in sorted(self.placed) if a not in recovering.values() and a not in self.draining
                 and a not in self.background]
        while batch.pending and ready and min(load[a] for a in ready) < self.cfg.resources.max_in_flight:
            actor = min(ready, key=lambda a: load[a])
            index = batch.pending.popleft()
            batch.in_flight[self.actors[actor].run.remote(batch.compute, batch.items[index])] = (index, actor)
            load[actor] += 1

    def _wait(self, batch: _Batch, recovering: dict) -> list:
        """Until an item, a restarting actor's ping or a background item is done (at most one of them):
        while an actor waits for placement, it joins as soon as Ray places it; a pool sharing a room looks
        up every second (Ctrl-C, room given back by another sweep)."""
        waiting = list(batch.in_flight) + list(recovering)
        running = [job.ref for job in self.background.values() if job.ended is None]
        if self.placing or not waiting:
            return self._await_placement(waiting + running)
        done, _ = ray.wait(waiting + running, num_returns=1, timeout=None if self.room is None else 1.0)
        return done

    def _settle(self, ref, batch: _Batch, load: list[int], recovering: dict) -> bool:
        """What a finished ref means: a background item's end (its time stops here; `finish` reads it), a
        restarted actor back in service, or one of the batch's items done (True) or lost with its actor."""
        background = {job.ref: job for job in self.background.values()}
        if ref in background:
            background[ref].ended = time.perf_counter()
            return False
        if ref in recovering:
            self._recovered(recovering, ref)
            return False
        index, actor = batch.in_flight.pop(ref)
        load[actor] -= 1
        try:
            result = ray.get(ref)
        except ray.exceptions.RayActorError as err:
            self._resubmit(batch, index, actor, err, recovering)
            return False
        except ray.exceptions.RayTaskError as err:
            raise _user_error(err) from None
        batch.done(index, result)
        return True

    def _resubmit(self, batch: _Batch, index: int, actor: int, err: BaseException, recovering: dict) -> None:
        """An item whose actor died goes back to the front of the queue, at most resources.max_retries
        times; its actor takes work again once a ping says Ray has restarted it."""
        batch.attempts[index] += 1
        if batch.attempts[index] > self.cfg.resources.max_retries:
            name = getattr(batch.items[index], "name", index)
            raise WorkFailed(f"{batch.stats.stage} item {name} failed {batch.attempts[index]} times, last: "
                             f"{first_line(err)}") from None
        batch.stats.retried += 1
        batch.pending.appendleft(index)
        if actor not in recovering.values():
            recovering[self.actors[actor].ping.remote()] = actor

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
                             f"{first_line(err)}") from None

    def keep(self, n: int) -> None:
        """Between stages, when the rest of the sweep runs at most `n` items at a time (besides its
        background items): let every other actor go (to another sweep sharing the room, or back to the cluster)."""
        live = [a for a, actor in enumerate(self.actors) if actor is not None and a not in self.background]
        # Placed actors (their model loaded) are the ones kept; the room already counts draining ones as given back.
        for index in sorted(live, key=lambda a: (a in self.draining, a not in self.placed))[n:]:
            if index in self.draining:
                self.draining.discard(index)
            elif self.room is not None:
                self.room.released(self, 1)
            self._retire(index)

    def close(self) -> None:
        for index, actor in enumerate(self.actors):
            if actor is not None:
                self._retire(index)
        self.actors, self.background = [], {}
        if self.room is not None:
            self.room.leave(self)



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
