"""Parquet parts: contract schema, atomic commits, bounds in rows and time."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.sink import SCHEMA, ParquetSink, committed_parts, output_schema


def row(i: int, **extra) -> dict:
    return {
        "id": str(i), "source": f"s{i}", "width": 10, "height": 20, "prompt": "p", "caption": "c",
        "entities": [{"phrase": "a cat", "start": 0, "end": 5, "boxes": [{"x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}]}],
        "token_ids": [5, 6], "error": None, **extra,
    }


def test_parts_commit_every_n_rows_and_on_close(tmp_path):
    sink = ParquetSink(tmp_path, SCHEMA, rows_per_file=4, flush_seconds=3600)
    for i in range(10):
        sink.add(row(i))
    assert [p.name for p in committed_parts(tmp_path)] == ["part-00000-00000.parquet", "part-00000-00001.parquet"]
    sink.close()
    assert [pq.read_metadata(p).num_rows for p in committed_parts(tmp_path)] == [4, 4, 2]
    table = pq.read_table(tmp_path)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.column("id").to_pylist() == [str(i) for i in range(10)]
    assert pq.read_metadata(tmp_path / "part-00000-00000.parquet").row_group(0).column(0).compression == "ZSTD"


def test_parts_commit_after_flush_seconds(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("pipeline.sink.time.monotonic", lambda: clock[0])
    sink = ParquetSink(tmp_path, SCHEMA, rows_per_file=1000, flush_seconds=60)
    sink.add(row(0))
    clock[0] += 59
    sink.add(row(1))
    assert committed_parts(tmp_path) == []
    clock[0] += 2
    sink.add(row(2))
    assert len(committed_parts(tmp_path)) == 1


def test_new_sink_continues_numbering_and_removes_uncommitted_temporaries(tmp_path):
    sink = ParquetSink(tmp_path, SCHEMA, rows_per_file=1, flush_seconds=60)
    sink.add(row(0))
    (tmp_path / ".part-00000-00001.parquet.tmp").write_bytes(b"half a file")
    sink = ParquetSink(tmp_path, SCHEMA, rows_per_file=1, flush_seconds=60)
    assert not (tmp_path / ".part-00000-00001.parquet.tmp").exists()
    sink.add(row(1))
    assert [p.name for p in committed_parts(tmp_path)] == ["part-00000-00000.parquet", "part-00000-00001.parquet"]


def test_kept_columns_follow_the_contract_and_may_not_clash():
    schema = output_schema([pa.field("label", pa.int64())])
    assert schema.names == SCHEMA.names + ["label"]
    with pytest.raises(ValueError, match="'caption' clashes"):
        output_schema([pa.field("caption", pa.string())])
