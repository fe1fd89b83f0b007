"""The compare folder of `patchsweep compare` (pipeline.run.compare): compare.json (every measure with its
band), compare.md (what a person reads, ending in the verdict line) and compare.png (each deciding measure
as a dot on its null band, one panel per run compared with the reference)."""
from __future__ import annotations

from dataclasses import asdict
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from pipeline.analysis.compare import Measure  # noqa: E402
from pipeline.store import publish_bytes, publish_file, publish_json  # noqa: E402

if TYPE_CHECKING:
    from pipeline.run.compare import Compared

COMPARE_JSON, COMPARE_MD, COMPARE_PNG = "compare.json", "compare.md", "compare.png"


def write(compared: Compared) -> dict:
    """The three files in compared.folder; returns their paths by name."""
    folder = compared.folder
    folder.mkdir(parents=True, exist_ok=True)
    publish_json(folder / COMPARE_JSON, to_json(compared))
    publish_bytes(folder / COMPARE_MD, markdown(compared).encode())
    publish_file(folder / COMPARE_PNG, lambda tmp: figure(compared, tmp))
    return {name: folder / name for name in (COMPARE_JSON, COMPARE_MD, COMPARE_PNG)}


def _measure(m: Measure) -> dict:
    return {"name": m.name, "value": m.value, "band": None if m.band is None else asdict(m.band),
            "deciding": m.deciding, "outside": m.outside, "note": m.note}


def to_json(compared: Compared) -> dict:
    ref = compared.reference
    return {
        "reference": str(ref.path.resolve()),
        "runs": [str(r.path.resolve()) for r in compared.runs],
        "models": {r.label: r.cfg.model.name for r in (ref, *compared.runs)},
        "verdict": compared.verdict.line,
        "comparisons": [{"run": c.run, "verdict": c.verdict.line, "honest_bands": c.honest,
                         "measures": [_measure(m) for m in c.measures],
                         "reported": [_measure(m) for m in c.reported],
                         "not_compared": c.not_compared} for c in compared.comparisons],
        "seconds": compared.seconds,
    }


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


TABLE_HEAD = ("| measure | value | null band | | |", "|---|---|---|---|---|")


def _row(m: Measure) -> str:
    span = "no band" if m.band is None else f"[{_num(m.band.low)}, {_num(m.band.high)}]"
    mark = "**outside**" if m.outside else ("inside" if m.band is not None and m.value is not None else "-")
    return f"| {m.name} | {_num(m.value)} | {span} | {mark} | {m.note} |"


def markdown(compared: Compared) -> str:
    ref = compared.reference
    lines = [f"# Compare: {' vs '.join(r.label for r in (ref, *compared.runs))}", "",
             f"Reference: `{ref.path.resolve()}` ({ref.cfg.model.name}). Each measure of a run against the reference "
             "is set against its null band: where the measure falls when only the prompt sample is re-drawn, from "
             "the runs' own resamples (the central share of the draws given by compare.level).", ""]
    for c in compared.comparisons:
        run = next(r for r in compared.runs if r.label == c.run)
        lines += [f"## {c.run} ({run.cfg.model.name})", "", *TABLE_HEAD, *[_row(m) for m in c.measures], ""]
        if not c.honest:
            lines += ["*The circuit bands are narrower than honest: a run stores no `stability.circuits` (its "
                      "independent re-searches), so they are drawn from the nodes' stored inclusion frequencies; "
                      "the faithfulness band is the runs' intervals over re-drawn pairs alone.*", ""]
        if c.reported:
            lines += ["Reported, not deciding:", "", *TABLE_HEAD, *[_row(m) for m in c.reported], ""]
        if c.not_compared:
            lines += ["Not compared:", "", *[f"- {line}" for line in c.not_compared], ""]
        lines += [c.verdict.line, ""]
    lines += [f"Took {compared.seconds:.1f} s.", "", compared.verdict.line, ""]
    return "\n".join(lines)


def _scaled(m: Measure, limit: float = 4.0) -> float:
    """The measure's place on its band scaled to [-1, 1] (outside beyond), clipped to +-limit."""
    mid, half = (m.band.low + m.band.high) / 2, (m.band.high - m.band.low) / 2
    if half <= 1e-12:
        return 0.0 if abs(m.value - mid) <= 1e-9 else float(np.sign(m.value - mid) * limit)
    return float(np.clip((m.value - mid) / half, -limit, limit))


def figure(compared: Compared, path) -> None:
    """Each deciding measure on its own band, scaled so that every band spans [-1, 1]: measures of
    different units share one axis; the values are written beside."""
    panels = compared.comparisons
    rows = max(len(c.measures) for c in panels)
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.4 * rows + 1.4), squeeze=False)
    for ax, c in zip(axes[0], panels):
        ax.axvspan(-1, 1, color="0.88")
        shown = [m for m in c.measures if m.band is not None and m.value is not None]
        for y, m in enumerate(shown):
            ax.plot(_scaled(m), y, "o", color="tab:red" if m.outside else "tab:blue")
            ax.text(4.3, y, f"{m.value:.3g} in [{m.band.low:.3g}, {m.band.high:.3g}]", va="center", fontsize=7)
        ax.set_yticks(range(len(shown)), [m.name for m in shown], fontsize=8)
        ax.set_xlim(-4.5, 9)
        ax.set_xticks([-4, -1, 0, 1, 4], ["-4", "band", "", "band", "4"])
        ax.invert_yaxis()
        ax.set_title(f"{c.run} vs {compared.reference.label}: {c.verdict.line.split(' (')[0]}", fontsize=9)
    fig.suptitle("each measure (dot) on its null band (grey, scaled to [-1, 1]); red: outside", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
