"""The room that the sweeps of one command share on one Ray cluster (a --multirun's jobs, run at once).

Each sweep has its own pool of model actors (pipeline.run.workers.WorkerPool), at most
`resources.actors` of them, each asking `cpus_per_actor` CPUs and `gpus_per_actor` GPUs. A pool tells
the room how many actors its work could use right now (its queued and running items, at most
`resources.actors`); the room divides the cluster between the pools that want actors, one actor to each
in turn while they fit (so four models on sixteen GPUs get four each). A pool grows towards its share as
room frees up. It never gives back an actor its work could use; once its queue runs short (the end of a
stage, a one-item stage) it gives what it cannot use to a pool below its share, retiring those actors as
their items finish. Room nobody else asks for stays with the pool that has it (its actors keep their model
loaded for its next stage). A pool keeps its last actor while its sweep runs: a sweep that finds no room
at all waits until another's pool shrinks or closes.

Room is counted in CPUs and GPUs summed over the cluster's nodes. Where actors of different sizes leave
a node's remainder unusable, Ray keeps an actor pending until it fits; the pool then waits for its
placement as it does for any actor.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import ray


@dataclass
class _Member:
    cpus: float
    gpus: float
    wanted: int = 0  # actors its work could use now
    held: int = 0  # actors it has started and not retired (placed or waiting for placement)


class Room:
    """The cluster's CPUs and GPUs, shared out between pools as their work asks (see the module's doc)."""

    def __init__(self, cpus: float, gpus: float):
        self.total = {"CPU": float(cpus), "GPU": float(gpus)}
        self._members: dict[int, _Member] = {}  # pool id -> its ask; insertion order is the order shares go round
        self._lock = threading.Condition()
        # Set on Ctrl-C: every pool ends its current wait and stops its sweep (each raises KeyboardInterrupt).
        self.stopping = threading.Event()

    @classmethod
    def of_cluster(cls) -> Room:
        """The room of the running Ray instance (every node's CPUs and GPUs)."""
        resources = ray.cluster_resources()
        return cls(resources.get("CPU", 0.0), resources.get("GPU", 0.0))

    def join(self, pool: object, cpus: float, gpus: float) -> None:
        with self._lock:
            self._members[id(pool)] = _Member(cpus, gpus)

    def leave(self, pool: object) -> None:
        """The pool closed: its actors' room goes to the others."""
        with self._lock:
            self._members.pop(id(pool), None)
            self._lock.notify_all()

    def _shares(self) -> dict[int, int]:
        """Actors per pool: one to each pool that wants more, in turn, while one more fits the cluster
        (called holding the lock)."""
        shares = {key: 0 for key in self._members}
        free = dict(self.total)
        asking = [key for key, m in self._members.items() if m.wanted > 0]
        while asking:
            for key in list(asking):
                member = self._members[key]
                if shares[key] >= member.wanted or not _fits(free, member):
                    asking.remove(key)
                    continue
                shares[key] += 1
                free["CPU"] -= member.cpus
                free["GPU"] -= member.gpus
        return shares

    def resize(self, pool: object, wanted: int) -> int:
        """How the pool should change its number of actors now that its work could use `wanted`: n > 0
        start n more (the room is taken for them), n < 0 retire -n once their items are done (the room is
        counted as given back at once: an actor started for it is placed by Ray when the room is free),
        0 stay."""
        with self._lock:
            member = self._members[id(pool)]
            member.wanted = wanted
            share = self._shares()[id(pool)]
            if member.held < share:
                free = self._free()
                more = 0
                while member.held + more < share and _fits(free, member):
                    free["CPU"] -= member.cpus
                    free["GPU"] -= member.gpus
                    more += 1
                member.held += more
                return more
            starved = any(self._members[key].held < s for key, s in self._shares().items() if key != id(pool))
            # Busy actors are never taken back: an actor's start-up (a process, a model load) is too dear to
            # spend on fairness alone. What the pool's work cannot use goes to a pool below its share.
            fewer = member.held - max(share, wanted, 1)
            if fewer > 0 and starved:
                member.held -= fewer
                self._lock.notify_all()
                return -fewer
            return 0

    def released(self, pool: object, n: int) -> None:
        """The pool let n actors go outside `resize` (WorkerPool.keep)."""
        with self._lock:
            member = self._members.get(id(pool))
            if member is not None:
                member.held -= n
                self._lock.notify_all()

    def wait(self, seconds: float) -> None:
        """Until another pool gives room back (or `seconds` pass, or Ctrl-C)."""
        with self._lock:
            if not self.stopping.is_set():
                self._lock.wait(seconds)

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            self._lock.notify_all()

    def _free(self) -> dict[str, float]:
        free = dict(self.total)
        for member in self._members.values():
            free["CPU"] -= member.held * member.cpus
            free["GPU"] -= member.held * member.gpus
        return free


def _fits(free: dict[str, float], member: _Member) -> bool:
    # The small tolerance keeps 0.1 x 10 from falling short of 1.
    return free["CPU"] + 1e-9 >= member.cpus and free["GPU"] + 1e-9 >= member.gpus
