"""The circuit step's result: each phase's typed result, circuit.json written from them, and circuit.json
read back as a typed `Circuit` (what pipeline.outputs and the MLflow tracking read).

The writer (`CircuitResult.to_json`) and the reader (`circuit_from_json`) sit side by side: a field
added to one belongs in the other. Node and supernode ids name a node by its place:
"L3.H1@final" (head 1 of layer 3 at the final position class), "L2.MLP@harm", "L1-3.heads@harm"
(a supernode), "EMB@harm" (the harmful tokens' embeddings).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from scipy import stats

from pipeline.analysis.circuit.evaluator import Evaluator
from pipeline.analysis.positions import PairGroup
from pipeline.engine.circuits import EMBED, HEAD, KINDS, Nodes
from pipeline.schema import CircuitConfig, SummaryConfig

SUPERNODE_LEVEL = "layer x kind x position class"  # stability's supernodes (supernode_key)
STABLE_JACCARD = 0.8  # a level is trusted when resampled circuits agree at least this much (mean Jaccard)

# ---- each phase's result ---------------------------------------------------------------------------

@dataclass
class Setup:
    """What every phase reads: the circuit step's pairs, their position classes, the candidate nodes."""
    pairs: pa.Table
    n_unequal: int  # pairs left out for unequal token length
    names: list[str]  # position class names
    labels: list[str]  # their readable labels
    groups: list[PairGroup]
    nodes: Nodes  # every candidate: each head and MLP at each layer and class
    evaluator: Evaluator  # every pair: faithfulness, controls, supernodes, edges, mean difference
    n_layers: int
    n_heads: int
    search: Evaluator  # the search's pairs (the evaluator itself unless options.search_pairs leaves some out)
    searched: np.ndarray  # their rows in `pairs`
    class_maps: list[list[int]]  # each pair's position class per token (-1: none), as `groups` hold them


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
class Transfer:
    """The circuit on the transfer pairs: another source than the pairs it was searched on."""
    source: str  # where the pairs come from, in words
    n_pairs: int  # screened, of equal token length (0: none survived; the values are then None)
    value: float | None
    ci: tuple[float, float] | None
    refusal_kept: float | None  # fraction of the pairs whose refusal the circuit alone keeps


@dataclass
class Controls:
    mib: dict  # faithfulness at MIB's circuit sizes, CPR and CMD
    random: np.ndarray  # [n_random] faithfulness of random circuits of the circuit's size


@dataclass
class Stability:
    """The whole search re-run on resampled pairs (method.stability): each resample's circuit, and the
    circuit's core (its nodes, or its supernodes, kept by at least `threshold` of the resamples) measured
    alone on every pair."""
    circuits: list[list[int]]  # [B] each resample's circuit, node indices
    faithfulness: np.ndarray  # [B] each resample's circuit, on its own pairs
    draw: str  # how a resample's pairs are drawn, in words
    circuit_is_a_draw: bool  # the circuit's own pairs are drawn as a resample's are: one more independent search
    threshold: float  # core nodes are found in at least this share of the resamples
    core: CoreFaithfulness  # the circuit's core nodes alone
    supernode_core: CoreFaithfulness  # the circuit's nodes whose supernode is core, alone
    forward_rows: int  # (circuit, pair) rows the resamples and the cores computed
    own_rows: int  # of them, on evaluators of the resamples' own (the rest count in the step's evaluator's)

    def frequency(self, n_nodes: int) -> np.ndarray:
        """[N] share of the resamples whose circuit holds each node."""
        counts = np.zeros(n_nodes)
        for circuit in self.circuits:
            counts[circuit] += 1
        return counts / max(len(self.circuits), 1)


@dataclass(frozen=True)
class CoreFaithfulness:
    """A core circuit alone, on every pair of the circuit step."""
    nodes: list[int]
    value: float | None  # None: an empty core
    ci: tuple[float, float] | None


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
class MeanDifference:
    """mean(harmful) - mean(harmless) residual at the final token per layer, the circuit's nodes read on
    the layer where it works best. Not the run's refusal direction: that is selected by
    pipeline.analysis.directions (direction.arrow)."""
    per_layer: dict  # position, best_layer, per_layer rows (norm, addition and ablation effects)
    projections: np.ndarray  # [len(circuit), 2] each circuit node's projection and cosine on best_layer's


