"""`kosmos-gallery output.dir=labels/`: a static HTML page to look at an output folder.

Writes `labels/_gallery/index.html`, thumbnails (`thumbs/`), and the rows as JavaScript pages
(`pages/page-NNNNN.js`, loaded with <script> so the page works from file:// with no server). Rows are
read in record batches and a page is written as soon as it is full, so a large output never sits in
memory. Boxes are drawn by the page over the thumbnail, labelled with their phrase and score, so the
score threshold can hide the doubtful ones; each entity is highlighted in the caption in its box's
colour, and the phrase filter knows which pages hold each phrase. Above the grid, plots show the
dataset at a glance (overview.py), grouped by the classes of `kosmos-labels` (`classes=`, the same
rules); a click on a bar shows the images behind it. Filters and page live in the URL
(`?phrase=a%20cat&score=0.5&page=2`, `?facet=class%3Ddog`), so a view can be shared.
"""

from __future__ import annotations

import html
import json
import logging
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.annotation.decode import open_rgb
from pipeline.annotation.preview import colour, preview_name, write_preview
from pipeline.cli import command
from pipeline.config import GalleryConfig, InputConfig
from pipeline.errors import ConfigError
from pipeline.outputs.labels.classes import Classes
from pipeline.outputs.overview import Overview
from pipeline.records import columns
from pipeline.storage import layout
from pipeline.storage.files import Folder, is_remote, read_bytes, write_text

log = logging.getLogger("kosmos-gallery")
GUARDS = InputConfig()  # the default guards against huge images
PAGE = Path(__file__).with_name("gallery.html")  # the page; the rows come in as pages/*.js
COLUMNS = columns("id", "source", "width", "height", "caption", "entities", "error", "caption_logprob", "token_ids")


def check(cfg: GalleryConfig) -> None:
    cfg.validate()
    if is_remote(cfg.output.dir or ""):
        raise ConfigError(
            f"output.dir={cfg.output.dir!r}: the gallery is written into the output folder, which must "
            "be local; copy it here first (e.g. aws s3 sync <uri> labels/)"
        )
    layout.existing_output(cfg.output.dir)


def _hex(index: int) -> str:
    r, g, b = colour(index)
    return f"#{r:02x}{g:02x}{b:02x}"


def _thumbnail(folder: Path, row: dict, thumbs: Path, side: int) -> tuple[str | None, bool]:
    """(thumbnail, whether its boxes are drawn in): the source image, upright (boxes refer to the
    upright image), for the page to draw boxes on; else the run's preview, boxes drawn in; else none."""
    name = preview_name(row["id"])
    for source, drawn in ((Path(row["source"]), False), (folder / layout.PREVIEWS / name, True)):
        try:  # the decode guards at their defaults: raster formats, input.max_image_bytes, max_image_pixels
            image = open_rgb(read_bytes(source, GUARDS.max_image_bytes), GUARDS.max_image_pixels)
        except (OSError, ValueError):
            continue
        image.thumbnail((side, side))
        write_preview(Folder(thumbs), row["id"], image, [], side, 85)
        return f"thumbs/{name}", drawn
    return None, False


def _entity(entity: dict, index: int, name: str | None) -> dict:
    """An entity as the page draws it: span, class, colour, score, and boxes as [x1, y1, x2, y2, score]."""

    def rounded(v):
        return None if v is None else round(v, 4)

    boxes = [[rounded(b[k]) for k in ("x1", "y1", "x2", "y2")] + [rounded(b.get("score"))] for b in entity["boxes"]]
    return {
        "phrase": entity["phrase"],
        "class": name,
        "start": entity["start"],
        "end": entity["end"],
        "colour": _hex(index),
        "score": rounded(entity.get("score")),
        "boxes": boxes,
    }


def write_gallery(cfg: GalleryConfig) -> dict:
    check(cfg)
    folder = Path(cfg.output.dir).expanduser()
    out = folder / layout.GALLERY
    (out / "pages").mkdir(parents=True, exist_ok=True)
    page, pages, rows_seen, phrase_pages = [], 0, 0, {}
    classes = Classes.of_output(cfg.classes, layout.recorded_settings(Folder(folder)))
    overview = Overview()

    def flush():
        nonlocal page, pages
        if page:
            write_text(out / "pages" / f"page-{pages:05d}.js", f"galleryPage({pages}, {json.dumps(page)});\n")
            pages += 1
            page = []

    for part in layout.committed_parts(Folder(folder)):
        with pq.ParquetFile(folder / part) as f:
            for batch in f.iter_batches(columns=COLUMNS, batch_size=256):
                for row in batch.to_pylist():
                    names = [classes.of(e["phrase"])[0] for e in row["entities"] or []]
                    entities = [_entity(e, i, n) for i, (e, n) in enumerate(zip(row["entities"] or [], names))]
                    facets = overview.add(row, names, pages)
                    for e in entities:
                        phrase_pages.setdefault(e["phrase"].lower(), set()).add(pages)
                    thumb, drawn = (
                        (None, False)
                        if row["error"]
                        else _thumbnail(folder, row, out / "thumbs", cfg.gallery.thumb_side)
                    )
                    page.append(
                        {
                            "id": row["id"],
                            "caption": row["caption"],
                            "error": row["error"],
                            "size": [row["width"], row["height"]],
                            "entities": entities,
                            "thumb": thumb,
                            "drawn": drawn,
                            "facets": facets,
                        }
                    )
                    rows_seen += 1
                    if len(page) >= cfg.gallery.page_size:
                        flush()
    flush()
    index = {
        "pages": pages,
        "rows": rows_seen,
        "phrases": {p: sorted(v) for p, v in sorted(phrase_pages.items())},
        "facets": overview.facet_pages(),
        "plots": overview.plots(),
    }
    write_text(out / "index.js", f"const GALLERY = {json.dumps(index)};\n")
    write_text(out / "index.html", PAGE.read_text().replace("{{title}}", html.escape(folder.name)))
    return {"rows": rows_seen, "pages": pages, "phrases": len(phrase_pages), "index": str(out / "index.html")}


def main() -> None:
    def work(cfg: GalleryConfig) -> None:
        result = write_gallery(cfg)
        log.info("Gallery of %d images (%d pages): %s", result["rows"], result["pages"], result["index"])

    command("gallery", work, log)


if __name__ == "__main__":
    main()
