"""Minimal prompt pairs: where they come from, token-length matching, answer tokens and the behaviour screen.

A pair is a harmful instruction (clean: the model should refuse) and a harmless twin (corrupted: the
model should comply). Both are wrapped in the model's own chat template as one user turn plus the
generation prompt. Activation patching copies activations position by position, so the two token
sequences must have equal length: checked here for every pair, never assumed. With `align="end"` a
pair of unequal length is kept and aligned from the end (the final positions match up); only
positions that exist in both runs can be patched (see `align_offset`).

Output: a pyarrow Table, one row per pair that passed the screen (the pairs.parquet contract):

| column | meaning |
|---|---|
| pair_id | index of the pair in the input list (before screening) |
| category, clean, corrupted | the pair's category and instruction texts |
| clean_ids, corrupted_ids | list<int32> token ids of the chat-templated prompts |
| refusal_ids, compliance_ids | list<int32> answer tokens, the same for every pair of one run (up to answer_top_k each) |
| seq_len | len(clean_ids) |
| align_offset | len(clean_ids) - len(corrupted_ids) (0 unless align="end"); clean position p pairs with corrupted position p - align_offset, and only positions valid in both are patched |
| instruction_start, instruction_end | the user instruction's tokens, [start, end) in clean positions |
| harmful_positions | list<int32> clean positions whose token differs from the corrupted twin (the harmful span; for an end-aligned pair of unequal length, the clean tokens between the common prefix and suffix) |
| template_positions | list<int32> clean positions outside the instruction (chat template tokens) |
| final_pos | seq_len - 1, where the answer is read |
| metric_clean, metric_corrupted | refusal_logodds (log P(refusal tokens) - log P(compliance tokens)) at the final position; with one token each, the logit difference |
| clean_generation, corrupted_generation | the short greedy replies (null when generation is off) |

The transfer pairs (transfer_pairs.parquet: `transfer_source`, another source than the study's, sharing no
prompt with it) have the same columns, screened under the study's answer tokens, their pair ids numbered
after the study's; only the circuit step reads them, to measure the circuit's faithfulness on pairs its
search never saw.

All positions are 0-based clean-sequence positions. `pair_batch` reads rows of that table back as the
engine's tensors. No Ray, MLflow or Hydra here: plain functions.
"""  # noqa: E501 (a markdown table's rows cannot wrap)
from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import astuple, dataclass
from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.behaviour import (
    SCREEN_METRIC,
    AnswerTokens,
    chat_text,
    decode,
    derive_answer_tokens,
    final_answer_logits,
    greedy_generate,
    is_refusal,
)
from pipeline.analysis.prompt_files import read_user_file
from pipeline.engine.metrics import Answers, answer_metric
from pipeline.organisms import GRAMMAR_ORGANISMS, STUDY_POOL_ORGANISMS
from pipeline.organisms.instructions import chat_token_count, minimal_pairs
from pipeline.organisms.refusal_tiny import grammar
from pipeline.organisms.smollm2_refusal import study
from pipeline.store import read_table

Align = Literal["none", "end"]
ALIGN_MODES = ("none", "end")


@dataclass(frozen=True)
class InstructionPair:
    clean: str
    corrupted: str
    category: str = "user"


# --- where pairs come from ---------------------------------------------------------------------------

def grammar_pairs(n: int, seed: int = 0, split: str = "heldout") -> list[InstructionPair]:
    """refusal-tiny's minimal pairs, from its grammar (one word differs; held-out combinations by default)."""
    return [InstructionPair(p.clean, p.corrupted, p.category) for p in grammar.pairs(n, seed, split)]


def library_pairs(tokenizer, n: int, seed: int = 0,
                  categories: Iterable[str] | None = None) -> list[InstructionPair]:
    """Minimal pairs from the instruction template library (hub models), `n` of them drawn with `seed`
    from those the library length-matches under `tokenizer`."""
    pool = [InstructionPair(p["clean"], p["corrupted"], p["category"])
            for p in minimal_pairs(tokenizer=tokenizer, categories=categories)]
    random.Random(seed).shuffle(pool)
    return pool[:n]


