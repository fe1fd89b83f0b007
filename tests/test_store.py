"""The Arrow store: atomic publish, tensor columns, memory-mapped reads, manifests that catch damage."""
import json
import os

import numpy as np
import pyarrow as pa
import pytest

from pipeline import store


def test_tensor_columns_round_trip_memory_mapped(tmp_path):
    acts = np.random.default_rng(0).standard_normal((5, 3, 7, 4)).astype(np.float32)  # [pairs, L, T, d]
    path = store.write_table(tmp_path / "acts.arrow",
                             pa.table({"pair_id": pa.array(range(5), pa.int32()), "resid": store.tensor_column(acts)}),
                             {"weights_hash": "abc", "config_hash": "123"})
    table = store.read_table(path)
    back = store.tensor_numpy(table.column("resid"))
    assert isinstance(table.column("resid").type, pa.FixedShapeTensorType)
    assert table.column("resid").type.shape == [3, 7, 4]
    np.testing.assert_array_equal(back, acts)
    # Memory-mapped and zero-copy: the array views the mapped file, it does not own a copy.
    assert not back.flags.owndata and not back.flags.writeable
    assert store.provenance(table) == {"producer": store.PRODUCER, "weights_hash": "abc", "config_hash": "123"}
    assert store.provenance(store.read_schema(path))["weights_hash"] == "abc"


def test_files_are_uncompressed_ipc(tmp_path):
    acts = np.ones((4, 16, 16), dtype=np.float32)
    path = store.write_table(tmp_path / "t.arrow", pa.table({"x": store.tensor_column(acts)}))
    assert path.read_bytes()[:6] == b"ARROW1"
    assert path.stat().st_size >= acts.nbytes  # ones would compress to almost nothing


def test_publish_is_atomic(tmp_path):
    path = tmp_path / "out" / "x.arrow"
    store.write_table(path, pa.table({"a": [1, 2]}))
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.arrow"]  # no temp file left behind

    def crash(tmp):
        tmp.write_bytes(b"half a fi")
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        store.publish_file(path, crash)
    # The reader still sees the complete old file; the partial one never took its name.
    assert store.read_table(path).column("a").to_pylist() == [1, 2]
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.arrow"]  # the half-written temp is gone
    # Two writers of one file (two sweeps into one folder) never share a temp name.
    first, second = store.tmp_path(path), store.tmp_path(path)
    assert first != second and first.parent == path.parent and first.name.startswith(".x.arrow.")


def test_content_keys_are_stable_and_sensitive():
    a = store.content_key("patch", {"layer": 1, "component": "head"}, [1, 2])
    assert a == store.content_key("patch", {"component": "head", "layer": 1}, [1, 2])
    assert a != store.content_key("patch", {"layer": 2, "component": "head"}, [1, 2])


