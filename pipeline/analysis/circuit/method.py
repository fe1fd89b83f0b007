"""The circuit search: from a model and its screened pairs to a minimal, faithful circuit (circuit.json).

Nodes are attention heads and MLPs at position classes (pipeline.analysis.positions), so that pairs of
different lengths line up. A circuit is evaluated on the harmful prompt with every head and MLP outside
it patched from the harmless twin (`pipeline.engine.circuits`, through
pipeline.analysis.circuit.evaluator); its faithfulness is f(C) = (m(C) - m(empty)) / (m(full) - m(empty)),
m averaged over pairs.

`find_circuit` reads like the method, a phase per step (PHASES), each returning a small typed result
(pipeline.analysis.circuit.result):
1. `prepare`: the pairs of equal length, their position classes, every candidate node, the caches.
2. `score_nodes`: attribution patching (noise direction) scores every node; exact single-node effects
   verify every node when cheap, else attribution's top-k plus a random sample of the rest.
3. `search_circuit`: pruning from every node, in rounds, each ordering the nodes by how far from 1 the
   faithfulness without each is (first from the scores, then measured on the circuit) and removing the
   most of the least harmful together that keeps the circuit within the target from both sides:
   CMD = |1 - f| <= 1 - target, f in [target, 2 - target] (`within_target`). A circuit above the full
   model by more than that is no more an explanation of it than one below: the search does not stop at
   one, so a circuit that overshoots keeps shrinking (optionally on a sample of the pairs: `search_pairs`).
   The first round's order is the one-sided rule's (the scores' estimates are at most 1); where no circuit
   the search measures overshoots, it removes what a rule keeping f >= target alone would.
4. `measure_faithfulness`: f with a bootstrap interval over pairs (all, and those the search did not
   see), per category, and the fraction of pairs whose refusal the circuit alone keeps; `measure_transfer`:
   f with its interval on the transfer pairs (another source, never searched on); `controls`: the
   faithfulness curve at MIB's circuit sizes (CPR: area under f, nodes ranked by signed score; CMD: area
   between f and 1, ranked by |score|) and random circuits of the same size.
5. `stability`: the whole search (scores, verified nodes, every round's order) re-run on resamples of
   its pairs -> each resample's circuit, each node's inclusion frequency, the core alone on every pair;
   circuit.json compares the circuits by node and by supernode (layer x kind x position class).
6. `supernodes` and `edges`: the circuit grouped (one kind at one position over nearby layers); path
   patching between the groups and among the strongest nodes, from the harmful tokens' embeddings and to
   the logits.
7. `mean_difference_directions`: mean(harmful) - mean(harmless) residual at the final position per layer, its
   ablation and addition effects, and each circuit node's projection on the best layer's direction: a
   reading of the nodes, not the run's refusal direction (pipeline.analysis.directions selects that).
Agreement between attribution and exact patching (rank correlation, top-k recall, an estimate with an
upper bound of the strong nodes attribution missed) is written with the scores.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.circuit.evaluator import Evaluator, Resample, subset_masks
from pipeline.analysis.circuit.progress import Progress
from pipeline.analysis.circuit.result import (
    CircuitResult,
    Controls,
    CoreFaithfulness,
    Edges,
    Faithfulness,
    MeanDifference,
    NodeScores,
    Search,
    Setup,
    Stability,
    Supernodes,
    Transfer,
    node_id,
    supernode_id,
    supernode_key,
)
from pipeline.analysis.positions import PairGroup, group_pairs, position_classes, select_pairs
from pipeline.analysis.statistics import bootstrap_mean_ci, bootstrap_ratio_ci
from pipeline.engine.adapters import UnsupportedArchitecture, get_adapter
from pipeline.engine.attribution import attribution_patching
from pipeline.engine.circuits import HEAD, Nodes, check_path_patching, faithfulness, group_path_patch, node_writes
from pipeline.engine.directions import ablate_direction_metrics, add_direction_metrics, mean_difference
from pipeline.engine.metrics import check_metric
from pipeline.schema import CircuitConfig, SummaryConfig

log = logging.getLogger(__name__)
MIB_FRACTIONS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
PHASES = ("caches", "scores", "pruning", "faithfulness, curves, controls", "stability", "supernodes and edges",
          "mean difference")


@dataclass(frozen=True)
class TransferPairs:
    """Screened pairs from another source than the search's (transfer_pairs.parquet), to measure the
    circuit on."""
    pairs: pa.Table
    source: str  # where they come from, in words


# ---- the method ------------------------------------------------------------------------------------

def find_circuit(model, pairs: pa.Table, options: CircuitConfig, summary: SummaryConfig, metric: str,
                 model_name: str | None = None, progress: Progress | None = None,
                 transfer: TransferPairs | None = None) -> CircuitResult:
    """pairs.parquet (screened pairs) -> the minimal circuit and the evidence for it; its faithfulness on
    the `transfer` pairs too when given."""
    check_metric(metric)
    if not 0 < options.target <= 1:
        raise ValueError(f"circuit.target={options.target} must be in (0, 1]")
    progress, rng = progress or Progress(), np.random.default_rng(options.seed)
    progress.plan(PHASES)
    with progress.phase("caches"):
        setup = prepare(model, pairs, options, metric, progress)
    with progress.phase("scores"):
        scores = score_nodes(model, setup, options, summary, metric, rng, progress)
    with progress.phase("pruning"):
        search = search_circuit(setup.search, setup.nodes, scores.without_estimate(), options.target,
                                options.prune_rounds)
    with progress.phase("faithfulness, curves, controls"):
        faith = measure_faithfulness(setup, search.circuit, summary, rng)
        checks = controls(setup, scores, len(search.circuit), options.n_random, rng)
        moved = None if transfer is None else measure_transfer(model, setup, search.circuit, transfer, options,
                                                                 summary, metric, progress)
    with progress.phase("stability", options.n_resamples, "resamples"):
        resamples = stability(model, setup, scores, search, options, summary, metric, progress)
    with progress.phase("supernodes and edges"):
        groups = supernodes(setup, search, options.group_gap)
        links = edges(model, setup, search, groups, options, metric)
    with progress.phase("mean difference"):
        readout = mean_difference_directions(model, setup, search.circuit, options, metric)
    forward_rows = setup.evaluator.forward_rows + resamples.own_rows + (
        setup.search.forward_rows if setup.search is not setup.evaluator else 0)
    return CircuitResult(model_name, options, summary, metric, setup, scores, search, faith, moved, checks,
                         resamples, groups, links, readout, forward_rows, progress.seconds)


# ---- the phases ----------------------------------------------------------------------------------------

def prepare(model, pairs: pa.Table, options: CircuitConfig, metric: str, progress: Progress | None = None) -> Setup:
    """The pairs (equal-length, at most options.max_pairs), their classes, every candidate node, and the
    evaluator holding every pair's clean and corrupted caches (one left-padded batch)."""
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
                 search, searched, class_maps)


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
                   rounds: int = 6) -> Search:
    """Pruning from every node: the first round ranks the nodes by `estimate` (f without each, from the
    scores), later ones by f without each measured on the circuit of that round. Ordered by place."""
    circuit, pruned, f_without, _, curve = prune(evaluator, nodes, list(range(len(nodes))), target, [estimate],
                                                 max_rounds=rounds)
    log.debug("circuit search: %d nodes kept", len(circuit))
    by_place = sorted(range(len(circuit)), key=lambda j: (int(nodes.layer[circuit[j]]), int(nodes.kind[circuit[j]]),
                                                          int(nodes.cls[circuit[j]]), int(nodes.head[circuit[j]])))
    f_without = f_without[by_place] if len(f_without) else f_without
    circuit = [circuit[j] for j in by_place]
    f = float(evaluator.faithfulness(nodes, subset_masks(len(nodes), [circuit]))[0])
    return Search(circuit, pruned, f_without, curve, f)


