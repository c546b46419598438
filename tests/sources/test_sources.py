"""Sources: folder walks and parquet manifests, streamed, with input errors that say what to do."""

from __future__ import annotations

import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import InputConfig
from pipeline.errors import InputError
from pipeline.sources import iter_items, open_source
from tests.helpers import REPO


def check(cfg: InputConfig) -> None:
    open_source(cfg).check()


def test_folder_walk_is_sorted_recursive_and_filtered(tmp_path):
    for name in ["b.jpg", "a/z.PNG", "a/b/c.webp", "A.gif", "notes.txt", ".hidden.jpg", ".cache/x.jpg", "noext"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    items = list(iter_items(InputConfig(path=str(tmp_path))))
    assert [i.id for i in items] == ["A.gif", "a/b/c.webp", "a/z.PNG", "b.jpg"]
    assert items[0].path == str(tmp_path / "A.gif") and items[0].source == items[0].path
    assert [i.id for i in iter_items(InputConfig(path=str(tmp_path), extensions=["gif"]))] == ["A.gif"]
    assert len(list(iter_items(InputConfig(path=str(tmp_path), limit=2)))) == 2


def test_folder_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check(InputConfig(path=str(tmp_path / "nope")))
    with pytest.raises(InputError, match="holds no images"):
        check(InputConfig(path=str(tmp_path)))
    pq.write_table(pa.table({"a": [1]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="use input=parquet"):
        check(InputConfig(path=str(tmp_path / "m.parquet")))


def test_manifest_folder_and_glob(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"image": ["a.jpg", "b.jpg"]}), tmp_path / "m" / "1.parquet")
    pq.write_table(pa.table({"image": ["c.jpg"]}), tmp_path / "m" / "2.parquet")
    pq.write_table(pa.table({"image": ["junk.jpg"]}), tmp_path / "m" / "_skip.parquet")
    for path in [tmp_path / "m", tmp_path / "m" / "[12].parquet"]:
        items = list(iter_items(InputConfig(kind="parquet", path=str(path))))
        assert [i.id for i in items] == ["a.jpg", "b.jpg", "c.jpg"]
        assert items[2].path == str(tmp_path / "m" / "c.jpg")


def test_manifest_ids_prompts_and_nulls(tmp_path):
    pq.write_table(
        pa.table({"image": ["/abs/a.jpg", None, "b.jpg"], "key": ["k0", "k1", None], "q": ["<grounding>Q", None, ""]}),
        tmp_path / "m.parquet",
    )
    items = list(
        iter_items(InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), id_column="key", prompt_column="q"))
    )
    assert [i.id for i in items] == ["k0", "k1", "m.parquet#2"]
    assert items[0].path == "/abs/a.jpg" and items[0].prompt == "<grounding>Q"
    assert (
        items[1].error == "null image: column 'image' is null in this row"
        and items[1].source == f"{tmp_path / 'm.parquet'}#1"
    )
    assert items[2].error == "null id: column 'key' is null in this row"


def test_manifest_errors(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "none.parquet")))
    with pytest.raises(InputError, match="matches no parquet files"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "*.parquet")))
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(InputError, match="cannot read manifest"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "bad.parquet")))
    pq.write_table(pa.table({"path": ["a.jpg"]}), tmp_path / "m.parquet")
    with pytest.raises(InputError, match="has no column 'image'; its columns are: path"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "m.parquet")))


