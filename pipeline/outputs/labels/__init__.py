"""`kosmos-labels`: an output folder -> a dataset a detector trains on, or labels to review: COCO
(and COCO's results list), Label Studio predictions, YOLO, Hugging Face datasets, GRIT parquet,
Pascal VOC. Phrases are filed under classes (classes.py); every box keeps its score, and
`min_score=` drops the doubtful ones.

    kosmos-labels format=yolo output.dir=labels/ dest=yolo/ classes=[dog,person] split=0.9
    kosmos-labels format=coco output.dir=labels/ dest=coco.json min_score=0.5
    kosmos-labels format=hf output.dir=labels/ dest=hf/
    kosmos-labels format=grit output.dir=labels/ dest=grit.parquet
    kosmos-labels format=voc output.dir=labels/ dest=voc/
    kosmos-labels format=labelstudio output.dir=labels/ dest=tasks.json labelstudio.document_root=/data

`dest` may not be inside the output folder unless its name starts with `_`: the folder must stay
readable as one parquet table. The parts are read in record batches, one pass to find the classes
(where none are given) and one to write, so memory holds the class list, never the dataset. In every
format each annotated image appears once, one that no class takes as a background image; rows with
an error or without a size are left out. Each export prints the boxes each class took.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from pipeline.cli import command
from pipeline.config import ImageCopy, InputConfig, LabelFormat, LabelsConfig
from pipeline.errors import ConfigError
from pipeline.outputs.labels.classes import Classes
from pipeline.outputs.labels.coco import write_coco, write_coco_results
from pipeline.outputs.labels.common import MARKER, Labeller
from pipeline.outputs.labels.grit import write_grit
from pipeline.outputs.labels.hf import write_hf
from pipeline.outputs.labels.images import SourceImages
from pipeline.outputs.labels.labelstudio import write_labelstudio
from pipeline.outputs.labels.voc import write_voc
from pipeline.outputs.labels.yolo import write_yolo
from pipeline.storage.files import Folder
from pipeline.storage.layout import existing_output, hydra_record, recorded_settings

log = logging.getLogger("kosmos-labels")
FOLDERS = (LabelFormat.yolo, LabelFormat.hf, LabelFormat.voc)  # written whole as a folder


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
    if cfg.format in FOLDERS:
        if root is not None and root.is_relative_to(dest):
            raise ConfigError(
                f"dest={cfg.dest!r} holds output.dir={cfg.output.dir!r}; the {cfg.format} folder replaces "
                f"dest whole: name a folder of its own, e.g. dest={cfg.format}/"
            )
        if dest.is_dir() and any(dest.iterdir()) and not (dest / MARKER).exists():
            raise ConfigError(
                f"dest={cfg.dest!r} holds files kosmos-labels did not write, and the {cfg.format} folder replaces "
                "dest whole: name an empty or new folder, or remove this one first"
            )
        if dest.exists() and not dest.is_dir():
            raise ConfigError(
                f"dest={cfg.dest!r} is a file; format={cfg.format} writes a folder, e.g. dest={cfg.format}/"
            )
    elif dest.is_dir():
        raise ConfigError(
            f"dest={cfg.dest!r} is a folder; format={cfg.format} writes a file, e.g. dest={dest / 'labels'}"
        )


def _source_images(folder: Folder) -> SourceImages:
    """The images behind the rows, read with the run's manifest image column and size limit, from its
    Hydra record (a run from the Python API has none: the defaults)."""
    for record in (hydra_record(0, 1), hydra_record(0, 2)):
        if folder.exists(f"{record}/config.yaml"):
            composed = (yaml.safe_load(folder.read_text(f"{record}/config.yaml")) or {}).get("input") or {}
            return SourceImages(
                composed.get("image_column") or "image",
                composed.get("max_image_bytes") or InputConfig().max_image_bytes,
            )
    return SourceImages()


def _write(
    cfg: LabelsConfig,
    folder: Folder,
    dest: Path,
    names: list[str],
    labeller: Labeller,
    settings: dict,
    images: SourceImages,
) -> dict:
    """The format's writer, its counts."""
    if cfg.format == LabelFormat.coco:
        return write_coco(folder, dest, names, labeller)
    elif cfg.format == LabelFormat.coco_results:
        return write_coco_results(folder, dest, names, labeller)
    elif cfg.format == LabelFormat.labelstudio:
        version = f"kosmos-2 {settings.get('model.source', '')} {settings.get('model.weight_format', '')}".strip()
        return write_labelstudio(folder, dest, names, labeller, version, cfg.labelstudio)
    elif cfg.format == LabelFormat.yolo:
        link = cfg.yolo.images == ImageCopy.link
        return write_yolo(folder, dest.resolve(), names, labeller, cfg.yolo.confidence, link, cfg.split, images)
    elif cfg.format == LabelFormat.hf:
        return write_hf(folder, dest.resolve(), names, labeller, cfg.split, images)
    elif cfg.format == LabelFormat.grit:
        return write_grit(folder, dest, labeller)
    else:
        return write_voc(folder, dest.resolve(), names, labeller)


def export_labels(cfg: LabelsConfig) -> dict:
    """Writes the export; returns its counts, with the boxes each class took under "classes"."""
    cfg.validate()
    folder = existing_output(cfg.output.dir)
    _check_dest(cfg, folder)
    settings = recorded_settings(folder) or {}
    dest = Path(cfg.dest).expanduser()
    labeller = Labeller(Classes.of_output(cfg.classes, settings), cfg.min_score)
    names = labeller.names(folder)
    images = _source_images(folder)
    try:
        counts = _write(cfg, folder, dest, names, labeller, settings, images)
    finally:
        images.close()
    return {**counts, **labeller.report(), "classes": dict(labeller.counts)}


def main() -> None:
    def work(cfg: LabelsConfig) -> None:
        counts = export_labels(cfg)
        summary = ", ".join(f"{k}: {v}" for k, v in counts.items() if k != "classes")
        log.info("Wrote %s to %s (%s)", cfg.format, cfg.dest, summary)

    command("labels", work, log)


if __name__ == "__main__":
    main()
