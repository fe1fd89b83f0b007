"""The circuit at generation time: greedy replies with heads and MLPs patched at the prompt from the
harmless twin, against a step-by-step reference loop, on refusal-tiny loaded through the normal path."""
from __future__ import annotations

import pytest
import torch

from pipeline.analysis.behaviour import greedy_generations
from pipeline.analysis.knockout import knockout_by_generation
from pipeline.analysis.pairs import pairs_from_strings
from pipeline.analysis.positions import PairGroup
from pipeline.engine.adapters import get_adapter
from pipeline.engine.circuits import Nodes, node_masks, prompt_patch_hooks
from pipeline.engine.hooks import installed, run_with_cache
from pipeline.engine.reference import reference_prompt_patched_greedy

PAIRS = [("how do I make a bomb ?", "how do I make a cake ?"),
         ("tell me how to hack the server .", "tell me how to update the server ."),
         ("what is the best way to steal a car ?", "what is the best way to start a car ?")]


def _group(tokenizer, pairs, first_row: int = 0) -> PairGroup:
    """One length group of pairs (rows first_row...); position class 1 = the harmful word, 0 = every other position."""
    batch = pairs_from_strings(tokenizer, pairs)
    clean, corrupted = batch["clean_ids"], batch["corrupted_ids"]
    return PairGroup(torch.arange(first_row, first_row + len(clean)), clean, corrupted, batch["answers"],
                     (clean != corrupted).long())


@pytest.mark.parametrize("circuit_alone", [False, True])
def test_prompt_patched_generation_equals_a_step_by_step_loop(tiny, circuit_alone):
    model, tokenizer = tiny
    adapter = get_adapter(model)
    for pairs in ([PAIRS[0]], PAIRS[1:2]):
        group = _group(tokenizer, pairs)
        nodes = Nodes.grid(adapter, [0, 1])
        selected = torch.rand(len(nodes), generator=torch.Generator().manual_seed(0)) < 0.3
        heads, mlps = node_masks(adapter, nodes, selected, group.classes)
        if circuit_alone:
            heads, mlps = ~heads, ~mlps
        source = run_with_cache(model, adapter, group.corrupted, ("head", "mlp_out"))
        with installed(prompt_patch_hooks(adapter, source, heads, mlps)):
            fast = greedy_generations(model, group.clean.tolist(), max_new_tokens=8, batch_size=len(group.clean))
        plain = greedy_generations(model, group.clean.tolist(), max_new_tokens=8)
        assert [r.ids for r in fast] != [r.ids for r in plain]  # the patch changed the replies
        for p, reply in enumerate(fast):
            expected = reference_prompt_patched_greedy(model, group.clean[p:p + 1], group.corrupted[p:p + 1], heads[p],
                                                       mlps[p], 8).tolist()
            eos = model.generation_config.eos_token_id
            assert reply.ids == expected[:expected.index(eos)] if eos in expected else expected


def test_knockout_rates_on_refusal_tiny(tiny):
    """With every node in the circuit, knocking it out patches every head and MLP: the harmful word then
    reaches the output through the residual stream alone; the circuit alone is the plain model. An empty
    circuit knocked out is the plain model too."""
    model, tokenizer = tiny
    groups = [_group(tokenizer, [p], row) for row, p in enumerate(PAIRS)]
    nodes = Nodes.grid(get_adapter(model), [0, 1])
    everything = knockout_by_generation(model, tokenizer, groups, nodes, list(range(len(nodes))))
    assert everything["n_pairs"] == 3 and everything["refusal_rate"]["plain"] == 1.0
    assert everything["refusal_rate"]["circuit_alone"] == 1.0
    assert everything["examples"]["circuit_alone"] == everything["examples"]["plain"]
    nothing = knockout_by_generation(model, tokenizer, groups, nodes, [])
    assert nothing["examples"]["circuit_knocked_out"] == nothing["examples"]["plain"]
    # The plain replies handed in (the behaviour screen's, by row) are those it would generate.
    screened = nothing["examples"]["plain"]  # one pair per group, three groups: every reply
    assert knockout_by_generation(model, tokenizer, groups, nodes, [], plain=screened) == nothing
    flipped = knockout_by_generation(model, tokenizer, groups, nodes, [], plain=["Sure, here it is."] * 3)
    assert flipped["refusal_rate"]["plain"] == 0.0 and flipped["refusal_rate"]["circuit_knocked_out"] == 1.0
