"""`kosmos-gallery output.dir=labels/`: a static HTML page to look at an output folder.

Writes `labels/_gallery/index.html`, thumbnails with the boxes drawn (`thumbs/`), and the rows as
JavaScript pages (`pages/page-NNNNN.js`, loaded with <script> so the page works from file:// with no
server). Rows are read in record batches and a page is written as soon as it is full, so a large
output never sits in memory. Each entity is highlighted in the caption in its box's colour, and the
phrase filter knows which pages hold each phrase.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.config import ConfigError, OutputConfig
from pipeline.grounding import Entity
from pipeline.preview import colour, preview_name, write_preview
from pipeline.sink import committed_parts, existing_output

log = logging.getLogger("kosmos-gallery")
GALLERY = "_gallery"


@dataclass
class GalleryOptions:
    page_size: int = 100  # rows per page
    thumb_side: int = 320  # longest side of a thumbnail, pixels


@dataclass
class GalleryConfig:
    output: OutputConfig = field(default_factory=OutputConfig)
    gallery: GalleryOptions = field(default_factory=GalleryOptions)

    def validate(self) -> None:
        existing_output(self.output.dir)
        if self.gallery.page_size < 1 or self.gallery.thumb_side < 16:
            raise ConfigError("gallery.page_size must be >= 1 and gallery.thumb_side >= 16")


def _hex(index: int) -> str:
    b, g, r = colour(index)
    return f"#{r:02x}{g:02x}{b:02x}"


def _thumbnail(folder: Path, row: dict, thumbs: Path, side: int) -> str | None:
    """The row's preview if the run made one, else the source image with boxes drawn; None if neither."""
    name = preview_name(row["id"])
    entities = [Entity.from_row(e) for e in row["entities"] or []]
    for source in (folder / "_previews" / name, Path(row["source"])):
        try:
            with Image.open(source) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")  # boxes refer to the upright image
        except (OSError, ValueError):
            continue
        image.thumbnail((side, side))
        drawn = [] if source.parent.name == "_previews" else entities  # previews already have boxes
        write_preview(thumbs, row["id"], image, drawn, side, 85)
        return f"thumbs/{name}"
    return None


