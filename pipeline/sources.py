"""Where items come from: a folder walk, a parquet manifest or WebDataset tars, streamed one item at a time.

A manifest is read in record batches, only the columns needed, and a tar member by member, so memory
does not grow with the input's length. Each may be local or in object storage (`s3://bucket/prefix`,
through pyarrow.fs: see pipeline/files.py); a folder in a bucket is listed whole before the run.
Problems with the input as a whole (missing path, missing column) raise `InputError`; problems with
one item (a null cell) travel with the item and become that row's error.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

from pyarrow.fs import FileSelector, FileType

from pipeline.config import InputConfig, UserError
from pipeline.files import filesystem, is_remote

log = logging.getLogger(__name__)


class InputError(UserError):
    """The input as a whole cannot be read; the message says which input and what to do."""


@dataclass
class Item:
    id: str
    source: str  # path, or manifest location (`file.parquet#row`)
    path: str | None = None  # image file to read...
    data: bytes | None = None  # ...or its bytes
    prompt: str | None = None  # per-item prompt, if the manifest gives one
    phrases: list[str] | None = None  # per-item phrases to ground, if the manifest gives them
    extra: dict[str, Any] = field(default_factory=dict)  # kept columns
    error: str | None = None  # set when the item itself is unusable (null path, ...)
    mine: bool = True  # False: another shard's item, maybe given by its id alone


def iter_items(cfg: InputConfig, keep: Callable[[str], bool] | None = None) -> Iterator[Item]:
    """The input's items in a stable order, at most `input.limit` of them, each saying whether it is
    this shard's (`input.shard_index` of `input.num_shards`).

    Shards split a manifest by row position (equal contiguous ranges) and WebDataset tars by file,
    so that each reads only its share of the image bytes; other shards' items that come before its
    share are given by id alone, so that a repeated id is still found. Folders (and tars too few to
    balance) are split by a stable hash of the id. `keep(id)` says which of its own items the caller
    still needs (not yet done): a manifest reads image bytes only for row groups that hold one."""
    if cfg.kind == "parquet":
        items = manifest_items(cfg, keep)
    elif cfg.kind == "folder":
        items = _by_hash(cfg, folder_items(cfg))
    else:
        tars = tar_files(cfg.path)
        mine = _tar_share(cfg, tars)
        items = webdataset_items(cfg, mine) if mine is not None else _by_hash(cfg, webdataset_items(cfg, tars))
    return islice(items, cfg.limit) if cfg.limit is not None else items


def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an id (the same on every machine and Python): shards and the resume index."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _by_hash(cfg: InputConfig, items: Iterator[Item]) -> Iterator[Item]:
    for item in items:
        item.mine = id_hash(item.id) % cfg.num_shards == cfg.shard_index
        yield item


def check(cfg: InputConfig) -> None:
    """Fail fast, before any model is loaded, if the input cannot be read at all."""
    if cfg.kind == "folder":
        found = _info(cfg.path).type
        if found == FileType.NotFound:
            raise InputError(f"input.path={cfg.path!r} does not exist")
        if found != FileType.Directory:
            hint = " (for a manifest use input=parquet)" if cfg.path.endswith(".parquet") else ""
            raise InputError(f"input.path={cfg.path!r} is not a folder{hint}")
        if next(folder_items(cfg), None) is None:
            exts = ", ".join(cfg.extensions)
            raise InputError(f"input.path={cfg.path!r} holds no images ({exts}); see input.extensions")
    elif cfg.kind == "webdataset":
        tar_files(cfg.path)
    else:
        check_manifests(cfg)


def _info(location: str):
    """What `location` is (pyarrow FileInfo: type, size), locally or in object storage."""
    fs, path = filesystem(location)
    try:
        return fs.get_file_info(path)
    except OSError as e:  # the store refused (credentials, endpoint, bucket)
        raise InputError(f"cannot read {location!r}: {e}") from None


def _listing(prefix: str, wanted: Callable[[str], bool]) -> list[str]:
    """The files under a folder in object storage whose key under it is `wanted`, sorted by path
    components (the order of the local walk), as URIs. No name component may start with `.`."""
    fs, root = filesystem(prefix)
    root = root.rstrip("/")
    try:
        found = fs.get_file_info(FileSelector(root, recursive=True))
    except OSError as e:
        raise InputError(f"cannot list {prefix!r}: {e}") from None
    keys = [info.path[len(root) + 1 :] for info in found if info.type == FileType.File]
    keys = sorted((k for k in keys if wanted(k) and not any(p.startswith(".") for p in k.split("/"))), key=lambda k: k.split("/"))
    return [f"{prefix.rstrip('/')}/{key}" for key in keys]


def _name(location: str) -> str:
    return location.rstrip("/").rsplit("/", 1)[-1]


# --------------------------------------------------------------------------- folders


def folder_items(cfg: InputConfig) -> Iterator[Item]:
    """Images under the folder, recursively, sorted by path components; id = posix path relative to it.

    Each folder is listed and sorted on its own (files and subfolders together), so the walk streams
    whatever the folder's size and its order does not depend on the file system.
    """
    exts = {e.lower().lstrip(".") for e in cfg.extensions}
    if is_remote(cfg.path):
        found = _listing(cfg.path, lambda key: "." in key and key.rsplit(".", 1)[-1].lower() in exts)
        return (Item(id=uri[len(cfg.path.rstrip("/")) + 1 :], source=uri, path=uri) for uri in found)
    root = Path(cfg.path).expanduser()

    def walk(folder: Path) -> Iterator[Item]:
        with os.scandir(folder) as it:
            entries = sorted((e for e in it if not e.name.startswith(".")), key=lambda e: e.name)
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                yield from walk(Path(entry.path))
            elif entry.name.rsplit(".", 1)[-1].lower() in exts and "." in entry.name:
                path = Path(entry.path)
                yield Item(id=path.relative_to(root).as_posix(), source=str(path), path=str(path))

    return walk(root)


# --------------------------------------------------------------------------- manifests


def manifest_files(path: str) -> list[str]:
    if is_remote(path):
        if glob.has_magic(path):
            raise InputError(f"input.path={path!r}: globs are for local paths; give the folder (prefix) or a file")
        found = _info(path).type
        if found == FileType.NotFound:
            raise InputError(f"input.path={path!r} does not exist")
        files = [path] if found == FileType.File else _listing(path, _manifest_key)
        if not files:
            raise InputError(f"input.path={path!r} matches no parquet files")
        return files
    p = Path(path).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.parquet") if _manifest_key(f.relative_to(p).as_posix()))
    elif p.is_file():
        files = [p]
    else:
        files = sorted(Path(f) for f in glob.glob(str(p), recursive=True) if f.endswith(".parquet"))
        if not files and not glob.has_magic(str(p)):
            raise InputError(f"input.path={path!r} does not exist")
    if not files:
        raise InputError(f"input.path={path!r} matches no parquet files")
    return [str(f) for f in files]


def _manifest_key(key: str) -> bool:
    """A parquet file under a manifest folder, not hidden nor under a `_` or `.` name (Spark's, ours)."""
    return key.endswith(".parquet") and not any(part.startswith((".", "_")) for part in key.split("/"))


def _relative(file: str, root: str) -> str:
    """A manifest file's name relative to the manifest's root (its own name if outside it)."""
    if is_remote(file):
        return file[len(root.rstrip("/")) + 1 :] if file.startswith(root.rstrip("/") + "/") else _name(file)
    f, r = Path(file), Path(root)
    return f.relative_to(r).as_posix() if f.is_relative_to(r) else f.name


def manifest_rows(files: list[str]) -> int:
    """Rows in all the files, from their footers."""
    total = 0
    for file in files:
        with _parquet(file) as pf:
            total += pf.metadata.num_rows
    return total


def _parquet(file: str):
    import pyarrow.parquet as pq

    fs, path = filesystem(file)
    return pq.ParquetFile(path, filesystem=fs)


def manifest_root(path: str) -> str:
    """What manifest files are named relative to: the folder given, a file's folder, or a glob's fixed part."""
    if is_remote(path):
        return path if _info(path).type == FileType.Directory else path.rstrip("/").rsplit("/", 1)[0]
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    if p.is_file():
        return str(p.parent)
    fixed = [part for part in p.parts[: next(i for i, part in enumerate(p.parts) if glob.has_magic(part))]]
    return str(Path(*fixed)) if fixed else "."


def check_manifests(cfg: InputConfig) -> None:
    """Every file has the needed columns, and kept columns have one type: checked before anything is
    written (the footers only), so a bad file cannot stop the run halfway, at the same place each rerun."""
    files = manifest_files(cfg.path)
    first = _schema(files[0])
    for file in files:
        schema = first if file == files[0] else _schema(file)
        missing = [c for c in _wanted_columns(cfg) if c not in schema.names]
        if missing:
            raise InputError(
                f"manifest {str(file)!r} has no column {', '.join(map(repr, missing))}; "
                f"its columns are: {', '.join(schema.names)}"
            )
        for c in cfg.keep_columns:
            if schema.field(c).type != first.field(c).type:
                raise InputError(
                    f"manifest {str(file)!r}: kept column {c!r} is {schema.field(c).type}, but "
                    f"{str(files[0])!r} has {first.field(c).type}; one output column takes one type"
                )


def _schema(file: str):
    try:
        with _parquet(file) as pf:
            return pf.schema_arrow
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"cannot read manifest {str(file)!r}: {e}") from None


