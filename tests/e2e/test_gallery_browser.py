"""The gallery's page in headless Chromium: it renders without console errors, pages, filters by
phrase, and hides boxes under the score threshold."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import GalleryConfig, build
from pipeline.outputs.gallery import write_gallery
from tests.helpers import EXAMPLES, gallery_of, write_rows

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")


@pytest.fixture(scope="module")
def gallery(trained_checkpoint, trained_export, tmp_path_factory) -> Path:
    return gallery_of(trained_checkpoint, trained_export, tmp_path_factory)


def chromium(url: str, tmp_path: Path, *args: str) -> tuple[str, str]:
    """Headless Chromium (flags for a machine without network); returns stdout and stderr."""
    proc = subprocess.run(
        [
            CHROMIUM,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={tmp_path / 'profile'}",
            "--enable-logging=stderr",
            "--v=0",
            "--window-size=1200,900",
            "--virtual-time-budget=4000",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return proc.stdout, proc.stderr


def test_renders_in_chromium_without_console_errors(gallery, tmp_path):
    dom, log = chromium(gallery.joinpath("index.html").as_uri(), tmp_path, "--dump-dom")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
    assert dom.count('class="card"') == 4  # the first page
    assert len(re.findall(r'<img src="thumbs/[^"]+\.jpg"', dom)) == 4
    assert 'class="entity"' in dom and "7 images" in dom and "page 1 of 2" in dom

    _, log = chromium(gallery.joinpath("index.html").as_uri(), tmp_path, f"--screenshot={tmp_path / 'shot.png'}")
    shot = np.asarray(Image.open(tmp_path / "shot.png").convert("RGB"), dtype=float)
    cards = shot[60:330, 15:600]  # where the first thumbnails sit
    assert cards.std() > 30  # photos, not an empty page


def test_paging_and_phrase_filter(gallery, tmp_path):
    dom, log = chromium(gallery.joinpath("index.html").as_uri() + "?page=2", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 3 and "zz_broken.jpg" in dom and "page 2 of 2" in dom
    dom, log = chromium(gallery.joinpath("index.html").as_uri() + "?phrase=a%20cat", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "chelsea.png" in dom
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log


@pytest.fixture(scope="module")
def scored_gallery(tmp_path_factory) -> Path:
    """Two photos with boxes of known scores: chelsea a cat 0.9 and a mat 0.2, coffee a cat 0.6."""
    tmp = tmp_path_factory.mktemp("scored")
    rows = []
    for name, entities in [("chelsea.png", [("a cat", 0.9), ("a mat", 0.2)]), ("coffee.png", [("a cat", 0.6)])]:
        shutil.copy(EXAMPLES / name, tmp / name)
        rows.append(
            {
                "id": name,
                "source": str(tmp / name),
                "width": 400,
                "height": 300,
                "prompt": "p",
                "caption": " and ".join(p for p, _ in entities),
                "token_ids": [1],
                "error": None,
                "entities": [
                    {
                        "phrase": p,
                        "start": k * 10,
                        "end": k * 10 + len(p),
                        "score": s,
                        "boxes": [{"x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": s}],
                    }
                    for k, (p, s) in enumerate(entities)
                ],
            }
        )
    out = write_rows(tmp / "out", rows)
    write_gallery(build(GalleryConfig, {"output.dir": str(out)}))
    return out / "_gallery"


def test_boxes_show_their_scores_and_the_threshold_hides_doubtful_ones(scored_gallery, tmp_path):
    url = scored_gallery.joinpath("index.html").as_uri()
    dom, log = chromium(url, tmp_path, "--dump-dom")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
    assert dom.count('class="box"') == 3
    assert "a cat 0.90" in dom and "a mat 0.20" in dom and "a cat 0.60" in dom
    assert "left: 10%; top: 20%; width: 40%; height: 40%" in dom  # drawn where the box is, over the photo

    dom, _ = chromium(url + "?score=0.5", tmp_path, "--dump-dom")
    assert dom.count('class="box"') == 2 and "a mat 0.20" not in dom
    assert dom.count('class="entity below"') == 1  # "a mat" in the caption: all its boxes are hidden
    assert 'id="score" type="number" min="0" max="1" step="0.05" value="0"' in dom  # the control...
    dom, _ = chromium(url + "?phrase=a%20cat&score=0.7", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "chelsea.png" in dom and "scoring" in dom
    dom, _ = chromium(url + "?phrase=a%20mat&score=0.5", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 0


def test_the_first_page_plots_the_dataset_and_a_bar_shows_its_images(scored_gallery, tmp_path):
    """Boxes per class (the phrases' head nouns), score and size histograms; a bar's facet in the URL
    (what a click sets) shows the images behind it."""
    url = scored_gallery.joinpath("index.html").as_uri()
    dom, log = chromium(url, tmp_path, "--dump-dom")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
    for title in ("Boxes per class", "Box scores", "Entity scores", "Box sizes"):
        assert title in dom
    assert 'data-facet="class=cat"' in dom and 'data-facet="class=mat"' in dom
    assert re.search(r'data-facet="class=cat".*?<span class="n">2</span>', dom)
    dom, log = chromium(url + "?facet=class%3Dmat", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "chelsea.png" in dom and "1 images" in dom
    dom, _ = chromium(url + "?facet=box%20score%3D0.6-0.7", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "coffee.png" in dom
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log


def test_the_plots_group_by_the_classes_given(scored_gallery, tmp_path):
    out = scored_gallery.parent
    write_gallery(build(GalleryConfig, {"output.dir": str(out), "classes": {"feline": ["cat"]}}))
    dom, _ = chromium(scored_gallery.joinpath("index.html").as_uri() + "?facet=class%3Dfeline", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 2 and 'data-facet="class=mat"' not in dom
    write_gallery(build(GalleryConfig, {"output.dir": str(out)}))  # as the other tests expect it
