"""The circuit search: from a model and its screened pairs to a minimal, faithful circuit (circuit.json).

Nodes are attention heads and MLPs at position classes (pipeline.analysis.positions), so that pairs of
different lengths line up. A circuit is evaluated on the harmful prompt with every head and MLP outside
it patched from the harmless twin (`pipeline.engine.circuits`); its faithfulness is
f(C) = (m(C) - m(empty)) / (m(full) - m(empty)), m averaged over pairs.

`find_circuit` reads like the method, a phase per step, each returning a small typed result:
1. `score_nodes`: attribution patching (noise direction) scores every node; exact single-node effects
   verify every node when cheap, else attribution's top-k plus a random sample of the rest.
2. `search_circuit`: pruning from every node, in rounds, each ordering the nodes by the faithfulness
   without each (first from the scores, then measured on the circuit) and removing the most of the least
   harmful together that keeps f at the target (optionally on a sample of the pairs: `search_pairs`).
3. `measure_faithfulness`: f with a bootstrap interval over pairs (all, and those the search did not
   see), per category, and the fraction of pairs whose refusal the circuit alone keeps.
4. `controls`: the faithfulness curve at MIB's circuit sizes (CPR: area under f, nodes ranked by signed
   score; CMD: area between f and 1, ranked by |score|) and random circuits of the same size.
5. `stability`: the search re-run on bootstrap resamples of the pairs -> each node's inclusion frequency.
6. `supernodes` and `edges`: the circuit grouped (one kind at one position over nearby layers); path
   patching between the groups and among the strongest nodes, from the harmful tokens' embeddings and to
   the logits.
7. `refusal_direction`: mean(harmful) - mean(harmless) residual at the final position per layer, its
   ablation and addition effects, and each circuit node's projection on the best layer's direction.
Agreement between attribution and exact patching (rank correlation, top-k recall, an estimate with an
upper bound of the strong nodes attribution missed) comes with the scores.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from pipeline.analysis.positions import PairGroup, group_pairs, position_classes, select_pairs
from pipeline.analysis.statistics import bootstrap_mean_ci, bootstrap_ratio_ci
from pipeline.schema import CircuitConfig, SummaryConfig
from pipeline.engine.adapters import UnsupportedArchitecture, get_adapter
from pipeline.engine.attribution import attribution_patching
from pipeline.engine.circuits import (EMBED, HEAD, KINDS, CircuitRunner, Nodes, check_path_patching, faithfulness,
                                      group_path_patch, node_writes)
from pipeline.engine.directions import ablate_direction_metrics, add_direction_metrics, mean_difference
from pipeline.engine.metrics import check_metric

log = logging.getLogger(__name__)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


# ---- the method ------------------------------------------------------------------------------------

def find_circuit(model, pairs: pa.Table, options: CircuitConfig, summary: SummaryConfig, metric: str,
                 model_name: str | None = None, progress: Progress | None = None) -> CircuitResult:
    """pairs.parquet (screened pairs) -> the minimal circuit and the evidence for it."""
    check_metric(metric)
    if not 0 < options.target <= 1:
        raise ValueError(f"circuit.target={options.target} must be in (0, 1]")
    progress, rng = progress or Progress(), np.random.default_rng(options.seed)
    progress.start("caches")
    setup = prepare(model, pairs, options, metric, progress)
    progress.end()
    progress.start("scores")
    scores = score_nodes(model, setup, options, summary, metric, rng, progress)
    progress.end()
    progress.start("pruning")
    search = search_circuit(setup.search, setup.nodes, scores.without_estimate(), options.target,
                            rounds=options.prune_rounds)
    progress.end()
    progress.start("faithfulness, curves, controls")
    faith = measure_faithfulness(setup, search.circuit, summary, rng)
    checks = controls(setup, scores, len(search.circuit), options.n_random, rng)
    progress.end()
    progress.start("stability", options.n_resamples, "resamples")
    resamples = stability(setup, scores, search, options, progress)
    progress.end()
    progress.start("supernodes and edges")
    groups = supernodes(setup, search, options.group_gap)
    links = edges(model, setup, search, groups, options, metric)
    progress.end()
    progress.start("refusal direction")
    direction = refusal_direction(model, setup, search.circuit, options, metric)
    progress.end()
    forward_rows = setup.evaluator.forward_rows + (setup.search.forward_rows if setup.search is not setup.evaluator else 0)
    return CircuitResult(model_name, options, summary, metric, setup, scores, search, faith, checks, resamples,
                         groups, links, direction, forward_rows, progress.seconds)


# ---- the phases' results -----------------------------------------------------------------------------

@dataclass
class Setup:
    """What every phase reads: the circuit step's pairs, their position classes, the candidate nodes."""
    pairs: pa.Table
    n_unequal: int  # pairs left out for unequal token length
    names: list[str]  # position class names
    labels: list[str]  # their readable labels
    groups: list[PairGroup]
    nodes: Nodes  # every candidate: each head and MLP at each layer and class
    evaluator: Evaluator  # every pair: faithfulness, controls, supernodes, edges, direction
    n_layers: int
    n_heads: int
    search: Evaluator  # the search's pairs (the evaluator itself unless options.search_pairs leaves some out)
    searched: np.ndarray  # their rows in `pairs`


