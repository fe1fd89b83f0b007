"""A whole outputs tree read by the usual tools: `pipeline.load_runs(root)` (pandas), and its file lists in
polars and DuckDB (through Parquet, which DuckDB has built in: nothing to download). The tree is laid out
as sweeps lay it out: the session's refusal_tiny run at <experiment>/<model>-<prompts>, its MLflow store's
copies of the files under mlartifacts/, and a second, smaller run (MLP outputs only) one level deeper, where
a --multirun puts its jobs. Every run's rows come once, saying which run and config they came from."""
import duckdb
import numpy as np
import pandas as pd
import polars as pl
import pytest

import pipeline
from conftest import TINY_SWEEP, compose
from pipeline import store

pytestmark = pytest.mark.slow  # a second sweep beside the session's


@pytest.fixture(scope="module")
def tree(tiny_sweep):
    """The session's refusal_tiny run and a second, smaller run beside it in a --multirun job's folder."""
    from pipeline.run.sweep import run_sweep
    from pipeline.validation import validate

    root = tiny_sweep["root"]
    job = "${output_root}/mlp_only/${model.name}-${prompts.name}/patching.components-mlp_out-0a1b2c"
    cfg = validate(compose(*TINY_SWEEP, f"output_root={root}", "prompts.n_pairs=8", "patching.components=[mlp_out]",
                           "circuit.enabled=false", f"output_dir={job}"))
    run_sweep(cfg)
    # Every run folder of the tree (other tests may have added theirs), by the run id its tables carry.
    runs = {store.read_table(m.parent / "pairs.parquet")["run_id"][0].as_py(): m.parent
            for m in root.rglob(".patchsweep-run") if (m.parent / "_manifest.json").is_file()}
    assert len(runs) >= 2 and any(d.parent.parent.name == "mlp_only" for d in runs.values())
    return root, runs


def per_run(runs: dict, name: str) -> pd.DataFrame:
    return pd.concat([store.read_table(d / name).to_pandas() for d in runs.values()], ignore_index=True)


def test_load_runs_reads_every_run_once(tree):
    root, runs = tree
    # The trap load_runs avoids: a recursive glob also reads MLflow's copies (the same run ids, twice).
    assert len(list(root.glob("**/effects.parquet"))) > len(runs)
    loaded = pipeline.load_runs(root)
    assert sorted(str(run.path) for run in loaded) == sorted(str(d) for d in runs.values())
    effects = loaded.effects
    assert len(effects) == len(per_run(runs, "effects.parquet")) and set(effects["run_id"]) == set(runs)
    assert effects.groupby("run_id")["config_hash"].nunique().eq(1).all() and effects["config_hash"].nunique() >= 2
    # Nullable integers stay integers: all heads / all positions are <NA>, not NaN in a float column.
    for column in ("head", "position", "position_from_end"):
        assert str(effects[column].dtype) == "Int32"
    assert effects.loc[effects["component"] == "mlp_out", "head"].isna().all()
    assert loaded.read("summary").num_rows == len(loaded.summary) == len(per_run(runs, "summary.parquet"))


def test_an_unfinished_run_is_left_out_and_named(tree, tmp_path):
    root, runs = tree
    [(run_id, folder)] = [(k, d) for k, d in runs.items() if d.parent.parent.name == "mlp_only"]
    copy = tmp_path / "outputs" / "x" / "y"
    copy.mkdir(parents=True)
    for name in (".patchsweep-run", "config.yaml", "effects.parquet"):  # a sweep that stopped before its manifest
        (copy / name).write_bytes((folder / name).read_bytes())
    with pytest.raises(ValueError, match="holds no finished run \\(1 unfinished\\)"):
        pipeline.load_runs(tmp_path / "outputs")


def test_polars(tree):
    root, runs = tree
    files = pipeline.load_runs(root).files("effects")
    effects = pl.read_parquet(files, hive_partitioning=False)
    want = per_run(runs, "effects.parquet")
    assert effects.height == len(want) and effects.columns == list(want.columns)
    assert effects.schema["head"] == pl.Int32 and effects["head"].null_count() == int(want["head"].isna().sum())
    summary = pl.read_parquet(pipeline.load_runs(root).files("summary"), hive_partitioning=False)
    assert set(summary["run_id"].unique()) == set(runs) and "effect" not in summary.columns


def test_duckdb_reads_parquet_without_extensions(tree):
    root, runs = tree
    con = duckdb.connect(config={"autoinstall_known_extensions": False, "autoload_known_extensions": False})
    [(mode,)] = con.sql("SELECT install_mode FROM duckdb_extensions() WHERE extension_name = 'parquet'").fetchall()
    assert mode == "STATICALLY_LINKED"
    loaded = pipeline.load_runs(root)
    con.read_parquet(loaded.files("effects"), hive_partitioning=False).create_view("effects")
    counts = dict(con.sql("SELECT run_id, count(*) FROM effects GROUP BY run_id").fetchall())
    assert counts == {run_id: store.read_table(d / "effects.parquet").num_rows for run_id, d in runs.items()}
    # A per-layer mean over pairs, in SQL, equals the summary's mean for that site.
    got = con.sql("""SELECT run_id, layer, avg(effect) AS mean FROM effects
                     WHERE component = 'mlp_out' AND direction = 'noise' AND position IS NULL
                     AND position_class IS NULL GROUP BY ALL ORDER BY run_id, layer""").df()
    summary = per_run(runs, "summary.parquet")
    want = (summary[(summary["component"] == "mlp_out") & (summary["direction"] == "noise")
                    & summary["position_from_end"].isna() & summary["position_class"].isna()]
            .sort_values(["run_id", "layer"]))
    np.testing.assert_allclose(got["mean"], want["mean"], rtol=1e-6)
    assert got["run_id"].tolist() == want["run_id"].tolist()
