"""The sweeps of one command, run at once on one Ray instance, then compared; a single sweep is a
command of one job.

Hydra composes the command's jobs (one, or each of a --multirun's, which its basic launcher composes one
after another); the command validates each before anything runs, so every job's config errors are found
before any compute. `run_jobs` then runs every job's stage graph (pipeline.run.sweep.run_sweep): a lone
job in the driver's own thread, several each in a driver thread of its own, all against one Ray instance
and one `Room` (pipeline.run.scheduler) that shares the cluster's CPUs and GPUs out between the jobs'
actor pools as their work asks. Each job's items go to its own model's actors, so the jobs' work is
interleaved over the cluster, and a job whose actors do not fit waits until another gives room back. Each
job writes only its own folder, so its files are those it would write alone.

A job that fails ends alone: the others run on, and the command reports it once they are done (`End`).
Ctrl-C stops every job (each says what it finished; the same command resumes them all).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.messages import INTERRUPTED, first_line, redact
from pipeline.outputs.comparison import Compared, comparison_markdown, comparison_png, comparison_table
from pipeline.run.folder import FolderBusy
from pipeline.run.runner import SweepOutcome
from pipeline.run.scheduler import Room
from pipeline.run.sweep import Interrupted, run_sweep
from pipeline.run.tracking import LiveRun, ParentRun
from pipeline.run.workers import RayUnavailable, WorkFailed, start_ray
from pipeline.schema import PatchsweepConfig, tracking_uri
from pipeline.store import publish_bytes
from pipeline.validation import ConfigError

# What stops a job before it computes, or what it met computing, in one line that names the fix.
REFUSALS = (ConfigError, ValueError, FileNotFoundError, WorkFailed, RayUnavailable, FolderBusy)


@dataclass
class Job:
    """One job of the command: its validated config and the overrides Hydra composed it from."""

    cfg: PatchsweepConfig
    overrides: list[str]
    label: str = ""  # what tells it apart from the other jobs (set by `run_jobs`)
    outcome: SweepOutcome | None = None
    tracking: dict | None = None
    error: BaseException | None = None  # what ended its sweep
    tracking_error: BaseException | None = None  # what stopped its MLflow logging once the results were on disk
    ended: threading.Event = field(default_factory=threading.Event)  # set once outcome or error is recorded


@dataclass(frozen=True)
class End:
    """What ended a job (or its logging to MLflow) as the command reports it."""

    status: int  # the exit status it calls for: 2 refused, 1 failed (finished results kept), 130 interrupted
    message: str  # one line: the problem and the fix
    failed: bool = True  # the job's sweep ended with it (not only its logging)
    unforeseen: BaseException | None = None  # an error no line was written for: its traceback is what tells


@dataclass
class Comparison:
    folder: Path
    files: dict[str, Path]
    tracking: dict | None
    tracking_error: str | None


def job_labels(jobs: list[Job]) -> list[str]:
    """Each job by the overrides the others do not share (a model by its name), e.g. "refusal-tiny-gpt2"
    or "patching.metric=kl"."""
    common = set.intersection(*(set(job.overrides) for job in jobs))
    labels = []
    for job in jobs:
        parts = [job.cfg.model.name if o.split("=")[0] in ("model", "model.path", "model.name") else o
                 for o in job.overrides if o not in common]
        labels.append(redact(" ".join(dict.fromkeys(parts))) or job.cfg.model.name)  # titles, comparison.md, MLflow
    return labels


# What every job of one command must share: they run on one Ray instance.
SHARED_KEYS = (("ray",), ("resources", "num_cpus"))


def check_jobs(jobs: list[Job]) -> None:
    """Refuse, before anything runs, jobs that cannot share one Ray instance."""
    for path in SHARED_KEYS:
        values = []
        for job in jobs:
            value = job.cfg
            for key in path:
                value = getattr(value, key)
            values.append(value)
        if any(value != values[0] for value in values[1:]):
            name = ".".join(path)
            raise ConfigError(f"{name} differs between the jobs of this --multirun, which share one Ray instance: "
                              f"give {name} one value for all of them")


def run_jobs(jobs: list[Job], sweep_key: str) -> Comparison | None:
    """Run every job's sweep at once (see the module's doc); each job gets its outcome or its error.
    Returns the comparison of the finished ones (None for a lone job, or when Ctrl-C stopped them)."""
    for job, label in zip(jobs, job_labels(jobs)):
        job.label = label
    if len(jobs) == 1:
        # In this thread, its pool alone on the cluster: Ctrl-C reaches the sweep where it is; its MLflow
        # run is the command's (no parent).
        _run_job(jobs[0], sweep_key, room=None, parent_id=None)
        return None
    start_ray(jobs[0].cfg)  # every job has the first one's ray.* and resources.num_cpus (check_jobs)
    room = Room.of_cluster()
    tracked = [job for job in jobs if job.cfg.tracking.enabled]
    parent = ParentRun([job.cfg for job in tracked], sweep_key, [job.label for job in tracked]) if tracked else None
    threads = [threading.Thread(target=_run_job, args=(job, sweep_key, room, parent_of(job, parent)),
                                name=f"patchsweep-job-{index}", daemon=True) for index, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    try:
        wait_for(jobs)
    except KeyboardInterrupt:
        room.stop()  # each job stops at its next look at the room, saying what it finished
        wait_for(jobs)
        if parent is not None:
            parent.fail("KILLED")
        return None
    return compare(jobs, parent, sweep_key)


def parent_of(job: Job, parent: ParentRun | None) -> str | None:
    """The id of the parent run a job's run goes under: none where the job logs to another store or
    experiment than the parent's (a --multirun over tracking.*)."""
    if parent is None:
        return None
    same = (tracking_uri(job.cfg), job.cfg.tracking.experiment) == (parent.uri, parent.cfg.tracking.experiment)
    return parent.run_id if same else None


