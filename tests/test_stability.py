"""Stability: each resample re-runs the whole search on its own pairs, and the Jaccard it reports between
resampled circuits is the Jaccard between independent searches (new pairs, another circuit.seed), on a
planted circuit whose answer is known and on refusal-tiny."""
import numpy as np
import pytest
import torch

from pipeline.analysis.circuit.evaluator import Resample
from pipeline.analysis.circuit.method import draw_pairs, prune
from pipeline.analysis.circuit.result import CoreFaithfulness, agreement_json, jaccard
from pipeline.engine.circuits import Nodes

torch.set_num_threads(1)

N_NODES, TARGET = 12, 0.8


class PlantedCircuit:
    """A known answer: f(C) on pair p = the sum of the kept nodes' weights on p (full 1, empty 0). Node 0
    carries 0.45 of every pair; node 1 carries 0.7 of the pairs of kind A, node 2 0.7 of those of kind B;
    nodes 3-11 carry nothing. {0, 1} reaches the target 0.8 on pairs at least half of kind A, {0, 2} on
    pairs at least half of kind B, {0, 1, 2} on any: which circuit a search finds depends on the pairs it
    sees, and node 0 is in every one."""

    def __init__(self, kinds: np.ndarray):
        weights = np.zeros((N_NODES, len(kinds)))
        weights[0], weights[1, kinds == 0], weights[2, kinds == 1] = 0.45, 0.7, 0.7
        self.weights = torch.tensor(weights, dtype=torch.float32)  # [N, P]
        self.n_pairs = len(kinds)
        self.metric_full, self.metric_empty = torch.ones(self.n_pairs), torch.zeros(self.n_pairs)

    def metrics(self, nodes, masks, pairs=None):  # every pair (a resample reads the ones it drew)
        return masks.float() @ self.weights

    def without_each(self, nodes, members):
        masks = torch.zeros(len(members), N_NODES, dtype=torch.bool)
        masks[:, members] = True
        masks[torch.arange(len(members)), members] = False
        return self.metrics(nodes, masks)


def planted_search(kinds: np.ndarray, counts: np.ndarray) -> list[str]:
    """The search on pairs of `kinds`, each counted `counts` times: the first round ordered by the scores
    (1 - each node's mean weight, its exact single-node effect here), the second measured."""
    planted = PlantedCircuit(kinds)
    mean = (planted.weights.numpy() * counts).sum(1) / counts.sum()
    nodes = Nodes(*[torch.zeros(N_NODES, dtype=torch.long)] * 4)
    kept = prune(Resample(planted, counts), nodes, list(range(N_NODES)), TARGET, [dict(enumerate(1 - mean))],
                 max_rounds=2, describe=False)[0]
    return [str(i) for i in sorted(kept)]


def mean_jaccard(circuits: list[list[str]]) -> float:
    return float(np.mean([jaccard(a, b) for k, a in enumerate(circuits) for b in circuits[k + 1:]]))


def test_resampled_jaccard_on_a_planted_circuit_matches_independent_searches():
    """Searches on 12 pairs drawn afresh from the population (kinds A and B equally likely) find circuits
    that agree at Jaccard about 0.7; bootstrap resamples of one such draw, each searched in full on its
    own pairs, report the same within their spread. Node 0 is in every resampled circuit, nodes 1 and 2
    in some, the nodes that carry nothing in none."""
    n_pairs, population = 12, np.random.default_rng(0)
    independent = [planted_search(population.integers(0, 2, n_pairs), np.ones(n_pairs)) for _ in range(60)]
    kinds = np.array([0, 1] * (n_pairs // 2))  # one draw: as mixed as the population
    main = planted_search(kinds, np.ones(n_pairs))
    assert main == ["0", "1", "2"]
    rng = np.random.default_rng(1)
    resampled = [planted_search(kinds, np.bincount(draw_pairs(rng, n_pairs, n_pairs), minlength=n_pairs))
                 for _ in range(60)]
    reported = agreement_json(resampled, main, [], CoreFaithfulness([], None, None), circuit_is_a_draw=False)
    between, truth = reported["jaccard"]["between_resamples"], mean_jaccard(independent)
    assert 0.6 < truth < 0.98  # the circuit does vary between searches
    assert abs(between["mean"] - truth) <= between["std"], (between, truth)
    assert reported["inclusion_frequency"]["0"] == 1.0 and {"1", "2"} <= set(reported["inclusion_frequency"])
    assert not set(reported["inclusion_frequency"]) - {"0", "1", "2"}  # the nodes that carry nothing never


def test_fresh_draws_where_the_search_sees_a_sample_bootstrap_where_it_sees_every_pair():
    rng = np.random.default_rng(0)
    fresh = draw_pairs(rng, 35, 8)
    assert len(fresh) == len(set(fresh.tolist())) == 8 and fresh.max() < 35
    bootstrap = draw_pairs(rng, 24, 24)
    assert len(bootstrap) == 24 and len(set(bootstrap.tolist())) < 24


@pytest.fixture(scope="module")
def tiny_searches(tiny):
    """refusal-tiny: the circuit step with its stability (4 resamples) on one pair sample, and the search
    (scores, pruning) run independently on two other pair samples and under another circuit.seed."""
    from conftest import screened_pairs
    from pipeline.analysis.circuit.method import find_circuit, prepare, score_nodes, search_circuit
    from pipeline.analysis.circuit.progress import Progress
    from pipeline.analysis.circuit.result import node_id
    from pipeline.analysis.pairs import source_pairs
    from pipeline.schema import CircuitConfig, SummaryConfig

    model, tokenizer = tiny
    summary = SummaryConfig(n_bootstrap=50)

    def table(seed):
        return screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=24, seed=seed),
                              generate=False, refusal_tokens=["I"], compliance_tokens=["Sure"]).table

    def search(pairs, options):
        setup = prepare(model, pairs, options, "logit_diff")
        scores = score_nodes(model, setup, options, summary, "logit_diff", np.random.default_rng(options.seed),
                             Progress())
        found = search_circuit(setup.search, setup.nodes, scores.without_estimate(), options.target,
                               options.prune_rounds)
        return [node_id(setup.nodes, i, setup.names) for i in found.circuit]

    options = CircuitConfig(n_random=2, n_resamples=4, edges=False)
    result = find_circuit(model, table(0), options, summary, "logit_diff", "refusal-tiny").to_json()
    others = [search(table(1), options), search(table(2), options),
              search(table(0), CircuitConfig(seed=1, verify_all_rows=0, verify_top=16, verify_random=8))]
    return result, others