def _wanted_columns(cfg: InputConfig) -> list[str]:
    cols = [cfg.image_column, cfg.id_column, cfg.prompt_column, cfg.phrases_column, *cfg.keep_columns]
    return list(dict.fromkeys(c for c in cols if c))


def keep_schema(cfg: InputConfig) -> list:
    """The pyarrow fields of the kept columns, as the manifest types them (WebDataset members: strings)."""
    if cfg.kind == "webdataset":
        import pyarrow as pa

        return [pa.field(c, pa.string()) for c in cfg.keep_columns]
    if cfg.kind != "parquet" or not cfg.keep_columns:
        return []
    schema = _schema(manifest_files(cfg.path)[0])
    return [schema.field(c) for c in cfg.keep_columns]


def manifest_items(cfg: InputConfig, keep: Callable[[str], bool] | None = None, batch_rows: int = 1024) -> Iterator[Item]:
    """Rows of every file in order. A row is known by its file (relative to the manifest's root) and
    its row in that file, so adding a file never renames the rows of the others.

    This shard's rows are a contiguous range of positions (`_shard_rows`): row groups before it are
    read for their ids alone, those after it not at all. With `keep`, each of its row groups' ids are
    read first (the id column, the image paths, or nothing for bytes named by their row) and the group
    is read whole only if it holds an id to keep, so a resumed run skips the bytes it finished."""
    columns = _wanted_columns(cfg)
    root = manifest_root(cfg.path)
    files = manifest_files(cfg.path)
    lo, hi = _shard_rows(cfg, files)
    position = 0  # of the row in the whole manifest
    for file in files:
        name = _relative(file, root)
        with _parquet(file) as pf:
            row = 0  # in this file
            for group in range(pf.metadata.num_row_groups):
                if position >= hi:
                    return
                rows = pf.metadata.row_group(group).num_rows
                mine = range(max(lo - position, 0), max(min(hi - position, rows), 0))
                if not mine or keep is not None:
                    ids = _group_ids(cfg, pf, group, name, row)
                    if not any(keep is None or keep(ids[i]) for i in mine):
                        for i, item_id in enumerate(ids[: max(hi - position, 0)]):
                            yield Item(id=item_id, source=f"{file}#{row + i}", mine=i in mine)
                        row, position = row + rows, position + rows
                        continue
                for batch in pf.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns):
                    data = batch.to_pydict()
                    for i in range(batch.num_rows):
                        if position >= hi:
                            return
                        item = _manifest_item(cfg, file, name, row, {c: data[c][i] for c in columns})
                        item.mine = position >= lo
                        yield item
                        row, position = row + 1, position + 1


