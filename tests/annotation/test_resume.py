"""Never lose work: kill -9 and rerun, incremental reruns, settings guard, output modes, the lock."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.annotation.resume import exclusive
from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import OutputError, RunAborted
from pipeline.storage.files import Folder
from tests.helpers import EXAMPLES, REPO, config, count_parts, rows_by_id, start


def test_kill_9_at_random_points_then_rerun_loses_and_duplicates_nothing(
    trained_checkpoint, trained_export, many_images, tmp_path
):
    reference = tmp_path / "reference"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(many_images)), reference), reference)
    want = {i: r["token_ids"] for i, r in rows_by_id(reference).items()}
    assert len(want) == 24

    out = tmp_path / "killed"
    rng = random.Random(7)
    kills = []
    for target_parts in [0, rng.randint(1, 4), rng.randint(5, 9)]:  # while loading, early, late
        child = start(many_images, out, trained_checkpoint, trained_export)
        if target_parts == 0:
            time.sleep(2.0)  # still importing and compiling
        deadline = time.monotonic() + 120
        while target_parts and child.poll() is None and count_parts(out) < target_parts and time.monotonic() < deadline:
            time.sleep(0.005)
        if child.poll() is None:
            child.send_signal(signal.SIGKILL)
            child.wait()
            kills.append(count_parts(out))
    assert len(kills) >= 2, "the runs finished before they could be killed"

    child = start(many_images, out, trained_checkpoint, trained_export)
    assert child.wait(timeout=300) == 0, child.stderr.read()[-2000:]
    got = rows_by_id(out)
    assert set(got) == set(want)
    assert {i: r["token_ids"] for i, r in got.items()} == want
    assert not list(out.glob(".part-*"))  # no uncommitted temporaries left behind
    print(f"killed with {kills} parts committed; final rows {len(got)}, lost 0, duplicated 0")


def test_incremental_rerun_annotates_only_new_images(trained_checkpoint, trained_export, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["chelsea.png", "coffee.png", "rocket.jpg"]:
        shutil.copy(EXAMPLES / name, photos / name)
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out)
    assert run(cfg, out).items == 3

    for name in ["astronaut.png", "camera.png"]:
        shutil.copy(EXAMPLES / name, photos / name)
    second = run(cfg, out)
    assert (second.items, second.skipped) == (2, 3)
    assert set(rows_by_id(out)) == {"chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png", "camera.png"}
    third = run(cfg, out)
    assert (third.items, third.skipped) == (0, 5)


def test_changed_settings_are_refused_by_name(trained_checkpoint, trained_export, tmp_path):
    out = tmp_path / "labels"
    folder = InputConfig(path=str(EXAMPLES), limit=2)
    run(config(trained_checkpoint, trained_export, folder, out), out)
    changed = config(trained_checkpoint, trained_export, folder, out, prompt="<grounding>A photo of")
    changed.engine.max_new_tokens = 20
    with pytest.raises(OutputError) as e:
        run(changed, out)
    assert "engine.max_new_tokens: 128 -> 20" in str(e.value) and "prompt: " in str(e.value)
    assert "output.mode=overwrite" in str(e.value)

    changed.output.mode = "overwrite"
    assert run(changed, out).items == 2
    assert {r["prompt"] for r in rows_by_id(out).values()} == {"<grounding>A photo of"}

    changed.output.mode = "error"
    with pytest.raises(OutputError, match="output.mode=error"):
        run(changed, out)


def test_a_second_run_on_the_same_folder_is_refused_and_a_killed_holder_frees_it(
    trained_checkpoint, trained_export, tmp_path
):
    out = tmp_path / "labels"
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from pipeline.storage.files import Folder\n"
            "from pipeline.annotation.resume import exclusive\n"
            f"with exclusive(Folder({str(out)!r}), 0):\n    print('locked', flush=True); time.sleep(600)",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES), limit=1), out)
    with pytest.raises(OutputError, match=f"being written by pid {holder.pid}"):
        run(cfg, out)
    assert not list(out.glob("part-*"))

    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert run(cfg, out).items == 1  # the kernel released the lock with its holder


def test_lock_is_per_shard(tmp_path):
    folder = Folder(tmp_path)
    with exclusive(folder, 0):
        with exclusive(folder, 1):
            pass
        with pytest.raises(OutputError):
            with exclusive(folder, 0):
                pass


def test_max_error_rate_aborts_and_keeps_committed_work(trained_checkpoint, trained_export, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", photos / "a_good.jpg")
    for i in range(60):
        (photos / f"b_bad{i:02d}.jpg").write_text("not a jpeg")
    out = tmp_path / "labels"
    cfg = config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out, output={"rows_per_file": 5})
    cfg.run.max_error_rate = 0.5
    with pytest.raises(RunAborted, match=r"50 items failed|49 of 50 items failed"):
        run(cfg, out)
    rows = rows_by_id(out)
    assert 50 <= len(rows) < 61 and rows["a_good.jpg"]["error"] is None
    cfg.run.max_error_rate = None
    assert run(cfg, out).skipped == len(rows)  # the rerun resumes after the committed rows


def test_duplicate_ids_are_reported_not_dropped(trained_checkpoint, trained_export, tmp_path):
    import pyarrow as pa

    pq.write_table(
        pa.table({"image": [str(EXAMPLES / "rocket.jpg"), str(EXAMPLES / "coffee.png")], "key": ["same", "same"]}),
        tmp_path / "m.parquet",
    )
    out = tmp_path / "labels"
    run(
        config(
            trained_checkpoint,
            trained_export,
            InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), id_column="key"),
            out,
        ),
        out,
    )
    rows = pq.read_table(out).to_pylist()
    assert [r["error"] for r in rows] == [None, "duplicate id: 'same' was already used by an earlier item"]


def test_odd_sizes_are_annotated(trained_checkpoint, trained_export, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (1, 1), (255, 0, 0)).save(photos / "one.png")
    Image.new("RGB", (4000, 3), (0, 255, 0)).save(photos / "thin.png")
    out = tmp_path / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out)
    rows = rows_by_id(out)
    assert [(r["width"], r["height"], r["error"]) for r in rows.values()] == [(1, 1, None), (4000, 3, None)]


def test_a_manifest_of_image_bytes_resumes_group_by_group(trained_checkpoint, trained_export, tmp_path):
    """Row groups already done are passed over by id (their bytes unread): the finished folder equals a single run."""
    import pyarrow as pa

    photos = sorted(EXAMPLES.glob("*.*g")) * 2
    pq.write_table(pa.table({"image": [p.read_bytes() for p in photos]}), tmp_path / "m.parquet", row_group_size=2)
    single, resumed = tmp_path / "single", tmp_path / "resumed"
    source = InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"))
    run(config(trained_checkpoint, trained_export, source, single), single)
    first = config(
        trained_checkpoint,
        trained_export,
        InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), limit=5),
        resumed,
    )
    assert run(first, resumed).items == 5
    summary = run(config(trained_checkpoint, trained_export, source, resumed), resumed)
    assert (summary.skipped, summary.items) == (5, 7)
    assert {i: r["token_ids"] for i, r in rows_by_id(resumed).items()} == {
        i: r["token_ids"] for i, r in rows_by_id(single).items()
    }
