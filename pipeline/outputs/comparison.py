"""The sweeps of one command side by side (the parent MLflow run's comparison): comparison.png,
comparison.md and the table both are drawn from.

Models differ in depth, so layers are put on one axis as relative depth: 0 is the first layer, 1 the
last. The figure has a panel per component (resid_pre, attn_out, mlp_out) with a line per sweep: each
layer's strongest site (as in the layer curves of the run's summary), denoising direction. The table has a
row per sweep: where each component's effect peaks, the circuit's size and faithfulness, and the layer of
the refusal direction, each as relative depth too: the selected direction (direction.arrow) where the sweep
has one, else the circuit's best final-token mean difference (circuit.json's mean_difference), and the
`direction_from` column says which.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from pipeline.analysis.circuit.result import Circuit  # noqa: E402
from pipeline.analysis.directions import selection_summary  # noqa: E402
from pipeline.analysis.statistics import LayerPoint  # noqa: E402
from pipeline.outputs.files import DIRECTION  # noqa: E402
from pipeline.store import publish_file  # noqa: E402

COMPONENTS = ("resid_pre", "attn_out", "mlp_out")


@dataclass
class Compared:
    """One finished sweep, as the comparison needs it."""

    label: str  # what tells it apart from the command's other sweeps (the model, or the swept values)
    model: str
    family: str
    n_layers: int
    n_pairs: int  # pairs kept by the screen
    curves: dict[tuple[str, str], list[LayerPoint]]  # (direction, component) -> per-layer strongest site
    circuit: Circuit | None
    run_dir: Path


def relative_depth(layer: int, n_layers: int) -> float:
    return layer / (n_layers - 1) if n_layers > 1 else 0.0


def direction_of(curves: dict) -> str:
    """The direction the comparison shows: denoise (clean into corrupted) when the sweep has it."""
    directions = {direction for direction, _ in curves}
    return "denoise" if "denoise" in directions or not directions else sorted(directions)[0]


SELECTED = f"selected ({DIRECTION.name})"
MEAN_DIFFERENCE = "circuit's final-token mean difference"


def direction_layer(run: Compared) -> tuple[int | None, str | None]:
    """(layer, where it comes from): the selected refusal direction's layer, else the layer where the
    circuit's final-token mean difference works best, else (None, None)."""
    summary = selection_summary(run.run_dir)
    if summary is not None and summary["chosen"] is not None:
        return summary["chosen"]["layer"], SELECTED
    if run.circuit is not None:
        return run.circuit.mean_difference.best_layer, MEAN_DIFFERENCE
    return None, None


def comparison_table(runs: list[Compared]) -> pd.DataFrame:
    rows = []
    for run in runs:
        direction = direction_of(run.curves)
        row = {"sweep": run.label, "model": run.model, "family": run.family, "layers": run.n_layers,
               "pairs": run.n_pairs, "direction": direction}
        for component in COMPONENTS:
            points = run.curves.get((direction, component), [])
            peak = max(points, key=lambda p: p.mean) if points else None
            row[f"{component}_peak_depth"] = round(relative_depth(peak.layer, run.n_layers), 3) if peak else None
            row[f"{component}_peak_effect"] = round(peak.mean, 4) if peak else None
        circuit = run.circuit
        row["circuit_nodes"] = circuit.size if circuit else None
        row["circuit_fraction"] = round(circuit.fraction, 4) if circuit else None
        row["faithfulness"] = round(circuit.faithfulness, 4) if circuit else None
        ci = circuit.faithfulness_ci if circuit else None
        row["faithfulness_ci"] = f"[{ci[0]:.3f}, {ci[1]:.3f}]" if ci and None not in ci else None
        layer, source = direction_layer(run)
        row["direction_best_depth"] = round(relative_depth(layer, run.n_layers), 3) if layer is not None else None
        row["direction_from"] = source
        rows.append(row)
    return pd.DataFrame(rows)


def comparison_png(runs: list[Compared], path: Path, title: str) -> Path:
    """A panel per component, effect against relative depth, a line per sweep (its circuit's size and
    faithfulness in the legend)."""
    fig, axes = plt.subplots(1, len(COMPONENTS), figsize=(4.2 * len(COMPONENTS), 3.6), sharex=True, sharey=True)
    for ax, component in zip(axes, COMPONENTS):
        for run in runs:
            points = sorted(run.curves.get((direction_of(run.curves), component), []), key=lambda p: p.layer)
            if not points:
                continue
            depth = [relative_depth(p.layer, run.n_layers) for p in points]
            label = run.label
            if run.circuit:
                label += f" ({run.circuit.size} nodes, faith. {run.circuit.faithfulness:.2f})"
            [line] = ax.plot(depth, [p.mean for p in points], marker="o", markersize=3, label=label)
            ax.fill_between(depth, [p.ci_low for p in points], [p.ci_high for p in points], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.set_title(component)
        ax.set_xlabel("relative depth (0 = first layer, 1 = last)")
        ax.set_xlim(-0.03, 1.03)
    axes[0].set_ylabel("effect (strongest site per layer, denoise)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8, frameon=False)
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0.06 + 0.04 * ((len(labels) - 1) // 3), 1, 1))
    publish_file(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def comparison_markdown(table: pd.DataFrame, title: str, figure: str | None = None) -> str:
    """The table as markdown (the parent run's description and comparison.md), the figure above it."""
    lines = [f"## {title}", ""]
    if figure:
        lines += [f"![effects against relative depth]({figure})", ""]
    shown = table.astype(object).where(table.notna(), "-")
    lines.append("| " + " | ".join(shown.columns) + " |")
    lines.append("|" + "---|" * len(shown.columns))
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in shown.itertuples(index=False)]
    lines += ["", "Depths are relative (0 = first layer, 1 = last); peaks are each component's strongest layer in "
              "the denoising direction; `direction_best_depth` is the refusal direction's layer: the selected one "
              f"({DIRECTION.name}: Arditi et al.'s selection) where `direction_from` says so, else the layer where the "
              "circuit's difference of means at the final token works best by addition and ablation."]
    return "\n".join(lines) + "\n"
