"""Item -> RGB image -> pixel values, run in threads ahead of the engine.

Decoding follows what a user of the Kosmos-2 processor would do (EXIF orientation applied, then
`convert("RGB")`), with guards before any pixel is allocated: the file's size, and the pixel count read
off the header. Only the raster formats the README lists are opened (`Image.open(formats=...)`), so
PostScript named `.jpg` never reaches Ghostscript. Reading and decoding are told apart: a read that
fails in passing is tried again and then is an `io error`, which a rerun retries; bytes that do not
decode are the image's fault. Pixel values come from the export's own image settings
(model/processor.py, equal to transformers'). Any failure here is data: it becomes the item's error.
"""

from __future__ import annotations

import io
import queue
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps

from pipeline.config import InputConfig
from pipeline.errors import ConfigError, InputError
from pipeline.hardware import cores
from pipeline.records import Item, printable
from pipeline.storage import files

T = TypeVar("T")
R = TypeVar("R")

# What Image.open may take: the raster formats of input.extensions (JPEG includes a phone's MPO).
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
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


def check_extensions(cfg: InputConfig) -> None:
    """input.extensions may name only formats opened here: a folder's `.svg` or `.heic` files would be
    walked, then fail one row at a time."""
    known = Image.registered_extensions()
    refused = [e for e in cfg.extensions if known.get("." + e.lower().lstrip(".")) not in (*RASTER_FORMATS, "MPO")]
    if refused:
        readable = sorted(e.lstrip(".") for e, f in known.items() if f in (*RASTER_FORMATS, "MPO"))
        raise ConfigError(
            f"input.extensions holds {', '.join(refused)}, which this tool does not read; "
            f"it reads {', '.join(readable)}"
        )


class TooManyPixels(ValueError):
    pass


class ReadFailed(OSError):
    """A read that kept failing in passing: the row is an `io error`, which a rerun tries again."""


def read(item: Item, cfg: InputConfig) -> bytes | Image.Image:
    """The item's bytes (or image): in hand, or read whole (tried again after a passing fault), never
    more than input.max_image_bytes."""
    if item.image is not None:
        return item.image
    if item.data is not None:
        return item.data
    try:
        return files.retried(lambda: files.read_bytes(item.path, cfg.max_image_bytes), cfg, f"reading {item.path}")
    except (FileNotFoundError, PermissionError, IsADirectoryError, files.NotRegular):
        raise
    except OSError as e:
        raise ReadFailed(f"{type(e).__name__}: {e}") from None


def open_rgb(data: bytes | Image.Image, max_pixels: int) -> Image.Image:
    """The image in `data` (bytes, or an image in memory, which is left as it is), EXIF-oriented, RGB;
    first frame of animations and multi-page files. Each step lets go of the one before (turned in
    place, converted only if it is not RGB), so that a large image is held once or twice, never three
    times."""
    im = data.copy() if isinstance(data, Image.Image) else Image.open(io.BytesIO(data), formats=RASTER_FORMATS)
    try:
        width, height = im.size
        if width * height > max_pixels:
            raise TooManyPixels(
                f"too many pixels: {width}x{height} = {width * height / 1e6:.0f} Mpx, over input.max_image_pixels="
                f"{max_pixels} (raise it if the image is genuine)"
            )
        im.load()
        ImageOps.exif_transpose(im, in_place=True)  # first: the 8-bit copy below has no EXIF
        if im.mode.startswith("I;16") or im.mode == "I":
            im = _replaced(im, to_8bit(im))
        return im if im.mode == "RGB" else _replaced(im, im.convert("RGB"))
    except BaseException:
        im.close()
        raise


def _replaced(old: Image.Image, new: Image.Image) -> Image.Image:
    old.close()
    return new


CHUNK_ROWS = 256


def to_8bit(im: Image.Image) -> Image.Image:
    """16- and 32-bit grey scaled into 8 bits, a band of rows at a time (Pillow's convert would clip
    everything over 255 to white; a float copy of a whole 48 Mpx image would take 400 MB). 16 bits:
    round(v * 255 / 65535), which is (v + 128) // 257 exactly; 32 bits: scaled to the image's maximum."""
    values = np.asarray(im)
    out = np.empty(values.shape, np.uint8)
    sixteen = im.mode.startswith("I;16")
    top = 65535.0 if sixteen else max(float(values.max()), 1.0)
    for r in range(0, values.shape[0], CHUNK_ROWS):
        band = values[r : r + CHUNK_ROWS]
        if sixteen:
            out[r : r + CHUNK_ROWS] = (band.astype(np.uint32) + 128) // 257
        else:
            out[r : r + CHUNK_ROWS] = np.clip(band * (255.0 / top), 0, 255).round()
    return Image.fromarray(out, mode="L")


