"""Positions that line up across pairs of different lengths.

Two views of a pair's positions:
- position classes (the circuit search's nodes live at them): `harm` (the tokens where the harmful
  prompt differs from its harmless twin), `after` (the rest of the instruction after them) and each
  chat-template token after the instruction, counted from the end (`end-2`, `end-1` = the final token).
  Positions before the first differing token hold the same activations in both runs: they get no class.
- positions counted from the end (the summary's), labelled by the token most pairs have there.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.pairs import padded
from pipeline.engine.metrics import Answers

CLASS_TITLES = {"harm": "harmful tokens", "after": "rest of instruction", "end": "template end"}
# The position classes the patch stage's headline patches, each as one multi-position patch: the harmful
# tokens, the rest of the instruction after them, and the chat template's tokens after the instruction.
HEADLINE_CLASSES = ("harm", "after", "end")


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


def headline_groups(pairs: pa.Table) -> torch.Tensor:
    """[P, 3, T] bool (T = the longest clean prompt): per pair, its clean positions in each of
    HEADLINE_CLASSES. Positions before the first harmful token hold the same activations in both runs and
    belong to none."""
    seq_len = pairs.column("seq_len").to_pylist()
    inst_end = pairs.column("instruction_end").to_pylist()
    harmful = pairs.column("harmful_positions").to_pylist()
    groups = torch.zeros(len(seq_len), len(HEADLINE_CLASSES), max(seq_len, default=0), dtype=torch.bool)
    for row, (t, end, harm) in enumerate(zip(seq_len, inst_end, harmful)):
        groups[row, 0, harm] = True
        groups[row, 1, min(harm):end] = True
        groups[row, 1, harm] = False
        groups[row, 2, end:t] = True
    return groups


@dataclass
class PairGroup:
    rows: torch.Tensor  # indices into the circuit step's pairs
    clean: torch.Tensor  # [P, T]
    corrupted: torch.Tensor
    answers: Answers
    classes: torch.Tensor  # [P, T]


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
        groups.append(PairGroup(torch.tensor(rows), torch.tensor(pick("clean_ids")),
                                torch.tensor(pick("corrupted_ids")),
                                Answers(padded(pick("refusal_ids")), padded(pick("compliance_ids"))),
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


def position_tokens(pairs: pa.Table) -> dict[int, str]:
    """Relative position -> a label: the clean-prompt token most pairs have there (template tokens
    agree), or "<harmful>" where pairs disagree but mostly hold their harmful word, else "<varies>"."""
    votes: dict[int, Counter] = {}
    harmful: Counter = Counter()
    for tokens, harm in zip(pairs.column("clean_tokens").to_pylist(), pairs.column("harmful_positions").to_pylist()):
        for rel, token in zip(range(-len(tokens), 0), tokens):
            votes.setdefault(rel, Counter())[token] += 1
        harmful.update(p - len(tokens) for p in harm)
    labels = {}
    for rel, counter in votes.items():
        token, count = counter.most_common(1)[0]
        n = sum(counter.values())
        labels[rel] = token if 2 * count >= n else "<harmful>" if 2 * harmful[rel] >= n else "<varies>"
    return labels
