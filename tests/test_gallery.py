"""The gallery: pages, thumbnails, highlighted captions, phrase filter; rendered in headless Chromium."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import ConfigError, InputConfig, OutputConfig
from pipeline.gallery import GalleryConfig, GalleryOptions, build
from pipeline.run import run
from tests.conftest import EXAMPLES
from tests.test_run import config

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def gallery(trained_checkpoint, trained_export, tmp_path_factory) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for p in EXAMPLES.glob("*.*g"):
        shutil.copy(p, photos / p.name)
    (photos / "zz_broken.jpg").write_text("not an image")
    out = tmp_path_factory.mktemp("labels")
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out, preview={"enabled": True}), out)
    result = build(GalleryConfig(output=OutputConfig(dir=str(out)), gallery=GalleryOptions(page_size=4)))
    assert result == {"rows": 7, "pages": 2, "phrases": 5, "index": str(out / "_gallery" / "index.html")}
    return out / "_gallery"


def test_files(gallery):
    index = json.loads((gallery / "index.js").read_text().removeprefix("const GALLERY = ").rstrip(";\n"))
    assert index["pages"] == 2 and index["rows"] == 7
    assert index["phrases"]["a cat"] == [0]
    assert len(list((gallery / "thumbs").iterdir())) == 6  # every image but the broken one
    assert all(max(Image.open(t).size) <= 320 for t in (gallery / "thumbs").iterdir())


def test_needs_an_output_folder(tmp_path):
    with pytest.raises(ConfigError, match="holds no part files"):
        build(GalleryConfig(output=OutputConfig(dir=str(tmp_path))))


def chromium(url: str, tmp_path: Path, *args: str) -> tuple[str, str]:
    """Headless Chromium (flags for a machine without network); returns stdout and stderr."""
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         f"--user-data-dir={tmp_path / 'profile'}", "--enable-logging=stderr", "--v=0", "--window-size=1200,900",
         "--virtual-time-budget=4000", *args, url],
        capture_output=True, text=True, timeout=120,
    )
    return proc.stdout, proc.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
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


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_paging_and_phrase_filter(gallery, tmp_path):
    dom, log = chromium(gallery.joinpath("index.html").as_uri() + "?page=2", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 3 and "zz_broken.jpg" in dom and "page 2 of 2" in dom
    dom, log = chromium(gallery.joinpath("index.html").as_uri() + "?phrase=a%20cat", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "chelsea.png" in dom
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log


def write_rows(folder: Path, rows: list[dict]) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sink import SCHEMA

    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-00000-00000.parquet")
    return folder


def test_thumbnails_of_phone_photos_are_upright(tmp_path):
    """The thumbnail is the source image turned by its EXIF orientation, since boxes (drawn by the
    page in fractions of the image) refer to the upright image."""
    photo = Image.new("RGB", (120, 80), (0, 0, 0))  # stored landscape, shown portrait (orientation 6)
    photo.paste((255, 255, 255), (0, 0, 30, 80))  # the stored left edge: the top once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.jpg", exif=exif)
    box = {"x1": 0.0, "y1": 0.0, "x2": 0.5, "y2": 0.25, "score": 0.5}
    row = {"id": "phone.jpg", "source": str(tmp_path / "phone.jpg"), "width": 80, "height": 120, "prompt": "p",
           "caption": "a box", "token_ids": [1], "error": None,
           "entities": [{"phrase": "a box", "start": 0, "end": 5, "score": 0.5, "boxes": [box]}]}
    out = write_rows(tmp_path / "out", [row])
    build(GalleryConfig(output=OutputConfig(dir=str(out))))
    (thumb,) = (out / "_gallery" / "thumbs").iterdir()
    image = np.asarray(Image.open(thumb).convert("L"), dtype=int)
    assert image.shape[0] > image.shape[1]  # portrait
    assert image[: image.shape[0] // 4].mean() > 200 and image[image.shape[0] // 2 :].mean() < 30  # the white band on top


@pytest.fixture(scope="module")
def scored_gallery(tmp_path_factory) -> Path:
    """Two photos with boxes of known scores: chelsea a cat 0.9 and a mat 0.2, coffee a cat 0.6."""
    tmp = tmp_path_factory.mktemp("scored")
    rows = []
    for name, entities in [("chelsea.png", [("a cat", 0.9), ("a mat", 0.2)]), ("coffee.png", [("a cat", 0.6)])]:
        shutil.copy(EXAMPLES / name, tmp / name)
        rows.append({"id": name, "source": str(tmp / name), "width": 400, "height": 300, "prompt": "p",
                     "caption": " and ".join(p for p, _ in entities), "token_ids": [1], "error": None, "entities": [
                         {"phrase": p, "start": k * 10, "end": k * 10 + len(p), "score": s,
                          "boxes": [{"x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": s}]}
                         for k, (p, s) in enumerate(entities)]})
    out = write_rows(tmp / "out", rows)
    build(GalleryConfig(output=OutputConfig(dir=str(out))))
    return out / "_gallery"


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (.ci/run installs it)")
def test_boxes_show_their_scores_and_the_threshold_hides_doubtful_ones(scored_gallery, tmp_path):
    url = scored_gallery.joinpath("index.html").as_uri()
    dom, log = chromium(url, tmp_path, "--dump-dom")
    assert not [line for line in log.splitlines() if ":CONSOLE" in line], log
    assert dom.count('class="box"') == 3
    assert "a cat 0.90" in dom and "a mat 0.20" in dom and "a cat 0.60" in dom
    assert 'left: 10%; top: 20%; width: 40%; height: 40%' in dom  # drawn where the box is, over the photo

    dom, _ = chromium(url + "?score=0.5", tmp_path, "--dump-dom")
    assert dom.count('class="box"') == 2 and "a mat 0.20" not in dom
    assert dom.count('class="entity below"') == 1  # "a mat" in the caption: all its boxes are hidden
    assert 'id="score" type="number" min="0" max="1" step="0.05" value="0"' in dom  # the control...
    dom, _ = chromium(url + "?phrase=a%20cat&score=0.7", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 1 and "chelsea.png" in dom and "scoring" in dom
    dom, _ = chromium(url + "?phrase=a%20mat&score=0.5", tmp_path, "--dump-dom")
    assert dom.count('class="card"') == 0
