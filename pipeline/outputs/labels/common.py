"""What every label format shares: the rows of an output folder, their boxes in pixels, and the
class each box is filed under (classes.py), counted as the export goes."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.outputs.labels.classes import Classes
from pipeline.records import columns, id_hash
from pipeline.storage.files import Folder, atomic_folder
from pipeline.storage.layout import committed_parts

COLUMNS = columns("id", "source", "width", "height", "caption", "entities", "error")
log = logging.getLogger("kosmos-labels")
MARKER = ".kosmos-labels"  # marks a folder this tool wrote, which a later export may replace
UNMATCHED_KEPT = 10_000  # distinct phrases counted for the report; the rest are counted together


@dataclass
class Box:
    label: str  # the class
    x: float  # pixels, top-left corner
    y: float
    w: float
    h: float
    score: float | None  # None in output folders written before scores existed
    phrase: str = ""  # the phrase as the model wrote it
    attribute: str = ""  # what the phrase says beside its class ("brown", "in a red shirt")
    start: int = 0  # the phrase's span in the caption
    end: int = 0


def normalise(phrase: str) -> str:
    """One spelling for `A dog`, `a dog ` and `a  dog`."""
    return " ".join(phrase.lower().split())


@contextmanager
def export_folder(dest: Path, fmt: str) -> Iterator[Path]:
    """The folder of a folder format, built whole (storage.files.atomic_folder) and marked as one this
    tool wrote (MARKER), which the next export may replace."""
    with atomic_folder(dest) as out:
        (out / MARKER).write_text(f"written by kosmos-labels format={fmt}; replaced whole by the next export\n")
        yield out


def rows(folder: Folder, parts: list[str] | None = None) -> Iterator[dict]:
    """Every row of the committed parts (those given, else those there now), in record batches."""
    for part in committed_parts(folder) if parts is None else parts:
        with pq.ParquetFile(folder.open(part)) as f:
            for batch in f.iter_batches(columns=COLUMNS, batch_size=1024):
                yield from batch.to_pylist()


def usable(row: dict) -> bool:
    """An annotated image: error rows and rows without a size are left out of every format."""
    return row["error"] is None and bool(row["width"]) and bool(row["height"])


def split_of(item_id: str, train: float | None) -> str:
    """`train` or `val` by a stable hash of the id (the same on every machine and run); '' without a split."""
    if train is None:
        return ""
    return "train" if id_hash(item_id) % 10_000 < train * 10_000 else "val"


def needed_score(score: float | None, row: dict, option: str) -> float:
    """A box's score where `option` cannot do without one."""
    if score is None:
        raise ConfigError(
            f"{option} needs box scores, and the boxes of {row['id']!r} have none (an output folder written before "
            f"scores existed): annotate it again with output.mode=overwrite, or leave {option} out"
        )
    return score


class Labeller:
    """Boxes of a row filed under their classes, at least `min_score`; counts what each class took."""

    def __init__(self, classes: Classes, min_score: float = 0.0):
        self.classes, self.min_score = classes, min_score
        self.counts: Counter[str] = Counter()
        self.unmatched: Counter[str] = Counter()  # boxes no class took, by phrase
        self.images = 0
        self.parts: list[str] | None = None  # the parts of the first pass, read again by the others

    def rows(self, folder: Folder) -> Iterator[dict]:
        """The annotated images, from the same parts each pass (a run still writing adds parts between them)."""
        if self.parts is None:
            self.parts = committed_parts(folder)
        return (row for row in rows(folder, self.parts) if usable(row))

    def boxes(self, row: dict, count: bool = True) -> list[Box]:
        """The row's boxes that a class takes, clipped to the image and ordered (Kosmos-2 may give a
        corner pair in either order); `count`: once per row and export."""
        width, height = row["width"], row["height"]
        out = []
        for entity in row["entities"] or []:
            phrase = entity["phrase"]
            label, attribute = self.classes.of(phrase)
            for b in entity["boxes"]:
                score = b.get("score")
                if self.min_score and needed_score(score, row, "min_score") < self.min_score:
                    continue
                if label is None:
                    key = normalise(phrase)
                    if count and (key in self.unmatched or len(self.unmatched) < UNMATCHED_KEPT):
                        self.unmatched[key] += 1
                    elif count:
                        self.unmatched["(other phrases)"] += 1
                    continue
                x1, x2 = sorted((min(max(b["x1"], 0.0), 1.0), min(max(b["x2"], 0.0), 1.0)))
                y1, y2 = sorted((min(max(b["y1"], 0.0), 1.0), min(max(b["y2"], 0.0), 1.0)))
                box = Box(label, x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height, score)
                box.phrase, box.attribute, box.start, box.end = phrase, attribute, entity["start"], entity["end"]
                out.append(box)
        if count:
            self.images += 1
            self.counts.update(b.label for b in out)
        return out

    def labelled(self, folder: Folder) -> Iterator[tuple[dict, list[Box]]]:
        """(row, boxes) of each annotated image, counted."""
        for row in self.rows(folder):
            yield row, self.boxes(row)

    def names(self, folder: Folder) -> list[str]:
        """The classes given, in their order; else every class found (a first pass), sorted."""
        if self.classes.given:
            return self.classes.names
        found = set()
        for row in self.rows(folder):
            found.update(b.label for b in self.boxes(row, count=False))
        return sorted(found)

    def report(self) -> dict:
        """Boxes per class and those no class took, logged; a warning when the classes took few."""
        took, left = sum(self.counts.values()), sum(self.unmatched.values())
        width = max([len("(no class)"), *(len(n) for n in self.counts)])
        for name, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            log.info("  %-*s %8d boxes", width, name, n)
        log.info("  %-*s %8d boxes", width, "(no class)", left)
        if left and left > took:
            common = ", ".join(f"{p!r} ({n})" for p, n in self.unmatched.most_common(5))
            log.warning(
                "the classes took %d of %d boxes; the phrases most often left out: %s. Add classes or synonyms "
                "(classes={dog: [puppy]}) to keep them",
                took,
                took + left,
                common,
            )
        return {"images": self.images, "boxes": took, "unmatched boxes": left}
