"""Decoding and preprocessing: the saved image processor's pixel values, EXIF, modes, the pixel guard."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

from pipeline.annotation.decode import decode, ordered_map
from pipeline.config import InputConfig
from pipeline.model.processor import Processor
from pipeline.records import Item
from tests.helpers import EXAMPLES

GUARD = InputConfig(path="photos")


def item_of(image: Image.Image, fmt: str = "PNG", **save) -> Item:
    buf = io.BytesIO()
    image.save(buf, fmt, **save)
    return Item(id="x", source="mem", data=buf.getvalue())


@pytest.fixture(scope="module")
def preprocess(random_export):
    return Processor(random_export).pixel_values


def test_pixel_values_equal_the_saved_processor(preprocess, random_export):
    from transformers import AutoProcessor

    saved = AutoProcessor.from_pretrained(random_export).image_processor
    for path in sorted(EXAMPLES.glob("*.*g")):
        decoded = decode(Item(id=path.name, source=str(path), path=str(path)), preprocess, GUARD)
        want = saved(Image.open(path).convert("RGB"), return_tensors="np")["pixel_values"][0]
        assert decoded.pixel_values.dtype == np.float32 and decoded.pixel_values.shape == (3, 224, 224)
        np.testing.assert_array_equal(decoded.pixel_values, want)


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "I;16", "CMYK", "1"])
def test_any_mode_becomes_rgb(preprocess, mode):
    base = Image.open(EXAMPLES / "coffee.png").convert("RGB").resize((50, 40))
    image = base.convert(mode) if mode != "I;16" else Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257)
    fmt = "JPEG" if mode == "CMYK" else ("TIFF" if mode == "1" else "PNG")
    decoded = decode(item_of(image, fmt), preprocess, GUARD)
    assert decoded.error is None
    assert decoded.image.mode == "RGB" and (decoded.width, decoded.height) == (50, 40)


def test_exif_orientation_is_applied(preprocess):
    image = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((60, 30))
    exif = Image.Exif()
    exif[0x0112] = 8
    decoded = decode(item_of(image, "JPEG", exif=exif), preprocess, GUARD)
    assert (decoded.width, decoded.height) == (30, 60)
    stored = Image.open(io.BytesIO(item_of(image, "JPEG", exif=exif).data))
    np.testing.assert_array_equal(np.asarray(decoded.image), np.asarray(ImageOps.exif_transpose(stored).convert("RGB")))


def test_exif_orientation_of_a_16_bit_image_is_applied(preprocess):
    """A 16-bit scan with an orientation tag came out unturned: the 8-bit copy had lost its EXIF."""
    grey = np.asarray(Image.open(EXAMPLES / "rocket.jpg").convert("L").resize((60, 30)), np.uint16) * 257
    exif = Image.Exif()
    exif[0x0112] = 8
    decoded = decode(item_of(Image.fromarray(grey), "PNG", exif=exif), preprocess, GUARD)
    assert (decoded.width, decoded.height) == (30, 60)
    np.testing.assert_array_equal(np.asarray(decoded.image)[..., 0], np.rot90(grey // 257))


def test_pixel_guard_refuses_before_decoding(preprocess):
    big = Image.new("RGB", (4000, 3000))
    decoded = decode(item_of(big), preprocess, InputConfig(path="photos", max_image_pixels=10_000_000))
    assert decoded.error.startswith("too many pixels: 4000x3000 = 12 Mpx, over input.max_image_pixels=10000000")
    assert decoded.pixel_values is None


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "not an image"),
        (b"hello, I am text", "not an image"),
        (np.random.default_rng(0).bytes(5000), "not an image"),
    ],
)
def test_bad_bytes_are_item_errors(preprocess, data, message):
    decoded = decode(Item(id="x", source="mem", data=data), preprocess, GUARD)
    assert message in decoded.error and decoded.pixel_values is None


def test_truncated_image_is_an_error_not_a_partial_label(preprocess):
    data = (EXAMPLES / "rocket.jpg").read_bytes()
    decoded = decode(Item(id="x", source="mem", data=data[: len(data) // 2]), preprocess, GUARD)
    assert decoded.error.startswith("cannot decode image")


def test_missing_file(preprocess, tmp_path):
    decoded = decode(Item(id="x", source="p", path=str(tmp_path / "nope.jpg")), preprocess, GUARD)
    assert decoded.error == f"file not found: {tmp_path / 'nope.jpg'}"


def test_ordered_map_keeps_order_and_bounds_lookahead():
    started = []

    def slow(i):
        started.append(i)
        return i * i

    it = ordered_map(slow, range(100), threads=4, ahead=5)
    assert next(it) == 0
    assert len(started) <= 6
    assert list(it) == [i * i for i in range(1, 100)]


def test_ordered_map_opens_its_window_as_results_are_taken():
    """The first result does not wait behind `ahead` items being read: `threads` are read first, then
    one more per result taken, up to `ahead`."""
    submitted = []

    def items():
        for i in range(100):
            submitted.append(i)
            yield i

    it = ordered_map(lambda i: i, items(), threads=2, ahead=32)
    assert next(it) == 0 and len(submitted) == 2
    assert next(it) == 1 and len(submitted) == 4
    for _ in range(40):
        next(it)
    assert len(submitted) == 42 + 31  # `ahead` wide: 31 read and waiting after a result is taken
    assert list(it) == list(range(42, 100))


def test_ordered_map_gives_up_on_a_stalled_storage():
    """A mount that stops answering: each item waited its timeout and left a thread behind, for ever.
    A few timeouts pass as rows; STALLED in a row end the run, naming the setting."""
    import threading

    from pipeline.annotation.decode import STALLED
    from pipeline.errors import InputError

    stalled = threading.Event()

    def read(i):
        if i in (1, 3) or i >= 5:
            stalled.wait()
        return i

    it = ordered_map(read, range(100), threads=2, ahead=4, timeout=0.1, on_timeout=lambda i: -i)
    try:
        assert [next(it) for _ in range(5)] == [0, -1, 2, -3, 4]  # single timeouts are rows
        with pytest.raises(InputError, match=rf"{STALLED} items in a row took over input.decode_timeout=0.1 s"):
            for _ in range(STALLED):
                assert next(it) < 0
    finally:
        stalled.set()
