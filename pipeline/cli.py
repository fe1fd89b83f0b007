"""The `patchsweep` command (also `python -m pipeline`): compose -> validate -> run -> track -> print.

    patchsweep [key=value ...]                      a sweep (Hydra overrides)
    patchsweep --multirun model=a,b [key=x,y ...]   several sweeps at once on one Ray instance, compared
    patchsweep screen model=<name> prompts.path=<file with prompt, harmful columns>
        [intervention.run=<run folder> intervention.mode=ablate|add [intervention.scale=<s>]]
    patchsweep log <run folder> [tracking.<key>=<value> ...]   log a finished sweep's folder to MLflow
    patchsweep export <run folder> [--viewer <folder>]   its circuit for circuit-tracer's viewer and MIB
    patchsweep compare RUN_A RUN_B [...] [compare.<key>=<value> ...]   runs against a noise band
    patchsweep --help | --version

A sweep is a command of one job, a --multirun one of several: both take the same path
(pipeline.run.multirun). Errors in the command line, the config or the input are printed as one line
naming the problem and the key to fix, before any compute starts (exit status 2); a --multirun runs
nothing when one job's config is wrong (a line per refused job). Ctrl-C prints one line saying how much
work finished (exit status 130); the same command then resumes. SIGTERM, as Slurm and Kubernetes send,
does the same (exit status 143). A sweep stopped by its input once running says so in its one line (exit
status 2); a job of a --multirun that fails ends alone and is reported after the others have finished
(exit status 1). An MLflow store that fails once the results are computed leaves them on disk: the
summary is printed with the `patchsweep log` command that logs them later (exit status 1).

torch, Ray, MLflow and transformers are imported inside the commands that use them, not here: `--help`
and tab completion (`--shell-completion`) answer without them, in well under 2 s.
"""
from __future__ import annotations

import logging.config
import os
import string
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from traceback import format_exception
from typing import TYPE_CHECKING, NoReturn

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

from pipeline import __version__, sigterm
from pipeline.config import CONF_DIR
from pipeline.messages import INTERRUPTED, error_line, first_line, notice_line, redact

if TYPE_CHECKING:  # imported by the commands that run them
    from pipeline.run.multirun import Comparison, Job

SWEEP_ENV = "PATCHSWEEP_SWEEP_ID"


def main() -> None:
    sigterm.stop_like_ctrl_c()
    sys.excepthook = _redacted_traceback
    _command_environment()
    args = sys.argv[1:]
    command, args = (COMMANDS[args[0]], args[1:]) if args and args[0] in COMMANDS else (sweep_command, args)
    try:
        command(args)
    except KeyboardInterrupt:  # while Hydra composes, or a screen generates (it saves only at its end)
        leave(INTERRUPTED, "interrupted: nothing was saved; run the same command again")


