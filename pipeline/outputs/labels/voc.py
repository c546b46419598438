"""Pascal VOC: one XML file an image, as older trainers and CVAT ("PASCAL VOC 1.1") import it."""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from xml.etree import ElementTree as ET

from pipeline.outputs.labels.common import Labeller, export_folder
from pipeline.outputs.labels.yolo import image_stem
from pipeline.storage.files import Folder, safe_relative


def write_voc(folder: Folder, dest: Path, names: list[str], labeller: Labeller) -> dict:
    """`Annotations/<name>.xml` for every annotated image (no `object` where no class took a box),
    `ImageSets/Main/default.txt` listing them, and `labelmap.txt` (the classes, as CVAT writes it).
    Corners are VOC's 1-based pixels; each object keeps its score and phrase, and `filename` is the
    image's id. Written whole: a killed export leaves no folder."""
    counts = {"images": 0, "objects": 0}
    with export_folder(dest, "voc") as out:
        (out / "labelmap.txt").write_text("# label:color_rgb:parts:actions\n" + "".join(f"{n}:::\n" for n in names))
        sets = out / "ImageSets" / "Main"
        sets.mkdir(parents=True)
        with open(sets / "default.txt", "w") as listing:
            for row, boxes in labeller.labelled(folder):
                stem = image_stem(safe_relative(row["id"]), lambda s: (out / "Annotations" / f"{s}.xml").exists())
                target = out / "Annotations" / f"{stem}.xml"
                target.parent.mkdir(parents=True, exist_ok=True)
                ET.ElementTree(_annotation(row, boxes)).write(target, encoding="utf-8", xml_declaration=True)
                listing.write(PurePosixPath(stem).as_posix() + "\n")
                counts["images"] += 1
                counts["objects"] += len(boxes)
    return counts


def _annotation(row: dict, boxes) -> ET.Element:
    root = ET.Element("annotation")
    ET.SubElement(root, "folder").text = ""
    ET.SubElement(root, "filename").text = _xml_text(row["id"])
    ET.SubElement(ET.SubElement(root, "source"), "database").text = "kosmos-annotate"
    size = ET.SubElement(root, "size")
    for tag, value in (("width", row["width"]), ("height", row["height"]), ("depth", 3)):
        ET.SubElement(size, tag).text = str(value)
    ET.SubElement(root, "segmented").text = "0"
    for b in boxes:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = _xml_text(b.label)
        for tag, value in (("pose", "Unspecified"), ("truncated", "0"), ("difficult", "0"), ("occluded", "0")):
            ET.SubElement(obj, tag).text = value
        box = ET.SubElement(obj, "bndbox")
        corners = (b.x + 1, b.y + 1, b.x + b.w, b.y + b.h)  # 1-based, inclusive
        for tag, value in zip(("xmin", "ymin", "xmax", "ymax"), corners):
            ET.SubElement(box, tag).text = f"{value:.1f}"
        if b.score is not None:
            ET.SubElement(obj, "score").text = f"{b.score:.6f}"
        attributes = ET.SubElement(obj, "attributes")
        for name, value in (("phrase", b.phrase), ("attribute", b.attribute)):
            attribute = ET.SubElement(attributes, "attribute")
            ET.SubElement(attribute, "name").text = name
            ET.SubElement(attribute, "value").text = _xml_text(value)
    return root


def _xml_text(text: str) -> str:
    """Text XML 1.0 can hold: other control characters (an id may have any) as U+FFFD."""
    return "".join("\ufffd" if (ord(c) < 32 and c not in "\t\n") or c in "\ufffe\uffff" else c for c in text)