def _shard_rows(cfg: InputConfig, files: list[str]) -> tuple[int, int]:
    """This shard's positions [lo, hi): equal contiguous ranges of the manifest's rows (after
    `input.limit`), from the files' footers. A row group that straddles two ranges is read by both."""
    k, n = cfg.shard_index, cfg.num_shards
    if n == 1:  # no footer to read twice
        return 0, cfg.limit if cfg.limit is not None else sys.maxsize
    total = manifest_rows(files)
    if cfg.limit is not None:
        total = min(total, cfg.limit)
    return k * total // n, (k + 1) * total // n


def _group_ids(cfg: InputConfig, pf, group: int, name: str, first_row: int) -> list[str]:
    """The ids of one row group, reading as little as the ids need."""
    import pyarrow as pa

    rows = pf.metadata.row_group(group).num_rows
    image_type = pf.schema_arrow.field(cfg.image_column).type
    if cfg.id_column:
        wanted = cfg.id_column
    elif pa.types.is_struct(image_type):
        wanted = f"{cfg.image_column}.path"  # a struct's path field alone, not its bytes
    elif pa.types.is_string(image_type) or pa.types.is_large_string(image_type):
        wanted = cfg.image_column
    else:
        return [_item_id(cfg, name, first_row + i, None, None) for i in range(rows)]
    values = pf.read_row_group(group, columns=[wanted]).column(0).to_pylist()
    if cfg.id_column:
        return [_item_id(cfg, name, first_row + i, None, v) for i, v in enumerate(values)]
    return [_item_id(cfg, name, first_row + i, _image_path(v), None) for i, v in enumerate(values)]


