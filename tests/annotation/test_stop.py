"""SIGTERM and SIGINT (`scancel`, `docker stop`, Kubernetes, systemd, Ctrl-C) stop a run gracefully:
what is finished is committed, the summary says `stopped`, the exit status is 128 + the signal; a
second signal exits at once. Before, SIGTERM killed the process with nothing committed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.helpers import EXAMPLES, REPO, model_overrides, rows_by_id


def start(folder: Path, out: Path, checkpoint, export) -> tuple[subprocess.Popen, list[str]]:
    """`python -m pipeline` committing only at its end (no part by rows or by time), its stderr
    collected by a thread."""
    args = [
        sys.executable, "-m", "pipeline", f"input.path={folder}", f"output.dir={out}",
        "output.rows_per_file=1000", "output.flush_seconds=3600", "engine.batch_size=2", "engine.num_requests=1",
        *model_overrides(checkpoint, export),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(args, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err: list[str] = []

    def collect() -> None:
        while chunk := child.stderr.read1(4096):
            err.append(chunk.decode("utf-8", "replace"))

    threading.Thread(target=collect, daemon=True).start()
    return child, err


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """600 images (links to the examples): enough work that a signal finds the run at it."""
    root = tmp_path_factory.mktemp("photos")
    examples = sorted(EXAMPLES.glob("*.*g"))
    for k in range(600):
        (root / f"{k:04d}{examples[k % len(examples)].suffix}").symlink_to(examples[k % len(examples)])
    return root


def annotated(err: list[str]) -> int:
    """Rows done so far, from the progress bar on stderr (`12img` before the total is known, `12/600` after)."""
    done = re.findall(r"annotating: +(?:(\d+)img|\d+%\|[^|]*\| (\d+)/)", "".join(err))
    return int(max(done[-1])) if done else 0


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_commits_what_is_finished_and_the_rerun_resumes(
    trained_checkpoint, trained_export, photos, tmp_path, signum
):
    out = tmp_path / "labels"
    child, err = start(photos, out, trained_checkpoint, trained_export)
    deadline = time.monotonic() + 180
    while child.poll() is None and annotated(err) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert child.poll() is None, "".join(err)[-2000:]
    child.send_signal(signum)
    assert child.wait(timeout=120) == 128 + signum, "".join(err)[-2000:]
    committed = pq.read_table(out).num_rows if list(out.glob("part-*")) else 0
    assert 3 <= committed < 600, "".join(err)[-2000:]  # what was finished, not what was not
    summary = json.loads((out / "_summary.json").read_text())
    assert summary["status"] == "stopped" and summary["error"] == f"{signal.Signals(signum).name} received"
    assert "a rerun resumes where it stopped" in "".join(err)

    child, err = start(photos, out, trained_checkpoint, trained_export)
    assert child.wait(timeout=600) == 0, "".join(err)[-2000:]
    assert len(rows_by_id(out)) == 600  # every row once
    assert json.loads((out / "_summary.json").read_text())["skipped"] == committed


def test_a_second_signal_exits_at_once(trained_checkpoint, trained_export, photos, tmp_path):
    out = tmp_path / "labels"
    child, err = start(photos, out, trained_checkpoint, trained_export)
    deadline = time.monotonic() + 180
    while child.poll() is None and annotated(err) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    child.send_signal(signal.SIGTERM)  # two different signals: two of one kind may reach the process as one
    child.send_signal(signal.SIGINT)
    assert child.wait(timeout=30) in (128 + signal.SIGTERM, 128 + signal.SIGINT)
    assert not list(out.glob("part-*")) and not list(out.glob(".part-*"))  # out at once: nothing committed
