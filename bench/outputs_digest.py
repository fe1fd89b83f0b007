"""A stored digest of a run's numbers, and the check that a later run reproduces them.

    python bench/outputs_digest.py save    <run folder> <digest folder>
    python bench/outputs_digest.py compare <run folder> <digest folder> [--rtol 1e-5] [--atol 1e-5]

The digest holds effects.parquet and summary.parquet (sorted by their keys) and the values of circuit.json
and sites.json flattened to (path, value) rows: the numbers a refactoring must not change. Run times, the run id (new
every run) and the config hash (which follows the config's layout, not its meaning) are left out.

Numbers are compared within atol + rtol * |stored|: float32 results are reproducible to the last few bits only
on one CPU and batch shape (metrics near 30 move by ~5e-6 between machines, a few ulps), so the tolerance is
relative to each value's magnitude, while a change of 1e-4 in an effect near 1 still fails.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.store import read_table  # noqa: E402

EFFECT_KEY = ["direction", "component", "layer", "head", "position", "position_class", "pair_id"]
SUMMARY_KEY = ["direction", "component", "layer", "head", "position_from_end", "position_class"]
JSON_FILES = ("circuit.json", "sites.json")
JSON_SKIPPED = ("seconds", "provenance.config_hash")
TABLE_SKIPPED = ["run_id", "config_hash"]


def _sorted(table: pa.Table, key: list[str]) -> pa.Table:
    table = table.drop_columns([c for c in TABLE_SKIPPED if c in table.column_names])
    return table.replace_schema_metadata(None).sort_by([(k, "ascending") for k in key])


def flatten_json(value, path: str = "") -> list[tuple[str, object]]:
    """A JSON file's value -> [(path, leaf)] with list indices in the path."""
    if isinstance(value, dict):
        return [row for k in sorted(value) for row in flatten_json(value[k], f"{path}.{k}" if path else k)]
    if isinstance(value, list):
        return [row for i, v in enumerate(value) for row in flatten_json(v, f"{path}[{i}]")]
    return [(path, value)]


def json_rows(path: Path) -> list[tuple[str, object]]:
    return [(p, v) for p, v in flatten_json(json.loads(path.read_text())) if not p.startswith(JSON_SKIPPED)]


def save(run_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(_sorted(read_table(run_dir / "effects.parquet"), EFFECT_KEY), out / "effects.parquet",
                   compression="zstd")
    pq.write_table(_sorted(read_table(run_dir / "summary.parquet"), SUMMARY_KEY), out / "summary.parquet",
                   compression="zstd")
    for name in JSON_FILES:
        (out / name).write_text(json.dumps(json_rows(run_dir / name), indent=0) + "\n")


RTOL = ATOL = 1e-5


def _close(a, b, rtol: float, atol: float) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return (math.isnan(a) and math.isnan(b)) or abs(a - b) <= atol + rtol * abs(b)
    return a == b


def compare_table(name: str, got: pa.Table, want: pa.Table, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Differences between two tables of the same rows in the same order (empty: the same within tolerance)."""
    if got.schema.names != want.schema.names or got.num_rows != want.num_rows:
        return [f"{name}: columns {got.schema.names} x {got.num_rows} rows, stored {want.schema.names} x "
                f"{want.num_rows}"]
    problems = []
    for column in want.schema.names:
        a, b = got.column(column), want.column(column)
        if pa.types.is_floating(b.type):
            x = a.to_numpy(zero_copy_only=False).astype(np.float64)
            y = b.to_numpy(zero_copy_only=False).astype(np.float64)
            excess = np.abs(x - y) - (atol + rtol * np.abs(y))
            if not np.array_equal(np.isnan(x), np.isnan(y)) or (len(x) and np.nanmax(excess) > 0):
                worst = int(np.nanargmax(excess))
                problems.append(f"{name}.{column}: row {worst} is {x[worst]!r}, stored {y[worst]!r} (more than "
                                f"atol {atol:g} + rtol {rtol:g} x |stored| apart)")
        elif a.to_pylist() != b.to_pylist():
            problems.append(f"{name}.{column}: values differ")
    return problems


def compare(run_dir: Path, digest: Path, rtol: float = RTOL, atol: float = ATOL) -> list[str]:
    """Differences between the run and the digest (empty: the same numbers within atol + rtol * |stored|)."""
    problems = []
    for name, key in (("effects", EFFECT_KEY), ("summary", SUMMARY_KEY)):
        problems += compare_table(name, _sorted(read_table(run_dir / f"{name}.parquet"), key),
                                  pq.read_table(digest / f"{name}.parquet"), rtol, atol)
    for name in JSON_FILES:
        want_rows = [tuple(r) for r in json.loads((digest / name).read_text())]
        got_rows = json_rows(run_dir / name)
        if [p for p, _ in got_rows] != [p for p, _ in want_rows]:
            missing = sorted({p for p, _ in want_rows} - {p for p, _ in got_rows})
            extra = sorted({p for p, _ in got_rows} - {p for p, _ in want_rows})
            problems.append(f"{name}: fields missing {missing[:5]}, new {extra[:5]}")
        else:
            problems += [f"{name} {p}: {a!r} != stored {b!r}" for (p, a), (_, b) in zip(got_rows, want_rows)
                         if not _close(a, b, rtol, atol)][:10]
    return problems


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["save", "compare"])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("digest", type=Path)
    parser.add_argument("--rtol", type=float, default=RTOL)
    parser.add_argument("--atol", type=float, default=ATOL)
    args = parser.parse_args()
    if args.mode == "save":
        save(args.run_dir, args.digest)
        print(f"saved the digest of {args.run_dir} to {args.digest}")
        return
    problems = compare(args.run_dir, args.digest, args.rtol, args.atol)
    print("\n".join(problems) if problems else
          f"{args.run_dir}: the same numbers as {args.digest} (rtol {args.rtol:g}, atol {args.atol:g})")
    sys.exit(1 if problems else 0)


if __name__ == "__main__":
    main()
