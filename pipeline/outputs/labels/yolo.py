"""YOLO txt labels: `classes.txt`, one label file per image, and `ids.tsv` mapping them to ids."""

from __future__ import annotations

import csv
from itertools import chain, count
from pathlib import Path, PurePosixPath

from pipeline.outputs.labels.common import boxes, needed_score, rows, usable
from pipeline.storage.files import Folder, atomic_folder, safe_relative

YOLO_MARKER = ".kosmos-labels"  # marks a folder this tool wrote, which a later export may replace


def write_yolo(folder: Folder, dest: Path, names: list[str], min_score: float, confidence: bool) -> dict:
    """`classes.txt`, one `labels/<id less its extension>.txt` per image (`class cx cy w h`, normalised,
        then the score if `confidence`) and `ids.tsv` (label file, id, source; tab-separated, quoted where
        a field holds a tab, a line break or a quote). Label files are named after the id made safe
        (storage.files.safe_relative: never outside `labels/`); ids that would share one (`a.jpg`,
        `a.png`) keep their extension in the name (`a.png.txt`), then a counter: every image gets its own
        file. The folder is written whole and replaces an older export under `dest` (one holding
    YOLO_MARKER: the labels command refuses any other non-empty folder); a killed export leaves none."""
    ids = {name: i for i, name in enumerate(names)}
    counts = {"images": 0, "boxes": 0}
    used: set[str] = set()
    with atomic_folder(dest) as out:
        (out / YOLO_MARKER).write_text("written by kosmos-labels format=yolo; replaced whole by the next export\n")
        (out / "classes.txt").write_text("".join(n + "\n" for n in names))
        with open(out / "ids.tsv", "w", newline="") as f:
            mapping = csv.writer(f, delimiter="\t", lineterminator="\n")
            quoted = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)  # csv leaves \r bare
            mapping.writerow(["label_file", "id", "source"])
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
                name = _label_file(safe_relative(row["id"]), used)
                target = out / "labels" / name
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text("".join(lines))
                fields = [f"labels/{name}", row["id"], row["source"]]
                (quoted if any("\r" in field for field in fields) else mapping).writerow(fields)
                counts["images"] += 1
                counts["boxes"] += len(lines)
    return counts


def _label_file(name: str, used: set[str]) -> str:
    """The first free name of `a.txt`, `a.jpg.txt`, `a.jpg.1.txt`, ... for `a.jpg` (`used` is updated)."""
    stem = PurePosixPath(name).with_suffix("").as_posix()
    names = chain([f"{stem}.txt", f"{name}.txt"], (f"{name}.{k}.txt" for k in count(1)))
    found = next(n for n in names if n not in used)
    used.add(found)
    return found
