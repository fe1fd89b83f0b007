"""Circuits: masked patching and path patching against their plain references, path patching on a model
whose wiring is known, faithfulness bounds, bootstrap coverage, and the whole circuit step on refusal-tiny."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import ARCHITECTURES, random_pairs
from conftest import random_model as tiny_model
from pipeline.analysis.circuit.evaluator import Evaluator, subset_masks
from pipeline.analysis.positions import PairGroup
from pipeline.engine.adapters import UnsupportedArchitecture, get_adapter
from pipeline.engine.circuits import CircuitRunner, Nodes, _dense_keep, faithfulness, path_patch
from pipeline.engine.directions import ablate_direction_metrics, add_direction_metrics
from pipeline.engine.metrics import Answers
from pipeline.engine.reference import reference_circuit_metrics, reference_path_patch

torch.set_num_threads(1)


def pairs(n_pairs=3, seq_len=7, seed=1):
    """Minimal pairs differing at positions 2 and 4, with classes: 2 -> 0, 3-4 -> 1, 5 -> 2, 6 -> 3; 0-1 none."""
    clean, corrupted, answers = random_pairs(n_pairs, seq_len, seed)
    classes = torch.full((n_pairs, seq_len), -1)
    classes[:, 2], classes[:, 3:5], classes[:, 5], classes[:, 6] = 0, 1, 2, 3
    return clean, corrupted, answers, classes


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_masked_circuits_match_the_hook_per_node_reference(model_type):
    """Many circuits packed into one batch (rows split across batches) equal one full forward per pair and
    circuit with one hook per node; the full circuit is the clean run (f = 1), the empty one the corrupted (f = 0).
    The circuits include ones whose lower layers are all kept (start from the clean run's residual) or all
    patched (start from the corrupted run's plus the embedding difference), mixed within batches."""
    model = tiny_model(model_type)
    clean, corrupted, answers, classes = pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])  # 20 nodes per layer
    masks = torch.rand(9, len(nodes), generator=torch.Generator().manual_seed(2)) < 0.5
    masks[0], masks[1] = True, False
    masks[5], masks[6] = True, True
    masks[5, 47], masks[6, 22] = False, False  # one node removed at layer 2 / layer 1: start there from clean
    masks[7, :40], masks[8, :20] = False, False  # nothing kept below layer 2 / layer 1: start from corrupted
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4, max_batch_rows=4)
    keep_head, keep_mlp = _dense_keep(nodes, masks, 3, 4, 4)
    start, from_base = runner._start_layers(keep_head, keep_mlp)
    assert start[5:].tolist() == [2, 1, 2, 1] and from_base[5:].tolist() == [True, True, False, False]
    assert runner.first == 2  # rows start at the first differing token, attending to the cached prefix
    fast = runner.metrics(nodes, masks)
    reference = reference_circuit_metrics(model, clean, corrupted, answers, classes, nodes, masks)
    torch.testing.assert_close(fast, reference, atol=2e-5, rtol=1e-5)
    f = faithfulness(fast, runner.metric_full, runner.metric_empty)
    assert abs(float(f[0]) - 1) < 1e-5 and abs(float(f[1])) < 1e-5
    torch.testing.assert_close(fast[0], runner.metric_full, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(fast[1], runner.metric_empty, atol=2e-5, rtol=1e-5)
    # Float masks interpolate: all-ones and all-zeros as floats equal the bool circuits.
    torch.testing.assert_close(runner.metrics(nodes, masks[:2].float()), fast[:2], atol=2e-5, rtol=1e-5)
    # Some of the pairs, in any order (a bootstrap resample computes the pairs it drew).
    some = torch.tensor([2, 0])
    torch.testing.assert_close(runner.metrics(nodes, masks, some), fast[:, some], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_path_patching_matches_the_freeze_everything_reference(model_type):
    """Adding the sender's output difference at the receiver's input norm (one layer, then layer skip)
    equals the classic two-pass path patching that freezes every other head and MLP, for heads, MLPs and
    the token embeddings as senders, heads and MLPs and the logits as receivers."""
    model = tiny_model(model_type)
    clean, corrupted, answers, classes = pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])  # per layer: 16 heads, then 4 MLPs
    senders = Nodes.concat([Nodes.embeddings([0]), nodes.select([0, 5, 16, 21, 26, 36])])
    receivers = nodes.select([23, 27, 38, 40, 59, 44])
    fast = path_patch(model, clean, corrupted, answers, classes, senders, receivers, max_batch_rows=5).metric_path
    reference = reference_path_patch(model, clean, corrupted, answers, classes, senders, receivers)
    assert torch.equal(fast.isnan(), reference.isnan())  # the same paths exist (receivers after senders)
    assert (~fast.isnan()).sum() > 30
    torch.testing.assert_close(fast.nan_to_num(0), reference.nan_to_num(0), atol=2e-5, rtol=1e-5)


