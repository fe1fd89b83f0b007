"""Heatmaps of the summary (layers.png).

One row of panels per direction: first the position classes (each component patched at the harmful
tokens, the rest of the instruction and the template's end at once) as layer x (component, class); then
per component present: each component patched per position as layer x position (positions counted from
the end, labelled with their tokens); attn_out and mlp_out over all positions side by side as layer x
{attn_out, mlp_out}; heads over all positions as layer x head. Patches that replace the input
(statistics.replaces_input) are drawn grey: their effect is complete by construction.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.analysis.positions import CLASS_TITLES, HEADLINE_CLASSES  # noqa: E402
from pipeline.engine.hooks import COMPONENTS  # noqa: E402
from pipeline.store import publish_file  # noqa: E402

CMAP = plt.get_cmap("RdBu_r").with_extremes(bad="0.85")  # grey: a site replacing the input, or not patched


def _grid(rows: pd.DataFrame, column: str, n_layers: int) -> tuple[np.ndarray, list]:
    keys = sorted(rows[column].dropna().unique().tolist())
    grid = np.full((n_layers, len(keys)), np.nan)
    col_of = {k: i for i, k in enumerate(keys)}
    for r in rows.itertuples():
        grid[int(r.layer), col_of[getattr(r, column)]] = r.mean
    return grid, keys


def _panels(summary: pd.DataFrame, direction: str) -> list[tuple[str, np.ndarray, list[str], str]]:
    """(title, [layers, columns] grid, column labels, x-axis name) for each panel of one direction."""
    rows = summary[summary["direction"] == direction]
    n_layers = int(summary["layer"].max()) + 1
    rows = rows.assign(mean=rows["mean"].where(~rows["replaces_input"].astype(bool)))  # NaN: drawn grey
    panels, whole = [], {}
    classes = rows[rows["position_class"].notna()]
    if not classes.empty:
        order = {c: i for i, c in enumerate(HEADLINE_CLASSES)}
        keys = sorted({(r.component, r.position_class) for r in classes.itertuples()},
                      key=lambda key: (COMPONENTS.index(key[0]), order[key[1]]))
        grid = np.full((n_layers, len(keys)), np.nan)
        for r in classes.itertuples():
            grid[int(r.layer), keys.index((r.component, r.position_class))] = r.mean
        panels.append(("position classes", grid, [f"{c} @ {CLASS_TITLES[k]}" for c, k in keys], ""))
    rows = rows[rows["position_class"].isna()]
    for component in ("resid_pre", "attn_out", "mlp_out"):
        part = rows[rows["component"] == component]
        if part["position"].notna().any():
            part = part[part["position"].notna()]
            grid, keys = _grid(part, "position", n_layers)
            tokens = {p: t for p, t in zip(part["position"], part["token"]) if isinstance(t, str)}
            labels = [f"{tokens.get(k, '')!r} {k}" if k in tokens else str(k) for k in keys]
            panels.append((component, grid, labels, "position from end: token"))
        elif not part.empty:
            column = np.full(n_layers, np.nan)
            for r in part.itertuples():
                column[int(r.layer)] = r.mean
            whole[component] = column
    if whole:  # per-layer components over all positions share one panel, a column each
        panels.append((" | ".join(whole) + " (all positions)", np.stack(list(whole.values()), axis=1),
                       list(whole), ""))
    heads = rows[(rows["component"] == "head") & rows["position"].isna()]
    if not heads.empty:
        grid, keys = _grid(heads, "head", n_layers)
        panels.append(("head (all positions)", grid, [str(int(k)) for k in keys], "head"))
    return panels


def layers_png(summary: pd.DataFrame, path: Path, title: str) -> Path:
    """Draw every direction's panels into one PNG (published atomically)."""
    directions = [d for d in ("denoise", "noise") if d in set(summary["direction"])]
    panels = {d: _panels(summary, d) for d in directions}
    n_cols = max(len(p) for p in panels.values())
    widths = [max(1.2, 0.28 * len(panel[2])) for panel in max(panels.values(), key=len)]
    n_layers = int(summary["layer"].max()) + 1
    height = max(2.5, 0.22 * n_layers + 1.6)
    fig, axes = plt.subplots(len(directions), n_cols,
                             figsize=(sum(widths) + 1.5 * n_cols + 1.5, height * len(directions)),
                             squeeze=False, gridspec_kw={"width_ratios": widths}, layout="constrained")
    image = None
    for row, direction in enumerate(directions):
        for col in range(n_cols):
            ax = axes[row, col]
            if col >= len(panels[direction]):
                ax.axis("off")
                continue
            name, grid, labels, xlabel = panels[direction][col]
            image = ax.imshow(grid, origin="lower", aspect="auto", cmap=CMAP, vmin=-1, vmax=1,
                              interpolation="nearest")
            ax.set_title(f"{direction}: {name}", fontsize=9)
            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=90, fontsize=6)
            ax.set_xlabel(xlabel, fontsize=8)
            ax.set_ylabel("layer", fontsize=8)
            ax.tick_params(axis="y", labelsize=7)
    fig.suptitle(f"{title}\nmean normalised effect over pairs (1 = the patch fully restores the source run)",
                 fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=axes, shrink=0.6, label="effect")
    publish_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
    return path
