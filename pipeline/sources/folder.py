"""A folder of images, walked recursively in sorted order; an item's id is its path under the folder.

Each folder is listed and sorted on its own (files and subfolders together), so the walk streams
whatever the folder's size and its order does not depend on the file system. Only regular files are
taken (a FIFO would block its reader for ever), symbolic links to them included; a name that is not
UTF-8 becomes an id with `\\xNN` escapes (records.printable). A folder in object storage is listed
whole before the run (keys under the prefix).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from pyarrow.fs import FileType

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.records import Item, printable
from pipeline.sources.base import Keep, by_hash, info, listing
from pipeline.storage.files import is_remote


class FolderSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.extensions = {e.lower().lstrip(".") for e in cfg.extensions}

    def check(self) -> None:
        path = self.cfg.path
        found = info(path).type
        if found == FileType.NotFound:
            raise InputError(f"input.path={path!r} does not exist")
        if found != FileType.Directory:
            hint = " (for a manifest use input=parquet)" if path.endswith(".parquet") else ""
            raise InputError(f"input.path={path!r} is not a folder{hint}")
        if next(self.walk(), None) is None:
            raise InputError(
                f"input.path={path!r} holds no images ({', '.join(self.cfg.extensions)}); see input.extensions"
            )

    def items(self, keep: Keep | None = None) -> Iterator[Item]:
        return by_hash(self.cfg, self.walk())

    def count(self) -> int:
        return sum(1 for _ in self.walk())

    def keep_fields(self) -> list[pa.Field]:
        return []

    def _wanted(self, name: str) -> bool:
        return "." in name and name.rsplit(".", 1)[-1].lower() in self.extensions

    def walk(self) -> Iterator[Item]:
        """Every image under the folder, in order."""
        if is_remote(self.cfg.path):
            return (Item(id=key, source=uri, path=uri) for key, uri in listing(self.cfg.path, self._wanted))
        root = Path(self.cfg.path).expanduser()

        def walk(folder: Path) -> Iterator[Item]:
            with os.scandir(folder) as it:
                entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    yield from walk(Path(entry.path))
                elif self._wanted(entry.name) and _regular(entry):
                    path = Path(entry.path)
                    item_id = printable(path.relative_to(root).as_posix())
                    yield Item(id=item_id, source=printable(str(path)), path=str(path))

        return walk(root)


def _regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:  # a dangling link, a file gone since the listing: not an image to take
        return False