def pool_pairs(tokenizer, pool: str, n: int | None = None, seed: int = 0) -> list[InstructionPair]:
    """smollm2-refusal's pairs from one of its pools (`study` or `transfer`: requests it never trained on),
    those of equal token count under `tokenizer`'s chat template, `n` of them (all: None) drawn with `seed`."""
    pairs = [InstructionPair(p["clean"], p["corrupted"], p["category"]) for p in study.pool(pool)
             if chat_token_count(tokenizer, p["clean"]) == chat_token_count(tokenizer, p["corrupted"])]
    random.Random(seed).shuffle(pairs)
    return pairs if n is None else pairs[:n]


def file_pairs(path: str | Path) -> list[InstructionPair]:
    """The user's own pairs: JSONL, CSV or Parquet with text columns `clean`, `corrupted` and an
    optional `category`."""
    table = read_user_file(path, ["clean", "corrupted"], "prompt-pair file")
    categories = (table.column("category").to_pylist() if "category" in table.column_names
                  else ["user"] * table.num_rows)
    return [InstructionPair(c, k, str(cat) if cat is not None else "user")
            for c, k, cat in zip(table.column("clean").to_pylist(), table.column("corrupted").to_pylist(),
                                 categories)]


def source_pairs(model: str, tokenizer, *, path: str | Path | None = None, n: int = 256, seed: int = 0,
                 split: str = "heldout") -> list[InstructionPair]:
    """The pairs for a run: the user's file if given, else refusal-tiny's grammar for the organisms trained
    on it, smollm2-refusal's study pool for it, else the instruction library."""
    if path:
        return file_pairs(path)
    if model in GRAMMAR_ORGANISMS:
        return grammar_pairs(n, seed, split)
    if model in STUDY_POOL_ORGANISMS:
        return pool_pairs(tokenizer, "study", n, seed)
    return library_pairs(tokenizer, n, seed)


@dataclass(frozen=True)
class TransferSource:
    """Pairs from another source than the study's, on which the circuit's faithfulness is measured again."""
    pairs: list[InstructionPair]
    name: str  # where they come from, in words


def other_split(split: str) -> str:
    """The grammar split the transfer pairs come from: combinations the study's pairs never use."""
    return "train" if split == "heldout" else "heldout"


def has_transfer_source(model: str, path: str | Path | None = None) -> bool:
    """Whether `transfer_source` has pairs for the model: other models have no independent pairs of their own."""
    return bool(path) or model in GRAMMAR_ORGANISMS or model in STUDY_POOL_ORGANISMS


def transfer_source(model: str, *, path: str | Path | None = None, n: int = 24, seed: int = 0,
                    split: str = "heldout") -> TransferSource:
    """At most `n` transfer pairs: the user's file (prompts.transfer) if given, else refusal-tiny's grammar
    in the other split (`other_split`) for the organisms trained on it, else smollm2-refusal's own transfer
    pool (`has_transfer_source` says which models have one)."""
    if not has_transfer_source(model, path):
        raise ValueError(f"{model} has no transfer pairs of its own: set prompts.transfer to a pair file, or "
                         "prompts.transfer_pairs=0")
    if path:
        return TransferSource(file_pairs(path)[:n], f"file {Path(path).name}")
    if model in GRAMMAR_ORGANISMS:
        return TransferSource(grammar_pairs(n, seed, other_split(split)),
                              f"refusal-tiny grammar, {other_split(split)} split")
    # requests for writing and code: another family of surface forms than the study pool's, disjoint from
    # it and from training
    pool = [InstructionPair(p["clean"], p["corrupted"], p["category"]) for p in study.pool("transfer")]
    random.Random(seed).shuffle(pool)
    return TransferSource(pool[:n], f"{model} transfer pool (writing and code requests)")


# --- tokens and spans --------------------------------------------------------------------------------

@dataclass
class TokenizedPair:
    pair_id: int
    pair: InstructionPair
    clean_ids: list[int]
    corrupted_ids: list[int]
    align_offset: int
    instruction_start: int
    instruction_end: int
    harmful_positions: list[int]

    @property
    def template_positions(self) -> list[int]:
        return [p for p in range(len(self.clean_ids))
                if not self.instruction_start <= p < self.instruction_end]


