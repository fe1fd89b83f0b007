"""The `patchsweep` command (also `python -m pipeline`): compose -> validate -> run -> track -> print.

    patchsweep [key=value ...]                      a sweep (Hydra overrides)
    patchsweep --multirun model=a,b [key=x,y ...]   several sweeps at once on one Ray instance, compared
    patchsweep screen model=<name> prompts.path=<file with prompt, harmful columns>
        [intervention.run=<run folder> intervention.mode=ablate|add [intervention.scale=<s>]]
    patchsweep log <run folder> [tracking.<key>=<value> ...]   log a finished sweep's folder to MLflow

Errors in the config or the input are printed as one line naming the problem and the key to fix,
before any compute starts (exit status 2). Ctrl-C prints one line saying how much work finished (exit
status 130); the same command then resumes. An MLflow store that fails once the results are computed
leaves them on disk: the summary is printed with the `patchsweep log` command that logs them later
(exit status 1). A --multirun runs nothing when one job's config is wrong (a line per refused job); a job
that fails once running ends alone and is reported after the others have finished (exit status 1).
"""
from __future__ import annotations

import json
import logging.config
import os
import sys
import time
import uuid
from dataclasses import asdict, fields
from pathlib import Path
from typing import NoReturn

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from pipeline.analysis.behaviour import format_summary, screen
from pipeline.analysis.directions import format_intervention, intervention_cost, load_intervention
from pipeline.analysis.prompt_files import load_screen_prompts
from pipeline.config import CONF_DIR
from pipeline.engine.loading import load_model
from pipeline.organisms import resolve
from pipeline.outputs.report import console_summary, ui_hint
from pipeline.run.multirun import Job, check_jobs, run_jobs
from pipeline.run.folder import FolderBusy, finished_run
from pipeline.run.sweep import Interrupted, run_sweep
from pipeline.run.tracking import LiveRun, log_finished
from pipeline.run.workers import RayUnavailable, WorkFailed
from pipeline.schema import PatchsweepConfig, TrackingConfig, from_plain, to_plain, tracking_uri
from pipeline.store import write_table
from pipeline.validation import ConfigError, validate, validate_screen, validate_tracking

SWEEP_ENV = "PATCHSWEEP_SWEEP_ID"
INTERRUPTED = 130  # the shell's status for a command stopped by SIGINT
# What stops a sweep before it computes, or what it met computing, in one line that names the fix.
REFUSALS = (ConfigError, ValueError, FileNotFoundError, WorkFailed, RayUnavailable, FolderBusy)


def _fail(message: BaseException | str, status: int = 2) -> NoReturn:
    print(f"patchsweep: error: {message}", file=sys.stderr, flush=True)
    sys.exit(status)


def _interrupted(message: str) -> NoReturn:
    print(f"patchsweep: {message}", file=sys.stderr, flush=True)
    sys.exit(INTERRUPTED)


def _file_error(err: OSError, cfg: PatchsweepConfig | None) -> str:
    """A file-system error as one line: the path, the reason, and the key that chose the path."""
    path = Path(err.filename or "").absolute()
    key = "output_dir or output_root"
    if cfg is not None:
        for name, folder in (("output_dir", cfg.output_dir), ("output_root", cfg.output_root)):
            if path == Path(folder).absolute() or Path(folder).absolute() in path.parents:
                key = name
                break
    return f"{err.filename or 'a file'}: {err.strerror or type(err).__name__}: set {key} to a writable folder"


def _log_later(run_dir: Path) -> str:
    return f"log them later with `patchsweep log {run_dir.resolve()}`"


def _stop(err: BaseException, cfg: PatchsweepConfig | None) -> NoReturn:
    """Leave with the one line (and exit status) for what stopped the sweep; anything unforeseen keeps
    its traceback."""
    if isinstance(err, Interrupted):
        _interrupted(str(err))
    if isinstance(err, KeyboardInterrupt):
        _interrupted("interrupted before any work started: run the same command to start again")
    if isinstance(err, REFUSALS):
        _fail(err)
    if isinstance(err, OSError):
        _fail(_file_error(err, cfg))
    raise err


