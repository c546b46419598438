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


def test_thumbnails_of_phone_photos_are_upright(tmp_path):
    """Without previews the gallery draws on the source image: turned by its EXIF orientation first,
    since boxes refer to the upright image."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.sink import SCHEMA

    photo = Image.new("RGB", (120, 80), (0, 0, 0))  # stored landscape, shown portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.jpg", exif=exif)
    box = {"x1": 0.0, "y1": 0.0, "x2": 0.5, "y2": 0.25}  # the top-left of the upright 80x120 image
    row = {"id": "phone.jpg", "source": str(tmp_path / "phone.jpg"), "width": 80, "height": 120, "prompt": "p",
           "caption": "a box", "token_ids": [1], "error": None,
           "entities": [{"phrase": "a box", "start": 0, "end": 5, "boxes": [box]}]}
    out = tmp_path / "out"
    out.mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), out / "part-00000-00000.parquet")
    build(GalleryConfig(output=OutputConfig(dir=str(out))))
    (thumb,) = (out / "_gallery" / "thumbs").iterdir()
    image = np.asarray(Image.open(thumb).convert("RGB"), dtype=int)
    assert image.shape[0] > image.shape[1]  # portrait
    rows, cols = np.nonzero(image.sum(axis=2) > 150)  # the box and its label, on black
    assert rows.mean() < image.shape[0] / 2 and cols.mean() < image.shape[1] / 2  # drawn at the top left
