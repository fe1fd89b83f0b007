"""run.log: what happened in a run, in its run folder, written by the driver and the model actors.

The driver records the run's start, each stage as it finishes, and the error a run fails with; the
model actors (pipeline.run.workers) append their own records (the circuit step's phases, warnings) to
the same file, which lies on storage every node shares. Records of patchsweep's own loggers (`pipeline.*`)
go in from INFO, everyone else's (torch, transformers, MLflow) from WARNING. The console shows warnings
and errors only: the driver's through Hydra's job logging (conf/config.yaml), the actors' through Ray's
log streaming (ray.log_to_driver).

Progress goes to stderr: bars on a terminal; in a log that is not one (a Slurm .out file, `kubectl logs`,
`make run > log 2>&1`), where a bar would add a line at every refresh, a line per stage and circuit phase
and at most one progress line per PROGRESS_EVERY_S between (`stage_progress`, `ThrottledLines`).
"""
from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from tqdm import tqdm
from transformers.utils import logging as hf_logging

from pipeline.messages import redact
from pipeline.outputs.files import RUN_LOG

FORMAT = "%(asctime)s %(levelname)s %(name)s (pid %(process)d): %(message)s"
OWN = "pipeline"  # patchsweep's loggers: logging.getLogger(__name__) in its modules
PROGRESS_EVERY_S = 30.0  # where the console is not a terminal: at most one progress line this often


class Redacting(logging.Formatter):
    """A formatter whose lines (a traceback included) carry no URI's credentials: a record may quote the
    config, an override or a library's error naming the store (pipeline.messages.redact)."""

    def __init__(self, inner: logging.Formatter | None = None, fmt: str | None = None):
        super().__init__(fmt)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        return redact(self.inner.format(record) if self.inner is not None else super().format(record))


def redact_console(logger: logging.Logger) -> None:
    """The handlers of `logger` (the driver's console, as Hydra's job logging sets it) redact their lines."""
    for handler in logger.handlers:
        if not isinstance(handler.formatter, Redacting):
            handler.setFormatter(Redacting(handler.formatter or logging.Formatter()))


def _ours_or_warning(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name == OWN or record.name.startswith(OWN + ".")


def _file_handler(path: Path) -> logging.Handler:
    # Appended to, never truncated: a re-run over the same folder adds its records after the last run's.
    handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
    handler.setFormatter(Redacting(fmt=FORMAT))
    handler.addFilter(_ours_or_warning)
    return handler


# Threads inside `run_log`: sweeps run at once in one driver (a --multirun's jobs, each in a thread of its
# own) each keep their records to their own run.log.
_owners: set[int] = set()
_levels: dict[str, int] = {}


@contextmanager
def run_log(run_dir: Path):
    """The driver's records go to <run_dir>/run.log while the block runs (patchsweep's from INFO): those of
    the thread running the block, and of threads no other run.log belongs to. An error the block raises is
    recorded there with its traceback (the console gets the command's one-line message instead)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _file_handler(run_dir / RUN_LOG.name)
    owner = threading.get_ident()
    handler.addFilter(lambda record: record.thread == owner or record.thread not in _owners)
    _owners.add(owner)
    root, own = logging.getLogger(), logging.getLogger(OWN)
    _levels.setdefault(OWN, own.level)  # the first run.log open keeps the level to restore when the last closes
    own.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield
    except BaseException as err:
        handler.handle(logging.LogRecord(__name__, logging.ERROR, __file__, 0, "the run failed: %s: %s",
                                         (type(err).__name__, err), sys.exc_info()))
        raise
    finally:
        _owners.discard(owner)
        root.removeHandler(handler)
        handler.close()
        if not _owners:
            own.setLevel(_levels.pop(OWN))


def actor_logging(log_path: str | Path) -> None:
    """In a model actor: its records go to the run's run.log, and its warnings to stderr, which Ray
    streams to the driver's console."""
    root = logging.getLogger()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.WARNING)
    console.setFormatter(Redacting(fmt="%(levelname)s %(name)s: %(message)s"))
    root.addHandler(console)
    root.addHandler(_file_handler(Path(log_path)))
    logging.getLogger(OWN).setLevel(logging.INFO)
    # Loading a model draws a progress bar on stderr: not a warning, and it would reach the console.
    hf_logging.disable_progress_bar()


def is_terminal(stream) -> bool:
    return getattr(stream, "isatty", lambda: False)()


class ThrottledLines:
    """Progress lines for a stream that is not a terminal: `milestone` (a stage or a phase begun or done)
    always printed, `progress` at most once per `every` seconds since the last line."""

    def __init__(self, stream=None, every: float = PROGRESS_EVERY_S):
        self.stream, self.every = stream or sys.stderr, every
        self._last = time.monotonic()

    def progress(self, line: str) -> None:
        if time.monotonic() - self._last >= self.every:
            self.milestone(line)

    def milestone(self, line: str) -> None:
        print(line, file=self.stream, flush=True)
        self._last = time.monotonic()


class StageLines:
    """A stage's work items as throttled lines, with the part of tqdm's interface `WorkerPool.map` uses
    (a context, `update`): a progress line at most every PROGRESS_EVERY_S, one line when the stage ends."""

    def __init__(self, total: int, initial: int, desc: str, stream=None):
        self.total, self.n, self.desc = total, initial, desc.strip()
        self.lines, self._began = ThrottledLines(stream), time.monotonic()

    def update(self, n: int = 1) -> None:
        self.n += n
        self.lines.progress(f"{self.desc}: {self.n}/{self.total} items, {time.monotonic() - self._began:.0f}s")

    def __enter__(self) -> StageLines:
        return self

    def __exit__(self, kind, err, traceback) -> None:
        if kind is None:  # a stage that fails says so in the command's own line
            self.lines.milestone(f"{self.desc}: {self.n}/{self.total} items done in "
                                 f"{time.monotonic() - self._began:.0f}s")


def stage_progress(total: int, initial: int, desc: str, stream=None) -> tqdm | StageLines:
    """The progress of a stage's work items on stderr: a bar on a terminal, else `StageLines`."""
    stream = stream or sys.stderr
    if is_terminal(stream):
        return tqdm(total=total, initial=initial, desc=desc, unit="item", dynamic_ncols=True, leave=True, file=stream)
    return StageLines(total, initial, desc, stream)