def _image_path(image) -> str | None:
    return image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None


def _item_id(cfg: InputConfig, name: str, row: int, path: str | None, id_value) -> str:
    """Without an id column the id is the image's path, else `<file>#<row>` (bytes rows)."""
    if cfg.id_column:
        return str(id_value) if id_value is not None else f"{name}#{row}"
    return path or f"{name}#{row}"


def _manifest_item(cfg: InputConfig, file: str, name: str, row: int, values: dict) -> Item:
    """One row, named by `_item_id`."""
    image = values[cfg.image_column]
    path, data = None, None
    if isinstance(image, dict):  # Hugging Face datasets' Image feature: {bytes, path}
        data, path = image.get("bytes"), image.get("path")
    elif isinstance(image, (bytes, bytearray)):
        data = bytes(image)
    elif isinstance(image, str):
        path = image
    resolved = None
    if path and data is None:  # a URI, an absolute path, or a path relative to the manifest file
        if is_remote(path):
            resolved = path
        elif Path(path).expanduser().is_absolute():
            resolved = str(Path(path).expanduser())
        elif is_remote(file):
            resolved = f"{file.rsplit('/', 1)[0]}/{path}"
        else:
            resolved = str(Path(file).parent / path)
    source = resolved or f"{file}#{row}"
    item = Item(
        id=_item_id(cfg, name, row, path, values.get(cfg.id_column) if cfg.id_column else None),
        source=source,
        path=resolved,
        data=data,
        prompt=values.get(cfg.prompt_column) if cfg.prompt_column else None,
        phrases=values.get(cfg.phrases_column) if cfg.phrases_column else None,
        extra={c: values[c] for c in cfg.keep_columns},
    )
    if image is None or (path is None and data is None):
        item.error = f"null image: column {cfg.image_column!r} is null in this row"
    elif cfg.id_column and values.get(cfg.id_column) is None:
        item.error = f"null id: column {cfg.id_column!r} is null in this row"
    return item


