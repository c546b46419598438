"""kosmos-status: where a sharded run stands, on a finished folder, a live run, a killed one and a stalled one."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig, OutputConfig, StatusConfig
from pipeline.errors import OutputError
from pipeline.outputs.status import status, table
from pipeline.storage.locks import flock
from tests.helpers import EXAMPLES, REPO, annotate, config, count_parts, model_overrides, start


def status_command(folder: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.outputs.status", f"output.dir={folder}", *extra],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=120,
    )


def test_two_finished_shards(trained_checkpoint, trained_export, many_images, tmp_path):
    out, photos = tmp_path / "labels", tmp_path / "photos"
    shutil.copytree(many_images, photos)
    (photos / "set0" / "broken.jpg").write_text("not an image")
    for shard in (0, 1):
        run(
            config(
                trained_checkpoint, trained_export, InputConfig(path=str(photos), num_shards=2, shard_index=shard), out
            ),
            out,
        )
    report = status(StatusConfig(output=OutputConfig(dir=str(out))))
    assert [s["state"] for s in report["shards"]] == ["finished", "finished"]
    assert report["done"] == report["total"] == 25 and report["seconds_left"] is None
    assert sum(s["done"] for s in report["shards"]) == 25 and all(s["done"] for s in report["shards"])
    assert report["errors"] == {"not an image": 1}
    assert all(s["images_per_s"] > 0 for s in report["shards"])
    assert "all: 25 of 25 (100.0 %) done, 1 errors" in table(report)

    proc = status_command(out, "json=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["done"] == 25
    assert sorted(tmp_path.iterdir()) == [out, photos]  # a status check leaves nothing behind


def test_a_live_run_then_a_killed_one(trained_checkpoint, trained_export, many_images, tmp_path):
    out = tmp_path / "live"
    child = start(many_images, out, trained_checkpoint, trained_export)
    seen = []
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline and len(seen) < 2:
        if count_parts(out) > len(seen) * 3:  # look twice while it writes
            seen.append(status(StatusConfig(output=OutputConfig(dir=str(out)))))
        time.sleep(0.01)
    assert len(seen) == 2, "the run finished before it could be looked at"
    first, second = seen
    assert first["shards"][0]["state"] == "running" and first["total"] == 24
    assert 0 < first["done"] < second["done"] < 24
    assert second["seconds_left"] is not None and second["images_per_s"] > 0

    child.send_signal(signal.SIGKILL)
    child.wait()
    report = status(StatusConfig(output=OutputConfig(dir=str(out))))
    assert report["shards"][0]["state"] == "killed" and report["done"] >= second["done"]


def test_a_stalled_shard_exits_5(trained_checkpoint, trained_export, tmp_path):
    """A shard that says it runs and holds its lock (its process lives, on this machine or another
    that shares the disk) but has not committed for stall_seconds."""
    out = tmp_path / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out), out)
    summary = json.loads((out / "_summary.json").read_text())
    old = "2026-01-01T00:00:00Z"
    summary.update(status="running", host="another-machine", started_at=old, updated_at=old)
    (out / "_summary.json").write_text(json.dumps(summary))
    past = time.time() - 3600
    for part in out.glob("part-*.parquet"):
        os.utime(part, (past, past))
    with flock(out / ".lock-00000", blocking=False):  # the live, stuck run's
        proc = status_command(out, "stall_seconds=600", cwd=tmp_path)
        assert proc.returncode == 5, proc.stderr
        assert "stalled" in proc.stdout and "have not committed for 600 s" in proc.stderr
        assert status_command(out, "stall_seconds=7200", cwd=tmp_path).returncode == 0
    assert status(StatusConfig(output=OutputConfig(dir=str(out))))["shards"][0]["state"] == "killed"  # lock free


def test_a_run_is_visible_from_its_first_second_and_killed_when_its_lock_is_free(
    trained_checkpoint, trained_export, many_images, tmp_path
):
    """Before its first commit a run's folder was "not a kosmos-annotate output" to kosmos-status; and
    a killed run was judged by its host and pid, which containers share and reuse."""
    out = tmp_path / "live"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable, "-m", "pipeline", f"input.path={many_images}", f"output.dir={out}",
        "output.rows_per_file=1000", "output.flush_seconds=3600", *model_overrides(trained_checkpoint, trained_export),
    ]  # fmt: skip
    child = subprocess.Popen(args, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seen = set()
    deadline = time.monotonic() + 120
    while child.poll() is None and time.monotonic() < deadline and "running" not in seen:
        if (out / "_summary.json").exists():
            report = status(StatusConfig(output=OutputConfig(dir=str(out))))
            seen.add(report["shards"][0]["state"])
            assert report["done"] == 0 and not list(out.glob("part-*"))
        time.sleep(0.05)
    assert "running" in seen and seen <= {"loading", "running"}, seen
    child.send_signal(signal.SIGKILL)
    child.wait()
    report = status(StatusConfig(output=OutputConfig(dir=str(out))))
    assert report["shards"][0]["state"] == "killed"


def test_a_resume_with_another_shard_count_leaves_no_stale_summary(trained_checkpoint, trained_export, tmp_path):
    out = tmp_path / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES), limit=2), out), out)
    assert (out / "_summary.json").exists()
    for shard in (0, 1):
        cfg = InputConfig(path=str(EXAMPLES), num_shards=2, shard_index=shard)
        run(config(trained_checkpoint, trained_export, cfg, out), out)
    assert sorted(p.name for p in out.glob("_summary*")) == ["_summary-00000.json", "_summary-00001.json"]
    report = status(StatusConfig(output=OutputConfig(dir=str(out))))
    assert [s["state"] for s in report["shards"]] == ["finished", "finished"] and report["done"] == 6


def test_output_mode_error_lets_the_shards_of_one_multirun_join(trained_checkpoint, trained_export, tmp_path):
    """SLURM starts a multirun's jobs at different times: shard 1 may start after shard 0 committed."""
    out = tmp_path / "labels"

    def shard(k: int):
        cfg = config(
            trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES), num_shards=2, shard_index=k), out
        )
        cfg.output.mode = "error"
        return run(cfg, out)

    shard(0)
    shard(1)
    with pytest.raises(OutputError, match="already holds .* part files of shard 0 and output.mode=error"):
        shard(0)
    assert status(StatusConfig(output=OutputConfig(dir=str(out))))["done"] == 6


def test_the_run_log_is_in_the_output_folder(trained_checkpoint, trained_export, tmp_path):
    out = tmp_path / "labels"
    model = model_overrides(trained_checkpoint, trained_export)
    proc, _ = annotate(f"input.path={EXAMPLES}", f"output.dir={out}", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "_run.log").read_text()
    assert "Engine:" in log and "Annotated 6 images (0 errors)" in log
