"""`kosmos-labels`: the parquet output -> COCO detection JSON (or COCO's results list), Label Studio
predictions, or YOLO txt; every box keeps its score, and `min_score=` drops the doubtful ones.

    kosmos-labels format=coco output.dir=labels/ dest=coco.json min_score=0.5
    kosmos-labels format=coco_results output.dir=labels/ dest=results.json
    kosmos-labels format=labelstudio output.dir=labels/ dest=tasks.json labelstudio.document_root=/data
    kosmos-labels format=yolo output.dir=labels/ dest=yolo/ yolo.confidence=true

`dest` may not be inside the output folder unless its name starts with `_`: the folder must stay
readable as one parquet table.

Streaming: the parts are read in record batches, one pass to find the categories and one to write,
so memory holds the category list, never the dataset. Boxes are clipped to the image and ordered
(Kosmos-2 may give a corner pair in either order); rows with an error or without a size are skipped.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain, count
from pathlib import Path
from urllib.parse import quote

import pyarrow.parquet as pq

from pipeline.config import ConfigError, OutputConfig
from pipeline.files import Folder, atomic
from pipeline.sink import SETTINGS, committed_parts, existing_output

log = logging.getLogger("kosmos-labels")
FORMATS = ("coco", "coco_results", "labelstudio", "yolo")


@dataclass
class LabelStudioOptions:
    """Where Label Studio fetches each task's image from; with neither set, the path as annotated
    (which Label Studio cannot open: it only shows images it serves or can fetch)."""

    # The server's LOCAL_FILES_DOCUMENT_ROOT: images are referenced through its local-files route,
    # `/data/local-files/?d=<path under this root>` (the project needs a Local Files storage there).
    document_root: str | None = None
    # Or a URL prefix (http(s)://, s3://, gs://) to which each image's id is appended: for folder
    # input the id is the path under input.path, so upload that folder there.
    url_prefix: str | None = None


@dataclass
class YoloOptions:
    confidence: bool = False  # a sixth column with the box's score (`class cx cy w h conf`)


@dataclass
class LabelsConfig:
    output: OutputConfig = field(default_factory=OutputConfig)
    format: str = "coco"  # coco | coco_results | labelstudio | yolo
    dest: str | None = None  # a file (coco, coco_results, labelstudio) or a folder (yolo)
    # Categories in this order; other phrases are left out. Empty = every distinct (normalised) phrase.
    classes: list[str] = field(default_factory=list)
    min_score: float = 0.0  # boxes scoring below this are left out
    labelstudio: LabelStudioOptions = field(default_factory=LabelStudioOptions)
    yolo: YoloOptions = field(default_factory=YoloOptions)

    def validate(self) -> None:
        if self.format not in FORMATS:
            raise ConfigError(f"format={self.format!r} is not one of {', '.join(FORMATS)}")
        if not 0 <= self.min_score <= 1:
            raise ConfigError(f"min_score={self.min_score} must be between 0 and 1")
        if self.labelstudio.document_root and self.labelstudio.url_prefix:
            raise ConfigError("set labelstudio.document_root or labelstudio.url_prefix, not both")
        folder = existing_output(self.output.dir)
        if not self.dest:
            raise ConfigError("dest is not set: say where to write, e.g. dest=coco.json")
        dest = Path(self.dest).expanduser().resolve()
        root = None if folder.remote else Path(folder.root).resolve()
        inside = dest.relative_to(root).parts if root and dest.is_relative_to(root) else None
        if inside is not None and not (inside and inside[0].startswith(("_", "."))):
            raise ConfigError(
                f"dest={self.dest!r} is inside output.dir={self.output.dir!r}, which parquet readers then fail "
                f"to read as one table; write it elsewhere or under a name starting with '_' "
                f"(e.g. dest={Path(self.output.dir) / ('_' + (inside[0] if inside else 'labels'))})"
            )


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
            for batch in f.iter_batches(columns=["id", "source", "width", "height", "entities", "error"], batch_size=1024):
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
            out.append(Box(normalise(entity["phrase"]), x1 * width, y1 * height, (x2 - x1) * width, (y2 - y1) * height, score))
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


def _coco_boxes(folder: Folder, names: dict[str, int], min_score: float) -> Iterator[tuple[int, dict, Box]]:
    """(COCO image id, row, box) of each wanted box, images numbered 1.. in output order."""
    for image_id, row in enumerate((r for r in rows(folder) if usable(r)), start=1):
        for box in boxes(row, min_score):
            if box.label in names:
                yield image_id, row, box


def _bbox(box: Box) -> list[float]:
    return [round(box.x, 2), round(box.y, 2), round(box.w, 2), round(box.h, 2)]


def write_coco(folder: Folder, dest: Path, names: list[str], min_score: float) -> dict:
    """COCO detection JSON, written as it is read: images, then annotations (a second pass)."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    counts = {"images": 0, "annotations": 0}
    with atomic(dest) as f:
        f.write('{"info": {"description": "kosmos-annotate grounded boxes"}, "licenses": [], "images": [')
        for image_id, row in enumerate((r for r in rows(folder) if usable(r)), start=1):
            entry = {"id": image_id, "file_name": row["id"], "width": row["width"], "height": row["height"]}
            f.write(("," if counts["images"] else "") + json.dumps(entry))
            counts["images"] += 1
        f.write('], "annotations": [')
        for image_id, _, box in _coco_boxes(folder, ids, min_score):
            bbox = _bbox(box)
            ann = {
                "id": counts["annotations"] + 1,
                "image_id": image_id,
                "category_id": ids[box.label],
                "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2),
                "iscrowd": 0,
                "score": box.score,
            }
            f.write(("," if counts["annotations"] else "") + json.dumps(ann))
            counts["annotations"] += 1
        f.write('], "categories": ' + json.dumps([{"id": i, "name": n, "supercategory": "phrase"} for n, i in ids.items()]) + "}")
    return counts


