"""The user's prompt files: JSONL, CSV or Parquet, checked cell by cell so a bad file is named precisely.

`read_user_file` reads any of them and checks the text columns; `load_screen_prompts` is the screen's
(prompt, harmful) table; `file_pairs` (in pipeline.analysis.pairs) reads (clean, corrupted[, category]).
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from pipeline.messages import first_line

FILE_FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}


def read_user_file(path: str | Path, text_columns: Sequence[str], what: str) -> pa.Table:
    """Read a JSONL / CSV / Parquet file and check that `text_columns` exist and hold text in every
    row. `what` names the file's role in error messages (e.g. "prompt-pair file")."""
    path = Path(path)
    if path.exists() and not path.is_file():
        raise ValueError(f"{what} {str(path)!r} is not a regular file (a folder, pipe or device): point "
                         "prompts.path at a JSONL, CSV or Parquet file")
    if not path.is_file():
        raise ValueError(f"{what} {str(path)!r} does not exist: check prompts.path")
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{what} {str(path)!r} has unknown extension {path.suffix!r}: "
                         f"use one of {', '.join(FILE_FORMATS)}")
    if path.stat().st_size == 0:
        raise ValueError(f"{what} {str(path)!r} is empty: it needs a header/rows with columns "
                         f"{', '.join(text_columns)}")
    try:
        table = _read(path, fmt, text_columns, what)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
        raise ValueError(f"{what} {str(path)!r} could not be read as {fmt} "
                         f"({first_line(e)}): fix the file's format") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text (byte {e.object[e.start:e.start + 1]!r} at offset "
                         f"{e.start}): save it as UTF-8") from None
    except OSError as e:
        raise ValueError(f"{what} {str(path)!r} cannot be read ({e.strerror or type(e).__name__}): make it "
                         "readable, or point prompts.path at a readable copy") from None
    if table.num_rows == 0:
        raise ValueError(f"{what} {str(path)!r} is empty (no rows): add rows with columns "
                         f"{', '.join(text_columns)}")
    for col in text_columns:
        if col not in table.column_names:
            raise ValueError(f"{what} {str(path)!r} has no {col!r} column (found {table.column_names}): "
                             f"name the columns {', '.join(text_columns)}")
        _check_text_column(table, col, path, what)
    return table


def _read(path: Path, fmt: str, text_columns: Sequence[str], what: str) -> pa.Table:
    if fmt == "parquet":
        return pq.read_table(path)
    if fmt == "csv":
        # CSV cells are text: keep "123" as the text "123" rather than guessing a number.
        with path.open(encoding="utf-8") as f:
            header = f.readline()
        names = [n.strip().strip('"') for n in header.rstrip("\r\n").split(",")]
        types = {c: pa.string() for c in names if c in (*text_columns, "category")}
        if "harmful" in names:
            types["harmful"] = pa.bool_()
        return pa_csv.read_csv(path, convert_options=pa_csv.ConvertOptions(column_types=types))
    # JSONL, parsed line by line so a bad line or cell is named precisely. Lines end at "\n" only: JSON
    # strings may hold U+2028 and other characters that str.splitlines() would break a line at.
    rows = []
    for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise pa.ArrowInvalid(f"line {n} is not JSON: {e.msg}") from None
        if not isinstance(row, dict):
            raise pa.ArrowInvalid(f"line {n} is not a JSON object")
        for col in text_columns:
            if col in row and row[col] is not None and not isinstance(row[col], str):
                raise ValueError(f"{what} {str(path)!r}: line {n} has a non-string {col!r} cell "
                                 f"({row[col]!r}): make every {col!r} cell a string")
        rows.append(row)
    return pa.Table.from_pylist(rows)


def _check_text_column(table: pa.Table, col: str, path: Path, what: str) -> None:
    column = table.column(col)
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise ValueError(f"{what} {str(path)!r}: column {col!r} holds {column.type}, not text: "
                         f"make every {col!r} cell a string")
    values = column.to_pylist()
    for i, v in enumerate(values):
        if v is None or not v.strip():
            raise ValueError(f"{what} {str(path)!r}: row {i} has an empty {col!r} cell: "
                             f"fill it or drop the row")


def load_screen_prompts(path: str | Path) -> pa.Table:
    """A screen prompt file -> Table(prompt: string, harmful: bool)."""
    table = read_user_file(path, ["prompt"], "screen prompt file")
    if "harmful" not in table.column_names:
        raise ValueError(f"screen prompt file {str(path)!r} has no 'harmful' column (found "
                         f"{table.column_names}): add a boolean 'harmful' column (true = should refuse)")
    harmful = table.column("harmful")
    if pa.types.is_integer(harmful.type) or pa.types.is_floating(harmful.type):
        if set(harmful.to_pylist()) <= {0, 1}:
            harmful = harmful.cast(pa.bool_())
    if not pa.types.is_boolean(harmful.type) or harmful.null_count:
        raise ValueError(f"screen prompt file {str(path)!r}: column 'harmful' must be true/false in "
                         f"every row (found {harmful.type}, {harmful.null_count} empty): fix that column")
    return pa.table({"prompt": table.column("prompt").cast(pa.string()), "harmful": harmful})