@dataclass
class NodeScores:
    attribution: np.ndarray  # [N] attribution's estimate of each node's noise effect (mean over pairs)
    exact: np.ndarray  # [N] exact single-node effect; nan where not verified
    exact_ci: np.ndarray  # [N, 2] its bootstrap interval
    top: np.ndarray  # attribution's top set (verified)
    sample: np.ndarray  # the random sample of the rest (verified)
    attribution_pairs: np.ndarray  # [N, P] per pair
    exact_pairs: np.ndarray  # [N, P] per pair; nan rows where not verified

    @property
    def best(self) -> np.ndarray:
        """[N] the exact effect where verified, else attribution's estimate."""
        return np.where(np.isnan(self.exact), self.attribution, self.exact)

    def without_estimate(self, weights: np.ndarray | None = None) -> dict[int, float]:
        """{node: f of the model without it}, estimated as 1 - |its effect| (exact where verified, else
        attribution's), with every pair counted `weights` [P] times when given (a bootstrap resample). The
        magnitude: a node that works against refusal on its own is not for that reason free to remove."""
        if weights is None:
            best = self.best
        else:
            mean = lambda x: (x * weights).sum(1) / weights.sum()  # noqa: E731
            exact = mean(self.exact_pairs)
            best = np.where(np.isnan(exact), mean(self.attribution_pairs), exact)
        return dict(enumerate((1 - np.abs(best)).tolist()))


@dataclass
class Search:
    circuit: list[int]  # node indices, ordered by layer, kind, class, head
    pruned: list[int]
    f_without: np.ndarray  # [len(circuit)] faithfulness of the circuit without each node (empty: not measured)
    curve: dict[int, float]  # faithfulness of every circuit size pruning measured
    rankings: list[dict[int, float]]  # the rounds' f without each node, measured on the circuit of that round
    f: float  # the circuit's faithfulness on the search's pairs (f_without's reference)


@dataclass
class Faithfulness:
    value: float
    ci: tuple[float, float]
    metric_circuit: torch.Tensor  # [P]
    metric_none: torch.Tensor  # [P] every node patched, measured
    per_category: dict[str, dict]
    refusal_kept: float  # fraction of pairs whose refusal the circuit alone keeps
    held_out: dict | None  # on the pairs the search did not see: n, faithfulness, ci


@dataclass
class Controls:
    mib: dict  # faithfulness at MIB's circuit sizes, CPR and CMD
    random: np.ndarray  # [n_random] faithfulness of random circuits of the circuit's size


@dataclass
class Stability:
    """The search re-run on bootstrap resamples of the pairs."""
    frequency: np.ndarray  # [N] share of the resamples whose circuit holds each node
    sizes: np.ndarray  # [B] each resample's circuit size
    faithfulness: np.ndarray  # [B] each resample's circuit, on its own resample
    threshold: float  # core nodes are found in at least this share of the resamples


@dataclass
class Supernodes:
    """The circuit's nodes grouped: one kind at one position class over nearby layers."""
    members: list[list[int]]  # per group, indices into the circuit
    names: list[str]
    f_without: np.ndarray  # [G] faithfulness of the circuit without each group


@dataclass
class Edges:
    edges: list[dict] = field(default_factory=list)  # between nodes
    groups: list[dict] = field(default_factory=list)  # between supernodes
    note: str | None = None


@dataclass
class Direction:
    per_layer: dict  # position, best_layer, per_layer rows (norm, addition and ablation effects)
    projections: np.ndarray  # [len(circuit), 2] each circuit node's projection and cosine