def hand_built_model():
    """A 3-layer, 2-head Llama whose wiring is set by hand. Head A = L0.H0 copies "token 1 is present"
    into dimension 8; head B = L1.H1 reads dimension 8 and writes dimension 9, which the refusal answer
    (token 3) reads. Distractors: L1.H0 reads token 2 into dimension 10 (the compliance answer, token 4),
    L2.H0 reads dimension 9 into dimension 11, which nothing reads. Every other head and every MLP
    writes nothing. Queries and keys are zero, so each head averages the positions up to its own. A large
    constant dimension keeps every RMS normalisation nearly fixed, so nothing else couples."""
    config = LlamaConfig(vocab_size=8, hidden_size=16, intermediate_size=8, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=2, head_dim=4, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=0,
                         pad_token_id=0, tie_word_embeddings=False)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1.0)
            layer.post_attention_layernorm.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        embed = model.model.embed_tokens.weight
        embed[torch.arange(8), torch.arange(8)] = 1.0
        embed[:, 15] = 100.0

        def wire(layer, head, read, write):
            attention = model.model.layers[layer].self_attn
            attention.v_proj.weight[head * 4, read] = 1.0
            attention.o_proj.weight[write, head * 4] = 50.0

        wire(0, 0, 1, 8)  # A
        wire(1, 1, 8, 9)  # B
        wire(1, 0, 2, 10)
        wire(2, 0, 9, 11)
        model.lm_head.weight[3, 9] = 25.0
        model.lm_head.weight[4, 10] = 25.0
    return model


def test_path_patching_recovers_hand_built_wiring():
    model = hand_built_model()
    clean = torch.tensor([[0, 2, 1, 6, 7, 6], [0, 1, 2, 6, 6, 7]])  # token 1 present: refuses
    corrupted = clean.clone()
    corrupted[0, 2], corrupted[1, 1] = 5, 5  # the harmless twins
    answers = Answers(torch.tensor([[3], [3]]), torch.tensor([[4], [4]]))
    classes = torch.zeros_like(clean)  # one class: every position
    nodes = Nodes.grid(get_adapter(model), [0])  # L0.H0 L0.H1 L0.MLP L1.H0 L1.H1 L1.MLP L2.H0 L2.H1 L2.MLP
    names = ["L0.H0", "L0.H1", "L0.MLP", "L1.H0", "L1.H1", "L1.MLP", "L2.H0", "L2.H1", "L2.MLP"]
    senders = Nodes.concat([Nodes.embeddings([0]), nodes])
    result = path_patch(model, clean, corrupted, answers, classes, senders, nodes)
    assert (result.metric_base > 0).all() and (result.metric_source < 0).all()
    effects = result.effects().mean(-1)  # [sender, receiver + logits]
    expected = {("tokens", "L0.H0"): 1.0, ("L0.H0", "L1.H1"): 1.0, ("L1.H1", "logits"): 1.0}
    for s, sender in enumerate(["tokens"] + names):
        for r, receiver in enumerate(names + ["logits"]):
            if torch.isnan(effects[s, r]):
                continue
            expected_effect = expected.get((sender, receiver), 0.0)
            assert float(effects[s, r]) == pytest.approx(expected_effect, abs=0.01), (sender, receiver)
    # The circuit {A, B} is the whole mechanism; either alone carries nothing.
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 1)
    masks = torch.zeros(3, len(nodes), dtype=torch.bool)
    masks[0, [0, 4]], masks[1, 0], masks[2, 4] = True, True, True
    f = faithfulness(runner.metrics(nodes, masks), runner.metric_full, runner.metric_empty)
    torch.testing.assert_close(f, torch.tensor([1.0, 0.0, 0.0]), atol=0.01, rtol=0)


def test_path_patching_refuses_non_additive_architectures():
    model = tiny_model("llama")
    model.config.model_type = "gemma2"  # stands for any family that normalises sublayer outputs
    clean, corrupted, answers, classes = pairs()
    nodes = Nodes.grid(get_adapter(model), [0])
    with pytest.raises(UnsupportedArchitecture, match="residual stream"):
        path_patch(model, clean, corrupted, answers, classes, nodes.select([0]), nodes.select([10]))


