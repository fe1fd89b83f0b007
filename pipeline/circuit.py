"""The circuit step: from patching effects to a minimal, faithful circuit (circuit.json).

Nodes are attention heads and MLPs at *position classes*, so that pairs of different lengths line up:
`harm` (the tokens where the harmful prompt differs from its harmless twin), `after` (the rest of the
instruction after them) and each chat-template token after the instruction, counted from the end
(`end-2`, `end-1` = the final token). Positions before the first differing token hold the same
activations in both runs, so they are no candidates (they are in every circuit and none).

A circuit is evaluated on the harmful prompt with every head and MLP outside it patched from the
harmless twin (`pipeline.engine.circuits`); its faithfulness is
f(C) = (m(C) - m(empty)) / (m(full) - m(empty)), m averaged over pairs.

`build_circuit` runs these steps on one model:
1. Attribution patching (noise direction: harmless activation into the harmful run) scores every node.
2. Exact verification: every node's single-node effect when cheap, else the attribution top-k plus a
   random sample of the rest; agreement is reported as rank correlation, top-k recall and an estimate
   (with an upper bound) of the strong nodes attribution missed.
3. Growth by verified effect: nodes in order of their verified effect (attribution for unverified
   ones) until f reaches the target; then pruning of every node whose removal keeps f at the target.
4. The faithfulness curve at MIB's circuit sizes, with its areas CPR (under f, higher is better,
   nodes ranked by signed score) and CMD (between f and 1, lower is better, ranked by |score|).
5. Random circuits of the same size as a control; a bootstrap interval for f over pairs; f per
   category; the fraction of pairs whose refusal the circuit alone keeps.
6. Edges: path patching from every circuit node to every later one and to the logits.
7. The refusal direction: mean(harmful) - mean(harmless) residual at the final position per layer,
   its ablation and addition effects, and each circuit node's projection on the best layer's direction.
"""
from __future__ import annotations

import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from pipeline.engine.adapters import UnsupportedArchitecture, get_adapter
from pipeline.engine.attribution import attribution_patching
from pipeline.engine.circuits import (EMBED, HEAD, KINDS, CircuitRunner, Nodes,
                                      ablate_direction_metrics, add_direction_metrics, check_metric,
                                      check_path_patching, faithfulness, mean_difference, node_writes, path_patch)
from pipeline.engine.metrics import Answers

CIRCUIT_DEFAULTS = {
    "target": 0.8,  # faithfulness the circuit must reach
    "max_fraction": 0.1,  # the size a circuit should stay under, as a fraction of candidate nodes (reported)
    "max_pairs": 64,  # pairs used by the circuit step (a seeded sample when there are more)
    "n_random": 32,  # random circuits of the same size (the control)
    "verify_top": 64,  # attribution's strongest nodes verified exactly ...
    "verify_random": 32,  # ... plus this many random others
    "verify_all_rows": 20000,  # verify every node when nodes x pairs is at most this
    "strong_effect": 0.05,  # a node is strong when its exact single-node effect reaches this
    "recall_k": 20,  # top-k recall of attribution uses k = min(circuit size, recall_k)
    "edge_min": 0.02,  # path effects below this are recorded but not drawn
    "edges": True,  # path patching (needs heads and MLPs that add straight into the residual stream)
    "edge_nodes": 16,  # edges are measured among the circuit's strongest nodes (in-circuit effect), at most this many
    "direction_layers": 16,  # at most this many layers' refusal directions get an addition test (3 the ablation)
    "metric": "logit_diff",
    "n_bootstrap": 1000,
    "ci": 0.95,
    "seed": 0,
    "max_batch_rows": None,
}
log = logging.getLogger(__name__)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
CLASS_TITLES = {"harm": "harmful tokens", "after": "rest of instruction"}


# ---- pairs -> position classes and equal-length groups ---------------------------------------------

def position_classes(pairs: pa.Table) -> tuple[list[str], list[str], list[list[int]]]:
    """(class names, class labels, per-pair class of every position, -1 = no class)."""
    seq_len = pairs.column("seq_len").to_pylist()
    inst_end = pairs.column("instruction_end").to_pylist()
    harmful = pairs.column("harmful_positions").to_pylist()
    tail = max([t - e for t, e in zip(seq_len, inst_end)] + [0])
    names = ["harm", "after"] + [f"end-{k}" for k in range(tail, 0, -1)]
    maps = []
    for t, end, harm in zip(seq_len, inst_end, harmful):
        first, harm = min(harm), set(harm)
        classes = []
        for p in range(t):
            if p in harm:
                classes.append(0)
            elif p < first:
                classes.append(-1)
            elif p < end:
                classes.append(1)
            else:
                classes.append(2 + tail - (t - p))
        maps.append(classes)
    used = sorted({c for m in maps for c in m if c >= 0})
    renumber = {c: i for i, c in enumerate(used)}
    maps = [[renumber.get(c, -1) for c in m] for m in maps]
    names = [names[c] for c in used]
    # Template tokens are the same in every pair: label them with the token most pairs have there.
    labels = [CLASS_TITLES.get(n, n) for n in names]
    if "clean_tokens" in pairs.column_names:
        votes: dict[int, Counter] = {}
        for tokens, classes in zip(pairs.column("clean_tokens").to_pylist(), maps):
            for token, c in zip(tokens, classes):
                if c >= 0 and names[c].startswith("end-"):
                    votes.setdefault(c, Counter())[token] += 1
        for c, counter in votes.items():
            labels[c] = counter.most_common(1)[0][0]
    return names, labels, maps


