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

from pipeline.annotate.run import run
from pipeline.config import InputConfig, OutputConfig, StatusConfig
from pipeline.outputs.status import status, table
from tests.helpers import REPO, config, count_parts, start


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
    """A shard on another machine that says it runs but has not committed for stall_seconds."""
    from tests.helpers import EXAMPLES

    out = tmp_path / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out), out)
    summary = json.loads((out / "_summary.json").read_text())
    summary.update(status="running", host="another-machine", started_at="2026-01-01T00:00:00Z")
    (out / "_summary.json").write_text(json.dumps(summary))
    past = time.time() - 3600
    for part in out.glob("part-*.parquet"):
        os.utime(part, (past, past))
    proc = status_command(out, "stall_seconds=600", cwd=tmp_path)
    assert proc.returncode == 5, proc.stderr
    assert "stalled" in proc.stdout and "have not committed for 600 s" in proc.stderr
    assert status_command(out, "stall_seconds=7200", cwd=tmp_path).returncode == 0
