"""Statistics over pairs: per-site means with paired-bootstrap confidence intervals, layer curves,
behaviour flips and per-category breakdowns.

A site is (model, direction, component, layer, head, position, position_class: a position class patched
at once, see pipeline.analysis.positions). The summary has one row per site with
the mean normalised effect over pairs, its percentile-bootstrap confidence interval (resampling pairs)
and n. Below `MIN_PAIRS_FOR_INTERVAL` pairs a site gets no interval (null bounds): no interval method
comes near its nominal coverage there. `COVERAGE` holds the method's simulated coverage by n, which
the report quotes at a run's n (bench/interval_coverage.py measures it; docs/statistics.md shows the
table). Positions in the summary are counted from the end of the prompt (-1 = the final token, -2 the
one before, ...; null = all positions at once), so that pairs of different lengths line up at the chat
template, which ends every prompt; `token` names the token most pairs have there. The files keep both
conventions (`position` from the start, `position_from_end`); the frames here name the one they use
`position`, read in by `read_effects` and `read_summary`. `replaces_input` marks the sites whose patch
is complete by construction (`replaces_input`): rankings leave them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.store import read_table

KEY = ["model", "direction", "component", "layer", "head", "position", "position_class"]

# Coverage of the summary's 95% percentile-bootstrap intervals (1000 resamples) by number of pairs n:
# the share of simulated runs whose interval held the true mean, for normal, skewed (lognormal) and
# refusal-tiny's own effects (bench/interval_coverage.py, 4000 runs per cell).
COVERAGE_POPULATIONS = ("normal", "skewed", "refusal-tiny")
COVERAGE: dict[int, tuple[float, float, float]] = {
    1: (0.00, 0.00, 0.00),
    2: (0.50, 0.42, 0.32),
    3: (0.74, 0.63, 0.49),
    4: (0.81, 0.69, 0.53),
    5: (0.83, 0.73, 0.57),
    6: (0.86, 0.73, 0.59),
    8: (0.89, 0.77, 0.65),
    10: (0.91, 0.81, 0.68),
    12: (0.91, 0.81, 0.69),
    16: (0.92, 0.84, 0.74),
    20: (0.92, 0.86, 0.75),
    24: (0.93, 0.87, 0.78),
    32: (0.94, 0.88, 0.80),
    48: (0.94, 0.90, 0.83),
    64: (0.94, 0.91, 0.87),
    128: (0.95, 0.92, 0.91),
}
COVERAGE_NS = tuple(COVERAGE)
# Below this n there is no interval: the method covers the true mean of normal data in under 90% of runs.
MIN_PAIRS_FOR_INTERVAL = 10


def interval_coverage(n: int) -> tuple[float, float] | None:
    """(lowest, highest) simulated coverage over the populations of a 95% interval from n pairs: the row
    of the largest tabulated n at or below it (coverage grows with n); None below the minimum n."""
    if n < MIN_PAIRS_FOR_INTERVAL:
        return None
    row = COVERAGE[max(m for m in COVERAGE if m <= n)]
    return min(row), max(row)


@dataclass
class LayerPoint:
    """The strongest site of one component at one layer (max mean effect over heads and positions)."""
    layer: int
    mean: float
    ci_low: float
    ci_high: float
    n: int
    head: int | None
    position: int | None
    token: str | None


def bootstrap_means(values: np.ndarray, n_bootstrap: int, rng: np.random.Generator) -> np.ndarray:
    """values [G, n] (G groups over the same n pairs) -> bootstrap means [G, B].

    One resampling of the pairs is shared by all groups (a paired bootstrap); each resample is a row
    of multinomial weights, so all groups' means are one matrix product.
    """
    n = values.shape[1]
    weights = rng.multinomial(n, np.full(n, 1.0 / n), size=n_bootstrap).astype(np.float64) / n  # [B, n]
    return values @ weights.T


def summarise(effects: pd.DataFrame, n_bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
              tokens: dict[int, str] | None = None) -> pd.DataFrame:
    """Long effects (one row per pair and site) -> one row per site with mean, CI and n.

    `effects` needs the KEY columns with position counted from the end (see `read_effects`), plus
    pair_id and effect. `tokens` labels relative positions. Non-finite effects are left out of n. A site
    of fewer than `MIN_PAIRS_FOR_INTERVAL` pairs gets NaN bounds (and NaN std for a single pair).
    """
    effects = _keyed(effects[np.isfinite(effects["effect"])])
    wide = effects.pivot_table(index=KEY, columns="pair_id", values="effect", aggfunc="first", dropna=False)
    wide = wide.dropna(how="all")
    rng = np.random.default_rng(seed)
    alpha = (1 - ci) / 2
    parts = []
    # Sites measured on the same set of pairs share one bootstrap; usually that is every site.
    present = wide.notna().to_numpy()
    signatures = pd.Series([row.tobytes() for row in present], index=wide.index)
    for _, index in signatures.groupby(signatures, sort=False).groups.items():
        block = wide.loc[index]
        cols = block.columns[block.iloc[0].notna().to_numpy()]
        values = block[cols].to_numpy(dtype=np.float64)
        if values.shape[1] >= MIN_PAIRS_FOR_INTERVAL:
            means = bootstrap_means(values, n_bootstrap, rng)
            low, high = np.quantile(means, [alpha, 1 - alpha], axis=1)
        else:
            low = high = np.full(len(values), np.nan)
        parts.append(pd.DataFrame({
            "mean": values.mean(axis=1), "ci_low": low, "ci_high": high,
            "std": values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.full(len(values), np.nan),
            "n": np.full(len(values), values.shape[1], dtype=np.int32),
        }, index=block.index))
    summary = pd.concat(parts).reset_index().sort_values(KEY, na_position="first").reset_index(drop=True)
    tokens = tokens or {}
    summary["token"] = [tokens.get(int(p)) if pd.notna(p) else None for p in summary["position"]]
    summary["replaces_input"] = replaces_input(summary)
    return summary


def _keyed(effects: pd.DataFrame) -> pd.DataFrame:
    """Effects with every KEY column: a frame of single positions and whole layers only (a user's, or an
    effects file without position classes) gets a null position_class."""
    return effects if "position_class" in effects else effects.assign(position_class=None)


def replaces_input(sites: pd.DataFrame) -> pd.Series:
    """Sites whose patch replaces the model's input, so that its effect is complete by construction and
    says nothing about where the model computes refusal: the whole residual stream (resid_pre at every
    position, at any layer), and a layer-0 output or residual at every position or at the harmful tokens
    (every token where the two prompts differ)."""
    everywhere = sites["position"].isna() & sites["position_class"].isna()
    whole_layer = sites["component"].isin(["resid_pre", "attn_out", "mlp_out"])
    at_input = (sites["layer"] == 0) & whole_layer & (everywhere | (sites["position_class"] == "harm"))
    return (((sites["component"] == "resid_pre") & everywhere) | at_input).fillna(False).astype(bool)


def layer_curves(summary: pd.DataFrame) -> dict[tuple[str, str], list[LayerPoint]]:
    """(direction, component) -> per layer, the strongest site at that layer."""
    curves = {}
    per_site = summary[summary["position_class"].isna()]  # positions one at a time or all at once
    for (direction, component), group in per_site.groupby(["direction", "component"], sort=True):
        best = group.loc[group.groupby("layer")["mean"].idxmax()].sort_values("layer")
        curves[(direction, component)] = [
            LayerPoint(int(r.layer), float(r.mean), float(r.ci_low), float(r.ci_high), int(r.n),
                       None if pd.isna(r.head) else int(r.head),
                       None if pd.isna(r.position) else int(r.position),
                       r.token if isinstance(r.token, str) else None)
            for r in best.itertuples()
        ]
    return curves


def read_effects(path: Path) -> pd.DataFrame:
    """effects.parquet -> a frame whose `position` counts from the end (nullable ints keep 'all' as NA)."""
    return _from_end(path)


def read_summary(path: Path) -> pd.DataFrame:
    """summary.parquet -> a frame whose `position` counts from the end, as `summarise` returns it."""
    return _from_end(path)


def _from_end(path: Path) -> pd.DataFrame:
    frame = read_table(path).to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    frame["position"] = frame["position_from_end"]
    return frame.drop(columns="position_from_end")


def bootstrap_ratio_ci(numerator: np.ndarray, denominator: np.ndarray, n_bootstrap: int, ci: float,
                       rng: np.random.Generator) -> tuple[float, float]:
    """Percentile bootstrap interval over pairs of mean(numerator) / mean(denominator)."""
    means = bootstrap_means(np.stack([numerator, denominator]).astype(np.float64), n_bootstrap, rng)
    ratio = means[0] / means[1]
    low, high = np.quantile(ratio, [(1 - ci) / 2, 1 - (1 - ci) / 2])
    return float(low), float(high)


def bootstrap_mean_ci(values: np.ndarray, n_bootstrap: int, ci: float, rng: np.random.Generator) -> np.ndarray:
    """values [G, P] -> [G, 2] percentile bootstrap intervals of the mean over pairs."""
    means = bootstrap_means(values.astype(np.float64), n_bootstrap, rng)
    return np.quantile(means, [(1 - ci) / 2, 1 - (1 - ci) / 2], axis=1).T


def flip_fractions(effects) -> pd.DataFrame:
    """Per site (KEY columns), the fraction of pairs whose behaviour the patch flips: the patched
    metric's sign differs from the base run's (denoise: the harmless run now refuses; noise: the
    harmful run now complies)."""
    effects = _keyed(effects)
    base = np.where(effects["direction"] == "denoise", effects["metric_corrupted"], effects["metric_clean"])
    flipped = (effects["metric_patched"].to_numpy() > 0) != (base > 0)
    frame = effects[KEY].copy()
    frame["flipped"] = flipped
    return frame.groupby(KEY, dropna=False, sort=True)["flipped"].mean().rename("flip_fraction").reset_index()


def category_means(effects, pairs: pa.Table) -> pd.DataFrame:
    """Per site and prompt category: mean normalised effect and n."""
    category = dict(zip(pairs.column("pair_id").to_pylist(), pairs.column("category").to_pylist()))
    effects = _keyed(effects)
    frame = effects[KEY + ["effect"]].copy()
    frame["category"] = effects["pair_id"].map(category)
    grouped = frame.groupby(KEY + ["category"], dropna=False, sort=True)["effect"]
    return grouped.agg(mean="mean", n="count").reset_index()


def site_breakdown(effects: pd.DataFrame, pairs: pa.Table, top_k: int) -> list[dict]:
    """The strongest sites per direction (`read_effects`' frame) with their flip fraction and per-category
    mean effects."""
    effects = _keyed(effects)
    means = effects.groupby(KEY, dropna=False, sort=True)["effect"].mean().rename("mean").reset_index()
    flips = flip_fractions(effects)
    cats = category_means(effects, pairs)
    table = means.merge(flips, on=KEY)
    table = table[~replaces_input(table).to_numpy()]
    out = []
    for _, rows in table.groupby("direction"):
        for r in rows.sort_values("mean", ascending=False).head(top_k).itertuples():
            key = {c: getattr(r, c) for c in KEY}
            match = cats
            for c in KEY:
                match = match[match[c].isna()] if _isna(key[c]) else match[match[c] == key[c]]
            out.append({**{c: (None if _isna(v) else (v if isinstance(v, str) else int(v))) for c, v in key.items()},
                        "mean": float(r.mean), "flip_fraction": float(r.flip_fraction),
                        "per_category": {m.category: {"mean": float(m.mean), "n": int(m.n)}
                                         for m in match.itertuples()}})
    return out


def _isna(value) -> bool:
    return bool(pd.isna(value))