def measure_faithfulness(setup: Setup, circuit: list[int], summary: SummaryConfig,
                         rng: np.random.Generator) -> Faithfulness:
    """f of the circuit with its bootstrap interval over pairs, per category, and refusal kept."""
    evaluator = setup.evaluator
    metric_circuit, metric_none = evaluator.metrics(setup.nodes, subset_masks(len(setup.nodes), [circuit, []]))
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
        numerator, denominator = (metric_circuit.numpy()[rest] - empty.numpy()[rest],
                                  full.numpy()[rest] - empty.numpy()[rest])
        held_out = {"n": len(rest), "faithfulness": float(numerator.mean() / denominator.mean()),
                    "ci": list(bootstrap_ratio_ci(numerator, denominator, summary.n_bootstrap, summary.ci, rng))}
    return Faithfulness(f, f_ci, metric_circuit, metric_none, per_category,
                        float((metric_circuit > 0).float().mean()), held_out)


def measure_transfer(model, setup: Setup, circuit: list[int], transfer: TransferPairs, options: CircuitConfig,
                     summary: SummaryConfig, metric: str, progress: Progress | None = None) -> Transfer:
    """f of the circuit on the transfer pairs (screened like the study's, under its answer tokens), with its
    bootstrap interval over those pairs: the same evaluator on their own caches, the pairs grouped by
    length as the search's are, their positions in the study's classes. Its own random stream: the other
    phases' draws stay."""
    if not transfer.pairs.num_rows:
        return Transfer(transfer.source, 0, None, None, None)
    pairs, _ = select_pairs(transfer.pairs, options.max_pairs, options.seed)
    evaluator = Evaluator(model, group_pairs(pairs, study_classes(setup.names, pairs)), len(setup.names), metric,
                          options.max_batch_rows, progress)
    [metric_circuit] = evaluator.metrics(setup.nodes, subset_masks(len(setup.nodes), [circuit]))
    full, empty = evaluator.metric_full, evaluator.metric_empty
    f = float(faithfulness(metric_circuit[None], full, empty)[0])
    ci = bootstrap_ratio_ci(metric_circuit.numpy() - empty.numpy(), full.numpy() - empty.numpy(), summary.n_bootstrap,
                            summary.ci, np.random.default_rng([options.seed, 3]))
    return Transfer(transfer.source, evaluator.n_pairs, f, tuple(ci), float((metric_circuit > 0).float().mean()))


