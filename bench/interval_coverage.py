"""How often the summary's 95% intervals cover the true mean effect, by number of pairs n (simulated).

The summary gives each site a percentile-bootstrap interval over pairs (pipeline.analysis.statistics,
`bootstrap_means` with 1000 resamples). Below some n no interval method holds its nominal coverage:
this script measures the pipeline's method, with a t interval beside it for comparison, on samples
of n pairs drawn from three populations:

  normal        effects normally distributed (the easy case)
  skewed        lognormal effects (sigma 1: a long right tail, as a few pairs that respond strongly give)
  refusal-tiny  the model's own effects: every site of a full sweep (resid_pre per position, attn_out,
                mlp_out and every head over all positions, denoising) over its screened pairs of one
                length; each site's pairs are the population and their mean the truth; sites whose
                effect is the same on every pair are left out (any interval covers a constant)

It prints the table in docs/statistics.md and the `COVERAGE` rows of pipeline/analysis/statistics.py,
which the report quotes at a run's n; tests/test_statistics.py re-runs a cheap part and checks both.

    python bench/interval_coverage.py                  # the full table (a few minutes on 2 cores)
    python bench/interval_coverage.py --reps 500 --populations normal,skewed
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.analysis.statistics import COVERAGE_NS, bootstrap_means  # noqa: E402

CI = 0.95
N_BOOTSTRAP = 1000  # the summary's default (summary.n_bootstrap)


def percentile_covers(samples: np.ndarray, truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """samples [R, n] -> whether each row's percentile-bootstrap interval holds its truth [R], computed
    exactly as the summary computes it."""
    means = bootstrap_means(samples, N_BOOTSTRAP, rng)  # one resampling shared by the rows, as for sites
    low, high = np.quantile(means, [(1 - CI) / 2, 1 - (1 - CI) / 2], axis=1)
    return (low <= truth) & (truth <= high)


def t_covers(samples: np.ndarray, truth: np.ndarray) -> np.ndarray:
    n = samples.shape[1]
    half = stats.t.ppf(1 - (1 - CI) / 2, n - 1) * samples.std(axis=1, ddof=1) / np.sqrt(n)
    centre = samples.mean(axis=1)
    return (centre - half <= truth) & (truth <= centre + half)


def synthetic(name: str):
    """(draw(rng, reps, n) -> samples [reps, n], truth)."""
    if name == "normal":
        return lambda rng, reps, n: rng.normal(0.3, 0.25, (reps, n)), 0.3
    if name == "skewed":
        return lambda rng, reps, n: rng.lognormal(0.0, 1.0, (reps, n)), float(np.exp(0.5))
    raise ValueError(name)


def refusal_tiny_effects(n_grammar_pairs: int = 4096) -> np.ndarray:
    """[pairs, sites] normalised effects of refusal-tiny's full denoising sweep over its screened
    held-out pairs of the most common token length."""
    import tempfile
    from collections import Counter

    import torch

    from pipeline.engine.adapters import get_adapter
    from pipeline.engine.hooks import COMPONENTS
    from pipeline.engine.loading import load_model
    from pipeline.engine.metrics import Answers
    from pipeline.engine.patching import Variants, sweep, variants_for
    from pipeline.organisms import resolve
    from pipeline.schema import PromptsConfig
    from pipeline.stages.pairs import run_in_process

    model, tokenizer = load_model(resolve("refusal-tiny"))
    with tempfile.TemporaryDirectory() as folder:
        rows = run_in_process(model, tokenizer, "refusal-tiny", PromptsConfig(n_pairs=n_grammar_pairs, seed=1),
                              Path(folder))[0].to_pylist()
    length = Counter(r["seq_len"] for r in rows).most_common(1)[0][0]
    rows = [r for r in rows if r["seq_len"] == length]
    clean = torch.tensor([r["clean_ids"] for r in rows])
    corrupted = torch.tensor([r["corrupted_ids"] for r in rows])
    answers = Answers(torch.tensor([r["refusal_ids"] for r in rows]), torch.tensor([r["compliance_ids"] for r in rows]))
    adapter = get_adapter(model)
    variants = Variants.concat([variants_for(adapter, c, length, per_position=c == "resid_pre") for c in COMPONENTS])
    effects = sweep(model, clean, corrupted, answers, variants).effects().numpy().astype(np.float64)
    varying = np.isfinite(effects).all(axis=0) & (effects.std(axis=0) > 1e-6)
    print(f"refusal-tiny: {len(rows)} screened pairs of {length} tokens, {int(varying.sum())} of {effects.shape[1]} "
          "sites whose effect varies over pairs", flush=True)
    return effects[:, varying]


def coverage(population: str, n: int, reps: int, rng: np.random.Generator, effects: np.ndarray | None = None,
             chunk: int = 250) -> tuple[float, float]:
    """(percentile bootstrap, t) coverage at n over `reps` simulated runs."""
    hits_percentile, hits_t = 0, 0
    for start in range(0, reps, chunk):
        size = min(chunk, reps - start)
        if effects is None:
            draw, truth = synthetic(population)
            samples, truths = draw(rng, size, n), np.full(size, truth)
        else:  # a random site per run, its pairs resampled: the site's pairs are the population
            sites = rng.integers(0, effects.shape[1], size)
            picks = rng.integers(0, effects.shape[0], (size, n))
            samples, truths = effects[picks, sites[:, None]], effects.mean(axis=0)[sites]
        hits_percentile += int(percentile_covers(samples, truths, rng).sum())
        if n > 1:
            hits_t += int(np.nan_to_num(t_covers(samples, truths).astype(float)).sum())
    return hits_percentile / reps, hits_t / reps


def main(argv: list[str] | None = None) -> dict[str, dict[int, float]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=4000, help="simulated runs per (population, n)")
    parser.add_argument("--ns", default=",".join(map(str, COVERAGE_NS)))
    parser.add_argument("--populations", default="normal,skewed,refusal-tiny")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    ns = [int(n) for n in args.ns.split(",")]
    populations = args.populations.split(",")
    rng = np.random.default_rng(args.seed)
    effects = refusal_tiny_effects() if "refusal-tiny" in populations else None
    start = time.perf_counter()
    table: dict[str, dict[int, float]] = {}
    t_table: dict[str, dict[int, float]] = {}
    for population in populations:
        table[population], t_table[population] = {}, {}
        for n in ns:
            table[population][n], t_table[population][n] = coverage(
                population, n, args.reps, rng, effects if population == "refusal-tiny" else None)
    print(f"\n{args.reps} simulated runs per cell, {N_BOOTSTRAP} bootstrap resamples, nominal {CI:.0%} "
          f"({time.perf_counter() - start:.0f} s)\n")
    print("| n pairs | " + " | ".join(f"{p}: percentile (t)" for p in populations) + " |")
    print("|---|" + "---|" * len(populations))
    for n in ns:
        cells = [f"{table[p][n]:.2f} ({t_table[p][n]:.2f})" if n > 1 else f"{table[p][n]:.2f} (-)" for p in populations]
        print(f"| {n} | " + " | ".join(cells) + " |")
    print("\nCOVERAGE rows for pipeline/analysis/statistics.py (percentile bootstrap):")
    for n in ns:
        print(f"    {n}: ({', '.join(f'{table[p][n]:.2f}' for p in populations)}),")
    return table


if __name__ == "__main__":
    main()