def _describe(i: int, pair: InstructionPair) -> str:
    return f"pair {i} (clean {pair.clean!r}, corrupted {pair.corrupted!r})"


def _instruction_tokens(tokenizer, instruction: str, i: int, pair: InstructionPair) -> tuple[list[int], int, int]:
    """(token ids of the chat-templated prompt, [start, end) of the instruction's tokens)."""
    text = chat_text(tokenizer, instruction)
    # The user turn comes after any system prompt, so search from the end.
    start = text.rfind(instruction)
    if start < 0:
        start = text.rfind(instruction.strip())
        instruction = instruction.strip()
    if start < 0:
        raise ValueError(f"{_describe(i, pair)}: the chat template rewrote the instruction text, so its tokens "
                         f"cannot be located: pass the instruction as the template prints it")
    end = start + len(instruction)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    inside = [t for t, (a, b) in enumerate(enc["offset_mapping"]) if a < end and b > start and b > a]
    if not inside:
        raise ValueError(f"{_describe(i, pair)}: the instruction maps to no tokens: give a non-empty instruction")
    return enc["input_ids"], inside[0], inside[-1] + 1


def tokenize_pairs(tokenizer, pairs: Sequence[InstructionPair], align: Align = "none") -> list[TokenizedPair]:
    """Chat-template token ids and spans of every pair; unequal lengths raise unless align="end".
    Cheap (no model): run it before any forward pass."""
    if align not in ALIGN_MODES:
        raise ValueError(f"unknown alignment mode {align!r}: set prompts.align to 'none' or 'end'")
    if not pairs:
        raise ValueError("no prompt pairs to tokenize: give a non-empty pair file or n > 0")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("the tokenizer is not a fast tokenizer (no character offsets): load the model with "
                         "a tokenizer.json so spans can be mapped to tokens")
    out = []
    for i, pair in enumerate(pairs):
        clean_ids, start, end = _instruction_tokens(tokenizer, pair.clean, i, pair)
        corrupted_ids, _, _ = _instruction_tokens(tokenizer, pair.corrupted, i, pair)
        offset = len(clean_ids) - len(corrupted_ids)
        if offset and align != "end":
            raise ValueError(
                f"{_describe(i, pair)} has unequal token counts ({len(clean_ids)} vs {len(corrupted_ids)}) under "
                f"this model's tokenizer and chat template: rephrase it to equal length, drop it, or set "
                f"prompts.align=end to patch only the positions aligned from the end")
        differing = _differing_positions(clean_ids, corrupted_ids)
        if not differing and offset == 0:
            raise ValueError(f"{_describe(i, pair)}: clean and corrupted prompts are the same tokens: "
                             f"the corrupted twin must differ (swap the harmful word)")
        out.append(TokenizedPair(i, pair, clean_ids, corrupted_ids, offset, start, end, differing))
    return out


def unique_pairs(tokenized: Sequence[TokenizedPair]) -> tuple[list[TokenizedPair], int]:
    """The first of every group of pairs with the same clean and corrupted token ids, and how many
    repeats were dropped: a pair given twice is one observation, and counting it twice would narrow
    every interval over pairs without any new evidence."""
    seen, unique = set(), []
    for pair in tokenized:
        key = (tuple(pair.clean_ids), tuple(pair.corrupted_ids))
        if key not in seen:
            seen.add(key)
            unique.append(pair)
    return unique, len(tokenized) - len(unique)


def sharing_no_prompt_with(tokenized: Sequence[TokenizedPair], others: Sequence[TokenizedPair]) -> list[TokenizedPair]:
    """The pairs none of whose prompts (clean or corrupted token ids) is a prompt of `others`: transfer pairs
    that share nothing with the study's."""
    seen = {tuple(ids) for t in others for ids in (t.clean_ids, t.corrupted_ids)}
    return [t for t in tokenized if tuple(t.clean_ids) not in seen and tuple(t.corrupted_ids) not in seen]