def test_circuit_masks_reject_embedding_nodes_and_bad_classes():
    model = tiny_model("llama")
    clean, corrupted, answers, classes = pairs()
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4)
    with pytest.raises(ValueError, match="inputs"):
        runner.metrics(Nodes.embeddings([0]), torch.ones(1, 1, dtype=torch.bool))
    with pytest.raises(ValueError, match="node classes"):
        runner.metrics(Nodes.grid(get_adapter(model), [4]), torch.ones(1, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match="answer-token metric"):
        CircuitRunner(model, clean, corrupted, answers, classes, 4, metric="kl")


def test_direction_ablation_and_addition():
    """Projecting the unembedding's refusal-minus-compliance direction out of the stream leaves a
    logit difference of exactly 0 (the final norm only rescales); adding a vector at a layer equals a
    plain forward with a hook adding it there."""
    model = tiny_model("llama")
    clean, corrupted, answers, _ = pairs()
    answers = Answers(answers.refusal[:, :1], answers.compliance[:, :1])
    weight = model.lm_head.weight
    readout = weight[answers.refusal[:, 0]] - weight[answers.compliance[:, 0]]  # [P, d]
    for p in range(len(clean)):
        ablated = ablate_direction_metrics(model, clean[p:p + 1], answers.index(torch.tensor([p])), readout[p:p + 1])
        assert abs(float(ablated[0, 0])) < 1e-4
    vector = torch.randn(1, 32, generator=torch.Generator().manual_seed(3))
    added = add_direction_metrics(model, corrupted, answers, vector, [1])
    handle = model.model.layers[1].register_forward_pre_hook(
        lambda m, a, k: ((a[0] + vector,) + a[1:], k) if a else
        (a, {**k, "hidden_states": k["hidden_states"] + vector}),
        with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(input_ids=corrupted, use_cache=False).logits[:, -1]
    finally:
        handle.remove()
    expected = logits.gather(1, answers.refusal) - logits.gather(1, answers.compliance)
    torch.testing.assert_close(added[0], expected[:, 0], atol=1e-4, rtol=1e-4)


def test_bootstrap_intervals_cover_the_true_mean_at_the_nominal_rate():
    """aggregate.summarise's 95% percentile-bootstrap intervals over pairs, on 400 synthetic sites whose
    true mean is known, cover it about 95% of the time; so does the circuit step's ratio interval."""
    from pipeline.analysis.statistics import bootstrap_ratio_ci, summarise

    rng = np.random.default_rng(0)
    n_sites, n_pairs, true_mean = 400, 60, 0.3
    values = rng.normal(true_mean, 1.0, size=(n_sites, n_pairs))
    effects = pd.DataFrame({
        "model": "m", "direction": "denoise", "component": "head", "layer": np.repeat(np.arange(n_sites), n_pairs),
        "head": pd.array(np.zeros(n_sites * n_pairs, dtype=int), dtype="Int32"),
        "position": pd.array([None] * (n_sites * n_pairs), dtype="Int32"),
        "pair_id": np.tile(np.arange(n_pairs), n_sites), "effect": values.reshape(-1),
    })
    summary = summarise(effects, n_bootstrap=1000, ci=0.95, seed=1)
    covered = ((summary["ci_low"] <= true_mean) & (true_mean <= summary["ci_high"])).mean()
    assert 0.91 <= covered <= 0.98, covered
    hits = 0
    for _ in range(200):  # ratio of means, as faithfulness: numerator ~ 0.8 x denominator
        denominator = rng.normal(2.0, 0.5, n_pairs)
        numerator = 0.8 * denominator + rng.normal(0, 0.3, n_pairs)
        low, high = bootstrap_ratio_ci(numerator, denominator, 1000, 0.95, rng)
        hits += low <= 0.8 <= high
    assert 0.90 <= hits / 200 <= 0.99, hits


def pairs_table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows)


def test_position_classes_line_up_pairs_of_different_lengths():
    from pipeline.analysis.positions import position_classes

    table = pairs_table([
        # prefix 0-3, instruction 4-8 (harmful word at 5), template 9-10
        {"seq_len": 11, "instruction_end": 9, "harmful_positions": [5],
         "clean_tokens": ["s"] * 9 + ["<|end|>", "<|assistant|>"]},
        # a longer instruction with a two-token harmful span
        {"seq_len": 14, "instruction_end": 12, "harmful_positions": [6, 8],
         "clean_tokens": ["s"] * 12 + ["<|end|>", "<|assistant|>"]},
    ])
    names, labels, maps = position_classes(table)
    assert names == ["harm", "after", "end-2", "end-1"]
    assert labels[2:] == ["<|end|>", "<|assistant|>"]
    assert maps[0] == [-1] * 5 + [0, 1, 1, 1, 2, 3]
    assert maps[1] == [-1] * 6 + [0, 1, 0, 1, 1, 1, 2, 3]


def test_flip_fractions_and_category_means():
    from pipeline.analysis.statistics import category_means, flip_fractions

    effects = pd.DataFrame({
        "model": "m", "direction": ["denoise"] * 4 + ["noise"] * 4, "component": "mlp_out", "layer": 0,
        "head": pd.array([None] * 8, dtype="Int32"), "position": pd.array([None] * 8, dtype="Int32"),
        "pair_id": [0, 1, 2, 3] * 2,
        "metric_clean": [2.0] * 8, "metric_corrupted": [-2.0] * 8,
        "metric_patched": [1.0, -1.0, 0.5, -3.0, -1.0, 1.0, 1.5, 2.0],
        "effect": [0.75, 0.25, 0.625, -0.25, 0.75, 0.25, 0.125, 0.0],
    })
    flips = flip_fractions(effects).set_index("direction")["flip_fraction"]
    assert flips["denoise"] == 0.5  # harmless runs that now refuse: pairs 0 and 2
    assert flips["noise"] == 0.25  # harmful runs that now comply: pair 0
    categories = pa.table({"pair_id": [0, 1, 2, 3], "category": ["a", "a", "b", "b"]})
    means = category_means(effects, categories)
    row = means[(means["direction"] == "denoise") & (means["category"] == "a")].iloc[0]
    assert row["mean"] == pytest.approx(0.5) and row["n"] == 2


class AdditiveFaithfulness:
    """A stand-in for the Evaluator with a known answer: f(C) = sum of the nodes' weights."""

    def __init__(self, weights):
        self.weights = torch.tensor(weights)

    def faithfulness(self, nodes, masks):
        return (masks.float() * self.weights).sum(1)

    def faithfulness_without_each(self, nodes, members):
        return np.array([float(self.weights[members].sum() - self.weights[m]) for m in members])


def test_pruning_from_every_node_keeps_what_the_target_needs():
    """Round one in the scores' order removes the nodes that carry nothing; a measured round then drops node
    11 (0.04, which the scores overrate): the target does not need it. Without measured rounds it stays."""
    from pipeline.analysis.circuit.method import prune

    weights = [0.0] * 60
    weights[7], weights[3], weights[50], weights[11] = 0.5, 0.25, 0.1, 0.04  # 0.89 in all
    evaluator = AdditiveFaithfulness(weights)
    nodes = Nodes(*[torch.zeros(60, dtype=torch.long)] * 4)  # only their number matters here
    estimate = {i: 0.89 - w for i, w in enumerate(weights)} | {11: 0.5}  # the scores overrate node 11
    kept, removed, f_without, measured, curve = prune(evaluator, nodes, list(range(60)), 0.8, [estimate])
    assert sorted(kept) == [3, 7, 50] and len(removed) == 57
    assert f_without.tolist() == pytest.approx([0.85 - weights[i] for i in kept])
    assert measured[0][11] == pytest.approx(0.89 - 0.04)  # the first measured round: the 4 nodes round one kept
    assert curve[3] == pytest.approx(0.85) and curve[4] == pytest.approx(0.89)
    kept, _, f_without, measured, _ = prune(evaluator, nodes, list(range(60)), 0.8, [estimate], measure=False)
    assert sorted(kept) == [3, 7, 11, 50] and len(f_without) == 0 and measured == []


def test_an_overshooting_circuit_keeps_shrinking_until_it_is_within_the_target():
    """Node 2 holds refusal back: the circuit {0, 1, 3} overshoots (f = 1.5). Removing node 3 would raise f
    further (1.3, above 2 - target): it ranks last, and node 1 goes (f = 0.9, CMD within 0.25). A one-sided
    rule ranks node 3 first and stops at {0, 1} (f = 1.3), whose every removal falls below the target."""
    from pipeline.analysis.circuit.method import prune, within_target

    weights = [0.7, 0.6, -0.5, 0.2] + [0.0] * 6
    evaluator = AdditiveFaithfulness(weights)
    nodes = Nodes(*[torch.zeros(10, dtype=torch.long)] * 4)
    kept, removed, f_without, measured, curve = prune(evaluator, nodes, [0, 1, 3], 0.75, [])
    assert sorted(kept) == [0, 3] and removed == [1]
    assert float(evaluator.faithfulness(nodes, subset_masks(10, [kept]))[0]) == pytest.approx(0.9)
    assert measured[0] == pytest.approx({0: 0.8, 1: 0.9, 3: 1.3})
    assert curve[1] == pytest.approx(0.2) and curve[2] == pytest.approx(0.9)  # k = 2 tried first, then k = 1
    assert within_target(0.9, 0.75) and not within_target(1.3, 0.75) and not within_target(0.7, 0.75)


def test_the_search_on_refusal_tiny_passes_overshooting_circuits_by(tiny):
    """On refusal-tiny at target 0.9993 (CMD <= 0.0007) pruning measures circuits above the full model by
    more than the bound, each smaller than the one it keeps and each at the target from below: a one-sided
    rule could stop at one of them. The search does not: the circuit it keeps is within the bound."""
    from conftest import screened_pairs
    from pipeline.analysis.circuit.method import prepare, score_nodes, search_circuit, within_target
    from pipeline.analysis.circuit.progress import Progress
    from pipeline.analysis.pairs import source_pairs
    from pipeline.schema import CircuitConfig, SummaryConfig

    model, tokenizer = tiny
    table = screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=24, seed=0), generate=False,
                           refusal_tokens=["I"], compliance_tokens=["Sure"]).table
    options, target = CircuitConfig(), 0.9993
    setup = prepare(model, table, options, "logit_diff")
    scores = score_nodes(model, setup, options, SummaryConfig(n_bootstrap=50), "logit_diff",
                         np.random.default_rng(0), Progress())
    search = search_circuit(setup.search, setup.nodes, scores.without_estimate(), target)
    overshooting = {size: f for size, f in search.curve.items() if f > 2 - target}
    assert any(size < len(search.circuit) for size in overshooting)
    assert bool(within_target(search.f, target)) and search.curve[len(search.circuit)] == pytest.approx(search.f)
    assert len(search.circuit) < 0.5 * len(setup.nodes)


