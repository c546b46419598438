"""Never stuck, never fooled: names that are not UTF-8, reads that fail in passing, commits that fail,
slow items, and reruns that heal what failed in passing."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotation import decode as decoding
from pipeline.annotation.run import run
from pipeline.annotation.sink import ParquetSink
from pipeline.config import InputConfig, OutputConfig
from pipeline.errors import CommitFailed
from pipeline.records import SCHEMA
from pipeline.storage import files
from pipeline.storage.files import Folder
from pipeline.storage.layout import committed_parts
from tests.helpers import EXAMPLES, config, rows_by_id

LATIN1 = os.fsdecode(b"caf\xe9.jpg")  # a name written by an old Latin-1 system: not UTF-8


def summary_of(out) -> dict:
    return json.loads((out / "_summary.json").read_text())


def test_a_name_that_is_not_utf8_is_stored_escaped_and_resumes(trained_checkpoint, trained_export, tmp_path):
    """Before, pyarrow refused the id at the first commit, the whole part was lost and every rerun
    died at the same item."""
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", os.fsencode(photos) + b"/caf\xe9.jpg")
    shutil.copy(EXAMPLES / "chelsea.png", photos / "chelsea.png")
    with tarfile.open(tmp_path / "shard.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        data = (EXAMPLES / "coffee.png").read_bytes()
        info = tarfile.TarInfo("th\xe9.png")  # stored in Latin-1: read back as a name that is not UTF-8
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    out, tars = tmp_path / "labels", tmp_path / "tars"
    summary = run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out)
    rows = rows_by_id(out)
    assert summary.status == "finished" and set(rows) == {"caf\\xe9.jpg", "chelsea.png"}
    assert rows["caf\\xe9.jpg"]["error"] is None and rows["caf\\xe9.jpg"]["source"].endswith("caf\\xe9.jpg")
    assert run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out).skipped == 2

    wds = InputConfig(kind="webdataset", path=str(tmp_path / "shard.tar"))
    run(config(trained_checkpoint, trained_export, wds, tars), tars)
    assert [(r["id"], r["error"]) for r in rows_by_id(tars).values()] == [("th\\xe9", None)]


def test_a_commit_that_fails_ends_the_run_as_failed_and_the_rerun_resumes(
    trained_checkpoint, trained_export, tmp_path, monkeypatch
):
    """A full disk at the second part: the run stops with a message counting the rows not written,
    the summary says failed (before, it stayed `running`), the first part stays, a rerun finishes."""
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out, output={"rows_per_file": 2})
    write = Folder.write

    def full_disk(self, name, data, sync=False):
        if name.startswith("part-") and committed_parts(self):
            raise OSError(28, "No space left on device")
        return write(self, name, data, sync)

    monkeypatch.setattr(Folder, "write", full_disk)
    with pytest.raises(CommitFailed, match=r"part-00000-00001.parquet could not be written .* its 2 rows were not"):
        run(cfg, out)
    record = summary_of(out)
    assert record["status"] == "failed" and "No space left on device" in record["error"]
    assert [pq.read_metadata(out / p).num_rows for p in committed_parts(Folder(out))] == [2]
    monkeypatch.setattr(Folder, "write", write)
    assert run(cfg, out).skipped == 2 and len(rows_by_id(out)) == 6
    assert summary_of(out)["status"] == "finished"


def test_a_read_that_fails_in_passing_is_tried_again_then_an_io_error_that_a_rerun_heals(
    trained_checkpoint, trained_export, tmp_path, monkeypatch
):
    """An object store that times out or refuses an expired token: read again with backoff; if it
    keeps failing, the row says `io error` (not `not an image`), and the next run (a scheduled job)
    annotates it again, its new row in place of the old."""
    photos = tmp_path / "photos"
    shutil.copytree(EXAMPLES, photos, ignore=shutil.ignore_patterns("*.md"))
    read, calls = files.read_bytes, {}

    def flaky(location, limit=None):
        name = os.path.basename(str(location))
        calls[name] = calls.get(name, 0) + 1
        if name == "rocket.jpg" and calls[name] <= 2 or name == "coffee.png":  # twice, then fine; always
            raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: timeout")
        return read(location, limit)

    monkeypatch.setattr(files, "read_bytes", flaky)
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(photos), retry_seconds=0.01), out)
    summary = run(cfg, out)
    rows = rows_by_id(out)
    assert rows["rocket.jpg"]["error"] is None and calls["rocket.jpg"] == 3
    assert rows["coffee.png"]["error"].startswith("io error: reading ") and calls["coffee.png"] == 4
    assert summary.errors_by_kind == {"io error": 1}

    monkeypatch.setattr(files, "read_bytes", read)
    assert run(cfg, out).items == 1  # the io error only
    rows = rows_by_id(out)  # each id once
    assert len(rows) == 6 and all(r["error"] is None for r in rows.values())


def test_a_manifest_file_missing_at_first_and_there_later_is_annotated(trained_checkpoint, trained_export, tmp_path):
    pq.write_table(pa.table({"image": ["rocket.jpg", "late.png", "gone.png"]}), tmp_path / "m.parquet")
    shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / "rocket.jpg")
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(kind="parquet", path=str(tmp_path / "m.parquet")), out)
    run(cfg, out)
    assert rows_by_id(out)["late.png"]["error"].startswith("file not found:")
    shutil.copy(EXAMPLES / "coffee.png", tmp_path / "late.png")
    assert run(cfg, out).items == 1  # the file now there; the one still missing is not read again
    rows = rows_by_id(out)
    assert rows["late.png"]["error"] is None and rows["gone.png"]["error"].startswith("file not found:")
    parts = {p: (out / p).stat().st_mtime_ns for p in committed_parts(Folder(out))}
    assert run(cfg, out).items == 0  # and a scheduled rerun rewrites no part for it
    assert {p: (out / p).stat().st_mtime_ns for p in committed_parts(Folder(out))} == parts
    shutil.copy(EXAMPLES / "coffee.png", tmp_path / "gone.png")
    cfg.output.retry_errors = []  # told not to: a row of any kind stays done
    assert run(cfg, out).items == 0


def test_a_decode_past_the_time_limit_is_a_timeout_row(trained_checkpoint, trained_export, tmp_path, monkeypatch):
    """A read that never returns (a stalled mount) holds up nothing: its row says timeout and the
    other items go on."""
    decode = decoding.decode

    def stuck(item, preprocess, cfg):
        if item.id == "coffee.png":
            time.sleep(3600)
        return decode(item, preprocess, cfg)

    monkeypatch.setattr(decoding, "decode", stuck)
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES), decode_timeout=2), out)
    started = time.monotonic()
    summary = run(cfg, out)
    assert time.monotonic() - started < 120
    rows = rows_by_id(out)
    assert rows["coffee.png"]["error"].startswith("timeout: reading and decoding took over input.decode_timeout=2 s")
    assert summary.errors_by_kind == {"timeout": 1} and len(rows) == 6


def row(i: int) -> dict:
    return {"id": str(i), "source": "s", "width": 1, "height": 1, "error": None}


def test_flush_seconds_is_kept_by_a_timer_while_no_row_comes(tmp_path):
    """Before, a part was committed only when a row arrived: finished rows waited behind a slow item
    without limit."""
    commits = []
    sink = ParquetSink(Folder(tmp_path), SCHEMA, OutputConfig(flush_seconds=0.5), on_commit=lambda: commits.append(1))
    sink.add(row(0))
    sink.add(row(1))
    deadline = time.monotonic() + 10
    while not commits and time.monotonic() < deadline:
        time.sleep(0.05)
    assert commits and committed_parts(Folder(tmp_path)) == ["part-00000-00000.parquet"]
    assert pq.read_table(tmp_path).num_rows == 2
    sink.add(row(2))
    sink.close()
    assert pq.read_table(tmp_path).column("id").to_pylist() == ["0", "1", "2"]


def test_a_commit_by_the_timer_that_fails_stops_the_run(tmp_path, monkeypatch):
    stopped = []
    sink = ParquetSink(Folder(tmp_path), SCHEMA, OutputConfig(flush_seconds=0.2), on_failure=lambda: stopped.append(1))
    monkeypatch.setattr(Folder, "write", lambda *a, **k: (_ for _ in ()).throw(OSError(28, "No space left")))
    sink.add(row(0))
    deadline = time.monotonic() + 10
    while not stopped and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stopped
    with pytest.raises(CommitFailed, match="its 1 rows were not committed"):
        sink.close()