def _differing_positions(clean: list[int], corrupted: list[int]) -> list[int]:
    """Clean positions of the harmful span. Equal lengths: every position whose token differs.
    Unequal (end-aligned): the clean tokens between the longest common prefix and the longest common
    suffix, since position-wise comparison would flag everything the length change shifted."""
    if len(clean) == len(corrupted):
        return [p for p, (a, b) in enumerate(zip(clean, corrupted)) if a != b]
    shortest = min(len(clean), len(corrupted))
    prefix = next((k for k in range(shortest) if clean[k] != corrupted[k]), shortest)
    suffix = next((k for k in range(shortest - prefix) if clean[-1 - k] != corrupted[-1 - k]), shortest - prefix)
    return list(range(prefix, len(clean) - suffix))


# --- answer tokens, screen and table -----------------------------------------------------------------
#
# The screen runs in three phases, so that a large set can go in batches with the result of one pass:
# replies (greedy generation and the judge, per batch), answer tokens (once, from every batch's replies:
# first-token counts add up over batches) and the screen proper (first-token metric and keep, per batch).
# The pairs stage (pipeline.stages.pairs) runs them as work items.

class Replies(NamedTuple):
    """The greedy replies of a batch of pairs, clean prompts first then corrupted (2 x pairs entries each)."""
    texts: list[str]
    refused: list[bool]
    first_tokens: list[int | None]  # each reply's first token (None: an empty reply), what answer tokens come from


def check_answer_source(generate: bool, refusal_tokens, compliance_tokens) -> None:
    """Answer tokens come from the replies unless both are named: without generation both must be named."""
    if not generate and (refusal_tokens is None or compliance_tokens is None):
        raise ValueError("answer tokens are derived from the model's generations: set generate=true or name "
                         "both prompts.refusal_tokens and prompts.compliance_tokens")


def screen_prompts(tokenized: Sequence[TokenizedPair]) -> list[list[int]]:
    return [t.clean_ids for t in tokenized] + [t.corrupted_ids for t in tokenized]


def pair_replies(model, tokenizer, tokenized: Sequence[TokenizedPair], max_new_tokens: int = 8,
                 batch_size: int = 64) -> Replies:
    """Greedy replies to the pairs' clean and corrupted prompts, judged (`is_refusal`)."""
    generations = greedy_generate(model, screen_prompts(tokenized), max_new_tokens, batch_size)
    texts = [decode(tokenizer, g) for g in generations]
    return Replies(texts, [is_refusal(t) for t in texts], [g[0] if g else None for g in generations])


def answers_from_replies(tokenizer, batches: Sequence[Replies], refusal_tokens=None, compliance_tokens=None,
                         top_k: int = 1) -> AnswerTokens:
    """The answer tokens of the whole set from its batches' replies (in pair order): every clean reply
    before every corrupted one, the order of the all-at-once screen, so that ties in the first-token counts
    break the same way."""
    firsts, refused = [], []
    for half in (0, 1):
        for replies in batches:
            n = len(replies.first_tokens) // 2
            firsts += replies.first_tokens[half * n:(half + 1) * n]
            refused += replies.refused[half * n:(half + 1) * n]
    generations = [[] if token is None else [token] for token in firsts]
    return derive_answer_tokens(tokenizer, generations, refused, refusal_tokens, compliance_tokens, top_k)


@dataclass(frozen=True)
class ScreenCounts:
    """What the pairs report counts, for a batch or (added up) for the whole set."""
    n_pairs: int = 0
    n_kept: int = 0
    n_aligned_unequal: int = 0
    clean_refused_by_metric: int = 0
    corrupted_refused_by_metric: int = 0
    clean_refused_by_generation: int = 0
    corrupted_refused_by_generation: int = 0

    def __add__(self, other: ScreenCounts) -> ScreenCounts:
        return ScreenCounts(*(a + b for a, b in zip(astuple(self), astuple(other))))


class ScreenedBatch(NamedTuple):
    table: pa.Table        # the kept pairs (pairs.parquet's columns)
    counts: ScreenCounts


