"""Files that appear whole, on a local disk or in object storage.

Locally a file is written under a temporary name beside its own (starting with `.`, which parquet
readers and globs of `_*.json` skip), synced, then renamed, so a reader never sees half of one. Object
stores have no rename, but an object appears only when its upload completes: it is written whole
under its final name. Any URI pyarrow reaches works (`s3://bucket/prefix`, `gs://`, `hdfs://`; other
schemes through fsspec where it is installed), with credentials and endpoints from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_ENDPOINT_URL`, ...), never from the config.
"""

from __future__ import annotations

import functools
import glob
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO
from urllib.parse import urlsplit

import pyarrow.fs as pafs


@contextmanager
def atomic(path: str | Path, mode: str = "w", sync: bool = False) -> Iterator[IO]:
    """A file opened under a temporary name beside `path`, renamed to `path` when the block ends (and
    removed if it raises), so that a reader never sees half of it; `sync`: on the disk before it appears."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, mode) as f:
            yield f
            if sync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync:
        _fsync_dir(path.parent)


def write_text(path: str | Path, text: str) -> None:
    with atomic(path) as f:
        f.write(text)


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `location` (a local path or a URI) and its path there."""
    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.expanduser(location.removeprefix("file://"))
    parts = urlsplit(location)
    fs, root = _filesystem(f"{parts.scheme}://{parts.netloc}")
    return fs, root.rstrip("/") + parts.path


@functools.cache
def _filesystem(base: str) -> tuple[pafs.FileSystem, str]:
    """One client per bucket (or host), made once: images of a remote folder are read one by one."""
    import pyarrow as pa

    try:
        return pafs.FileSystem.from_uri(base)
    except pa.ArrowInvalid:  # a scheme pyarrow does not know
        try:
            import fsspec
        except ImportError:
            raise ValueError(f"{base!r}: pyarrow does not know this scheme (and fsspec is not installed)") from None
        fs, root = fsspec.core.url_to_fs(base)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


def read_bytes(location: str | Path) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


class Folder:
    """An output folder, local or in object storage: the few operations a run and its readers need."""

    def __init__(self, location: str | Path):
        self.location = str(location)
        self.fs, self.root = filesystem(location)
        self.remote = is_remote(location)

    def __str__(self) -> str:
        return self.location

    def path(self, name: str) -> str:
        """`name`'s path in the folder's filesystem (a local path where the folder is local)."""
        return f"{self.root.rstrip('/')}/{name}"

    def sub(self, name: str) -> Folder:
        return Folder(f"{self.location.rstrip('/')}/{name}")

    def names(self) -> list[str]:
        """The files directly in the folder, by name (none if it does not exist)."""
        found = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(info.base_name for info in found if info.type == pafs.FileType.File)

    def exists(self, name: str) -> bool:
        return self.fs.get_file_info(self.path(name)).type == pafs.FileType.File

    def mtime(self, name: str) -> float | None:
        info = self.fs.get_file_info(self.path(name))
        return info.mtime.timestamp() if info.mtime else None

    def open(self, name: str):
        """A seekable file, for pyarrow.parquet.ParquetFile."""
        return self.fs.open_input_file(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        with self.fs.open_input_stream(self.path(name)) as f:
            return f.read()

    def read_text(self, name: str) -> str:
        return self.read_bytes(name).decode("utf-8")

    def write(self, name: str, data: bytes | str, sync: bool = False) -> None:
        """Write a whole file: it appears complete or not at all (a killed writer leaves nothing);
        `sync`: on a local disk, on the disk before it appears (an upload is durable once complete)."""
        data = data.encode("utf-8") if isinstance(data, str) else data
        if self.remote:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        with atomic(Path(self.root) / name, "wb", sync=sync) as f:
            f.write(data)

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))

    def remove_temporary(self, prefix: str) -> None:
        """Remove what killed writers left under temporary names starting with `prefix` (local disks only:
        an unfinished upload never appears)."""
        if not self.remote:
            for stale in Path(self.root).glob(f"{glob.escape(prefix)}*.tmp-*"):
                stale.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
