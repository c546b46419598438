"""Rows -> parquet part files, each complete when it appears.

A part `part-<shard>-<n>.parquet` is written whole (storage.files: on a local disk under a temporary
name starting with `.`, synced, then renamed; in object storage, uploaded under its final name, where
it appears only once complete). A part is committed after `rows_per_file` rows or `flush_seconds`
after its first row, so a killed run loses at most that much work in progress, never a committed part.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import OutputConfig
from pipeline.errors import OutputError
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
        on_commit: Callable[[], None] | None = None,  # after each commit (the run records its summary)
        lease: Lease | None = None,  # object storage: checked before each commit
    ):
        self.folder, self.schema, self.cfg, self.shard = folder, schema, cfg, shard
        self.on_commit = on_commit
        self.lease = lease
        folder.remove_temporary(layout.unfinished_part_prefix(shard))  # parts a killed run never committed
        existing = [layout.part_number(p) for p in layout.committed_parts(folder, shard)]
        self._next = max(existing, default=-1) + 1
        self._rows: list[dict[str, Any]] = []
        self._first_at = 0.0
        self.parts: list[str] = []
        self.write_seconds = 0.0

    def add(self, row: dict[str, Any]) -> None:
        if not self._rows:
            self._first_at = time.monotonic()
        self._rows.append(row)
        if len(self._rows) >= self.cfg.rows_per_file or time.monotonic() - self._first_at >= self.cfg.flush_seconds:
            self.flush()

    def flush(self) -> None:
        """Commit the buffered rows as one part file, whole."""
        if not self._rows:
            return
        if self.lease is not None and self.lease.lost:
            raise OutputError(
                f"output.dir={str(self.folder)!r} shard {self.shard}: another run took over this run's lease (it "
                f"could not be renewed); {len(self._rows)} rows were not committed, a rerun annotates them again"
            )
        started = time.perf_counter()
        buffer = pa.BufferOutputStream()
        table = pa.Table.from_pylist(self._rows, schema=self.schema)
        pq.write_table(table, buffer, compression=str(self.cfg.compression))
        name = layout.part_name(self.shard, self._next)
        self.folder.write(name, buffer.getvalue().to_pybytes(), sync=True)
        self.parts.append(name)
        self._next += 1
        self._rows = []
        self.write_seconds += time.perf_counter() - started
        if self.on_commit:
            self.on_commit()

    def close(self) -> None:
        self.flush()
