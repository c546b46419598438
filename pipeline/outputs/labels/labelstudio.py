"""Label Studio tasks with predictions (rectanglelabels), each region and prediction scored."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from urllib.parse import quote
from xml.sax.saxutils import quoteattr

from pipeline.config import LabelStudioOptions
from pipeline.errors import ConfigError
from pipeline.outputs.labels.common import Labeller
from pipeline.storage.files import Folder, atomic

log = logging.getLogger("kosmos-labels")


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
            f"image {row['source']!r} (id {row['id']!r}) is not under "
            f"labelstudio.document_root={options.document_root!r}: "
            "set the document root to a folder that holds every image (Label Studio's LOCAL_FILES_DOCUMENT_ROOT)"
        )
    return "/data/local-files/?d=" + quote(path.relative_to(root).as_posix())


def write_labelstudio(
    folder: Folder, dest: Path, names: list[str], labeller: Labeller, version: str, options: LabelStudioOptions
) -> dict:
    """Label Studio tasks with predictions (rectanglelabels in percent of the image). Each region
    carries its box's score and the phrase in its `meta`; each prediction the mean of its regions'
    scores, which Label Studio sorts and filters tasks by. Beside `dest`, `<dest>.xml`: the project's
    labelling config, listing the classes."""
    counts = {"tasks": 0, "regions": 0}
    if not (options.document_root or options.url_prefix):
        log.warning(
            "Tasks reference images by the path they were annotated from, which Label Studio cannot open: set "
            "labelstudio.document_root=<its LOCAL_FILES_DOCUMENT_ROOT> or "
            "labelstudio.url_prefix=<where the images are served>"
        )
    with atomic(dest) as f:
        f.write("[")
        for row, boxes in labeller.labelled(folder):
            result = []
            for k, box in enumerate(boxes):
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
                        "meta": {"text": box.phrase},
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
    with atomic(dest.with_name(dest.name + ".xml")) as f:  # after the tasks: never beside tasks it does not fit
        f.write(label_config(names))
    return counts


def label_config(names: list[str]) -> str:
    """A Label Studio labelling config of rectangles, one label a class (the project's `label_config`)."""
    labels = "".join(f"<Label value={quoteattr(n)}/>" for n in names)
    return (
        f'<View><Image name="image" value="$image"/><RectangleLabels name="label" toName="image">{labels}'
        "</RectangleLabels></View>\n"
    )