@pytest.fixture(scope="module")
def tiny_circuit(tiny, tmp_path_factory):
    """The whole circuit step on refusal-tiny (screened pairs, first-token answers), rendered."""
    from conftest import screened_pairs
    from pipeline.analysis.circuit.method import find_circuit
    from pipeline.analysis.circuit.result import circuit_from_json
    from pipeline.analysis.pairs import source_pairs
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve
    from pipeline.outputs.diagram import render_circuit
    from pipeline.schema import CircuitConfig, SummaryConfig

    model, tokenizer = load_model(resolve("refusal-tiny"))
    table = screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=24, seed=0), generate=False,
                           refusal_tokens=["I"], compliance_tokens=["Sure"]).table
    circuit = find_circuit(model, table, CircuitConfig(n_random=16), SummaryConfig(n_bootstrap=200), "logit_diff",
                           "refusal-tiny").to_json()
    out = tmp_path_factory.mktemp("circuit")
    paths = render_circuit(circuit_from_json(json.loads(json.dumps(circuit))), out)
    return circuit, paths


def test_refusal_tiny_circuit_is_small_faithful_and_beats_random(tiny_circuit):
    circuit, _ = tiny_circuit
    assert circuit["n_pairs"] >= 15
    assert circuit["size"] <= 0.1 * circuit["candidates"]
    assert circuit["faithfulness"] >= 0.8 and circuit["faithfulness_ci"][0] <= circuit["faithfulness"]
    assert circuit["random_control"]["mean"] <= 0.2
    baselines = circuit["baselines"]
    assert baselines["metric_empty_measured"] == pytest.approx(baselines["metric_empty"], abs=1e-4)
    curve = dict(zip(circuit["pruning_curve"]["size"], circuit["pruning_curve"]["faithfulness"]))
    assert curve[circuit["size"]] == pytest.approx(circuit["faithfulness"], abs=1e-6)  # pruning measured it
    assert circuit["mib"]["size"][-1] == circuit["candidates"]
    assert circuit["mib"]["faithfulness_signed"][-1] == pytest.approx(1.0, abs=1e-4)  # every node: the model
    assert 0 <= circuit["mib"]["cmd"] <= 1 and circuit["mib"]["cpr"] > 0.5
    assert circuit["attribution"]["spearman"] > 0.5 and circuit["attribution"]["exhaustive"]
    assert len(circuit["scores"]["exact"]) == circuit["candidates"] and None not in circuit["scores"]["exact"]
    direction = circuit["mean_difference"]
    best = next(r for r in direction["per_layer"] if r["layer"] == direction["best_layer"])
    # removing it lowers refusal, adding it causes it
    assert best["ablation_effect"] > 0.1 and best["addition_effect"] > 0.5
    groups = circuit["supernodes"]
    assert sorted(m for g in groups for m in g["members"]) == sorted(n["id"] for n in circuit["nodes"])
    assert all(len({node["position"] for node in circuit["nodes"] if node["id"] in g["members"]}) == 1
               for g in groups)
    group_ids = {g["id"] for g in groups}
    assert all(e["from"] in group_ids | {"EMB@harm"} and e["to"] in group_ids | {"logits"}
               for e in circuit["supernode_edges"])
    assert any(e["to"] == "logits" for e in circuit["supernode_edges"])
    stability = circuit["stability"]
    assert stability["n_resamples"] == 8 and len(stability["circuits"]) == 8
    assert all(0 <= n["inclusion_frequency"] <= 1 and n["core"] == (n["inclusion_frequency"] >= 0.8)
               for n in circuit["nodes"])
    assert stability["core"] == [n["id"] for n in circuit["nodes"] if n["core"]] and stability["core_size"] >= 1
    assert min(stability["faithfulness"]) >= 0.8  # every resample's circuit reaches the target on its resample
    ids = {n["id"] for n in circuit["nodes"]}
    assert all(e["from"] in ids | {"EMB@harm"} and e["to"] in ids | {"logits"} for e in circuit["edges"])
    assert any(e["to"] == "logits" and e["drawn"] for e in circuit["edges"])


