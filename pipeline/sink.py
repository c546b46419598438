"""Rows -> parquet part files, each complete when it appears; and what a run may do with its folder.

A part is written under a temporary name starting with `.` (which parquet readers skip), synced, then
renamed to `part-<shard>-<n>.parquet`. A part is committed after `rows_per_file` rows or `flush_seconds`
after its first row, so a killed run loses at most that much work in progress, never a committed part.
The committed parts are also the resume index: their ids are what a rerun skips.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import ConfigError, UserError
from pipeline.files import write_text
from pipeline.locks import flock
from pipeline.sources import id_hash

SETTINGS = "_settings.json"
# Recorded in _settings.json: a folder holds parts of one schema (2 added the scores).
SCHEMA_VERSION = 2

BOX = pa.struct(
    [("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32()), ("score", pa.float32())]
)
ENTITY = pa.struct(
    [("phrase", pa.string()), ("start", pa.int32()), ("end", pa.int32()), ("score", pa.float32()), ("boxes", pa.list_(BOX))]
)
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
        ("token_logprobs", pa.list_(pa.float32())),
        ("caption_logprob", pa.float32()),
        ("error", pa.string()),
    ]
)
PART = re.compile(r"^part-(\d{5})-(\d{5,})\.parquet$")


class OutputError(UserError):
    """The output folder cannot take this run; the message says why and the ways out."""


def output_schema(keep_fields: list[pa.Field]) -> pa.Schema:
    """The contract's columns, then the kept manifest columns (renamed if they would clash)."""
    schema = SCHEMA
    for f in keep_fields:
        if f.name in SCHEMA.names:
            raise ConfigError(f"input.keep_columns: {f.name!r} clashes with an output column; rename it in the manifest")
        schema = schema.append(f)
    return schema


def existing_output(folder: str | None) -> Path:
    """The output folder a reader of results (labels, gallery) was pointed at; it must hold parts."""
    if not folder:
        raise ConfigError("output.dir is not set: point it at a kosmos-annotate output folder")
    path = Path(folder).expanduser()
    if not committed_parts(path):
        raise ConfigError(f"output.dir={folder!r} holds no part files: is it a kosmos-annotate output?")
    return path


def committed_parts(folder: Path, shard: int | None = None) -> list[Path]:
    parts = sorted(p for p in Path(folder).glob("part-*.parquet") if PART.match(p.name))
    return parts if shard is None else [p for p in parts if int(PART.match(p.name).group(1)) == shard]


def id_hashes(ids: list[str]) -> np.ndarray:
    return np.array([id_hash(i) for i in ids], dtype=np.uint64)


class DoneIds:
    """Ids already in committed parts, as sorted 64-bit hashes with how often each was written (a
    repeated id's error row is written too): 12 bytes an id, however many parts."""

    def __init__(self, folder: Path):
        chunks = [np.empty(0, np.uint64)]
        for part in committed_parts(folder):
            with pq.ParquetFile(part) as f:
                for batch in f.iter_batches(columns=["id"], batch_size=65536):
                    chunks.append(id_hashes(batch.column(0).to_pylist()))
        self._hashes, counts = np.unique(np.concatenate(chunks), return_counts=True)
        self._counts = counts.astype(np.uint32)

    def __len__(self) -> int:
        return int(self._counts.sum())

    def count(self, item_hash: int) -> int:
        i = np.searchsorted(self._hashes, np.uint64(item_hash))
        return int(self._counts[i]) if i < len(self._hashes) and self._hashes[i] == item_hash else 0


@contextmanager
def exclusive(folder: Path, shard: int) -> Iterator[None]:
    """Hold this shard of the folder for the whole run; a second run on it is refused, naming the holder."""
    path = folder / f".lock-{shard:05d}"
    with ExitStack() as stack:
        try:
            f = stack.enter_context(flock(path, blocking=False))
        except BlockingIOError:
            holder = path.read_text().strip() or "another process"
            raise OutputError(
                f"output.dir={str(folder)!r} shard {shard} is being written by {holder}; wait for that run "
                "to finish (a rerun then resumes where it stopped) or choose another output.dir"
            ) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield


def prepare_folder(folder: Path, mode: str, shard: int, num_shards: int, settings: dict) -> None:
    """Apply output.mode, and keep one result set per folder: results of other settings never mix.

    overwrite removes this shard's parts, the parts of shards beyond `num_shards`, and, when the
    recorded settings differ, every part: shards of one multirun start together and must not remove
    each other's fresh parts, but nothing made with other settings may stay. Shards prepare the folder
    one at a time.
    """
    with flock(folder / ".lock-settings", blocking=True):
        parts = committed_parts(folder)
        if mode == "error" and parts:
            raise OutputError(
                f"output.dir={str(folder)!r} already holds {len(parts)} part files and output.mode=error; "
                "use output.mode=resume to continue it, output.mode=overwrite to start again, or another output.dir"
            )
        recorded_path = folder / SETTINGS
        recorded = json.loads(recorded_path.read_text()) if recorded_path.exists() else None
        if mode == "overwrite":
            for part in parts:
                part_shard = int(PART.match(part.name).group(1))
                if recorded != settings or part_shard == shard or part_shard >= num_shards:
                    part.unlink()
            parts = committed_parts(folder)
        if recorded is not None and recorded != settings and parts:
            changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
            detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise OutputError(
                f"output.dir={str(folder)!r} holds results made with other settings ({detail}); set them back, "
                "use output.mode=overwrite to start again (it removes those results), or choose another output.dir"
            )
        if recorded != settings:
            write_text(recorded_path, json.dumps(settings, indent=2, sort_keys=True))


class ParquetSink:
    def __init__(
        self,
        folder: Path,
        schema: pa.Schema,
        rows_per_file: int,
        flush_seconds: float,
        compression: str = "zstd",
        shard: int = 0,
        on_commit=None,  # called after each part is committed (the run records its summary)
    ):
        self.folder = Path(folder)
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.compression = compression
        self.shard = shard
        self.on_commit = on_commit
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(f".part-{shard:05d}-*.tmp"):  # a part a killed run never committed
            stale.unlink()
        existing = [int(PART.match(p.name).group(2)) for p in committed_parts(self.folder, shard)]
        self._next = max(existing, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0
        self.parts: list[Path] = []
        self.write_seconds = 0.0

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
        started = time.perf_counter()
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        name = f"part-{self.shard:05d}-{self._next:05d}.parquet"
        tmp = self.folder / f".{name}.tmp"
        pq.write_table(table, tmp, compression=self.compression)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.folder / name)
        _fsync_dir(self.folder)
        self.parts.append(self.folder / name)
        self._next += 1
        self._rows = []
        self.write_seconds += time.perf_counter() - started
        if self.on_commit:
            self.on_commit()

    def close(self) -> None:
        self.flush()


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
