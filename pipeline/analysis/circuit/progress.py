"""Where the circuit step is, for the driver's progress bar (pipeline.stages.circuit.follow_progress).

`find_circuit` names its phases once (pipeline.analysis.circuit.method.PHASES) and hands them to
`Progress.plan`; each `phase(name)` block must be the next of them, so the bar's "phase i of n" and the
calls cannot drift apart. Within a phase the evaluator counts the (circuit, pair) rows it computes, and a
phase with a known number of steps (the stability phase's resamples) counts those.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

log = logging.getLogger(__name__)


class Progress:
    """The phase, the steps of the phase done (of a total, when known) and the (circuit, pair) rows
    computed, with an estimate of the phase's time left; seconds per finished phase. Each phase's end is
    logged; `report` (when given) receives `state()` at every phase and at most once a second in between."""

    def __init__(self, report: Callable[[dict], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.report, self.rows = report, 0
        self.phases: tuple[str, ...] = ()
        self.phase_name, self.index, self.done, self.total, self.unit = "", 0, 0, None, "rows"
        self._began = self._sent = time.perf_counter()

    def plan(self, phases: Sequence[str]) -> None:
        self.phases = tuple(phases)

    @contextmanager
    def phase(self, name: str, total: int | None = None, unit: str = "rows") -> Iterator[None]:
        """The block is phase `name`, the next planned one; `total` steps of `unit` when known."""
        planned = self.phases[self.index] if self.index < len(self.phases) else None
        if name != planned:
            raise RuntimeError(f"circuit step: phase {name!r} started where {planned!r} was planned: "
                               "keep find_circuit's calls in the order of its PHASES")
        self.phase_name, self.index = name, self.index + 1
        self.done, self.total, self.unit = 0, total, unit
        self._began = time.perf_counter()
        self._send(force=True)
        yield
        self.seconds[name] = round(time.perf_counter() - self._began, 2)
        log.info("circuit step: %s took %.1fs", name, self.seconds[name])

    def expect(self, total: int) -> None:
        self.total = total
        self._send(force=True)

    def advance(self, n: int = 1, unit: str = "rows") -> None:
        if unit == "rows":
            self.rows += n
        if unit == self.unit:
            self.done += n
        self._send()

    def state(self) -> dict:
        """What the driver draws (the JSON the circuit stage publishes to its progress file)."""
        elapsed = time.perf_counter() - self._began
        left = elapsed / self.done * (self.total - self.done) if self.total and self.done else None
        return {"phase": self.phase_name, "index": self.index, "phases": len(self.phases), "done": self.done,
                "total": self.total, "unit": self.unit, "rows": self.rows, "elapsed": round(elapsed, 1),
                "left": None if left is None else round(left, 1), "seconds": dict(self.seconds)}

    def _send(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.report is not None and (force or now - self._sent >= 1.0):
            self._sent = now
            self.report(self.state())