def _command_environment() -> None:
    # One id per command: the jobs of a --multirun share it, so they become children of one parent run.
    os.environ.setdefault(SWEEP_ENV, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    # MLflow's client retries a failing server for minutes by default (7 retries, 120 s each); a sweep's
    # results are on disk by then and `patchsweep log` sends them later, so a request gives up after about
    # 15 s when the server refuses connections, 100 s when it never answers.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    # MLflow prints each run's address on stdout as a server URI gives it, credentials included; the
    # command's summary names the run (redacted).
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


def _redacted_traceback(kind, err, traceback) -> None:
    """An error nobody wrote a line for keeps its traceback, without the credentials of a URI it quotes."""
    print(redact("".join(format_exception(kind, err, traceback))), end="", file=sys.stderr, flush=True)


def leave(status: int, message: str) -> NoReturn:
    """The command's last line, and its exit status (2 refused, 1 failed, 130 interrupted by Ctrl-C, 143
    by SIGTERM)."""
    if status == INTERRUPTED and sigterm.received():
        status, message = sigterm.TERMINATED, f"SIGTERM: {message}"
    stopped = status in (INTERRUPTED, sigterm.TERMINATED)
    print(notice_line(message) if stopped else error_line(message), file=sys.stderr, flush=True)
    sys.exit(status)


def say(lines: list[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr, flush=True)


# ---- Hydra ----------------------------------------------------------------------------------------

def compose_and_call(task: Callable[[DictConfig], None], args: list[str]) -> None:
    """Hydra reads `args` (overrides, --multirun, --help, --cfg, --shell-completion ...) and calls `task`
    with each job's composed config. hydra.main, Hydra's public entry point, parses sys.argv and takes no
    argument list, so `args` stand in sys.argv while it runs (pipeline.config's job_overrides reads the
    swept overrides there too). A command line Hydra cannot compose ends in one line, exit status 2."""
    argv, full_error = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    sys.argv = [argv[0], *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra's errors come here, not printed over several lines
    try:
        if any(a in ("--help", "-h") for a in args):
            print(help_page([a for a in args if not a.startswith("-")]))
            return
        hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")(task)()
    except HydraException as err:
        leave(2, compose_error(err, args))
    finally:
        sys.argv = argv
        if full_error is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = full_error


def help_page(overrides: list[str]) -> str:
    """`patchsweep --help`: conf/config.yaml's hydra.help.template, its config groups listed from conf/ and
    the config as `overrides` compose it. Hydra's own --help composes the config again for every option of
    every group (seconds, many more on a busy machine); this composes it once, a --multirun's swept keys at
    their defaults."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    single = [o.input_line for o in OverridesParser.create().parse_overrides(overrides) if not o.is_sweep_override()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3", job_name="patchsweep"):
        cfg = compose("config", single, return_hydra_config=True)
    template = cfg.hydra.help.template
    with open_dict(cfg):
        del cfg["hydra"]
    groups = sorted(d for d in CONF_DIR.iterdir() if d.is_dir() and any(d.glob("*.yaml")))
    listed = "".join(f"{d.name}: {', '.join(sorted(f.stem for f in d.glob('*.yaml')))}\n" for d in groups)
    return string.Template(template).safe_substitute(APP_CONFIG_GROUPS=listed, CONFIG=OmegaConf.to_yaml(cfg))


def compose_error(err: HydraException, args: list[str]) -> str:
    """Hydra's error composing the command line `args`, as one line naming the key and the fix."""
    cause = err.__cause__
    key = getattr(cause, "full_key", None)
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and key:
        return f"unknown key {key!r} on the command line: check its spelling (`patchsweep --help` lists every key)"
    if key:
        given = next((a for a in args if a.lstrip("+~").split("=")[0] == key), key)
        return (f"{given}: {first_line(cause).rstrip('.')}: give {key} a value of its type (`patchsweep --cfg job` "
                "prints the config)")
    if isinstance(err, MissingConfigException) and err.missing_cfg_file:
        group, _, option = err.missing_cfg_file.rpartition("/")
        options = f": choose one of {', '.join(err.options)}" if err.options else ""
        return f"no option {option!r} in the config group {group or option!r}{options}"
    if isinstance(err, OverrideParseException):
        return (f"cannot read the override {err.override!r} ({first_line(err)}): write key=value, a "
                "list as key=[a,b], a --multirun sweep as key=a,b")
    return first_line(err)


# ---- a sweep: one job, or each of a --multirun's -------------------------------------------------

@dataclass
class Jobs:
    """The command's jobs as Hydra composes them, each validated (or refused) at once: nothing runs
    until every job of a --multirun is known to be valid."""

    valid: list[Job] = field(default_factory=list)
    refused: list[tuple[str, str]] = field(default_factory=list)  # (overrides, why) per job refused
    logging: dict = field(default_factory=dict)  # Hydra's job logging (conf/config.yaml), for the jobs' run

    def add(self, cfg: DictConfig) -> None:
        """Hydra's task function: called once per job (torch, Ray, MLflow are first imported here)."""
        from pipeline.run.multirun import REFUSALS, Job, end_of
        from pipeline.validation import validate

        overrides = list(HydraConfig.get().overrides.task)
        self.logging = OmegaConf.to_container(HydraConfig.get().job_logging, resolve=True)
        try:
            self.valid.append(Job(validate(cfg), overrides))
        except (*REFUSALS, OSError) as err:
            self.refused.append((" ".join(overrides), end_of(err, None).message))

    def __len__(self) -> int:
        return len(self.valid) + len(self.refused)


def sweep_command(args: list[str]) -> None:
    jobs = Jobs()
    compose_and_call(jobs.add, args)
    if not len(jobs):  # --help, --cfg, --shell-completion: Hydra has answered
        return
    if jobs.refused:
        refuse(jobs)
    from pipeline.run.logs import redact_console

    # Hydra put back its own logging once it had composed the jobs; theirs applies while they run.
    logging.config.dictConfig(jobs.logging)
    redact_console(logging.getLogger())
    comparison = run(jobs.valid)
    print_results(jobs.valid, comparison)
    leave_for(jobs.valid, comparison)


def refuse(jobs: Jobs) -> NoReturn:
    """Nothing runs: a lone job's line, or a line per refused job of several and the count."""
    if len(jobs) == 1:
        leave(2, jobs.refused[0][1])
    say([error_line(f"job {overrides}: {message}") for overrides, message in jobs.refused])
    leave(2, f"{len(jobs.refused)} of {len(jobs)} jobs refused, nothing was run: fix the overrides named above and "
             "run the command again")


def run(jobs: list[Job]) -> Comparison | None:
    """Every job's sweep (pipeline.run.multirun.run_jobs); returns the comparison of several."""
    from pipeline.run.multirun import check_jobs, end_of, run_jobs

    try:
        check_jobs(jobs)
        return run_jobs(jobs, os.environ[SWEEP_ENV])
    except BaseException as err:  # jobs that cannot share Ray, Ray that cannot start, Ctrl-C before they start
        end = end_of(err, jobs[0].cfg)
        if end.unforeseen is not None:
            raise
        leave(end.status, end.message)


def print_results(jobs: list[Job], comparison: Comparison | None) -> None:
    """Each finished job's summary; of several, where their comparison is."""
    from pipeline.outputs.report import console_summary, ui_hint

    for job in jobs:
        if job.outcome is not None:
            o = job.outcome
            print("\n" + console_summary(job.cfg, o.run_dir, o.pairs_report, o.stats, o.curves, o.summary, o.circuit,
                                         job.tracking), flush=True)
    if comparison is not None and comparison.files:
        print(f"\nComparison of the {sum(job.outcome is not None for job in jobs)} finished sweeps: "
              f"{comparison.folder.resolve()} (comparison.md, comparison.png)", flush=True)
    if comparison is not None and comparison.tracking:
        print(redact(f"MLflow: {comparison.tracking['uri']}  parent run {comparison.tracking['run_id']}\n"
                     f"  {ui_hint(jobs[0].cfg, comparison.tracking['ui_path'])}"), flush=True)


def leave_for(jobs: list[Job], comparison: Comparison | None) -> None:
    """Leave with the line and exit status of whatever ended a job or its logging: a lone job's own (an
    error nobody foresaw keeps its traceback); with several, a line per job, then what they add up to."""
    from pipeline.run.multirun import job_end

    ends = {job.label: job_end(job) for job in jobs}
    if len(jobs) == 1:
        [end] = ends.values()
        if end is not None and end.unforeseen is not None:
            raise end.unforeseen
        if end is not None:
            leave(end.status, end.message)
        return
    ended = [end for end in ends.values() if end is not None]
    lines = [notice_line(f"{label}: {end.message}") if end.status == INTERRUPTED else
             error_line(f"{label}{' failed' if end.failed else ''}: {end.message}")
             for label, end in ends.items() if end is not None]
    if comparison is not None and comparison.tracking_error:
        lines.append(error_line(f"MLflow store failed logging the comparison ({comparison.tracking_error}): it is in "
                                f"{comparison.folder.resolve()}"))
    say(lines)
    failed = sum(end.failed for end in ended)
    if any(end.status == INTERRUPTED for end in ended):
        leave(INTERRUPTED, "interrupted: run the same command to resume")
    if failed:
        leave(1, f"{failed} of {len(jobs)} jobs failed" + (", the others finished" if failed < len(jobs) else ""))
    if lines:
        leave(1, "every job finished, but not all of it reached MLflow (above)")


# ---- screen and log ----------------------------------------------------------------------------

def screen_command(args: list[str]) -> None:
    compose_and_call(screen_task, args)


def screen_task(cfg: DictConfig) -> None:
    """Greedy generation and the first-token metric on a file of prompts -> screen.arrow; with
    intervention.run, under that run's refusal direction (and its cost on ordinary text)."""
    from pipeline.analysis.prompt_files import load_screen_prompts
    from pipeline.run.screen import run_screen
    from pipeline.validation import ConfigError, validate_screen

    if not any(o.startswith("output_dir=") for o in HydraConfig.get().overrides.task):
        cfg.output_dir = "${output_root}/screen/${model.name}-${prompts.name}"  # not a sweep's folder
    try:
        plain = validate_screen(cfg)
        prompts = load_screen_prompts(plain.prompts.path)
    except (ConfigError, ValueError, FileNotFoundError) as err:
        leave(2, str(err))
    try:
        screened = run_screen(plain, prompts)
    except ConfigError as err:  # the intervention's direction was found on other weights
        leave(2, str(err))
    print(f"screen of {plain.model.name} on {plain.prompts.path}:\n{screened.text}\n"
          f"per-prompt results: {screened.path.resolve()}", flush=True)


LOG_USAGE = "patchsweep log <run folder> [tracking.<key>=<value> ...]"
LOG_HELP = f"""usage: {LOG_USAGE}

Log a finished sweep's folder to MLflow as the sweep would have (params, per-layer curves, artifacts,
lineage tags), computing nothing. The store is the one in the folder's config.yaml unless tracking.*
overrides name another (e.g. tracking.uri=sqlite:///elsewhere/mlflow.db)."""


def log_command(args: list[str]) -> None:
    """`patchsweep log`: see LOG_HELP."""
    if args[:1] in (["--help"], ["-h"]):
        print(LOG_HELP)
        return
    if not args or args[0].startswith("-"):
        leave(2, f"patchsweep log needs a run folder: {LOG_USAGE}")
    run_dir, overrides = Path(args[0]), args[1:]
    wrong = [o for o in overrides if not o.startswith("tracking.") or "=" not in o]
    if wrong:
        leave(2, f"patchsweep log takes only tracking.<key>=<value> overrides, not {' '.join(wrong)}: the results "
                 "are already computed")
    from pipeline.outputs.files import CONFIG

    if not (run_dir / CONFIG.name).is_file():
        leave(2, f"{run_dir} is not a sweep's run folder (no config.yaml there): give the folder a sweep printed "
                 "under Files:")
    from pipeline.outputs.report import ui_hint
    from pipeline.run.folder import finished_run
    from pipeline.run.tracking import log_finished
    from pipeline.schema import TrackingConfig, from_plain, to_plain, tracking_uri
    from pipeline.validation import ConfigError, validate_tracking

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
        leave(2, str(err))
    except OSError as err:
        leave(2, f"{err.filename or run_dir}: {err.strerror or type(err).__name__}: check the run folder")
    try:
        tracking = log_finished(cfg, outcome, os.environ[SWEEP_ENV])
    except KeyboardInterrupt:
        leave(INTERRUPTED, "interrupted: the run was not logged completely; run the same command again")
    except Exception as err:  # the store's own errors are many: one line, and the same command retries
        leave(1, f"MLflow store {tracking_uri(cfg)} failed ({first_line(err)}): fix the store or set "
                 "tracking.uri=<another store>, then run the same command")
    print(redact(f"logged {run_dir.resolve()} to MLflow {tracking['uri']}: run {tracking['run_id']}\n"
                 f"  {ui_hint(cfg, tracking['ui_path'])}"), flush=True)


# ---- export ------------------------------------------------------------------------------------

EXPORT_USAGE = "patchsweep export <run folder> [--viewer <folder>]"
EXPORT_HELP = f"""usage: {EXPORT_USAGE}

Write a finished run's circuit for other tools, from its circuit.json, computing nothing: the run folder
gets circuit_graph.json and graph-metadata.json (circuit-tracer's attribution graph: its local viewer
serves the folder) and circuit_mib.json (MIB's node and edge importances). A circuit run writes them
itself; this is for runs made before. --viewer <folder> also adds the graph, named after the run folder, to
the graphs already in that folder: one viewer for several runs."""


def export_command(args: list[str]) -> None:
    """`patchsweep export`: see EXPORT_HELP."""
    if args[:1] in (["--help"], ["-h"]):
        print(EXPORT_HELP)
        return
    viewer = None
    if len(args) == 3 and args[1] == "--viewer":
        args, viewer = args[:1], args[2]
    if len(args) != 1 or args[0].startswith("-"):
        leave(2, f"patchsweep export takes a run folder: {EXPORT_USAGE}")
    import json

    from pipeline.outputs.export import export_run, viewer_query

    try:
        files = export_run(args[0], viewer)
    except FileNotFoundError as err:
        leave(2, first_line(err))
    except (KeyError, ValueError) as err:  # a circuit.json of an older layout, or damaged
        why = f"no {err} field" if isinstance(err, KeyError) else first_line(err)
        leave(2, f"{args[0]}/circuit.json cannot be read ({why}): run the sweep again to rewrite it")
    graph = json.loads(files.graph.read_text())
    print(f"circuit-tracer graph: {files.graph.resolve()} (index {files.index.resolve()})\n"
          f"MIB importances: {files.mib.resolve()}\n"
          f"  serve {files.graph.parent.resolve()} with circuit-tracer's viewer (docs/export.md) and open "
          f"http://127.0.0.1:<port>/index.html?{viewer_query(graph)}", flush=True)


# ---- compare -------------------------------------------------------------------------------------------

COMPARE_USAGE = ("patchsweep compare RUN_A RUN_B [RUN_C ...] | --newest FOLDER  [compare.<key>=<value> ...] "
                 "[tracking.<key>=<value> ...]")
COMPARE_HELP = f"""usage: {COMPARE_USAGE}

Compare finished runs with the first (the reference): circuit overlap, effect ranks, each circuit's
faithfulness on the other run's model and pairs, refusal rates, the refusal direction, each against the null
band of the runs' own resamples; one line `verdict: drift` or `verdict: within noise`. Writes compare.json,
compare.md and compare.png (compare.output_dir, default <output_root>/compare/<a>-vs-<b>) and an MLflow run
in the reference's store. --newest FOLDER compares the newest finished run in FOLDER with the one before it
(a scheduled sweep's dated folders). Exit status 0 either way (1: the MLflow store failed; 2: refused);
with compare.fail_on_drift=true, 3 on drift.
Keys: compare.output_dir, compare.fail_on_drift, compare.level, compare.n_draws, compare.seed, compare.device."""


def compare_command(args: list[str]) -> None:
    """`patchsweep compare`: see COMPARE_HELP (pipeline.run.compare)."""
    if not args or args[:1] in (["--help"], ["-h"]):
        print(COMPARE_HELP)
        return
    import yaml

    from pipeline.schema import CompareConfig, from_plain

    # An override is known by its key: a run folder may hold "=" (folders of older --multirun jobs).
    overrides = [a for a in args if a.startswith(("compare.", "tracking.")) and "=" in a]
    folders = [Path(a) for a in args if a not in overrides and a != "--newest"]
    try:
        options = from_plain({o.split("=")[0][len("compare."):]: yaml.safe_load(o.split("=", 1)[1])
                              for o in overrides if o.startswith("compare.")}, CompareConfig)
    except ValueError as err:
        leave(2, str(err).replace("config key '", "key 'compare."))
    from pipeline.run.compare import FAIL_ON_DRIFT_STATUS, NotComparable, compare_runs, newest_two

    if "--newest" in args:
        if len(folders) != 1 or not folders[0].is_dir():
            leave(2, f"--newest takes one folder of run folders: {COMPARE_USAGE}")
        folders = newest_two(folders[0])
        if len(folders) < 2:
            print(f"nothing to compare: fewer than two finished runs in {args[args.index('--newest') + 1]}", flush=True)
            return
    try:
        compared = compare_runs(folders, options, [o for o in overrides if o.startswith("tracking.")])
    except NotComparable as err:
        leave(2, str(err))
    print(f"compare: {compared.folder.resolve()} (compare.md, compare.json, compare.png), {compared.seconds:.1f} s",
          flush=True)
    if compared.tracking:
        print(redact(f"MLflow: {compared.tracking['uri']}  run {compared.tracking['run_id']}"), flush=True)
    if compared.tracking_error:
        say([error_line(f"MLflow store failed logging the comparison ({compared.tracking_error}): it is in "
                        f"{compared.folder.resolve()}")])
    print(compared.verdict.line, flush=True)
    if compared.verdict.drift and options.fail_on_drift:
        sys.exit(FAIL_ON_DRIFT_STATUS)
    if compared.tracking_error:
        sys.exit(1)


def version_command(args: list[str]) -> None:
    print(f"patchsweep {__version__}")


# The first argument names a command; anything else is a sweep's Hydra command line.
COMMANDS = {
    "screen": screen_command,
    "log": log_command,
    "export": export_command,
    "compare": compare_command,
    "--version": version_command,
}


if __name__ == "__main__":
    main()
