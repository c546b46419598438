"""COCO detection JSON, and COCO's detection-results list (what `COCO.loadRes` reads)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pipeline.outputs.labels.common import Box, Labeller, needed_score
from pipeline.storage.files import Folder, atomic


def coco_boxes(folder: Folder, labeller: Labeller) -> Iterator[tuple[int, dict, Box]]:
    """(COCO image id, row, box) of each box a class took, images numbered 1.. in output order."""
    for image_id, (row, boxes) in enumerate(labeller.labelled(folder), start=1):
        for box in boxes:
            yield image_id, row, box


def coco_bbox(box: Box) -> list[float]:
    return [round(box.x, 2), round(box.y, 2), round(box.w, 2), round(box.h, 2)]


def write_coco(folder: Folder, dest: Path, names: list[str], labeller: Labeller) -> dict:
    """COCO detection JSON, written as it is read: images (every annotated one, those without a box
    too: COCO counts them as background), then annotations (a second pass)."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    counts = {"images": 0, "annotations": 0}
    with atomic(dest) as f:
        f.write('{"info": {"description": "kosmos-annotate grounded boxes"}, "licenses": [], "images": [')
        for image_id, row in enumerate(labeller.rows(folder), start=1):
            entry = {"id": image_id, "file_name": row["id"], "width": row["width"], "height": row["height"]}
            f.write(("," if counts["images"] else "") + json.dumps(entry))
            counts["images"] += 1
        f.write('], "annotations": [')
        for image_id, _, box in coco_boxes(folder, labeller):
            bbox = coco_bbox(box)
            ann = {
                "id": counts["annotations"] + 1,
                "image_id": image_id,
                "category_id": ids[box.label],
                "bbox": bbox,
                "area": round(bbox[2] * bbox[3], 2),
                "iscrowd": 0,
                "score": box.score,
                "attributes": {"phrase": box.phrase, "attribute": box.attribute},
            }
            f.write(("," if counts["annotations"] else "") + json.dumps(ann))
            counts["annotations"] += 1
        f.write(
            '], "categories": '
            + json.dumps([{"id": i, "name": n, "supercategory": "object"} for n, i in ids.items()])
            + "}"
        )
    return counts


def write_coco_results(folder: Folder, dest: Path, names: list[str], labeller: Labeller) -> dict:
    """COCO's detection-results list (what `COCO.loadRes` reads), with the image and category ids of
    `format=coco` on the same folder, classes and min_score."""
    ids = {name: i + 1 for i, name in enumerate(names)}
    counts = {"detections": 0}
    with atomic(dest) as f:
        f.write("[")
        for image_id, row, box in coco_boxes(folder, labeller):
            score = needed_score(box.score, row, "format=coco_results")
            det = {"image_id": image_id, "category_id": ids[box.label], "bbox": coco_bbox(box), "score": score}
            f.write(("," if counts["detections"] else "") + json.dumps(det))
            counts["detections"] += 1
        f.write("]")
    return counts
