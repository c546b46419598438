"""WebDataset tar shards (what img2dataset writes): one item per sample, read member by member.

A sample is the run of consecutive members sharing a key (the path up to the first dot of the file
name); its image is its jpg/jpeg/png/webp member, its other members can be kept as string columns.
Shards split the tars by file when there are enough of them to balance, else by id hash.
"""

from __future__ import annotations

import glob
import itertools
import logging
import os
import re
import tarfile
from collections.abc import Iterator

import pyarrow as pa
from pyarrow.fs import FileType

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.records import Item, printable
from pipeline.sources.base import Keep, base_name, by_hash, info
from pipeline.storage.files import TooLarge, filesystem, has_glob, is_remote, retried

log = logging.getLogger(__name__)

IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp")
# Shards split tars by file when each gets at least this many: then their sizes differ by ~1/4 at most.
TARS_PER_SHARD = 4


def expand_braces(pattern: str) -> list[str]:
    """`a{00..02}b{x,y}` -> a00bx a00by a01bx ... (ranges keep the width of their first bound), as
    WebDataset and the shell spell shard lists."""
    match = re.search(r"\{([^{}]*)\}", pattern)
    if not match:
        return [pattern]
    body, head, tail = match.group(1), pattern[: match.start()], pattern[match.end() :]
    span = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if span:
        a, b = span.groups()
        choices = [str(i).zfill(len(a)) for i in range(int(a), int(b) + 1)]
    else:
        choices = body.split(",")
    return [expanded for c in choices for expanded in expand_braces(head + c + tail)]


def tar_files(path: str) -> list[str]:
    """The tars `input.path` names (braces expanded, then globs: local paths only), in that order;
    refused if there are none or a named one is missing."""
    files: list[str] = []
    for pattern in expand_braces(path if is_remote(path) else os.path.expanduser(path)):
        if has_glob(pattern) and is_remote(pattern):
            raise InputError(
                f"input.path={path!r}: globs are for local paths; name the tars with braces ({{00000..00099}})"
            )
        if glob.has_magic(pattern):
            files += sorted(glob.glob(pattern, recursive=True))
        elif info(pattern).type == FileType.File:
            files.append(pattern)
        else:
            raise InputError(f"input.path={path!r}: {pattern!r} does not exist")
    if not files:
        raise InputError(f"input.path={path!r} matches no tar files")
    return files


class WebDatasetSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg

    def check(self) -> None:
        tar_files(self.cfg.path)

    def count(self) -> int | None:
        """Samples in every tar, from their member headers alone: an uncompressed local tar is read a
        header at a time, seeking over the data. None where a tar is remote or compressed (counting
        would read it whole) or cannot be read."""
        tars = tar_files(self.cfg.path)
        if any(is_remote(t) for t in tars):
            return None
        total = 0
        for file in tars:
            try:
                with tarfile.open(file, "r:") as tar:
                    keys = (member_key(m)[0] for m in tar_members(tar) if m.isfile())
                    total += sum(1 for _ in itertools.groupby(keys))
            except (tarfile.TarError, EOFError, OSError):
                return None
        return total

    def keep_fields(self) -> list[pa.Field]:
        return [pa.field(c, pa.string()) for c in self.cfg.keep_columns]

    def items(self, keep: Keep | None = None) -> Iterator[Item]:
        tars = tar_files(self.cfg.path)
        mine = self._share(tars)
        return self._samples(mine) if mine is not None else by_hash(self.cfg, self._samples(tars))

    def _share(self, tars: list[str]) -> list[str] | None:
        """This shard's tars: contiguous runs of files of about equal total size. None (split by id
        hash, every shard reading every tar) where there are too few tars to balance or
        `input.limit` counts items across all of them."""
        n, limit = self.cfg.num_shards, self.cfg.limit
        if n == 1:
            return tars
        if limit is not None or len(tars) < TARS_PER_SHARD * n:
            log.info(
                "%d shards over %d tars: split by id hash, each shard reads every tar "
                "(%d or more tars are split by file%s)",
                n,
                len(tars),
                TARS_PER_SHARD * n,
                ", without input.limit" if limit is not None else "",
            )
            return None
        sizes = [info(t).size for t in tars]
        total, start, share = max(sum(sizes), 1), 0, []
        for tar, size in zip(tars, sizes):
            if min(int((start + size / 2) * n / total), n - 1) == self.cfg.shard_index:
                share.append(tar)
            start += size
        return share

    def _samples(self, tars: list[str]) -> Iterator[Item]:
        """One item per sample. Only the members a sample needs are read (its image, the kept columns),
        and one over input.max_image_bytes is refused without being read. What a damaged tar does not
        let us read becomes one error row, named after the last sample read before it, and the next tar
        goes on; a read that fails in passing is an `io error`, which a rerun tries again."""
        wanted = set(IMAGE_MEMBERS) | set(self.cfg.keep_columns)
        for file in tars:
            key, members = None, {}
            try:
                fs, path = filesystem(file)
                raw = retried(lambda fs=fs, path=path: fs.open_input_stream(path), self.cfg, f"opening {file}")
                with raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                    for member in tar_members(tar):
                        if not member.isfile():
                            continue
                        found, ext = member_key(member)
                        if found != key and key is not None:
                            yield self._sample(file, key, members)
                            members = {}
                        key = found
                        if ext not in wanted:
                            members[ext] = None  # named in an error message, never read
                        elif member.size > self.cfg.max_image_bytes:
                            members[ext] = TooLarge(member.size)
                        else:
                            members[ext] = tar.extractfile(member).read()
                if key is not None:
                    yield self._sample(file, key, members)
            except (tarfile.TarError, EOFError, OSError) as e:
                if key is not None and members:  # what came before the damage, as far as it was read
                    yield self._sample(file, key, members)
                after = f"after sample {key!r}" if key is not None else "at its start"
                name = base_name(file)
                damaged = isinstance(e, (tarfile.TarError, EOFError))  # else a read that failed: tried again later
                what = f"cannot read tar: {name} is damaged" if damaged else f"io error: {name} could not be read"
                yield Item(
                    id=f"{name}#unreadable",
                    source=file,
                    error=f"{what} {after} ({type(e).__name__}: {e}); the samples after it are lost",
                    extra=dict.fromkeys(self.cfg.keep_columns),
                )

    def _sample(self, file: str, key: str, members: dict[str, bytes | TooLarge | None]) -> Item:
        image = next((members[e] for e in IMAGE_MEMBERS if e in members), None)
        extra = {c: _text(members.get(c)) for c in self.cfg.keep_columns}
        item = Item(id=key, source=f"{file}#{key}", data=image if isinstance(image, bytes) else None, extra=extra)
        if isinstance(image, TooLarge):
            item.error = (
                f"too large: sample {key!r}'s image member holds {image.args[0]} bytes, over "
                f"input.max_image_bytes={self.cfg.max_image_bytes} (raise it if the image is genuine)"
            )
        elif image is None:
            found = ", ".join(sorted(members))
            item.error = f"null image: sample {key!r} has no {'/'.join(IMAGE_MEMBERS)} member (it has: {found})"
        return item


def tar_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The tar's members one by one. tarfile keeps every header it has read (memory that grows with
    the tar: about 450 bytes a member, 450 MB for a million); they are let go as we go."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def member_key(member: tarfile.TarInfo) -> tuple[str, str]:
    """A member's sample key (its path less everything from the first `.` of its name) and extension."""
    folder, _, name = member.name.rpartition("/")
    stem, _, ext = name.partition(".")
    return printable(f"{folder}/{stem}" if folder else stem), ext.lower()


def _text(member: bytes | TooLarge | None) -> str | None:
    """A kept member as text (JSON as its text); one too large to read is left out."""
    return member.decode("utf-8", "replace") if isinstance(member, bytes) else None
