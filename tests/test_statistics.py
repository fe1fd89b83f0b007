"""Statistics that cannot mislead: no interval below the minimum n, the coverage quoted at a run's n backed
by the simulation (bench/interval_coverage.py) and shown in docs/statistics.md, repeated pairs counted once and
repeated layers swept once, through the real command."""
from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, write_jsonl
from pipeline.analysis.statistics import (
    COVERAGE,
    COVERAGE_NS,
    COVERAGE_POPULATIONS,
    KEY,
    MIN_PAIRS_FOR_INTERVAL,
    interval_coverage,
    summarise,
)
from pipeline.store import read_table

sys.path.insert(0, str(REPO / "bench"))
import interval_coverage as simulation  # noqa: E402


def effects_of(n_pairs: int, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"model": "m", "direction": "denoise", "component": "attn_out", "layer": 0,
                         "head": pd.array([pd.NA] * n_pairs, dtype="Int32"),
                         "position": pd.array([pd.NA] * n_pairs, dtype="Int32"),
                         "pair_id": np.arange(n_pairs), "effect": rng.normal(0.5, 0.2, n_pairs)})


def test_no_interval_below_the_minimum_n():
    for n in (1, 2, MIN_PAIRS_FOR_INTERVAL - 1):
        [row] = summarise(effects_of(n)).itertuples()
        assert np.isnan(row.ci_low) and np.isnan(row.ci_high) and row.n == n
        assert np.isnan(row.std) == (n == 1)  # one pair has no spread to speak of (not a spread of 0)
        assert interval_coverage(n) is None
    [row] = summarise(effects_of(MIN_PAIRS_FOR_INTERVAL)).itertuples()
    assert row.ci_low < row.mean < row.ci_high


def test_coverage_table_is_the_simulations():
    """The stored table agrees with a fresh, smaller run of the simulation (synthetic populations; the
    refusal-tiny column needs the model and minutes), and docs/statistics.md shows the stored table."""
    rng = np.random.default_rng(1)
    for population in ("normal", "skewed"):
        column = COVERAGE_POPULATIONS.index(population)
        for n in (4, MIN_PAIRS_FOR_INTERVAL, 32):
            percentile, _ = simulation.coverage(population, n, 2000, rng)
            assert abs(percentile - COVERAGE[n][column]) < 0.035, (population, n, percentile, COVERAGE[n])
    # Below the minimum, no population gets near 95%; from the minimum on, normal data gets 90% or more.
    assert all(COVERAGE[n][0] < 0.9 for n in COVERAGE_NS if n < MIN_PAIRS_FOR_INTERVAL)
    assert all(COVERAGE[n][0] >= 0.895 for n in COVERAGE_NS if n >= MIN_PAIRS_FOR_INTERVAL)
    page = (REPO / "docs" / "statistics.md").read_text().split("## Coverage by number of pairs")[1].split("\n## ")[0]
    for n, row in COVERAGE.items():
        cells = re.search(rf"^\| {n} \| (.+) \|$", page, re.M)
        assert cells, f"docs/statistics.md lacks the coverage row for n = {n}"
        shown = [float(cell.split()[0]) for cell in cells.group(1).split(" | ")]
        assert shown == [round(c, 2) for c in row], (n, shown, row)
    assert interval_coverage(32) == (min(COVERAGE[32]), max(COVERAGE[32]))
    assert interval_coverage(40) == interval_coverage(32)  # the largest tabulated n at or below


@pytest.mark.slow
def test_repeated_pairs_and_layers_count_once(tmp_path):
    """A pairs file holding each of 4 pairs four times, swept with patching.layers=[0,0,0]: the summary
    counts n = 4 (and says 12 repeats were dropped), effects.parquet has one row per pair and site, and
    with 4 pairs the report says there is no interval."""
    from pipeline.organisms.refusal_tiny import grammar

    pairs = [{"clean": p.clean, "corrupted": p.corrupted, "category": p.category}
             for p in grammar.pairs(4, 3, "heldout")]
    path = write_jsonl(tmp_path / "pairs.jsonl", pairs * 4)
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipeline", "experiment=refusal_tiny", f"prompts.path={path}",
                             "patching.layers=[0,0,0]", "patching.components=[attn_out,head]",
                             "patching.directions=[denoise]", "circuit.enabled=false", "tracking.enabled=false",
                             f"output_root={tmp_path}", f"output_dir={out}"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "4 of 4 pairs kept by the behaviour screen (100%) (12 repeated pairs dropped first" in result.stdout
    assert f"With n = 4 pairs, n too small for an interval (the minimum is {MIN_PAIRS_FOR_INTERVAL}" in result.stdout
    assert "(n too small for an interval)  n=4" in result.stdout
    effects = read_table(out / "effects.parquet").to_pandas()
    assert effects["pair_id"].nunique() == 4 and set(effects["layer"]) == {0}
    assert not effects.duplicated(subset=["pair_id", *KEY]).any()
    assert len(effects) == 4 * (1 + 4 + 3)  # attn_out and 4 heads at layer 0, all positions; attn_out at 3 classes
    summary = read_table(out / "summary.parquet")
    assert set(summary.column("n").to_pylist()) == {4}
    assert summary.column("ci_low").null_count == summary.num_rows  # no interval, not a made-up one
    report = (out / "report.md").read_text()
    assert "n too small for an interval" in report and "12 repeated pairs dropped" in report
    rows = [line for line in report.splitlines() if line.startswith("| denoise |")]
    assert rows and all("(n too small for an interval)" in row for row in rows), rows


@pytest.mark.parametrize("n", [MIN_PAIRS_FOR_INTERVAL, 32, 500])
def test_report_quotes_the_coverage_at_the_runs_n(n):
    from pipeline.outputs.report import interval_line

    summary = pd.DataFrame({"n": [n, n]})
    line = interval_line(summary, 0.95)
    low, high = interval_coverage(n)
    held = f"{100 * low:.0f}-{100 * high:.0f}%"
    assert f"At n = {n} pairs, 95% intervals of this kind held the true mean in {held}" in line