def test_manifest_rows_are_named_by_their_own_file(tmp_path):
    """`source` and the default id of a bytes row are its file and its row in that file, so adding a
    file (even one that sorts first) renames nothing: an incremental run then skips what it did."""
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"image": [b"x", b"y"]}), tmp_path / "m" / "b.parquet")
    pq.write_table(pa.table({"image": [b"z"]}), tmp_path / "m" / "c.parquet")
    cfg = InputConfig(kind="parquet", path=str(tmp_path / "m"))
    before = {i.id: i.source for i in iter_items(cfg)}
    assert before == {
        "b.parquet#0": f"{tmp_path / 'm' / 'b.parquet'}#0",
        "b.parquet#1": f"{tmp_path / 'm' / 'b.parquet'}#1",
        "c.parquet#0": f"{tmp_path / 'm' / 'c.parquet'}#0",
    }
    pq.write_table(pa.table({"image": [b"w", b"v", b"u"]}), tmp_path / "m" / "a.parquet")
    after = {i.id: i.source for i in iter_items(cfg)}
    assert {k: v for k, v in after.items() if not k.startswith("a.parquet")} == before
    assert [i.id for i in iter_items(InputConfig(kind="parquet", path=str(tmp_path / "m" / "*.parquet")))] == list(
        after
    )


def test_every_manifest_file_is_checked_before_the_run(tmp_path):
    (tmp_path / "m").mkdir()
    pq.write_table(pa.table({"image": ["a.jpg"], "n": pa.array([1], pa.int64())}), tmp_path / "m" / "1.parquet")
    pq.write_table(pa.table({"photo": ["b.jpg"], "n": pa.array([2], pa.int64())}), tmp_path / "m" / "2.parquet")
    with pytest.raises(InputError, match=r"2\.parquet' has no column 'image'; its columns are: photo, n"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "m")))
    pq.write_table(pa.table({"image": ["b.jpg"], "n": ["two"]}), tmp_path / "m" / "2.parquet")
    with pytest.raises(InputError, match=r"2\.parquet': kept column 'n' is string, but .*1\.parquet' has int64"):
        check(InputConfig(kind="parquet", path=str(tmp_path / "m"), keep_columns=["n"]))
    check(InputConfig(kind="parquet", path=str(tmp_path / "m")))  # the type of a column not kept does not matter


def _read_bytes() -> int:
    """Bytes this process has read through read(2) so far (page cache or not)."""
    return int(
        next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1]
    )


@pytest.mark.parametrize("layout", ["bytes", "struct", "id_column"])
def test_a_resumed_manifest_reads_image_bytes_only_where_work_is_left(tmp_path, layout):
    """99 % done: the ids come from the footer, the path field or the id column; only the last row
    group's image bytes are read. The items and their ids are those of a plain read."""
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = 1000
    blobs = [os.urandom(10_000) for _ in range(rows)]  # incompressible: the file is mostly image bytes
    image = {
        "bytes": pa.array(blobs),
        "struct": pa.array([{"bytes": b, "path": f"img/{i}.jpg"} for i, b in enumerate(blobs)]),
        "id_column": pa.array(blobs),
    }[layout]
    table = pa.table({"image": image, "key": [f"k{i}" for i in range(rows)]})
    pq.write_table(table, tmp_path / "m.parquet", row_group_size=10, compression="none")
    cfg = InputConfig(
        kind="parquet", path=str(tmp_path / "m.parquet"), id_column="key" if layout == "id_column" else None
    )
    every = list(iter_items(cfg))
    left = {item.id for item in every[-10:]}  # the last 1 %

    before = _read_bytes()
    items = list(iter_items(cfg, keep=left.__contains__))
    read = _read_bytes() - before
    size = (tmp_path / "m.parquet").stat().st_size
    assert read < 0.02 * size, f"read {read} of {size} bytes"
    assert [i.id for i in items] == [i.id for i in every]
    assert [i.data for i in items if i.id in left] == blobs[-10:]


def _bytes_manifest(path: Path, rows: int, row_group: int, **extra) -> list[bytes]:
    import os

    import pyarrow as pa
    import pyarrow.parquet as pq

    blobs = [os.urandom(10_000) for _ in range(rows)]
    pq.write_table(pa.table({"image": blobs, **extra}), path, row_group_size=row_group, compression="none")
    return blobs