def study_classes(names: list[str], pairs: pa.Table) -> list[list[int]]:
    """Each pair's position classes numbered as the study's `names` are. A class the study's pairs lack has
    no candidate node: its positions count as no class (outside every circuit)."""
    own, _, maps = position_classes(pairs)
    number = [names.index(name) if name in names else -1 for name in own]
    return [[number[c] if c >= 0 else -1 for c in classes] for classes in maps]


def controls(setup: Setup, scores: NodeScores, size: int, n_random: int, rng: np.random.Generator) -> Controls:
    """The MIB faithfulness curve and random circuits of the circuit's size."""
    n_nodes = len(setup.nodes)
    mib = mib_curve(setup.evaluator, setup.nodes, scores.best)
    random_sets = [rng.choice(n_nodes, size, replace=False) for _ in range(n_random)]
    return Controls(mib, setup.evaluator.faithfulness(setup.nodes, subset_masks(n_nodes, random_sets)).numpy())


def stability(model, setup: Setup, scores: NodeScores, search: Search, options: CircuitConfig,
              summary: SummaryConfig, metric: str, progress: Progress | None = None) -> Stability:
    """The whole search re-run on `options.n_resamples` resamples of its pairs (`draw_pairs`), each on its
    own (`search_resample`); then the circuit's core alone on every pair: its nodes kept by at least
    `options.core_threshold` of the resamples, and its nodes whose supernode (`supernode_key`) is. Its own
    random streams: the other phases' draws stay."""
    rng = np.random.default_rng([options.seed, 1])
    cache = PairScores.of(model, setup, scores, metric)
    circuits, faith, rows, shared_before = [], [], 0, setup.evaluator.forward_rows
    for _ in range(options.n_resamples):
        drawn = draw_pairs(rng, setup.evaluator.n_pairs, setup.search.n_pairs)
        found, f, own_rows = search_resample(model, setup, drawn, cache, options, metric, rng, progress)
        circuits.append(found)
        faith.append(f)
        rows += own_rows
        if progress is not None:
            progress.advance(1, "resamples")
    keys = [supernode_key(setup.nodes, i, setup.names) for i in range(len(setup.nodes))]
    node_share = lambda i: np.mean([i in found for found in circuits])  # noqa: E731
    key_share = lambda i: np.mean([keys[i] in {keys[j] for j in found} for found in circuits])  # noqa: E731
    core = [i for i in search.circuit if node_share(i) >= options.core_threshold]
    supernode_core = [i for i in search.circuit if key_share(i) >= options.core_threshold]
    n, of = setup.search.n_pairs, setup.evaluator.n_pairs
    draw = (f"a fresh draw of {n} of the {of} pairs (without replacement), as the search's own are drawn" if n < of
            else f"a bootstrap resample of the search's {n} pairs (drawn with replacement)")
    core_rng = np.random.default_rng([options.seed, 4])
    return Stability(circuits, np.array(faith), draw, n < of, options.core_threshold,
                     core_alone(setup, core, summary, core_rng), core_alone(setup, supernode_core, summary, core_rng),
                     rows + setup.evaluator.forward_rows - shared_before, rows)


