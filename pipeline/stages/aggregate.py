"""Stage 4: effects -> summary with bootstrap confidence intervals -> layer curves, heatmaps, report.

summary.arrow has one row per (model, direction, component, layer, head, position) with the mean
normalised effect over pairs, its percentile-bootstrap confidence interval (resampling pairs) and n.

Positions in the summary are counted from the end of the prompt (-1 = the final token, -2 the one
before, ...; null = all positions at once), so that pairs of different lengths line up at the chat
template, which ends every prompt; `token` names the token most pairs have there. effects.arrow keeps
each pair's absolute position (0-based) and its seq_len.

A circuit step (issue 5) slots in after `summarise`: it reads summary.arrow and the run folder and
writes circuit.json / .svg / .png, which `write_report` then includes.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from pipeline.store import read_table, write_table

KEY = ["model", "direction", "component", "layer", "head", "position"]


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


def relative_positions(effects: pd.DataFrame) -> pd.Series:
    """Absolute positions -> counted from the end (-1 = final token); all-positions rows stay NA."""
    return (effects["position"] - effects["seq_len"]).astype("Int32")


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

    `effects` needs the KEY columns with position already relative (see `relative_positions`), plus
    pair_id and effect. `tokens` labels relative positions. Non-finite effects are left out of n.
    """
    effects = effects[np.isfinite(effects["effect"])]
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
        means = bootstrap_means(values, n_bootstrap, rng)
        low, high = np.quantile(means, [alpha, 1 - alpha], axis=1)
        parts.append(pd.DataFrame({
            "mean": values.mean(axis=1), "ci_low": low, "ci_high": high,
            "std": values.std(axis=1, ddof=1) if values.shape[1] > 1 else np.zeros(len(values)),
            "n": np.full(len(values), values.shape[1], dtype=np.int32),
        }, index=block.index))
    summary = pd.concat(parts).reset_index().sort_values(KEY, na_position="first").reset_index(drop=True)
    tokens = tokens or {}
    summary["token"] = [tokens.get(int(p)) if pd.notna(p) else None for p in summary["position"]]
    return summary


def layer_curves(summary: pd.DataFrame) -> dict[tuple[str, str], list[LayerPoint]]:
    """(direction, component) -> per layer, the strongest site at that layer."""
    curves = {}
    for (direction, component), group in summary.groupby(["direction", "component"], sort=True):
        best = group.loc[group.groupby("layer")["mean"].idxmax()].sort_values("layer")
        curves[(direction, component)] = [
            LayerPoint(int(r.layer), float(r.mean), float(r.ci_low), float(r.ci_high), int(r.n),
                       None if pd.isna(r.head) else int(r.head),
                       None if pd.isna(r.position) else int(r.position),
                       r.token if isinstance(r.token, str) else None)
            for r in best.itertuples()
        ]
    return curves


def top_sites(summary: pd.DataFrame, k: int, direction: str | None = None) -> pd.DataFrame:
    rows = summary if direction is None else summary[summary["direction"] == direction]
    return rows.sort_values("mean", ascending=False).head(k)


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


def summary_table(summary: pd.DataFrame) -> pa.Table:
    schema = pa.schema([
        ("model", pa.string()), ("direction", pa.string()), ("component", pa.string()),
        ("layer", pa.int32()), ("head", pa.int32()), ("position", pa.int32()), ("token", pa.string()),
        ("mean", pa.float64()), ("ci_low", pa.float64()), ("ci_high", pa.float64()), ("std", pa.float64()),
        ("n", pa.int32()),
    ])
    frame = summary[[f.name for f in schema]].astype({"head": "Int32", "position": "Int32", "layer": "int32"})
    return pa.Table.from_pandas(frame, schema=schema, preserve_index=False).replace_schema_metadata(None)


def read_effects(path: Path) -> pd.DataFrame:
    """effects.arrow -> a frame with positions made relative (nullable ints keep 'all' as NA)."""
    effects = read_table(path).to_pandas(types_mapper={pa.int32(): pd.Int32Dtype()}.get)
    effects["position"] = relative_positions(effects)
    return effects


def run(run_dir: Path, circuit_cfg: dict, provenance: dict, tokens: dict[int, str]) -> pd.DataFrame:
    """effects.arrow -> summary.arrow (published atomically); returns the summary frame."""
    effects = read_effects(run_dir / "effects.arrow")
    summary = summarise(effects, circuit_cfg["n_bootstrap"], circuit_cfg["ci"], circuit_cfg["seed"], tokens)
    meta = {**provenance, "n_bootstrap": circuit_cfg["n_bootstrap"], "ci": circuit_cfg["ci"],
            "positions": "counted from the end: -1 = final token; null = all positions"}
    write_table(run_dir / "summary.arrow", summary_table(summary), meta)
    return summary


def load_circuit(run_dir: Path) -> dict | None:
    path = run_dir / "circuit.json"
    return json.loads(path.read_text()) if path.is_file() else None