# ---- circuit.json, written ---------------------------------------------------------------------------

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
    transfer: Transfer | None  # None: the run has no transfer pairs
    controls: Controls
    stability: Stability
    supernodes: Supernodes
    edges: Edges
    mean_difference: MeanDifference
    forward_rows: int
    seconds: dict[str, float]

    def to_json(self) -> dict:
        """The content of circuit.json."""
        setup, scores, search, faith, stable = self.setup, self.scores, self.search, self.faithfulness, self.stability
        nodes, names, evaluator = setup.nodes, setup.names, setup.evaluator
        circuit, n_nodes = search.circuit, len(setup.nodes)
        frequency = stable.frequency(n_nodes)
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
                "mean_difference_projection": _num(self.mean_difference.projections[j][0]),
                "mean_difference_cosine": _num(self.mean_difference.projections[j][1]),
                "inclusion_frequency": float(frequency[i]),
                "core": i in stable.core.nodes,
            })
        random = self.controls.random
        options = self.options
        return {
            "model": self.model,
            "method": {
                "nodes": "attention heads and MLPs at position classes",
                "intervention": "every node outside the circuit takes its activation from the harmless twin",
                "search": "pruning from every node, in rounds: the nodes ordered by how far from 1 the "
                          "faithfulness without each is (first round: 1 - |its single-node effect|, exact where "
                          "verified, else attribution's; later rounds: measured on the circuit), the most of the "
                          "least harmful removed together that keeps CMD = |1 - faithfulness| <= 1 - target",
                "metric": self.metric, "target": options.target, "seed": options.seed,
                "n_bootstrap": self.summary.n_bootstrap, "ci": self.summary.ci,
            },
            "n_pairs": evaluator.n_pairs, "n_pairs_dropped_unequal_length": setup.n_unequal,
            "n_search_pairs": setup.search.n_pairs,
            "positions": [{"name": n, "label": lab} for n, lab in zip(names, setup.labels)],
            "n_layers": setup.n_layers, "n_heads": setup.n_heads,
            "candidates": n_nodes, "size": len(circuit), "fraction": len(circuit) / n_nodes,
            "max_fraction": options.max_fraction, "within_max_fraction": len(circuit) <= options.max_fraction * n_nodes,
            "faithfulness": faith.value, "faithfulness_ci": list(faith.ci), "cmd": abs(1 - faith.value),
            "target_reached": abs(1 - faith.value) <= 1 - options.target,
            "faithfulness_held_out": faith.held_out,
            "refusal_kept": faith.refusal_kept,
            "transfer": transfer_json(self.transfer),
            "baselines": {"metric_full": float(full.mean()), "metric_empty": float(empty.mean()),
                          "metric_empty_measured": float(faith.metric_none.mean()),
                          "metric_circuit": float(faith.metric_circuit.mean())},
            "random_control": {"n": len(random), "size": len(circuit), "mean": float(random.mean()),
                               "std": float(random.std()), "max": float(random.max()) if len(random) else None},
            "per_category": faith.per_category,
            "stability": stability_json(stable, circuit, nodes, names, options.target),
            "nodes": node_rows,
            "pruned": [node_id(nodes, i, names) for i in search.pruned],
            "supernodes": supernodes_json(self.supernodes, circuit, nodes, names, setup.labels, scores, faith.value),
            "supernode_edges": self.edges.groups,
            "edges": self.edges.edges, "edges_note": self.edges.note,
            "pruning_curve": {"size": sorted(search.curve),
                              "faithfulness": [search.curve[k] for k in sorted(search.curve)]},
            "mib": self.controls.mib,
            "attribution": agreement(scores.attribution, scores.exact, scores.top, scores.sample, n_nodes,
                                     min(max(len(circuit), 1), options.recall_k), options.strong_effect),
            "scores": {"id": [node_id(nodes, i, names) for i in range(n_nodes)],
                       "attribution": [_num(x) for x in scores.attribution], "exact": [_num(x) for x in scores.exact]},
            "mean_difference": self.mean_difference.per_layer,
            "forward_rows": self.forward_rows,
            "seconds": self.seconds,
        }


