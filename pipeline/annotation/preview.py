"""A JPEG per item with each entity's boxes and phrase drawn on the image (Pillow's ImageDraw).

Colours are distinct per entity; labels stay inside the image and are moved down past labels
already placed when they would overlap. File names derive from the id but cannot leave the
previews folder, whatever the id holds.
"""

from __future__ import annotations

import colorsys
import hashlib
import io
import re
from functools import cache

from PIL import Image, ImageDraw, ImageFont

from pipeline.records import Entity
from pipeline.storage.files import Folder


def colour(index: int) -> tuple[int, int, int]:
    """Distinct, saturated colours (RGB): golden-ratio steps around the hue circle."""
    r, g, b = colorsys.hsv_to_rgb((index * 0.618033988749895) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def preview_name(item_id: str) -> str:
    """A flat, safe file name for an id: readable part plus a hash so that different ids never collide."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", item_id).strip("._")[-80:] or "item"
    digest = hashlib.sha1(item_id.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{readable}-{digest}.jpg"


@cache
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # the font Pillow ships (Aileron): no file to find


def draw(image: Image.Image, entities: list[Entity], max_side: int) -> Image.Image:
    """The image (RGB), scaled to fit `max_side`, with boxes and labels."""
    scale = min(1.0, max_side / max(image.size))
    size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    canvas = image.convert("RGB").resize(size, Image.BILINEAR) if scale < 1 else image.convert("RGB")
    w, h = canvas.size
    font = _font(max(10, round(min(w, h) / 40)))
    thickness = max(1, round(min(w, h) / 300))
    pen = ImageDraw.Draw(canvas)
    placed: list[tuple[int, int, int, int]] = []
    for i, entity in enumerate(entities):
        rgb = colour(i)
        for x1, y1, x2, y2 in entity.boxes:
            p1 = (round(min(x1, x2) * (w - 1)), round(min(y1, y2) * (h - 1)))
            p2 = (round(max(x1, x2) * (w - 1)), round(max(y1, y2) * (h - 1)))
            pen.rectangle([p1, p2], outline=rgb, width=thickness)
            _label(pen, canvas.size, entity.phrase, p1, rgb, font, placed)
    return canvas


def _label(pen: ImageDraw.ImageDraw, size, text: str, anchor, rgb, font, placed: list) -> None:
    w, h = size
    left, top, right, bottom = pen.textbbox((0, 0), text, font=font)
    bw, bh = min(right - left + 6, w), bottom - top + 6
    x = min(max(0, anchor[0]), w - bw)
    y = anchor[1] - bh if anchor[1] - bh >= 0 else anchor[1]  # above the box if there is room
    y = min(max(0, y), max(0, h - bh))
    for _ in range(len(placed) + 1):  # step past overlapping labels, staying inside the image
        clash = next((r for r in placed if x < r[2] and r[0] < x + bw and y < r[3] and r[1] < y + bh), None)
        if clash is None:
            break
        y = clash[3] if clash[3] + bh <= h else max(0, clash[1] - bh)
    placed.append((x, y, x + bw, y + bh))
    pen.rectangle([(x, y), (x + bw - 1, y + bh - 1)], fill=rgb)
    luminance = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]
    pen.text((x + 3 - left, y + 3 - top), text, font=font, fill=(0, 0, 0) if luminance > 140 else (255, 255, 255))


def write_preview(
    folder: Folder, item_id: str, image: Image.Image, entities: list[Entity], max_side: int, quality: int
) -> str:
    """Written whole (files.Folder.write), so a preview is never half a JPEG; returns its name."""
    buffer = io.BytesIO()
    draw(image, entities, max_side).save(buffer, "JPEG", quality=quality)
    name = preview_name(item_id)
    folder.write(name, buffer.getvalue())
    return name