def test_transfer_faithfulness_is_the_circuit_on_the_transfer_pairs(tiny, tmp_path):
    """The circuit found on refusal-tiny's study pairs, measured on its transfer pairs (the grammar's other
    split): circuit.json's transfer faithfulness equals the hook-per-node reference on those pairs (each
    length group's full, empty and circuit runs), its classes named as the study's."""
    from pipeline.analysis.circuit.method import TransferPairs, find_circuit
    from pipeline.analysis.circuit.result import circuit_from_json
    from pipeline.analysis.pairs import padded
    from pipeline.analysis.positions import position_classes
    from pipeline.outputs.files import RunFolder
    from pipeline.schema import CircuitConfig, PromptsConfig, SummaryConfig
    from pipeline.stages.pairs import run_in_process
    from pipeline.store import read_table

    model, tokenizer = tiny
    study, _ = run_in_process(model, tokenizer, "refusal-tiny", PromptsConfig(n_pairs=24), tmp_path)
    transfer = read_table(RunFolder(tmp_path).transfer_pairs)
    result = find_circuit(model, study, CircuitConfig(n_random=2, n_resamples=2, edges=False),
                          SummaryConfig(n_bootstrap=200), "logit_diff", "refusal-tiny",
                          transfer=TransferPairs(transfer, "the grammar's other split"))
    written = result.to_json()["transfer"]
    assert written["source"] == "the grammar's other split" and written["n_pairs"] == transfer.num_rows >= 16
    names, nodes = result.setup.names, result.setup.nodes
    own, _, maps = position_classes(transfer)
    masks = torch.zeros(3, len(nodes), dtype=torch.bool)
    masks[0], masks[2, result.search.circuit] = True, True  # full, empty, the circuit
    metrics = []
    for length in sorted(set(transfer.column("seq_len").to_pylist())):
        rows = [i for i, t in enumerate(transfer.column("seq_len").to_pylist()) if t == length]
        part = transfer.take(pa.array(rows))
        classes = torch.tensor([[names.index(own[c]) if c >= 0 and own[c] in names else -1 for c in maps[i]]
                                for i in rows])
        answers = Answers(padded(part.column("refusal_ids").to_pylist()),
                          padded(part.column("compliance_ids").to_pylist()))
        metrics.append(reference_circuit_metrics(model, torch.tensor(part.column("clean_ids").to_pylist()),
                                                 torch.tensor(part.column("corrupted_ids").to_pylist()), answers,
                                                 classes, nodes, masks))
    full, empty, circuit = torch.cat(metrics, dim=1)
    expected = float((circuit - empty).mean() / (full - empty).mean())
    assert written["faithfulness"] == pytest.approx(expected, abs=1e-4)
    assert written["faithfulness_ci"][0] <= written["faithfulness"] <= written["faithfulness_ci"][1]
    assert written["cmd"] == pytest.approx(abs(1 - expected), abs=1e-4)
    typed = circuit_from_json(json.loads(json.dumps(result.to_json())))
    assert typed.transfer.faithfulness == written["faithfulness"] and typed.cmd == abs(1 - typed.faithfulness)