def write_coco_results(folder: Folder, dest: Path, names: list[str], min_score: float) -> dict:
    """COCO's detection-results list (what `COCO.loadRes` reads), with the image and category ids of
    `format=coco` on the same folder, classes and min_score."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    counts = {"detections": 0}
    with atomic(dest) as f:
        f.write("[")
        for image_id, row, box in _coco_boxes(folder, ids, min_score):
            score = needed_score(box.score, row, "format=coco_results")
            det = {"image_id": image_id, "category_id": ids[box.label], "bbox": _bbox(box), "score": score}
            f.write(("," if counts["detections"] else "") + json.dumps(det))
            counts["detections"] += 1
        f.write("]")
    return counts


def image_reference(row: dict, options: LabelStudioOptions) -> str:
    """The URL Label Studio loads a task's image from (see LabelStudioOptions)."""
    if options.url_prefix:
        return options.url_prefix.rstrip("/") + "/" + quote(row["id"])
    if not options.document_root:
        return row["source"]
    root = Path(options.document_root).expanduser().resolve()
    path = Path(row["source"]).expanduser().resolve()
    if not path.is_relative_to(root):
        raise ConfigError(
            f"image {row['source']!r} (id {row['id']!r}) is not under labelstudio.document_root={options.document_root!r}: "
            "set the document root to a folder that holds every image (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)"
        )
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix())


def write_labelstudio(folder: Folder, dest: Path, names: list[str], min_score: float, version: str, options: LabelStudioOptions) -> dict:
    """Label Studio tasks with predictions (rectanglelabels in percent of the image). Each region
    carries its box's score; each prediction the mean of its regions' scores, which Label Studio
    sorts and filters tasks by."""
    wanted = set(names)
    counts = {"tasks": 0, "regions": 0}
    if not (options.document_root or options.url_prefix):
        log.warning(
            "Tasks reference images by the path they were annotated from, which Label Studio cannot open: set "
            "labelstudio.document_root=<its LOCAL_FILES_DOCUMENT_ROOT> or labelstudio.url_prefix=<where the images are served>"
        )
    with atomic(dest) as f:
        f.write("[")
        for row in rows(folder):
            if not usable(row):
                continue
            result = []
            for k, box in enumerate(b for b in boxes(row, min_score) if b.label in wanted):
                result.append(
                    {
                        "id": f"r{k}",
                        "type": "rectanglelabels",
                        "from_name": "label",
                        "to_name": "image",
                        "original_width": row["width"],
                        "original_height": row["height"],
                        "image_rotation": 0,
                        "score": box.score,
                        "value": {
                            "x": 100 * box.x / row["width"],
                            "y": 100 * box.y / row["height"],
                            "width": 100 * box.w / row["width"],
                            "height": 100 * box.h / row["height"],
                            "rotation": 0,
                            "rectanglelabels": [box.label],
                        },
                    }
                )
            prediction = {"model_version": version, "result": result}
            scores = [r["score"] for r in result if r["score"] is not None]
            if scores:
                prediction["score"] = sum(scores) / len(scores)
            task = {"data": {"image": image_reference(row, options), "id": row["id"]}, "predictions": [prediction]}
            f.write(("," if counts["tasks"] else "") + json.dumps(task))
            counts["tasks"] += 1
            counts["regions"] += len(result)
        f.write("]")
    return counts


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
                f"{b.w / row['width']:.6f} {b.h / row['height']:.6f}" + (f" {needed_score(b.score, row, 'yolo.confidence'):.6f}" if confidence else "") + "\n"
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


def export_labels(cfg: LabelsConfig) -> dict:
    cfg.validate()
    folder, dest = Folder(cfg.output.dir), Path(cfg.dest).expanduser()
    names = categories(folder, cfg.classes, cfg.min_score)
    if cfg.format == "coco":
        return write_coco(folder, dest, names, cfg.min_score)
    if cfg.format == "coco_results":
        return write_coco_results(folder, dest, names, cfg.min_score)
    if cfg.format == "labelstudio":
        meta = json.loads(folder.read_text(SETTINGS)) if folder.exists(SETTINGS) else {}
        version = f"kosmos-2 {meta.get('model.source', '')} {meta.get('model.weight_format', '')}".strip()
        return write_labelstudio(folder, dest, names, cfg.min_score, version, cfg.labelstudio)
    return write_yolo(folder, dest, names, cfg.min_score, cfg.yolo.confidence)


def main() -> None:
    from pipeline.cli import command

    def work(cfg: LabelsConfig) -> None:
        counts = export_labels(cfg)
        log.info("Wrote %s to %s (%s)", cfg.format, cfg.dest, ", ".join(f"{k}: {v}" for k, v in counts.items()))

    command("labels", work, log, schema=LabelsConfig)


if __name__ == "__main__":
    main()
