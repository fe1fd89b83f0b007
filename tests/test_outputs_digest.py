"""The stored-digest comparison (bench/outputs_digest.py) tolerates float32 noise across CPUs and batch
shapes, and still catches a real change in a result."""
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "bench"))
from outputs_digest import compare_table  # noqa: E402

EFFECTS = pq.read_table(REPO / "tests" / "data" / "refusal_tiny_digest" / "effects.parquet")


def _with(table: pa.Table, column: str, values: np.ndarray) -> pa.Table:
    i = table.schema.get_field_index(column)
    return table.set_column(i, column, pa.array(values.astype(np.float32)))


def test_float32_noise_of_a_few_ulps_passes():
    """Every float column moved by 4 float32 ulps (metrics near 30 differ by ~5e-6 between machines)."""
    noisy = EFFECTS
    for column in ("metric_clean", "metric_corrupted", "metric_patched", "effect"):
        values = EFFECTS.column(column).to_numpy(zero_copy_only=False).astype(np.float32)
        for _ in range(4):
            values = np.nextafter(values, np.float32(np.inf))
        noisy = _with(noisy, column, values)
    assert compare_table("effects", noisy, EFFECTS) == []


def test_a_change_of_1e4_in_one_effect_fails():
    effect = EFFECTS.column("effect").to_numpy(zero_copy_only=False).astype(np.float32).copy()
    row = int(np.nanargmax(np.abs(effect)))
    effect[row] += 1e-4
    problems = compare_table("effects", _with(EFFECTS, "effect", effect), EFFECTS)
    assert len(problems) == 1 and problems[0].startswith(f"effects.effect: row {row} ")
