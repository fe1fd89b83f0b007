"""The circuit judged by what the model says: greedy replies to the circuit step's harmful prompts with
the circuit knocked out (only its nodes patched from the harmless twin) and with the circuit alone
(every head and MLP outside it patched), each judged by the one refusal judge.

"Patched" applies to the prompt: the first forward pass over the harmful prompt sets the patched heads'
and MLPs' outputs, at the positions of their position classes, to the harmless twin's; each generated
token is then computed by the model as it is, reading the patched prompt through its cached keys and
values (the twin has no activations at generated positions to patch in).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from pipeline.analysis.behaviour import decode, greedy_generations, is_refusal
from pipeline.analysis.positions import PairGroup
from pipeline.engine.adapters import get_adapter
from pipeline.engine.circuits import Nodes, node_masks, prompt_patch_hooks
from pipeline.engine.hooks import installed, run_with_cache

# As the behaviour screen's replies (prompts.max_new_tokens, which the sweep passes): the decision shows in
# the first tokens.
KNOCKOUT_NEW_TOKENS = 8
CONDITIONS = {
    "plain": "the harmful prompt as it is",
    "circuit_knocked_out": "only the circuit's nodes patched from the harmless twin",
    "circuit_alone": "every head and MLP outside the circuit patched from the harmless twin",
}


@torch.no_grad()
def knockout_by_generation(model, tokenizer, groups: Sequence[PairGroup], nodes: Nodes, circuit: Sequence[int],
                           max_new_tokens: int = KNOCKOUT_NEW_TOKENS, n_examples: int = 3,
                           plain: Sequence[str] | None = None) -> dict:
    """Refusal rates of the harmful prompts' greedy replies under each of CONDITIONS, with a few replies.
    `plain`: the harmful prompts' replies as they are, when already generated the same way (the behaviour
    screen's, `max_new_tokens` long), by the row the groups index; else they are generated here."""
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    selected = torch.zeros(len(nodes), dtype=torch.bool)
    selected[list(circuit)] = True
    refused = {name: [] for name in CONDITIONS}
    examples = {name: [] for name in CONDITIONS}
    for group in groups:
        source = run_with_cache(model, adapter, group.corrupted.to(device), ("head", "mlp_out"))
        heads, mlps = node_masks(adapter, nodes, selected, group.classes)
        patched = {"plain": None, "circuit_knocked_out": (heads, mlps), "circuit_alone": (~heads, ~mlps)}
        prompts = group.clean.tolist()
        for name, masks in patched.items():
            if masks is None and plain is not None:
                texts = [plain[int(row)] for row in group.rows]
            else:
                hooks = [] if masks is None else prompt_patch_hooks(adapter, source, *masks)
                with installed(hooks):  # one batch of the whole group: its rows are the hooks' pair rows
                    replies = greedy_generations(model, prompts, max_new_tokens, batch_size=len(prompts))
                texts = [decode(tokenizer, r.ids) for r in replies]
            refused[name] += [is_refusal(t) for t in texts]
            examples[name] += texts[:max(0, n_examples - len(examples[name]))]
    n = len(refused["plain"])
    return {"max_new_tokens": max_new_tokens, "n_pairs": n, "conditions": CONDITIONS,
            "refusal_rate": {name: sum(flags) / n for name, flags in refused.items()},
            "examples": examples,
            "patched": "the prompt's positions in the first forward pass; generated tokens run unpatched, reading "
                       "the patched prompt through the KV cache"}