def transfer_json(transfer: Transfer | None) -> dict | None:
    if transfer is None:
        return None
    f = transfer.value
    return {"source": transfer.source, "n_pairs": transfer.n_pairs, "faithfulness": f,
            "faithfulness_ci": None if transfer.ci is None else list(transfer.ci),
            "cmd": None if f is None else abs(1 - f), "refusal_kept": transfer.refusal_kept}


def supernodes_json(groups: Supernodes, circuit: list[int], nodes: Nodes, names: list[str], labels: list[str],
                    scores: NodeScores, f: float) -> list[dict]:
    rows = []
    for name, members, f_without in zip(groups.names, groups.members, groups.f_without):
        kind, _, _, cls = nodes.key(circuit[members[0]])
        layers = [int(nodes.layer[circuit[j]]) for j in members]
        rows.append({"id": name, "component": KINDS[kind], "position": names[cls], "token": labels[cls],
                     "layers": [min(layers), max(layers)],
                     "members": [node_id(nodes, circuit[j], names) for j in members],
                     "in_circuit_effect": float(f - f_without),
                     "effect_sum": float(np.nansum(scores.best[[circuit[j] for j in members]]))})
    return rows


def stability_json(stable: Stability, circuit: list[int], nodes: Nodes, names: list[str], target: float) -> dict:
    """circuit.json's stability: each resample's circuit (as node ids and as supernode keys), how far they
    agree with each other and with the circuit, each node's inclusion frequency, the core alone, and the
    level (nodes or supernodes) a reader can trust."""
    frequency = stable.frequency(len(nodes))
    outside = [i for i in np.argsort(-frequency, kind="stable") if i not in set(circuit) and frequency[i] >= 0.5]
    circuits = [[node_id(nodes, i, names) for i in found] for found in stable.circuits]
    supernode_circuits = [sorted({supernode_key(nodes, i, names) for i in found}) for found in stable.circuits]
    main = [node_id(nodes, i, names) for i in circuit]
    main_supernodes = sorted({supernode_key(nodes, i, names) for i in circuit})
    by_nodes = agreement_json(circuits, main, [node_id(nodes, i, names) for i in stable.core.nodes], stable.core,
                              stable.circuit_is_a_draw)
    by_supernodes = agreement_json(supernode_circuits, main_supernodes, sorted(
        {supernode_key(nodes, i, names) for i in stable.supernode_core.nodes}), stable.supernode_core,
        stable.circuit_is_a_draw)
    return {
        "n_resamples": len(circuits), "core_threshold": stable.threshold, "draw": stable.draw,
        "circuit_is_a_draw": stable.circuit_is_a_draw,
        "circuits": circuits, "supernode_circuits": supernode_circuits,
        "faithfulness": stable.faithfulness.tolist(),
        **by_nodes,
        "frequent_outside": [{"id": node_id(nodes, i, names), "frequency": float(frequency[i])} for i in outside],
        "supernodes": {"level": SUPERNODE_LEVEL, "circuit": main_supernodes} | by_supernodes,
        "trusted_level": trusted_level(by_nodes, by_supernodes, target),
        "stable_jaccard": STABLE_JACCARD,
        "forward_rows": stable.forward_rows,
        "method": "the whole search re-run on each resample's pairs: its own attribution and verified nodes, its own "
                  "first-round order from them, and every later pruning round's order measured on its own pairs",
    }


def agreement_json(circuits: list[list[str]], main: list[str], core: list[str], alone: CoreFaithfulness,
                   circuit_is_a_draw: bool) -> dict:
    """How resampled circuits (of node ids or supernode keys) agree: Jaccard between every two of them,
    between each and the circuit, and between every two independent searches (the resamples, and the
    circuit too when `circuit_is_a_draw`); their sizes, each member's inclusion frequency; the circuit's
    `core` members and the core's nodes measured `alone`."""
    between = [jaccard(a, b) for k, a in enumerate(circuits) for b in circuits[k + 1:]]
    to_circuit = [jaccard(c, main) for c in circuits]
    sizes = np.array([len(c) for c in circuits])
    counts: dict[str, int] = {}
    for found in circuits:
        for key in found:
            counts[key] = counts.get(key, 0) + 1
    return {
        "jaccard": {"between_resamples": spread(between), "to_circuit": spread(to_circuit),
                    "between_searches": spread(between + to_circuit if circuit_is_a_draw else between)},
        "sizes": sizes.tolist(), "size_median": float(np.median(sizes)) if len(sizes) else None,
        "size_range": [int(sizes.min()), int(sizes.max())] if len(sizes) else None,
        "inclusion_frequency": {key: n / len(circuits) for key, n in sorted(counts.items(), key=lambda kv: -kv[1])},
        "core": core, "core_size": len(core),
        "core_faithfulness": {"value": alone.value, "ci": None if alone.ci is None else list(alone.ci),
                              "nodes": len(alone.nodes)},
    }


