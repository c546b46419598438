"""`kosmos-gallery output.dir=labels/`: a static HTML page to look at an output folder.

Writes `labels/_gallery/index.html`, thumbnails (`thumbs/`), and the rows as JavaScript pages
(`pages/page-NNNNN.js`, loaded with <script> so the page works from file:// with no server). Rows are
read in record batches and a page is written as soon as it is full, so a large output never sits in
memory. Boxes are drawn by the page over the thumbnail, labelled with their phrase and score, so the
score threshold can hide the doubtful ones; each entity is highlighted in the caption in its box's
colour, and the phrase filter knows which pages hold each phrase. Filters and page live in the URL
(`?phrase=a%20cat&score=0.5&page=2`), so a view can be shared.
"""

from __future__ import annotations

import html
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from pipeline.config import ConfigError, OutputConfig
from pipeline.files import Folder, is_remote
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
        if is_remote(self.output.dir or ""):
            raise ConfigError(f"output.dir={self.output.dir!r}: the gallery is written into the output folder, which must "
                              "be local; copy it here first (e.g. aws s3 sync <uri> labels/)")
        existing_output(self.output.dir)
        if self.gallery.page_size < 1 or self.gallery.thumb_side < 16:
            raise ConfigError("gallery.page_size must be >= 1 and gallery.thumb_side >= 16")


def _hex(index: int) -> str:
    b, g, r = colour(index)
    return f"#{r:02x}{g:02x}{b:02x}"


def _thumbnail(folder: Path, row: dict, thumbs: Path, side: int) -> tuple[str | None, bool]:
    """(thumbnail, whether its boxes are drawn in): the source image, upright (boxes refer to the
    upright image), for the page to draw boxes on; else the run's preview, boxes drawn in; else none."""
    name = preview_name(row["id"])
    for source, drawn in ((Path(row["source"]), False), (folder / "_previews" / name, True)):
        try:
            with Image.open(source) as im:
                image = ImageOps.exif_transpose(im).convert("RGB")
        except (OSError, ValueError):
            continue
        image.thumbnail((side, side))
        write_preview(Folder(thumbs), row["id"], image, [], side, 85)
        return f"thumbs/{name}", drawn
    return None, False