# --------------------------------------------------------------------------- WebDataset tars

WDS_IMAGES = ("jpg", "jpeg", "png", "webp")


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
        if glob.has_magic(pattern) and is_remote(pattern):
            raise InputError(f"input.path={path!r}: globs are for local paths; name the tars with braces ({{00000..00099}})")
        if glob.has_magic(pattern):
            files += sorted(glob.glob(pattern, recursive=True))
        elif _info(pattern).type == FileType.File:
            files.append(pattern)
        else:
            raise InputError(f"input.path={path!r}: {pattern!r} does not exist")
    if not files:
        raise InputError(f"input.path={path!r} matches no tar files")
    return files


# Shards split tars by file when each gets at least this many: then their sizes differ by ~1/4 at most.
TARS_PER_SHARD = 4


def _tar_share(cfg: InputConfig, tars: list[str]) -> list[str] | None:
    """This shard's tars: contiguous runs of files of about equal total size. None (split by id hash,
    every shard reading every tar) where there are too few tars to balance or `input.limit` counts
    items across all of them."""
    n = cfg.num_shards
    if n == 1:
        return tars
    if cfg.limit is not None or len(tars) < TARS_PER_SHARD * n:
        log.info("%d shards over %d tars: split by id hash, each shard reads every tar (%d or more tars "
                 "are split by file%s)", n, len(tars), TARS_PER_SHARD * n, ", without input.limit" if cfg.limit is not None else "")
        return None
    sizes = [_info(t).size for t in tars]
    total, start, share = max(sum(sizes), 1), 0, []
    for tar, size in zip(tars, sizes):
        if min(int((start + size / 2) * n / total), n - 1) == cfg.shard_index:
            share.append(tar)
        start += size
    return share


def webdataset_items(cfg: InputConfig, tars: list[str]) -> Iterator[Item]:
    """One item per sample: consecutive members sharing a key (the path up to the first dot of the
    file name). What a damaged tar does not let us read becomes one error row, named after the
    last sample read before it, and the next tar goes on."""
    for file in tars:
        key, members = None, {}
        try:
            fs, path = filesystem(file)
            with fs.open_input_stream(path) as raw, tarfile.open(fileobj=raw, mode="r|*") as tar:
                for info in tar:
                    if not info.isfile():
                        continue
                    folder, _, name = info.name.rpartition("/")
                    stem, _, ext = name.partition(".")
                    member_key = f"{folder}/{stem}" if folder else stem
                    if member_key != key and key is not None:
                        yield _sample(cfg, file, key, members)
                        members = {}
                    key = member_key
                    members[ext.lower()] = tar.extractfile(info).read()
            if key is not None:
                yield _sample(cfg, file, key, members)
        except (tarfile.TarError, EOFError, OSError) as e:
            if key is not None and members:  # what came before the damage, as far as it was read
                yield _sample(cfg, file, key, members)
            after = f"after sample {key!r}" if key is not None else "at its start"
            yield Item(
                id=f"{_name(file)}#unreadable",
                source=file,
                error=f"cannot read tar: {_name(file)} is damaged {after} ({type(e).__name__}: {e}); the samples after it are lost",
                extra={c: None for c in cfg.keep_columns},
            )


def _sample(cfg: InputConfig, file: str, key: str, members: dict[str, bytes]) -> Item:
    image = next((members[e] for e in WDS_IMAGES if e in members), None)
    item = Item(id=key, source=f"{file}#{key}", data=image,
                extra={c: members[c].decode("utf-8", "replace") if c in members else None for c in cfg.keep_columns})
    if image is None:
        item.error = f"null image: sample {key!r} has no {'/'.join(WDS_IMAGES)} member (it has: {', '.join(sorted(members))})"
    return item