@dataclass
class PairGroup:
    rows: torch.Tensor  # indices into the circuit step's pairs
    clean: torch.Tensor  # [P, T]
    corrupted: torch.Tensor
    answers: Answers
    classes: torch.Tensor  # [P, T]


def _padded(lists: list[list[int]]) -> torch.Tensor:
    width = max(len(x) for x in lists)
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def group_pairs(pairs: pa.Table, class_maps: list[list[int]]) -> list[PairGroup]:
    """Pairs of equal token length batch together (one forward pass runs [P, T])."""
    by_length: dict[int, list[int]] = {}
    for row, t in enumerate(pairs.column("seq_len").to_pylist()):
        by_length.setdefault(t, []).append(row)
    columns = {c: pairs.column(c).to_pylist() for c in ("clean_ids", "corrupted_ids", "refusal_ids", "compliance_ids")}
    groups = []
    for t in sorted(by_length):
        rows = by_length[t]
        pick = lambda c: [columns[c][r] for r in rows]  # noqa: E731
        groups.append(PairGroup(torch.tensor(rows), torch.tensor(pick("clean_ids")), torch.tensor(pick("corrupted_ids")),
                                Answers(_padded(pick("refusal_ids")), _padded(pick("compliance_ids"))),
                                torch.tensor([class_maps[r] for r in rows])))
    return groups


def select_pairs(pairs: pa.Table, max_pairs: int, seed: int) -> tuple[pa.Table, int]:
    """The pairs the circuit step uses: equal-length pairs only (patching is position by position),
    at most max_pairs of them (a seeded sample). Returns (table, number dropped for unequal length)."""
    equal = [i for i, offset in enumerate(pairs.column("align_offset").to_pylist()) if offset == 0]
    unequal = pairs.num_rows - len(equal)
    if not equal:
        raise ValueError("every pair has unequal token counts (prompts.align=end): circuits patch position by "
                         "position; use pairs of equal length (prompts.align=none)")
    if len(equal) > max_pairs:
        equal = sorted(np.random.default_rng(seed).choice(equal, max_pairs, replace=False).tolist())
    return pairs.take(pa.array(equal, pa.int64())), unequal


# ---- evaluation over all groups ----------------------------------------------------------------------

class Evaluator:
    """Circuit metrics over every pair (all groups), in the order of the circuit step's pairs."""

    def __init__(self, model, groups: list[PairGroup], n_classes: int, metric: str, max_batch_rows=None):
        self.groups = groups
        self.runners = [CircuitRunner(model, g.clean, g.corrupted, g.answers, g.classes, n_classes, metric,
                                      max_batch_rows) for g in groups]
        self.n_pairs = sum(len(g.rows) for g in groups)
        self.metric_full = self._gather([r.metric_full[None] for r in self.runners])[0]
        self.metric_empty = self._gather([r.metric_empty[None] for r in self.runners])[0]
        self.forward_rows = 0

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(parts[0].shape[0], self.n_pairs)
        for group, part in zip(self.groups, parts):
            out[:, group.rows] = part
        return out

    def metrics(self, nodes: Nodes, masks: torch.Tensor) -> torch.Tensor:
        """masks [C, N] -> metric [C, P]."""
        self.forward_rows += masks.shape[0] * self.n_pairs
        return self._gather([runner.metrics(nodes, masks) for runner in self.runners])

    def faithfulness(self, nodes: Nodes, masks: torch.Tensor) -> torch.Tensor:
        return faithfulness(self.metrics(nodes, masks), self.metric_full, self.metric_empty)

    def effects(self, metric: torch.Tensor) -> torch.Tensor:
        """Per-pair normalised noise effects [C, P] of metrics [C, P]: 1 = the refusal gap is gone."""
        return (metric - self.metric_full) / (self.metric_empty - self.metric_full)


