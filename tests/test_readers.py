"""A whole outputs tree read by the usual tools, one glob per table: pandas, polars and DuckDB (through
Parquet, which DuckDB has built in: nothing to download). Two runs in one tree: the rows say which run and
config they came from, and no table mixes into another's. Run folders sit two levels down
(<experiment>/<model>-<prompts>); the MLflow store's copies of the tables (mlartifacts/) lie deeper and
stay out of the glob."""
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

from conftest import TINY_SWEEP, compose
from pipeline import store

pytestmark = pytest.mark.slow  # a second sweep beside the session's


@pytest.fixture(scope="module")
def tree(tiny_sweep):
    """The session's refusal_tiny run and a second, smaller run (MLP outputs only) beside it."""
    from pipeline.run.sweep import run_sweep
    from pipeline.validation import validate

    root = tiny_sweep["root"]
    cfg = validate(compose(*TINY_SWEEP, f"output_root={root}", "prompts.n_pairs=8", "patching.components=[mlp_out]",
                           "circuit.enabled=false", "output_dir=${output_root}/mlp_only/${model.name}-${prompts.name}"))
    run_sweep(cfg)
    # Every run folder of the tree (other tests may have added theirs), by the run id its tables carry.
    runs = {store.read_table(d / "pairs.parquet")["run_id"][0].as_py(): d for d in root.glob("*/*")
            if (d / "effects.parquet").is_file()}
    assert len(runs) >= 2
    return root, runs


def per_run(runs: dict, name: str) -> pd.DataFrame:
    return pd.concat([store.read_table(d / name).to_pandas() for d in runs.values()], ignore_index=True)


def test_pandas(tree):
    root, runs = tree
    effects = pd.concat(map(pd.read_parquet, Path(root).glob("*/*/effects.parquet")), ignore_index=True)
    assert len(effects) == len(per_run(runs, "effects.parquet"))
    assert set(effects["run_id"]) == set(runs)
    assert effects.groupby("run_id")["config_hash"].nunique().eq(1).all() and effects["config_hash"].nunique() >= 2
    # Nullable integers stay integers: all heads / all positions are <NA>, not NaN in a float column.
    for column in ("head", "position", "position_from_end"):
        assert str(effects[column].dtype) == "Int32"
    assert effects.loc[effects["component"] == "mlp_out", "head"].isna().all()


def test_polars(tree):
    root, runs = tree
    effects = pl.read_parquet(f"{root}/*/*/effects.parquet")
    want = per_run(runs, "effects.parquet")
    assert effects.height == len(want) and effects.columns == list(want.columns)
    assert effects.schema["head"] == pl.Int32 and effects["head"].null_count() == int(want["head"].isna().sum())
    summary = pl.read_parquet(f"{root}/*/*/summary.parquet")
    assert set(summary["run_id"].unique()) == set(runs) and "effect" not in summary.columns


def test_duckdb_reads_parquet_without_extensions(tree):
    root, runs = tree
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    [(mode,)] = con.sql("SELECT install_mode FROM duckdb_extensions() WHERE extension_name = 'parquet'").fetchall()
    assert mode == "STATICALLY_LINKED"
    counts = dict(con.sql(f"SELECT run_id, count(*) FROM '{root}/*/*/effects.parquet' GROUP BY run_id").fetchall())
    assert counts == {run_id: store.read_table(d / "effects.parquet").num_rows for run_id, d in runs.items()}
    # A per-layer mean over pairs, in SQL, equals the summary's mean for that site.
    got = con.sql(f"""SELECT run_id, layer, avg(effect) AS mean FROM '{root}/*/*/effects.parquet'
                      WHERE component = 'mlp_out' AND direction = 'noise' AND position_class IS NULL
                      GROUP BY ALL ORDER BY run_id, layer""").df()
    summary = per_run(runs, "summary.parquet")
    want = (summary[(summary["component"] == "mlp_out") & (summary["direction"] == "noise")
                    & summary["position_class"].isna()]
            .sort_values(["run_id", "layer"]))
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6)
    assert got["run_id"].tolist() == want["run_id"].tolist()