def screen_batch(model, tokenized: Sequence[TokenizedPair], replies: Replies | None, answers: AnswerTokens,
                 batch_size: int = 64) -> ScreenedBatch:
    """The first-token metric of each pair under `answers`, and the pairs kept: the model refuses the clean
    prompt and complies with the corrupted one, by the metric (> 0 on clean, < 0 on corrupted) and, with
    `replies` (generation on), by the replies too."""
    n = len(tokenized)
    logits = final_answer_logits(model, screen_prompts(tokenized), answers.refusal + answers.compliance, batch_size)
    metric = answer_metric(SCREEN_METRIC, logits, answers.answers(2 * n)).tolist()
    metric_clean, metric_corrupted = metric[:n], metric[n:]
    texts, refused = (replies.texts, replies.refused) if replies is not None else ([None] * (2 * n), [None] * (2 * n))
    keep = [metric_clean[i] > 0 > metric_corrupted[i] and (replies is None or (refused[i] and not refused[n + i]))
            for i in range(n)]
    counts = ScreenCounts(
        n_pairs=n, n_kept=sum(keep), n_aligned_unequal=sum(t.align_offset != 0 for t in tokenized),
        clean_refused_by_metric=sum(m > 0 for m in metric_clean),
        corrupted_refused_by_metric=sum(m > 0 for m in metric_corrupted),
        clean_refused_by_generation=sum(refused[:n]) if replies is not None else 0,
        corrupted_refused_by_generation=sum(refused[n:]) if replies is not None else 0)
    rows = [i for i in range(n) if keep[i]]
    return ScreenedBatch(pairs_table(tokenized, rows, answers, metric_clean, metric_corrupted, texts[:n], texts[n:]),
                         counts)


def pairs_report(counts: ScreenCounts, n_duplicates: int, align: Align, generate: bool, answers: dict) -> dict:
    """The pairs report (pairs.parquet's `pairs_report`) from the whole set's counts; `answers`:
    `AnswerTokens.to_dict`. Raises when no pair survived the screen."""
    n = counts.n_pairs
    report = {
        "n_pairs": n, "n_duplicates": n_duplicates, "n_kept": counts.n_kept, "fraction_kept": counts.n_kept / n,
        "align": align,
        "n_aligned_unequal": counts.n_aligned_unequal,
        "clean_refused_by_metric": counts.clean_refused_by_metric / n,
        "corrupted_refused_by_metric": counts.corrupted_refused_by_metric / n,
        "clean_refused_by_generation": counts.clean_refused_by_generation / n if generate else None,
        "corrupted_refused_by_generation": counts.corrupted_refused_by_generation / n if generate else None,
    } | answers
    if not counts.n_kept:
        raise ValueError(
            f"no pair survived the behaviour screen ({n} pairs; the model refused "
            f"{100 * report['clean_refused_by_metric']:.0f}% of clean and "
            f"{100 * report['corrupted_refused_by_metric']:.0f}% of corrupted prompts by the first-token metric, "
            f"answer tokens {report['refusal_tokens']} vs {report['compliance_tokens']}): use a model that refuses "
            f"harmful prompts, other pairs, or name the answer tokens (prompts.refusal_tokens/compliance_tokens)")
    return report


def with_report(table: pa.Table, report: dict) -> pa.Table:
    return table.replace_schema_metadata({b"pairs_report": json.dumps(report).encode()})


def pairs_table(tokenized: Sequence[TokenizedPair], rows: Sequence[int], answers, metric_clean, metric_corrupted,
                clean_texts, corrupted_texts) -> pa.Table:
    ids = pa.list_(pa.int32())
    pick = [tokenized[i] for i in rows]
    return pa.table({
        "pair_id": pa.array([t.pair_id for t in pick], pa.int32()),
        "category": pa.array([t.pair.category for t in pick], pa.string()),
        "clean": pa.array([t.pair.clean for t in pick], pa.string()),
        "corrupted": pa.array([t.pair.corrupted for t in pick], pa.string()),
        "clean_ids": pa.array([t.clean_ids for t in pick], ids),
        "corrupted_ids": pa.array([t.corrupted_ids for t in pick], ids),
        "refusal_ids": pa.array([list(answers.refusal)] * len(pick), ids),
        "compliance_ids": pa.array([list(answers.compliance)] * len(pick), ids),
        "seq_len": pa.array([len(t.clean_ids) for t in pick], pa.int32()),
        "align_offset": pa.array([t.align_offset for t in pick], pa.int32()),
        "instruction_start": pa.array([t.instruction_start for t in pick], pa.int32()),
        "instruction_end": pa.array([t.instruction_end for t in pick], pa.int32()),
        "harmful_positions": pa.array([t.harmful_positions for t in pick], ids),
        "template_positions": pa.array([t.template_positions for t in pick], ids),
        "final_pos": pa.array([len(t.clean_ids) - 1 for t in pick], pa.int32()),
        "metric_clean": pa.array([metric_clean[i] for i in rows], pa.float32()),
        "metric_corrupted": pa.array([metric_corrupted[i] for i in rows], pa.float32()),
        "clean_generation": pa.array([clean_texts[i] for i in rows], pa.string()),
        "corrupted_generation": pa.array([corrupted_texts[i] for i in rows], pa.string()),
    })