def trusted_level(by_nodes: dict, by_supernodes: dict, target: float) -> str | None:
    """The finest level whose independent searches agree (mean Jaccard >= STABLE_JACCARD) and whose core
    alone reaches the target within its interval; None: neither."""
    for level, found in (("nodes", by_nodes), ("supernodes", by_supernodes)):
        agree, ci = found["jaccard"]["between_searches"], found["core_faithfulness"]["ci"]
        if agree is not None and agree["mean"] >= STABLE_JACCARD and ci is not None and ci[1] >= target:
            return level
    return None


def spread(values: list[float]) -> dict | None:
    """mean, std, min, max of Jaccard values (None: fewer than one)."""
    if not values:
        return None
    x = np.asarray(values, dtype=float)
    return {"mean": float(x.mean()), "std": float(x.std()), "min": float(x.min()), "max": float(x.max()), "n": len(x)}


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


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


# ---- names the writer and the method share ------------------------------------------------------

def supernode_id(nodes: Nodes, members: list[int], names: list[str]) -> str:
    kind, _, _, cls = nodes.key(members[0])
    low, high = min(int(nodes.layer[i]) for i in members), max(int(nodes.layer[i]) for i in members)
    layers = f"L{low}" if low == high else f"L{low}-{high}"
    return f"{layers}.{'heads' if kind == HEAD else 'MLP'}@{names[cls]}"


def supernode_key(nodes: Nodes, i: int, names: list[str]) -> str:
    """The supernode a node belongs to when circuits are compared: its layer, kind and position class
    ("L3.heads@final"; an MLP is its own: "L2.MLP@harm"). A fixed key, unlike `Supernodes`' groups, which
    span nearby layers as one circuit's members fall."""
    return supernode_id(nodes, [i], names)


def node_id(nodes: Nodes, i: int, names: list[str]) -> str:
    kind, layer, head, cls = nodes.key(i)
    if kind == EMBED:
        return f"EMB@{names[cls]}"
    return f"L{layer}.{'H' + str(head) if kind == HEAD else 'MLP'}@{names[cls]}"


def _num(x) -> float | None:
    x = float(x)
    return None if math.isnan(x) else x


# ---- circuit.json, read ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Position:
    name: str  # the position class ("harm", "final", ...)
    label: str  # its token(s), readable


@dataclass(frozen=True)
class CircuitNode:
    """One node of the circuit (the field names are circuit.json's keys)."""
    id: str
    component: str  # "head" or "mlp"
    layer: int
    head: int | None
    position: str  # its position class
    token: str
    effect: float | None  # exact single-node effect (None where not verified)
    effect_ci: tuple[float | None, float | None]
    attribution: float | None
    in_circuit_effect: float | None  # f of the circuit - f of the circuit without it
    mean_difference_projection: float | None  # on the final token's mean difference at its best layer
    mean_difference_cosine: float | None
    inclusion_frequency: float  # share of the bootstrap resamples whose circuit holds it
    core: bool


@dataclass(frozen=True)
class Edge:
    """A path effect: from a node or supernode ("EMB@harm": the harmful tokens' embeddings) to another (or
    to "logits"), as circuit.json's {"from", "to", "effect", "drawn"}."""
    sender: str
    receiver: str
    effect: float
    drawn: bool  # |effect| >= circuit.edge_min


@dataclass(frozen=True)
class Supernode:
    id: str
    component: str
    position: str
    token: str
    layers: tuple[int, int]  # lowest and highest
    members: tuple[str, ...]  # node ids
    in_circuit_effect: float  # f of the circuit - f of the circuit without the group
    effect_sum: float  # its members' single-node effects


@dataclass(frozen=True)
class Spread:
    mean: float
    std: float
    min: float
    max: float
    n: int  # values (circuit pairs)


