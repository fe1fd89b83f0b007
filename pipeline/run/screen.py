"""`patchsweep screen`: the behaviour screen alone, in the driver (no Ray: one model, one pass over a
file of prompts). Greedy replies (intervention.max_new_tokens long: enough to see whether a reply
complies) and the first-token metric on each prompt -> screen.arrow in output_dir; with intervention.run,
under that run's ablation subspace or addition direction (read only once checked against the
run's manifest and found on this model's weights), with its cost on ordinary text."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import torch

from pipeline.analysis.behaviour import format_summary, screen
from pipeline.analysis.directions import format_intervention, intervention_cost, load_intervention
from pipeline.engine.loading import load_model
from pipeline.messages import redact
from pipeline.organisms import resolve
from pipeline.run.folder import checked_direction
from pipeline.run.workers import weights_hash
from pipeline.schema import PatchsweepConfig
from pipeline.store import write_table
from pipeline.validation import ConfigError


@dataclass(frozen=True)
class Screened:
    path: Path  # screen.arrow: a row per prompt, the summary in its metadata
    summary: dict  # refusal rates, agreement, answer tokens; with an intervention, its setting and cost
    text: str  # the summary in lines for a terminal


def check_direction_model(run_dir: Path, model_path: str, model) -> None:
    """The run's direction.arrow, checked against its manifest again (the file read next is the one
    checked), was found on this model: its weights digest is the run's. A mismatch is a `ConfigError`."""
    try:
        expected = checked_direction(run_dir)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    actual = weights_hash(model)
    if expected and actual != expected:
        raise ConfigError(f"the direction in {run_dir} was found on a model whose weights differ from "
                          f"{redact(model_path)}'s (weights sha256 {expected[:12]}, this model {actual[:12]}): set "
                          "intervention.run to a run of this model")


def run_screen(cfg: PatchsweepConfig, prompts: pa.Table) -> Screened:
    """Screen `prompts` (prompt, harmful columns) with the model of the validated `cfg`."""
    torch.set_num_threads(cfg.resources.torch_threads)
    model, tokenizer = load_model(resolve(cfg.model.path, cfg.model.checkpoint), dtype=cfg.model.dtype,
                                  device=cfg.resources.device,
                                  trust_remote_code=cfg.model.trust_remote_code)
    setting = cfg.intervention
    if setting.run:
        check_direction_model(Path(setting.run), cfg.model.path, model)
    intervention = load_intervention(setting.run, setting.mode, setting.scale) if setting.run else None
    result = screen(model, tokenizer, prompts, max_new_tokens=setting.max_new_tokens,
                    refusal_tokens=cfg.prompts.refusal_tokens,
                    compliance_tokens=cfg.prompts.compliance_tokens,
                    answer_top_k=cfg.prompts.answer_top_k, intervention=intervention)
    table, summary, text = result.table, result.summary, format_summary(result.summary)
    if intervention is not None:
        harmless = [p for p, harmful in zip(prompts.column("prompt").to_pylist(),
                                            prompts.column("harmful").to_pylist()) if not harmful]
        cost = intervention_cost(model, tokenizer, intervention, harmless)
        summary = summary | {"intervention": asdict(setting) | {"layer": intervention.layer,
                                                                "scale": intervention.scale},
                             "cost": cost}
        table = table.replace_schema_metadata({b"screen_summary": json.dumps(summary).encode()})
        text += "\n" + format_intervention(summary)
    path = write_table(Path(cfg.output_dir) / "screen.arrow", table,
                       {"model_id": redact(cfg.model.path), "prompts": cfg.prompts.path})
    return Screened(path, summary, text)
