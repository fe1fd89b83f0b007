"""The anchor term: KL(base || tuned) of the next-token distribution on ordinary text, added to the reply loss
so the tune changes the refusal decision, not the language model.

Without it the tune costs +0.72 nats/token of cross-entropy on ordinary text (smollm2-refusal v2): training sees
only chat-formatted requests and short replies, and nothing holds the rest of the distribution in place. The
base model's logits come from the same PeftModel with the LoRA disabled, so no second model sits in memory.

Anchor text, raw (no chat template, as the cross-entropy evaluation reads its sentences), half of each batch
from each source:
- ordinary_text.txt: everyday sentences written for this term. They share no sentence and no run of
  ANCHOR_DISJOINT_WORDS words with the evaluation's pipeline/analysis/general_text.txt (checked before training);
- the base model's own replies to the harmless training prompts (base_replies.jsonl, the harmless targets).
"""
from __future__ import annotations

import random
import re
from pathlib import Path

import torch

ORDINARY_TEXT = Path(__file__).parent / "ordinary_text.txt"
ANCHOR_ROWS = 8            # anchor rows per step, half written sentences, half base replies
ANCHOR_WEIGHT = 1.0        # loss = reply loss + ANCHOR_WEIGHT x KL(base || tuned) per anchor token
ANCHOR_DISJOINT_WORDS = 5  # no run of this many words is shared with the evaluation's text


def _word_runs(text: str, n: int) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", text.lower())
    return {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}


def shared_runs(texts: list[str], evaluated: list[str], n: int = ANCHOR_DISJOINT_WORDS) -> list[str]:
    """The texts sharing a sentence or a run of `n` words with `evaluated`."""
    runs = set().union(*(_word_runs(t, n) for t in evaluated))
    whole = {t.strip() for t in evaluated}
    return [t for t in texts if t.strip() in whole or _word_runs(t, n) & runs]


def anchor_texts(examples: list[dict]) -> tuple[list[str], list[str]]:
    """(written sentences, base replies to the harmless training `examples`): the two halves of each anchor
    batch; raises if any overlaps the cross-entropy evaluation's text."""
    from pipeline.analysis.directions import general_sentences

    sentences = [line.strip() for line in ORDINARY_TEXT.read_text().splitlines() if line.strip()]
    replies = sorted({ex["response"] for ex in examples if not ex["harmful"] and len(ex["response"].split()) > 3})
    clash = shared_runs(sentences + replies, general_sentences())
    if clash:
        raise ValueError(f"anchor text overlaps the cross-entropy evaluation's text ({clash[0]!r}): rewrite that "
                         f"sentence of {ORDINARY_TEXT.name}")
    return sentences, replies


def anchor_batches(tokenizer, sources: tuple[list[str], list[str]], seed: int):
    """Endless right-padded (ids [B, T], mask [B, T]) batches of ANCHOR_ROWS texts, half from each source, each
    source cycled in a fresh seeded order per pass."""
    rng = random.Random(seed)
    encoded = [[ids for ids in tokenizer(list(texts))["input_ids"] if len(ids) > 1] for texts in sources]
    queues: list[list[list[int]]] = [[] for _ in sources]
    while True:
        rows = []
        for source, queue in zip(encoded, queues):
            for _ in range(ANCHOR_ROWS // len(sources)):
                if not queue:
                    queue += rng.sample(source, len(source))
                rows.append(queue.pop())
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            mask[r, :len(row)] = 1
        yield ids, mask


def anchor_kl(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(base || tuned) of the next-token distribution over the anchor tokens; `model` a PeftModel, the base
    read with its adapter disabled (no gradient)."""
    with torch.no_grad(), model.disable_adapter():
        base = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], dim=-1)  # [B, T-1, V]
    tuned = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1], dim=-1)  # [B, T-1, V]
    per_token = (base.exp() * (base - tuned)).sum(-1)  # [B, T-1]
    scored = mask[:, 1:].float()  # predicting a real token
    return (per_token * scored).sum() / scored.sum()