# A --multirun's jobs: Hydra's launcher composes them one after another and `sweep_command` validates and
# collects each; `multirun_command` then runs them all at once (pipeline.run.multirun).
JOBS: list[Job] = []
REFUSED: list[str] = []  # a line per job whose config was refused
JOB_LOGGING: dict = {}  # Hydra's job logging (conf/config.yaml), set again for the jobs' run once Hydra restored its own


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def sweep_command(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        JOB_LOGGING.update(OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True))
        try:
            JOBS.append(Job(validate(cfg), overrides))
        except (ConfigError, ValueError, FileNotFoundError, RayUnavailable, FolderBusy) as err:
            REFUSED.append(f"job {' '.join(overrides)}: {err}")
        except OSError as err:
            REFUSED.append(f"job {' '.join(overrides)}: {_file_error(err, None)}")
        return
    plain, live = None, None
    try:
        plain = validate(cfg)
        # The MLflow run starts with the sweep and ends with it, FAILED (or KILLED) when the sweep does.
        live = LiveRun(plain, os.environ[SWEEP_ENV], overrides) if plain.tracking.enabled else None
        outcome = run_sweep(plain, live, overrides)
    except BaseException as err:
        if live is not None:
            live.fail(err)
        _stop(err, plain)
    tracking, problem = None, None
    if live is not None:
        try:
            tracking = live.finish(outcome)
        except KeyboardInterrupt:
            _interrupted(f"interrupted while logging to MLflow: the results are complete in "
                         f"{outcome.run_dir.resolve()}; {_log_later(outcome.run_dir)}")
        except Exception as err:  # the store's own errors are many; the results are safe on disk whatever they are
            problem = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print("\n" + console_summary(plain, outcome.run_dir, outcome.pairs_report, outcome.stats, outcome.curves,
                                 outcome.summary, outcome.circuit, tracking), flush=True)
    if problem:
        _fail(f"MLflow store {tracking_uri(plain)} failed ({problem}): the results are complete in "
              f"{outcome.run_dir.resolve()}; {_log_later(outcome.run_dir)}", status=1)


def multirun_command() -> None:
    """Run the collected jobs at once; print each finished job's summary, the comparison, then a line per
    job that failed (exit status 1), or per job interrupted (130)."""
    if REFUSED:
        for line in REFUSED:
            print(f"patchsweep: error: {line}", file=sys.stderr, flush=True)
        _fail(f"{len(REFUSED)} of {len(REFUSED) + len(JOBS)} jobs refused, nothing was run: fix the overrides named "
              "above and run the command again")
    logging.config.dictConfig(JOB_LOGGING)
    try:
        check_jobs(JOBS)
        comparison = run_jobs(JOBS, os.environ[SWEEP_ENV])
    except KeyboardInterrupt:
        for job in JOBS:
            print(f"patchsweep: {job.label}: {job.error or 'interrupted'}", file=sys.stderr, flush=True)
        _interrupted(f"interrupted: {len(JOBS)} jobs stopped; run the same command to resume them")
    except BaseException as err:
        _stop(err, JOBS[0].cfg)
    for job in JOBS:
        if job.outcome is not None:
            o = job.outcome
            print("\n" + console_summary(job.cfg, o.run_dir, o.pairs_report, o.stats, o.curves, o.summary, o.circuit,
                                         job.tracking), flush=True)
    if comparison.files:
        print(f"\nComparison of the {sum(job.outcome is not None for job in JOBS)} finished sweeps: "
              f"{comparison.folder.resolve()} (comparison.md, comparison.png)", flush=True)
    if comparison.tracking:
        print(f"MLflow: {comparison.tracking['uri']}  parent run {comparison.tracking['run_id']}\n"
              f"  {ui_hint(JOBS[0].cfg, comparison.tracking['ui_path'])}", flush=True)
    problems = [f"{job.label}: MLflow store {tracking_uri(job.cfg)} failed ({job.tracking_error}): the results are "
                f"complete in {job.outcome.run_dir.resolve()}; {_log_later(job.outcome.run_dir)}"
                for job in JOBS if job.tracking_error]
    if comparison.tracking_error:
        problems.append(f"MLflow store failed logging the comparison ({comparison.tracking_error}): it is in "
                        f"{comparison.folder.resolve()}")
    failed = [job for job in JOBS if job.error is not None]
    problems += [f"{job.label} failed: {_one_line(job.error)}" for job in failed]
    for line in problems:
        print(f"patchsweep: error: {line}", file=sys.stderr, flush=True)
    if any(isinstance(job.error, (Interrupted, KeyboardInterrupt)) for job in failed):
        _interrupted("interrupted: run the same command to resume")
    if failed:
        _fail(f"{len(failed)} of {len(JOBS)} jobs failed" + (", the others finished" if len(failed) < len(JOBS) else ""),
              status=1)
    if problems:
        _fail("every job finished, but not all of it reached MLflow (above)", status=1)


