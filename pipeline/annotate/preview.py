"""A JPEG per item with each entity's boxes and phrase drawn on the image (OpenCV).

Colours are distinct per entity; labels stay inside the image and are moved down past labels
already placed when they would overlap. File names derive from the id but cannot leave the
previews folder, whatever the id holds.
"""

from __future__ import annotations

import colorsys
import hashlib
import re

import cv2
import numpy as np
from PIL import Image

from pipeline.records import Entity
from pipeline.storage.files import Folder

FONT = cv2.FONT_HERSHEY_SIMPLEX


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours (BGR): golden-ratio steps around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(b * 255), int(g * 255), int(r * 255)


def preview_name(item_id: str) -> str:
    """A flat, safe file name for an id: readable part plus a hash so that different ids never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[-80:] or "item"
    digest = hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}.jpg"


def draw(image: Image.Image, entities: list[Entity], max_side: int) -> np.ndarray:
    """BGR array of the image, scaled to fit `max_side`, with boxes and labels."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = cv2.cvtColor(np.asarray(image.resize(size, Image.BILINEAR) if scale < 1 else image), cv2.COLOR_RGB2BGR)
    h, w = canvas.shape[:2]
    font_scale = max(0.35, min(w, h) / 900)
    thickness = max(1, round(min(w, h) / 300))
    placed: list[tuple[int, int, int, int]] = []
    for i, entity in enumerate(entities):
        bgr = colour(i)
        for x1, y1, x2, y2 in entity.boxes:
            p1 = (int(round(min(x1, x2) * (w - 1))), int(round(min(y1, y2) * (h - 1))))
            p2 = (int(round(max(x1, x2) * (w - 1))), int(round(max(y1, y2) * (h - 1))))
            cv2.rectangle(canvas, p1, p2, bgr, thickness)
            _label(canvas, entity.phrase, p1, bgr, font_scale, placed)
    return canvas


def _label(canvas, text: str, anchor: tuple[int, int], bgr, font_scale: float, placed: list) -> None:
    h, w = canvas.shape[:2]
    (tw, th), base = cv2.getTextSize(text, FONT, font_scale, 1)
    bw, bh = min(tw + 6, w), th + base + 4
    x = min(max(0, anchor[0]), w - bw)
    y = anchor[1] - bh if anchor[1] - bh >= 0 else anchor[1]  # above the box if there is room
    y = min(max(0, y), max(0, h - bh))
    for _ in range(len(placed) + 1):  # step past overlapping labels, staying inside the image
        clash = next((r for r in placed if x < r[2] and r[0] < x + bw and y < r[3] and r[1] < y + bh), None)
        if clash is None:
            break
        y = clash[3] if clash[3] + bh <= h else max(0, clash[1] - bh)
    placed.append((x, y, x + bw, y + bh))
    cv2.rectangle(canvas, (x, y), (x + bw, y + bh), bgr, -1)
    luminance = 0.114 * bgr[0] + 0.587 * bgr[1] + 0.299 * bgr[2]
    ink = (0, 0, 0) if luminance > 140 else (255, 255, 255)
    cv2.putText(canvas, text, (x + 3, y + th + 2), FONT, font_scale, ink, 1, cv2.LINE_AA)


def write_preview(
    folder: Folder, item_id: str, image: Image.Image, entities: list[Entity], max_side: int, quality: int
) -> str:
    """Written whole (files.Folder.write), so a preview is never half a JPEG; returns its name."""
    ok, buf = cv2.imencode(".jpg", draw(image, entities, max_side), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode the preview of {item_id!r}")
    name = preview_name(item_id)
    folder.write(name, buf.tobytes())
    return name
