"""What a run may do with its output folder, and what it has left to do there.

A shard holds its part of the folder for the whole run (a kernel lock, or a lease in object
storage); the folder keeps one result set (`_settings.json`); the committed parts are the resume
index, and their ids are what a rerun skips.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import OutputMode
from pipeline.errors import ConfigError, OutputError
from pipeline.records import Item, error_kind, id_hash
from pipeline.storage import layout
from pipeline.storage.files import Folder, filesystem
from pipeline.storage.locks import Lease, LeaseHeld, flock


def id_hashes(ids: list[str]) -> np.ndarray:
    return np.array([id_hash(i) for i in ids], dtype=np.uint64)


class DoneIds:
    """Ids already in committed parts, as sorted 64-bit hashes with how often each was written (a
    repeated id's error row is written too): 12 bytes an id, however many parts."""

    def __init__(self, folder: Folder):
        chunks = [np.empty(0, np.uint64)]
        for part in layout.committed_parts(folder):
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


def todo(items: Iterator[Item], done: DoneIds, skipped: Counter) -> Iterator[Item]:
    """This shard's items not yet committed (`skipped["done"]` counts the others). A repeated id
    becomes an error row, never a silent drop; the n-th use of an id (the first may be another
    shard's item) is done once n rows have it."""
    seen: Counter[int] = Counter()  # uses so far of each id's 64-bit hash: a few tens of bytes an item
    for item in items:
        h = id_hash(item.id)
        seen[h] += 1
        if not item.mine:
            continue
        if done.count(h) >= seen[h]:
            skipped["done"] += 1
            continue
        if seen[h] > 1:
            item.error = item.error or f"duplicate id: {item.id!r} was already used by an earlier item"
        yield item


def take_out_errors(folder: Folder, shard: int, kinds: list[str], compression: str) -> int:
    """Take this shard's rows whose error is of one of `kinds` out of its committed parts, so that the
    run annotates their items anew (output.retry_errors): a part is rewritten whole without them (in
    place, atomically) or removed if nothing else is left. A `file not found` row is taken out only
    once its file is there, so that a scheduled rerun does not rewrite parts for files still missing.
    Returns how many rows were taken out."""
    wanted = set(kinds)
    taken = 0
    for part in layout.committed_parts(folder, shard) if wanted else []:
        with pq.ParquetFile(folder.open(part)) as f:
            found = f.read(columns=["error", "source"]).to_pylist()
        drop = [_retry(r["error"], r["source"], wanted) for r in found]
        if not any(drop):
            continue
        table = pq.read_table(folder.open(part))
        keep = table.filter(pa.array([not d for d in drop]))
        if keep.num_rows:
            buffer = pa.BufferOutputStream()
            pq.write_table(keep, buffer, compression=compression)
            folder.write(part, buffer.getvalue().to_pybytes(), sync=True)
        else:
            folder.delete(part)
        taken += sum(drop)
    return taken


def _retry(error: str | None, source: str, kinds: set[str]) -> bool:
    if error is None or error_kind(error) not in kinds:
        return False
    if error_kind(error) != "file not found":
        return True
    try:
        fs, path = filesystem(source)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except (OSError, ValueError, ConfigError):
        return True  # a store that cannot answer now: try the item, which gives its row again


@contextmanager
def exclusive(folder: Folder, shard: int, lease_seconds: float = 120.0) -> Iterator[Lease | None]:
    """Hold this shard of the folder for the whole run; a second run on it is refused, naming the holder.

    On a local disk a kernel lock; in object storage a lease, renewed while the run lives and expiring
    after it; the sink checks before each commit that it still holds it."""
    refused = (
        f"output.dir={str(folder)!r} shard {shard} is being written by {{}}; wait for that run to finish "
        "(a rerun then resumes where it stopped) or choose another output.dir"
    )
    if folder.remote:
        lease = Lease(folder, layout.lease_name(shard), ttl=lease_seconds)
        try:
            lease.acquire()
        except LeaseHeld as e:
            raise OutputError(refused.format(e)) from None
        try:
            yield lease
        finally:
            lease.release()
        return
    path = Path(folder.path(layout.lock_name(shard)))
    with ExitStack() as stack:
        for attempt in range(3):  # kosmos-status takes the lock for an instant to see whether it is free
            try:
                f = stack.enter_context(flock(path, blocking=False))
                break
            except BlockingIOError:
                if attempt == 2:
                    raise OutputError(refused.format(path.read_text().strip() or "another process")) from None
                time.sleep(0.2)
        f.truncate(0)
        f.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        f.flush()
        yield None


@contextmanager
def _one_at_a_time(folder: Folder) -> Iterator[None]:
    """Shards prepare the folder one at a time (a kernel lock, or a lease in object storage)."""
    if not folder.remote:
        with flock(Path(folder.path(layout.SETTINGS_LOCK)), blocking=True):
            yield
        return
    lease = Lease(folder, layout.SETTINGS_LEASE, ttl=120.0)
    lease.acquire(blocking=True)
    try:
        yield
    finally:
        lease.release()


def check_mode(folder: Folder, mode: OutputMode, shard: int) -> None:
    """output.mode=error refuses a shard that already has parts; the other shards of a multirun,
    started at other times, may have theirs."""
    parts = layout.committed_parts(folder, shard)
    if mode == OutputMode.error and parts:
        raise OutputError(
            f"output.dir={str(folder)!r} already holds {len(parts)} part files of shard {shard} and output.mode=error; "
            "use output.mode=resume to continue it, output.mode=overwrite to start again, or another output.dir"
        )


def stale_summaries(folder: Folder, num_shards: int) -> list[str]:
    """The summaries of runs with another number of shards (or of shards beyond it)."""
    current = {layout.summary_name(k, num_shards) for k in range(num_shards)}
    return [n for n in folder.names() if layout.is_summary(n) and n not in current]


def prepare_folder(folder: Folder, mode: OutputMode, shard: int, num_shards: int, settings: dict) -> None:
    """Apply output.mode, and keep one result set per folder: results of other settings never mix.

    overwrite removes this shard's parts, the parts of shards beyond `num_shards`, and, when the
    recorded settings differ, every part: shards of one multirun start together and must not remove
    each other's fresh parts, but nothing made with other settings may stay. Shards prepare the folder
    one at a time.
    """
    with _one_at_a_time(folder):
        check_mode(folder, mode, shard)
        parts = layout.committed_parts(folder)
        recorded = layout.recorded_settings(folder)
        if mode == OutputMode.overwrite:
            for part in parts:
                part_shard = layout.part_shard(part)
                if recorded != settings or part_shard == shard or part_shard >= num_shards:
                    folder.delete(part)
            parts = layout.committed_parts(folder)
        for name in stale_summaries(folder, num_shards):  # of another shard count: status must not read them
            folder.delete(name)
        if recorded is not None and recorded != settings and parts:
            changed = sorted(k for k in settings.keys() | recorded.keys() if settings.get(k) != recorded.get(k))
            detail = "; ".join(f"{k}: {recorded.get(k)!r} -> {settings.get(k)!r}" for k in changed)
            raise OutputError(
                f"output.dir={str(folder)!r} holds results made with other settings ({detail}); set them back, "
                "use output.mode=overwrite to start again (it removes those results), or choose another output.dir"
            )
        if recorded != settings:
            folder.write(layout.SETTINGS, json.dumps(settings, indent=2, sort_keys=True))