def decode(item: Item, preprocess: Callable[[Image.Image], np.ndarray], cfg: InputConfig) -> Decoded:
    if item.error:
        return Decoded(item)
    where = printable(item.path) if item.path else item.source
    try:
        data = read(item, cfg)
        image = open_rgb(data, cfg.max_image_pixels)
        return Decoded(item, image, preprocess(image), *image.size)
    except TooManyPixels as e:
        item.error = str(e)
    except files.TooLarge as e:
        item.error = (
            f"too large: {e.args[0]} bytes, over input.max_image_bytes={cfg.max_image_bytes} "
            "(raise it if the image is genuine)"
        )
    except FileNotFoundError:
        item.error = f"file not found: {where}"
    except PermissionError:
        item.error = f"permission denied: {where}"
    except IsADirectoryError:
        item.error = f"not a file: {where}"
    except files.NotRegular:
        item.error = f"not a file: {where} is not a regular file (a FIFO, a socket or a device)"
    except ConfigError as e:  # a manifest's URI with credentials in it, or a scheme nothing here reads
        item.error = f"bad location: {e}"
    except ReadFailed as e:
        item.error = f"io error: reading {where} failed {cfg.read_retries + 1} times ({e}); a rerun tries again"
    except Image.UnidentifiedImageError:
        empty = " (empty file)" if not data else ""
        item.error = f"not an image: not one of {', '.join(RASTER_FORMATS)}, or a corrupt header{empty}"
    except Exception as e:  # truncated data, bad tables, decoder errors: all the image's fault
        item.error = f"cannot decode image: {type(e).__name__}: {e}"
    return Decoded(item)


def timed_out(item: Item, seconds: float) -> Decoded:
    """The row of an item whose reading or decoding did not end in time (a stalled mount, say)."""
    item.error = f"timeout: reading and decoding took over input.decode_timeout={seconds:g} s; a rerun tries again"
    return Decoded(item)


def default_threads() -> int:
    return max(2, min(8, cores()))


STALLED = 8


def ordered_map(
    fn: Callable[[T], R],
    items: Iterable[T],
    threads: int,
    ahead: int,
    timeout: float | None = None,
    on_timeout: Callable[[T], R] | None = None,
) -> Iterator[R]:
    """`map(fn, items)` on `threads` threads, in order, with at most `ahead` results waiting. The window
    opens from `threads` items by one per result taken, so the first items are not slowed down by
    the reading of those behind them (docs/performance/defaults.md, "Start-up").

    A call still running `timeout` seconds after it started gives `on_timeout(item)` instead; its
    thread is left to it (a daemon, so it never holds the process up) and another takes its place.
    STALLED calls in a row that time out end the map with InputError: the storage itself is stuck,
    and every further item would only wait its timeout and leave one more thread behind."""
    tasks: queue.SimpleQueue = queue.SimpleQueue()
    workers: list[threading.Thread] = []
    stuck = [0]  # calls in a row that timed out

    def work() -> None:
        while (task := tasks.get()) is not None:
            item, future, started = task
            if future.set_running_or_notify_cancel():
                started.append(time.monotonic())
                try:
                    future.set_result(fn(item))
                except BaseException as e:  # noqa: BLE001 - given to the caller's thread
                    future.set_exception(e)

    def hire() -> None:
        worker = threading.Thread(target=work, name=f"kosmos-decode-{len(workers)}", daemon=True)
        workers.append(worker)
        worker.start()

    def result(task) -> R:
        item, future, started = task
        while timeout is not None:
            try:
                done = future.result(timeout=1.0 if not started else max(0.0, started[0] + timeout - time.monotonic()))
                stuck[0] = 0
                return done
            except FutureTimeout:
                if started and time.monotonic() - started[0] >= timeout:
                    stuck[0] += 1
                    if stuck[0] >= STALLED:
                        raise InputError(
                            f"{STALLED} items in a row took over input.decode_timeout={timeout:g} s to read and "
                            "decode: the input's storage seems stalled; check it, then rerun (the rows done are "
                            "committed and the timed-out ones are tried again)"
                        ) from None
                    hire()  # the stuck thread stays where it is
                    return on_timeout(item)
        return future.result()

    for _ in range(threads):
        hire()
    pending: deque = deque()
    taken = 0
    try:
        for item in items:
            task = (item, Future(), [])
            tasks.put(task)
            pending.append(task)
            if len(pending) >= min(ahead, threads + taken):
                yield result(pending.popleft())
                taken += 1
        while pending:
            yield result(pending.popleft())
    finally:
        for _, future, _ in pending:
            future.cancel()
        for _ in workers:
            tasks.put(None)
