"""Previews: boxes drawn where they belong, labels inside the image, names that cannot escape."""

from __future__ import annotations

import numpy as np
from PIL import Image

from pipeline.annotation.preview import colour, draw, preview_name, write_preview
from pipeline.records import Entity
from pipeline.storage.files import Folder


def test_names_stay_flat_safe_and_distinct(tmp_path):
    ids = [
        "../../etc/passwd",
        "/abs/path.png",
        "a\x00b.png",
        "x" * 5000 + ".png",
        "photos/a.png",
        "photos_a.png",
        "",
        "ü/ñ.png",
    ]
    names = [preview_name(i) for i in ids]
    assert len(set(names)) == len(ids)
    for name in names:
        assert "/" not in name and "\x00" not in name and not name.startswith(".") and len(name) < 120
        assert (tmp_path / name).resolve().parent == tmp_path.resolve()


def test_boxes_and_labels_are_drawn_inside_the_image(tmp_path):
    image = Image.new("RGB", (400, 300), (128, 128, 128))
    entities = [
        Entity("a cat", 0, 5, [(0.1, 0.0, 0.5, 0.5)]),
        Entity("a very long phrase that is wider than the box", 0, 10, [(0.1, 0.0, 0.5, 0.5), (0.9, 0.9, 1.0, 1.0)]),
    ]
    canvas = np.asarray(draw(image, entities, max_side=200))
    assert canvas.shape == (150, 200, 3)
    assert (canvas != 128).any(axis=2).sum() > 500  # something was drawn
    assert tuple(int(v) for v in canvas[50, 20]) in (colour(0), colour(1))  # the left edge of the shared box

    name = write_preview(Folder(tmp_path / "_previews"), "../escape.png", image, entities, 768, 90)
    assert Image.open(tmp_path / "_previews" / name).size == (400, 300)
    assert [p.name for p in (tmp_path / "_previews").iterdir()] == [name]


def test_colours_are_distinct():
    assert len({colour(i) for i in range(12)}) == 12