def draw_pairs(rng: np.random.Generator, n_pairs: int, n_search: int) -> np.ndarray:
    """A resample's pairs (rows of the circuit step's pairs, repeated where drawn again). Where the search
    sees a sample of the pairs, another sample of that size: what another circuit.seed gives the search.
    Where it sees every pair, a bootstrap resample of them: what another draw of the prompts would."""
    if n_search < n_pairs:
        return np.sort(rng.choice(n_pairs, n_search, replace=False))
    return np.sort(rng.integers(0, n_pairs, n_pairs))


@dataclass
class PairScores:
    """Per-pair node scores over every pair of the circuit step, filled as resamples ask for them: a node's
    attribution or exact effect on a pair does not depend on which other pairs a search sees."""
    attribution: np.ndarray  # [N, P] for every pair
    exact: np.ndarray  # [N, P]; nan where not computed yet

    @staticmethod
    def of(model, setup: Setup, scores: NodeScores, metric: str) -> PairScores:
        n_pairs = setup.evaluator.n_pairs
        if setup.search is setup.evaluator:
            attribution = scores.attribution_pairs
        else:
            attribution = attribution_scores(model, setup.evaluator.groups, setup.nodes, len(setup.names), metric,
                                             n_pairs).numpy()
        exact = np.full((len(setup.nodes), n_pairs), np.nan)
        exact[:, setup.searched] = scores.exact_pairs
        return PairScores(attribution, exact)


def search_resample(model, setup: Setup, drawn: np.ndarray, cache: PairScores, options: CircuitConfig, metric: str,
                    rng: np.random.Generator, progress: Progress | None = None) -> tuple[list[int], float, int]:
    """The search as the main one runs it, on the pairs `drawn` (each counted as often as drawn): its
    own attribution means, its own verified nodes (attribution's top set there plus its own random sample),
    its first round ordered by those scores and every later round by f without each measured on its own
    pairs. Returns (its circuit, f of it on its pairs, rows computed on an evaluator of its own)."""
    nodes, n_nodes = setup.nodes, len(setup.nodes)
    evaluator, rows, counts = resample_evaluator(model, setup, drawn, options, metric, progress)
    attribution_pairs = cache.attribution[:, rows]
    attribution = (attribution_pairs * counts).sum(1) / counts.sum()
    verified, top, sample = choose_verified(attribution, len(drawn), options, rng)
    missing = [i for i in verified.tolist() if np.isnan(cache.exact[i, rows]).any()]
    if missing:
        cache.exact[np.ix_(missing, rows)] = single_node_effects(evaluator, nodes, missing).numpy()
    exact_pairs = np.full((n_nodes, len(rows)), np.nan)
    exact_pairs[verified] = cache.exact[np.ix_(verified, rows)]
    scores = NodeScores(attribution, np.full(n_nodes, np.nan), np.full((n_nodes, 2), np.nan), top, sample,
                        attribution_pairs, exact_pairs)
    view = Resample(evaluator, counts)
    circuit = prune(view, nodes, list(range(n_nodes)), options.target, [scores.without_estimate(counts)],
                    max_rounds=options.prune_rounds, describe=False)[0]
    f = float(view.faithfulness(nodes, subset_masks(n_nodes, [circuit]))[0])
    return sorted(circuit), f, 0 if evaluator is setup.evaluator else evaluator.forward_rows


def resample_evaluator(model, setup: Setup, drawn: np.ndarray, options: CircuitConfig, metric: str,
                       progress: Progress | None = None) -> tuple[Evaluator, np.ndarray, np.ndarray]:
    """(an evaluator holding the `drawn` pairs, its pairs as rows of the circuit step's, how often each was
    drawn). Where the search sees every pair, the circuit step's own, whose circuit metrics per pair
    resamples share; else one on the drawn pairs alone (f without each runs on every pair it holds)."""
    n_pairs = setup.evaluator.n_pairs
    if setup.search.n_pairs == n_pairs:
        return setup.evaluator, np.arange(n_pairs), np.bincount(drawn, minlength=n_pairs)
    rows, counts = np.unique(drawn, return_counts=True)
    evaluator = Evaluator(model, group_pairs(setup.pairs.take(pa.array(rows)), [setup.class_maps[i] for i in rows]),
                          len(setup.names), metric, options.max_batch_rows, progress)
    return evaluator, rows, counts


