"""Where items come from: one reader per kind of input, behind one small protocol (`base.Source`).

Problems with the input as a whole (missing path, missing column) raise `InputError` before anything
is loaded; problems with one item (a null cell) travel with the item and become that row's error.
"""

from __future__ import annotations

from collections.abc import Iterator
from itertools import islice

from pipeline.config import InputConfig, InputKind
from pipeline.records import Item
from pipeline.sources.base import Keep, Source
from pipeline.sources.folder import FolderSource
from pipeline.sources.manifest import ManifestSource
from pipeline.sources.webdataset import WebDatasetSource

READERS = {InputKind.folder: FolderSource, InputKind.parquet: ManifestSource, InputKind.webdataset: WebDatasetSource}


def open_source(cfg: InputConfig) -> Source:
    return READERS[cfg.kind](cfg)


def iter_items(cfg: InputConfig, keep: Keep | None = None) -> Iterator[Item]:
    """The input's items in a stable order, at most `input.limit` of them (counted over every shard's),
    each saying whether it is this shard's (`input.shard_index` of `input.num_shards`).

    `keep(id)` says which of its own items the caller still needs (not yet done): a manifest reads
    image bytes only for row groups that hold one."""
    items = open_source(cfg).items(keep)
    return islice(items, cfg.limit) if cfg.limit is not None else items


__all__ = ["Item", "Keep", "Source", "iter_items", "open_source"]