@dataclass(frozen=True)
class Agreement:
    """Resampled circuits at one level (node ids, or supernode keys): circuit.json's stability, or its
    stability.supernodes."""
    jaccard_between: Spread | None  # between every two resampled circuits (None: fewer than two)
    jaccard_to_circuit: Spread | None  # between each and the circuit
    jaccard_between_searches: Spread | None  # between every two independent searches (see circuit_is_a_draw)
    sizes: tuple[int, ...]  # each resample's circuit size
    size_median: float | None
    size_range: tuple[int, int] | None
    inclusion_frequency: dict[str, float]  # share of the resamples holding each member (those found at all)
    core: tuple[str, ...]  # the circuit's members in at least core_threshold of the resamples
    core_faithfulness: float | None  # the core's nodes alone, on every pair (None: an empty core)
    core_faithfulness_ci: tuple[float, float] | None
    core_nodes: int  # how many nodes that core circuit holds


@dataclass(frozen=True)
class StabilitySummary:
    n_resamples: int
    core_threshold: float
    draw: str  # how a resample's pairs are drawn
    circuit_is_a_draw: bool  # the circuit's pairs are drawn as a resample's: it counts among the independent searches
    circuits: tuple[tuple[str, ...], ...]  # each resample's circuit, node ids
    supernode_circuits: tuple[tuple[str, ...], ...]  # the same as supernode keys (layer x kind x position class)
    supernode_circuit: tuple[str, ...]  # the circuit's own supernode keys
    faithfulness: tuple[float, ...]  # each resample's circuit, on its own pairs
    nodes: Agreement
    supernodes: Agreement
    frequent_outside: tuple[tuple[str, float], ...]  # (node id, frequency) in >= half the resamples, not in the circuit
    trusted_level: str | None  # "nodes", "supernodes" or None: see stable_jaccard
    stable_jaccard: float  # trusted: a level's mean Jaccard between searches reaches this, its core the target
    forward_rows: int
    method: str

    @property
    def core(self) -> tuple[str, ...]:
        return self.nodes.core

    @property
    def core_size(self) -> int:
        return len(self.nodes.core)


@dataclass(frozen=True)
class TransferFaithfulness:
    """circuit.json's transfer: the circuit's faithfulness on pairs from another source (see Transfer)."""
    source: str
    n_pairs: int
    faithfulness: float | None  # None: no transfer pair survived the screen
    faithfulness_ci: tuple[float, float] | None
    cmd: float | None  # |1 - faithfulness|
    refusal_kept: float | None


@dataclass(frozen=True)
class RandomControl:
    n: int
    size: int
    mean: float
    std: float
    max: float | None


@dataclass(frozen=True)
class MeanDifferenceLayer:
    layer: int
    norm: float
    addition_effect: float | None  # None: not measured at this layer
    ablation_effect: float | None


@dataclass(frozen=True)
class MeanDifferenceDirections:
    """circuit.json's mean_difference: see MeanDifference."""
    position: str
    best_layer: int
    per_layer: tuple[MeanDifferenceLayer, ...]


@dataclass(frozen=True)
class Knockout:
    """circuit.json's knockout_generation (pipeline.analysis.knockout)."""
    max_new_tokens: int
    n_pairs: int
    conditions: dict[str, str]  # condition -> what it patches
    refusal_rate: dict[str, float]  # condition -> share of the replies the judge calls a refusal
    examples: dict[str, list[str]]
    patched: str


@dataclass(frozen=True)
class Circuit:
    """circuit.json, typed. The sections no output reads field by field stay JSON dicts."""
    model: str | None
    method: dict
    n_pairs: int
    n_pairs_dropped_unequal_length: int
    n_search_pairs: int
    positions: tuple[Position, ...]
    n_layers: int
    n_heads: int
    candidates: int
    size: int
    fraction: float
    max_fraction: float
    within_max_fraction: bool
    faithfulness: float
    faithfulness_ci: tuple[float, float]
    cmd: float  # |1 - faithfulness|: the search keeps it <= 1 - target
    target_reached: bool  # cmd <= 1 - target
    faithfulness_held_out: dict | None  # n, faithfulness, ci on the pairs the search did not see
    refusal_kept: float
    transfer: TransferFaithfulness | None  # None: the run has no transfer pairs
    baselines: dict
    random_control: RandomControl
    per_category: dict
    stability: StabilitySummary
    nodes: tuple[CircuitNode, ...]
    pruned: tuple[str, ...]
    supernodes: tuple[Supernode, ...]
    supernode_edges: tuple[Edge, ...]
    edges: tuple[Edge, ...]
    edges_note: str | None
    pruning_curve: dict
    mib: dict
    attribution: dict
    scores: dict
    mean_difference: MeanDifferenceDirections
    forward_rows: int
    seconds: dict[str, float]
    provenance: dict = field(default_factory=dict)  # added by the circuit stage
    knockout: Knockout | None = None  # knockout_generation, added by the circuit stage


