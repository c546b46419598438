"""YOLO txt labels: `classes.txt`, one label file per image, and `ids.tsv` mapping them to ids."""

from __future__ import annotations

from itertools import chain, count
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.outputs.labels.common import boxes, needed_score, rows, usable
from pipeline.storage.files import Folder, atomic


def write_yolo(folder: Folder, dest: Path, names: list[str], min_score: float, confidence: bool) -> dict:
    """`classes.txt`, one `labels/<id less its extension>.txt` per image (`class cx cy w h`, normalised,
    then the score if `confidence`) and `ids.tsv` (label file, id, source). Ids that would share a
    label file (`a.jpg`, `a.png`) keep their extension in the name (`a.png.txt`), then a counter:
    every image gets its own file."""
    ids = {name: i for i, name in enumerate(names)}
    labels = dest / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    with atomic(dest / "classes.txt") as f:
        f.write("".join(n + "\n" for n in names))
    counts = {"images": 0, "boxes": 0}
    used: set[str] = set()
    with atomic(dest / "ids.tsv") as mapping:
        mapping.write("label_file\tid\tsource\n")
        for row in rows(folder):
            if not usable(row):
                continue
            lines = [
                f"{ids[b.label]} {(b.x + b.w / 2) / row['width']:.6f} {(b.y + b.h / 2) / row['height']:.6f} "
                f"{b.w / row['width']:.6f} {b.h / row['height']:.6f}"
                + (f" {needed_score(b.score, row, 'yolo.confidence'):.6f}" if confidence else "")
                + "\n"
                for b in boxes(row, min_score)
                if b.label in ids
            ]
            name = _label_file(row["id"], used)
            target = labels / name
            if not target.resolve().is_relative_to(labels.resolve()):
                raise ConfigError(f"id {row['id']!r} would write outside {labels}")
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text("".join(lines))
            mapping.write(f"labels/{name}\t{row['id']}\t{row['source']}\n")
            counts["images"] += 1
            counts["boxes"] += len(lines)
    return counts


def _label_file(item_id: str, used: set[str]) -> str:
    """The first free name of `a.txt`, `a.jpg.txt`, `a.jpg.1.txt`, ... for id `a.jpg` (`used` is updated)."""
    stem = Path(item_id).with_suffix("").as_posix()
    names = chain([f"{stem}.txt", f"{item_id}.txt"], (f"{item_id}.{k}.txt" for k in count(1)))
    name = next(n for n in names if n not in used)
    used.add(name)
    return name
