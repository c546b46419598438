"""The wheel is what `pip install kosmos-annotate` gives: built here, installed into a fresh virtual
environment, every command starts from any folder and a run annotates with an existing export."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import __version__
from tests.helpers import EXAMPLES, REPO, model_overrides, write_rows

COMMANDS = ["kosmos-annotate", "kosmos-export", "kosmos-labels", "kosmos-gallery", "kosmos-status"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> tuple[Path, dict]:
    """(the fresh environment's bin folder, an environment to run its commands in). The wheel goes in
    with --no-deps: its dependencies come from this environment's site-packages on PYTHONPATH, which
    reaches them without the editable install of this checkout (a .pth file, read only in site folders)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, source / name)
    for name in ("pipeline", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    build = [
        sys.executable,
        "-m",
        "pip",
        "wheel",
        "--no-deps",
        "--no-build-isolation",
        "-w",
        str(tmp / "dist"),
        str(source),
    ]
    subprocess.run(build, check=True, capture_output=True, timeout=600)
    (wheel,) = (tmp / "dist").glob("*.whl")
    subprocess.run([sys.executable, "-m", "venv", str(tmp / "env")], check=True, timeout=600)
    pip = [str(tmp / "env" / "bin" / "python"), "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)]
    subprocess.run(pip, check=True, capture_output=True, timeout=600)
    env = {"PATH": f"{tmp / 'env' / 'bin'}:/usr/bin:/bin", "HOME": str(tmp), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": sysconfig.get_paths()["purelib"]}  # fmt: skip
    return tmp / "env" / "bin", env, wheel


def test_the_wheel_holds_the_config_the_samples_the_page_and_the_licence(installed):
    names = zipfile.ZipFile(installed[2]).namelist()
    wanted = [
        "pipeline/conf/config.yaml",
        "pipeline/conf/task/ground.yaml",
        "pipeline/conf/hydra/job_logging/stderr.yaml",
        "pipeline/export/samples/chelsea.jpg",
        "pipeline/export/samples/calibration/rocket.jpg",
        "pipeline/outputs/gallery.html",
        "pipeline/api.py",
    ]
    assert [w for w in wanted if w not in names] == []
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_starts_from_anywhere(installed, name, tmp_path):
    bin_, env, _ = installed
    proc = subprocess.run(
        [str(bin_ / name), "--help"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.returncode == 0 and "== Config ==" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(
        [str(bin_ / name), "--version"], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert proc.stdout.strip() == f"{name} {__version__}"
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_installed_commands_annotate_resume_and_read(installed, trained_checkpoint, trained_export, tmp_path):
    bin_, env, _ = installed
    model = model_overrides(trained_checkpoint, trained_export)
    for _ in range(2):  # the second resumes
        proc = subprocess.run([str(bin_ / "kosmos-annotate"), f"input.path={EXAMPLES}", *model], capture_output=True,
                              text=True, cwd=tmp_path, env=env, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert "6 already done, skipped" in proc.stderr
    (out,) = (tmp_path / "outputs").iterdir()
    assert pq.read_table(out).num_rows == 6 and sorted(p.name for p in tmp_path.iterdir()) == ["outputs"]
    for name, extra in [("kosmos-gallery", []), ("kosmos-status", []), ("kosmos-labels", [f"dest={out}/_coco.json"])]:
        proc = subprocess.run([str(bin_ / name), f"output.dir={out}", *extra], capture_output=True, text=True,
                              cwd=tmp_path, env=env, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "_gallery" / "index.html").read_text().startswith("<!doctype html>")


def test_a_folder_from_anywhere_with_rows_but_no_model(installed, tmp_path):
    """The readers need no model and no export: a folder of rows is enough."""
    bin_, env, _ = installed
    row = {"id": "a.jpg", "source": "/nowhere/a.jpg", "width": 10, "height": 10, "error": None, "entities": []}
    out = write_rows(tmp_path / "rows", [row])
    proc = subprocess.run([str(bin_ / "kosmos-status"), f"output.dir={out}"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "1 done" in proc.stdout, proc.stderr
    assert os.listdir(tmp_path) == ["rows"]
