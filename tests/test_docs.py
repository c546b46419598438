"""Every code block of the README and of docs/ runs, page by page and in order, as a reader would run
them: in a fresh folder holding a copy of the example photos (and, for pages that read one, an
output folder `labels/` of them), on the tests' trained model. The commands (`kosmos-annotate`, ...)
are the package's own, given the tiny model's keys; Python blocks get the API with the same model.
A block that cannot run here says why on the line before its fence: `<!-- not run: the reason -->`.
Fences other than bash and python (text, yaml, ini) show a layout or a file, not a command.

The configuration reference (docs/configuration.md) is what docs/reference.py writes from the typed
config, and every key has a help line: the reference cannot drift from the code."""

from __future__ import annotations

import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import api
from pipeline.annotation.run import run
from pipeline.cli import SCHEMAS
from pipeline.config import InputConfig, help_lines
from tests.helpers import EXAMPLES, REPO, config, model_overrides

BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```(?P<lang>bash|python)\n(?P<code>.*?)```", re.DOTALL)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
COMMANDS = {
    "kosmos-annotate": "pipeline",
    "kosmos-labels": "pipeline.outputs.labels",
    "kosmos-gallery": "pipeline.outputs.gallery",
    "kosmos-status": "pipeline.outputs.status",
    "kosmos-export": "pipeline.export.command",
}


def blocks(page: Path) -> list[re.Match]:
    return list(BLOCK.finditer(page.read_text()))


@pytest.fixture(scope="module")
def annotated(trained_checkpoint, trained_export, tmp_path_factory) -> Path:
    """`labels/`: the example photos annotated by the trained model, for pages that read an output."""
    out = tmp_path_factory.mktemp("docs") / "labels"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out), out)
    return out


def commands(folder: Path, checkpoint: Path, export: Path) -> dict[str, str]:
    """The commands on PATH: the package's modules, kosmos-annotate and kosmos-export given the tiny model."""
    folder.mkdir()
    for name, module in COMMANDS.items():
        extra = " ".join(model_overrides(checkpoint, export)) if name in ("kosmos-annotate", "kosmos-export") else ""
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@" {extra}\n')
        script.chmod(0o755)
    return {**os.environ, "PATH": f"{folder}:{os.environ['PATH']}", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_block_of_the_page_runs(page, annotated, trained_checkpoint, trained_export, tmp_path, monkeypatch):
    found = [m for m in blocks(page) if not m["why"]]
    if not found:
        pytest.skip("no block to run: " + "; ".join(m["why"] for m in blocks(page)) if blocks(page) else "no code")
    work = tmp_path / "work"
    shutil.copytree(EXAMPLES.parent, work / "examples")
    if page.name != "getting-started.md":  # that page makes its own
        shutil.copytree(annotated, work / "labels")
    env = commands(tmp_path / "bin", trained_checkpoint, trained_export)
    test_model = {
        "model.source": str(trained_checkpoint),
        "model.dir": str(trained_export),
        "model.weight_format": "fp32",
    }

    class Annotator(api.Annotator):
        def __init__(self, task="caption", phrases=None, prompt=None, overrides=None):
            super().__init__(task, phrases, prompt, {**test_model, **(overrides or {})})

    def annotate(images, task="caption", phrases=None, prompt=None, overrides=None):
        return list(Annotator(task, phrases, prompt, overrides).annotate(images))

    monkeypatch.setattr(api, "Annotator", Annotator)
    monkeypatch.setattr(api, "annotate", annotate)
    monkeypatch.chdir(work)
    for block in found:
        if block["lang"] == "python":
            exec(compile(block["code"], f"<{page.name}>", "exec"), {"__name__": "__doc__"})
            continue
        proc = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", block["code"]], cwd=work, env=env, capture_output=True, text=True,
            timeout=900,
        )  # fmt: skip
        assert proc.returncode == 0, f"{page.name}:\n{block['code']}\n{proc.stderr[-3000:]}"
    if page.name == "getting-started.md":  # what the walk promises: an output, a gallery, a COCO file
        assert list((work / "labels").glob("part-*.parquet")) and (work / "labels/_gallery/index.html").exists()
        assert '"categories"' in (work / "coco.json").read_text()


def test_the_configuration_reference_is_the_code():
    reference = runpy.run_path(str(REPO / "docs" / "reference.py"))["reference"]()
    assert (REPO / "docs" / "configuration.md").read_text() == reference, (
        "docs/configuration.md is out of date: python docs/reference.py > docs/configuration.md"
    )


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_key_has_a_help_line(name):
    missing = [key for key, _, _, help_ in help_lines(SCHEMAS[name]) if not help_.strip()]
    assert not missing, f"keys without a help line (opt(default, 'help')) in {name}: {missing}"


def test_every_page_is_looked_at_and_in_the_site():
    assert REPO / "README.md" in PAGES and len(PAGES) > 10
    nav = (REPO / "mkdocs.yml").read_text()
    for page in PAGES[1:]:
        assert str(page.relative_to(REPO / "docs")) in nav, f"{page} is not in mkdocs.yml's nav"
