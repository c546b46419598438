"""Rows -> parquet part files, each complete when it appears; and what a run may do with its folder.

A part `part-<shard>-<n>.parquet` is written whole (`files.Folder.write`: on a local disk under a
temporary name starting with `.`, synced, then renamed; in object storage, uploaded under its final
name, where it appears only once complete). A part is committed after `rows_per_file` rows or
`flush_seconds` after its first row, so a killed run loses at most that much work in progress, never a
committed part. The committed parts are also the resume index: their ids are what a rerun skips.
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
from pipeline.files import Folder
from pipeline.locks import Lease, LeaseHeld, flock
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


def existing_output(location: str | None) -> Folder:
    """The output folder a reader of results (labels, gallery, status) was pointed at; it must hold parts."""
    if not location:
        raise ConfigError("output.dir is not set: point it at a kosmos-annotate output folder")
    folder = Folder(location)
    if not committed_parts(folder):
        raise ConfigError(f"output.dir={location!r} holds no part files: is it a kosmos-annotate output?")
    return folder


def committed_parts(folder: Folder, shard: int | None = None) -> list[str]:
    """The names of the folder's committed parts (of one shard), in order."""
    parts = [name for name in folder.names() if PART.match(name)]
    return parts if shard is None else [p for p in parts if int(PART.match(p).group(1)) == shard]


def id_hashes(ids: list[str]) -> np.ndarray:
    return np.array([id_hash(i) for i in ids], dtype=np.uint64)


class DoneIds:
    """Ids already in committed parts, as sorted 64-bit hashes with how often each was written (a
    repeated id's error row is written too): 12 bytes an id, however many parts."""

    def __init__(self, folder: Folder):
        chunks = [np.empty(0, np.uint64)]
        for part in committed_parts(folder):
            with pq.ParquetFile(folder.open(part)) as f:
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
def exclusive(folder: Folder, shard: int) -> Iterator[Lease | None]:
    """Hold this shard of the folder for the whole run; a second run on it is refused, naming the holder.

    On a local disk a kernel lock; in object storage a lease (`.lease-<shard>.json`), renewed while the
    run lives and expiring after it; the sink checks before each commit that it still holds it."""
    refused = (f"output.dir={str(folder)!r} shard {shard} is being written by {{}}; wait for that run to finish "
               "(a rerun then resumes where it stopped) or choose another output.dir")
    if folder.remote:
        lease = Lease(folder, f".lease-{shard:05d}.json")
        try:
            lease.acquire()
        except LeaseHeld as e:
            raise OutputError(refused.format(e)) from None
        try:
            yield lease
        finally:
            lease.release()
        return
    path = Path(folder.path(f".lock-{shard:05d}"))
    with ExitStack() as stack:
        try:
            f = stack.enter_context(flock(path, blocking=False))
        except BlockingIOError:
            raise OutputError(refused.format(path.read_text().strip() or "another process")) from None
        f.truncate(0)
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield None


@contextmanager
def _one_at_a_time(folder: Folder) -> Iterator[None]:
    """Shards prepare the folder one at a time (a kernel lock, or a lease in object storage)."""
    if not folder.remote:
        with flock(Path(folder.path(".lock-settings")), blocking=True):
            yield
        return
    lease = Lease(folder, ".lease-settings.json", ttl=120.0)
    lease.acquire(blocking=True)
    try:
        yield
    finally:
        lease.release()


def prepare_folder(folder: Folder, mode: str, shard: int, num_shards: int, settings: dict) -> None:
    """Apply output.mode, and keep one result set per folder: results of other settings never mix.

    overwrite removes this shard's parts, the parts of shards beyond `num_shards`, and, when the
    recorded settings differ, every part: shards of one multirun start together and must not remove
    each other's fresh parts, but nothing made with other settings may stay. Shards prepare the folder
    one at a time.
    """
    with _one_at_a_time(folder):
        parts = committed_parts(folder)
        if mode == "error" and parts:
            raise OutputError(
                f"output.dir={str(folder)!r} already holds {len(parts)} part files and output.mode=error; "
                "use output.mode=resume to continue it, output.mode=overwrite to start again, or another output.dir"
            )
        recorded = json.loads(folder.read_text(SETTINGS)) if folder.exists(SETTINGS) else None
        if mode == "overwrite":
            for part in parts:
                part_shard = int(PART.match(part).group(1))
                if recorded != settings or part_shard == shard or part_shard >= num_shards:
                    folder.delete(part)
            parts = committed_parts(folder)
        if recorded is not None and recorded != settings and parts:
            changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
            detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise OutputError(
                f"output.dir={str(folder)!r} holds results made with other settings ({detail}); set them back, "
                "use output.mode=overwrite to start again (it removes those results), or choose another output.dir"
            )
        if recorded != settings:
            folder.write(SETTINGS, json.dumps(settings, indent=2, sort_keys=True))


class ParquetSink:
    def __init__(
        self,
        folder: Folder,
        schema: pa.Schema,
        rows_per_file: int,
        flush_seconds: float,
        compression: str = "zstd",
        shard: int = 0,
        on_commit=None,  # called after each part is committed (the run records its summary)
        lease: Lease | None = None,  # object storage: checked before each commit
    ):
        self.folder = folder
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.flush_seconds = flush_seconds
        self.compression = compression
        self.shard = shard
        self.on_commit = on_commit
        self.lease = lease
        folder.remove_temporary(f".part-{shard:05d}-")  # parts a killed run never committed
        existing = [int(PART.match(p).group(2)) for p in committed_parts(folder, shard)]
        self._next = max(existing, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0
        self.parts: list[str] = []
        self.write_seconds = 0.0

    def add(self, row: dict[str, Any]) -> None:
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.append(row)
        if len(self._rows) >= self.rows_per_file or time.monotonic() - self._first_at >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one part file, whole (see the module's docstring)."""
        if not self._rows:
            return
        if self.lease is not None and self.lease.lost:
            raise OutputError(
                f"output.dir={str(self.folder)!r} shard {self.shard}: another run took over this run's lease (it "
                f"could not be renewed); {len(self._rows)} rows were not committed, a rerun annotates them again"
            )
        started = time.perf_counter()
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(self._rows, schema=self.schema), buffer, compression=self.compression)
        name = f"part-{self.shard:05d}-{self._next:05d}.parquet"
        self.folder.write(name, buffer.getvalue().to_pybytes(), sync=True)
        self.parts.append(name)
        self._next += 1
        self._rows = []
        self.write_seconds += time.perf_counter() - started
        if self.on_commit:
            self.on_commit()

    def close(self) -> None:
        self.flush()
