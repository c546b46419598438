"""What every source shares: the protocol a reader follows, the split by id hash, and looking at
paths that may be local or in object storage."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import pyarrow as pa
from pyarrow.fs import FileSelector, FileType

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.records import Item, id_hash
from pipeline.storage.files import filesystem, join, without_query

# keep(id): whether the caller still needs this shard's item (not yet done); lets a reader skip bytes.
Keep = Callable[[str], bool]


class Source(Protocol):
    """A reader of one kind of input."""

    def check(self) -> None:
        """Fail fast, before any model is loaded, if the input cannot be read at all (InputError)."""

    def items(self, keep: Keep | None = None) -> Iterator[Item]:
        """Every shard's items in a stable order, each saying whether it is this shard's (`mine`)."""

    def count(self) -> int | None:
        """How many items the input holds (every shard's), where that is cheap to know; else None."""

    def keep_fields(self) -> list[pa.Field]:
        """The output columns of `input.keep_columns`, typed."""


def by_hash(cfg: InputConfig, items: Iterator[Item]) -> Iterator[Item]:
    """Items split between shards by a stable hash of their id."""
    for item in items:
        item.mine = id_hash(item.id) % cfg.num_shards == cfg.shard_index
        yield item


def info(location: str):
    """What `location` is (pyarrow FileInfo: type, size), locally or in object storage."""
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:  # the store refused (credentials, endpoint, bucket)
        raise InputError(f"cannot read {location!r}: {e}") from None


def listing(prefix: str, wanted: Callable[[str], bool]) -> list[tuple[str, str]]:
    """(key, URI) of the files under a folder in object storage whose key under it is `wanted`,
    sorted by path components (the order of the local walk). No name component may start with `.`."""
    fs, root = filesystem(prefix)
    root = root.rstrip("/")
    try:
        found = fs.get_file_info(FileSelector(root, recursive=True))
    except OSError as e:
        raise InputError(f"cannot list {prefix!r}: {e}") from None
    keys = [f.path[len(root) + 1 :] for f in found if f.type == FileType.File]
    keys = [k for k in keys if wanted(k) and not any(p.startswith(".") for p in k.split("/"))]
    return [(key, join(prefix, key)) for key in sorted(keys, key=lambda k: k.split("/"))]


def base_name(location: str) -> str:
    return without_query(location).rstrip("/").rsplit("/", 1)[-1]