def _subset_masks(n_nodes: int, subsets: list) -> torch.Tensor:
    masks = torch.zeros(len(subsets), n_nodes, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = True
    return masks


# ---- scores: attribution and exact single-node effects -------------------------------------------

def attribution_scores(model, groups: list[PairGroup], nodes: Nodes, n_classes: int, metric: str,
                       n_pairs: int) -> torch.Tensor:
    """Attribution patching's estimate of each node's noise effect, per pair: [N, P] normalised."""
    out = torch.empty(len(nodes), n_pairs)
    for group in groups:
        result = attribution_patching(model, group.clean, group.corrupted, group.answers, direction="noise",
                                      metric=metric, components=("head", "mlp_out"))
        onehot = torch.nn.functional.one_hot(group.classes.clamp(min=0), n_classes).float()
        onehot[group.classes < 0] = 0  # [P, T, K]
        heads = torch.einsum("pltk,ptc->plck", result.scores["head"], onehot)  # [P, L, K, H]
        mlps = torch.einsum("plt,ptc->plc", result.scores["mlp_out"], onehot)  # [P, L, K]
        is_head = nodes.kind == HEAD
        score = torch.empty(len(group.rows), len(nodes))
        score[:, is_head] = heads[:, nodes.layer[is_head], nodes.cls[is_head], nodes.head[is_head]]
        score[:, ~is_head] = mlps[:, nodes.layer[~is_head], nodes.cls[~is_head]]
        gap = (result.metric_corrupted - result.metric_clean)[:, None]
        out[:, group.rows] = (score / gap).T
    return out


def single_node_effects(evaluator: Evaluator, nodes: Nodes, which: list[int]) -> torch.Tensor:
    """Exact noise effect [len(which), P] of patching each node alone (the rest of the model kept)."""
    masks = torch.ones(len(which), len(nodes), dtype=torch.bool)
    masks[torch.arange(len(which)), torch.tensor(which, dtype=torch.long)] = False
    return evaluator.effects(evaluator.metrics(nodes, masks))


def choose_verified(attribution: np.ndarray, n_pairs: int, cfg: dict, rng: np.random.Generator):
    """(nodes to verify, attribution's top set, the random sample of the rest)."""
    n = len(attribution)
    order = np.argsort(-attribution, kind="stable")
    if n * n_pairs <= cfg["verify_all_rows"]:
        top = order[:min(cfg["verify_top"], n)]
        return np.arange(n), top, np.setdiff1d(np.arange(n), top)
    top = order[:min(cfg["verify_top"], n)]
    rest = np.setdiff1d(np.arange(n), top)
    sample = np.sort(rng.choice(rest, min(cfg["verify_random"], len(rest)), replace=False))
    return np.union1d(top, sample), top, sample


def agreement(attribution: np.ndarray, exact: np.ndarray, top: np.ndarray, sample: np.ndarray, n_nodes: int,
              k: int, strong: float) -> dict:
    """How well attribution agrees with exact patching on the verified nodes."""
    from scipy import stats

    verified = ~np.isnan(exact)
    rho = stats.spearmanr(attribution[verified], exact[verified]).statistic if verified.sum() > 2 else float("nan")
    r = stats.pearsonr(attribution[verified], exact[verified]).statistic if verified.sum() > 2 else float("nan")
    k = max(1, min(k, int(verified.sum())))
    exact_top = set(np.flatnonzero(verified)[np.argsort(-exact[verified], kind="stable")[:k]].tolist())
    attr_top = set(np.argsort(-attribution, kind="stable")[:k].tolist())
    # Strong nodes outside attribution's top set, estimated from the random sample of the rest.
    n_rest = n_nodes - len(top)
    hits = int((np.abs(exact[sample]) >= strong).sum()) if len(sample) else 0
    m = len(sample)
    estimate = hits / m * n_rest if m else float("nan")
    upper = stats.beta.ppf(0.95, hits + 1, m - hits) * n_rest if m and hits < m else float(n_rest)
    return {
        "spearman": float(rho), "pearson": float(r), "k": k, "top_k_recall": len(exact_top & attr_top) / k,
        "n_verified": int(verified.sum()), "n_top": len(top), "n_sampled_rest": m,
        "strong_effect": strong, "strong_in_sample": hits,
        "missed_strong_estimate": float(estimate), "missed_strong_upper95": float(upper),
        "exhaustive": bool(m == n_rest),
    }


# ---- growth, pruning, curves ------------------------------------------------------------------------

def _geometric_sizes(n: int) -> list[int]:
    sizes, k = {0, n}, 1
    while k < n:
        sizes.add(k)
        k = max(k + 1, int(math.ceil(k * 1.4)))
    return sorted(sizes)


def grow(evaluator: Evaluator, nodes: Nodes, order: np.ndarray, target: float, chunk: int = 4) -> tuple[int, dict[int, float]]:
    """Smallest prefix of `order` whose faithfulness reaches target: sizes on a geometric grid, `chunk`
    at a time, until one reaches it; then the bracket below it is narrowed, `chunk` sizes per pass.
    Returns (size, {size: f} for every size measured)."""
    n = len(order)
    prefix = lambda sizes: _subset_masks(n, [order[:k] for k in sizes])  # noqa: E731
    grid, curve = _geometric_sizes(n), {}
    for begin in range(0, len(grid), chunk):
        sizes = grid[begin:begin + chunk]
        curve.update(zip(sizes, evaluator.faithfulness(nodes, prefix(sizes)).tolist()))
        if any(curve[k] >= target for k in sizes):
            break
    reached = [k for k in sorted(curve) if curve[k] >= target]
    if not reached:
        return n, curve
    hi = reached[0]
    lo = max([k for k in curve if k < hi] + [0])
    while hi - lo > 1:  # below lo nothing reached the target; hi reaches it
        inside = sorted({int(x) for x in np.linspace(lo, hi, chunk + 2)[1:-1]} - {lo, hi})
        curve.update(zip(inside, evaluator.faithfulness(nodes, prefix(inside)).tolist()))
        hi = min([k for k in inside if curve[k] >= target] + [hi])
        lo = max(k for k in [lo] + inside if k < hi)
    return hi, curve


def prune(evaluator: Evaluator, nodes: Nodes, circuit: list[int], target: float,
          max_rounds: int = 4, chunk: int = 4) -> tuple[list[int], list[int], np.ndarray]:
    """Drop nodes whose removal keeps f >= target. Each round measures f without each node, then finds
    the largest k such that removing the k least harmful nodes together keeps f at the target (k on a
    geometric grid, then narrowed, `chunk` circuits per pass). Returns (kept, removed, f of the kept
    circuit without each of its nodes)."""
    def without_each(members: list[int]) -> np.ndarray:
        return evaluator.faithfulness(
            nodes, _subset_masks(len(nodes), [[c for c in members if c != drop] for drop in members])).numpy()

    kept, removed = list(circuit), []
    f_without = without_each(kept)
    for _ in range(max_rounds):
        order = np.argsort(-f_without, kind="stable")
        most = min(int((f_without >= target).sum()), len(kept) - 1)
        if most == 0:
            break
        trial = lambda k: [kept[i] for i in sorted(order[k:])]  # noqa: E731
        f_trial = {}

        def measure_trials(ks):
            ks = [k for k in ks if k not in f_trial]
            if ks:
                f_trial.update(zip(ks, evaluator.faithfulness(nodes, _subset_masks(len(nodes),
                                                                                     [trial(k) for k in ks])).tolist()))

        grid = [k for k in _geometric_sizes(most) if k > 0]
        for begin in range(0, len(grid), chunk):
            measure_trials(grid[begin:begin + chunk])
            if any(f_trial[k] < target for k in grid[begin:begin + chunk]):
                break
        passing = [k for k in f_trial if f_trial[k] >= target]
        if not passing:
            break
        lo = max(passing)
        hi = min([k for k in f_trial if k > lo and f_trial[k] < target] + [most + 1])
        while hi - lo > 1:  # lo keeps the target; hi (or beyond `most`) does not
            measure_trials(sorted({int(x) for x in np.linspace(lo, hi, chunk + 2)[1:-1]} - {lo, hi}))
            lo = max(k for k in f_trial if f_trial[k] >= target and k < hi)
            hi = min([k for k in f_trial if k > lo and f_trial[k] < target] + [hi])
        removed += [c for c in kept if c not in trial(lo)]
        kept = trial(lo)
        f_without = without_each(kept)
    return kept, removed, f_without


def mib_curve(evaluator: Evaluator, nodes: Nodes, scores: np.ndarray) -> dict:
    """Faithfulness at MIB's circuit sizes (fractions of the candidate nodes); CPR = area under f with
    nodes ranked by signed score, CMD = area between f and 1 with nodes ranked by |score| (trapezoids
    over the fraction, as the MIB circuit track computes them)."""
    n = len(scores)
    sizes = [int(f * n) for f in MIB_FRACTIONS]
    signed, absolute = np.argsort(-scores, kind="stable"), np.argsort(-np.abs(scores), kind="stable")
    masks = _subset_masks(n, [signed[:k] for k in sizes] + [absolute[:k] for k in sizes])
    f = evaluator.faithfulness(nodes, masks).tolist()
    f_signed, f_abs = f[:len(sizes)], f[len(sizes):]
    x = np.array(MIB_FRACTIONS)
    cpr = float(np.trapezoid(f_signed, x))
    cmd = float(np.trapezoid(np.abs(1 - np.array(f_abs)), x))
    return {"fraction": list(MIB_FRACTIONS), "size": sizes, "faithfulness_signed": f_signed,
            "faithfulness_absolute": f_abs, "cpr": cpr, "cmd": cmd}


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, n_bootstrap: int, ci: float,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval over pairs of mean(numerator) / mean(denominator)."""
    from pipeline.stages.aggregate import bootstrap_means

    means = bootstrap_means(np.stack([numerator, denominator]).astype(np.float64), n_bootstrap, rng)
    ratio = means[0] / means[1]
    low, high = np.quantile(ratio, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(low), float(high)


def bootstrap_mean_ci(values: np.ndarray, n_bootstrap: int, ci: float, rng: np.random.Generator) -> np.ndarray:
    """values [G, P] -> [G, 2] percentile bootstrap intervals of the mean over pairs."""
    from pipeline.stages.aggregate import bootstrap_means

    means = bootstrap_means(values.astype(np.float64), n_bootstrap, rng)
    return np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=1).T


# ---- the refusal direction -----------------------------------------------------------------------

def refusal_direction(model, evaluator: Evaluator, metric: str, max_layers: int, n_ablations: int = 3,
                      max_batch_rows=None) -> dict:
    """Difference-of-means direction per layer at the final position. Its addition effect (added to the
    harmless run's residual entering the layer: does it cause refusal?) is measured at up to
    `max_layers` layers (cheap: each run starts at its layer), its ablation effect (projected out of the
    harmful run everywhere: does refusal stop?) at the `n_ablations` layers where addition works best;
    the best layer has the largest mean of the two."""
    adapter = get_adapter(model)
    n_layers = adapter.n_layers

    def final_residuals(cache):  # [P, L + 1, d]: entering each layer, then after the last
        return torch.cat([cache.acts["resid_pre"][:, :, -1], cache.final_resid[:, None]], dim=1).float().cpu()

    harmful = torch.cat([final_residuals(r.base) for r in evaluator.runners])
    harmless = torch.cat([final_residuals(r.source) for r in evaluator.runners])
    directions = mean_difference(harmful, harmless)  # [L + 1, d]
    norms = directions.norm(dim=-1)
    live = [layer for layer in range(n_layers) if norms[layer] > 1e-6 * float(norms.max())]
    tested = live[::max(1, math.ceil(len(live) / max_layers))]
    addition = torch.empty(len(tested), evaluator.n_pairs)
    for group, runner in zip(evaluator.groups, evaluator.runners):
        added = add_direction_metrics(model, group.corrupted, group.answers, directions[tested], tested, metric,
                                      max_batch_rows)
        addition[:, group.rows] = (added - runner.metric_empty) / (runner.metric_full - runner.metric_empty)
    ablated_layers = [tested[i] for i in addition.mean(1).argsort(descending=True)[:n_ablations].tolist()]
    ablation = torch.empty(len(ablated_layers), evaluator.n_pairs)
    for group, runner in zip(evaluator.groups, evaluator.runners):
        ablated = ablate_direction_metrics(model, group.clean, group.answers, directions[ablated_layers], metric,
                                           max_batch_rows)
        ablation[:, group.rows] = (ablated - runner.metric_full) / (runner.metric_empty - runner.metric_full)
    score = ablation.mean(1) + addition[[tested.index(layer) for layer in ablated_layers]].mean(1)
    best = ablated_layers[int(score.argmax())]
    per_layer = []
    for layer in range(n_layers + 1):
        row = {"layer": layer, "norm": float(norms[layer]), "addition_effect": None, "ablation_effect": None}
        if layer in tested:
            row["addition_effect"] = float(addition[tested.index(layer)].mean())
        if layer in ablated_layers:
            row["ablation_effect"] = float(ablation[ablated_layers.index(layer)].mean())
        per_layer.append(row)
    return {"position": "final token", "best_layer": best, "vector": directions[best], "per_layer": per_layer}


def node_projections(model, evaluator: Evaluator, nodes: Nodes, direction: torch.Tensor) -> np.ndarray:
    """Each node's mean write difference (harmful - harmless run) per position of its class, projected
    on the unit refusal direction and as a cosine: [N, 2]."""
    adapter = get_adapter(model)
    unit = direction / direction.norm()
    total = torch.zeros(len(nodes), adapter.d_model)
    for group, runner in zip(evaluator.groups, evaluator.runners):
        classes = group.classes.to(runner.base.final_resid.device)
        with torch.no_grad():
            diff = node_writes(adapter, runner.base, nodes, classes) - node_writes(adapter, runner.source, nodes, classes)
        counts = torch.stack([(group.classes == int(c)).sum(-1) for c in nodes.cls]).clamp(min=1)  # [N, P]
        total += (diff.float().cpu().sum(2) / counts[..., None]).sum(1)
    mean = total / evaluator.n_pairs
    projection = mean @ unit
    cosine = projection / mean.norm(dim=-1).clamp(min=1e-12)
    return torch.stack([projection, cosine], dim=1).numpy()


# ---- the whole step --------------------------------------------------------------------------------

def node_id(nodes: Nodes, i: int, names: list[str]) -> str:
    kind, layer, head, cls = nodes.key(i)
    if kind == EMBED:
        return f"EMB@{names[cls]}"
    return f"L{layer}.{'H' + str(head) if kind == HEAD else 'MLP'}@{names[cls]}"


def build_circuit(model, pairs: pa.Table, cfg: dict | None = None) -> dict:
    """pairs.arrow (screened pairs) -> the content of circuit.json. `cfg` overrides CIRCUIT_DEFAULTS."""
    cfg = {**CIRCUIT_DEFAULTS, **(cfg or {})}
    unknown = set(cfg) - set(CIRCUIT_DEFAULTS) - {"model", "top_k"}
    if unknown:
        raise ValueError(f"unknown circuit options {sorted(unknown)}; known: {sorted(CIRCUIT_DEFAULTS)}")
    check_metric(cfg["metric"])
    if not 0 < cfg["target"] <= 1:
        raise ValueError(f"circuit.target={cfg['target']} must be in (0, 1]")
    seconds, clock = {}, [time.perf_counter()]

    def lap(phase: str) -> None:
        now = time.perf_counter()
        seconds[phase] = round(now - clock[0], 2)
        clock[0] = now
        log.info("circuit step: %s took %.1fs", phase, seconds[phase])

    rng = np.random.default_rng(cfg["seed"])
    pairs, n_unequal = select_pairs(pairs, cfg["max_pairs"], cfg["seed"])
    names, labels, class_maps = position_classes(pairs)
    groups = group_pairs(pairs, class_maps)
    adapter = get_adapter(model)
    nodes = Nodes.grid(adapter, list(range(len(names))))
    n_nodes = len(nodes)
    evaluator = Evaluator(model, groups, len(names), cfg["metric"], cfg["max_batch_rows"])
    n_pairs = evaluator.n_pairs
    lap("caches")

    # 1-2. Scores: attribution for every node, exact single-node effects for the verified ones.
    attr_pairs = attribution_scores(model, groups, nodes, len(names), cfg["metric"], n_pairs)
    attribution = attr_pairs.mean(1).numpy()
    verified, top, sample = choose_verified(attribution, n_pairs, cfg, rng)
    exact_pairs = single_node_effects(evaluator, nodes, verified.tolist())
    exact = np.full(n_nodes, np.nan)
    exact[verified] = exact_pairs.mean(1).numpy()
    exact_ci = np.full((n_nodes, 2), np.nan)
    exact_ci[verified] = bootstrap_mean_ci(exact_pairs.numpy(), cfg["n_bootstrap"], cfg["ci"], rng)
    score = np.where(np.isnan(exact), attribution, exact)

    lap("scores")

    # 3. Growth by verified effect, then pruning.
    order = np.lexsort((-attribution, -np.nan_to_num(exact, nan=-np.inf), np.isnan(exact)))
    size, curve = grow(evaluator, nodes, order, cfg["target"])
    circuit, pruned, f_without = prune(evaluator, nodes, order[:size].tolist(), cfg["target"])
    by_place = sorted(range(len(circuit)), key=lambda j: (int(nodes.layer[circuit[j]]), int(nodes.kind[circuit[j]]),
                                                          int(nodes.cls[circuit[j]]), int(nodes.head[circuit[j]])))
    circuit, f_without = [circuit[j] for j in by_place], f_without[by_place]

    lap("growth and pruning")

    # 4-5. The circuit's faithfulness with its interval, per category; curves; random control.
    masks = _subset_masks(n_nodes, [circuit, []])
    metric_circuit, metric_none = evaluator.metrics(nodes, masks)
    full, empty = evaluator.metric_full.numpy(), evaluator.metric_empty.numpy()
    f = float(faithfulness(metric_circuit[None], evaluator.metric_full, evaluator.metric_empty)[0])
    f_ci = bootstrap_ratio_ci(metric_circuit.numpy() - empty, full - empty, cfg["n_bootstrap"], cfg["ci"], rng)
    categories = pairs.column("category").to_pylist()
    per_category = {}
    for category in sorted(set(categories)):
        rows = torch.tensor([i for i, c in enumerate(categories) if c == category])
        per_category[category] = {
            "n": len(rows),
            "faithfulness": float(faithfulness(metric_circuit[rows][None], evaluator.metric_full[rows],
                                               evaluator.metric_empty[rows])[0]),
            "refusal_kept": float((metric_circuit[rows] > 0).float().mean()),
        }
    mib = mib_curve(evaluator, nodes, score)
    random_sets = [rng.choice(n_nodes, len(circuit), replace=False) for _ in range(cfg["n_random"])]
    f_random = evaluator.faithfulness(nodes, _subset_masks(n_nodes, random_sets)).numpy()
    in_circuit = f - f_without  # each node's share inside the circuit

    lap("faithfulness, curves, controls")

    # 6. Edges by path patching.
    edges, edge_note = [], None
    if cfg["edges"] and circuit:
        strongest = sorted(np.argsort(-in_circuit, kind="stable")[:cfg["edge_nodes"]].tolist())
        try:
            check_path_patching(model, adapter)
            edges = circuit_edges(model, groups, nodes, [circuit[j] for j in strongest], names, cfg, n_pairs)
            if len(strongest) < len(circuit):
                edge_note = f"edges measured among the {len(strongest)} nodes with the largest in-circuit effect"
        except UnsupportedArchitecture as err:
            edge_note = str(err)

    lap("edges")

    # 7. The refusal direction and each circuit node's projection on it.
    direction = refusal_direction(model, evaluator, cfg["metric"], cfg["direction_layers"],
                                  max_batch_rows=cfg["max_batch_rows"])
    projections = node_projections(model, evaluator, nodes.select(circuit), direction.pop("vector")) if circuit else []

    lap("refusal direction")
    agree = agreement(attribution, exact, top, sample, n_nodes, min(max(len(circuit), 1), cfg["recall_k"]),
                      cfg["strong_effect"])
    node_rows = []
    for j, i in enumerate(circuit):
        kind, layer, head, cls = nodes.key(i)
        node_rows.append({
            "id": node_id(nodes, i, names), "component": KINDS[kind], "layer": layer,
            "head": head if kind == HEAD else None, "position": names[cls], "token": labels[cls],
            "effect": _num(exact[i]), "effect_ci": [_num(x) for x in exact_ci[i]],
            "attribution": _num(attribution[i]), "in_circuit_effect": _num(in_circuit[j]),
            "refusal_projection": _num(projections[j][0]), "refusal_cosine": _num(projections[j][1]),
        })
    return {
        "model": cfg.get("model"),
        "method": {
            "nodes": "attention heads and MLPs at position classes",
            "intervention": "every node outside the circuit takes its activation from the harmless twin",
            "growth": "verified single-node effect order, smallest prefix reaching the target, then pruning",
            "metric": cfg["metric"], "target": cfg["target"], "seed": cfg["seed"],
            "n_bootstrap": cfg["n_bootstrap"], "ci": cfg["ci"],
        },
        "n_pairs": n_pairs, "n_pairs_dropped_unequal_length": n_unequal,
        "positions": [{"name": n, "label": lab} for n, lab in zip(names, labels)],
        "n_layers": adapter.n_layers, "n_heads": adapter.n_heads,
        "candidates": n_nodes, "size": len(circuit), "fraction": len(circuit) / n_nodes,
        "max_fraction": cfg["max_fraction"], "within_max_fraction": len(circuit) <= cfg["max_fraction"] * n_nodes,
        "faithfulness": f, "faithfulness_ci": list(f_ci), "target_reached": f >= cfg["target"],
        "refusal_kept": float((metric_circuit > 0).float().mean()),
        "baselines": {"metric_full": float(full.mean()), "metric_empty": float(empty.mean()),
                      "metric_empty_measured": float(metric_none.mean()), "metric_circuit": float(metric_circuit.mean())},
        "random_control": {"n": len(f_random), "size": len(circuit), "mean": float(f_random.mean()),
                           "std": float(f_random.std()), "max": float(f_random.max()) if len(f_random) else None},
        "per_category": per_category,
        "nodes": node_rows,
        "pruned": [node_id(nodes, i, names) for i in pruned],
        "edges": edges, "edges_note": edge_note,
        "growth_curve": {"size": sorted(curve), "faithfulness": [curve[k] for k in sorted(curve)]},
        "mib": mib,
        "attribution": agree,
        "scores": {"id": [node_id(nodes, i, names) for i in range(n_nodes)],
                   "attribution": [_num(x) for x in attribution], "exact": [_num(x) for x in exact]},
        "refusal_direction": direction,
        "forward_rows": evaluator.forward_rows,
        "seconds": seconds,
    }


def circuit_edges(model, groups: list[PairGroup], nodes: Nodes, circuit: list[int], names: list[str], cfg: dict,
                  n_pairs: int) -> list[dict]:
    """Path effects from the harmful tokens' embeddings and every circuit node to every later node and
    to the logits (receiver "logits")."""
    members = nodes.select(circuit)
    senders = Nodes.concat([Nodes.embeddings([names.index("harm")]), members])
    effects = torch.full((len(senders), len(circuit) + 1, n_pairs), float("nan"))
    for group in groups:
        result = path_patch(model, group.clean, group.corrupted, group.answers, group.classes, senders, members,
                            cfg["metric"], cfg["max_batch_rows"])
        effects[:, :, group.rows] = result.effects()
    mean = effects.nanmean(-1)
    edges = []
    for s in range(len(senders)):
        for r in range(len(circuit) + 1):
            if torch.isnan(effects[s, r]).all():
                continue
            value = float(mean[s, r])
            edges.append({"from": node_id(senders, s, names),
                          "to": "logits" if r == len(circuit) else node_id(nodes, circuit[r], names),
                          "effect": value, "drawn": abs(value) >= cfg["edge_min"]})
    return edges


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# ---- aggregation extras: behaviour flips and categories ---------------------------------------------

SITE = ["model", "direction", "component", "layer", "head", "position"]


def flip_fractions(effects) -> "pd.DataFrame":
    """Per site (SITE columns), the fraction of pairs whose behaviour the patch flips: the patched
    metric's sign differs from the base run's (denoise: the harmless run now refuses; noise: the
    harmful run now complies)."""
    base = np.where(effects["direction"] == "denoise", effects["metric_corrupted"], effects["metric_clean"])
    flipped = (effects["metric_patched"].to_numpy() > 0) != (base > 0)
    frame = effects[SITE].copy()
    frame["flipped"] = flipped
    return frame.groupby(SITE, dropna=False, sort=True)["flipped"].mean().rename("flip_fraction").reset_index()


def category_means(effects, pairs: pa.Table) -> "pd.DataFrame":
    """Per site and prompt category: mean normalised effect and n."""
    category = dict(zip(pairs.column("pair_id").to_pylist(), pairs.column("category").to_pylist()))
    frame = effects[SITE + ["effect"]].copy()
    frame["category"] = effects["pair_id"].map(category)
    grouped = frame.groupby(SITE + ["category"], dropna=False, sort=True)["effect"]
    return grouped.agg(mean="mean", n="count").reset_index()


# ---- the pipeline's entry point (a work item on a model actor) ---------------------------------------

def run_item(model, tokenizer, item: dict) -> dict:
    """`item`: run_dir, cfg (circuit options), model (name), provenance. Reads pairs.arrow (and
    effects.arrow for the breakdown), writes circuit.json, circuit.svg, circuit.png, circuit.dot."""
    from pipeline.diagram import render_circuit
    from pipeline.store import publish_json, read_table, sha256_file

    run_dir = Path(item["run_dir"])
    circuit = build_circuit(model, read_table(run_dir / "pairs.arrow"), {**item["cfg"], "model": item["model"]})
    circuit["provenance"] = item.get("provenance", {})
    if (run_dir / "effects.arrow").is_file():
        circuit["breakdown"] = site_breakdown(run_dir, item["cfg"].get("top_k", 5))
    publish_json(run_dir / "circuit.json", circuit)
    render_circuit(circuit, run_dir)
    return {"path": str(run_dir / "circuit.json"), "sha256": sha256_file(run_dir / "circuit.json"),
            "rows": len(circuit["nodes"])}


def site_breakdown(run_dir: Path, top_k: int) -> list[dict]:
    """The strongest sites per direction with their flip fraction and per-category mean effects."""
    from pipeline.stages.aggregate import read_effects
    from pipeline.store import read_table

    effects = read_effects(run_dir / "effects.arrow")
    pairs = read_table(run_dir / "pairs.arrow")
    means = effects.groupby(SITE, dropna=False, sort=True)["effect"].mean().rename("mean").reset_index()
    flips = flip_fractions(effects)
    cats = category_means(effects, pairs)
    table = means.merge(flips, on=SITE)
    out = []
    for direction, rows in table.groupby("direction"):
        for r in rows.sort_values("mean", ascending=False).head(top_k).itertuples():
            key = {c: getattr(r, c) for c in SITE}
            match = cats
            for c in SITE:
                match = match[match[c].isna()] if _isna(key[c]) else match[match[c] == key[c]]
            out.append({**{c: (None if _isna(v) else (v if isinstance(v, str) else int(v))) for c, v in key.items()},
                        "mean": float(r.mean), "flip_fraction": float(r.flip_fraction),
                        "per_category": {m.category: {"mean": float(m.mean), "n": int(m.n)} for m in match.itertuples()}})
    return out


def _isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))
