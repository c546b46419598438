"""The Python API gives the command's rows: the same tokens, entities and errors as a run, for paths,
PIL images, bytes and arrays, one or many, in order."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import Annotator, annotate
from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.model.prompt import GROUND
from tests.helpers import EXAMPLES, config, load_rgb

NAMES = ["chelsea.png", "astronaut.png", "coffee.png", "rocket.jpg"]


def overrides(checkpoint, export) -> dict:
    return {"model.source": str(checkpoint), "model.dir": str(export), "model.weight_format": "fp32",
            "engine.precision": "f32"}  # fmt: skip


@pytest.fixture(scope="module")
def annotator(trained_checkpoint, trained_export):
    return Annotator(overrides=overrides(trained_checkpoint, trained_export))


@pytest.fixture(scope="module")
def run_rows(trained_checkpoint, trained_export, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("run")
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out), out)
    return {r["id"]: r for r in pq.read_table(out).to_pylist()}


def test_rows_are_the_commands(annotator, run_rows):
    paths = [str(EXAMPLES / n) for n in NAMES]
    rows = list(annotator.annotate(paths))
    assert [r["id"] for r in rows] == paths
    for name, row in zip(NAMES, rows):
        want = {k: v for k, v in run_rows[name].items() if k not in ("id", "source")}
        got = {k: v for k, v in row.items() if k not in ("id", "source")}
        assert got["token_ids"] == want["token_ids"] and got["caption"] == want["caption"]
        assert [(e["phrase"], len(e["boxes"])) for e in got["entities"]] == [
            (e["phrase"], len(e["boxes"])) for e in want["entities"]
        ]
        assert got["width"] == want["width"] and got["error"] is None


def test_images_in_memory_and_one_at_a_time(annotator, run_rows):
    image = load_rgb(EXAMPLES / "chelsea.png")
    inputs = [image, np.asarray(image), (EXAMPLES / "chelsea.png").read_bytes(), b"not an image"]
    rows = list(annotator.annotate(inputs))
    assert [r["id"] for r in rows] == ["#0", "#1", "#2", "#3"]
    assert all(r["token_ids"] == run_rows["chelsea.png"]["token_ids"] for r in rows[:3])
    assert rows[3]["error"].startswith("not an image")
    (single,) = annotator.annotate(image)
    assert single["token_ids"] == run_rows["chelsea.png"]["token_ids"]
    assert image.size == (451, 300) and image.mode == "RGB"  # the caller's image is left as it was


def test_the_one_call_form_and_the_tasks(trained_checkpoint, trained_export):
    rows = annotate(str(EXAMPLES / "chelsea.png"), task="ground", phrases=["a cat", "a mat"],
                    overrides=overrides(trained_checkpoint, trained_export))  # fmt: skip
    assert [e["phrase"] for e in rows[0]["entities"]] == ["a cat", "a mat"] and rows[0]["prompt"] == GROUND
    with pytest.raises(ConfigError, match="engine.batch_sise"):
        Annotator(overrides={**overrides(trained_checkpoint, trained_export), "engine.batch_sise": 4})
    with pytest.raises(ConfigError, match="task.kind='count'"):
        Annotator(task="count")