def test_circuit_json_reads_back_typed(tiny_circuit):
    """circuit.json's content read back as a Circuit: every phase ran in PHASES' order, and the typed nodes,
    edges, supernodes, stability and mean difference hold the written values."""
    from pipeline.analysis.circuit.method import PHASES
    from pipeline.analysis.circuit.result import circuit_from_json

    circuit, _ = tiny_circuit
    typed = circuit_from_json(json.loads(json.dumps(circuit)))
    assert list(circuit["seconds"]) == list(PHASES) == list(typed.seconds)
    assert [n.id for n in typed.nodes] == [n["id"] for n in circuit["nodes"]]
    assert [(n.core, n.mean_difference_projection) for n in typed.nodes] == [
        (n["core"], n["mean_difference_projection"]) for n in circuit["nodes"]]
    assert [(e.sender, e.receiver, e.effect) for e in typed.edges] == [(e["from"], e["to"], e["effect"])
                                                                       for e in circuit["edges"]]
    assert [g.members for g in typed.supernodes] == [tuple(g["members"]) for g in circuit["supernodes"]]
    assert typed.stability.core == tuple(circuit["stability"]["core"]) and typed.faithfulness == circuit["faithfulness"]
    assert typed.mean_difference.best_layer == circuit["mean_difference"]["best_layer"]
    assert len(typed.mean_difference.per_layer) == typed.n_layers + 1 and typed.knockout is None


def test_circuit_diagram_files(tiny_circuit):
    """The supernode figure (circuit.svg/png), the node figure (circuit_nodes.svg/png) and the DOT export,
    with a cluster per supernode and an arrow per drawn node edge."""
    circuit, paths = tiny_circuit
    for stem in ("circuit", "circuit_nodes"):
        svg = paths[f"{stem}.svg"].read_text()
        assert svg.lstrip().startswith("<?xml") and "refusal" in svg
        assert paths[f"{stem}.png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert all(group["id"] in paths["circuit.svg"].read_text() for group in circuit["supernodes"])
    dot = paths["circuit.dot"].read_text()
    assert dot.count("subgraph cluster_") == len(circuit["supernodes"])
    assert dot.startswith("digraph circuit") and all(f'"{n["id"]}"' in dot for n in circuit["nodes"])
    assert sum("->" in line for line in dot.splitlines()) == sum(e["drawn"] for e in circuit["edges"])


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_single_node_verification_matches_the_hook_per_node_reference(model_type):
    """Every node alone patched (a row per node and pair, from its layer and its class's first position,
    batches cut small so that rows of many layers and positions are split) equals one full forward per
    pair and node with one hook per node; a class a pair lacks leaves that pair's base metric."""
    model = tiny_model(model_type)
    clean, corrupted, answers, classes = pairs()
    classes[0, 5] = 3  # pair 0 has no position of class 2
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4, max_batch_rows=5)
    fast = runner.single_node_metrics(nodes)
    masks = ~torch.eye(len(nodes), dtype=torch.bool)
    reference = reference_circuit_metrics(model, clean, corrupted, answers, classes, nodes, masks)
    torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)
    absent = (nodes.cls == 2).nonzero().squeeze(1)
    assert torch.equal(fast[absent, 0], runner.metric_full[0].expand(len(absent)))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_circuit_without_each_member_matches_the_hook_per_node_reference(model_type):
    """A circuit without each of its members, computed from the circuit's own recorded run (rows from the
    member's layer and class, batches cut small), equals the reference on the same masks: for a sparse
    circuit (its run starts from the corrupted residual) and one keeping every node of layer 0 (members
    below its start layer, whose rows start from the clean run)."""
    model = tiny_model(model_type)
    clean, corrupted, answers, classes = pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])  # 20 nodes per layer
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4, max_batch_rows=5)
    sparse = torch.rand(len(nodes), generator=torch.Generator().manual_seed(4)) < 0.3
    sparse[:20] = False  # nothing kept at layer 0
    sparse[[25, 47, 59]] = True  # a head at layer 1, an MLP at layer 2 and the final position's MLP at the last layer
    low = sparse.clone()
    low[:20] = True
    for circuit in (sparse, low):
        members = circuit.nonzero().squeeze(1)
        masks = circuit.expand(len(members), -1).clone()
        masks[torch.arange(len(members)), members] = False
        fast = runner.without_each(nodes, circuit)
        reference = reference_circuit_metrics(model, clean, corrupted, answers, classes, nodes, masks)
        torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_group_path_patching_matches_the_freeze_everything_reference(model_type):
    """Groups as senders and receivers (members at several layers, classes and kinds; the embeddings in a
    group; a receiver group whose members have no sender before them for some groups) equal the classic
    two passes per receiver member, batches cut small."""
    from pipeline.engine.circuits import group_path_patch
    from pipeline.engine.reference import reference_group_path_patch

    model = tiny_model(model_type)
    clean, corrupted, answers, classes = pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])  # per layer: 16 heads, then 4 MLPs
    senders = [Nodes.concat([Nodes.embeddings([0]), nodes.select([16])]), nodes.select([0, 5, 21]),
               nodes.select([26, 36])]
    receivers = [nodes.select([23, 27]), nodes.select([38, 40, 59]), nodes.select([44])]
    fast = group_path_patch(model, clean, corrupted, answers, classes, senders, receivers, max_batch_rows=4).metric_path
    reference = reference_group_path_patch(model, clean, corrupted, answers, classes, senders, receivers)
    assert torch.equal(fast.isnan(), reference.isnan()) and (~fast.isnan()).sum() >= 20
    torch.testing.assert_close(fast.nan_to_num(0), reference.nan_to_num(0), atol=2e-5, rtol=1e-5)


