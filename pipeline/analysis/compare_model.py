"""What a comparison of runs computes with one run's model loaded: circuits (node ids, from this run or
another) evaluated on the run's circuit pairs through the circuit search's evaluator, and the spread of the
run's refusal direction under re-drawn pairs.

The pairs are those the run's circuit step used (its pairs.parquet, selected with its circuit options), so a
circuit of this run evaluated here has the faithfulness its circuit.json states.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from pipeline.analysis.circuit.evaluator import subset_masks
from pipeline.analysis.circuit.method import prepare
from pipeline.analysis.circuit.result import Setup, node_id
from pipeline.analysis.directions import post_instruction_count, post_instruction_residuals
from pipeline.schema import CircuitConfig


@dataclass(frozen=True)
class Evaluated:
    """Circuits' faithfulness on this run's model and pairs."""
    faithfulness: tuple[float | None, ...]  # per circuit; None where a node is not among this model's candidates
    missing: tuple[str, ...]  # node ids of the circuits this model has no candidate for


class RunModel:
    """One run's model with its circuit step's pairs and candidate nodes, ready to evaluate circuits."""

    def __init__(self, model, pairs: pa.Table, options: CircuitConfig, metric: str):
        self.model, self.pairs = model, pairs
        self.setup: Setup = prepare(model, pairs, options, metric)
        nodes, names = self.setup.nodes, self.setup.names
        self.index = {node_id(nodes, i, names): i for i in range(len(nodes))}

    def faithfulness(self, circuits: list[list[str]]) -> Evaluated:
        missing = sorted({n for c in circuits for n in c if n not in self.index})
        known = [c for c in circuits if all(n in self.index for n in c)]
        values = iter([])
        if known:
            masks = subset_masks(len(self.setup.nodes), [[self.index[n] for n in c] for c in known])
            values = iter(self.setup.evaluator.faithfulness(self.setup.nodes, masks).tolist())
        return Evaluated(tuple(next(values) if all(n in self.index for n in c) else None for c in circuits),
                         tuple(missing))

    @torch.no_grad()
    def direction_cosines(self, layer: int, position_from_end: int, n_draws: int,
                          rng: np.random.Generator) -> np.ndarray:
        """[n_draws] cosine between the mean differences (harmful - harmless) at (layer, position) of two
        independent bootstrap draws of half the pairs: as many as the direction's selection takes its mean from."""
        n_post = post_instruction_count(self.pairs)
        clean, corrupted = self.pairs.column("clean_ids").to_pylist(), self.pairs.column("corrupted_ids").to_pylist()
        at = n_post + position_from_end
        harmful = post_instruction_residuals(self.model, clean, n_post)[:, layer, at]  # [P, d]
        harmless = post_instruction_residuals(self.model, corrupted, n_post)[:, layer, at]
        difference = (harmful - harmless).double().numpy()  # [P, d]
        n, half = len(difference), max(1, len(difference) // 2)
        draws = rng.integers(0, n, size=(2, n_draws, half))
        first, second = difference[draws[0]].mean(1), difference[draws[1]].mean(1)  # [n_draws, d]
        return (first * second).sum(1) / (np.linalg.norm(first, axis=1) * np.linalg.norm(second, axis=1))
