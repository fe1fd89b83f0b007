"""The refusal direction as Arditi et al. 2024 select it, its interventions read back from a run folder,
and what an intervention costs on ordinary text. This is the run's one refusal direction (direction.arrow);
the circuit step's final-token mean difference per layer (circuit.json's mean_difference) only reads the
circuit's nodes.

Selection (`select_direction`), on a run's screened pairs (harmful = clean, harmless = corrupted), split
by a seeded permutation into a half that gives the means and a half that scores them:
- candidates: mean(harmful) - mean(harmless) residual entering each layer l, at each post-instruction
  position i (the chat template's tokens after the user's instruction, counted from the end, where every
  prompt has the same token);
- scores, on the scoring half, with the run's answer tokens and `refusal_logodds` (> 0 = refuses):
  bypass = mean metric on the harmful prompts with the candidate ablated everywhere (lower is better);
  induce = mean metric on the harmless prompts with the candidate added at layer l, every position;
  kl = mean KL(plain || ablated) of the harmless prompts' next-token distribution at the final position;
- filters: l < max_layer_fraction * n_layers (the last 20% of layers are left out, as in the paper, and
  not scored), kl <= max_kl, induce > 0 (adding it must make the model prefer refusing);
- the chosen direction: the lowest bypass score among the candidates that pass.
direction.arrow holds every candidate (its vector, scores, and the reason it was filtered) with a
summary in its metadata.

Addition adds scale * the unit direction; its default scale is the run's mean projection of the harmful
prompts minus that of the harmless ones on the unit direction (both stored), which equals the
candidate's norm: adding it is the paper's x + r.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.behaviour import SCREEN_METRIC, chat_ids, length_batches
from pipeline.engine.adapters import get_adapter
from pipeline.engine.directions import (
    Intervention,
    ablate_direction_kl,
    ablate_direction_metrics,
    add_direction_metrics,
    intervened,
    mean_difference,
    unit_vectors,
)
from pipeline.engine.hooks import run_with_cache
from pipeline.engine.metrics import Answers, kl_to_source, measure
from pipeline.outputs.files import DIRECTION, RunFolder
from pipeline.store import provenance, read_schema, read_table, tensor_column, tensor_numpy

SUMMARY_KEY = "direction_summary"
# Ordinary English sentences written for this project (not from any training data): the cross-entropy
# cost of an intervention on text that has nothing to do with refusal.
GENERAL_TEXT = Path(__file__).parent / "general_text.txt"


@dataclass
class DirectionSelection:
    table: pa.Table  # one row per candidate (DIRECTION_SCHEMA's columns)
    summary: dict  # the chosen candidate, the filters, the pairs, the base scores


def post_instruction_count(pairs: pa.Table) -> int:
    """How many chat-template tokens follow the instruction in every pair's harmful prompt."""
    after = [n - end for n, end in zip(pairs.column("seq_len").to_pylist(),
                                       pairs.column("instruction_end").to_pylist())]
    if min(after) < 1:
        raise ValueError("a prompt ends with its instruction: the chat template leaves no post-instruction "
                         "position to take a direction at")
    return min(after)


def _groups(ids: Sequence[Sequence[int]], batch_size: int = 64) -> list[torch.Tensor]:
    """Prompts of equal length as [P, T] batches (no padding)."""
    return [torch.tensor([list(ids[i]) for i in idx]) for idx in length_batches([len(x) for x in ids], batch_size)]


def _answers(pairs: pa.Table, n: int) -> Answers:
    """The run's answer tokens (the same for every pair) for n rows."""
    refusal, compliance = pairs.column("refusal_ids")[0].as_py(), pairs.column("compliance_ids")[0].as_py()
    return Answers(torch.tensor([refusal] * n), torch.tensor([compliance] * n))