def test_progress_reports_phases_and_the_driver_draws_them(tmp_path):
    """The circuit step's Progress: phase, steps of a known total, rows, time left; follow_progress draws
    the state the actor writes and removes the file after."""
    import io
    import time

    from pipeline.analysis.circuit.method import PHASES
    from pipeline.analysis.circuit.progress import Progress
    from pipeline.outputs.files import RunFolder
    from pipeline.stages.circuit import follow_progress
    from pipeline.store import publish_json

    states = []
    progress = Progress(states.append)
    progress.plan(PHASES)
    with progress.phase("caches"):
        pass
    with progress.phase("scores"):
        progress.expect(10)
        progress.advance(4)
        state = progress.state()
    assert [s["phase"] for s in states[:2]] == ["caches", "scores"] and states[-1]["total"] == 10
    assert state["index"] == 2 and state["done"] == 4 and state["rows"] == 4 and state["left"] is not None
    assert "caches" in state["seconds"]
    shown = io.StringIO()
    with follow_progress(tmp_path, interval=0.05, file=shown):
        publish_json(RunFolder(tmp_path).circuit_progress, state)
        time.sleep(0.5)
    assert "circuit 2/7 scores: 4 of 10" in shown.getvalue()
    assert len(shown.getvalue().splitlines()) == 1  # not a terminal: a line per phase, not per refresh

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    drawn = Terminal()
    with follow_progress(tmp_path, interval=0.05, file=drawn):
        publish_json(RunFolder(tmp_path).circuit_progress, state)
        time.sleep(0.5)
    assert "circuit 2/7 scores" in drawn.getvalue() and "4/10" in drawn.getvalue()  # a terminal: the bar
    assert not RunFolder(tmp_path).circuit_progress.exists()
    out_of_order = Progress()
    out_of_order.plan(PHASES)
    with pytest.raises(RuntimeError, match="'scores' started where 'caches' was planned"):
        with out_of_order.phase("scores"):
            pass


def test_search_on_some_pairs_measures_faithfulness_on_all_and_on_the_rest(tiny):
    """circuit.search_pairs: the search sees a seeded sample of the pairs; faithfulness and its interval
    are measured on every pair and on the held-out rest alone."""
    from conftest import screened_pairs
    from pipeline.analysis.circuit.method import find_circuit
    from pipeline.analysis.pairs import source_pairs
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve
    from pipeline.schema import CircuitConfig, SummaryConfig

    model, tokenizer = load_model(resolve("refusal-tiny"))
    table = screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=20, seed=2), generate=False,
                           refusal_tokens=["I"], compliance_tokens=["Sure"]).table
    circuit = find_circuit(model, table, CircuitConfig(search_pairs=8, n_random=4, n_resamples=4, edges=False),
                           SummaryConfig(n_bootstrap=100), "logit_diff").to_json()
    held_out = circuit["faithfulness_held_out"]
    assert circuit["n_search_pairs"] == 8 and held_out["n"] == circuit["n_pairs"] - 8
    assert held_out["ci"][0] <= held_out["faithfulness"] <= held_out["ci"][1]
    assert circuit["faithfulness"] >= 0.8 and held_out["faithfulness"] >= 0.7


