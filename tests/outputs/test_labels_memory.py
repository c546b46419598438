"""Every label format streams: its peak memory over 40,000 rows is that over 4,000, give or take
what a few more pages of parquet hold. Generated output folders of several parts, one small image."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.records import SCHEMA
from tests.helpers import REPO

PHRASES = ["a dog", "two cats", "a man in a red shirt", "the people", "a pair of shoes"]


def output_folder(folder: Path, rows: int, image: Path) -> Path:
    folder.mkdir()
    per_part = 4000
    for part in range(0, rows, per_part):
        batch = [
            {
                "id": f"img/{k:07d}.png",
                "source": str(image),
                "width": 64,
                "height": 48,
                "prompt": "<grounding>An image of",
                "caption": f"An image of {PHRASES[k % 5]} and {PHRASES[(k + 1) % 5]}",
                "token_ids": [1, 2, 3],
                "caption_logprob": -1.0,
                "entities": [
                    {"phrase": PHRASES[(k + j) % 5], "start": 0, "end": 3, "score": 0.7,
                     "boxes": [{"x1": 0.1, "y1": 0.1, "x2": 0.6, "y2": 0.7, "score": 0.8}]}
                    for j in range(2)
                ],
                "error": None if k % 50 else "not an image: generated",
            }
            for k in range(part, min(part + per_part, rows))
        ]  # fmt: skip
        pq.write_table(
            pa.Table.from_pylist(batch, schema=SCHEMA), folder / f"part-00000-{part // per_part:05d}.parquet"
        )
    return folder


CHILD = """
import sys
from pipeline.config import LabelsConfig, build
from pipeline.outputs.labels import export_labels
hwm = lambda: next(int(l.split()[1]) for l in open('/proc/self/status') if l.startswith('VmHWM')) / 1024
import pipeline.outputs.labels.hf, datasets  # imported before the baseline
base = hwm()
counts = export_labels(build(LabelsConfig, {"output.dir": sys.argv[1], "format": sys.argv[2], "dest": sys.argv[3]}))
print(hwm() - base, counts["images"])
"""


@pytest.mark.parametrize("fmt", ["yolo", "coco", "labelstudio", "grit", "voc", "hf"])
def test_every_format_streams(tmp_path, fmt):
    pytest.importorskip("datasets", reason='the child imports datasets: pip install "kosmos-annotate[hf]"')
    image = tmp_path / "one.png"
    Image.new("RGB", (64, 48), "white").save(image)
    rises = {}
    for rows in (4_000, 40_000):
        folder = output_folder(tmp_path / f"out{rows}", rows, image)
        dest = (
            tmp_path
            / f"{fmt}{rows}{'.parquet' if fmt == 'grit' else '.json' if fmt in ('coco', 'labelstudio') else ''}"
        )
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, str(folder), fmt, str(dest)],
            capture_output=True,
            text=True,
            env=env,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rise, images = proc.stdout.split()
        assert int(images) == rows - rows // 50  # error rows left out
        rises[rows] = float(rise)
    print(fmt, {k: round(v) for k, v in rises.items()})
    assert rises[40_000] - rises[4_000] < 40, rises  # MB; holding the rows would take hundreds
