"""A parquet manifest: a file, a folder of files or a glob, local or in object storage.

Read in record batches of a few rows, only the columns needed, page by page (a buffered stream), so
memory follows the manifest's data pages, not its row groups nor its length. A row is known by its
file (relative to the manifest's root) and its row in that file, so adding a file never renames the
rows of the others. Column types are checked from the footers before the run. Shards take equal
contiguous ranges of rows, so each reads only its share of the image bytes; a resumed run reads a row
group's ids first and its bytes only if it holds work left.
"""

from __future__ import annotations

import glob
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow.fs import FileType

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.records import Item, printable
from pipeline.sources.base import Keep, base_name, info, listing
from pipeline.storage.files import filesystem, has_glob, is_remote, join, parent, without_query

BATCH_ROWS = 64  # rows in memory at once, beside the data page being read...
BATCH_BYTES = 32 << 20  # ...fewer where the row group's rows average more than BATCH_BYTES / BATCH_ROWS
READ_BUFFER = 1 << 20  # read column chunks through a buffer of this size, page by page


def manifest_files(path: str) -> list[str]:
    if is_remote(path):
        if has_glob(path):
            raise InputError(f"input.path={path!r}: globs are for local paths; give the folder (prefix) or a file")
        found = info(path).type
        if found == FileType.NotFound:
            raise InputError(f"input.path={path!r} does not exist")
        files = [path] if found == FileType.File else [uri for _, uri in listing(path, _manifest_key)]
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


def manifest_root(path: str) -> str:
    """What manifest files are named relative to: the folder given, a file's folder, or a glob's fixed part."""
    if is_remote(path):
        return path if info(path).type == FileType.Directory else parent(path)
    p = Path(path).expanduser()
    if p.is_dir():
        return str(p)
    if p.is_file():
        return str(p.parent)
    fixed = list(p.parts[: next(i for i, part in enumerate(p.parts) if glob.has_magic(part))])
    return str(Path(*fixed)) if fixed else "."


def _relative(file: str, root: str) -> str:
    """A manifest file's name relative to the manifest's root (its own name if outside it)."""
    if is_remote(file):
        file, root = without_query(file), without_query(root).rstrip("/")
        return file[len(root) + 1 :] if file.startswith(root + "/") else base_name(file)
    f, r = Path(file), Path(root)
    return f.relative_to(r).as_posix() if f.is_relative_to(r) else f.name


def open_parquet(file: str) -> pq.ParquetFile:
    """A manifest file opened to be read page by page (READ_BUFFER), never a whole column chunk at once."""
    fs, path = filesystem(file)
    return pq.ParquetFile(path, filesystem=fs, buffer_size=READ_BUFFER, pre_buffer=False)


def _schema(file: str) -> pa.Schema:
    try:
        with open_parquet(file) as pf:
            return pf.schema_arrow
    except Exception as e:  # pyarrow raises several types for a file that is not parquet
        raise InputError(f"cannot read manifest {str(file)!r}: {e}") from None


def manifest_rows(files: list[str]) -> int:
    """Rows in all the files, from their footers."""
    total = 0
    for file in files:
        with open_parquet(file) as pf:
            total += pf.metadata.num_rows
    return total


