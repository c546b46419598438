"""cluster=ray (hydra-ray-launcher 1.2.2) against a local Ray cluster started by the test."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from tests.helpers import config, free_port, multirun, rows_by_id

pytest.importorskip(
    "hydra_plugins.hydra_ray_launcher", reason="hydra-ray-launcher is not installed: pip install -e '.[ray]'"
)


@pytest.fixture(scope="module")
def ray_cluster():
    """A head node of 2 CPUs on 127.0.0.1, in a process group of its own that the test stops."""
    ray = shutil.which("ray", path=str(Path(sys.executable).parent)) or shutil.which("ray")
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    head = subprocess.Popen(
        [
            ray,
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
            f"--temp-dir={temp}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([ray, "status", f"--address={address}"], capture_output=True).returncode != 0:
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"Ray did not start: {head.stdout.read()[-2000:] if head.poll() is not None else 'timeout'}"
                )
            time.sleep(1)
        yield address
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp, ignore_errors=True)


def test_two_shards_on_ray_equal_a_single_run(ray_cluster, trained_checkpoint, trained_export, many_images, tmp_path):
    single = tmp_path / "single"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(many_images)), single), single)
    want = {i: r["token_ids"] for i, r in rows_by_id(single).items()}

    out = tmp_path / "ray"
    multirun(
        "ray",
        2,
        many_images,
        out,
        trained_checkpoint,
        trained_export,
        f"hydra.launcher.ray.init.address={ray_cluster}",
        "hydra.launcher.ray.remote.num_cpus=1",
    )
    assert {i: r["token_ids"] for i, r in rows_by_id(out).items()} == want
    summaries = [json.loads((out / f"_summary-{k:05d}.json").read_text()) for k in range(2)]
    assert all(s["status"] == "finished" and s["items"] for s in summaries)
    assert [s["config"]["engine"]["threads"] for s in summaries] == [1, 1]  # the CPUs Ray reserved for each task
