"""The circuit step's evaluator: a circuit's refusal metric over every screened pair, each (circuit, pair)
computed once.

A circuit is a bool mask over the candidate nodes [N]; `Evaluator.metrics` runs the packed circuit path
(`pipeline.engine.circuits.CircuitRunner`, over every pair at once: the length groups left-padded into one
batch, since the default run's pairs spread over many lengths with one or two pairs each) for the circuits
and pairs it has not seen and keeps the result by mask, so pruning, controls and resamples that ask again
cost nothing.
`Resample` reads the same cache with every pair counted as often as a bootstrap resample drew it.
Faithfulness f(C) = (m(C) - m(empty)) / (m(full) - m(empty)), m averaged over pairs.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from pipeline.analysis.circuit.progress import Progress
from pipeline.analysis.positions import PairGroup
from pipeline.engine.circuits import CircuitRunner, Nodes, faithfulness
from pipeline.engine.metrics import Answers
from pipeline.engine.padding import Padding

PAD_TOKEN = 0  # any token: the attention mask hides pads from every real position


def one_batch(groups: list[PairGroup]) -> tuple[PairGroup, torch.Tensor]:
    """Length groups as one batch left-padded to the longest (pads of class -1), and each pair's token count."""
    lengths = torch.cat([torch.full((len(g.rows),), g.clean.shape[1]) for g in groups])
    padding = Padding(lengths)
    width = max(g.answers.refusal.shape[1] for g in groups), max(g.answers.compliance.shape[1] for g in groups)

    def answer_rows(side: int) -> torch.Tensor:  # [P, K], -1 padded
        parts = [(g.answers.refusal, g.answers.compliance)[side] for g in groups]
        return torch.cat([torch.nn.functional.pad(a, (0, width[side] - a.shape[1]), value=-1) for a in parts])

    batch = PairGroup(torch.cat([g.rows for g in groups]), padding.pad([g.clean for g in groups], PAD_TOKEN),
                      padding.pad([g.corrupted for g in groups], PAD_TOKEN), Answers(answer_rows(0), answer_rows(1)),
                      padding.pad([g.classes for g in groups], -1))
    return batch, lengths


class Evaluator:
    """Circuit metrics over every pair (all groups), in the order of the circuit step's pairs. It serves one
    node set (the candidates): each circuit's metrics are computed once and kept, by its mask. `groups` are
    the pairs by length, unpadded; `batches` the padded batches the `runners` run (one: every pair)."""

    def __init__(self, model, groups: list[PairGroup], n_classes: int, metric: str, max_batch_rows=None,
                 progress: Progress | None = None):
        self.groups, self.progress = groups, progress or Progress()
        batch, lengths = one_batch(groups)
        self.batches = [batch]
        self.runners = [CircuitRunner(model, batch.clean, batch.corrupted, batch.answers, batch.classes, n_classes,
                                      metric, max_batch_rows, lengths)]
        self.n_pairs = sum(len(g.rows) for g in groups)
        self.metric_full = self._gather([r.metric_full[None] for r in self.runners])[0]
        self.metric_empty = self._gather([r.metric_empty[None] for r in self.runners])[0]
        self.forward_rows = 0  # (circuit, pair) rows computed
        self._known: dict[bytes, torch.Tensor] = {}  # circuit mask -> metric [P], nan where not computed yet

    def _gather(self, parts: list[torch.Tensor]) -> torch.Tensor:
        out = torch.empty(parts[0].shape[0], self.n_pairs)
        for batch, part in zip(self.batches, parts):
            out[:, batch.rows] = part
        return out

    def _each_batch(self, compute: Callable[[CircuitRunner], torch.Tensor], n_circuits: int) -> torch.Tensor:
        """compute(runner) [C, batch's pairs] for every batch -> [C, P], counted as rows computed."""
        parts = []
        for batch, runner in zip(self.batches, self.runners):
            parts.append(compute(runner))
            self.progress.advance(n_circuits * len(batch.rows))
        self.forward_rows += n_circuits * self.n_pairs
        return self._gather(parts)

    def _metrics_of(self, nodes: Nodes, masks: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
        """masks [C, N] -> metric [C, P] computed on `pairs` ([P] bool), nan elsewhere."""
        out = torch.full((len(masks), self.n_pairs), float("nan"))
        for batch, runner in zip(self.batches, self.runners):
            local = pairs[batch.rows].nonzero().squeeze(1)
            if len(local):
                out[:, batch.rows[local]] = runner.metrics(nodes, masks, local)
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
        todo = sorted({key: c for c, key in enumerate(keys)
                       if bool((self._known[key].isnan() & wanted).any())}.values())
        if todo:
            lacking = torch.stack([self._known[keys[c]].isnan() & wanted for c in todo])  # [C', P]
            computed = self._metrics_of(nodes, masks[todo], lacking.any(0))
            for c, fill, row in zip(todo, lacking, computed):
                self._known[keys[c]][fill] = row[fill]
        return torch.stack([self._known[key] for key in keys]) if keys else torch.empty(0, self.n_pairs)

    def single_node_metrics(self, nodes: Nodes) -> torch.Tensor:
        """[N, P]: the metric with each node alone patched."""
        return self._each_batch(lambda runner: runner.single_node_metrics(nodes), len(nodes))

    def without_each(self, nodes: Nodes, members: list[int]) -> torch.Tensor:
        """[M, P]: the metric of the circuit `members` without each of them, in the order given."""
        masks = subset_masks(len(nodes), [members]).repeat(len(members), 1)
        masks[torch.arange(len(members)), torch.tensor(members, dtype=torch.long)] = False
        keys = [_key(mask) for mask in masks]
        if any(key not in self._known or bool(self._known[key].isnan().any()) for key in keys):
            circuit = subset_masks(len(nodes), [members])[0]
            computed = self._each_batch(lambda runner: runner.without_each(nodes, circuit), len(members))  # sorted
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


def subset_masks(n_nodes: int, subsets: list) -> torch.Tensor:
    """[C, N] bool: one row per subset (node indices) of the N nodes."""
    masks = torch.zeros(len(subsets), n_nodes, dtype=torch.bool)
    for row, subset in enumerate(subsets):
        masks[row, list(subset)] = True
    return masks