def test_manifest_detects_truncated_and_corrupted_shards(tmp_path):
    manifest = store.Manifest(tmp_path, "cache")
    names = []
    for i in range(3):
        name = f"{store.content_key(i)}.arrow"
        store.write_table(tmp_path / name, pa.table({"x": store.tensor_column(np.full((2, 8), i, np.float32))}))
        manifest.add(name, rows=2)
        names.append(name)
    manifest.finish(names)

    reloaded = store.Manifest(tmp_path, "cache")
    assert all(reloaded.is_valid(n) for n in names)
    # Truncate one shard, flip a byte in another: both are caught, the third is still trusted.
    truncated, flipped, intact = (tmp_path / n for n in names)
    os.truncate(truncated, truncated.stat().st_size // 2)
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0xFF
    flipped.write_bytes(bytes(data))
    reloaded = store.Manifest(tmp_path, "cache")
    assert not reloaded.is_valid(names[0])
    assert not reloaded.is_valid(names[1])
    assert reloaded.is_valid(names[2])
    # A shard on disk but missing from the manifest (its writer died before recording it) is not trusted.
    unlisted = tmp_path / "unlisted.arrow"
    store.write_table(unlisted, pa.table({"x": [1]}))
    assert not reloaded.is_valid("unlisted.arrow")


def test_manifest_key_must_match(tmp_path):
    manifest = store.Manifest(tmp_path, "run")
    store.write_table(tmp_path / "pairs.arrow", pa.table({"a": [1]}))
    manifest.add("pairs.arrow", key="k1")
    assert manifest.is_valid("pairs.arrow", "k1")
    assert not manifest.is_valid("pairs.arrow", "k2")


def test_unreadable_manifest_vouches_for_nothing(tmp_path):
    store.write_table(tmp_path / "a.arrow", pa.table({"a": [1]}))
    (tmp_path / store.MANIFEST).write_text("{ not json")
    assert not store.Manifest(tmp_path, "cache").is_valid("a.arrow")


def test_parquet_tables_keep_nulls_provenance_and_row_counts(tmp_path):
    """Analysis tables are zstd Parquet: provenance survives in the schema, integer columns with nulls read
    back in pandas as nullable integers (not floats), and the manifest entry counts the rows."""
    import pandas as pd
    import pyarrow.parquet as pq

    table = pa.table({"layer": pa.array([0, 1, 2], pa.int32()), "head": pa.array([None, 1, None], pa.int32()),
                      "effect": pa.array([0.5, 0.25, 1.0], pa.float32())})
    path = store.write_table(tmp_path / "effects.parquet", table, {"config_hash": "123"})
    assert path.read_bytes()[:4] == b"PAR1"
    assert pq.ParquetFile(path).metadata.row_group(0).column(1).compression == "ZSTD"
    assert store.provenance(store.read_schema(path))["config_hash"] == "123"
    assert store.read_table(path).select(["layer", "head", "effect"]).equals(table)
    frame = pd.read_parquet(path)
    assert str(frame["head"].dtype) == "Int32" and str(frame["layer"].dtype) == "int32"
    assert frame["head"].isna().tolist() == [True, False, True]
    assert store.file_entry(path)["rows"] == 3


def test_run_columns_come_first_and_replace_old_ones(tmp_path):
    table = pa.table({"model": ["m", "m"], "x": [1, 2]}).replace_schema_metadata({b"k": b"v"})
    stamped = store.with_columns(table, {"run_id": "r1", "config_hash": "c", "model": "m2"})
    assert stamped.column_names == ["run_id", "config_hash", "model", "x"]
    assert stamped["model"].to_pylist() == ["m2", "m2"] and stamped["run_id"].to_pylist() == ["r1", "r1"]
    assert stamped.schema.metadata == {b"k": b"v"}
    again = store.with_columns(stamped, {"run_id": "r2", "config_hash": "c", "model": "m2"})
    assert again.column_names == stamped.column_names and set(again["run_id"].to_pylist()) == {"r2"}


def test_dataset_readers_skip_the_manifest(tmp_path):
    """A shard folder reads as one dataset: its manifest's leading underscore keeps readers off it."""
    import pyarrow.dataset as ds

    manifest = store.Manifest(tmp_path, "patch")
    for i in range(3):
        name = f"{store.content_key(i)}.arrow"
        store.write_table(tmp_path / name, pa.table({"x": pa.array([i, i], pa.int32())}))
        manifest.add(name)
    manifest.finish([f"{store.content_key(i)}.arrow" for i in range(3)])
    assert manifest.path.name == "_manifest.json" and manifest.path.is_file()
    assert sorted(ds.dataset(tmp_path, format="ipc").to_table()["x"].to_pylist()) == [0, 0, 1, 1, 2, 2]


def test_code_identity_follows_the_modules_a_stage_imports(tmp_path):
    """A stage's code identity changes with any module it imports, transitively, and only with those."""
    import shutil

    from pipeline.store import PACKAGE, code_identity

    copy = tmp_path / "pipeline"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("*.safetensors", "*.jsonl", "*.json", "__pycache__"))
    before = {m: code_identity(m, copy) for m in ("pipeline.stages.patch", "pipeline.analysis.statistics")}
    assert before == {m: code_identity(m) for m in before}  # a copy of the same code: the same identity
    with open(copy / "engine" / "patching.py", "a") as f:
        f.write("\nUNUSED = 1\n")
    code_identity.cache_clear()
    assert code_identity("pipeline.stages.patch", copy) != before["pipeline.stages.patch"]
    assert code_identity("pipeline.analysis.statistics", copy) == before["pipeline.analysis.statistics"]


def test_manifest_records_the_code_and_names_what_changed(tmp_path):
    """A file recorded with the module that computed it carries that module's code identity; read back by
    other code, the manifest names the source files that differ."""
    store.write_table(tmp_path / "a.arrow", pa.table({"a": [1]}))
    store.Manifest(tmp_path, "patch").add("a.arrow", module="pipeline.stages.patch")
    saved = json.loads((tmp_path / store.MANIFEST).read_text())
    identity = store.code_identity("pipeline.stages.patch")
    assert saved["files"]["a.arrow"]["code"] == identity
    assert saved["code"] == {identity: store.code_files("pipeline.stages.patch")}
    assert "pipeline/engine/patching.py" in saved["code"][identity]
    # pipeline/__init__ counts for what `import pipeline` runs, not for the reader its load_run imports on use
    files = saved["code"][identity]
    assert "pipeline/__init__.py" in files and "pipeline/outputs/load.py" not in files
    assert store.Manifest(tmp_path, "patch").other_code("pipeline.stages.patch") is None
    # As if written by code whose engine differed:
    saved["code"] = {"other": {**saved["code"][identity], "pipeline/engine/patching.py": "0" * 12}}
    saved["files"]["a.arrow"]["code"] = "other"
    (tmp_path / store.MANIFEST).write_text(json.dumps(saved))
    assert store.Manifest(tmp_path, "patch").other_code("pipeline.stages.patch") == ["pipeline/engine/patching.py"]
