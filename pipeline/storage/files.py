"""Files that appear whole, on a local disk or in object storage.

Locally a file is written under a temporary name beside its own (starting with `.`, which parquet
readers and globs of `_*.json` skip), synced, then renamed, so a reader never sees half of one. Object
stores have no rename, but an object appears only when its upload completes: it is written whole
under its final name. Any URI pyarrow reaches works (`s3://bucket/prefix`, `gs://`, `hdfs://`; other
schemes through fsspec where it is installed), with credentials from the environment
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...), never from a URI (they would be copied into
summaries and logs), and store options from the environment or the URI's query string
(`?endpoint_override=host:9000&scheme=http`).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import urlsplit

import pyarrow.fs as pafs

from pipeline.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


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


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """A folder built under a temporary name beside `path` and renamed to `path` when the block ends
    (an older one moved aside first, then removed); removed instead if the block raises, so a killed
    writer never leaves half a folder under the name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old-{os.getpid()}") if path.exists() else None
        if old is not None:
            path.rename(old)
        tmp.rename(path)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def safe_relative(item_id: str) -> str:
    """A relative path for an id, to name a file after it inside a folder: its `/`-separated parts,
    empty, `.` and `..` ones dropped, each without control characters and at most 200 bytes (long
    ones end with a hash), so that no id writes outside the folder or fails to be a file name."""
    parts = []
    for part in item_id.replace("\\", "/").split("/"):
        part = "".join("_" if ord(c) < 32 or c == "\x7f" else c for c in part).strip()
        if part in ("", ".", ".."):
            continue
        if len(part.encode("utf-8", "surrogatepass")) > 200:
            digest = hashlib.sha1(part.encode("utf-8", "surrogatepass")).hexdigest()[:10]
            part = part.encode("utf-8", "surrogatepass")[:180].decode("utf-8", "ignore") + "-" + digest
        parts.append(part)
    return "/".join(parts) or "item"


def write_text(path: str | Path, text: str) -> None:
    with atomic(path) as f:
        f.write(text)


def is_remote(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def _redacted(location: str) -> str:
    parts = urlsplit(location)
    return parts._replace(netloc="***@" + parts.hostname if parts.hostname else "***").geturl()


def check_location(location: str | Path, key: str) -> None:
    """Refuse a URI that carries credentials (they would be copied into summaries, settings and logs)
    or options the store does not take, naming `key`; before anything is written."""
    location = str(location)
    if not is_remote(location):
        return
    parts = urlsplit(location)
    if parts.username or parts.password:
        raise ConfigError(
            f"{key}={_redacted(location)!r} holds credentials, which would be copied into the summaries, "
            "settings and logs: remove them and set them in the environment (AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_ENDPOINT_URL, or your store's variables)"
        )
    try:
        filesystem(location)
    except ConfigError as e:
        raise ConfigError(f"{key}={location!r}: {e}") from None


def _split(location: str) -> tuple[str, str]:
    """(a URI without its query string, the query string with its `?`, or ""); a local path is a
    path whatever it holds (`?` is a character of file names)."""
    if not is_remote(location):
        return location, ""
    base, mark, query = location.partition("?")
    return base, mark + query


def without_query(location: str) -> str:
    return _split(location)[0]


def has_glob(location: str) -> bool:
    """Whether a path holds glob characters (`*`, `?`, `[`); a URI's query string does not count."""
    return glob.has_magic(without_query(location))


def join(location: str | Path, name: str) -> str:
    """`name` under `location`, a query string (`?endpoint_override=...`) kept at the end."""
    base, query = _split(str(location))
    return f"{base.rstrip('/')}/{name}{query}"


def parent(location: str | Path) -> str:
    """The folder that holds `location`, a query string kept."""
    base, query = _split(str(location))
    return base.rstrip("/").rsplit("/", 1)[0] + query


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """The filesystem that holds `location` (a local path or a URI) and its path there. A URI's query
    string goes to the store (pyarrow refuses options it does not know for s3:// and gs://)."""
    location = str(location)
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.expanduser(location.removeprefix("file://"))
    parts = urlsplit(location)
    if parts.username or parts.password:
        raise ConfigError(f"{_redacted(location)!r}: credentials belong in the environment, not in a URI")
    fs, root = _filesystem(f"{parts.scheme}://{parts.netloc}" + (f"?{parts.query}" if parts.query else ""))
    return fs, root.rstrip("/") + parts.path


@functools.cache
def _filesystem(base: str) -> tuple[pafs.FileSystem, str]:
    """One client per bucket (or host), made once: images of a remote folder are read one by one."""
    import pyarrow as pa

    try:
        return pafs.FileSystem.from_uri(base)
    except pa.ArrowInvalid as e:
        if "query parameter" in str(e):  # an option the store does not take
            raise ConfigError(str(e)) from None
    try:  # a scheme pyarrow does not know
        import fsspec
    except ImportError:
        raise ConfigError(f"{base!r}: pyarrow does not know this scheme (and fsspec is not installed)") from None
    try:
        fs, root = fsspec.core.url_to_fs(base)
    except (ValueError, ImportError) as e:  # a scheme fsspec does not know either, or its package is missing
        raise ConfigError(f"{base!r}: no filesystem reads this scheme ({e})") from None
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), root


class TooLarge(ValueError):
    """A file over the size it may have: refused without being read."""


def read_bytes(location: str | Path, limit: int | None = None) -> bytes:
    """The whole file, refused (TooLarge) without being read if it holds more than `limit` bytes.
    Only a regular file is read: a FIFO or a device would block or never end (IsADirectoryError for
    a folder, OSError otherwise)."""
    location = str(location)
    if not is_remote(location):
        path = os.path.expanduser(location.removeprefix("file://"))
        found = os.stat(path)
        if stat.S_ISDIR(found.st_mode):
            raise IsADirectoryError(path)
        if not stat.S_ISREG(found.st_mode):
            raise NotRegular(path)
        if limit is not None and found.st_size > limit:
            raise TooLarge(found.st_size)
        with open(path, "rb") as f:
            data = f.read() if limit is None else f.read(limit + 1)
    else:
        fs, path = filesystem(location)
        if limit is not None:
            size = fs.get_file_info(path).size
            if size is not None and size > limit:
                raise TooLarge(size)
        with fs.open_input_stream(path) as f:
            data = f.read() if limit is None else f.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise TooLarge(len(data))
    return data


def retried(call: Callable[[], T], cfg, what: str) -> T:
    """`call()`, tried again after an OSError that may pass (a timeout, an expired token, a refused
    connection): `cfg.read_retries` more times, `cfg.retry_seconds` apart, doubling. A missing file,
    a permission refused locally, a folder or a file too large are answers, not faults: raised at once."""
    for attempt in range(cfg.read_retries + 1):
        try:
            return call()
        except (FileNotFoundError, PermissionError, IsADirectoryError, NotRegular):
            raise
        except OSError as e:
            if attempt == cfg.read_retries:
                raise
            log.info(
                "%s failed (%s: %s); trying again in %.1f s", what, type(e).__name__, e, cfg.retry_seconds * 2**attempt
            )
            time.sleep(cfg.retry_seconds * 2**attempt)
    raise AssertionError("unreachable")


class NotRegular(OSError):
    """A path that is not a regular file (a FIFO, a socket, a device)."""


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
        return Folder(join(self.location, name))

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
