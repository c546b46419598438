"""`kosmos-labels`: an output folder -> COCO detection JSON (or COCO's results list), Label Studio
predictions, or YOLO txt; every box keeps its score, and `min_score=` drops the doubtful ones.

    kosmos-labels format=coco output.dir=labels/ dest=coco.json min_score=0.5
    kosmos-labels format=coco_results output.dir=labels/ dest=results.json
    kosmos-labels format=labelstudio output.dir=labels/ dest=tasks.json labelstudio.document_root=/data
    kosmos-labels format=yolo output.dir=labels/ dest=yolo/ yolo.confidence=true

`dest` may not be inside the output folder unless its name starts with `_`: the folder must stay
readable as one parquet table. The parts are read in record batches, one pass to find the
categories and one to write, so memory holds the category list, never the dataset. Boxes are clipped
to the image and ordered (Kosmos-2 may give a corner pair in either order); rows with an error or
without a size are skipped.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.cli import command
from pipeline.config import LabelFormat, LabelsConfig
from pipeline.errors import ConfigError
from pipeline.outputs.labels.coco import write_coco, write_coco_results
from pipeline.outputs.labels.common import categories
from pipeline.outputs.labels.labelstudio import write_labelstudio
from pipeline.outputs.labels.yolo import YOLO_MARKER, write_yolo
from pipeline.storage.files import Folder
from pipeline.storage.layout import SETTINGS, existing_output

log = logging.getLogger("kosmos-labels")


def _check_dest(cfg: LabelsConfig, folder: Folder) -> None:
    if not cfg.dest:
        raise ConfigError("dest is not set: say where to write, e.g. dest=coco.json")
    dest = Path(cfg.dest).expanduser().resolve()
    root = None if folder.remote else Path(folder.root).resolve()
    inside = dest.relative_to(root).parts if root and dest.is_relative_to(root) else None
    if inside is not None and not (inside and inside[0].startswith(("_", "."))):
        raise ConfigError(
            f"dest={cfg.dest!r} is inside output.dir={cfg.output.dir!r}, which parquet readers then fail "
            f"to read as one table; write it elsewhere or under a name starting with '_' "
            f"(e.g. dest={Path(cfg.output.dir) / ('_' + (inside[0] if inside else 'labels'))})"
        )
    if cfg.format == LabelFormat.yolo:
        if root is not None and root.is_relative_to(dest):
            raise ConfigError(
                f"dest={cfg.dest!r} holds output.dir={cfg.output.dir!r}; the YOLO folder replaces "
                "dest whole: name a folder of its own, e.g. dest=yolo/"
            )
        if dest.is_dir() and any(dest.iterdir()) and not (dest / YOLO_MARKER).exists():
            raise ConfigError(
                f"dest={cfg.dest!r} holds files kosmos-labels did not write, and the YOLO folder replaces dest "
                "whole: name an empty or new folder, or remove this one first"
            )


def export_labels(cfg: LabelsConfig) -> dict:
    cfg.validate()
    folder = existing_output(cfg.output.dir)
    _check_dest(cfg, folder)
    dest = Path(cfg.dest).expanduser()
    names = categories(folder, cfg.classes, cfg.min_score)
    if cfg.format == LabelFormat.coco:
        return write_coco(folder, dest, names, cfg.min_score)
    if cfg.format == LabelFormat.coco_results:
        return write_coco_results(folder, dest, names, cfg.min_score)
    if cfg.format == LabelFormat.labelstudio:
        meta = json.loads(folder.read_text(SETTINGS)) if folder.exists(SETTINGS) else {}
        version = f"kosmos-2 {meta.get('model.source', '')} {meta.get('model.weight_format', '')}".strip()
        return write_labelstudio(folder, dest, names, cfg.min_score, version, cfg.labelstudio)
    return write_yolo(folder, dest.resolve(), names, cfg.min_score, cfg.yolo.confidence)


def main() -> None:
    def work(cfg: LabelsConfig) -> None:
        counts = export_labels(cfg)
        log.info("Wrote %s to %s (%s)", cfg.format, cfg.dest, ", ".join(f"{k}: {v}" for k, v in counts.items()))

    command("labels", work, log)


if __name__ == "__main__":
    main()