class ManifestSource:
    def __init__(self, cfg: InputConfig):
        self.cfg = cfg
        cols = [cfg.image_column, cfg.id_column, cfg.prompt_column, cfg.phrases_column, *cfg.keep_columns]
        self.columns = list(dict.fromkeys(c for c in cols if c))

    def check(self) -> None:
        """Every file has the needed columns, and kept columns have one type: checked before anything
        is written (the footers only), so a bad file cannot stop the run halfway, at the same place
        each rerun."""
        files = manifest_files(self.cfg.path)
        first = _schema(files[0])
        for file in files:
            schema = first if file == files[0] else _schema(file)
            missing = [c for c in self.columns if c not in schema.names]
            if missing:
                raise InputError(
                    f"manifest {str(file)!r} has no column {', '.join(map(repr, missing))}; "
                    f"its columns are: {', '.join(schema.names)}"
                )
            self._check_types(file, schema)
            for c in self.cfg.keep_columns:
                if schema.field(c).type != first.field(c).type:
                    raise InputError(
                        f"manifest {str(file)!r}: kept column {c!r} is {schema.field(c).type}, but "
                        f"{str(files[0])!r} has {first.field(c).type}; one output column takes one type"
                    )

    def _check_types(self, file: str, schema: pa.Schema) -> None:
        """Each named column holds what it is read as, or the whole run would go wrong row by row (a
        string of phrases would be grounded character by character)."""
        cfg = self.cfg
        wanted = {
            cfg.image_column: ("paths, image bytes or {bytes, path} structs", (_is_text, _is_bytes, _is_image_struct)),
            cfg.id_column: ("strings or integers", (_is_text, _plain(pa.types.is_integer))),
            cfg.prompt_column: ("strings", (_is_text,)),
            cfg.phrases_column: ("lists of strings", (_is_string_list,)),
        }
        for column, (what, accepted) in wanted.items():
            if column and not any(accepts(schema.field(column).type) for accepts in accepted):
                raise InputError(
                    f"manifest {str(file)!r}: column {column!r} is {schema.field(column).type}; it must hold {what}"
                )

    def count(self) -> int:
        return manifest_rows(manifest_files(self.cfg.path))

    def keep_fields(self) -> list[pa.Field]:
        if not self.cfg.keep_columns:
            return []
        schema = _schema(manifest_files(self.cfg.path)[0])
        return [schema.field(c) for c in self.cfg.keep_columns]

    def items(self, keep: Keep | None = None) -> Iterator[Item]:
        """Rows of every file in order. This shard's rows are a contiguous range of positions
        (`_shard_rows`): row groups before it are read for their ids alone, those after it not at all.
        With `keep`, each of its row groups' ids are read first (the id column, the image paths, or
        nothing for bytes named by their row) and the group is read whole only if it holds an id to
        keep, so a resumed run skips the bytes it finished."""
        root = manifest_root(self.cfg.path)
        files = manifest_files(self.cfg.path)
        lo, hi = self._shard_rows(files)
        position = 0  # of the row in the whole manifest
        for file in files:
            name = printable(_relative(file, root))
            with open_parquet(file) as pf:
                row = 0  # in this file
                for group in range(pf.metadata.num_row_groups):
                    if position >= hi:
                        return
                    rows = pf.metadata.row_group(group).num_rows
                    mine = range(max(lo - position, 0), max(min(hi - position, rows), 0))
                    if not mine or keep is not None:
                        ids = self._group_ids(pf, group, name, row)
                        if not any(keep is None or keep(ids[i]) for i in mine):
                            for i, item_id in enumerate(ids[: max(hi - position, 0)]):
                                yield Item(id=item_id, source=f"{file}#{row + i}", mine=i in mine)
                            row, position = row + rows, position + rows
                            continue
                    size = batch_rows(pf.metadata.row_group(group), self.columns)
                    for batch in pf.iter_batches(batch_size=size, row_groups=[group], columns=self.columns):
                        data = batch.to_pydict()
                        for i in range(batch.num_rows):
                            if position >= hi:
                                return
                            item = self._item(file, name, row, {c: data[c][i] for c in self.columns})
                            item.mine = position >= lo
                            yield item
                            row, position = row + 1, position + 1

    def _shard_rows(self, files: list[str]) -> tuple[int, int]:
        """This shard's positions [lo, hi): equal contiguous ranges of the manifest's rows (after
        `input.limit`), from the files' footers. A row group that straddles two ranges is read by both."""
        k, n, limit = self.cfg.shard_index, self.cfg.num_shards, self.cfg.limit
        if n == 1:  # no footer to read twice
            return 0, limit if limit is not None else sys.maxsize
        total = manifest_rows(files)
        if limit is not None:
            total = min(total, limit)
        return k * total // n, (k + 1) * total // n

    def _group_ids(self, pf: pq.ParquetFile, group: int, name: str, first_row: int) -> list[str]:
        """The ids of one row group, reading as little as the ids need."""
        cfg = self.cfg
        rows = pf.metadata.row_group(group).num_rows
        image_type = pf.schema_arrow.field(cfg.image_column).type
        if cfg.id_column:
            wanted = cfg.id_column
        elif pa.types.is_struct(image_type):
            wanted = f"{cfg.image_column}.path"  # a struct's path field alone, not its bytes
        elif _is_text(image_type):
            wanted = cfg.image_column
        else:
            return [self._id(name, first_row + i, None, None) for i in range(rows)]
        values = pf.read_row_group(group, columns=[wanted]).column(0).to_pylist()
        if cfg.id_column:
            return [self._id(name, first_row + i, None, v) for i, v in enumerate(values)]
        return [self._id(name, first_row + i, _image_path(v), None) for i, v in enumerate(values)]

    def _id(self, name: str, row: int, path: str | None, id_value) -> str:
        """Without an id column the id is the image's path, else `<file>#<row>` (bytes rows)."""
        if self.cfg.id_column:
            return str(id_value) if id_value is not None else f"{name}#{row}"
        return path or f"{name}#{row}"

    def _item(self, file: str, name: str, row: int, values: dict) -> Item:
        """One row, named by `_id`."""
        cfg = self.cfg
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
                resolved = join(parent(file), path)
            else:
                resolved = str(Path(file).parent / path)
        item = Item(
            id=self._id(name, row, path, values.get(cfg.id_column) if cfg.id_column else None),
            source=resolved or f"{file}#{row}",
            path=resolved,
            data=data,
            prompt=values.get(cfg.prompt_column) if cfg.prompt_column else None,
            phrases=values.get(cfg.phrases_column) if cfg.phrases_column else None,
            extra={c: values[c] for c in cfg.keep_columns},
        )
        if image is None or (path is None and data is None):
            item.error = f"null image: column {cfg.image_column!r} is null in this row"
        elif data is not None and len(data) > cfg.max_image_bytes:
            item.data = None
            item.error = f"too large: {len(data)} bytes, over input.max_image_bytes={cfg.max_image_bytes}"
        elif cfg.id_column and values.get(cfg.id_column) is None:
            item.error = f"null id: column {cfg.id_column!r} is null in this row"
        return item


