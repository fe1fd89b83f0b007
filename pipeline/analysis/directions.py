"""The refusal direction in its two roles, selected on a run's screened pairs (after Arditi et al. 2024),
read back from a run folder as an intervention, and what an intervention costs on ordinary text.

Selection (`select_directions`), on the screened pairs (harmful = clean, harmless = corrupted), split by a
seeded permutation into a half that gives the means and a half that scores them ("selection prompts"):
- candidates: mean(harmful) - mean(harmless) residual entering each layer l, at each post-instruction
  position i (the chat template's tokens after the user's instruction, counted from the end, where every
  prompt has the same token); layers >= max_layer_fraction * n_layers are left out (as in the paper);
- ranking: every candidate's first-order effect (one forward and backward pass per prompt group,
  `first_order_effects`) estimates its bypass and induce scores; the `n_verified` best of each role are
  scored exactly, with `refusal_logodds` (> 0 = refuses) on the scoring half:
  bypass = mean metric of the harmful prompts with the candidate ablated everywhere (lower is better),
  induce = mean metric of the harmless prompts with the candidate (its own norm) added at layer l,
  kl = mean KL(plain || ablated) of the harmless prompts' next-token distribution at the final position;
- the ablation direction: the lowest bypass among verified candidates with kl <= max_kl and induce > 0 (the
  paper's rule). When it leaves more than `ablation_target` of the scoring harmful prompts refusing (by the
  metric), the next candidates in bypass order join it as a subspace, k at most `max_subspace`: the smallest
  k that reaches the target within max_kl;
- the addition direction: in order of induce, the first verified candidate whose scale rule succeeds: the
  smallest multiple of its norm on SCALE_GRID that makes at least `induce_target` of the scoring harmless
  prompts refuse (by the metric), within `max_ce_change` nats per token of cross-entropy change on a sample
  of the general text. That scale is recorded;
- their cosine, and whether one candidate serves both roles.
direction.arrow holds every candidate (vector, first-order estimates, exact scores where verified, why it is
out of each role) with a summary in its metadata.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.behaviour import SCREEN_METRIC, chat_ids, decode, greedy_generations, length_batches
from pipeline.engine.adapters import get_adapter
from pipeline.engine.directions import (
    FirstOrder,
    Intervention,
    ablate_direction_kl,
    ablate_direction_metrics,
    add_direction_metrics,
    first_order_effects,
    intervened,
    mean_difference,
    unit_vectors,
)
from pipeline.engine.hooks import run_with_cache
from pipeline.engine.metrics import Answers, kl_to_source
from pipeline.outputs.files import DIRECTION, RunFolder
from pipeline.schema import DirectionConfig
from pipeline.store import provenance, read_schema, read_table, tensor_column, tensor_numpy

SUMMARY_KEY = "direction_summary"
# Ordinary English sentences written for this project (not from any training data): the cross-entropy
# cost of an intervention on text that has nothing to do with refusal.
GENERAL_TEXT = Path(__file__).parent / "general_text.txt"
# Addition scales tried, as multiples of the candidate's norm (1 = the paper's x + r).
SCALE_GRID = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0)
# The general text cut into windows of this many tokens: rows of one length, batched without padding.
WINDOW_TOKENS = 64
# The paper's KL filter, reported whatever budget the run sets.
PAPER_MAX_KL = 0.1


@dataclass(frozen=True)
class Split:
    mean_rows: list[int]  # pairs.parquet rows whose prompts give the means
    score_rows: list[int]  # rows whose prompts score the candidates (the selection prompts)


@dataclass(frozen=True)
class Candidates:
    vectors: torch.Tensor  # [L, I, d] mean(harmful) - mean(harmless)
    harmful_projection: torch.Tensor  # [L, I] mean projection of the harmful prompts on each unit direction
    harmless_projection: torch.Tensor  # [L, I]
    scored: list[tuple[int, int]]  # (layer, position index) of the candidates in the scored layers

    def flat(self) -> torch.Tensor:
        """[C, d] the scored candidates, in `scored` order."""
        return torch.stack([self.vectors[layer, i] for layer, i in self.scored])


@dataclass(frozen=True)
class Scores:
    bypass: torch.Tensor  # [P] per harmful scoring prompt
    induce: torch.Tensor  # [P] per harmless scoring prompt, at the candidate's own norm
    kl: torch.Tensor  # [P] per harmless scoring prompt


@dataclass(frozen=True)
class Ablation:
    candidates: list[int]  # scored-candidate indices spanning the subspace, the first the best single one
    bypass: float
    kl: float
    refused: float  # share of the scoring harmful prompts still refusing (metric > 0)
    target_met: bool
    tried: list[dict]  # k, bypass, kl, refused of each subspace tried


@dataclass(frozen=True)
class Addition:
    candidate: int
    multiple: float  # of the candidate's norm
    scale: float
    induced: float  # share of the scoring harmless prompts refusing (metric > 0) at that scale
    ce_change: float  # nats per token on the general text sample
    target_met: bool
    tried: list[dict]  # candidate, multiple, induced, ce_change of each step of the scale rule


@dataclass
class DirectionSelection:
    table: pa.Table  # one row per candidate (layer x post-instruction position)
    summary: dict  # both roles, the filters, the pairs, the base scores


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


def _padded(ids: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts of several lengths as one batch padded on the right [P, T], and their lengths [P]."""
    lengths = torch.tensor([len(x) for x in ids])
    return torch.tensor([list(x) + [x[-1]] * (int(lengths.max()) - len(x)) for x in ids]), lengths


