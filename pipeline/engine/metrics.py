"""Refusal metrics at the final position, and the normalised patching effect.

Answers are two token sets per pair, refusal and compliance ([P, K] each, -1 padded), so that a
metric needs only those rows of the unembedding (the engine never computes full-vocabulary logits
for them). KL is the exception: it needs the whole final-position distribution of the source run.
`measure` turns final residuals into an answer-token metric; circuits, directions and attribution
accept only those (`check_metric`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .adapters import Adapter

ANSWER_METRICS = ("logit_diff", "refusal_logodds")
METRICS = ANSWER_METRICS + ("kl",)
DIRECTIONS = ("denoise", "noise")

# Below this |source - base| a pair carries no signal for normalisation: its effect is reported as 0.
EFFECT_EPS = 1e-6


@dataclass
class DirectedMetrics:
    """A result's unpatched metrics. Denoising patches the clean (harmful) run's activations into the
    corrupted run, so the corrupted run is the base and the clean run the source; noising the reverse."""

    direction: str
    metric: str
    metric_clean: torch.Tensor  # [P]
    metric_corrupted: torch.Tensor  # [P]

    @property
    def metric_base(self) -> torch.Tensor:
        return self.metric_corrupted if self.direction == "denoise" else self.metric_clean

    @property
    def metric_source(self) -> torch.Tensor:
        return self.metric_clean if self.direction == "denoise" else self.metric_corrupted


@dataclass
class Answers:
    refusal: torch.Tensor  # [P, K] token ids, -1 = padding
    compliance: torch.Tensor  # [P, K]

    def __post_init__(self):
        if self.refusal.ndim == 1:
            self.refusal = self.refusal[:, None]
        if self.compliance.ndim == 1:
            self.compliance = self.compliance[:, None]
        if (self.refusal[:, 0] < 0).any() or (self.compliance[:, 0] < 0).any():
            raise ValueError("every pair needs at least one refusal and one compliance answer token")

    def token_ids(self) -> torch.Tensor:
        """[P, K_r + K_c]: the unembedding rows a metric needs."""
        return torch.cat([self.refusal, self.compliance], dim=1)

    def index(self, rows: torch.Tensor) -> Answers:
        return Answers(self.refusal[rows], self.compliance[rows])

    def to(self, device) -> Answers:
        return Answers(self.refusal.to(device), self.compliance.to(device))


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (x * mask).sum(-1) / mask.sum(-1)


def _masked_logsumexp(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(x.masked_fill(~mask, float("-inf")), dim=-1)


def answer_metric(name: str, answer_logits: torch.Tensor, answers: Answers) -> torch.Tensor:
    """answer_logits [R, K_r + K_c] (the order of Answers.token_ids) -> metric [R]."""
    k = answers.refusal.shape[1]
    ref, com = answer_logits[:, :k], answer_logits[:, k:]
    ref_mask, com_mask = answers.refusal >= 0, answers.compliance >= 0
    if name == "logit_diff":
        return _masked_mean(ref, ref_mask) - _masked_mean(com, com_mask)
    if name == "refusal_logodds":
        # log P(refusal set) - log P(compliance set): the softmax normaliser cancels.
        return _masked_logsumexp(ref, ref_mask) - _masked_logsumexp(com, com_mask)
    raise ValueError(f"unknown answer metric {name!r}; choose one of {METRICS}")


def check_metric(metric: str) -> None:
    if metric not in ANSWER_METRICS:
        raise ValueError(f"circuits need an answer-token metric, got {metric!r}: set patching.metric to one of "
                         f"{list(ANSWER_METRICS)}")


def measure(adapter: Adapter, metric: str, answers: Answers, final_resid: torch.Tensor,
            pair_idx: torch.Tensor) -> torch.Tensor:
    """The answer-token metric [R] of final residuals [R, d] belonging to pairs `pair_idx`."""
    rows = answers.index(pair_idx.cpu()).to(final_resid.device)
    value = answer_metric(metric, adapter.logits(final_resid, rows.token_ids()), rows)
    return value.to(torch.promote_types(value.dtype, torch.float32))  # half precision -> float32, float64 stays


def kl_to_source(source_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(source || run) over the full vocabulary at the final position, [R]."""
    source_logp = torch.log_softmax(source_logits.float(), dim=-1)
    logp = torch.log_softmax(logits.float(), dim=-1)
    return (source_logp.exp() * (source_logp - logp)).sum(-1)


def normalised_effect(patched: torch.Tensor, base: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """(patched - base) / (source - base): 0 = no change, 1 = the patch fully restores the source."""
    denom = source - base
    no_signal = denom.abs() < EFFECT_EPS
    return torch.where(no_signal, torch.zeros_like(patched), (patched - base) / torch.where(no_signal, 1.0, denom))