def batch_rows(group: pq.RowGroupMetaData, columns: list[str]) -> int:
    """Rows a batch of this row group may hold to stay near BATCH_BYTES, from the footer's sizes: a
    batch of 64 rows of 4 MB images would hold 256 MB twice over (Arrow's buffers and their copy)."""
    size = sum(
        c.total_uncompressed_size
        for c in map(group.column, range(group.num_columns))
        if c.path_in_schema.split(".")[0] in columns
    )
    return max(1, min(BATCH_ROWS, BATCH_BYTES * group.num_rows // max(size, 1)))


def _plain(test: Callable[[pa.DataType], bool]) -> Callable[[pa.DataType], bool]:
    """`test` on the type a column is read as: a dictionary-encoded column (a pandas category) as its values."""
    return lambda type_: test(type_.value_type if pa.types.is_dictionary(type_) else type_)


_is_text = _plain(lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t))
_is_bytes = _plain(lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t))


def _is_image_struct(type_: pa.DataType) -> bool:
    return pa.types.is_struct(type_) and any(type_.field(i).name in ("bytes", "path") for i in range(type_.num_fields))


def _is_string_list(type_: pa.DataType) -> bool:
    lists = pa.types.is_list(type_) or pa.types.is_large_list(type_) or pa.types.is_list_view(type_)
    return lists and _is_text(type_.value_type)


def _image_path(image) -> str | None:
    return image.get("path") if isinstance(image, dict) else image if isinstance(image, str) else None