def _per_prompt(fn: Callable[[torch.Tensor], torch.Tensor], ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """fn(batch [B, T]) -> [C, B] over the length groups -> [C, P] (in group order: the same for every fn)."""
    return torch.cat([fn(batch) for batch in _groups(ids)], dim=1)


@torch.no_grad()
def post_instruction_residuals(model, ids: Sequence[Sequence[int]], n_post: int) -> torch.Tensor:
    """[P, L, n_post, d] float32: the residual entering each layer at the last n_post positions."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    parts = [run_with_cache(model, adapter, batch.to(device)).acts["resid_pre"][:, :, -n_post:].float().cpu()
             for batch in _groups(ids)]
    return torch.cat(parts)


def split_pairs(n_pairs: int, seed: int) -> Split:
    if n_pairs < 4:
        raise ValueError(f"direction selection needs at least 4 screened pairs (2 for the means, 2 to score), got "
                         f"{n_pairs}: generate more pairs (prompts.n_pairs)")
    order = np.random.default_rng(seed).permutation(n_pairs)
    return Split(sorted(order[:n_pairs // 2].tolist()), sorted(order[n_pairs // 2:].tolist()))


def select_directions(model, tokenizer, pairs: pa.Table, options: DirectionConfig,
                      mean_residuals: tuple[torch.Tensor, torch.Tensor] | None = None,
                      progress: Callable[[int, int], None] | None = None) -> DirectionSelection:
    """Both roles on pairs.parquet's rows (see the module's docstring). `mean_residuals`: the mean half's
    (harmful, harmless) residuals [P, L, I, d] at the post-instruction positions when the sweep already
    computed them (the cache stage's); `progress(done, total)` counts the steps: each candidate ranked by its
    first-order estimate, each of the shortlist run exactly, then each role chosen."""
    adapter = get_adapter(model)
    split = split_pairs(pairs.num_rows, options.seed)
    n_post = post_instruction_count(pairs)
    candidates = _candidates(model, pairs, split, n_post, options.max_layer_fraction, mean_residuals)
    clean, corrupted = pairs.column("clean_ids").to_pylist(), pairs.column("corrupted_ids").to_pylist()
    harmful = [clean[r] for r in split.score_rows]
    harmless = [corrupted[r] for r in split.score_rows]
    n_scored = len(candidates.scored)
    report = progress or (lambda done, total: None)

    seconds, began = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal began
        seconds[name], began = round(time.perf_counter() - began, 2), time.perf_counter()

    lap("means")
    report(0, n_scored + 2 * options.n_verified + 2)
    first = _first_order(model, pairs, candidates, harmful, harmless, options.max_batch_rows)
    lap("first_order")
    shortlist = _shortlist(first, options.n_verified)
    total = n_scored + len(shortlist) + 2  # each ranked, each of the shortlist run exactly, the two roles
    report(n_scored, total)
    exact = _exact_scores(model, pairs, candidates, shortlist, harmful, harmless, options.max_batch_rows)
    lap("exact")
    report(n_scored + len(shortlist), total)
    windows = general_text_windows(tokenizer, options.budget_windows)
    ablation = _ablation_role(model, pairs, candidates, exact, harmful, harmless, options)
    lap("ablation_subspace")
    report(total - 1, total)
    addition = _addition_role(model, pairs, candidates, exact, harmless, windows, options)
    lap("addition_scale")
    report(total, total)
    selection = _selection(pairs, adapter.n_layers, n_post, split, candidates, first, exact, ablation, addition,
                           options, tokens=pairs.column("clean_tokens")[0].as_py()[-n_post:]
                           if "clean_tokens" in pairs.column_names else [None] * n_post)
    selection.summary["seconds"] = seconds
    return selection


def _candidates(model, pairs: pa.Table, split: Split, n_post: int, max_layer_fraction: float,
                mean_residuals: tuple[torch.Tensor, torch.Tensor] | None) -> Candidates:
    if mean_residuals is None:
        clean, corrupted = pairs.column("clean_ids").to_pylist(), pairs.column("corrupted_ids").to_pylist()
        mean_residuals = (post_instruction_residuals(model, [clean[r] for r in split.mean_rows], n_post),
                          post_instruction_residuals(model, [corrupted[r] for r in split.mean_rows], n_post))
    harmful, harmless = mean_residuals  # [P, L, I, d]
    vectors = mean_difference(harmful, harmless)  # [L, I, d]
    units = unit_vectors(vectors)
    n_layers = vectors.shape[0]
    scored = [(layer, i) for layer in range(n_layers) if layer < max_layer_fraction * n_layers for i in range(n_post)]
    return Candidates(vectors, torch.einsum("plid,lid->li", harmful.float(), units) / len(harmful),
                      torch.einsum("plid,lid->li", harmless.float(), units) / len(harmless), scored)


def _first_order(model, pairs, candidates: Candidates, harmful, harmless, max_batch_rows) -> dict[str, torch.Tensor]:
    """Every scored candidate's estimated bypass and induce scores [C] (first order)."""
    units = unit_vectors(candidates.flat())
    layers = [layer for layer, _ in candidates.scored]
    norms = candidates.flat().norm(dim=-1)

    def effects(ids) -> FirstOrder:
        padded, lengths = _padded(ids)
        return first_order_effects(model, padded, _answers(pairs, len(ids)), units, layers, SCREEN_METRIC,
                                   max_batch_rows, lengths)

    on_harmful, on_harmless = effects(harmful), effects(harmless)
    return {"bypass": (on_harmful.metric + on_harmful.ablation).mean(1),
            "induce": (on_harmless.metric + norms[:, None] * on_harmless.addition).mean(1),
            "plain_harmful": on_harmful.metric, "plain_harmless": on_harmless.metric}


def _shortlist(first: dict[str, torch.Tensor], n_verified: int) -> list[int]:
    """The n_verified best candidates of each role by the first-order estimates, in index order."""
    n = min(n_verified, len(first["bypass"]))
    best_bypass = first["bypass"].argsort()[:n].tolist()
    best_induce = first["induce"].argsort(descending=True)[:n].tolist()
    return sorted(set(best_bypass) | set(best_induce))


def _exact_scores(model, pairs, candidates: Candidates, shortlist: list[int], harmful, harmless,
                  max_batch_rows) -> dict[int, Scores]:
    device = next(model.parameters()).device
    vectors = candidates.flat()[shortlist]
    layers = [candidates.scored[c][0] for c in shortlist]
    bypass, kl = _ablated(model, pairs, vectors, harmful, harmless, max_batch_rows)
    induce = _per_prompt(lambda b: add_direction_metrics(model, b.to(device), _answers(pairs, len(b)), vectors, layers,
                                                         SCREEN_METRIC, max_batch_rows), harmless)
    return {c: Scores(bypass[j], induce[j], kl[j]) for j, c in enumerate(shortlist)}


def _ablated(model, pairs, directions: torch.Tensor, harmful, harmless, max_batch_rows
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Each direction's (or subspace's) ablation: the metric of the harmful prompts [D, P] and the KL of the
    harmless ones [D, P], each kind in one batch padded on the right."""
    device = next(model.parameters()).device
    ids, lengths = _padded(harmful)
    bypass = ablate_direction_metrics(model, ids.to(device), _answers(pairs, len(ids)), directions, SCREEN_METRIC,
                                      max_batch_rows, lengths)
    ids, lengths = _padded(harmless)
    return bypass, ablate_direction_kl(model, ids.to(device), directions, max_batch_rows, lengths)


def _ablation_role(model, pairs, candidates: Candidates, exact: dict[int, Scores], harmful, harmless,
                   options: DirectionConfig) -> Ablation | None:
    """The paper's rule for one direction; a subspace of the next ones when it leaves refusal (see above)."""
    passing = sorted((c for c, s in exact.items() if float(s.kl.mean()) <= options.max_kl
                      and float(s.induce.mean()) > 0), key=lambda c: float(exact[c].bypass.mean()))
    if not passing:
        return None
    best = exact[passing[0]]
    tried = [{"k": 1, "bypass": float(best.bypass.mean()), "kl": float(best.kl.mean()),
              "refused": float((best.bypass > 0).float().mean())}]
    for k in range(2, min(options.max_subspace, len(passing)) + 1):
        if tried[-1]["refused"] <= options.ablation_target:
            break
        subspace = candidates.flat()[passing[:k]][None]  # [1, k, d]
        bypass, kl = (x[0] for x in _ablated(model, pairs, subspace, harmful, harmless, options.max_batch_rows))
        tried.append({"k": k, "bypass": float(bypass.mean()), "kl": float(kl.mean()),
                      "refused": float((bypass > 0).float().mean())})
    within = [t for t in tried if t["kl"] <= options.max_kl]
    met = [t for t in within if t["refused"] <= options.ablation_target]
    chosen = met[0] if met else min(within, key=lambda t: (t["refused"], t["k"]))
    return Ablation(passing[:chosen["k"]], chosen["bypass"], chosen["kl"], chosen["refused"], bool(met), tried)


def _addition_role(model, pairs, candidates: Candidates, exact: dict[int, Scores], harmless,
                   windows: torch.Tensor, options: DirectionConfig) -> Addition | None:
    """The strongest inducer whose scale rule succeeds (see above); else the best the rule found."""
    device = next(model.parameters()).device
    order = sorted((c for c, s in exact.items() if float(s.induce.mean()) > 0),
                   key=lambda c: -float(exact[c].induce.mean()))
    plain_ce = general_text_cross_entropy(model, windows)
    tried, found = [], []
    for c in order[:options.n_verified]:
        layer, vector = candidates.scored[c][0], candidates.flat()[c]
        norm, unit = float(vector.norm()), unit_vectors(vector)
        for multiple in SCALE_GRID:
            if multiple == 1.0:
                induced = float((exact[c].induce > 0).float().mean())
            else:
                metric = _per_prompt(lambda b: add_direction_metrics(
                    model, b.to(device), _answers(pairs, len(b)), (multiple * vector)[None], [layer], SCREEN_METRIC,
                    options.max_batch_rows), harmless)[0]
                induced = float((metric > 0).float().mean())
            if induced >= options.induce_target or multiple == SCALE_GRID[-1]:
                break
        step = {"candidate": c, "multiple": multiple, "scale": multiple * norm, "induced": induced}
        step["ce_change"] = general_text_cross_entropy(
            model, windows, Intervention("add", unit, layer, multiple * norm)) - plain_ce
        tried.append(step)
        if step["ce_change"] <= options.max_ce_change:
            found.append(step)
            if induced >= options.induce_target:
                break
    if not found:
        return None
    best = found[-1] if found[-1]["induced"] >= options.induce_target else max(found, key=lambda s: s["induced"])
    return Addition(best["candidate"], best["multiple"], best["scale"], best["induced"], best["ce_change"],
                    best["induced"] >= options.induce_target, tried)


def _selection(pairs, n_layers: int, n_post: int, split: Split, candidates: Candidates, first, exact, ablation,
               addition, options: DirectionConfig, tokens) -> DirectionSelection:
    """direction.arrow's table and summary."""
    index = {lc: c for c, lc in enumerate(candidates.scored)}
    in_ablation = {} if ablation is None else {c: rank for rank, c in enumerate(ablation.candidates)}
    rows = []
    for layer in range(n_layers):
        for i in range(n_post):
            c = index.get((layer, i))
            scores = exact.get(c)
            row = {"layer": layer, "position_from_end": i - n_post, "token": tokens[i],
                   "norm": float(candidates.vectors[layer, i].norm()),
                   "harmful_projection": float(candidates.harmful_projection[layer, i]),
                   "harmless_projection": float(candidates.harmless_projection[layer, i]),
                   "bypass_estimate": None if c is None else float(first["bypass"][c]),
                   "induce_estimate": None if c is None else float(first["induce"][c]),
                   "bypass_score": None if scores is None else float(scores.bypass.mean()),
                   "induce_score": None if scores is None else float(scores.induce.mean()),
                   "kl": None if scores is None else float(scores.kl.mean()),
                   "ablation_rank": in_ablation.get(c), "addition": addition is not None and c == addition.candidate}
            row["filtered"] = _filtered(row, c is not None, options.max_kl)
            rows.append(row)
    table = pa.table({
        **{name: pa.array([r[name] for r in rows], pa.int32()) for name in ("layer", "position_from_end",
                                                                           "ablation_rank")},
        "token": pa.array([r["token"] for r in rows], pa.string()),
        **{name: pa.array([r[name] for r in rows], pa.float64())
           for name in ("norm", "harmful_projection", "harmless_projection", "bypass_estimate", "induce_estimate",
                        "bypass_score", "induce_score", "kl")},
        "filtered": pa.array([r["filtered"] for r in rows], pa.string()),
        "chosen": pa.array([r["ablation_rank"] == 0 for r in rows], pa.bool_()),
        "addition": pa.array([r["addition"] for r in rows], pa.bool_()),
        "direction": tensor_column(candidates.vectors.reshape(n_layers * n_post, -1).numpy().astype(np.float32)),
    })

    def described(c: int) -> dict:
        layer, i = candidates.scored[c]
        row = rows[layer * n_post + i]
        return {k: row[k] for k in ("layer", "position_from_end", "token", "norm", "harmful_projection",
                                    "harmless_projection", "bypass_score", "induce_score", "kl")}

    verified_kl = [float(s.kl.mean()) for s in exact.values()]
    summary = {
        # the ablation direction, as the paper chooses it (comparisons and the screen's checks read "chosen")
        "chosen": None if ablation is None else described(ablation.candidates[0]) | {
            "scale": float(candidates.harmful_projection[candidates.scored[ablation.candidates[0]]]
                           - candidates.harmless_projection[candidates.scored[ablation.candidates[0]]])},
        "ablation": None if ablation is None else {
            "k": len(ablation.candidates), "directions": [described(c) for c in ablation.candidates],
            "bypass_score": ablation.bypass, "kl": ablation.kl, "refused": ablation.refused,
            "target": options.ablation_target, "target_met": ablation.target_met, "tried": ablation.tried},
        "addition": None if addition is None else described(addition.candidate) | {
            "scale": addition.scale, "multiple": addition.multiple, "induced": addition.induced,
            "ce_change": addition.ce_change, "target": options.induce_target, "target_met": addition.target_met,
            "tried": addition.tried},
        "n_candidates": len(rows), "n_scored": len(candidates.scored), "n_verified": len(exact),
        "n_passing": sum(1 for r in rows if not r["filtered"]),
        "paper_kl_filter": {"max_kl": PAPER_MAX_KL, "n_passing": sum(k <= PAPER_MAX_KL for k in verified_kl),
                            "n_verified": len(exact), "smallest_kl": min(verified_kl, default=None)},
        "n_layers": n_layers, "n_post_instruction": n_post, "max_kl": options.max_kl,
        "max_ce_change": options.max_ce_change, "max_layer_fraction": options.max_layer_fraction,
        "scored_layers": [candidates.scored[0][0], candidates.scored[-1][0]], "scale_grid": list(SCALE_GRID),
        "budget_tokens": options.budget_windows * WINDOW_TOKENS, "metric": SCREEN_METRIC, "seed": options.seed,
        "mean_pair_ids": [int(pairs.column("pair_id")[r].as_py()) for r in split.mean_rows],
        "score_pair_ids": [int(pairs.column("pair_id")[r].as_py()) for r in split.score_rows],
        "plain_harmful_score": float(first["plain_harmful"].mean()),
        "plain_harmless_score": float(first["plain_harmless"].mean()),
    }
    if ablation is not None and addition is not None:
        first_ablation = ablation.candidates[0]
        summary["cosine"] = float(unit_vectors(candidates.flat()[first_ablation]) @
                                  unit_vectors(candidates.flat()[addition.candidate]))
        summary["same_candidate"] = first_ablation == addition.candidate
    return DirectionSelection(table, summary)


def _filtered(row: dict, scored: bool, max_kl: float) -> str:
    """Why a candidate is out of the ablation role ("" when it passes)."""
    if not scored:
        return "in the last layers"
    if row["kl"] is None:
        return "not verified (first-order estimates outside the shortlists)"
    if row["kl"] > max_kl:
        return f"KL {row['kl']:.3g} > {max_kl}"
    if row["induce_score"] <= 0:
        return "adding it does not induce refusal"
    return ""


# ---- a run's direction, read back --------------------------------------------------------------------

def selection_summary(run_dir: str | Path) -> dict | None:
    """The summary direction.arrow carries (cheap: the file's schema only), None when the run has none."""
    path = RunFolder(run_dir).direction
    return json.loads(provenance(read_schema(path))[SUMMARY_KEY]) if path.is_file() else None


ROLES = {"ablate": "ablation", "add": "addition"}


def direction_summary(run_dir: str | Path, mode: str | None = None) -> dict:
    """The summary of a run whose selection found a direction for `mode`'s role (either role when None).
    A one-line error, before any model is loaded, when the folder has no direction or none for the role."""
    path = RunFolder(run_dir).direction
    if not Path(run_dir).is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist: set intervention.run to a sweep's run folder")
    summary = selection_summary(run_dir)
    if summary is None:
        raise ValueError(f"{run_dir} holds no {DIRECTION.name}: run its sweep with direction.enabled=true (the same "
                         "command resumes it), or set intervention.run to a folder that has one")
    if "ablation" not in summary:
        raise ValueError(f"{path} holds one direction for both roles (an older selection): re-run its sweep (the "
                         "same command) to select an ablation and an addition direction")
    roles = [ROLES[mode]] if mode in ROLES else list(ROLES.values())
    if all(summary[role] is None for role in roles):
        budget = "direction.max_kl" if roles == ["ablation"] else "direction.max_ce_change"
        raise ValueError(f"{path}: no candidate serves {' or '.join(roles)} within the run's budget (see its "
                         f"report.md): nothing to intervene with; loosen {budget} or use another run")
    return summary


def load_intervention(run_dir: str | Path, mode: str, scale: float | None = None) -> Intervention:
    """The run's direction for `mode`: ablation projects out its subspace (k directions, usually 1);
    addition adds the addition direction at its layer, at the recorded scale unless `scale` is given."""
    return intervention_of(read_table(RunFolder(run_dir).direction), direction_summary(run_dir, mode), mode, scale)


def intervention_of(table: pa.Table, summary: dict, mode: str, scale: float | None = None) -> Intervention:
    """`load_intervention` on a selection's table and summary."""
    vectors = torch.from_numpy(np.array(tensor_numpy(table.column("direction"))))
    if mode == "ablate":
        ranks = table.column("ablation_rank").to_pylist()
        rows = sorted((r for r, rank in enumerate(ranks) if rank is not None), key=lambda r: ranks[r])
        return Intervention(mode, vectors[rows], summary["ablation"]["directions"][0]["layer"], 0.0)
    row = table.column("addition").to_pylist().index(True)
    addition = summary["addition"]
    return Intervention(mode, vectors[row], addition["layer"], addition["scale"] if scale is None else float(scale))


# ---- replies under each role ------------------------------------------------------------------------

EXAMPLE_CONDITIONS = {
    "harmful, plain": ("clean", None), "harmful, ablated": ("clean", "ablate"),
    "harmless, plain": ("corrupted", None), "harmless, added": ("corrupted", "add"),
}


def example_replies(model, tokenizer, pairs: pa.Table, rows: Sequence[int], interventions: dict[str, Intervention],
                    n_examples: int = 3, max_new_tokens: int = 24) -> dict[str, list[tuple[str, str]]]:
    """(prompt, greedy reply) of up to n_examples pairs among `rows` (those of their commonest token length: one
    batch per condition) under each of EXAMPLE_CONDITIONS whose intervention is given."""
    lengths = [pairs.column("seq_len")[r].as_py() for r in rows]
    common = max(set(lengths), key=lengths.count)
    chosen = [r for r, n in zip(rows, lengths) if n == common][:n_examples]
    out = {}
    for condition, (side, mode) in EXAMPLE_CONDITIONS.items():
        if mode is not None and mode not in interventions:
            continue
        ids = [pairs.column(f"{side}_ids")[r].as_py() for r in chosen]
        with intervened(model, interventions.get(mode)):
            replies = greedy_generations(model, ids, max_new_tokens, batch_size=len(ids))
        out[condition] = [(pairs.column(side)[r].as_py(), decode(tokenizer, g.ids)) for r, g in zip(chosen, replies)]
    return out


# ---- cost on ordinary text ---------------------------------------------------------------------------

def general_sentences() -> list[str]:
    return [line.strip() for line in GENERAL_TEXT.read_text().splitlines() if line.strip()]


def general_text_windows(tokenizer, n_windows: int | None = None, sentences: Sequence[str] | None = None
                         ) -> torch.Tensor:
    """[W, T] token ids of the general text (its sentences joined by spaces) cut into windows of
    WINDOW_TOKENS (one window when the text is shorter), the first `n_windows` of them (all when None)."""
    text = " ".join(general_sentences() if sentences is None else sentences)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    width = min(WINDOW_TOKENS, len(ids))
    n = len(ids) // width if n_windows is None else min(n_windows, len(ids) // width)
    return torch.tensor(ids[:n * width]).reshape(n, width)


@torch.no_grad()
def general_text_cross_entropy(model, windows: torch.Tensor, intervention: Intervention | None = None,
                               batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (nats per token) over the windows [W, T], under `intervention`."""
    device = next(model.parameters()).device
    total = 0.0
    with intervened(model, intervention):
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            total += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                             batch[:, 1:].reshape(-1), reduction="sum"))
    return total / max(1, windows[:, 1:].numel())


@torch.no_grad()
def intervention_cost(model, tokenizer, intervention: Intervention, harmless_prompts: Sequence[str],
                      windows: torch.Tensor | None = None, batch_size: int = 64) -> dict:
    """What the intervention changes besides refusal: the mean KL(plain || intervened) of the next-token
    distribution at the final position of the harmless prompts (in the chat template), and the mean
    next-token cross-entropy on the general text (`general_text_windows`, all of it unless given) plain and
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
    windows = general_text_windows(tokenizer) if windows is None else windows
    ce_plain = general_text_cross_entropy(model, windows)
    ce_intervened = general_text_cross_entropy(model, windows, intervention)
    return {"kl_harmless": kl_total / max(1, len(prompts)), "n_harmless": len(prompts),
            "ce_plain": ce_plain, "ce_intervened": ce_intervened, "ce_change": ce_intervened - ce_plain,
            "n_windows": len(windows), "n_tokens": int(windows[:, 1:].numel())}


def format_intervention(summary: dict) -> str:
    """Two lines for a terminal: which intervention, and its cost."""
    setting, cost = summary["intervention"], summary["cost"]
    where = "every layer" if setting["mode"] == "ablate" else f"layer {setting['layer']}, scale {setting['scale']:.3g}"
    return (f"under the refusal direction of {setting['run']} ({setting['mode']}, {where}): KL on the "
            f"{cost['n_harmless']} harmless prompts {cost['kl_harmless']:.3f}; cross-entropy on the general text "
            f"{cost['ce_plain']:.3f} -> {cost['ce_intervened']:.3f} "
            f"({cost['ce_change']:+.3f}, {cost['n_tokens']} tokens)")