def test_manifest_shards_are_contiguous_equal_ranges_reading_their_share(tmp_path):
    """8 shards: each takes an equal contiguous range of rows, disjoint and covering, and together they
    read the manifest's bytes about once (a row group straddling two ranges is read by both)."""
    path = tmp_path / "m.parquet"
    blobs = _bytes_manifest(path, 2000, 30)
    every = [item.id for item in iter_items(InputConfig(kind="parquet", path=str(path)))]
    read, mine = 0, []
    for k in range(8):
        cfg = InputConfig(kind="parquet", path=str(path), num_shards=8, shard_index=k)
        before = _read_bytes()
        items = list(iter_items(cfg))
        read += _read_bytes() - before
        own = [i for i in items if i.mine]
        assert len(own) == 250 and all(i.data == blobs[every.index(i.id)] for i in own)
        assert [i.id for i in items] == every[: 250 * (k + 1)]  # others' earlier rows by id, none after
        mine += [i.id for i in own]
    assert mine == every
    size = path.stat().st_size
    assert read < 1.2 * size, f"8 shards read {read} bytes of a {size}-byte manifest"


def test_manifest_shards_honour_the_limit(tmp_path):
    path = tmp_path / "m.parquet"
    _bytes_manifest(path, 100, 7)
    cfgs = [InputConfig(kind="parquet", path=str(path), num_shards=3, shard_index=k, limit=10) for k in range(3)]
    shares = [[i.id for i in iter_items(cfg) if i.mine] for cfg in cfgs]
    assert [len(s) for s in shares] == [3, 3, 4]
    assert sum(shares, []) == [i.id for i in iter_items(InputConfig(kind="parquet", path=str(path), limit=10))]


def test_tars_are_split_by_file_when_there_are_enough(tmp_path):
    """16 tars of unequal sizes over 2 shards: by file, each shard about half the bytes; 3 tars over
    2 shards: by id hash. Either way the shards are disjoint and cover every sample."""
    import io
    import tarfile

    def make(count: int) -> Path:
        folder = tmp_path / f"t{count}"
        folder.mkdir()
        for t in range(count):
            with tarfile.open(folder / f"{t:03d}.tar", "w") as tar:
                for s in range(1 + t % 3):
                    data = bytes(5000 * (1 + t % 2))
                    info = tarfile.TarInfo(f"{t:03d}-{s}.jpg")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        return folder

    for count, by_file in ((16, True), (3, False)):
        folder = make(count)
        every = [i.id for i in iter_items(InputConfig(kind="webdataset", path=str(folder / "*.tar")))]
        shares = []
        for k in range(2):
            items = list(
                iter_items(InputConfig(kind="webdataset", path=str(folder / "*.tar"), num_shards=2, shard_index=k))
            )
            shares.append([i.id for i in items if i.mine])
            assert (len(items) < len(every)) == by_file  # by file: the other shard's tars are not read
        assert sorted(shares[0] + shares[1]) == sorted(every) and not set(shares[0]) & set(shares[1])
        if by_file:
            assert shares[0] == every[: len(shares[0])]  # contiguous
            assert abs(len(shares[0]) - len(shares[1])) <= 3


@pytest.mark.parametrize(
    "column, values, message",
    [
        ("classes", ["dog, cat", "person"], "column 'classes' is string; it must hold lists of strings"),
        ("q", [1, 2], "column 'q' is int64; it must hold strings"),
        ("image", [1.5, 2.5], "column 'image' is double; it must hold paths, image bytes or {bytes, path} structs"),
        ("key", [[1], [2]], "column 'key' is list<element: int64>; it must hold strings or integers"),
    ],
)
def test_columns_of_the_wrong_type_are_refused_by_name(tmp_path, column, values, message):
    """A `phrases` column of strings grounded each character (['d', 'o', 'g']); an integer prompt passed."""
    table = {"image": ["a.jpg", "b.jpg"], "classes": [["dog"], ["cat"]], "q": ["x", "y"], "key": ["a", "b"]}
    table[column] = values
    pq.write_table(pa.table(table), tmp_path / "m.parquet")
    cfg = InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), phrases_column="classes", prompt_column="q",
                      id_column="key")  # fmt: skip
    with pytest.raises(InputError, match=re.escape(message)):
        check(cfg)