def test_refusal_tiny_reported_jaccard_matches_independent_searches(tiny_searches):
    result, others = tiny_searches
    stability = result["stability"]
    assert stability["n_resamples"] == 4 and len(stability["circuits"]) == 4
    assert stability["draw"].startswith("a bootstrap resample of the search's") and not stability["circuit_is_a_draw"]
    independent = [[n["id"] for n in result["nodes"]], *others]
    between = stability["jaccard"]["between_searches"]
    assert between == stability["jaccard"]["between_resamples"]  # the circuit saw every pair: not one of the draws
    truth = [jaccard(a, b) for k, a in enumerate(independent) for b in independent[k + 1:]]
    assert abs(between["mean"] - np.mean(truth)) <= max(between["std"], np.std(truth), 0.05), (between, truth)
    supernodes = stability["supernodes"]
    assert supernodes["jaccard"]["between_searches"]["mean"] >= between["mean"]  # coarser keys agree more


def test_stability_reports_circuits_frequencies_and_the_core_alone(tiny_searches):
    """circuit.json's stability: the resampled circuits as node ids and as supernode keys (what `patchsweep
    compare` reads), each node's inclusion frequency counted from them, the core measured alone on every
    pair with its interval, and the level a reader can trust, read back typed."""
    from pipeline.analysis.circuit.result import circuit_from_json

    result, _ = tiny_searches
    stability = result["stability"]
    circuits, supernode_circuits = stability["circuits"], stability["supernode_circuits"]
    ids = set(result["scores"]["id"])
    assert all(set(c) <= ids for c in circuits)
    assert [len(c) for c in circuits] == stability["sizes"]
    for circuit, keys in zip(circuits, supernode_circuits):
        assert keys == sorted({node.split(".")[0] + (".MLP@" if ".MLP@" in node else ".heads@") + node.split("@")[1]
                               for node in circuit})
    for node in result["nodes"]:
        share = sum(node["id"] in c for c in circuits) / len(circuits)
        assert node["inclusion_frequency"] == pytest.approx(share)
        assert node["core"] == (share >= stability["core_threshold"])
    assert stability["core"] == [n["id"] for n in result["nodes"] if n["core"]]
    alone = stability["core_faithfulness"]
    if stability["core"]:
        assert alone["ci"][0] <= alone["value"] <= alone["ci"][1] and alone["nodes"] == stability["core_size"]
    assert stability["trusted_level"] in ("nodes", "supernodes", None)
    read = circuit_from_json(result).stability
    assert read.circuits == tuple(map(tuple, circuits)) and read.core == tuple(stability["core"])
    assert read.nodes.jaccard_between.mean == stability["jaccard"]["between_resamples"]["mean"]
    assert read.supernodes.core == tuple(stability["supernodes"]["core"])


def test_where_the_search_sees_a_sample_each_resample_searches_a_fresh_sample(tiny):
    """The default run's case (circuit.search_pairs below the pairs): each resample is a search on another
    sample of that size, as another circuit.seed would draw, so the circuit counts among the independent
    searches the Jaccard is taken over."""
    from conftest import screened_pairs
    from pipeline.analysis.circuit.method import find_circuit
    from pipeline.analysis.pairs import source_pairs
    from pipeline.schema import CircuitConfig, SummaryConfig

    model, tokenizer = tiny
    table = screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=16, seed=3), generate=False,
                           refusal_tokens=["I"], compliance_tokens=["Sure"]).table
    options = CircuitConfig(search_pairs=6, n_resamples=2, n_random=2, edges=False)
    stability = find_circuit(model, table, options, SummaryConfig(n_bootstrap=50), "logit_diff",
                             "refusal-tiny").to_json()["stability"]
    assert stability["draw"].startswith("a fresh draw of 6 of the") and stability["circuit_is_a_draw"]
    jaccard = stability["jaccard"]
    assert jaccard["between_resamples"]["n"] == 1 and jaccard["to_circuit"]["n"] == 2
    assert jaccard["between_searches"]["n"] == 3  # the circuit and the two resamples, every two of them
    assert stability["forward_rows"] > 0 and min(stability["faithfulness"]) >= 0.8