def mixed_length_pairs(lengths=(7, 9, 7, 11, 9), seed=5):
    """Pairs of different token lengths, left-padded to the longest ([P, T], pad token 0, pads of class -1),
    each pair's own prompts of the list `unpadded`. Pair p differs at two positions whose distance from the end
    varies; classes: the first difference 0, the positions after it up to end-3 1, end-2 2, the final token 3."""
    gen = torch.Generator().manual_seed(seed)
    seq_len, unpadded = max(lengths), []
    clean = torch.zeros(len(lengths), seq_len, dtype=torch.long)
    corrupted, classes = clean.clone(), torch.full((len(lengths), seq_len), -1)
    for p, n in enumerate(lengths):
        ids = torch.randint(1, 50, (n,), generator=gen)
        other = ids.clone()
        at = 1 + p % (n - 4)
        other[at], other[n - 3] = torch.randint(1, 50, (2,), generator=gen)
        pad = seq_len - n
        clean[p, pad:], corrupted[p, pad:] = ids, other
        classes[p, pad + at], classes[p, pad + at + 1:seq_len - 2] = 0, 1
        classes[p, -2], classes[p, -1] = 2, 3
        unpadded.append((ids[None], other[None], classes[p:p + 1, pad:]))
    answers = Answers(torch.tensor([[3, -1], [4, 5], [9, -1], [7, -1], [2, 11]]),
                      torch.tensor([[6, 7], [8, -1], [2, -1], [5, 1], [12, -1]]))
    return clean, corrupted, answers, classes, torch.tensor(lengths), unpadded


def reference_by_pair(model, unpadded, answers, nodes, masks):
    """`reference_circuit_metrics` of each pair alone, unpadded: [C, P]."""
    return torch.cat([reference_circuit_metrics(model, ids, other, answers.index(torch.tensor([p])), cls, nodes, masks)
                      for p, (ids, other, cls) in enumerate(unpadded)], dim=1)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_pairs_of_different_lengths_in_one_batch_match_the_reference(model_type):
    """Left-padded pairs of three lengths in one runner (per-row attention masks and positions, each row's
    metric at the final position) equal the plain reference on each pair alone, unpadded: circuits packed
    across batches, every node alone patched, and a circuit without each member (rows from its recorded run
    and its keys and values)."""
    model = tiny_model(model_type)
    clean, corrupted, answers, classes, lengths, unpadded = mixed_length_pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4, max_batch_rows=4, lengths=lengths)
    assert runner.first == 4  # the shared prefix: pads and the tokens before the first difference
    masks = torch.rand(5, len(nodes), generator=torch.Generator().manual_seed(2)) < 0.5
    masks[0], masks[1], masks[2, :20], masks[3, :20] = True, False, True, False
    torch.testing.assert_close(runner.metrics(nodes, masks), reference_by_pair(model, unpadded, answers, nodes, masks),
                               atol=2e-5, rtol=1e-5)
    every_node_but_one = ~torch.eye(len(nodes), dtype=torch.bool)
    torch.testing.assert_close(runner.single_node_metrics(nodes),
                               reference_by_pair(model, unpadded, answers, nodes, every_node_but_one),
                               atol=2e-5, rtol=1e-5)
    circuit = masks[2]
    members = circuit.nonzero().squeeze(1)
    without = circuit.expand(len(members), -1).clone()
    without[torch.arange(len(members)), members] = False
    torch.testing.assert_close(runner.without_each(nodes, circuit),
                               reference_by_pair(model, unpadded, answers, nodes, without), atol=2e-5, rtol=1e-5)


def test_the_evaluator_runs_length_groups_as_one_padded_batch():
    """The circuit step's length groups (unpadded, pairs out of order) become one left-padded batch whose
    metrics come back in the step's pair order: the runner's on the same padded pairs."""
    model = tiny_model("llama")
    clean, corrupted, answers, classes, lengths, unpadded = mixed_length_pairs()
    nodes = Nodes.grid(get_adapter(model), [0, 1, 2, 3])
    groups = []
    for n in (9, 7, 11):
        rows = (lengths == n).nonzero().squeeze(1)
        groups.append(PairGroup(rows, torch.cat([unpadded[p][0] for p in rows]),
                                torch.cat([unpadded[p][1] for p in rows]), answers.index(rows),
                                torch.cat([unpadded[p][2] for p in rows])))
    evaluator = Evaluator(model, groups, 4, "logit_diff", max_batch_rows=7)
    assert len(evaluator.runners) == 1
    runner = CircuitRunner(model, clean, corrupted, answers, classes, 4, max_batch_rows=7, lengths=lengths)
    torch.testing.assert_close(evaluator.single_node_metrics(nodes), runner.single_node_metrics(nodes),
                               atol=1e-5, rtol=1e-5)
    masks = torch.rand(3, len(nodes), generator=torch.Generator().manual_seed(3)) < 0.5
    torch.testing.assert_close(evaluator.metrics(nodes, masks), runner.metrics(nodes, masks), atol=1e-5, rtol=1e-5)
