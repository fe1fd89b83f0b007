"""A --multirun's sweeps, run at once on one Ray instance, then compared.

Hydra's basic launcher runs a multirun's jobs one after another. patchsweep's task function, in a
multirun, only composes and validates each job (so every job's config errors are found before anything is
computed) and collects it; `run_jobs` then runs every job's stage graph (pipeline.run.sweep.run_sweep) in
a driver thread of its own, all against one Ray instance and one `Room` (pipeline.run.scheduler) that
shares the cluster's CPUs and GPUs out between the jobs' actor pools as their work asks. Each job's items
go to its own model's actors, so the jobs' work is interleaved over the cluster, and a job whose actors do
not fit waits until another gives room back. Each job writes only its own folder, so its files are those
it would write alone.

A job that fails ends alone: the others run on, and the command reports it once they are done. Ctrl-C stops
every job (each says what it finished; the same command resumes them all).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.outputs.comparison import Compared, comparison_markdown, comparison_png, comparison_table
from pipeline.run.scheduler import Room
from pipeline.run.runner import SweepOutcome
from pipeline.run.sweep import run_sweep
from pipeline.run.tracking import LiveRun, ParentRun
from pipeline.run.workers import start_ray
from pipeline.schema import PatchsweepConfig
from pipeline.store import publish_bytes
from pipeline.validation import ConfigError


@dataclass
class Job:
    """One job of a --multirun: its validated config and the overrides Hydra composed it from."""

    cfg: PatchsweepConfig
    overrides: list[str]
    label: str = ""  # what tells it apart from the other jobs (set by `run_jobs`)
    outcome: SweepOutcome | None = None
    tracking: dict | None = None
    error: BaseException | None = None  # what ended its sweep
    tracking_error: str | None = None  # the MLflow store failed after the results were on disk


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
        labels.append(" ".join(dict.fromkeys(parts)) or job.cfg.model.name)
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


def run_jobs(jobs: list[Job], sweep_key: str) -> Comparison:
    """Run every job's sweep at once (see the module's doc); each job gets its outcome or its error.
    Returns the comparison of the finished ones."""
    for job, label in zip(jobs, job_labels(jobs)):
        job.label = label
    first = jobs[0].cfg
    start_ray(first)  # every job has the first one's ray.* and resources.num_cpus (check_jobs)
    room = Room.of_cluster()
    tracked = [job for job in jobs if job.cfg.tracking.enabled]
    parent = ParentRun([job.cfg for job in tracked], sweep_key, [job.label for job in tracked]) if tracked else None
    threads = [threading.Thread(target=_run_job, args=(job, sweep_key, room), name=f"patchsweep-job-{index}",
                                daemon=True) for index, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    try:
        for thread in threads:
            while thread.is_alive():
                thread.join(0.5)
    except KeyboardInterrupt:
        room.stop()  # each job stops at its next look at the room, saying what it finished
        for thread in threads:
            thread.join()
        if parent is not None:
            parent.fail("KILLED")
        raise
    return compare(jobs, parent, sweep_key)


def _run_job(job: Job, sweep_key: str, room: Room) -> None:
    live = LiveRun(job.cfg, sweep_key, job.overrides, ends_parent=False) if job.cfg.tracking.enabled else None
    try:
        job.outcome = run_sweep(job.cfg, live, job.overrides, room)
    except BaseException as err:  # the job's own end: reported by the command once every job is done
        job.error = err
        if live is not None:
            live.fail(err)
        return
    if live is not None:
        try:
            job.tracking = live.finish(job.outcome)
        except Exception as err:  # the store's own errors are many; the results are safe on disk
            job.tracking_error = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


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
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return Comparison(folder, files, tracking, problem)
