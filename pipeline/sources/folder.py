"""Images named by input.path: a folder (walked recursively in sorted order), one image, a glob, or a
list of these. An item's id is its path under the folder they all share: the folder given, an image's
own folder, a glob's fixed part (`photos/2026/*.jpg`: `photos/2026`), or, for a list, the folder their
folders share, so `input.path=photos/` gives `2026/a.jpg` and `input.path=photos/2026/a.jpg` gives `a.jpg`.

Each folder is listed and sorted on its own (files and subfolders together), so the walk streams
whatever the folder's size and its order does not depend on the file system. Only regular files are
taken (a FIFO would block its reader for ever), symbolic links to them included; an image named
explicitly is taken whatever its extension, the others by input.extensions. A name that is not UTF-8
becomes an id with `\\xNN` escapes (records.printable). A folder in object storage is listed whole
before the run (keys under the prefix).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
from pyarrow.fs import FileType

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.records import Item, printable
from pipeline.sources.base import Keep, base_name, by_hash, info, listing
from pipeline.storage.files import has_glob, is_remote


class FolderSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        self.extensions = {e.lower().lstrip(".") for e in cfg.extensions}
        self.paths = [cfg.path] if isinstance(cfg.path, str) else list(cfg.path)

    def check(self) -> None:
        for path in self.paths:
            if is_remote(path) and has_glob(path):
                raise InputError(f"input.path={path!r}: globs are for local paths; give the folder (prefix) or a file")
            if not is_remote(path) and has_glob(path):
                continue
            found = info(path).type
            if found == FileType.NotFound:
                raise InputError(f"input.path={path!r} does not exist")
            if found == FileType.File and path.endswith(".parquet"):
                raise InputError(f"input.path={path!r} is a parquet file: for a manifest use input=parquet")
        if next(self.walk(), None) is None:
            where = self.cfg.path if isinstance(self.cfg.path, str) else ", ".join(self.paths)
            raise InputError(
                f"input.path={where!r} holds no images ({', '.join(self.cfg.extensions)}); see input.extensions"
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
        """Every image input.path names, in order."""
        if len(self.paths) == 1 and is_remote(self.paths[0]):
            return self._remote(self.paths[0])
        named = [Path(p).expanduser() for p in self.paths]
        base = Path(os.path.commonpath([_base(p) for p in named])) if named else Path(".")
        return (item for path in named for item in self._local(path, base))

    def _remote(self, location: str) -> Iterator[Item]:
        if info(location).type == FileType.File:
            return iter([Item(id=base_name(location), source=location, path=location)])
        return (Item(id=key, source=uri, path=uri) for key, uri in listing(location, self._wanted))

    def _local(self, path: Path, base: Path) -> Iterator[Item]:
        if glob.has_magic(str(path)):
            for match in sorted(glob.glob(str(path), recursive=True)):
                if os.path.isdir(match):
                    yield from self._local(Path(match), base)
                elif self._wanted(match) and os.path.isfile(match):
                    yield _item(Path(match), base)
        elif path.is_dir():
            yield from self._walk(path, base)
        elif path.is_file():
            yield _item(path, base)

    def _walk(self, folder: Path, base: Path) -> Iterator[Item]:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path), base)
            elif self._wanted(entry.name) and _regular(entry):
                yield _item(Path(entry.path), base)


def _base(path: Path) -> str:
    """The folder the ids of what `path` names are relative to."""
    if glob.has_magic(str(path)):
        parts = path.parts
        fixed = parts[: next(i for i, part in enumerate(parts) if glob.has_magic(part))]
        return os.path.abspath(Path(*fixed)) if fixed else os.getcwd()
    return os.path.abspath(path if path.is_dir() else path.parent)


def _item(path: Path, base: Path) -> Item:
    """An image's item: its id its path under `base` (links not followed: a link is named as itself)."""
    item_id = Path(os.path.relpath(os.path.abspath(path), base)).as_posix()
    return Item(id=printable(item_id), source=printable(str(path)), path=str(path))


def _regular(entry: os.DirEntry) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:  # a dangling link, a file gone since the listing: not an image to take
        return False