def _entity(entity: dict, index: int) -> dict:
    """An entity as the page draws it: span, colour, score, and boxes as [x1, y1, x2, y2, score]."""
    def rounded(v):
        return None if v is None else round(v, 4)

    boxes = [[rounded(b[k]) for k in ("x1", "y1", "x2", "y2")] + [rounded(b.get("score"))] for b in entity["boxes"]]
    return {"phrase": entity["phrase"], "start": entity["start"], "end": entity["end"], "colour": _hex(index),
            "score": rounded(entity.get("score")), "boxes": boxes}


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
    for part in committed_parts(Folder(folder)):
        with pq.ParquetFile(folder / part) as f:
            for batch in f.iter_batches(columns=columns, batch_size=256):
                for row in batch.to_pylist():
                    entities = [_entity(e, i) for i, e in enumerate(row["entities"] or [])]
                    for e in entities:
                        phrase_pages.setdefault(e["phrase"].lower(), set()).add(pages)
                    thumb, drawn = (None, False) if row["error"] else _thumbnail(folder, row, out / "thumbs", cfg.gallery.thumb_side)
                    page.append(
                        {
                            "id": row["id"],
                            "caption": row["caption"],
                            "error": row["error"],
                            "size": [row["width"], row["height"]],
                            "entities": entities,
                            "thumb": thumb,
                            "drawn": drawn,
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
 .thumb { position: relative; }
 .thumb img { width: 100%; height: auto; display: block; border-radius: 4px; }
 .box { position: absolute; border: 2px solid; box-sizing: border-box; pointer-events: none; }
 .box span { position: absolute; left: -2px; top: -2px; font-size: 11px; color: #fff; padding: 0 3px; white-space: nowrap; }
 .id { color: #666; font-size: 12px; word-break: break-all; margin: 4px 0; }
 .entity { border-bottom: 3px solid; padding: 0 1px; }
 .entity.below { border-bottom-style: dotted; color: #999; }
 .error { color: #b00; }
 #score { width: 5em; }
 button { padding: 4px 10px; }
</style>
<script src="index.js"></script></head>
<body>
<header>
 <strong>{{title}}</strong> <span id="count"></span>
 <input id="filter" placeholder="filter by phrase" list="phrases"><datalist id="phrases"></datalist>
 <label>min score <input id="score" type="number" min="0" max="1" step="0.05" value="0"></label>
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
function minScore() { return Number(document.getElementById("score").value) || 0; }
// A box is shown when it scores at least the threshold (a box without a score is always shown).
function shown(box) { return box[4] === null || box[4] >= minScore(); }
function scoreText(v) { return v === null ? "" : " " + v.toFixed(2); }
function caption(row) {
  const p = el("div");
  if (row.error) { p.appendChild(el("span", {className: "error"}, row.error)); return p; }
  let at = 0;
  const text = row.caption || "";
  for (const e of [...row.entities].sort((a, b) => a.start - b.start)) {
    if (e.start < at) continue;
    p.appendChild(document.createTextNode(text.slice(at, e.start)));
    const faint = e.boxes.length && !e.boxes.some(shown);
    const title = "score" + scoreText(e.score) + "; boxes:" + e.boxes.map((b) => scoreText(b[4])).join(",");
    const s = el("span", {className: faint ? "entity below" : "entity", title: title}, text.slice(e.start, e.end));
    s.style.borderColor = e.colour;
    p.appendChild(s);
    at = e.end;
  }
  p.appendChild(document.createTextNode(text.slice(at)));
  return p;
}
function thumb(row) {
  const t = el("div", {className: "thumb"});
  t.appendChild(el("img", {src: row.thumb, alt: row.id, loading: "lazy"}));
  if (row.drawn) return t;  // the run's preview: boxes drawn in already
  for (const e of row.entities) {
    for (const b of e.boxes.filter(shown)) {
      const [x1, x2] = [Math.min(b[0], b[2]), Math.max(b[0], b[2])], [y1, y2] = [Math.min(b[1], b[3]), Math.max(b[1], b[3])];
      const box = el("div", {className: "box", title: e.phrase + scoreText(b[4])});
      Object.assign(box.style, {left: 100 * x1 + "%", top: 100 * y1 + "%", width: 100 * (x2 - x1) + "%",
                                height: 100 * (y2 - y1) + "%", borderColor: e.colour});
      const label = el("span", {}, e.phrase + scoreText(b[4]));
      label.style.background = e.colour;
      box.appendChild(label);
      t.appendChild(box);
    }
  }
  return t;
}
function card(row) {
  const c = el("div", {className: "card"});
  if (row.thumb) c.appendChild(thumb(row));
  c.appendChild(el("div", {className: "id"}, row.id + (row.size[0] ? "  " + row.size[0] + "x" + row.size[1] : "")));
  c.appendChild(caption(row));
  return c;
}
function remember(phrase) {
  const q = new URLSearchParams();
  if (phrase) q.set("phrase", phrase);
  if (minScore()) q.set("score", String(minScore()));
  if (!phrase && current) q.set("page", String(current + 1));
  try { history.replaceState(null, "", "?" + q.toString()); } catch (e) { /* some browsers refuse on file:// */ }
}
async function show() {
  const grid = document.getElementById("grid");
  grid.replaceChildren();
  const phrase = document.getElementById("filter").value.trim().toLowerCase();
  let rows;
  if (phrase) {
    const pages = GALLERY.phrases[phrase] || [];
    const has = (r) => r.entities.some((e) => e.phrase.toLowerCase() === phrase && (!minScore() || e.boxes.some(shown)));
    rows = [];
    for (const n of pages) rows.push(...(await load(n)).filter(has));
    const above = minScore() ? " scoring \\u2265 " + minScore() : "";
    document.getElementById("pageinfo").textContent = rows.length + " with \\u201c" + phrase + "\\u201d" + above;
  } else {
    rows = GALLERY.pages ? await load(current) : [];
    document.getElementById("pageinfo").textContent = "page " + (current + 1) + " of " + Math.max(GALLERY.pages, 1);
  }
  for (const row of rows) grid.appendChild(card(row));
  remember(phrase);
}
document.getElementById("count").textContent = GALLERY.rows + " images";
const list = document.getElementById("phrases");
for (const p of Object.keys(GALLERY.phrases)) list.appendChild(el("option", {value: p}));
document.getElementById("filter").addEventListener("change", show);
document.getElementById("score").addEventListener("change", show);
document.getElementById("prev").addEventListener("click", () => { if (current > 0) { current--; show(); } });
document.getElementById("next").addEventListener("click", () => { if (current + 1 < GALLERY.pages) { current++; show(); } });
const start = new URLSearchParams(location.search);
if (start.get("phrase")) document.getElementById("filter").value = start.get("phrase");
if (start.get("score")) document.getElementById("score").value = start.get("score");
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
