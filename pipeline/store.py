"""Arrow and Parquet I/O for every file the pipeline writes.

- Analysis tables (pairs, effects, summary) are Parquet (zstd): pandas, polars, DuckDB and Spark read
  them, one glob over an outputs tree at a time. Integer columns that hold nulls carry pandas metadata,
  so pandas reads them as nullable integers rather than floats.
- Activations and the effect shards are Arrow IPC files, uncompressed, so readers memory-map them
  (`pa.memory_map`) and tensor columns come back as zero-copy numpy views.
- Tensors are fixed-shape tensor columns (`pa.FixedShapeTensorArray`).
- Every file carries provenance in its schema metadata and is published atomically: written to a
  temp file beside its final path (`.name.<pid>-<random>.tmp`, unique per writer, so two writers of the
  same file never share one), then `os.replace`d, so a reader never sees half a file.
- Shards are named by a content key (the hash of everything that determines them); a stage's manifest
  lists its shards with sha256 checksums, so a re-run reuses finished shards and a truncated or
  corrupted shard is detected and recomputed, never read silently. Manifests are named `_manifest.json`:
  dataset readers (pyarrow.dataset, Spark, DuckDB globs of *.parquet) skip names starting with `_`.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import uuid
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from pipeline import __version__

PRODUCER = f"patchsweep {__version__}"
MANIFEST = "_manifest.json"


# ---- hashing -------------------------------------------------------------------------------------

def content_key(*parts) -> str:
    """A short stable key for anything JSON-serialisable (used as a shard's file name)."""
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


PACKAGE = Path(__file__).resolve().parent


@cache
def code_identity(module: str, package: Path = PACKAGE) -> str:
    """A short hash of the source of `module` (a dotted name inside the package) and of every module of the
    package it imports, transitively: part of the content key of what the module computes, so a result made
    by other code (an upgrade, a local edit) is computed again rather than reused."""
    digest = hashlib.sha256()
    for path, file_hash in code_files(module, package).items():
        digest.update(f"{path}:{file_hash};".encode())
    return digest.hexdigest()[:16]


def code_files(module: str, package: Path = PACKAGE) -> dict[str, str]:
    """The source files behind `module`'s code identity, each by a short hash of its bytes
    ("pipeline/engine/patching.py" -> hash): what a manifest keeps to say which files changed."""
    return {path.relative_to(package.parent).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()[:12]
            for path in sorted(_imported_sources(module, package))}


def _source(module: str, package: Path) -> Path | None:
    """The file of a dotted module name inside the package (None: not one of its modules)."""
    top, _, rest = module.partition(".")
    if top != package.name:
        return None
    base = package.joinpath(*rest.split(".")) if rest else package
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imported_sources(module: str, package: Path) -> set[Path]:
    """The source files of `module` and of every module of the package it imports, transitively (a module's
    parent packages too: importing it runs their __init__). A package's __init__ counts for what importing
    it runs, not for the imports inside its functions: those are its lazy attributes for users (`import
    pipeline` stays light and `pipeline.load_run` reads outputs), not code of the modules beneath it."""
    seen: set[Path] = set()
    parts = module.split(".")
    todo = [".".join(parts[:i]) for i in range(1, len(parts) + 1)]
    while todo:
        name = todo.pop()
        path = _source(name, package)
        if path is None or path in seen:
            continue
        seen.add(path)
        todo += [name.rsplit(".", 1)[0]] if "." in name else []
        for node in _nodes(ast.parse(path.read_bytes()), functions=path.name != "__init__.py"):
            if isinstance(node, ast.Import):
                todo += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                # `from a.b import c`: c may be a module of a.b or a name defined in it
                todo += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    return seen


def _nodes(tree: ast.AST, functions: bool):
    """Every node of `tree`, or (functions=False) every node outside function bodies."""
    for node in ast.iter_child_nodes(tree):
        if functions or not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            yield node
            yield from _nodes(node, functions)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---- atomic publish ------------------------------------------------------------------------------

def tmp_path(path: str | Path) -> Path:
    """A fresh temp name beside `path`, unique to this call."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")


def publish_bytes(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (tmp file beside it, fsync, os.replace)."""

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())

    publish_file(path, write)


def publish_json(path: str | Path, obj) -> None:
    publish_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())