def read_circuit(path: str | Path) -> Circuit:
    return circuit_from_json(json.loads(Path(path).read_text()))


def circuit_from_json(data: dict) -> Circuit:
    """circuit.json's content (CircuitResult.to_json, with the circuit stage's additions) -> Circuit."""
    stability = data["stability"]
    direction = data["mean_difference"]
    knockout = data.get("knockout_generation")
    transfer = data["transfer"]
    return Circuit(
        **{name: data[name] for name in _PLAIN},
        positions=tuple(Position(p["name"], p["label"]) for p in data["positions"]),
        faithfulness_ci=tuple(data["faithfulness_ci"]),
        transfer=None if transfer is None else TransferFaithfulness(**(transfer | {"faithfulness_ci": None if transfer[
            "faithfulness_ci"] is None else tuple(transfer["faithfulness_ci"])})),
        random_control=RandomControl(**data["random_control"]),
        stability=stability_from_json(stability),
        nodes=tuple(CircuitNode(**(n | {"effect_ci": tuple(n["effect_ci"])})) for n in data["nodes"]),
        pruned=tuple(data["pruned"]),
        supernodes=tuple(Supernode(**(g | {"layers": tuple(g["layers"]), "members": tuple(g["members"])}))
                         for g in data["supernodes"]),
        supernode_edges=_edges(data["supernode_edges"]), edges=_edges(data["edges"]),
        mean_difference=MeanDifferenceDirections(direction["position"], direction["best_layer"],
                                                 tuple(MeanDifferenceLayer(**r) for r in direction["per_layer"])),
        provenance=data.get("provenance", {}),
        knockout=None if knockout is None else Knockout(**knockout),
    )


_PLAIN = ("model", "method", "n_pairs", "n_pairs_dropped_unequal_length", "n_search_pairs", "n_layers", "n_heads",
          "candidates", "size", "fraction", "max_fraction", "within_max_fraction", "faithfulness", "cmd",
          "target_reached", "faithfulness_held_out", "refusal_kept", "baselines", "per_category", "edges_note",
          "pruning_curve", "mib", "attribution", "scores", "forward_rows", "seconds")


def stability_from_json(data: dict) -> StabilitySummary:
    return StabilitySummary(
        **{k: data[k] for k in ("n_resamples", "core_threshold", "draw", "circuit_is_a_draw", "trusted_level",
                                "stable_jaccard",
                                "forward_rows", "method")},
        circuits=tuple(map(tuple, data["circuits"])), supernode_circuits=tuple(map(tuple, data["supernode_circuits"])),
        supernode_circuit=tuple(data["supernodes"]["circuit"]),
        faithfulness=tuple(data["faithfulness"]), nodes=_agreement(data), supernodes=_agreement(data["supernodes"]),
        frequent_outside=tuple((n["id"], n["frequency"]) for n in data["frequent_outside"]))


def _agreement(data: dict) -> Agreement:
    def spread(x):
        return None if x is None else Spread(**x)

    alone = data["core_faithfulness"]
    return Agreement(spread(data["jaccard"]["between_resamples"]), spread(data["jaccard"]["to_circuit"]),
                     spread(data["jaccard"]["between_searches"]),
                     tuple(data["sizes"]), data["size_median"],
                     None if data["size_range"] is None else tuple(data["size_range"]),
                     dict(data["inclusion_frequency"]), tuple(data["core"]), alone["value"],
                     None if alone["ci"] is None else tuple(alone["ci"]), alone["nodes"])


def _edges(rows: list[dict]) -> tuple[Edge, ...]:
    return tuple(Edge(r["from"], r["to"], r["effect"], r["drawn"]) for r in rows)
