"""Every Python block of the README and of docs/ runs, on the tests' trained model, from the
repository's root (the examples' paths). A block that cannot run here says why on the line before
its fence: `<!-- not run: the reason -->`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline import api
from tests.helpers import REPO

BLOCK = re.compile(r"(?:<!-- not run: (?P<why>[^>]*) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def blocks() -> list:
    found = []
    for page in PAGES:
        for k, m in enumerate(BLOCK.finditer(page.read_text())):
            marks = [pytest.mark.skip(reason=m["why"])] if m["why"] else []
            found.append(pytest.param(m["code"], id=f"{page.relative_to(REPO)}-{k}", marks=marks))
    return found


@pytest.mark.parametrize("code", blocks())
def test_python_blocks_run(code, trained_checkpoint, trained_export, monkeypatch):
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
    monkeypatch.chdir(REPO)
    exec(compile(code, "<block>", "exec"), {"__name__": "__doc__"})


def test_every_page_is_looked_at():
    assert Path(REPO / "README.md") in PAGES and blocks()
