"""The gallery: pages, thumbnails, the index of phrases; its page in a browser: tests/e2e/test_gallery_browser.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import GalleryConfig, build
from pipeline.errors import ConfigError
from pipeline.outputs.gallery import write_gallery
from tests.helpers import gallery_of, write_rows


@pytest.fixture(scope="module")
def gallery(trained_checkpoint, trained_export, tmp_path_factory) -> Path:
    return gallery_of(trained_checkpoint, trained_export, tmp_path_factory)


def test_files(gallery):
    index = json.loads((gallery / "index.js").read_text().removeprefix("const GALLERY = ").rstrip(";\n"))
    assert index["pages"] == 2 and index["rows"] == 7
    assert index["phrases"]["a cat"] == [0]
    assert len(list((gallery / "thumbs").iterdir())) == 6  # every image but the broken one
    assert all(max(Image.open(t).size) <= 320 for t in (gallery / "thumbs").iterdir())


def test_needs_an_output_folder(tmp_path):
    with pytest.raises(ConfigError, match="holds no part files"):
        write_gallery(build(GalleryConfig, {"output.dir": str(tmp_path)}))


def test_thumbnails_of_phone_photos_are_upright(tmp_path):
    """The thumbnail is the source image turned by its EXIF orientation, since boxes (drawn by the
    page in fractions of the image) refer to the upright image."""
    photo = Image.new("RGB", (120, 80), (0, 0, 0))  # stored landscape, shown portrait (orientation 6)
    photo.paste((255, 255, 255), (0, 0, 30, 80))  # the stored left edge: the top once turned
    exif = Image.Exif()
    exif[0x0112] = 6
    photo.save(tmp_path / "phone.jpg", exif=exif)
    box = {"x1": 0.0, "y1": 0.0, "x2": 0.5, "y2": 0.25, "score": 0.5}
    row = {
        "id": "phone.jpg",
        "source": str(tmp_path / "phone.jpg"),
        "width": 80,
        "height": 120,
        "prompt": "p",
        "caption": "a box",
        "token_ids": [1],
        "error": None,
        "entities": [{"phrase": "a box", "start": 0, "end": 5, "score": 0.5, "boxes": [box]}],
    }
    out = write_rows(tmp_path / "out", [row])
    write_gallery(build(GalleryConfig, {"output.dir": str(out)}))
    (thumb,) = (out / "_gallery" / "thumbs").iterdir()
    image = np.asarray(Image.open(thumb).convert("L"), dtype=int)
    assert image.shape[0] > image.shape[1]  # portrait
    assert (
        image[: image.shape[0] // 4].mean() > 200 and image[image.shape[0] // 2 :].mean() < 30
    )  # the white band on top


def test_a_huge_source_image_is_left_without_a_thumbnail(tmp_path):
    """200 Mpx in a few kB: before, Pillow's DecompressionBombError ended the gallery."""
    Image.new("1", (20000, 10000)).save(tmp_path / "huge.png")
    row = {"id": "huge.png", "source": str(tmp_path / "huge.png"), "width": 20000, "height": 10000, "prompt": "p",
           "caption": "x", "token_ids": [1], "error": None, "entities": []}  # fmt: skip
    out = write_rows(tmp_path / "out", [row])
    assert write_gallery(build(GalleryConfig, {"output.dir": str(out)}))["rows"] == 1
    thumbs = out / "_gallery" / "thumbs"
    assert not thumbs.exists() or not any(thumbs.iterdir())


def test_the_overview_counts_each_plot_and_gives_each_row_its_facets():
    from pipeline.outputs.overview import Overview

    box = {"x1": 0.0, "y1": 0.0, "x2": 0.5, "y2": 0.5, "score": 0.95}
    row = {
        "error": None,
        "entities": [{"phrase": "two dogs", "score": 0.42, "boxes": [box, {**box, "score": 0.15}]}],
        "caption_logprob": -0.7,
        "token_ids": [1, 2],
    }
    overview = Overview()
    facets = overview.add(row, ["dog"], page=3)
    assert facets == sorted(
        ["class=dog", "box score=0.9-1.0", "box score=0.1-0.2", "entity score=0.4-0.5", "box size=0.5-0.6",
         "caption score=0.7-0.8"]
    )  # fmt: skip
    assert overview.add({"error": "not an image: x.jpg is text", "entities": []}, [], page=4) == ["error=not an image"]
    plots = {p["title"].split(" (")[0]: p["bars"] for p in overview.plots()}
    assert plots["Boxes per class"] == [{"label": "dog", "count": 2, "facet": "class=dog"}]
    assert [b["count"] for b in plots["Box scores"]] == [0, 1, 0, 0, 0, 0, 0, 0, 0, 1]
    assert plots["Errors by kind"] == [{"label": "not an image", "count": 1, "facet": "error=not an image"}]
    assert overview.facet_pages()["class=dog"] == [3] and overview.facet_pages()["error=not an image"] == [4]
