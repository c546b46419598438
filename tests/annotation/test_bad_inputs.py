"""Broken and odd inputs in one run: every bad item is a row with an error, every good one is annotated."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.annotation.decode import decode
from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.records import Item
from tests.helpers import EXAMPLES, REPO, config, entity_view, expected

GUARDS = InputConfig(path="photos")
CORPUS = REPO / "tests" / "data" / "pillow_corpus"
OUTCOMES = json.loads((CORPUS / "pillow_outcomes.json").read_text())["files"]


def odd_files(root: Path) -> dict[str, str | None]:
    """Files written here, with the error kind each must give (None: annotated normally)."""
    made = {}

    def save(name, image, kind=None, **kw):
        image.save(root / name, **kw)
        made[name] = kind

    coffee = Image.open(EXAMPLES / "coffee.png").convert("RGB").resize((64, 48))
    save("gray16.png", Image.fromarray(np.asarray(coffee.convert("L"), np.uint16) * 257))
    save("palette_transparent.png", coffee.convert("P"), transparency=0)
    save("rgba.png", coffee.convert("RGBA"))
    save("one_pixel.png", Image.new("RGB", (1, 1)))
    save("wide_4000x3.png", Image.new("RGB", (4000, 3), (9, 9, 9)))
    save("UPPER CASE.JPG", coffee, format="JPEG")
    save("ünïcödé 猫.webp", coffee, format="WEBP")
    frames = [coffee, coffee.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    frames[0].save(root / "animated.gif", save_all=True, append_images=frames[1:])
    made["animated.gif"] = None
    frames[0].save(root / "pages.tiff", save_all=True, append_images=frames[1:])
    made["pages.tiff"] = None
    shutil.copy(EXAMPLES / "chelsea.png", root / "chelsea.png")  # the trained model knows this one
    made["chelsea.png"] = None

    (root / "zero_bytes.jpg").write_bytes(b"")
    made["zero_bytes.jpg"] = "not an image"
    (root / "text.jpg").write_text("this is a text file with a .jpg name\n")
    made["text.jpg"] = "not an image"
    (root / "random.png").write_bytes(np.random.default_rng(0).bytes(4096))
    made["random.png"] = "not an image"
    half = (EXAMPLES / "coffee.png").read_bytes()
    (root / "truncated.png").write_bytes(half[: len(half) // 3])
    made["truncated.png"] = "cannot decode image"
    big = io.BytesIO()
    Image.new("1", (12000, 10000)).save(big, "PNG")  # 120 Mpx, a few kB: over the 100 Mpx guard
    (root / "bomb.png").write_bytes(big.getvalue())
    made["bomb.png"] = "too many pixels"
    return made


@pytest.fixture(scope="module")
def bad_run(trained_checkpoint, trained_export, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    for name in OUTCOMES:
        shutil.copy(CORPUS / name, root / name)
    made = odd_files(root)
    out = tmp_path_factory.mktemp("labels")
    summary = run(config(trained_checkpoint, trained_export, InputConfig(path=str(root)), out), out)
    return summary, {r["id"]: r for r in pq.read_table(out).to_pylist()}, made


def test_every_file_is_one_row(bad_run):
    summary, rows, made = bad_run
    assert set(rows) == set(OUTCOMES) | set(made)
    assert summary.items == len(rows)


def test_pillow_corpus_outcomes(bad_run):
    """Pillow's recorded outcome for each file: decodes at its transposed size, or fails as an error row."""
    _, rows, _ = bad_run
    for name, want in OUTCOMES.items():
        row = rows[name]
        if want["decodes"]:
            assert row["error"] is None, (name, row["error"])
            assert [row["width"], row["height"]] == want["size"], name
            assert row["token_ids"] and row["caption"]
        else:
            assert row["error"], name
            assert row["caption"] is None and row["entities"] is None and row["width"] is None


def test_odd_but_valid_and_broken_files(bad_run, processor):
    _, rows, made = bad_run
    for name, kind in made.items():
        if kind is None:
            assert rows[name]["error"] is None, (name, rows[name]["error"])
        else:
            assert rows[name]["error"].startswith(kind + ":"), (name, rows[name]["error"])
    assert (rows["wide_4000x3.png"]["width"], rows["wide_4000x3.png"]["height"]) == (4000, 3)
    assert "(empty file)" in rows["zero_bytes.jpg"]["error"]
    assert entity_view(rows["chelsea.png"]) == expected(processor, "chelsea.png")[1]  # good rows intact


def test_summary_counts_errors_by_kind(bad_run):
    summary, rows, _ = bad_run
    assert summary.errors == sum(r["error"] is not None for r in rows.values()) == 8 + 5
    assert summary.errors_by_kind == {"cannot decode image": 6, "not an image": 4, "too many pixels": 3}


def test_sixteen_bit_grey_is_scaled_not_clipped():
    gray = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    decoded = decode(Item(id="x", source="m", data=buf.getvalue()), lambda im: None, GUARDS)
    values = np.asarray(decoded.image)[..., 0]
    assert values.min() == 0 and values.max() == 255 and 100 < values.mean() < 155


def test_permission_denied_is_an_item_error(monkeypatch):
    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr("pipeline.storage.files.read_bytes", refuse)
    decoded = decode(Item(id="x", source="/secret.jpg", path="/secret.jpg"), lambda im: None, GUARDS)
    assert decoded.error == "permission denied: /secret.jpg"


def test_manifest_nulls_and_missing_files(trained_checkpoint, trained_export, tmp_path):
    good = (EXAMPLES / "rocket.jpg").read_bytes()
    paths = ["nope.jpg", None, str(EXAMPLES / "coffee.png"), "nosuchscheme://host/a.jpg"]
    pq.write_table(pa.table({"path": paths}), tmp_path / "paths.parquet")
    pq.write_table(pa.table({"image": pa.array([good, None, b""], pa.binary())}), tmp_path / "bytes.parquet")
    for manifest, column, want in [
        ("paths.parquet", "path", ["file not found", "null image", None, "bad location"]),
        ("bytes.parquet", "image", [None, "null image", "not an image"]),
    ]:
        out = tmp_path / manifest.split(".")[0]
        cfg = config(
            trained_checkpoint,
            trained_export,
            InputConfig(kind="parquet", path=str(tmp_path / manifest), image_column=column),
            out,
        )
        run(cfg, out)
        errors = [r["error"] for r in pq.read_table(out).to_pylist()]
        assert [e.split(":")[0] if e else None for e in errors] == want
