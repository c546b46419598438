"""What a user who installs the tool meets: a run without the export's libraries, a default output
folder that resumes, one image or a list or a glob, `--version`, a progress bar with a total, and a
first run that fails in seconds when its checkpoint cannot be had."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import __version__
from pipeline.cli import PROGRAMS
from pipeline.config import InputConfig
from pipeline.sources import iter_items
from tests.helpers import EXAMPLES, REPO, WITHOUT_EXPORT, annotate, model_overrides


def command(module: str, *argv: str, cwd: Path, without_export: bool = False, env: dict | None = None):
    args = (
        [sys.executable, "-c", WITHOUT_EXPORT, module, *argv]
        if without_export
        else [sys.executable, "-m", module, *argv]
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_a_run_needs_neither_torch_nor_transformers_nor_nncf(trained_checkpoint, trained_export, tmp_path):
    """With an export in place; without one, the run says in one line which extra to install."""
    out = tmp_path / "labels"
    model = model_overrides(trained_checkpoint, trained_export)
    proc = command("pipeline", f"input.path={EXAMPLES}", f"output.dir={out}", *model, cwd=tmp_path, without_export=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_table(out).num_rows == 6

    fresh = [f"model.source={trained_checkpoint}", f"model.dir={tmp_path / 'new-export'}", "model.weight_format=fp32"]
    for module, run in (
        ("pipeline", [f"input.path={EXAMPLES}", f"output.dir={tmp_path / 'x'}"]),
        ("pipeline.export", []),
    ):
        proc = command(module, *run, *fresh, cwd=tmp_path, without_export=True)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert 'pip install "kosmos-annotate[export]"' in proc.stderr and "torch, transformers, nncf" in proc.stderr
        assert "Traceback" not in proc.stderr and not (tmp_path / "x").exists()


def test_without_output_dir_the_same_command_resumes_and_leaves_only_outputs(
    trained_checkpoint, trained_export, tmp_path
):
    """Before, every run wrote a new timestamped Hydra folder, so a scheduled job started from zero;
    every command, readers included, left an outputs/<date>/<time>/ folder behind."""
    work = tmp_path / "work"
    work.mkdir()
    model = model_overrides(trained_checkpoint, trained_export)
    first, _ = annotate(f"input.path={EXAMPLES}", *model, cwd=work)
    assert first.returncode == 0, first.stderr[-2000:]
    (out,) = (work / "outputs").iterdir()
    assert out.name.startswith("images-caption-") and f"Output: outputs/{out.name}" in first.stderr
    second, _ = annotate(f"input.path={EXAMPLES}", *model, cwd=work)
    assert (
        second.returncode == 0 and "Annotated 0 images" in second.stderr and "6 already done, skipped" in second.stderr
    )
    assert pq.read_table(out).num_rows == 6 and (out / ".hydra" / "config.yaml").exists()
    assert "input.path=" in (out / ".hydra" / "overrides.yaml").read_text()
    for module in ("pipeline.outputs.status", "pipeline.outputs.labels"):
        extra = ["format=coco", f"dest={tmp_path / 'coco.json'}"] if module.endswith("labels") else []
        assert command(module, f"output.dir={out}", *extra, cwd=work).returncode == 0
    assert sorted(p.name for p in work.iterdir()) == ["outputs"]
    assert sorted(p.name for p in (work / "outputs").iterdir()) == [out.name]


@pytest.mark.parametrize(
    "path, ids",
    [
        ("chelsea.png", ["chelsea.png"]),
        ("*.png", ["astronaut.png", "camera.png", "chelsea.png", "coffee.png"]),
        (["rocket.jpg", "more/chelsea.png"], ["rocket.jpg", "more/chelsea.png"]),
        (["more", "rocket.jpg"], ["more/chelsea.png", "rocket.jpg"]),
    ],
)
def test_one_image_a_glob_or_a_list(tmp_path, path, ids):
    """`input.path=photo.jpg` was "not a folder"."""
    shutil.copytree(EXAMPLES, tmp_path / "photos")
    (tmp_path / "photos" / "more").mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", tmp_path / "photos" / "more" / "chelsea.png")
    where = [str(tmp_path / "photos" / p) for p in path] if isinstance(path, list) else str(tmp_path / "photos" / path)
    assert [i.id for i in iter_items(InputConfig(path=where))] == ids


def test_one_image_from_the_command_line(trained_checkpoint, trained_export, tmp_path):
    out = tmp_path / "one"
    model = model_overrides(trained_checkpoint, trained_export)
    proc, _ = annotate(f"input.path={EXAMPLES / 'chelsea.png'}", f"output.dir={out}", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert pq.read_table(out).column("id").to_pylist() == ["chelsea.png"]


MODULES = {
    "pipeline": "kosmos-annotate",
    "pipeline.export": "kosmos-export",
    "pipeline.outputs.labels": "kosmos-labels",
    "pipeline.outputs.gallery": "kosmos-gallery",
    "pipeline.outputs.status": "kosmos-status",
}


@pytest.mark.parametrize("module", sorted(MODULES))
def test_every_command_says_its_version(module, tmp_path):
    """It printed Hydra's."""
    proc = command(module, "--version", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == f"{MODULES[module]} {__version__}"
    assert sorted(MODULES.values()) == sorted(PROGRAMS.values())


def test_the_progress_bar_has_a_total(trained_checkpoint, trained_export, many_images, tmp_path):
    model = model_overrides(trained_checkpoint, trained_export)
    proc, _ = annotate(f"input.path={many_images}", f"output.dir={tmp_path / 'out'}", *model, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "24/24" in proc.stderr  # n/total, with a rate and the time left


def test_a_checkpoint_that_cannot_be_had_fails_in_seconds(tmp_path):
    """Offline (no route to the hub) a first run spent minutes in the hub's retries before its error."""
    model = ["model.source=kosmos-annotate-tests/no-such-model", f"model.dir={tmp_path / 'm'}"]
    for module, run in (
        ("pipeline", [f"input.path={EXAMPLES}", f"output.dir={tmp_path / 'out'}"]),
        ("pipeline.export", []),
    ):
        started = time.monotonic()
        env = {"HF_HUB_OFFLINE": "0", "HF_HOME": str(tmp_path / "hf")}
        proc = command(module, *run, *model, cwd=tmp_path, env=env)
        assert time.monotonic() - started < 60 and proc.returncode == 2, proc.stderr[-2000:]
        assert "cannot load model.source='kosmos-annotate-tests/no-such-model'" in proc.stderr
        assert "model.source=/path/to/that/folder" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()
