"""What every label format shares: the rows of an output folder, their boxes in pixels, and the
categories they are filed under."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow.parquet as pq

from pipeline.errors import ConfigError
from pipeline.records import columns
from pipeline.storage.files import Folder
from pipeline.storage.layout import committed_parts

COLUMNS = columns("id", "source", "width", "height", "entities", "error")


@dataclass
class Box:
    label: str
    x: float  # pixels, top-left corner
    y: float
    w: float
    h: float
    score: float | None  # None in output folders written before scores existed


def normalise(phrase: str) -> str:
    """One category for `A dog`, `a dog ` and `a  dog`."""
    return " ".join(phrase.lower().split())


def rows(folder: Folder) -> Iterator[dict]:
    for part in committed_parts(folder):
        with pq.ParquetFile(folder.open(part)) as f:
            for batch in f.iter_batches(columns=COLUMNS, batch_size=1024):
                yield from batch.to_pylist()


def boxes(row: dict, min_score: float = 0.0) -> list[Box]:
    """Pixel boxes of a row scoring at least `min_score`, clipped to the image, with the normalised
    phrase as label."""
    width, height = row["width"], row["height"]
    out = []
    for entity in row["entities"] or []:
        for b in entity["boxes"]:
            score = b.get("score")
            if min_score and needed_score(score, row, "min_score") < min_score:
                continue
            x1, x2 = sorted((min(max(b["x1"], 0.0), 1.0), min(max(b["x2"], 0.0), 1.0)))
            y1, y2 = sorted((min(max(b["y1"], 0.0), 1.0), min(max(b["y2"], 0.0), 1.0)))
            out.append(
                Box(normalise(entity["phrase"]), x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height, score)
            )
    return out


def needed_score(score: float | None, row: dict, option: str) -> float:
    """A box's score where `option` cannot do without one."""
    if score is None:
        raise ConfigError(
            f"{option} needs box scores, and the boxes of {row['id']!r} have none (an output folder written before "
            f"scores existed): annotate it again with output.mode=overwrite, or leave {option} out"
        )
    return score


def usable(row: dict) -> bool:
    return row["error"] is None and bool(row["width"]) and bool(row["height"])


def categories(folder: Folder, classes: list[str], min_score: float) -> list[str]:
    if classes:
        return [normalise(c) for c in classes]
    found = set()
    for row in rows(folder):
        if usable(row):
            found.update(b.label for b in boxes(row, min_score))
    return sorted(found)
