"""Two runs compared against a noise band: each measure of how far run B is from the reference run A, with
the band the measure would fall in had only the prompt sample been re-drawn, and one verdict.

A band is built from null draws that each run supplies on its own (no second run needed):
- circuits (node and supernode Jaccard, size): pairs of circuits from the runs' independent re-searches
  (circuit.json `stability.circuits` / `stability.supernode_circuits`); a run without them has only each
  node's inclusion frequency, and its draws are simulated from those (nodes below half the resamples
  outside the circuit are not stored, so the band is narrower than honest);
- effect ranks: two independent bootstrap draws of the run's pairs, the sites' means correlated;
- faithfulness on the other run: the run's own faithfulness interval (re-drawn pairs) joined with its
  re-searched circuits' faithfulness on all its pairs (where the run stores them);
- refusal rates: the difference of two binomial draws of the runs' pair counts at their pooled rate;
- direction cosine: the mean difference at the chosen place from two independent bootstrap draws.
A measure is outside when it falls outside its band's central `level` share of the draws; the verdict is
drift when any deciding measure is outside. Per-layer rank correlations and the direction's best-layer
shift are reported, not deciding (many layers would raise false alarms; a selection is not re-drawn).
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd
from scipy import stats

DRIFT, WITHIN_NOISE = "verdict: drift", "verdict: within noise"
SITE = ["direction", "component", "layer", "head", "position", "position_class"]  # an effect's site


@dataclass(frozen=True)
class Band:
    """Where a measure falls under re-drawn prompts alone."""
    low: float
    high: float
    n: int  # null draws
    source: str  # where the draws come from, in words
    honest: bool = True  # False: from what an older run stores; narrower than the runs' resampling noise


@dataclass(frozen=True)
class Measure:
    name: str
    value: float | None  # None: not comparable (see note)
    band: Band | None
    deciding: bool = True
    note: str = ""

    @property
    def outside(self) -> bool:
        return (self.value is not None and self.band is not None
                and not self.band.low - 1e-9 <= self.value <= self.band.high + 1e-9)


@dataclass(frozen=True)
class Verdict:
    drift: bool
    measures: tuple[str, ...]  # the deciding measures outside their bands (drift), else every one checked

    @property
    def line(self) -> str:
        if self.drift:
            return f"{DRIFT} ({', '.join(self.measures)} outside the null band)"
        return f"{WITHIN_NOISE} ({', '.join(self.measures) or 'no measure comparable'} inside the null band)"


def verdict(measures: list[Measure]) -> Verdict:
    checked = [m for m in measures if m.deciding and m.value is not None and m.band is not None]
    outside = tuple(m.name for m in checked if m.outside)
    return Verdict(bool(outside), outside or tuple(m.name for m in checked))


def band(draws: np.ndarray, level: float, source: str, honest: bool = True) -> Band | None:
    draws = np.asarray(draws, dtype=float)
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return None
    low, high = np.quantile(draws, [(1 - level) / 2, (1 + level) / 2])
    return Band(float(low), float(high), len(draws), source, honest)


# ---- circuits ------------------------------------------------------------------------------------------

def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def resampled_circuits(stored: list[list[str]] | None, frequency: dict[str, float], n: int,
                       rng: np.random.Generator) -> tuple[list[set[str]], bool]:
    """A run's re-searched circuits (stored: honest), else `n` drawn node by node from the inclusion
    frequencies it stores (not honest: see the module's docstring)."""
    if stored:
        return [set(c) for c in stored], True
    names = list(frequency)
    p = np.array([frequency[k] for k in names])
    return [{names[i] for i in np.flatnonzero(rng.random(len(names)) < p)} for _ in range(n)], False


def jaccard_measure(name: str, a: set[str], b: set[str], null_a: list[set[str]], null_b: list[set[str]],
                    level: float, honest: bool, source: str) -> Measure:
    draws = [jaccard(x, y) for null in (null_a, null_b) for x, y in combinations(null, 2)]
    return Measure(name, jaccard(a, b), band(draws, level, source, honest))


def size_measure(a: int, b: int, sizes_a, sizes_b, level: float, honest: bool) -> Measure:
    draws = [x - y for sizes in (sizes_a, sizes_b) for x, y in combinations(sizes, 2)]
    draws += [-d for d in draws]
    return Measure("size_difference", float(b - a), band(draws, level, "differences between re-searched "
                                                        "circuits' sizes", honest))


# ---- effect ranks ------------------------------------------------------------------------------------------

def site_matrix(effects: pd.DataFrame) -> pd.DataFrame:
    """Effects (positions counted from the end) -> [sites, pairs], the sites every pair has."""
    effects = effects.assign(position_class=effects.get("position_class"))
    wide = effects.pivot_table(index=SITE, columns="pair_id", values="effect", aggfunc="first", dropna=False)
    return wide.dropna(how="any")


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(stats.spearmanr(x, y).statistic)


def _by_group(sites: pd.Index, key: str) -> dict:
    level = sites.get_level_values(key)
    return {value: np.flatnonzero(level == value) for value in sorted(set(level))}


def rank_measures(wide_a: pd.DataFrame, wide_b: pd.DataFrame, level: float, n_draws: int,
                  rng: np.random.Generator) -> tuple[list[Measure], list[Measure]]:
    """Spearman correlation of the site means of A and B, per component (deciding) and per layer
    (reported), over the sites both runs have; the band: each run's two independent bootstrap draws."""
    shared = wide_a.index.intersection(wide_b.index)
    a, b = wide_a.loc[shared].to_numpy(float), wide_b.loc[shared].to_numpy(float)
    mean_a, mean_b = a.mean(1), b.mean(1)

    def draws_of(values: np.ndarray) -> np.ndarray:  # [2, n_draws, sites]: two independent resamples each
        n = values.shape[1]
        weights = rng.multinomial(n, np.full(n, 1 / n), size=(2, n_draws)) / n
        return weights @ values.T

    null = [draws_of(a), draws_of(b)]
    out = []
    for key, prefix, deciding in (("component", "effect_rank", True), ("layer", "effect_rank_layer", False)):
        for value, rows in _by_group(shared, key).items():
            null_values = [_spearman(d[0, k, rows], d[1, k, rows]) for d in null for k in range(n_draws)]
            out.append(Measure(f"{prefix}/{value}", _spearman(mean_a[rows], mean_b[rows]),
                               band(null_values, level, "two independent bootstrap draws of each run's pairs"),
                               deciding, f"{len(rows)} sites"))
    return [m for m in out if m.deciding], [m for m in out if not m.deciding]


# ---- behaviour ------------------------------------------------------------------------------------------

def refusal_measures(rates_a: dict[str, float], n_a: int, rates_b: dict[str, float], n_b: int, level: float,
                     rng: np.random.Generator, n_draws: int = 2000) -> list[Measure]:
    """B's refusal rate minus A's per knock-out condition (plain, circuit knocked out, circuit alone)."""
    out = []
    for condition in sorted(set(rates_a) & set(rates_b)):
        pooled = (rates_a[condition] * n_a + rates_b[condition] * n_b) / (n_a + n_b)
        draws = rng.binomial(n_b, pooled, n_draws) / n_b - rng.binomial(n_a, pooled, n_draws) / n_a
        out.append(Measure(f"refusal_rate/{condition}", rates_b[condition] - rates_a[condition],
                           band(draws, level, "two binomial draws of the runs' pair counts at the pooled rate")))
    return out


def faithfulness_band(draws: list[float], intervals: list[tuple[float, float]], level: float,
                      honest: bool) -> Band | None:
    """The runs' faithfulness intervals joined with their re-searched circuits' faithfulness."""
    inner = band(draws, level, "") if draws else None
    lows = [lo for lo, _ in intervals] + ([inner.low] if inner else [])
    highs = [hi for _, hi in intervals] + ([inner.high] if inner else [])
    if not lows:
        return None
    source = "the runs' faithfulness intervals" + (" and their re-searched circuits on all their pairs" if draws
                                                    else "")
    return Band(min(lows), max(highs), len(draws) + 2 * len(intervals), source, honest)
