"""The image behind an output row, for the formats that carry images (YOLO, Hugging Face): a file
linked or copied, or the bytes of a manifest's row or a tar's member.

Rows come in about the order their input gave them (a part holds them as they finished, a batch
apart), so a manifest or a tar is read forward, once, keeping the last few images it passed; a row
further back opens the file again. Two files are open at most (rows of neighbouring tars meet at
their boundary); the one used least recently is closed. Memory: those few images and one batch of
the manifest.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

from PIL import Image

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.sources.manifest import batch_rows, open_parquet
from pipeline.sources.webdataset import IMAGE_MEMBERS, member_key, tar_members
from pipeline.storage.files import filesystem, is_remote, read_bytes

KEEP = 256  # images kept after they were passed, for rows that finished a little out of order
OPEN = 2  # manifests or tars read at once
# `<manifest>#<row>` or `<tar>#<sample key>` (a key may hold `/` and `#`): the first `#` after a container's name
ARCHIVE = re.compile(r"^(.*?\.(?:parquet|tar|tar\.gz|tgz|tar\.bz2|tar\.xz)(?:\?[^#]*)?)#(.*)$", re.IGNORECASE)
# Extensions ultralytics and datasets read as images; others are named after the format Pillow finds.
EXTENSIONS = {"jpg", "jpeg", "png", "bmp", "webp", "tif", "tiff"}


class SourceImages:
    """Image files and bytes of output rows by their `source` (see the module's docstring)."""

    def __init__(self, image_column: str = "image", max_bytes: int = InputConfig().max_image_bytes):
        self.image_column, self.max_bytes = image_column, max_bytes  # the run's input.image_column, max_image_bytes
        self._readers: OrderedDict[str, _Forward] = OrderedDict()

    def is_file(self, source: str) -> bool:
        """Whether the source is an image file of its own, not a row of a manifest or a tar's sample."""
        if not is_remote(source) and os.path.isfile(os.path.expanduser(source.removeprefix("file://"))):
            return True
        return ARCHIVE.match(source) is None

    def data(self, source: str) -> bytes:
        if self.is_file(source):
            try:
                return read_bytes(source)
            except FileNotFoundError:
                raise _missing(source) from None
        file, key = ARCHIVE.match(source).groups()
        reader = self._readers.pop(file, None) or _Forward(file, self.image_column, self.max_bytes)
        self._readers[file] = reader  # the most recent last
        while len(self._readers) > OPEN:
            self._readers.popitem(last=False)[1].close()
        return reader.get(key)

    def close(self) -> None:
        for reader in self._readers.values():
            reader.close()
        self._readers.clear()

    def for_training(self, source: str) -> tuple[str, bytes | None]:
        """(extension, bytes to write or None to link or copy the file): formats a trainer reads as
        they are; others (gif) re-encoded as PNG, which ultralytics takes where it takes no GIF."""
        data = None if self.is_file(source) else self.data(source)
        ext = extension(source, data)
        if ext in EXTENSIONS:
            return ext, data
        with Image.open(io.BytesIO(data) if data is not None else self._local(source)) as im:
            out = io.BytesIO()
            im.convert("RGBA" if "A" in im.getbands() or "transparency" in im.info else "RGB").save(out, "PNG")
        return "png", out.getvalue()

    def _local(self, source: str) -> Path:
        path = Path(source.removeprefix("file://")).expanduser().resolve()
        if not path.is_file():
            raise _missing(source)
        return path

    def place(self, source: str, target: Path, link: bool) -> None:
        """The image at `target`: a hard link (else a symbolic one) to a local file where `link`, else a copy."""
        if self.is_file(source) and not is_remote(source):
            path = self._local(source)
            if link:
                try:
                    os.link(path, target)
                except OSError as e:  # another file system, or hard links not allowed there
                    if e.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP):
                        raise
                    target.symlink_to(path)
            else:
                shutil.copyfile(path, target)
            return
        target.write_bytes(self.data(source))


def _missing(source: str) -> InputError:
    where = (
        ""
        if Path(source).is_absolute() or is_remote(source)
        else (" (a path relative to the folder the run ran in: run kosmos-labels from there)")
    )
    return InputError(f"image {source!r} is not there{where}; the export needs every image it lists")


def extension(source: str, data: bytes | None = None) -> str:
    """The image's extension as readers expect it: the source's own if they read it, else Pillow's format."""
    name = source.rsplit("#", 1)[-1] if "#" in source else source
    ext = name.rsplit(".", 1)[-1].lower() if "." in name.rsplit("/", 1)[-1] else ""
    if ext in EXTENSIONS:
        return ext
    try:
        with Image.open(io.BytesIO(data) if data is not None else source) as im:
            found = (im.format or "png").lower()
    except OSError:
        found = "png"
    return {"jpeg": "jpg", "tiff": "tif"}.get(found, found)


class _Forward:
    """One manifest or tar, read forward; the last KEEP images passed are kept."""

    def __init__(self, file: str, image_column: str, max_bytes: int):
        self.file, self.image_column, self.max_bytes = file, image_column, max_bytes
        self.tar = not file.split("?")[0].lower().endswith(".parquet")
        self.kept: OrderedDict[str, bytes] = OrderedDict()
        self.items: Iterator[tuple[str, bytes]] | None = None

    def close(self) -> None:
        if self.items is not None:
            self.items.close()  # closes the file the generator holds open
        self.kept.clear()

    def get(self, key: str) -> bytes:
        if key in self.kept:
            return self.kept[key]
        for again in (False, True):
            if again or self.items is None:
                if self.items is not None:
                    self.items.close()
                self.items = self._tar() if self.tar else self._manifest()
            for found, data in self.items:
                self.kept[found] = data
                if len(self.kept) > KEEP:
                    self.kept.popitem(last=False)
                if found == key:
                    return data
        raise InputError(f"image {key!r} is no longer in {self.file!r}: was the input changed after the run?")

    def _manifest(self) -> Iterator[tuple[str, bytes]]:
        """Each row's image bytes, read as a run reads them (sources.manifest: page by page, in batches
        of at most BATCH_BYTES)."""
        columns = [self.image_column]
        with open_parquet(self.file) as pf:
            row = 0
            for group in range(pf.metadata.num_row_groups):
                size = batch_rows(pf.metadata.row_group(group), columns)
                for batch in pf.iter_batches(batch_size=size, row_groups=[group], columns=columns):
                    for value in batch.column(0).to_pylist():
                        data = value.get("bytes") if isinstance(value, dict) else value
                        yield str(row), data or b""
                        row += 1

    def _tar(self) -> Iterator[tuple[str, bytes]]:
        """Each sample's image: of several image members, the one a run takes (IMAGE_MEMBERS' order)."""
        fs, path = filesystem(self.file)
        key, images = None, {}
        with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
            for member in tar_members(tar):
                if not member.isfile():
                    continue
                found, ext = member_key(member)
                if found != key and images:
                    yield key, next(images[e] for e in IMAGE_MEMBERS if e in images)
                    images = {}
                key = found
                if ext in IMAGE_MEMBERS and member.size <= self.max_bytes:  # else the run refused it unread too
                    images[ext] = tar.extractfile(member).read()
            if images:
                yield key, next(images[e] for e in IMAGE_MEMBERS if e in images)