def publish_file(path: str | Path, write) -> None:
    """Atomic publish for writers that want a file name: `write(tmp_path)` fills it, then it is moved."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# ---- tables --------------------------------------------------------------------------------------

def with_provenance(table: pa.Table, provenance: dict) -> pa.Table:
    """Attach provenance (config hash, model id, weights hash, pairs hash, ...) as schema metadata."""
    meta = dict(table.schema.metadata or {})
    meta.update({b"patchsweep.producer": PRODUCER.encode()})
    meta.update({f"patchsweep.{k}".encode(): str(v).encode() for k, v in provenance.items()})
    return table.replace_schema_metadata(meta)


def provenance(table_or_schema) -> dict:
    schema = table_or_schema.schema if isinstance(table_or_schema, pa.Table) else table_or_schema
    meta = schema.metadata or {}
    return {k.decode()[len("patchsweep."):]: v.decode()
            for k, v in meta.items() if k.startswith(b"patchsweep.")}


def write_table(path: str | Path, table: pa.Table, provenance: dict | None = None) -> Path:
    """Publish `table` atomically with provenance metadata: Parquet (zstd) for a `.parquet` path, else an
    uncompressed Arrow IPC file (memory-mappable)."""
    table = with_provenance(table, provenance or {})
    parquet = Path(path).suffix == ".parquet"
    if parquet:
        table = _with_pandas_metadata(table)

    def write(tmp):
        if parquet:
            pq.write_table(table, str(tmp), compression="zstd")
        else:
            with pa.OSFile(str(tmp), "wb") as sink, ipc.new_file(sink, table.schema) as writer:
                writer.write_table(table)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())

    publish_file(path, write)
    return Path(path)


_NULLABLE_INT = {f"{sign}int{bits}": f"{sign.upper()}Int{bits}" for sign in ("", "u") for bits in (8, 16, 32, 64)}


def _with_pandas_metadata(table: pa.Table) -> pa.Table:
    """Pandas metadata naming a nullable integer dtype for every integer column that holds nulls (head,
    position): without it pandas turns such a column into float64."""
    columns = [{"name": f.name, "field_name": f.name, "pandas_type": str(f.type),
                "numpy_type": _NULLABLE_INT[str(f.type)], "metadata": None}
               for f, column in zip(table.schema, table.columns)
               if pa.types.is_integer(f.type) and column.null_count]
    meta = {"index_columns": [], "column_indexes": [], "columns": columns,
            "creator": {"library": "patchsweep"}, "pandas_version": pd.__version__}
    return table.replace_schema_metadata({**(table.schema.metadata or {}), b"pandas": json.dumps(meta).encode()})


def read_table(path: str | Path) -> pa.Table:
    """Read a Parquet file, or an Arrow IPC file memory-mapped (buffers stay in the page cache, nothing
    is copied)."""
    if Path(path).suffix == ".parquet":
        return pq.read_table(str(path), memory_map=True)
    source = pa.memory_map(str(path), "r")
    return ipc.open_file(source).read_all()


def read_schema(path: str | Path) -> pa.Schema:
    if Path(path).suffix == ".parquet":
        return pq.read_schema(str(path))
    with pa.memory_map(str(path), "r") as source:
        return ipc.open_file(source).schema


def with_columns(table: pa.Table, values: dict[str, str]) -> pa.Table:
    """`table` with constant string columns `values` first (replacing columns of those names): the run a
    row belongs to, which dataset readers keep and schema metadata does not survive."""
    rest = table.drop_columns([name for name in values if name in table.column_names])
    columns = [pa.array([value] * table.num_rows, pa.string()) for value in values.values()]
    return pa.table(columns + rest.columns, names=list(values) + rest.column_names,
                    metadata=table.schema.metadata)


# ---- tensor columns ------------------------------------------------------------------------------

def tensor_column(array: np.ndarray) -> pa.FixedShapeTensorArray:
    """[rows, *shape] numpy array -> a fixed-shape tensor column with one tensor per row."""
    return pa.FixedShapeTensorArray.from_numpy_ndarray(np.ascontiguousarray(array))


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A fixed-shape tensor column -> [rows, *shape] numpy array (zero-copy for a single chunk)."""
    if isinstance(column, pa.ChunkedArray):
        chunks = [c.to_numpy_ndarray() for c in column.chunks]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
    return column.to_numpy_ndarray()


def file_entry(path: str | Path) -> dict:
    """A published file as a manifest records it: path, sha256 and, for an Arrow table, its rows."""
    path = Path(path)
    entry = {"path": str(path), "sha256": sha256_file(path)}
    if path.suffix == ".parquet":
        entry["rows"] = pq.ParquetFile(str(path)).metadata.num_rows
    elif path.suffix == ".arrow":
        with pa.memory_map(str(path), "r") as source:
            reader = ipc.open_file(source)
            entry["rows"] = sum(reader.get_batch(i).num_rows for i in range(reader.num_record_batches))
    return entry


# ---- manifests -----------------------------------------------------------------------------------

def _well_formed(entry) -> bool:
    """A manifest entry that records a file: an object with a sha256 of 64 hex digits."""
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    return isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha)