def test_columns_as_pandas_and_polars_write_them_are_read(tmp_path):
    """Categories (dictionary-encoded) and string views were refused as not strings."""
    table = pa.table(
        {
            "image": pa.array(["a.jpg", "b.jpg"]).dictionary_encode(),
            "classes": pa.array([["dog"], ["cat"]], pa.list_(pa.string_view())),
            "q": pa.array(["x", "y"], pa.string_view()),
            "key": pa.array(["k1", "k2"]).dictionary_encode(),
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    cfg = InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), phrases_column="classes", prompt_column="q",
                      id_column="key")  # fmt: skip
    check(cfg)
    items = list(iter_items(cfg))
    assert [(i.id, i.path, i.prompt, i.phrases) for i in items] == [
        ("k1", str(tmp_path / "a.jpg"), "x", ["dog"]),
        ("k2", str(tmp_path / "b.jpg"), "y", ["cat"]),
    ]


def test_the_folder_walk_takes_regular_files_only(tmp_path):
    """A FIFO named like an image blocked its decode for ever, at every rerun."""
    import os
    import socket

    (tmp_path / "a.jpg").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo.jpg")
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(tmp_path / "socket.jpg"))
    (tmp_path / "link.jpg").symlink_to(tmp_path / "a.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "none.jpg")
    assert [i.id for i in iter_items(InputConfig(path=str(tmp_path)))] == ["a.jpg", "link.jpg"]


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM in /proc/self/status")
def test_a_manifest_is_read_in_pieces_whatever_its_row_groups(tmp_path):
    """256 MB of image bytes in one row group, as pyarrow writes by default: reading its first rows
    took the whole row group (twice) before its first item; now the data pages being read."""
    import os
    import subprocess
    import sys

    blobs = [os.urandom(20_000) for _ in range(12_800)]
    pq.write_table(pa.table({"image": blobs}), tmp_path / "m.parquet")
    assert pq.ParquetFile(tmp_path / "m.parquet").metadata.num_row_groups == 1
    code = (
        "import sys; from pipeline.config import InputConfig; from pipeline.sources import iter_items\n"
        "hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024\n"
        "base = hwm()\n"
        "items = iter_items(InputConfig(kind='parquet', path=sys.argv[1]))\n"
        "first = [next(items).data for _ in range(200)]\n"
        "print(hwm() - base)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [sys.executable, "-c", code, str(tmp_path / "m.parquet")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.strip()) < 120, proc.stdout  # a data page of 1,024 rows is 20 MB


def test_a_batch_of_large_images_is_cut_to_a_few_rows(tmp_path):
    """The rows a batch holds follow the row group's bytes a row: 64 of 4 MB images would be 256 MB
    held twice; rows of small images keep the full batch. The struct column counts all its parts."""
    from pipeline.sources.manifest import BATCH_BYTES, BATCH_ROWS, batch_rows

    big = pa.array([{"bytes": b"x" * (4 << 20), "path": "a.jpg"}] * 8)
    pq.write_table(pa.table({"image": big, "note": ["n"] * 8}), tmp_path / "big.parquet", use_dictionary=False)
    pq.write_table(pa.table({"image": [b"x" * 1000] * 8}), tmp_path / "small.parquet")
    group = pq.ParquetFile(tmp_path / "big.parquet").metadata.row_group(0)
    assert batch_rows(group, ["image"]) in (BATCH_BYTES // (4 << 20) - 1, BATCH_BYTES // (4 << 20))  # + the paths
    assert batch_rows(group, ["note"]) == BATCH_ROWS
    assert batch_rows(pq.ParquetFile(tmp_path / "small.parquet").metadata.row_group(0), ["image"]) == BATCH_ROWS
    rows = list(iter_items(InputConfig(kind="parquet", path=str(tmp_path / "big.parquet"))))
    assert [len(r.data) for r in rows] == [4 << 20] * 8
