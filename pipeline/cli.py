"""The `patchsweep` command (also `python -m pipeline`): compose -> validate -> run -> track -> print.

    patchsweep [key=value ...]                      a sweep (Hydra overrides; --multirun for several)
    patchsweep screen model=<name> prompts.path=<file with prompt, harmful columns>

Errors in the config or the input are printed as one line naming the problem and the key to fix,
before any compute starts.
"""
from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from pipeline.analysis.behaviour import format_summary, screen
from pipeline.analysis.prompt_files import load_screen_prompts
from pipeline.config import CONF_DIR
from pipeline.engine.loading import load_model
from pipeline.organisms import resolve
from pipeline.outputs.report import console_summary
from pipeline.run.sweep import run_sweep
from pipeline.run.tracking import LiveRun
from pipeline.run.workers import WorkFailed
from pipeline.store import write_table
from pipeline.validation import ConfigError, validate, validate_screen

SWEEP_ENV = "PATCHSWEEP_SWEEP_ID"


def _fail(err: BaseException) -> None:
    print(f"patchsweep: error: {err}", file=sys.stderr, flush=True)
    sys.exit(2)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def sweep_command(cfg: DictConfig) -> None:
    overrides = list(HydraConfig.get().overrides.task)
    tracking = None
    try:
        plain = validate(cfg)
        # The MLflow run starts with the sweep and ends with it, FAILED when the sweep does.
        live = LiveRun(plain, os.environ[SWEEP_ENV], overrides) if plain["tracking"]["enabled"] else None
        try:
            outcome = run_sweep(plain, live, overrides)
            if live is not None:
                tracking = live.finish(outcome)
        except BaseException as err:
            if live is not None:
                live.fail(err)
            raise
    except (ConfigError, ValueError, FileNotFoundError, WorkFailed) as err:
        _fail(err)
    print("\n" + console_summary(plain, outcome.run_dir, outcome.pairs_report, outcome.stats, outcome.curves,
                                 outcome.summary, outcome.circuit, tracking), flush=True)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def screen_command(cfg: DictConfig) -> None:
    """Greedy generation and the first-token metric on a file of prompts -> screen.arrow."""
    hydra_dir = Path(HydraConfig.get().runtime.output_dir)
    if not any(o.startswith("output_dir=") for o in HydraConfig.get().overrides.task):
        cfg.output_dir = "${output_root}/screen/${model.name}-${prompts.name}"  # not a sweep's folder
        if hydra_dir.is_dir() and not any(hydra_dir.iterdir()):
            hydra_dir.rmdir()  # the sweep folder Hydra made for this command stays unused
    try:
        plain = validate_screen(cfg)
        prompts = load_screen_prompts(plain["prompts"]["path"])
    except (ConfigError, ValueError, FileNotFoundError) as err:
        _fail(err)
    torch.set_num_threads(plain["resources"]["torch_threads"])
    model, tokenizer = load_model(resolve(plain["model"]["path"]), dtype=plain["model"]["dtype"],
                                  device=plain["resources"]["device"],
                                  trust_remote_code=plain["model"]["trust_remote_code"])
    result = screen(model, tokenizer, prompts, max_new_tokens=plain["prompts"]["max_new_tokens"],
                    refusal_tokens=plain["prompts"]["refusal_tokens"],
                    compliance_tokens=plain["prompts"]["compliance_tokens"],
                    answer_top_k=plain["prompts"]["answer_top_k"])
    path = write_table(Path(plain["output_dir"]) / "screen.arrow", result.table,
                       {"model_id": plain["model"]["path"], "prompts": plain["prompts"]["path"]})
    print(f"screen of {plain['model']['name']} on {plain['prompts']['path']}:\n{format_summary(result.summary)}\n"
          f"per-prompt results: {path.resolve()}", flush=True)


def main() -> None:
    # One id per command: the jobs of a --multirun share it, so they become children of one parent run.
    os.environ.setdefault(SWEEP_ENV, f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}")
    if len(sys.argv) > 1 and sys.argv[1] == "screen":
        del sys.argv[1]
        screen_command()
    else:
        sweep_command()


if __name__ == "__main__":
    main()