def build(cfg: GalleryConfig) -> dict:
    cfg.validate()
    folder = Path(cfg.output.dir).expanduser()
    out = folder / GALLERY
    (out / "pages").mkdir(parents=True, exist_ok=True)
    import pyarrow.parquet as pq

    page, pages, rows_seen, phrase_pages = [], 0, 0, {}

    def flush():
        nonlocal page, pages
        if page:
            (out / "pages" / f"page-{pages:05d}.js").write_text(f"galleryPage({pages}, {json.dumps(page)});\n")
            pages += 1
            page = []

    columns = ["id", "source", "width", "height", "caption", "entities", "error"]
    for part in committed_parts(folder):
        with pq.ParquetFile(part) as f:
            for batch in f.iter_batches(columns=columns, batch_size=256):
                for row in batch.to_pylist():
                    entities = [
                        {"phrase": e["phrase"], "start": e["start"], "end": e["end"], "colour": _hex(i), "boxes": len(e["boxes"])}
                        for i, e in enumerate(row["entities"] or [])
                    ]
                    for e in entities:
                        phrase_pages.setdefault(e["phrase"].lower(), set()).add(pages)
                    page.append(
                        {
                            "id": row["id"],
                            "caption": row["caption"],
                            "error": row["error"],
                            "size": [row["width"], row["height"]],
                            "entities": entities,
                            "thumb": None if row["error"] else _thumbnail(folder, row, out / "thumbs", cfg.gallery.thumb_side),
                        }
                    )
                    rows_seen += 1
                    if len(page) >= cfg.gallery.page_size:
                        flush()
    flush()
    index = {"pages": pages, "rows": rows_seen, "phrases": {p: sorted(v) for p, v in sorted(phrase_pages.items())}}
    (out / "index.js").write_text(f"const GALLERY = {json.dumps(index)};\n")
    (out / "index.html").write_text(PAGE.replace("{{title}}", html.escape(folder.name)))
    return {"rows": rows_seen, "pages": pages, "phrases": len(phrase_pages), "index": str(out / "index.html")}


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{title}} - kosmos-annotate</title>
<style>
 body { font: 14px system-ui, sans-serif; margin: 1em; background: #fafafa; }
 header { display: flex; gap: 1em; align-items: center; flex-wrap: wrap; margin-bottom: 1em; }
 #grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
 .card { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 8px; }
 .card img { width: 100%; height: auto; display: block; border-radius: 4px; }
 .id { color: #666; font-size: 12px; word-break: break-all; margin: 4px 0; }
 .entity { border-bottom: 3px solid; padding: 0 1px; }
 .error { color: #b00; }
 button { padding: 4px 10px; }
</style>
<script src="index.js"></script></head>
<body>
<header>
 <strong>{{title}}</strong> <span id="count"></span>
 <input id="filter" placeholder="filter by phrase" list="phrases"><datalist id="phrases"></datalist>
 <button id="prev">&larr; previous</button> <span id="pageinfo"></span> <button id="next">next &rarr;</button>
</header>
<div id="grid"></div>
<script>
const loaded = {};
let current = 0;
function galleryPage(n, rows) { loaded[n] = rows; }
function load(n) {
  return new Promise((resolve) => {
    if (loaded[n]) return resolve(loaded[n]);
    const s = document.createElement("script");
    s.src = "pages/page-" + String(n).padStart(5, "0") + ".js";
    s.onload = () => resolve(loaded[n]);
    document.head.appendChild(s);
  });
}
function el(tag, attrs, text) {
  const e = document.createElement(tag);
  Object.assign(e, attrs || {});
  if (text !== undefined) e.textContent = text;
  return e;
}
function caption(row) {
  const p = el("div");
  if (row.error) { p.appendChild(el("span", {className: "error"}, row.error)); return p; }
  let at = 0;
  const text = row.caption || "";
  for (const e of [...row.entities].sort((a, b) => a.start - b.start)) {
    if (e.start < at) continue;
    p.appendChild(document.createTextNode(text.slice(at, e.start)));
    const s = el("span", {className: "entity", title: e.boxes + " box(es)"}, text.slice(e.start, e.end));
    s.style.borderColor = e.colour;
    p.appendChild(s);
    at = e.end;
  }
  p.appendChild(document.createTextNode(text.slice(at)));
  return p;
}
function card(row) {
  const c = el("div", {className: "card"});
  if (row.thumb) c.appendChild(el("img", {src: row.thumb, alt: row.id, loading: "lazy"}));
  c.appendChild(el("div", {className: "id"}, row.id + (row.size[0] ? "  " + row.size[0] + "x" + row.size[1] : "")));
  c.appendChild(caption(row));
  return c;
}
async function show() {
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  const phrase = document.getElementById("filter").value.trim().toLowerCase();
  let rows;
  if (phrase) {
    const pages = GALLERY.phrases[phrase] || [];
    rows = [];
    for (const n of pages) rows.push(...(await load(n)).filter((r) => r.entities.some((e) => e.phrase.toLowerCase() === phrase)));
    document.getElementById("pageinfo").textContent = rows.length + " with \\u201c" + phrase + "\\u201d";
  } else {
    rows = GALLERY.pages ? await load(current) : [];
    document.getElementById("pageinfo").textContent = "page " + (current + 1) + " of " + Math.max(GALLERY.pages, 1);
  }
  for (const row of rows) grid.appendChild(card(row));
}
document.getElementById("count").textContent = GALLERY.rows + " images";
const list = document.getElementById("phrases");
for (const p of Object.keys(GALLERY.phrases)) list.appendChild(el("option", {value: p}));
document.getElementById("filter").addEventListener("change", show);
document.getElementById("prev").addEventListener("click", () => { if (current > 0) { current--; show(); } });
document.getElementById("next").addEventListener("click", () => { if (current + 1 < GALLERY.pages) { current++; show(); } });
const start = new URLSearchParams(location.search);
if (start.get("phrase")) document.getElementById("filter").value = start.get("phrase");
if (start.get("page")) current = Math.max(0, Math.min(GALLERY.pages - 1, Number(start.get("page")) - 1));
show();
</script>
</body></html>
"""


def main() -> None:
    from pipeline.cli import command

    def work(cfg: GalleryConfig) -> None:
        result = build(cfg)
        log.info("Gallery of %d images (%d pages): %s", result["rows"], result["pages"], result["index"])

    command("gallery", work, log, schema=GalleryConfig)


if __name__ == "__main__":
    main()