@dataclass
class CircuitResult:
    model: str | None
    options: CircuitConfig
    summary: SummaryConfig
    metric: str
    setup: Setup
    scores: NodeScores
    search: Search
    faithfulness: Faithfulness
    controls: Controls
    stability: Stability
    supernodes: Supernodes
    edges: Edges
    direction: Direction
    forward_rows: int
    seconds: dict[str, float]

    def to_json(self) -> dict:
        """The content of circuit.json."""
        setup, scores, search, faith, stable = self.setup, self.scores, self.search, self.faithfulness, self.stability
        nodes, names, evaluator = setup.nodes, setup.names, setup.evaluator
        circuit, n_nodes = search.circuit, len(setup.nodes)
        in_circuit = search.f - search.f_without
        full, empty = evaluator.metric_full.numpy(), evaluator.metric_empty.numpy()
        node_rows = []
        for j, i in enumerate(circuit):
            kind, layer, head, cls = nodes.key(i)
            node_rows.append({
                "id": node_id(nodes, i, names), "component": KINDS[kind], "layer": layer,
                "head": head if kind == HEAD else None, "position": names[cls], "token": setup.labels[cls],
                "effect": _num(scores.exact[i]), "effect_ci": [_num(x) for x in scores.exact_ci[i]],
                "attribution": _num(scores.attribution[i]), "in_circuit_effect": _num(in_circuit[j]),
                "refusal_projection": _num(self.direction.projections[j][0]),
                "refusal_cosine": _num(self.direction.projections[j][1]),
                "inclusion_frequency": float(stable.frequency[i]), "core": bool(stable.frequency[i] >= stable.threshold),
            })
        random = self.controls.random
        options = self.options
        return {
            "model": self.model,
            "method": {
                "nodes": "attention heads and MLPs at position classes",
                "intervention": "every node outside the circuit takes its activation from the harmless twin",
                "search": "pruning from every node, in rounds: the nodes ordered by the faithfulness without each "
                          "(first round: 1 - |its single-node effect|, exact where verified, else attribution's; later "
                          "rounds: measured on the circuit), the most of the least harmful removed together that keeps "
                          "the target",
                "metric": self.metric, "target": options.target, "seed": options.seed,
                "n_bootstrap": self.summary.n_bootstrap, "ci": self.summary.ci,
            },
            "n_pairs": evaluator.n_pairs, "n_pairs_dropped_unequal_length": setup.n_unequal,
            "n_search_pairs": setup.search.n_pairs,
            "positions": [{"name": n, "label": lab} for n, lab in zip(names, setup.labels)],
            "n_layers": setup.n_layers, "n_heads": setup.n_heads,
            "candidates": n_nodes, "size": len(circuit), "fraction": len(circuit) / n_nodes,
            "max_fraction": options.max_fraction, "within_max_fraction": len(circuit) <= options.max_fraction * n_nodes,
            "faithfulness": faith.value, "faithfulness_ci": list(faith.ci), "target_reached": faith.value >= options.target,
            "faithfulness_held_out": faith.held_out,
            "refusal_kept": faith.refusal_kept,
            "baselines": {"metric_full": float(full.mean()), "metric_empty": float(empty.mean()),
                          "metric_empty_measured": float(faith.metric_none.mean()),
                          "metric_circuit": float(faith.metric_circuit.mean())},
            "random_control": {"n": len(random), "size": len(circuit), "mean": float(random.mean()),
                               "std": float(random.std()), "max": float(random.max()) if len(random) else None},
            "per_category": faith.per_category,
            "stability": stability_json(stable, circuit, nodes, names),
            "nodes": node_rows,
            "pruned": [node_id(nodes, i, names) for i in search.pruned],
            "supernodes": supernodes_json(self.supernodes, circuit, nodes, names, setup.labels, scores, faith.value),
            "supernode_edges": self.edges.groups,
            "edges": self.edges.edges, "edges_note": self.edges.note,
            "pruning_curve": {"size": sorted(search.curve), "faithfulness": [search.curve[k] for k in sorted(search.curve)]},
            "mib": self.controls.mib,
            "attribution": agreement(scores.attribution, scores.exact, scores.top, scores.sample, n_nodes,
                                     min(max(len(circuit), 1), options.recall_k), options.strong_effect),
            "scores": {"id": [node_id(nodes, i, names) for i in range(n_nodes)],
                       "attribution": [_num(x) for x in scores.attribution], "exact": [_num(x) for x in scores.exact]},
            "refusal_direction": self.direction.per_layer,
            "forward_rows": self.forward_rows,
            "seconds": self.seconds,
        }


def supernodes_json(groups: Supernodes, circuit: list[int], nodes: Nodes, names: list[str], labels: list[str],
                    scores: NodeScores, f: float) -> list[dict]:
    rows = []
    for name, members, f_without in zip(groups.names, groups.members, groups.f_without):
        kind, _, _, cls = nodes.key(circuit[members[0]])
        layers = [int(nodes.layer[circuit[j]]) for j in members]
        rows.append({"id": name, "component": KINDS[kind], "position": names[cls], "token": labels[cls],
                     "layers": [min(layers), max(layers)], "members": [node_id(nodes, circuit[j], names) for j in members],
                     "in_circuit_effect": float(f - f_without),
                     "effect_sum": float(np.nansum(scores.best[[circuit[j] for j in members]]))})
    return rows


def stability_json(stable: Stability, circuit: list[int], nodes: Nodes, names: list[str]) -> dict:
    """circuit.json's stability: the core, the resamples' sizes and faithfulness, frequent nodes outside."""
    core = [i for i in circuit if stable.frequency[i] >= stable.threshold]
    outside = [i for i in np.argsort(-stable.frequency, kind="stable") if i not in set(circuit)
               and stable.frequency[i] >= 0.5]
    sizes = stable.sizes
    return {
        "n_resamples": len(sizes), "core_threshold": stable.threshold,
        "core": [node_id(nodes, i, names) for i in core], "core_size": len(core),
        "size_median": float(np.median(sizes)) if len(sizes) else None,
        "size_range": [int(sizes.min()), int(sizes.max())] if len(sizes) else None,
        "sizes": sizes.tolist(), "faithfulness": stable.faithfulness.tolist(),
        "frequent_outside": [{"id": node_id(nodes, i, names), "frequency": float(stable.frequency[i])} for i in outside],
        "method": "the search re-run on bootstrap resamples of the pairs: each resample ranks the nodes by its own "
                  "mean scores in the first round and measures faithfulness on its own pairs; its later rounds take "
                  "the main search's measured rankings, round by round",
    }