def wait_for(jobs: list[Job]) -> None:
    """Until every job's thread has recorded its end. Not Thread.join: a join that Ctrl-C interrupts can
    mark a thread ended that still runs (a CPython race in Thread._wait_for_tstate_lock), and the command
    would then report before the job has recorded how it ended."""
    for job in jobs:
        while not job.ended.wait(0.5):
            pass


def _run_job(job: Job, sweep_key: str, room: Room | None, parent_id: str | None) -> None:
    try:
        _sweep_and_log(job, sweep_key, room, parent_id)
    finally:
        job.ended.set()


def _sweep_and_log(job: Job, sweep_key: str, room: Room | None, parent_id: str | None) -> None:
    live = None
    try:
        # The MLflow run starts with the sweep and ends with it, FAILED (or KILLED) when the sweep does.
        if job.cfg.tracking.enabled:
            live = LiveRun(job.cfg, sweep_key, job.overrides, parent_id)
        job.outcome = run_sweep(job.cfg, live, job.overrides, room)
    except BaseException as err:  # the job's own end: reported by the command once every job is done
        job.error = err
        if live is not None:
            live.fail(err)
        return
    if live is not None:
        try:
            job.tracking = live.finish(job.outcome)
        except BaseException as err:  # the store's own errors are many, or Ctrl-C: the results are safe on disk
            job.tracking_error = err


def end_of(err: BaseException, cfg: dict | None) -> End:
    """`err`, which stopped a job whose config is `cfg` (None: not valid yet), as the command reports it."""
    if isinstance(err, Interrupted):
        return End(INTERRUPTED, str(err))
    if isinstance(err, KeyboardInterrupt):
        return End(INTERRUPTED, "interrupted before any work started: run the same command to start again")
    if isinstance(err, REFUSALS):
        return End(2, str(err))
    if isinstance(err, OSError):
        return End(2, file_error(err, cfg))
    return End(1, f"{type(err).__name__}: {first_line(err)}", unforeseen=err)


def job_end(job: Job) -> End | None:
    """What ended the job, or its MLflow logging (None: it finished, and MLflow has it where asked)."""
    if job.error is not None:
        return end_of(job.error, job.cfg)
    if job.tracking_error is None:
        return None
    folder = job.outcome.run_dir.resolve()
    later = f"log them later with `patchsweep log {folder}`"
    if isinstance(job.tracking_error, KeyboardInterrupt):
        return End(INTERRUPTED, f"interrupted while logging to MLflow: the results are complete in {folder}; {later}",
                   failed=False)
    return End(1, f"MLflow store {tracking_uri(job.cfg)} failed ({first_line(job.tracking_error)}): the results "
                  f"are complete in {folder}; {later}", failed=False)


def file_error(err: OSError, cfg: PatchsweepConfig | None) -> str:
    """A file-system error as one line: the path, the reason, and the key that chose the path."""
    path = Path(err.filename or "").absolute()
    key = "output_dir or output_root"
    if cfg is not None:
        for name, folder in (("output_dir", cfg.output_dir), ("output_root", cfg.output_root)):
            if path == Path(folder).absolute() or Path(folder).absolute() in path.parents:
                key = name
                break
    return f"{err.filename or 'a file'}: {err.strerror or type(err).__name__}: set {key} to a writable folder"


def compare(jobs: list[Job], parent: ParentRun | None, sweep_key: str) -> Comparison:
    """comparison.png and comparison.md of the finished jobs, in <output_root>/<name>/comparison-<command id>,
    and the parent run's comparison."""
    first = jobs[0].cfg
    folder = Path(first.output_root) / first.name / f"comparison-{sweep_key}"
    finished = [job for job in jobs if job.outcome is not None]
    compared = [Compared(job.label, job.cfg.model.name, job.outcome.model_info.get("family", ""),
                         job.outcome.model_info["n_layers"], job.outcome.pairs_report["n_kept"], job.outcome.curves,
                         job.outcome.circuit, job.outcome.run_dir) for job in finished]
    title = f"{first.name}: {len(finished)} of {len(jobs)} sweeps compared"
    table = comparison_table(compared)
    files = {}
    if compared:
        files["figure"] = comparison_png(compared, folder / "comparison.png", title)
        publish_bytes(folder / "comparison.md", comparison_markdown(table, title, "comparison.png").encode())
        files["markdown"] = folder / "comparison.md"
    failed = [f"{job.label}: {type(job.error).__name__}: {job.error}" for job in jobs if job.error is not None]
    tracking, problem = None, None
    if parent is not None:
        try:
            # The description without the figure: a run's description cannot show its own artifacts.
            description = comparison_markdown(table, title) if compared else "No sweep of this command finished.\n"
            tracking = parent.finish(compared, table, files, description, failed)
        except Exception as err:  # the comparison is on disk
            problem = first_line(err)
    return Comparison(folder, files, tracking, problem)