def core_alone(setup: Setup, core: list[int], summary: SummaryConfig, rng: np.random.Generator) -> CoreFaithfulness:
    """f of the `core` nodes alone on every pair of the circuit step, with its bootstrap interval."""
    if not core:
        return CoreFaithfulness([], None, None)
    evaluator = setup.evaluator
    [metric] = evaluator.metrics(setup.nodes, subset_masks(len(setup.nodes), [core]))
    full, empty = evaluator.metric_full, evaluator.metric_empty
    f = float(faithfulness(metric[None], full, empty)[0])
    ci = bootstrap_ratio_ci(metric.numpy() - empty.numpy(), full.numpy() - empty.numpy(), summary.n_bootstrap,
                            summary.ci, rng)
    return CoreFaithfulness(core, f, tuple(float(x) for x in ci))


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
    members.sort(key=lambda group: (min(int(nodes.layer[circuit[j]]) for j in group),
                                    int(nodes.cls[circuit[group[0]]])))
    names = [supernode_id(nodes, [circuit[j] for j in group], setup.names) for group in members]
    without = [[circuit[j] for j in range(len(circuit)) if j not in set(group)] for group in members]
    f_without = (setup.evaluator.faithfulness(nodes, subset_masks(len(nodes), without)).numpy() if members
                 else np.array([]))
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


def mean_difference_directions(model, setup: Setup, circuit: list[int], options: CircuitConfig,
                               metric: str) -> MeanDifference:
    """The final token's difference-of-means direction per layer and each circuit node's projection on
    the best one."""
    found = mean_difference_by_layer(model, setup.evaluator, metric, options.direction_layers,
                                     max_batch_rows=options.max_batch_rows)
    vector = found.pop("vector")
    projections = node_projections(model, setup.evaluator, setup.nodes.select(circuit), vector) if circuit else []
    return MeanDifference(found, projections)


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


# ---- pruning, curves --------------------------------------------------------------------------------

def _geometric_sizes(n: int) -> list[int]:
    sizes, k = {0, n}, 1
    while k < n:
        sizes.add(k)
        k = max(k + 1, int(math.ceil(k * 1.4)))
    return sorted(sizes)


def within_target(f, target: float):
    """The pruning objective: CMD = |1 - f| <= 1 - target, f within [target, 2 - target]. A circuit above
    the full model by more than the target allows keeps nodes that work against refusal out of balance with
    the rest, so it is not the minimal explanation either."""
    return np.abs(1 - np.asarray(f)) <= 1 - target


