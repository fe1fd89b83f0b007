"""The Arrow store: atomic publish, tensor columns, memory-mapped reads, manifests that catch damage."""
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