@torch.no_grad()
def post_instruction_residuals(model, ids: Sequence[Sequence[int]], n_post: int) -> torch.Tensor:
    """[P, L, n_post, d] float32: the residual entering each layer at the last n_post positions."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    parts = [run_with_cache(model, adapter, batch.to(device)).acts["resid_pre"][:, :, -n_post:].float().cpu()
             for batch in _groups(ids)]
    return torch.cat(parts)


def _mean_over_groups(fn, ids: Sequence[Sequence[int]], n_candidates: int) -> torch.Tensor:
    """fn(batch [P, T]) -> [C, P] per length group, averaged over every prompt -> [C]."""
    total, count = torch.zeros(n_candidates), 0
    for batch in _groups(ids):
        total += fn(batch).sum(1)
        count += len(batch)
    return total / count


def select_direction(model, pairs: pa.Table, max_kl: float = 0.1, max_layer_fraction: float = 0.8, seed: int = 0,
                     max_batch_rows: int | None = None) -> DirectionSelection:
    """The paper's selection on pairs.parquet's rows (see the module's docstring)."""
    if pairs.num_rows < 4:
        raise ValueError(f"direction selection needs at least 4 screened pairs (2 for the means, 2 to score), got "
                         f"{pairs.num_rows}: generate more pairs (prompts.n_pairs)")
    adapter = get_adapter(model)
    n_layers, n_post = adapter.n_layers, post_instruction_count(pairs)
    order = np.random.default_rng(seed).permutation(pairs.num_rows)
    mean_rows, score_rows = sorted(order[:len(order) // 2].tolist()), sorted(order[len(order) // 2:].tolist())
    clean, corrupted = pairs.column("clean_ids").to_pylist(), pairs.column("corrupted_ids").to_pylist()

    harmful = post_instruction_residuals(model, [clean[r] for r in mean_rows], n_post)  # [P, L, I, d]
    harmless = post_instruction_residuals(model, [corrupted[r] for r in mean_rows], n_post)
    candidates = mean_difference(harmful, harmless)  # [L, I, d]
    units = unit_vectors(candidates)
    harmful_projection = torch.einsum("plid,lid->li", harmful, units) / len(harmful)  # [L, I] mean projections
    harmless_projection = torch.einsum("plid,lid->li", harmless, units) / len(harmless)

    scored_layers = [layer for layer in range(n_layers) if layer < max_layer_fraction * n_layers]
    flat = candidates[scored_layers].reshape(-1, adapter.d_model)  # [C, d], layer-major
    flat_layers = [layer for layer in scored_layers for _ in range(n_post)]
    harmful_scoring = [clean[r] for r in score_rows]
    harmless_scoring = [corrupted[r] for r in score_rows]
    device = next(model.parameters()).device
    n_candidates = len(flat)

    def bypass(batch):
        return ablate_direction_metrics(model, batch.to(device), _answers(pairs, len(batch)), flat, SCREEN_METRIC,
                                        max_batch_rows)

    def induce(batch):
        return add_direction_metrics(model, batch.to(device), _answers(pairs, len(batch)), flat, flat_layers,
                                     SCREEN_METRIC, max_batch_rows)

    def kl(batch):
        return ablate_direction_kl(model, batch.to(device), flat, max_batch_rows)

    scores = {"bypass_score": _mean_over_groups(bypass, harmful_scoring, n_candidates),
              "induce_score": _mean_over_groups(induce, harmless_scoring, n_candidates),
              "kl": _mean_over_groups(kl, harmless_scoring, n_candidates)}
    plain = {"harmful": _plain_metric(model, harmful_scoring, pairs),
             "harmless": _plain_metric(model, harmless_scoring, pairs)}

    rows = []
    for layer in range(n_layers):
        for i in range(n_post):
            row = {"layer": layer, "position_from_end": i - n_post, "norm": float(candidates[layer, i].norm()),
                   "harmful_projection": float(harmful_projection[layer, i]),
                   "harmless_projection": float(harmless_projection[layer, i]),
                   "bypass_score": None, "induce_score": None, "kl": None}
            if layer in scored_layers:
                c = scored_layers.index(layer) * n_post + i
                row |= {name: float(values[c]) for name, values in scores.items()}
            row["filtered"] = _filtered(row, scored_layers, max_kl)
            rows.append(row)
    passing = [r for r in rows if not r["filtered"]]
    chosen = min(passing, key=lambda r: r["bypass_score"]) if passing else None
    tokens = (pairs.column("clean_tokens")[0].as_py()[-n_post:] if "clean_tokens" in pairs.column_names
              else [None] * n_post)
    table = pa.table({
        "layer": pa.array([r["layer"] for r in rows], pa.int32()),
        "position_from_end": pa.array([r["position_from_end"] for r in rows], pa.int32()),
        "token": pa.array([tokens[r["position_from_end"] + n_post] for r in rows], pa.string()),
        **{name: pa.array([r[name] for r in rows], pa.float64())
           for name in ("norm", "harmful_projection", "harmless_projection", "bypass_score", "induce_score", "kl")},
        "filtered": pa.array([r["filtered"] for r in rows], pa.string()),
        "chosen": pa.array([r is chosen for r in rows], pa.bool_()),
        "direction": tensor_column(candidates.reshape(n_layers * n_post, -1).numpy().astype(np.float32)),
    })
    summary = {
        "chosen": None if chosen is None else {k: chosen[k] for k in (
            "layer", "position_from_end", "norm", "harmful_projection", "harmless_projection", "bypass_score",
            "induce_score", "kl")} | {"token": tokens[chosen["position_from_end"] + n_post],
                                      "scale": chosen["harmful_projection"] - chosen["harmless_projection"]},
        "n_candidates": len(rows), "n_scored": n_candidates, "n_passing": len(passing),
        "n_layers": n_layers, "n_post_instruction": n_post, "max_kl": max_kl,
        "max_layer_fraction": max_layer_fraction, "scored_layers": [scored_layers[0], scored_layers[-1]],
        "metric": SCREEN_METRIC, "seed": seed,
        "mean_pair_ids": [int(pairs.column("pair_id")[r].as_py()) for r in mean_rows],
        "score_pair_ids": [int(pairs.column("pair_id")[r].as_py()) for r in score_rows],
        "plain_harmful_score": plain["harmful"], "plain_harmless_score": plain["harmless"],
    }
    return DirectionSelection(table, summary)


def _filtered(row: dict, scored_layers: list[int], max_kl: float) -> str:
    """Why a candidate is out ("" when it passes)."""
    if row["layer"] not in scored_layers:
        return "in the last layers"
    if row["kl"] > max_kl:
        return f"KL {row['kl']:.3g} > {max_kl}"
    if row["induce_score"] <= 0:
        return "adding it does not induce refusal"
    return ""


@torch.no_grad()
def _plain_metric(model, ids: Sequence[Sequence[int]], pairs: pa.Table) -> float:
    """The mean refusal metric of these prompts, unintervened."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    total = 0.0
    for batch in _groups(ids):
        answers = _answers(pairs, len(batch))
        final = run_with_cache(model, adapter, batch.to(device)).final_resid
        total += float(measure(adapter, SCREEN_METRIC, answers, final, torch.arange(len(batch))).sum())
    return total / len(ids)


# ---- a run's direction, read back --------------------------------------------------------------------

def selection_summary(run_dir: str | Path) -> dict | None:
    """The summary direction.arrow carries (cheap: the file's schema only), None when the run has none."""
    path = RunFolder(run_dir).direction
    return json.loads(provenance(read_schema(path))[SUMMARY_KEY]) if path.is_file() else None


def direction_summary(run_dir: str | Path) -> dict:
    """The summary of a run whose selection chose a direction. A one-line error, before any model is
    loaded, when the folder has no direction or its selection chose none."""
    path = RunFolder(run_dir).direction
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: set intervention.run to a sweep's run folder")
    summary = selection_summary(run_dir)
    if summary is None:
        raise ValueError(f"{run_dir} holds no {DIRECTION.name}: run its sweep with direction.enabled=true (the same "
                         "command resumes it), or set intervention.run to a folder that has one")
    if summary["chosen"] is None:
        raise ValueError(f"{path}: no candidate direction passed the filters (see its report.md): nothing to "
                         "intervene with; loosen direction.max_kl or use another run")
    return summary


def load_intervention(run_dir: str | Path, mode: str, scale: float | None = None) -> Intervention:
    """The run's chosen direction as an intervention; addition's scale defaults to the run's (see above)."""
    summary = direction_summary(run_dir)
    table = read_table(RunFolder(run_dir).direction)
    row = table.column("chosen").to_pylist().index(True)
    vector = torch.from_numpy(np.array(tensor_numpy(table.column("direction"))[row]))
    chosen = summary["chosen"]
    return Intervention(mode, vector, chosen["layer"], chosen["scale"] if scale is None else float(scale))


# ---- cost on ordinary text ---------------------------------------------------------------------------

def general_sentences() -> list[str]:
    return [line.strip() for line in GENERAL_TEXT.read_text().splitlines() if line.strip()]


@torch.no_grad()
def intervention_cost(model, tokenizer, intervention: Intervention, harmless_prompts: Sequence[str],
                      sentences: Sequence[str] | None = None, batch_size: int = 64) -> dict:
    """What the intervention changes besides refusal: the mean KL(plain || intervened) of the next-token
    distribution at the final position of the harmless prompts (in the chat template), and the mean
    next-token cross-entropy on the general text sample (each sentence alone, no template) plain and
    intervened."""
    device = next(model.parameters()).device
    kl_total = 0.0
    prompts = [chat_ids(tokenizer, p) for p in harmless_prompts]
    for batch in _groups(prompts, batch_size):
        batch = batch.to(device)
        plain = model(input_ids=batch, use_cache=False).logits[:, -1]
        with intervened(model, intervention):
            changed = model(input_ids=batch, use_cache=False).logits[:, -1]
        kl_total += float(kl_to_source(plain, changed).sum())
    sentences = general_sentences() if sentences is None else sentences
    texts = [ids for ids in tokenizer(list(sentences))["input_ids"] if len(ids) > 1]
    ce = {"plain": 0.0, "intervened": 0.0}
    n_tokens = 0
    for batch in _groups(texts, batch_size):
        batch = batch.to(device)
        for name in ce:
            with intervened(model, intervention if name == "intervened" else None):
                logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            ce[name] += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                                 batch[:, 1:].reshape(-1), reduction="sum"))
        n_tokens += batch[:, 1:].numel()
    return {"kl_harmless": kl_total / max(1, len(prompts)), "n_harmless": len(prompts),
            "ce_plain": ce["plain"] / n_tokens, "ce_intervened": ce["intervened"] / n_tokens,
            "ce_change": (ce["intervened"] - ce["plain"]) / n_tokens, "n_sentences": len(texts), "n_tokens": n_tokens}


def format_intervention(summary: dict) -> str:
    """Two lines for a terminal: which intervention, and its cost."""
    setting, cost = summary["intervention"], summary["cost"]
    where = "every layer" if setting["mode"] == "ablate" else f"layer {setting['layer']}, scale {setting['scale']:.3g}"
    return (f"under the refusal direction of {setting['run']} ({setting['mode']}, {where}): KL on the "
            f"{cost['n_harmless']} harmless prompts {cost['kl_harmless']:.3f}; cross-entropy on the general text "
            f"{cost['ce_plain']:.3f} -> {cost['ce_intervened']:.3f} "
            f"({cost['ce_change']:+.3f}, {cost['n_tokens']} tokens)")
