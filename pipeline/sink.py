"""Rows -> parquet part files, each complete when it appears.

A part is written under a temporary name starting with `.` (which parquet readers skip), synced, then
renamed to `part-NNNNN.parquet`. A part is committed after `rows_per_file` rows or `flush_seconds`
after its first row, so a killed run loses at most that much work in progress, never a committed part.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

BOX = pa.struct([("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32())])
ENTITY = pa.struct([("phrase", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("boxes", pa.list_(BOX))])
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("prompt", pa.string()),
        ("caption", pa.string()),
        ("entities", pa.list_(ENTITY)),
        ("token_ids", pa.list_(pa.int32())),
        ("error", pa.string()),
    ]
)
PART = re.compile(r"^part-(\d{5,})\.parquet$")


def output_schema(keep_fields: list[pa.Field]) -> pa.Schema:
    """The contract's columns, then the kept manifest columns (renamed if they would clash)."""
    schema = SCHEMA
    for f in keep_fields:
        if f.name in SCHEMA.names:
            raise ValueError(f"input.keep_columns: {f.name!r} clashes with an output column; rename it in the manifest")
        schema = schema.append(f)
    return schema


def committed_parts(folder: Path) -> list[Path]:
    return sorted(p for p in folder.glob("part-*.parquet") if PART.match(p.name))


class ParquetSink:
    def __init__(self, folder: Path, schema: pa.Schema, rows_per_file: int, flush_seconds: float, compression: str = "zstd"):
        self.folder = Path(folder)
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.compression = compression
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".part-*.tmp"):  # a part a killed run never committed
            stale.unlink()
        existing = [int(PART.match(p.name).group(1)) for p in committed_parts(self.folder)]
        self._next = max(existing, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0
        self.parts: list[Path] = []

    def add(self, row: dict[str, Any]) -> None:
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_file or time.monotonic() - self._first_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one part file (atomic: temporary name, fsync, rename)."""
        if not self._rows:
            return
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        name = f"part-{self._next:05d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)
        self.parts.append(self.folder / name)
        self._next += 1
        self._rows = []

    def close(self) -> None:
        self.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