def prune(evaluator: Evaluator | Resample, nodes: Nodes, circuit: list[int], target: float,
          rankings: list[dict[int, float]], measure: bool = True, max_rounds: int = 6, chunk: int = 4,
          describe: bool = True) -> tuple[list[int], list[int], np.ndarray, list[dict[int, float]], dict[int, float]]:
    """Drop nodes while the circuit stays within the target from both sides (`within_target`), in rounds.
    A round orders the circuit's nodes by how far from 1 f without each of them is (the given `rankings`,
    one per round, a node one lacks counting as removable; after them, with `measure`, f without each
    measured on the circuit) and removes the most of the least harmful together that stays within the
    target (k on a geometric grid from the top down to the first k that does, then narrowed up to the
    next k that does not, `chunk` circuits per pass). Removing a node that holds refusal back raises f, so
    an overshooting circuit ranks such nodes last and keeps shrinking by the nodes that bring f back to 1.
    Returns (kept, removed, f of the kept circuit without each node (with `measure` and `describe`; else
    empty), the measured rankings, {size: f} of every circuit measured)."""
    kept, removed, measured, curve = list(circuit), [], [], {}
    measured_for = None  # the circuit the last measured ranking belongs to
    for round_ in range(max_rounds if measure else len(rankings)):
        if round_ < len(rankings):
            f_without = np.array([rankings[round_].get(i, np.nan) for i in kept])
        else:
            f_without = evaluator.faithfulness_without_each(nodes, kept)
            measured.append(dict(zip(kept, f_without.tolist())))
            measured_for = kept
        distance = np.where(np.isnan(f_without), -np.inf, np.abs(1 - f_without))  # nan: not ranked, removable
        order = np.argsort(distance, kind="stable")
        most = min(int((distance <= 1 - target).sum()), len(kept) - 1)
        if most == 0:
            break
        trial = lambda k: [kept[i] for i in sorted(order[k:])]  # noqa: E731
        f_trial = {}

        def measure_trials(ks):
            ks = [k for k in ks if k not in f_trial]
            if ks:
                f_trial.update(zip(ks, evaluator.faithfulness(nodes, subset_masks(len(nodes),
                                                                                     [trial(k) for k in ks])).tolist()))

        def passes(k):
            return bool(within_target(f_trial[k], target))

        # From the most removed down: a minimal circuit keeps few of the candidates, so the answer lies
        # near the top of the grid, and the first passing chunk bounds it.
        grid = [k for k in reversed(_geometric_sizes(most)) if k > 0]
        for begin in range(0, len(grid), chunk):
            measure_trials(grid[begin:begin + chunk])
            if any(passes(k) for k in grid[begin:begin + chunk]):
                break
        curve.update({len(kept) - k: f for k, f in f_trial.items()})
        passing = [k for k in f_trial if passes(k)]
        if not passing:
            break
        lo = max(passing)
        hi = min([k for k in f_trial if k > lo and not passes(k)] + [most + 1])
        while hi - lo > 1:  # lo stays within the target; hi (or beyond `most`) does not
            measure_trials(sorted({int(x) for x in np.linspace(lo, hi, chunk + 2)[1:-1]} - {lo, hi}))
            lo = max(k for k in f_trial if passes(k) and k < hi)
            hi = min([k for k in f_trial if k > lo and not passes(k)] + [hi])
            curve.update({len(kept) - k: f for k, f in f_trial.items()})
        removed += [c for c in kept if c not in trial(lo)]
        kept = trial(lo)
        log.debug("circuit search: round %d kept %d nodes (f %.3f)", round_ + 1, len(kept), f_trial[lo])
    if not (measure and describe):
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
    masks = subset_masks(n, [signed[:k] for k in sizes] + [absolute[:k] for k in sizes])
    f = evaluator.faithfulness(nodes, masks).tolist()
    f_signed, f_abs = f[:len(sizes)], f[len(sizes):]
    x = np.array(MIB_FRACTIONS)
    cpr = float(np.trapezoid(f_signed, x))
    cmd = float(np.trapezoid(np.abs(1 - np.array(f_abs)), x))
    return {"fraction": list(MIB_FRACTIONS), "size": sizes, "faithfulness_signed": f_signed,
            "faithfulness_absolute": f_abs, "cpr": cpr, "cmd": cmd}


# ---- edges and the mean difference -----------------------------------------------------------------

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


def mean_difference_by_layer(model, evaluator: Evaluator, metric: str, max_layers: int, n_ablations: int = 3,
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
    full, empty = evaluator.metric_full, evaluator.metric_empty
    for group in evaluator.groups:
        added = add_direction_metrics(model, group.corrupted, group.answers, directions[tested], tested, metric,
                                      max_batch_rows)
        addition[:, group.rows] = (added - empty[group.rows]) / (full[group.rows] - empty[group.rows])
    ablated_layers = [tested[i] for i in addition.mean(1).argsort(descending=True)[:n_ablations].tolist()]
    ablation = torch.empty(len(ablated_layers), evaluator.n_pairs)
    for group in evaluator.groups:
        ablated = ablate_direction_metrics(model, group.clean, group.answers, directions[ablated_layers], metric,
                                           max_batch_rows)
        ablation[:, group.rows] = (ablated - full[group.rows]) / (empty[group.rows] - full[group.rows])
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
    on the unit direction and as a cosine: [N, 2]."""
    adapter = get_adapter(model)
    unit = direction / direction.norm()
    total = torch.zeros(len(nodes), adapter.d_model)
    for group, runner in zip(evaluator.batches, evaluator.runners):  # pads: class -1, no node
        classes = group.classes.to(runner.base.final_resid.device)
        with torch.no_grad():
            diff = (node_writes(adapter, runner.base, nodes, classes)
                    - node_writes(adapter, runner.source, nodes, classes))
        counts = torch.stack([(group.classes == int(c)).sum(-1) for c in nodes.cls]).clamp(min=1)  # [N, P]
        total += (diff.float().cpu().sum(2) / counts[..., None]).sum(1)
    mean = total / evaluator.n_pairs
    projection = mean @ unit
    cosine = projection / mean.norm(dim=-1).clamp(min=1e-12)
    return torch.stack([projection, cosine], dim=1).numpy()