def padded(lists: list[list[int]]) -> torch.Tensor:
    """Ragged id lists -> [N, max length] int64, padded with -1 (the engine's answer-set padding)."""
    width = max(len(x) for x in lists)
    return torch.tensor([x + [-1] * (width - len(x)) for x in lists], dtype=torch.long)


def pair_batch(pairs_path: str | Path, rows: list[int]) -> dict:
    """Rows of pairs.parquet as tensors: pair_id [P], clean_ids [P, T] / corrupted_ids [P, T'], answers
    (T' != T only for pairs aligned from the end, prompts.align=end)."""
    table = read_table(pairs_path).take(pa.array(rows, pa.int64()))
    clean = table.column("clean_ids").to_pylist()
    corrupted = table.column("corrupted_ids").to_pylist()
    if len({(len(c), len(k)) for c, k in zip(clean, corrupted)}) != 1:
        raise ValueError(f"a pair shard must hold pairs of one clean and one corrupted token length, got "
                         f"{sorted({(len(c), len(k)) for c, k in zip(clean, corrupted)})}")
    return {
        "pair_id": np.asarray(table.column("pair_id").to_numpy(), dtype=np.int32),
        "clean_ids": torch.tensor(clean, dtype=torch.long),
        "corrupted_ids": torch.tensor(corrupted, dtype=torch.long),
        "answers": Answers(padded(table.column("refusal_ids").to_pylist()),
                           padded(table.column("compliance_ids").to_pylist())),
    }


def pairs_from_strings(tokenizer, pairs: Sequence[tuple[str, str] | InstructionPair],
                       refusal_tokens: Sequence[int | str] | None = None,
                       compliance_tokens: Sequence[int | str] | None = None) -> dict:
    """Minimal pairs written as (harmful, harmless) instructions -> the engine's inputs, as `pair_batch`
    gives them for a run's pairs: pair_id [P], clean_ids [P, T], corrupted_ids [P, T], answers. Each
    instruction is wrapped in the model's chat template; every pair must have one token length (patching
    copies position by position, and the batch is one [P, T] tensor). Answer tokens are ids or vocabulary
    strings; unnamed, the first token of "I" (refusal) and of "Sure" (compliance). For a notebook: the
    pipeline derives answer tokens from the model's replies and screens the pairs (pipeline.stages.pairs).
    """
    pairs = [p if isinstance(p, InstructionPair) else InstructionPair(*p) for p in pairs]
    tokenized = tokenize_pairs(tokenizer, pairs)
    lengths = sorted({len(t.clean_ids) for t in tokenized})
    if len(lengths) > 1:
        raise ValueError(f"the pairs have different token lengths ({lengths}) under this tokenizer's chat template: "
                         f"pass the pairs of one length together")
    answers = derive_answer_tokens(tokenizer, [], [], refusal_tokens, compliance_tokens).answers(len(tokenized))
    return {
        "pair_id": np.arange(len(tokenized), dtype=np.int32),
        "clean_ids": torch.tensor([t.clean_ids for t in tokenized], dtype=torch.long),
        "corrupted_ids": torch.tensor([t.corrupted_ids for t in tokenized], dtype=torch.long),
        "answers": answers,
    }
