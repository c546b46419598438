"""Rows -> parquet part files, each complete when it appears.

A part `part-<shard>-<n>.parquet` is written whole (storage.files: on a local disk under a temporary
name starting with `.`, synced, then renamed; in object storage, uploaded under its final name, where
it appears only once complete, and named after its run too, so that two runs holding one shard by
mistake never overwrite each other's parts). A part is committed after `rows_per_file` rows or
`flush_seconds` after its first row, whichever comes first: a timer keeps the second even while the
engine is busy with a slow item, so a killed run loses at most that much work, never a committed part.
A part that cannot be written (a full disk, a store that refuses) stops the run with a message that
counts the rows not written; the parts before it stay.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.errors import CommitFailed, OutputError
from pipeline.storage import layout
from pipeline.storage.files import Folder
from pipeline.storage.locks import Lease


class ParquetSink:
    def __init__(
        self,
        folder: Folder,
        schema: pa.Schema,
        cfg: OutputConfig,
        shard: int = 0,
        on_commit: Callable[[], None] | None = None,  # after each commit, under `lock` (the run's summary)
        lease: Lease | None = None,  # object storage: checked before each commit, and names the parts
        on_failure: Callable[[], None] | None = None,  # a commit by the timer failed (the run stops)
    ):
        self.folder, self.schema, self.cfg, self.shard = folder, schema, cfg, shard
        self.on_commit, self.lease, self.on_failure = on_commit, lease, on_failure
        self.lock = threading.RLock()  # rows come from the run's thread, commits also from the timer's
        folder.remove_temporary(layout.unfinished_part_prefix(shard))  # parts a killed run never committed
        existing = [layout.part_number(p) for p in layout.committed_parts(folder, shard)]
        self._next = max(existing, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0
        self._timer: threading.Timer | None = None
        self.failure: Exception | None = None  # a failed commit: every later add() and close() raises it
        self.parts: list[str] = []
        self.write_seconds = 0.0

    def add(self, row: dict[str, Any]) -> None:
        with self.lock:
            if self.failure is not None:
                raise self.failure
            if not self._rows:
                self._first_at = time.monotonic()
                self._timer = threading.Timer(self.cfg.flush_seconds, self._on_time)
                self._timer.daemon = True
                self._timer.start()
            self._rows.append(row)
            if len(self._rows) >= self.cfg.rows_per_file or time.monotonic() - self._first_at >= self.cfg.flush_seconds:
                self.flush()

    def _on_time(self) -> None:
        with self.lock:
            if not self._rows or self.failure is not None:
                return
            try:
                self.flush()
            except Exception as e:  # kept for the run's thread, which raises it
                self.failure = self.failure or e
                if self.on_failure:
                    self.on_failure()

    def flush(self) -> None:
        """Commit the buffered rows as one part file, whole (see the module's docstring)."""
        with self.lock:
            if not self._rows:
                return
            if self._timer is not None:
                self._timer.cancel()
            if self.lease is not None:
                try:
                    self.lease.check(f"{len(self._rows)} rows were not committed")
                except OutputError as e:
                    self.failure = e
                    raise
            started = time.perf_counter()
            name = layout.part_name(self.shard, self._next, self.lease.run if self.lease else None)
            try:
                buffer = pa.BufferOutputStream()
                table = pa.Table.from_pylist(self._rows, schema=self.schema)
                pq.write_table(table, buffer, compression=str(self.cfg.compression))
                self.folder.write(name, buffer.getvalue().to_pybytes(), sync=True)
            except Exception as e:  # a full disk, a refusing store, a row pyarrow cannot take: all end the run
                self.failure = CommitFailed(
                    f"{name} could not be written to {self.folder} ({type(e).__name__}: {e}); its {len(self._rows)} "
                    f"rows were not committed, the {len(self.parts)} parts before it are kept and a rerun resumes "
                    "after them"
                )
                raise self.failure from None
            self.parts.append(name)
            self._next += 1
            self._rows = []
            self.write_seconds += time.perf_counter() - started
            if self.on_commit:
                self.on_commit()

    def close(self) -> None:
        """Commit what is left (unless a commit failed already: the failure is raised again)."""
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
            if self.failure is not None:
                raise self.failure
            self.flush()
