"""Grounded captions as GRIT (the corpus Kosmos-2 was trained on) holds them: a caption, and spans of
it with a box and a score, in parquet.

GRIT-20M's rows (its dataset card, zzliang/GRIT): `key`, `url`, `caption`, `width`, `height`,
`noun_chunks` and `ref_exps`, each a list of `[start, end, x_min, y_min, x_max, y_max, score]`:
a character span of the caption, a box in [0, 1] of the image's width and height, the grounding
model's confidence. Here each box of an entity gives one of each: its noun chunk spans the phrase up
to its head noun ("a man"), its referring expression the whole phrase ("a man in a red shirt"); the
score is the box's own (Kosmos-2's probability of its two location tokens). `id` and `source` keep
the output row's, and `class` the class each noun chunk was filed under.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.outputs.labels.classes import read
from pipeline.outputs.labels.common import Labeller
from pipeline.storage.files import Folder, atomic

SPAN = pa.list_(pa.float64(), 7)
SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("id", pa.string()),
        ("url", pa.string()),
        ("caption", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("noun_chunks", pa.list_(SPAN)),
        ("ref_exps", pa.list_(SPAN)),
        ("classes", pa.list_(pa.string())),
    ]
)
ROWS_PER_GROUP = 10_000


def write_grit(folder: Folder, dest: Path, labeller: Labeller) -> dict:
    """One row an annotated image (those without a box too), written a row group at a time."""
    counts = {"rows": 0, "spans": 0}
    batch: list[dict] = []
    with atomic(dest, "wb") as f, pq.ParquetWriter(f, SCHEMA, compression="zstd") as writer:
        for row, boxes in labeller.labelled(folder):
            chunks, refs = [], []
            for b in boxes:
                corners = [
                    b.x / row["width"],
                    b.y / row["height"],
                    (b.x + b.w) / row["width"],
                    (b.y + b.h) / row["height"],
                ]
                score = b.score if b.score is not None else float("nan")
                refs.append([b.start, b.end, *corners, score])
                chunks.append([b.start, _chunk_end(b), *corners, score])
            batch.append(
                {
                    "key": f"{counts['rows']:09d}",
                    "id": row["id"],
                    "url": row["source"],
                    "caption": row["caption"],
                    "width": row["width"],
                    "height": row["height"],
                    "noun_chunks": chunks,
                    "ref_exps": refs,
                    "classes": [b.label for b in boxes],
                }
            )
            counts["rows"] += 1
            counts["spans"] += len(refs)
            if len(batch) == ROWS_PER_GROUP:
                writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
                batch = []
        if batch or not counts["rows"]:
            writer.write_table(pa.Table.from_pylist(batch, SCHEMA))
    return counts


def _chunk_end(box) -> int:
    """Where the box's noun chunk ends: at the phrase's head noun as written ("a man" of "a man in a
    red shirt"), within the phrase's span (an entity without a phrase has an empty span)."""
    reading = read(box.phrase)
    length = reading.head_end if reading.core else len(box.phrase.rstrip())
    return min(box.start + length, box.end)
