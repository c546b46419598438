"""Parquet parts: contract schema, atomic commits, bounds in rows and time."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import hardware
from pipeline.annotation.resume import prepare_folder
from pipeline.annotation.run import result_settings
from pipeline.annotation.sink import ParquetSink
from pipeline.config import AppConfig, EngineConfig, ModelConfig, OutputConfig
from pipeline.errors import OutputError
from pipeline.model.runtime import precision
from pipeline.records import SCHEMA, output_schema
from pipeline.storage.files import Folder
from pipeline.storage.layout import SETTINGS, committed_parts


def make_sink(folder, rows_per_file: int, flush_seconds: float) -> ParquetSink:
    return ParquetSink(Folder(folder), SCHEMA, OutputConfig(rows_per_file=rows_per_file, flush_seconds=flush_seconds))


def row(i: int, **extra) -> dict:
    return {
        "id": str(i),
        "source": f"s{i}",
        "width": 10,
        "height": 20,
        "prompt": "p",
        "caption": "c",
        "entities": [
            {"phrase": "a cat", "start": 0, "end": 5, "boxes": [{"x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}]}
        ],
        "token_ids": [5, 6],
        "error": None,
        **extra,
    }


def test_parts_commit_every_n_rows_and_on_close(tmp_path):
    sink = make_sink(tmp_path, 4, 3600)
    for i in range(10):
        sink.add(row(i))
    assert committed_parts(Folder(tmp_path)) == ["part-00000-00000.parquet", "part-00000-00001.parquet"]
    sink.close()
    assert [pq.read_metadata(tmp_path / p).num_rows for p in committed_parts(Folder(tmp_path))] == [4, 4, 2]
    table = pq.read_table(tmp_path)
    assert table.schema.remove_metadata() == SCHEMA
    assert table.column("id").to_pylist() == [str(i) for i in range(10)]
    assert pq.read_metadata(tmp_path / "part-00000-00000.parquet").row_group(0).column(0).compression == "ZSTD"


def test_parts_commit_after_flush_seconds(tmp_path, monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("pipeline.annotation.sink.time.monotonic", lambda: clock[0])
    sink = make_sink(tmp_path, 1000, 60)
    sink.add(row(0))
    clock[0] += 59
    sink.add(row(1))
    assert committed_parts(Folder(tmp_path)) == []
    clock[0] += 2
    sink.add(row(2))
    assert len(committed_parts(Folder(tmp_path))) == 1


def test_new_sink_continues_numbering_and_removes_uncommitted_temporaries(tmp_path):
    sink = make_sink(tmp_path, 1, 60)
    sink.add(row(0))
    (tmp_path / ".part-00000-00001.parquet.tmp-999").write_bytes(b"half a file")
    sink = make_sink(tmp_path, 1, 60)
    assert not (tmp_path / ".part-00000-00001.parquet.tmp-999").exists()
    sink.add(row(1))
    assert committed_parts(Folder(tmp_path)) == ["part-00000-00000.parquet", "part-00000-00001.parquet"]


def test_kept_columns_follow_the_contract_and_may_not_clash():
    schema = output_schema([pa.field("label", pa.int64())])
    assert schema.names == SCHEMA.names + ["label"]
    with pytest.raises(ValueError, match="'caption' clashes"):
        output_schema([pa.field("caption", pa.string())])


def _part(folder, shard, n):
    pq.write_table(pa.Table.from_pylist([], schema=SCHEMA), folder / f"part-{shard:05d}-{n:05d}.parquet")


def test_overwrite_leaves_one_result_set(tmp_path):
    """overwrite with new settings removes every shard's parts (none of the old setting may stay);
    with the settings recorded it removes its own shard's and those of shards beyond num_shards, and
    keeps the parts that its sibling shards of the same multirun just wrote."""
    old, new = {"prompt": "a"}, {"prompt": "b"}
    for shard in range(3):
        _part(tmp_path, shard, 0)
    prepare_folder(Folder(tmp_path), "resume", 0, 3, old)
    prepare_folder(Folder(tmp_path), "overwrite", 1, 2, new)
    assert committed_parts(Folder(tmp_path)) == []
    assert json.loads((tmp_path / SETTINGS).read_text()) == new

    for shard in range(3):
        _part(tmp_path, shard, 0)
    prepare_folder(Folder(tmp_path), "overwrite", 0, 2, new)  # shard 1 of this multirun keeps its part; shard 2 is gone
    assert committed_parts(Folder(tmp_path)) == ["part-00001-00000.parquet"]


def test_settings_guard_names_each_changed_setting(tmp_path, monkeypatch):
    export = tmp_path / "export"  # what the guard reads of an export: its weight format and widths
    export.mkdir()
    (export / "manifest.json").write_text(json.dumps({"key": {"weight_format": "int8"}}))
    widths = {"embed_dim": 256, "ffn_dim": 512}, {"hidden_size": 256, "intermediate_size": 512}
    (export / "config.json").write_text(json.dumps({"text_config": widths[0], "vision_config": widths[1]}))
    tmp_path = tmp_path / "out"
    tmp_path.mkdir()

    monkeypatch.setattr(hardware, "capabilities", lambda device: ("FP32", "BF16"))  # bf16 is refused on CPUs without it

    def settings(**engine):
        return result_settings(AppConfig(engine=EngineConfig(**engine)), export)

    _part(tmp_path, 0, 0)
    prepare_folder(Folder(tmp_path), "resume", 0, 1, settings(precision="f32", dynamic_quantization_group_size=0))
    for engine, change in [
        (dict(dynamic_quantization_group_size=32), "engine.dynamic_quantization_group_size: 0 -> 32"),
        (dict(device="GPU"), "engine.device: 'CPU' -> 'GPU'"),
        (dict(precision="bf16"), "engine.precision: 'f32' -> 'bf16'"),
    ]:
        with pytest.raises(OutputError, match=change):
            prepare_folder(
                Folder(tmp_path),
                "resume",
                0,
                1,
                settings(**{"precision": "f32", "dynamic_quantization_group_size": 0, **engine}),
            )
    unquantized = AppConfig(
        model=ModelConfig(quantize_image_encoder=False),
        engine=EngineConfig(precision="f32", dynamic_quantization_group_size=0),
    )
    with pytest.raises(OutputError, match="model.quantize_image_encoder: True -> False"):
        prepare_folder(Folder(tmp_path), "resume", 0, 1, result_settings(unquantized, export))
    # It changes nothing in fp32/fp16 exports, so their results do not record it (older results still resume).
    assert "model.quantize_image_encoder" not in result_settings(
        AppConfig(model=ModelConfig(weight_format="fp32")), export
    )
    # Unset, the precision is recorded as what it means on this machine, so unset and that precision are one setting.
    (tmp_path / SETTINGS).unlink()
    prepare_folder(Folder(tmp_path), "resume", 0, 1, settings())
    prepare_folder(Folder(tmp_path), "resume", 0, 1, settings(precision=precision(EngineConfig(), export)))