def _one_line(err: BaseException) -> str:
    """What ended a job, in one line (run.log in its folder has the traceback of anything unforeseen)."""
    if isinstance(err, REFUSALS + (Interrupted,)):
        return str(err)
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def screen_command(cfg: DictConfig) -> None:
    """Greedy generation and the first-token metric on a file of prompts -> screen.arrow; with
    intervention.run, under that run's refusal direction (and its cost on ordinary text)."""
    if not any(o.startswith("output_dir=") for o in HydraConfig.get().overrides.task):
        cfg.output_dir = "${output_root}/screen/${model.name}-${prompts.name}"  # not a sweep's folder
    try:
        plain = validate_screen(cfg)
        prompts = load_screen_prompts(plain.prompts.path)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(err)
    torch.set_num_threads(plain.resources.torch_threads)
    model, tokenizer = load_model(resolve(plain.model.path), dtype=plain.model.dtype,
                                  device=plain.resources.device,
                                  trust_remote_code=plain.model.trust_remote_code)
    setting = plain.intervention
    intervention = load_intervention(setting.run, setting.mode, setting.scale) if setting.run else None
    result = screen(model, tokenizer, prompts, max_new_tokens=plain.prompts.max_new_tokens,
                    refusal_tokens=plain.prompts.refusal_tokens,
                    compliance_tokens=plain.prompts.compliance_tokens,
                    answer_top_k=plain.prompts.answer_top_k, intervention=intervention)
    table, lines = result.table, format_summary(result.summary)
    if intervention is not None:
        harmless = [p for p, h in zip(prompts.column("prompt").to_pylist(), prompts.column("harmful").to_pylist()) if not h]
        cost = intervention_cost(model, tokenizer, intervention, harmless)
        summary = result.summary | {"intervention": asdict(setting) | {"layer": intervention.layer, "scale": intervention.scale},
                                    "cost": cost}
        table = table.replace_schema_metadata({b"screen_summary": json.dumps(summary).encode()})
        lines += "\n" + format_intervention(summary)
    path = write_table(Path(plain.output_dir) / "screen.arrow", table,
                       {"model_id": plain.model.path, "prompts": plain.prompts.path})
    print(f"screen of {plain.model.name} on {plain.prompts.path}:\n{lines}\n"
          f"per-prompt results: {path.resolve()}", flush=True)


def log_command(args: list[str]) -> None:
    """`patchsweep log <run folder> [tracking.<key>=<value> ...]`: log a finished sweep's folder to MLflow
    as the sweep would have (params, per-layer curves, artifacts, lineage tags), computing nothing. The
    store is the one in the folder's config.yaml unless tracking.* overrides name another."""
    if not args or args[0].startswith("-"):
        _fail("patchsweep log needs a run folder: patchsweep log <run folder> [tracking.uri=<store>]")
    run_dir, overrides = Path(args[0]), args[1:]
    wrong = [o for o in overrides if not o.startswith("tracking.") or "=" not in o]
    if wrong:
        _fail(f"patchsweep log takes only tracking.<key>=<value> overrides, not {' '.join(wrong)}: the results "
              "are already computed")
    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir} is not a sweep's run folder (no config.yaml there): give the folder a sweep printed "
              "under Files:")
    try:
        cfg, outcome = finished_run(run_dir)
        keys = [f.name for f in fields(TrackingConfig)]
        unknown = [o for o in overrides if o.split("=")[0].split(".", 1)[1] not in keys]
        if unknown:
            raise ConfigError(f"unknown key in {' '.join(unknown)}: choose from "
                              f"{', '.join('tracking.' + k for k in keys)}")
        cfg = from_plain(OmegaConf.to_container(OmegaConf.merge(to_plain(cfg), OmegaConf.from_dotlist(overrides)),
                                                resolve=True))
        cfg.tracking.enabled = True
        validate_tracking(cfg)
    except (ConfigError, ValueError) as err:
        _fail(err)
    except OSError as err:
        _fail(f"{err.filename or run_dir}: {err.strerror or type(err).__name__}: check the run folder")
    try:
        tracking = log_finished(cfg, outcome, os.environ[SWEEP_ENV])
    except KeyboardInterrupt:
        _interrupted("interrupted: the run was not logged completely; run the same command again")
    except Exception as err:  # the store's own errors are many: one line, and the same command retries
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        _fail(f"MLflow store {tracking_uri(cfg)} failed ({first}): fix the store or set tracking.uri=<another "
              "store>, then run the same command", status=1)
    print(f"logged {run_dir.resolve()} to MLflow {tracking['uri']}: run {tracking['run_id']}\n"
          f"  {ui_hint(cfg, tracking['ui_path'])}", flush=True)


def main() -> None:
    # One id per command: the jobs of a --multirun share it, so they become children of one parent run.
    os.environ.setdefault(SWEEP_ENV, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    # MLflow's client retries a failing server for minutes by default (7 retries, 120 s each); a sweep's
    # results are on disk by then and `patchsweep log` sends them later, so a request gives up after about
    # 15 s when the server refuses connections, 100 s when it never answers.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    try:
        if len(sys.argv) > 1 and sys.argv[1] == "screen":
            del sys.argv[1]
            screen_command()
        elif len(sys.argv) > 1 and sys.argv[1] == "log":
            log_command(sys.argv[2:])
        else:
            sweep_command()
            if JOBS or REFUSED:
                multirun_command()
    except KeyboardInterrupt:  # while Hydra composes, or a screen generates (it saves only at its end)
        _interrupted("interrupted: nothing was saved; run the same command again")


if __name__ == "__main__":
    main()