class Manifest:
    """What a stage has produced in one folder: file name -> {sha256, key, code, rows, ...}.

    Rewritten atomically after each finished shard (so a crashed run knows what it finished) and once
    more at the end with `complete: true`. A shard counts as finished only if it is listed here and its
    bytes still hash to the listed checksum. A file recorded with the module that computed it carries that
    module's code identity, and the manifest keeps, per identity, its source files' hashes (`code_files`):
    so a re-run by other code can say which files changed.
    """

    def __init__(self, folder: str | Path, stage: str, provenance: dict | None = None):
        self.folder = Path(folder)
        self.path = self.folder / MANIFEST
        self.stage = stage
        self.provenance = provenance or {}
        self.files: dict[str, dict] = {}
        self.code: dict[str, dict[str, str]] = {}  # code identity -> code_files of the module it was taken from
        self.complete = False  # true once the stage finished: the final write lists exactly its files
        self.malformed: list[str] = []  # entries that vouch for nothing (no sha256, not a record): dropped
        if self.path.exists():
            try:
                saved = json.loads(self.path.read_text())
                if not isinstance(saved, dict):
                    raise ValueError("not an object")
                files = saved.get("files", {})
                files = files if isinstance(files, dict) else {}
                self.files = {name: entry for name, entry in files.items() if _well_formed(entry)}
                self.malformed = sorted(set(files) - set(self.files))
                code = saved.get("code", {})
                self.code = dict(code) if isinstance(code, dict) else {}
                self.complete = saved.get("complete") is True
            except (ValueError, OSError, UnicodeDecodeError):
                # an unreadable manifest vouches for nothing: shards get recomputed
                self.files, self.code, self.complete = {}, {}, False

    def refuse_malformed(self) -> None:
        """One line where entries of the manifest are not records of a file (no valid sha256): a reader of a
        finished folder must not trust it; a re-run recomputes those files."""
        if self.malformed:
            raise ValueError(f"{self.path} has entries without a valid sha256 ({', '.join(self.malformed[:5])}): "
                             "they vouch for nothing; run the sweep again (the same command) to recompute them")

    def is_valid(self, name: str, key: str | None = None) -> bool:
        """True if `name` is listed (under content key `key`, when given) and its bytes still hash to the
        listed checksum. A listed file that fails the check is dropped from the list."""
        entry = self.files.get(name)
        path = self.folder / name
        if entry is None or not path.is_file() or (key is not None and entry.get("key") != key):
            return False
        if sha256_file(path) != entry["sha256"]:
            del self.files[name]
            return False
        return True

    def add(self, name: str, sha256: str | None = None, module: str | None = None, **info) -> None:
        """Record a finished file (hashing it unless its checksum is given), computed by `module` (a dotted
        name: its code identity is recorded with it), and save the manifest."""
        if module is not None:
            info["code"] = code_identity(module)
            if info["code"] not in self.code:
                self.code[info["code"]] = code_files(module)
        self.files[name] = {"sha256": sha256 or sha256_file(self.folder / name), **info}
        self.save()

    def record(self, entry: dict, module: str | None = None, **info) -> None:
        """Record a published file from its `file_entry` (path, sha256[, rows]), computed by `module`, plus
        `info` (a key)."""
        self.add(Path(entry["path"]).name, entry["sha256"], module,
                 **{k: v for k, v in entry.items() if k == "rows"}, **info)

    def rewritten(self, entry: dict) -> None:
        """A listed file rewritten with the same content key and code (its run columns): its new checksum
        and rows from `file_entry`, the rest of its record kept."""
        name = Path(entry["path"]).name
        self.files[name] = {**self.files[name], **{k: v for k, v in entry.items() if k != "path"}}
        self.save()

    def other_code(self, module: str, names=None) -> list[str] | None:
        """Whether listed files (`names`, default every one) were computed by other code than `module`'s
        today: None where none was, else the source files that differ (sorted; empty where the other
        code's files are not recorded, as in a folder written before code identities were)."""
        identity = code_identity(module)
        listed = [self.files[name] for name in (self.files if names is None else names) if name in self.files]
        others = {entry.get("code") for entry in listed} - {identity}
        if not others:
            return None
        now, changed = code_files(module), set()
        for before in (self.code.get(other) for other in others):
            if before:
                changed |= {path for path in now.keys() | before.keys() if now.get(path) != before.get(path)}
        return sorted(changed)

    def save(self, complete: bool = False) -> None:
        self.complete = complete
        used = {entry.get("code") for entry in self.files.values()}
        publish_json(self.path, {
            "stage": self.stage, "producer": PRODUCER, "complete": complete, "provenance": self.provenance,
            "code": {identity: files for identity, files in self.code.items() if identity in used},
            "files": self.files,
        })

    def finish(self, keep: list[str]) -> None:
        """The final write: exactly the files of this run, marked complete."""
        self.files = {name: self.files[name] for name in keep}
        self.save(complete=True)
