"""Item -> RGB image -> pixel values, run in threads ahead of the engine.

Decoding follows what a user of the Kosmos-2 processor would do (EXIF orientation applied, then
`convert("RGB")`), with a pixel-count guard checked on the header, before any pixel is allocated.
Pixel values come from the export's own image settings (model/processor.py, equal to transformers').
Any failure here is data: it becomes the item's error, never an exception.
"""

from __future__ import annotations

import io
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from pipeline.hardware import cores
from pipeline.records import Item
from pipeline.storage import files

T = TypeVar("T")
R = TypeVar("R")

# Our own guard (input.max_image_pixels) runs first and says more; Pillow's would only warn or raise later.
Image.MAX_IMAGE_PIXELS = None
# Pillow's warnings about odd files (bad EXIF, invalid APNG) describe the item, not the run: quiet them.
warnings.filterwarnings("ignore", category=UserWarning, module="PIL")


@dataclass
class Decoded:
    item: Item
    image: Image.Image | None = None  # RGB, EXIF-oriented (callers may drop or shrink it)
    pixel_values: np.ndarray | None = None  # float32 [3, 224, 224]
    width: int | None = None  # after EXIF orientation
    height: int | None = None

    @property
    def error(self) -> str | None:
        return self.item.error


def open_rgb(item: Item, max_pixels: int) -> Image.Image:
    """The item's image, EXIF-oriented, RGB; first frame of animations and multi-page files."""
    if item.data is not None:
        source = io.BytesIO(item.data)
    else:
        source = io.BytesIO(files.read_bytes(item.path)) if files.is_remote(item.path) else item.path
    with Image.open(source) as im:
        width, height = im.size
        if width * height > max_pixels:
            raise TooLarge(
                f"too many pixels: {width}x{height} = {width * height / 1e6:.0f} Mpx, over input.max_image_pixels="
                f"{max_pixels} (raise it if the image is genuine)"
            )
        im.load()
        im = ImageOps.exif_transpose(im)
        if im.mode.startswith("I;16") or im.mode == "I":
            im = _to_8bit(im)
        return im.convert("RGB")


class TooLarge(ValueError):
    pass


def _to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled into 8 bits (Pillow's convert would clip everything over 255 to white)."""
    values = np.asarray(im, dtype=np.float64)
    top = 65535.0 if im.mode.startswith("I;16") else max(float(values.max()), 1.0)
    return Image.fromarray(np.clip(values * (255.0 / top), 0, 255).round().astype(np.uint8), mode="L")


def decode(item: Item, preprocess: Callable[[Image.Image], np.ndarray], max_pixels: int) -> Decoded:
    if item.error:
        return Decoded(item)
    try:
        image = open_rgb(item, max_pixels)
        return Decoded(item, image, preprocess(image), *image.size)
    except TooLarge as e:
        item.error = str(e)
    except FileNotFoundError:
        item.error = f"file not found: {item.path}"
    except PermissionError:
        item.error = f"permission denied: {item.path}"
    except IsADirectoryError:
        item.error = f"not a file: {item.path}"
    except Image.UnidentifiedImageError:
        item.error = "not an image: unknown format or corrupt header" + (" (empty file)" if _empty(item) else "")
    except Exception as e:  # truncated data, bad tables, decoder errors: all the image's fault
        item.error = f"cannot decode image: {type(e).__name__}: {e}"
    return Decoded(item)


def _empty(item: Item) -> bool:
    if item.data is not None:
        return len(item.data) == 0
    try:
        fs, path = files.filesystem(item.path)
        return fs.get_file_info(path).size == 0
    except OSError:
        return False


def default_threads() -> int:
    return max(2, min(8, cores()))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int, ahead: int) -> Iterator[R]:
    """`map(fn, items)` on a thread pool, in order, with at most `ahead` results waiting. The window
    opens from `threads` items by one per result taken, so the first items are not slowed down by
    the reading of those behind them (docs/performance.md, "Start-up")."""
    with ThreadPoolExecutor(threads, thread_name_prefix="kosmos-decode") as pool:
        pending: deque = deque()
        taken = 0
        try:
            for item in items:
                pending.append(pool.submit(fn, item))
                if len(pending) >= min(ahead, threads + taken):
                    yield pending.popleft().result()
                    taken += 1
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()