class Progress:
    """Where the circuit step is: its phase, the steps of the phase done (of a total, when known) and the
    (circuit, pair) rows computed, with an estimate of the phase's time left; seconds per finished phase.
    Each phase's end is logged; `report` (when given) receives `state()` at every phase and at most once a
    second in between."""

    def __init__(self, report: Callable[[dict], None] | None = None):
        self.seconds: dict[str, float] = {}
        self.report, self.rows = report, 0
        self.phase, self.index, self.done, self.total, self.unit = "", 0, 0, None, "rows"
        self._began = self._sent = time.perf_counter()

    def start(self, phase: str, total: int | None = None, unit: str = "rows") -> None:
        self.phase, self.index = phase, self.index + 1
        self.done, self.total, self.unit = 0, total, unit
        self._began = time.perf_counter()
        self._send(force=True)

    def expect(self, total: int) -> None:
        self.total = total
        self._send(force=True)

    def advance(self, n: int = 1, unit: str = "rows") -> None:
        if unit == "rows":
            self.rows += n
        if unit == self.unit:
            self.done += n
        self._send()

    def end(self) -> None:
        self.seconds[self.phase] = round(time.perf_counter() - self._began, 2)
        log.info("circuit step: %s took %.1fs", self.phase, self.seconds[self.phase])

    def state(self) -> dict:
        elapsed = time.perf_counter() - self._began
        left = elapsed / self.done * (self.total - self.done) if self.total and self.done else None
        return {"phase": self.phase, "index": self.index, "phases": len(PHASES), "done": self.done,
                "total": self.total, "unit": self.unit, "rows": self.rows, "elapsed": round(elapsed, 1),
                "left": None if left is None else round(left, 1), "seconds": dict(self.seconds)}

    def _send(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.report is not None and (force or now - self._sent >= 1.0):
            self._sent = now
            self.report(self.state())


PHASES = ("caches", "scores", "pruning", "faithfulness, curves, controls", "stability",
          "supernodes and edges", "refusal direction")


# ---- the phases ----------------------------------------------------------------------------------------

def prepare(model, pairs: pa.Table, options: CircuitConfig, metric: str, progress: Progress | None = None) -> Setup:
    """The pairs (equal-length, at most options.max_pairs), their classes, every candidate node, and the
    evaluator holding each length group's clean and corrupted caches."""
    pairs, n_unequal = select_pairs(pairs, options.max_pairs, options.seed)
    names, labels, class_maps = position_classes(pairs)
    groups = group_pairs(pairs, class_maps)
    adapter = get_adapter(model)
    nodes = Nodes.grid(adapter, list(range(len(names))))
    progress = progress or Progress()
    evaluator = Evaluator(model, groups, len(names), metric, options.max_batch_rows, progress)
    searched, search = np.arange(pairs.num_rows), evaluator
    if options.search_pairs is not None and options.search_pairs < pairs.num_rows:
        searched = np.sort(np.random.default_rng([options.seed, 2]).choice(pairs.num_rows, options.search_pairs,
                                                                           replace=False))
        search = Evaluator(model, group_pairs(pairs.take(pa.array(searched)), [class_maps[i] for i in searched]),
                           len(names), metric, options.max_batch_rows, progress)
    return Setup(pairs, n_unequal, names, labels, groups, nodes, evaluator, adapter.n_layers, adapter.n_heads,
                 search, searched)


def score_nodes(model, setup: Setup, options: CircuitConfig, summary: SummaryConfig, metric: str,
                rng: np.random.Generator, progress: Progress) -> NodeScores:
    """Attribution for every node; exact single-node effects (with intervals) for the verified ones."""
    n_pairs, n_nodes = setup.search.n_pairs, len(setup.nodes)
    attribution_pairs = attribution_scores(model, setup.search.groups, setup.nodes, len(setup.names), metric, n_pairs)
    attribution = attribution_pairs.mean(1).numpy()
    verified, top, sample = choose_verified(attribution, n_pairs, options, rng)
    progress.expect(len(verified) * n_pairs)
    exact_pairs = single_node_effects(setup.search, setup.nodes, verified.tolist())
    exact = np.full(n_nodes, np.nan)
    exact[verified] = exact_pairs.mean(1).numpy()
    exact_ci = np.full((n_nodes, 2), np.nan)
    exact_ci[verified] = bootstrap_mean_ci(exact_pairs.numpy(), summary.n_bootstrap, summary.ci, rng)
    per_pair = np.full((n_nodes, n_pairs), np.nan)
    per_pair[verified] = exact_pairs.numpy()
    return NodeScores(attribution, exact, exact_ci, top, sample, attribution_pairs.numpy(), per_pair)


def search_circuit(evaluator: Evaluator | Resample, nodes: Nodes, estimate: dict[int, float], target: float,
                   rankings: list[dict[int, float]] = (), measure: bool = True, rounds: int = 6) -> Search:
    """Pruning from every node: the first round ranks the nodes by `estimate` (f without each, from the
    scores), later ones by the given `rankings`, then (with `measure`) by f without each measured on the
    circuit of that round. Ordered by place."""
    circuit, pruned, f_without, measured, curve = prune(evaluator, nodes, list(range(len(nodes))), target,
                                                        [estimate, *rankings], measure, rounds)
    log.debug("circuit search: %d nodes kept", len(circuit))
    by_place = sorted(range(len(circuit)), key=lambda j: (int(nodes.layer[circuit[j]]), int(nodes.kind[circuit[j]]),
                                                          int(nodes.cls[circuit[j]]), int(nodes.head[circuit[j]])))
    f_without = f_without[by_place] if len(f_without) else f_without
    circuit = [circuit[j] for j in by_place]
    f = float(evaluator.faithfulness(nodes, _subset_masks(len(nodes), [circuit]))[0])
    return Search(circuit, pruned, f_without, curve, measured, f)


def measure_faithfulness(setup: Setup, circuit: list[int], summary: SummaryConfig,
                         rng: np.random.Generator) -> Faithfulness:
    """f of the circuit with its bootstrap interval over pairs, per category, and refusal kept."""
    evaluator = setup.evaluator
    metric_circuit, metric_none = evaluator.metrics(setup.nodes, _subset_masks(len(setup.nodes), [circuit, []]))
    full, empty = evaluator.metric_full, evaluator.metric_empty
    f = float(faithfulness(metric_circuit[None], full, empty)[0])
    f_ci = bootstrap_ratio_ci(metric_circuit.numpy() - empty.numpy(), full.numpy() - empty.numpy(),
                              summary.n_bootstrap, summary.ci, rng)
    categories = setup.pairs.column("category").to_pylist()
    per_category = {}
    for category in sorted(set(categories)):
        rows = torch.tensor([i for i, c in enumerate(categories) if c == category])
        per_category[category] = {
            "n": len(rows),
            "faithfulness": float(faithfulness(metric_circuit[rows][None], full[rows], empty[rows])[0]),
            "refusal_kept": float((metric_circuit[rows] > 0).float().mean()),
        }
    held_out = None
    rest = np.setdiff1d(np.arange(evaluator.n_pairs), setup.searched)
    if len(rest):
        numerator, denominator = metric_circuit.numpy()[rest] - empty.numpy()[rest], full.numpy()[rest] - empty.numpy()[rest]
        held_out = {"n": len(rest), "faithfulness": float(numerator.mean() / denominator.mean()),
                    "ci": list(bootstrap_ratio_ci(numerator, denominator, summary.n_bootstrap, summary.ci, rng))}
    return Faithfulness(f, f_ci, metric_circuit, metric_none, per_category,
                        float((metric_circuit > 0).float().mean()), held_out)


def controls(setup: Setup, scores: NodeScores, size: int, n_random: int, rng: np.random.Generator) -> Controls:
    """The MIB faithfulness curve and random circuits of the circuit's size."""
    n_nodes = len(setup.nodes)
    mib = mib_curve(setup.evaluator, setup.nodes, scores.best)
    random_sets = [rng.choice(n_nodes, size, replace=False) for _ in range(n_random)]
    return Controls(mib, setup.evaluator.faithfulness(setup.nodes, _subset_masks(n_nodes, random_sets)).numpy())


def stability(setup: Setup, scores: NodeScores, search: Search, options: CircuitConfig,
              progress: Progress | None = None) -> Stability:
    """The search on `options.n_resamples` bootstrap resamples of the pairs: each resample ranks the nodes
    by its own mean scores in the first round and measures faithfulness on its own pairs (a circuit's
    metric is computed on the pairs a resample drew, once per pair, and reused by later resamples); its later rounds take the main search's measured
    rankings, round by round, as many rounds as the main search pruned in. Its own random stream: the other
    phases' draws stay."""
    rng = np.random.default_rng([options.seed, 1])
    n_pairs, n_nodes = setup.search.n_pairs, len(setup.nodes)
    frequency, sizes, faith = np.zeros(n_nodes), [], []
    for _ in range(options.n_resamples):
        weights = np.bincount(rng.integers(0, n_pairs, n_pairs), minlength=n_pairs)
        view = Resample(setup.search, weights)
        found = search_circuit(view, setup.nodes, scores.without_estimate(weights), options.target,
                               search.rankings[:options.prune_rounds - 1], measure=False).circuit
        frequency[found] += 1
        sizes.append(len(found))
        faith.append(float(view.faithfulness(setup.nodes, _subset_masks(n_nodes, [found]))[0]))
        if progress is not None:
            progress.advance(1, "resamples")
    n = max(options.n_resamples, 1)
    return Stability(frequency / n, np.array(sizes), np.array(faith), options.core_threshold)


def supernodes(setup: Setup, search: Search, gap: int) -> Supernodes:
    """The circuit's nodes of one kind at one position class, split where `gap` or more layers pass without
    one, and the faithfulness of the circuit without each group."""
    nodes, circuit = setup.nodes, search.circuit
    by_place: dict[tuple[int, int], list[int]] = {}
    for j, i in enumerate(circuit):
        by_place.setdefault((int(nodes.cls[i]), int(nodes.kind[i])), []).append(j)
    members = []
    for place in sorted(by_place):
        run = []
        for j in sorted(by_place[place], key=lambda j: int(nodes.layer[circuit[j]])):
            if run and int(nodes.layer[circuit[j]]) - int(nodes.layer[circuit[run[-1]]]) > gap:
                members.append(run)
                run = []
            run.append(j)
        members.append(run)
    members.sort(key=lambda group: (min(int(nodes.layer[circuit[j]]) for j in group), int(nodes.cls[circuit[group[0]]])))
    names = [supernode_id(nodes, [circuit[j] for j in group], setup.names) for group in members]
    without = [[circuit[j] for j in range(len(circuit)) if j not in set(group)] for group in members]
    f_without = setup.evaluator.faithfulness(nodes, _subset_masks(len(nodes), without)).numpy() if members else np.array([])
    return Supernodes(members, names, f_without)


def edges(model, setup: Setup, search: Search, groups: Supernodes, options: CircuitConfig, metric: str) -> Edges:
    """Path effects between the supernodes (from the harmful tokens' embeddings, to the logits), and
    among the circuit's strongest nodes (by in-circuit effect, at most options.edge_nodes), on at most
    options.edge_pairs pairs."""
    circuit = search.circuit
    if not options.edges or not circuit:
        return Edges()
    try:
        check_path_patching(model, get_adapter(model))
    except UnsupportedArchitecture as err:
        return Edges(note=str(err))
    pair_groups = _first_pairs(setup.groups, options.edge_pairs)
    nodes, names = setup.nodes, setup.names
    tokens = Nodes.embeddings([names.index("harm")])
    members = [nodes.select([circuit[j] for j in group]) for group in groups.members]
    between = group_effects(model, pair_groups, [tokens] + members, members, options, metric)
    group_edges = _edge_rows(between, ["EMB@harm"] + groups.names, groups.names, options.edge_min)
    strongest = sorted(np.argsort(-(search.f - search.f_without), kind="stable")[:options.edge_nodes].tolist())
    chosen = nodes.select([circuit[j] for j in strongest])
    senders = Nodes.concat([tokens, chosen])
    found = group_effects(model, pair_groups, [senders.select([i]) for i in range(len(senders))],
                          [chosen.select([i]) for i in range(len(chosen))], options, metric)
    node_edges = _edge_rows(found, [node_id(senders, i, names) for i in range(len(senders))],
                            [node_id(chosen, i, names) for i in range(len(chosen))], options.edge_min)
    n_pairs = sum(len(g.rows) for g in pair_groups)
    note = (f"node edges measured among the {len(strongest)} nodes with the largest in-circuit effect"
            if len(strongest) < len(circuit) else None)
    if n_pairs < setup.evaluator.n_pairs:
        note = (note + "; " if note else "") + f"edges on {n_pairs} of the {setup.evaluator.n_pairs} pairs"
    return Edges(node_edges, group_edges, note)


def refusal_direction(model, setup: Setup, circuit: list[int], options: CircuitConfig, metric: str) -> Direction:
    """The difference-of-means direction per layer and each circuit node's projection on the best one."""
    found = direction_by_layer(model, setup.evaluator, metric, options.direction_layers,
                               max_batch_rows=options.max_batch_rows)
    vector = found.pop("vector")
    projections = node_projections(model, setup.evaluator, setup.nodes.select(circuit), vector) if circuit else []
    return Direction(found, projections)


# ---- evaluation over all groups ----------------------------------------------------------------------

class Evaluator:
    """Circuit metrics over every pair (all groups), in the order of the circuit step's pairs. It serves one
    node set (the candidates): each circuit's metrics are computed once and kept, by its mask."""

    def __init__(self, model, groups: list[PairGroup], n_classes: int, metric: str, max_batch_rows=None,
                 progress: Progress | None = None):
        self.groups, self.progress = groups, progress or Progress()
        self.runners = [CircuitRunner(model, g.clean, g.corrupted, g.answers, g.classes, n_classes, metric,
                                      max_batch_rows) for g in groups]
        self.n_pairs = sum(len(g.rows) for g in groups)
        self.metric_full = self._gather([r.metric_full[None] for r in self.runners])[0]
        self.metric_empty = self._gather([r.metric_empty[None] for r in self.runners])[0]
        self.forward_rows = 0  # (circuit, pair) rows computed
        self._known: dict[bytes, torch.Tensor] = {}  # circuit mask -> metric [P], nan where not computed yet

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(parts[0].shape[0], self.n_pairs)
        for group, part in zip(self.groups, parts):
            out[:, group.rows] = part
        return out

    def _each_group(self, compute: Callable[[CircuitRunner], torch.Tensor], n_circuits: int) -> torch.Tensor:
        """compute(runner) [C, group's pairs] for every length group -> [C, P], counted as rows computed."""
        parts = []
        for group, runner in zip(self.groups, self.runners):
            parts.append(compute(runner))
            self.progress.advance(n_circuits * len(group.rows))
        self.forward_rows += n_circuits * self.n_pairs
        return self._gather(parts)

    def _metrics_of(self, nodes: Nodes, masks: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """masks [C, N] -> metric [C, P] computed on `pairs` ([P] bool), nan elsewhere."""
        out = torch.full((len(masks), self.n_pairs), float("nan"))
        for group, runner in zip(self.groups, self.runners):
            local = pairs[group.rows].nonzero().squeeze(1)
            if len(local):
                out[:, group.rows[local]] = runner.metrics(nodes, masks, local)
                self.progress.advance(len(masks) * len(local))
        self.forward_rows += len(masks) * int(pairs.sum())
        return out

    def metrics(self, nodes: Nodes, masks: torch.Tensor, pairs: torch.Tensor | None = None) -> torch.Tensor:
        """masks [C, N] (bool) -> metric [C, P] on `pairs` ([P] bool, default all; elsewhere nan unless known
        from before). Each (circuit, pair) is computed once."""
        wanted = torch.ones(self.n_pairs, dtype=torch.bool) if pairs is None else pairs
        keys = [_key(mask) for mask in masks]
        for key in keys:
            self._known.setdefault(key, torch.full((self.n_pairs,), float("nan")))
        todo = sorted({key: c for c, key in enumerate(keys) if bool((self._known[key].isnan() & wanted).any())}.values())
        if todo:
            lacking = torch.stack([self._known[keys[c]].isnan() & wanted for c in todo])  # [C', P]
            computed = self._metrics_of(nodes, masks[todo], lacking.any(0))
            for c, fill, row in zip(todo, lacking, computed):
                self._known[keys[c]][fill] = row[fill]
        return torch.stack([self._known[key] for key in keys]) if keys else torch.empty(0, self.n_pairs)

    def single_node_metrics(self, nodes: Nodes) -> torch.Tensor:
        """[N, P]: the metric with each node alone patched."""
        return self._each_group(lambda runner: runner.single_node_metrics(nodes), len(nodes))

    def without_each(self, nodes: Nodes, members: list[int]) -> torch.Tensor:
        """[M, P]: the metric of the circuit `members` without each of them, in the order given."""
        masks = _subset_masks(len(nodes), [members]).repeat(len(members), 1)
        masks[torch.arange(len(members)), torch.tensor(members, dtype=torch.long)] = False
        keys = [_key(mask) for mask in masks]
        if any(key not in self._known or bool(self._known[key].isnan().any()) for key in keys):
            circuit = _subset_masks(len(nodes), [members])[0]
            computed = self._each_group(lambda runner: runner.without_each(nodes, circuit), len(members))  # sorted
            self._known.update({_key(masks[m]): row for m, row in zip(np.argsort(members), computed)})
        return torch.stack([self._known[key] for key in keys])

    def faithfulness(self, nodes: Nodes, masks: torch.Tensor) -> torch.Tensor:
        return faithfulness(self.metrics(nodes, masks), self.metric_full, self.metric_empty)

    def faithfulness_without_each(self, nodes: Nodes, members: list[int]) -> np.ndarray:
        """[M] f of the circuit `members` without each of them, in the order given."""
        return faithfulness(self.without_each(nodes, members), self.metric_full, self.metric_empty).numpy()

    def effects(self, metric: torch.Tensor) -> torch.Tensor:
        """Per-pair normalised noise effects [C, P] of metrics [C, P]: 1 = the refusal gap is gone."""
        return (metric - self.metric_full) / (self.metric_empty - self.metric_full)


class Resample:
    """The evaluator's faithfulness with every pair counted `weights` [P] times (a bootstrap resample).
    Circuits are computed on the drawn pairs only (about 63% of them)."""

    def __init__(self, evaluator: Evaluator, weights: np.ndarray):
        self.evaluator, self.weights = evaluator, torch.as_tensor(weights, dtype=torch.float32)
        self.drawn = self.weights > 0

    def _f(self, metric: torch.Tensor) -> torch.Tensor:
        empty, full = self.evaluator.metric_empty[self.drawn], self.evaluator.metric_full[self.drawn]
        weights = self.weights[self.drawn]
        return ((metric[..., self.drawn] - empty) * weights).sum(-1) / ((full - empty) * weights).sum()

    def faithfulness(self, nodes: Nodes, masks: torch.Tensor) -> torch.Tensor:
        return self._f(self.evaluator.metrics(nodes, masks, self.drawn))

    def faithfulness_without_each(self, nodes: Nodes, members: list[int]) -> np.ndarray:
        return self._f(self.evaluator.without_each(nodes, members)).numpy()


def _key(mask: torch.Tensor) -> bytes:
    return np.packbits(mask.numpy()).tobytes()


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
    return evaluator.effects(evaluator.single_node_metrics(nodes.select(which)))


def choose_verified(attribution: np.ndarray, n_pairs: int, options: CircuitConfig, rng: np.random.Generator):
    """(nodes to verify, attribution's top set, the random sample of the rest)."""
    n = len(attribution)
    order = np.argsort(-attribution, kind="stable")
    top = order[:min(options.verify_top, n)]
    if n * n_pairs <= options.verify_all_rows:
        return np.arange(n), top, np.setdiff1d(np.arange(n), top)
    rest = np.setdiff1d(np.arange(n), top)
    sample = np.sort(rng.choice(rest, min(options.verify_random, len(rest)), replace=False))
    return np.union1d(top, sample), top, sample


def agreement(attribution: np.ndarray, exact: np.ndarray, top: np.ndarray, sample: np.ndarray, n_nodes: int,
              k: int, strong: float) -> dict:
    """How well attribution agrees with exact patching on the verified nodes."""
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


# ---- pruning, curves --------------------------------------------------------------------------------

def _geometric_sizes(n: int) -> list[int]:
    sizes, k = {0, n}, 1
    while k < n:
        sizes.add(k)
        k = max(k + 1, int(math.ceil(k * 1.4)))
    return sorted(sizes)


def prune(evaluator: Evaluator | Resample, nodes: Nodes, circuit: list[int], target: float,
          rankings: list[dict[int, float]], measure: bool = True, max_rounds: int = 6,
          chunk: int = 4) -> tuple[list[int], list[int], np.ndarray, list[dict[int, float]], dict[int, float]]:
    """Drop nodes while f stays at the target, in rounds. A round orders the circuit's nodes by f without
    each of them (the given `rankings`, one per round, a node one lacks counting as removable; after them,
    with `measure`, f without each measured on the circuit) and removes the most of the least harmful
    together that keeps f >= target (k on a geometric grid from the top down to the first k that keeps it,
    then narrowed up to the next k that does not, `chunk` circuits per pass).
    Returns (kept, removed, f of the kept circuit without each node (with `measure`; else empty), the
    measured rankings, {size: f} of every circuit measured)."""
    kept, removed, measured, curve = list(circuit), [], [], {}
    measured_for = None  # the circuit the last measured ranking belongs to
    for round_ in range(max_rounds if measure else len(rankings)):
        if round_ < len(rankings):
            f_without = np.array([rankings[round_].get(i, np.inf) for i in kept])
        else:
            f_without = evaluator.faithfulness_without_each(nodes, kept)
            measured.append(dict(zip(kept, f_without.tolist())))
            measured_for = kept
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

        # From the most removed down: a minimal circuit keeps few of the candidates, so the answer lies
        # near the top of the grid, and the first passing chunk bounds it.
        grid = [k for k in reversed(_geometric_sizes(most)) if k > 0]
        for begin in range(0, len(grid), chunk):
            measure_trials(grid[begin:begin + chunk])
            if any(f_trial[k] >= target for k in grid[begin:begin + chunk]):
                break
        curve.update({len(kept) - k: f for k, f in f_trial.items()})
        passing = [k for k in f_trial if f_trial[k] >= target]
        if not passing:
            break
        lo = max(passing)
        hi = min([k for k in f_trial if k > lo and f_trial[k] < target] + [most + 1])
        while hi - lo > 1:  # lo keeps the target; hi (or beyond `most`) does not
            measure_trials(sorted({int(x) for x in np.linspace(lo, hi, chunk + 2)[1:-1]} - {lo, hi}))
            lo = max(k for k in f_trial if f_trial[k] >= target and k < hi)
            hi = min([k for k in f_trial if k > lo and f_trial[k] < target] + [hi])
            curve.update({len(kept) - k: f for k, f in f_trial.items()})
        removed += [c for c in kept if c not in trial(lo)]
        kept = trial(lo)
        log.debug("circuit search: round %d kept %d nodes (f %.3f)", round_ + 1, len(kept), f_trial[lo])
    if not measure:
        return kept, removed, np.zeros(0), measured, curve
    if measured_for != kept:
        f_without = evaluator.faithfulness_without_each(nodes, kept)
        measured.append(dict(zip(kept, f_without.tolist())))
    return kept, removed, np.array([measured[-1][i] for i in kept]), measured, curve


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


# ---- edges and the refusal direction ---------------------------------------------------------------

def group_effects(model, pair_groups: list[PairGroup], senders: list[Nodes], receivers: list[Nodes],
                  options: CircuitConfig, metric: str) -> torch.Tensor:
    """Mean path effects [S, R + 1] between groups of nodes (the last receiver: the logits); nan = no path."""
    n_pairs = sum(len(g.rows) for g in pair_groups)
    effects = torch.full((len(senders), len(receivers) + 1, n_pairs), float("nan"))
    done = 0
    for group in pair_groups:
        result = group_path_patch(model, group.clean, group.corrupted, group.answers, group.classes, senders,
                                  receivers, metric, options.max_batch_rows)
        effects[:, :, done:done + len(group.rows)] = result.effects()
        done += len(group.rows)
    return effects.nanmean(-1)


def _edge_rows(mean: torch.Tensor, senders: list[str], receivers: list[str], edge_min: float) -> list[dict]:
    rows = []
    for s, sender in enumerate(senders):
        for r, receiver in enumerate(receivers + ["logits"]):
            if not torch.isnan(mean[s, r]):
                value = float(mean[s, r])
                rows.append({"from": sender, "to": receiver, "effect": value, "drawn": abs(value) >= edge_min})
    return rows


def _first_pairs(groups: list[PairGroup], n: int) -> list[PairGroup]:
    """The length groups cut to their first `n` pairs in all (the edges' pairs)."""
    out, left = [], n
    for group in groups:
        if left <= 0:
            break
        take = min(left, len(group.rows))
        out.append(PairGroup(group.rows[:take], group.clean[:take], group.corrupted[:take],
                             group.answers.index(torch.arange(take)), group.classes[:take]))
        left -= take
    return out


def direction_by_layer(model, evaluator: Evaluator, metric: str, max_layers: int, n_ablations: int = 3,
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


def supernode_id(nodes: Nodes, members: list[int], names: list[str]) -> str:
    kind, _, _, cls = nodes.key(members[0])
    low, high = min(int(nodes.layer[i]) for i in members), max(int(nodes.layer[i]) for i in members)
    layers = f"L{low}" if low == high else f"L{low}-{high}"
    return f"{layers}.{'heads' if kind == HEAD else 'MLP'}@{names[cls]}"


def node_id(nodes: Nodes, i: int, names: list[str]) -> str:
    kind, layer, head, cls = nodes.key(i)
    if kind == EMBED:
        return f"EMB@{names[cls]}"
    return f"L{layer}.{'H' + str(head) if kind == HEAD else 'MLP'}@{names[cls]}"


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x
