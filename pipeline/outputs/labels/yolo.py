"""A YOLO dataset as ultralytics loads it: `images/`, `labels/` and `data.yaml`."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from itertools import chain, count
from pathlib import Path, PurePosixPath

import yaml

from pipeline.outputs.labels.common import Labeller, export_folder, needed_score, split_of
from pipeline.outputs.labels.images import SourceImages
from pipeline.storage.files import Folder, safe_relative

log = logging.getLogger("kosmos-labels")


def write_yolo(
    folder: Folder,
    dest: Path,
    names: list[str],
    labeller: Labeller,
    confidence: bool,
    link: bool,
    split: float | None,
    images: SourceImages,
) -> dict:
    """`images/[train|val/]<name>.<ext>` (linked or copied), `labels/[train|val/]<name>.txt` (`class cx
    cy w h`, normalised, then the score if `confidence`; empty for an image no class takes, which
    ultralytics counts as background), `data.yaml` (the path, the splits, the class names) and `ids.tsv`
    (label file, id, source; tab-separated, quoted where a field holds a tab, a line break or a quote).

    Files are named after the id made safe (storage.files.safe_relative: never outside the folder; a
    folder named `images` or `labels` in an id is `images_`, since ultralytics finds a label by
    replacing the last `/images/` of an image's path); ids that would share one (`a.jpg`, `a.png`)
    keep their extension in the name (`a.png.png`), then
    a counter: every image gets its own pair. The folder is written whole and replaces an older export
    under `dest` (one holding common.MARKER: the labels command refuses any other non-empty folder); a
    killed export leaves none."""
    ids = {name: i for i, name in enumerate(names)}
    counts = {"images": 0, "boxes": 0}
    per_split: dict[str, int] = {}
    with export_folder(dest, "yolo") as out:
        with open(out / "ids.tsv", "w", newline="") as f:
            mapping = csv.writer(f, delimiter="\t", lineterminator="\n")
            quoted = csv.writer(f, delimiter="\t", lineterminator="\n", quoting=csv.QUOTE_ALL)  # csv leaves \r bare
            mapping.writerow(["label_file", "image_file", "id", "source"])
            for row, boxes in labeller.labelled(folder):
                w, h = row["width"], row["height"]
                lines = [
                    f"{ids[b.label]} {(b.x + b.w / 2) / w:.6f} {(b.y + b.h / 2) / h:.6f} {b.w / w:.6f} {b.h / h:.6f}"
                    + (f" {needed_score(b.score, row, 'yolo.confidence'):.6f}" if confidence else "")
                    + "\n"
                    for b in boxes
                ]
                part = split_of(row["id"], split)
                name = "/".join(
                    p + "_" if p in ("images", "labels") else p for p in safe_relative(row["id"]).split("/")
                )
                stem = image_stem(name, lambda s, part=part: (out / "labels" / part / f"{s}.txt").exists())
                ext, data = images.for_training(row["source"])
                label = PurePosixPath("labels", part, stem + ".txt").as_posix()
                image = PurePosixPath("images", part, f"{stem}.{ext}").as_posix()
                for path in (label, image):
                    (out / path).parent.mkdir(parents=True, exist_ok=True)
                (out / label).write_text("".join(lines))
                if data is None:
                    images.place(row["source"], out / image, link)
                else:
                    (out / image).write_bytes(data)
                fields = [label, image, row["id"], row["source"]]
                (quoted if any("\r" in field for field in fields) else mapping).writerow(fields)
                counts["images"] += 1
                counts["boxes"] += len(lines)
                per_split[part] = per_split.get(part, 0) + 1
        if split is not None:
            for part in ("train", "val"):
                (out / "images" / part).mkdir(parents=True, exist_ok=True)
                (out / "labels" / part).mkdir(parents=True, exist_ok=True)
                if not per_split.get(part):
                    log.warning(
                        "split=%s put no image in %s (%d images in all): use more images or no split",
                        split,
                        part,
                        counts["images"],
                    )
        train, val = ("images/train", "images/val") if split is not None else ("images", "images")
        data_yaml = {"path": str(dest.resolve()), "train": train, "val": val, "names": dict(enumerate(names))}
        (out / "data.yaml").write_text(yaml.safe_dump(data_yaml, sort_keys=False, allow_unicode=True))
        (out / "classes.txt").write_text("".join(n + "\n" for n in names))
    return counts


def image_stem(name: str, taken: Callable[[str], bool]) -> str:
    """The first stem not `taken` (a file of that name already written) of `a`, `a.jpg`, `a.jpg.1`, ...
    for `a.jpg`: read from the disk, so no name is held in memory (a case-blind disk counts `A` and
    `a` as one)."""
    stem = PurePosixPath(name).with_suffix("").as_posix() if PurePosixPath(name).suffix else name
    return next(n for n in chain([stem, name], (f"{name}.{k}" for k in count(1))) if not taken(n))
