"""Exports of the parquet output: COCO (loaded by pycocotools), Label Studio, YOLO, Hugging Face datasets, GRIT, VOC."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import ConfigError
from pipeline.outputs.labels.classes import Classes
from pipeline.records import SCHEMA
from tests.helpers import EXAMPLES, REPO, config, labels, write_rows


@pytest.fixture(scope="module")
def labels_dir(trained_checkpoint, trained_export, tmp_path_factory) -> Path:
    photos = tmp_path_factory.mktemp("photos")
    for p in EXAMPLES.glob("*.*g"):
        (photos / p.name).write_bytes(p.read_bytes())
    (photos / "broken.jpg").write_text("not an image")
    out = tmp_path_factory.mktemp("labels")
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(photos)), out), out)
    return out


def parquet_boxes(folder: Path) -> dict[str, list]:
    """(class, pixel x, y, w, h) per image id, from the parquet output: the class is the phrase's head noun."""
    out = {}
    for row in pq.read_table(folder).to_pylist():
        if row["error"]:
            continue
        w, h = row["width"], row["height"]
        out[row["id"]] = [
            (
                Classes(None).of(e["phrase"])[0],
                min(b["x1"], b["x2"]) * w,
                min(b["y1"], b["y2"]) * h,
                abs(b["x2"] - b["x1"]) * w,
                abs(b["y2"] - b["y1"]) * h,
            )
            for e in row["entities"]
            for b in e["boxes"]
        ]
    return out


def test_coco_loads_with_pycocotools_and_round_trips_boxes(labels_dir, tmp_path):
    from pycocotools.coco import COCO

    counts = labels(labels_dir, "coco", tmp_path / "coco.json")
    coco = COCO(str(tmp_path / "coco.json"))
    want = parquet_boxes(labels_dir)
    assert (counts["images"], counts["annotations"]) == (len(want), sum(len(v) for v in want.values()))
    assert counts["classes"] == dict(Counter(c for v in want.values() for c, *_ in v))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {p for v in want.values() for p, *_ in v}
    for image in coco.loadImgs(coco.getImgIds()):
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
        got = [(coco.loadCats(a["category_id"])[0]["name"], *a["bbox"]) for a in anns]
        assert len(got) == len(want[image["file_name"]])
        for g, w in zip(got, want[image["file_name"]]):
            assert g[0] == w[0] and max(abs(a - b) for a, b in zip(g[1:], w[1:])) <= 1.0
            assert abs(anns[0]["area"] - anns[0]["bbox"][2] * anns[0]["bbox"][3]) < 1
    assert "broken.jpg" not in {i["file_name"] for i in coco.loadImgs(coco.getImgIds())}


def test_class_list_fixes_categories_and_their_order(labels_dir, tmp_path):
    labels(labels_dir, "coco", tmp_path / "coco.json", classes=["Cats", "dog"])
    data = json.loads((tmp_path / "coco.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "cat"), (2, "dog")]
    assert {a["category_id"] for a in data["annotations"]} == {1}


def test_labelstudio_predictions(labels_dir, tmp_path):
    counts = labels(labels_dir, "labelstudio", tmp_path / "tasks.json")
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    want = parquet_boxes(labels_dir)
    assert counts["tasks"] == len(tasks) == len(want)
    for task in tasks:
        (prediction,) = task["predictions"]
        assert prediction["model_version"].startswith("kosmos-2")
        assert len(prediction["result"]) == len(want[task["data"]["id"]])
        for region, (phrase, x, _y, _w, h) in zip(prediction["result"], want[task["data"]["id"]]):
            v = region["value"]
            assert region["type"] == "rectanglelabels" and v["rectanglelabels"] == [phrase]
            assert (
                abs(v["x"] * region["original_width"] / 100 - x) < 1
                and abs(v["height"] * region["original_height"] / 100 - h) < 1
            )
            assert 0 <= v["x"] <= 100 and 0 <= v["y"] + v["height"] <= 100.001


def test_yolo_txt(labels_dir, tmp_path):
    counts = labels(labels_dir, "yolo", tmp_path / "yolo")
    classes = (tmp_path / "yolo" / "classes.txt").read_text().splitlines()
    want = parquet_boxes(labels_dir)
    assert counts["images"] == len(want)
    mapping = {
        i: f
        for f, _, i, _ in (line.split("\t") for line in (tmp_path / "yolo" / "ids.tsv").read_text().splitlines()[1:])
    }
    assert set(mapping) == set(want)
    for image_id, boxes in want.items():
        assert mapping[image_id] == "labels/" + Path(image_id).with_suffix(".txt").name
        assert (tmp_path / "yolo" / "images" / image_id).read_bytes() == (EXAMPLES / image_id).read_bytes()
        lines = (tmp_path / "yolo" / mapping[image_id]).read_text().splitlines()
        assert [classes[int(line.split()[0])] for line in lines] == [b[0] for b in boxes]
        assert all(0 <= float(v) <= 1 for line in lines for v in line.split()[1:])


def test_yolo_gives_every_id_its_own_label_file(tmp_path):
    """`a.jpg` and `a.png` would both be `a.txt`: the second keeps its extension, the mapping says which."""
    from PIL import Image

    box = {"x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}
    data = tmp_path / "data"
    for i in ("a.jpg", "a.png", "sub/a.jpg", "a"):
        (data / i).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (100, 50)).save(data / i, format="PNG" if i != "a.jpg" else "JPEG")
    rows = [
        {
            "id": i,
            "source": str(data / i),
            "width": 100,
            "height": 50,
            "prompt": "p",
            "caption": "c",
            "token_ids": [1],
            "entities": [{"phrase": phrase, "start": 0, "end": 1, "boxes": [box]}],
            "error": None,
        }
        for i, phrase in [("a.jpg", "cat"), ("a.png", "dog"), ("sub/a.jpg", "cat"), ("a", "dog")]
    ]
    folder = tmp_path / "out"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-00000-00000.parquet")
    assert labels(folder, "yolo", tmp_path / "yolo")["images"] == 4
    lines = (tmp_path / "yolo" / "ids.tsv").read_text().splitlines()
    assert lines == [
        "label_file\timage_file\tid\tsource",
        f"labels/a.txt\timages/a.jpg\ta.jpg\t{data}/a.jpg",
        f"labels/a.png.txt\timages/a.png.png\ta.png\t{data}/a.png",
        f"labels/sub/a.txt\timages/sub/a.jpg\tsub/a.jpg\t{data}/sub/a.jpg",
        f"labels/a.1.txt\timages/a.1.png\ta\t{data}/a",  # no extension: Pillow names its format
    ]
    classes = (tmp_path / "yolo" / "classes.txt").read_text().splitlines()
    for line in lines[1:]:
        name, image, image_id, _ = line.split("\t")
        assert (tmp_path / "yolo" / image).read_bytes() == (data / image_id).read_bytes()
        phrase = next(r["entities"][0]["phrase"] for r in rows if r["id"] == image_id)
        assert classes[int((tmp_path / "yolo" / name).read_text().split()[0])] == phrase


def test_dest_inside_the_output_folder_must_start_with_underscore(labels_dir, tmp_path):
    """The folder must stay readable as one table: `labels/coco.json` broke `pd.read_parquet("labels/")`."""
    for dest in (labels_dir / "coco.json", labels_dir / "yolo", labels_dir):
        with pytest.raises(ConfigError, match="starting with '_'"):
            labels(labels_dir, "coco" if dest.suffix else "yolo", dest)
    labels(labels_dir, "coco", labels_dir / "_coco.json")
    labels(labels_dir, "yolo", labels_dir / "_yolo")
    import pandas as pd

    assert len(pd.read_parquet(labels_dir)) == len(pq.read_table(labels_dir))


def test_bad_arguments_are_config_errors(labels_dir, tmp_path):
    with pytest.raises(ConfigError, match="format='pdf'"):
        labels(labels_dir, "pdf", tmp_path / "x")
    with pytest.raises(ConfigError, match="holds no part files"):
        labels(tmp_path, "coco", tmp_path / "x.json")


def test_command(labels_dir, tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline.outputs.labels",
            "format=coco",
            f"output.dir={labels_dir}",
            f"dest={tmp_path / 'c.json'}",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Wrote coco to" in proc.stderr + proc.stdout and (tmp_path / "c.json").exists()


# --------------------------------------------------------------------------- scores


@pytest.fixture
def scored_folder(tmp_path) -> Path:
    """Two real images with boxes of known scores (one box per score)."""
    images = tmp_path / "data" / "images"
    images.mkdir(parents=True)
    rows = []
    for name, scores in [("chelsea.png", [0.9, 0.2]), ("coffee.png", [0.6])]:
        (images / name).write_bytes((EXAMPLES / name).read_bytes())
        entities = [
            {
                "phrase": "a cat" if k == 0 else "a mat",
                "start": 0,
                "end": 1,
                "score": s,
                "boxes": [{"x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": s}],
            }
            for k, s in enumerate(scores)
        ]
        rows.append(
            {
                "id": name,
                "source": str(images / name),
                "width": 400,
                "height": 300,
                "prompt": "p",
                "caption": "c",
                "token_ids": [1],
                "entities": entities,
                "error": None,
            }
        )
    folder = tmp_path / "out"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-00000-00000.parquet")
    return folder


def test_every_format_keeps_scores_and_min_score_drops_boxes(scored_folder, tmp_path):
    from pycocotools.coco import COCO

    labels(scored_folder, "coco", tmp_path / "coco.json", min_score=0.5)
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert [a["score"] for a in coco["annotations"]] == pytest.approx([0.9, 0.6])
    assert [c["name"] for c in coco["categories"]] == ["cat"]  # "a mat" scored 0.2 only

    assert labels(scored_folder, "coco_results", tmp_path / "results.json")["detections"] == 3
    gt = COCO(str(tmp_path / "coco.json"))
    labels(scored_folder, "coco_results", tmp_path / "results.json", min_score=0.5)
    results = gt.loadRes(str(tmp_path / "results.json"))  # pycocotools reads it against the COCO file
    assert sorted(a["score"] for a in results.loadAnns(results.getAnnIds())) == pytest.approx([0.6, 0.9])
    assert {a["image_id"] for a in results.loadAnns(results.getAnnIds())} == set(gt.getImgIds())

    labels(scored_folder, "labelstudio", tmp_path / "tasks.json", min_score=0.5)
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert [r["score"] for t in tasks for r in t["predictions"][0]["result"]] == pytest.approx([0.9, 0.6])
    labels(scored_folder, "labelstudio", tmp_path / "tasks.json")
    tasks = json.loads((tmp_path / "tasks.json").read_text())
    assert [t["predictions"][0]["score"] for t in tasks] == pytest.approx([0.55, 0.6])  # the mean of its regions

    labels(scored_folder, "yolo", tmp_path / "yolo", min_score=0.5, yolo={"confidence": True})
    lines = (tmp_path / "yolo" / "labels" / "chelsea.txt").read_text().splitlines()
    assert len(lines) == 1 and float(lines[0].split()[5]) == pytest.approx(0.9)
    labels(scored_folder, "yolo", tmp_path / "yolo2")
    assert [len(line.split()) for line in (tmp_path / "yolo2" / "labels" / "chelsea.txt").read_text().splitlines()] == [
        5,
        5,
    ]


def test_scores_are_required_only_where_used(tmp_path):
    """A folder from before scores existed still exports, but min_score and coco_results say why they cannot."""
    row = {
        "id": "a.jpg",
        "source": "/data/a.jpg",
        "width": 10,
        "height": 10,
        "entities": [{"phrase": "cat", "start": 0, "end": 3, "boxes": [{"x1": 0.1, "y1": 0.1, "x2": 0.5, "y2": 0.5}]}],
        "error": None,
    }
    folder = tmp_path / "old"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=SCHEMA), folder / "part-00000-00000.parquet")
    assert labels(folder, "coco", tmp_path / "c.json")["annotations"] == 1
    with pytest.raises(ConfigError, match="min_score needs box scores.*'a.jpg'"):
        labels(folder, "coco", tmp_path / "c.json", min_score=0.3)
    with pytest.raises(ConfigError, match="coco_results needs box scores"):
        labels(folder, "coco_results", tmp_path / "r.json")
    assert not (tmp_path / "r.json").exists()


def test_labelstudio_image_references(scored_folder, tmp_path, caplog):
    root = scored_folder.parent / "data"
    labels(scored_folder, "labelstudio", tmp_path / "t.json", labelstudio={"document_root": str(root)})
    assert [t["data"]["image"] for t in json.loads((tmp_path / "t.json").read_text())] == [
        "/data/local-files/?d=images/chelsea.png",
        "/data/local-files/?d=images/coffee.png",
    ]
    labels(scored_folder, "labelstudio", tmp_path / "t.json", labelstudio={"url_prefix": "s3://bucket/photos/"})
    assert json.loads((tmp_path / "t.json").read_text())[0]["data"]["image"] == "s3://bucket/photos/chelsea.png"
    with pytest.raises(ConfigError, match="is not under labelstudio.document_root"):
        labels(
            scored_folder,
            "labelstudio",
            tmp_path / "t.json",
            labelstudio={"document_root": str(tmp_path / "elsewhere")},
        )
    with caplog.at_level("WARNING"):
        labels(scored_folder, "labelstudio", tmp_path / "t.json")
    assert "Label Studio cannot open" in caplog.text


def hostile_rows(images: Path) -> list[dict]:
    box = {"x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": 0.9}
    entity = {"phrase": "a cat", "start": 0, "end": 5, "score": 0.9, "boxes": [box]}
    ids = ["", ".", "a\x00b.jpg", "../../outside.jpg", "/abs/x.jpg", "tab\tid.png", "new\nline.png"]
    ids += ["cr\rid.png", 'q"uote.png', "ok/a.jpg", "ok/a.png", "x" * 300 + ".jpg"]
    return [
        {"id": i, "source": str(images / "chelsea.png"), "width": 400, "height": 300, "prompt": "p", "caption": "a cat",
         "token_ids": [1], "entities": [entity], "error": None}
        for i in ids
    ]  # fmt: skip


def test_yolo_takes_any_id_and_writes_only_inside_its_folder(tmp_path):
    """Absolute and `../` ids aborted the export halfway; "", "." and NUL gave a traceback; a tab or
    a newline corrupted ids.tsv."""
    import csv

    rows = hostile_rows(EXAMPLES)
    folder = write_rows(tmp_path / "out", rows)
    dest = tmp_path / "yolo"
    counts = labels(folder, "yolo", dest)
    assert (counts["images"], counts["boxes"]) == (len(rows), len(rows))
    written = [p for p in dest.rglob("*.txt") if p.name != "classes.txt"]
    assert len(written) == len(rows) and all(p.resolve().is_relative_to((dest / "labels").resolve()) for p in written)
    with open(dest / "ids.tsv", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert [r[2] for r in table[1:]] == [r["id"] for r in rows]
    assert all((dest / r[1]).resolve().is_relative_to((dest / "images").resolve()) for r in table[1:])
    assert all((dest / r[0]).read_text().startswith("0 ") for r in table[1:])
    assert not list(tmp_path.glob(".yolo*"))


def test_yolo_replaces_only_a_folder_it_wrote(tmp_path, monkeypatch):
    """The YOLO folder replaces dest whole: dest=. or dest=~/data once meant the folder was deleted."""
    folder = write_rows(tmp_path / "out", hostile_rows(EXAMPLES)[-2:])
    mine = tmp_path / "yolo"
    labels(folder, "yolo", mine)
    labels(folder, "yolo", mine)  # an export of ours is replaced
    theirs = tmp_path / "data"
    (theirs / "keep").mkdir(parents=True)
    (theirs / "keep" / "photo.jpg").write_bytes(b"mine")
    with pytest.raises(ConfigError, match="did not write"):
        labels(folder, "yolo", theirs)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="holds output.dir"):
        labels(folder, "yolo", ".")
    assert (theirs / "keep" / "photo.jpg").read_bytes() == b"mine" and (folder / "part-00000-00000.parquet").exists()
    labels(folder, "yolo", tmp_path / "empty")  # a new folder, and an empty one, are fine
    (tmp_path / "bare").mkdir()
    labels(folder, "yolo", tmp_path / "bare")


@pytest.mark.parametrize("fmt", ["yolo", "voc", "hf", "grit", "coco"])
def test_a_failed_export_leaves_no_half_dataset(tmp_path, monkeypatch, fmt):
    from pipeline.outputs.labels import common

    if fmt == "hf":
        pytest.importorskip("datasets", reason='format=hf needs the hf extra: pip install "kosmos-annotate[hf]"')
    folder = write_rows(tmp_path / "out", hostile_rows(EXAMPLES))
    real = common.rows

    def breaks(folder, parts=None):
        for k, row in enumerate(real(folder, parts)):
            if k == 3:
                raise OSError(28, "No space left on device")
            yield row

    monkeypatch.setattr(common, "rows", breaks)
    dest = tmp_path / ("export.parquet" if fmt == "grit" else "export.json" if fmt == "coco" else "export")
    with pytest.raises(OSError):
        labels(folder, fmt, dest)
    assert not dest.exists() and not list(tmp_path.glob(".export*")), list(tmp_path.iterdir())


# --------------------------------------------------------------------------- datasets to train on


def test_yolo_dataset_as_ultralytics_reads_it(labels_dir, tmp_path):
    """images/ and labels/ pair by ultralytics' rule (`/images/` -> `/labels/`, the extension -> .txt),
    data.yaml names the classes and the splits. ultralytics itself checks it where it imports (it needs
    torchvision, which does not import against torch 2.13.0's CPU build here)."""
    import yaml

    dest = tmp_path / "yolo"
    counts = labels(labels_dir, "yolo", dest, split=0.5, yolo={"images": "copy"})
    data = yaml.safe_load((dest / "data.yaml").read_text())
    assert data["train"] == "images/train" and data["val"] == "images/val" and data["path"] == str(dest.resolve())
    assert list(data["names"].values()) == (dest / "classes.txt").read_text().splitlines()
    images = sorted(p for p in (dest / "images").rglob("*") if p.is_file())
    assert len(images) == counts["images"] == len(parquet_boxes(labels_dir))
    for image in images:
        label = Path(str(image).replace("/images/", "/labels/")).with_suffix(".txt")
        assert label.exists() and image.parent.name in ("train", "val")
        for line in label.read_text().splitlines():
            cls, *xywh = line.split()
            assert 0 <= int(cls) < len(data["names"]) and all(0 <= float(v) <= 1 for v in xywh)
    again = tmp_path / "again"
    labels(labels_dir, "yolo", again, split=0.5)
    assert sorted(p.relative_to(again / "images") for p in (again / "images").rglob("*.*")) == [
        p.relative_to(dest / "images") for p in images
    ]  # the split is the same each time; link or copy, the same names


ULTRALYTICS = REPO / ".ultralytics"  # .ci/run installs ultralytics there, apart (see there why)
ULTRALYTICS_CHECK = """
import sys
from ultralytics.data import YOLODataset
from ultralytics.data.utils import check_det_dataset
data = check_det_dataset(sys.argv[1])
for split in ("train", "val"):
    ds = YOLODataset(img_path=data[split], data=data, task="detect", imgsz=64, augment=False)
    assert all(ds[k]["img"].shape[0] == 3 for k in range(len(ds)))  # every image loads
    print("SPLIT", split, len(ds), sum(len(label["cls"]) for label in ds.labels))
"""


@pytest.mark.skipif(not ULTRALYTICS.is_dir(), reason="ultralytics is not installed in .ultralytics/ (.ci/run does it)")
def test_ultralytics_checks_and_loads_the_yolo_dataset(labels_dir, tmp_path):
    """ultralytics' own dataset check and dataset class parse every label and load every image.
    Training cannot run here: torchvision's wheels do not import against torch 2.13.0's CPU build
    (`operator torchvision::nms does not exist`), and training needs its NMS."""
    dest = tmp_path / "yolo"
    counts = labels(labels_dir, "yolo", dest, split=0.5)
    env = {**os.environ, "PYTHONPATH": f"{ULTRALYTICS}:{REPO}", "YOLO_OFFLINE": "1", "YOLO_CONFIG_DIR": str(tmp_path)}
    proc = subprocess.run(
        [sys.executable, "-c", ULTRALYTICS_CHECK, str(dest / "data.yaml")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = (line.split()[1:] for line in proc.stdout.splitlines() if line.startswith("SPLIT "))
    seen = {split: (int(n), int(b)) for split, n, b in found}
    assert sum(n for n, _ in seen.values()) == counts["images"] and sum(b for _, b in seen.values()) == counts["boxes"]


def test_hf_dataset_loads_with_datasets(labels_dir, tmp_path):
    datasets = pytest.importorskip("datasets", reason='format=hf needs the hf extra: pip install "kosmos-annotate[hf]"')
    counts = labels(labels_dir, "hf", tmp_path / "hf")
    ds = datasets.load_from_disk(str(tmp_path / "hf"))
    want = parquet_boxes(labels_dir)
    assert len(ds) == counts["images"] == len(want)
    category = ds.features["objects"]["category"]  # Sequence of a dict: a dict of Sequences
    names = getattr(category, "feature", category).names
    assert isinstance(ds.features["image"], datasets.Image) and names == sorted(
        {c for v in want.values() for c, *_ in v}
    )
    for example in ds:
        assert example["image"].size == (example["width"], example["height"])
        got = list(zip(example["objects"]["category"], example["objects"]["bbox"]))
        assert len(got) == len(want[example["id"]])
        for (category, bbox), (cls, x, y, w, h) in zip(got, want[example["id"]]):
            assert names[category] == cls and max(abs(a - b) for a, b in zip(bbox, (x, y, w, h))) <= 1.0
        assert all(0 <= s <= 1 for s in example["objects"]["score"])
    split = datasets.load_from_disk(str(labels(labels_dir, "hf", tmp_path / "hf2", split=0.5) and tmp_path / "hf2"))
    assert set(split) == {"train", "validation"} and len(split["train"]) + len(split["validation"]) == len(want)


def test_grit_rows_span_their_caption(labels_dir, tmp_path):
    counts = labels(labels_dir, "grit", tmp_path / "grit.parquet")
    table = pq.read_table(tmp_path / "grit.parquet").to_pylist()
    out = {r["id"]: r for r in pq.read_table(labels_dir).to_pylist() if not r["error"]}
    assert len(table) == counts["rows"] == len(out)
    for row in table:
        entities = [e for e in out[row["id"]]["entities"] for _ in e["boxes"]]
        assert len(row["ref_exps"]) == len(row["noun_chunks"]) == len(entities)
        for ref, chunk, entity in zip(row["ref_exps"], row["noun_chunks"], entities):
            assert row["caption"][int(ref[0]) : int(ref[1])] == entity["phrase"]
            assert ref[0] == chunk[0] <= chunk[1] <= ref[1] and ref[2:] == chunk[2:]
            assert all(0 <= v <= 1 for v in ref[2:6]) and ref[2] <= ref[4] and ref[3] <= ref[5]


def test_grit_noun_chunks_end_at_the_head_noun():
    from pipeline.outputs.labels.common import Box
    from pipeline.outputs.labels.grit import _chunk_end

    def chunk(phrase, at=10):
        return _chunk_end(Box("x", 0, 0, 1, 1, 0.5, phrase, "", at, at + len(phrase))) - at

    assert chunk("a man in a red shirt") == len("a man")
    assert chunk("A brown dog") == len("A brown dog")
    assert chunk("two dogs playing on the grass") == len("two dogs")
    assert chunk("the ingredients in a bowl") == len("the ingredients")  # not at the "in" of "ingredients"
    assert chunk("an onion on a plate") == len("an onion")
    assert chunk("a dog, running") == len("a dog")
    assert _chunk_end(Box("x", 0, 0, 1, 1, 0.5, "", "", 7, 7)) == 7  # no phrase: an empty span


def test_voc_xml_parses_back(labels_dir, tmp_path):
    from xml.etree import ElementTree as ET

    counts = labels(labels_dir, "voc", tmp_path / "voc")
    want = parquet_boxes(labels_dir)
    listed = (tmp_path / "voc" / "ImageSets" / "Main" / "default.txt").read_text().splitlines()
    assert len(listed) == counts["images"] == len(want)
    for stem in listed:
        root = ET.parse(tmp_path / "voc" / "Annotations" / f"{stem}.xml").getroot()
        image_id = root.findtext("filename")
        got = root.findall("object")
        assert len(got) == len(want[image_id])
        assert int(root.findtext("size/width")) > 0
        for obj, (cls, x, y, _w, h) in zip(got, want[image_id]):
            box = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            assert obj.findtext("name") == cls and abs(box[0] - (x + 1)) <= 1.1 and abs(box[3] - (y + h)) <= 1.1
            assert 0 <= float(obj.findtext("score")) <= 1


def test_background_images_are_kept_and_counts_are_reported(labels_dir, tmp_path, caplog):
    """An image no class takes is still in the dataset (an empty label file, a COCO image without
    annotations); each export reports the boxes of each class and warns when most are left out."""
    with caplog.at_level("INFO", logger="kosmos-labels"):
        counts = labels(labels_dir, "yolo", tmp_path / "yolo", classes=["rocket"])
    want = parquet_boxes(labels_dir)
    assert counts["images"] == len(want) and counts["classes"] == {"rocket": counts["boxes"]}
    assert counts["unmatched boxes"] == sum(len(v) for v in want.values()) - counts["boxes"]
    empty = [p for p in (tmp_path / "yolo" / "labels").glob("*.txt") if not p.read_text()]
    assert len(empty) == sum(1 for v in want.values() if not any(c == "rocket" for c, *_ in v))
    assert "rocket" in caplog.text and "(no class)" in caplog.text
    if counts["unmatched boxes"] > counts["boxes"]:
        assert "the classes took" in caplog.text


@pytest.mark.parametrize("fmt", ["yolo", "hf"])
def test_an_image_no_longer_there_is_one_clear_error(tmp_path, monkeypatch, fmt):
    """A relative source read from another folder made dangling links (yolo) and a traceback (hf)."""
    from pipeline.errors import InputError

    if fmt == "hf":
        pytest.importorskip("datasets", reason='format=hf needs the hf extra: pip install "kosmos-annotate[hf]"')
    rows = hostile_rows(EXAMPLES)[-3:]
    rows[1]["source"] = "photos/gone.png"
    folder = write_rows(tmp_path / "out", rows)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=r"'photos/gone.png' is not there \(a path relative to the folder the run ran"):
        labels(folder, fmt, tmp_path / "export")
    assert not (tmp_path / "export").exists()


def test_images_come_from_manifests_tars_and_odd_files(tmp_path):
    """A manifest's bytes, a tar's samples (keys in folders; of a jpeg and a png member the jpeg, as a
    run takes them: jpg, jpeg, png, webp), a GIF (re-encoded as PNG, which ultralytics reads), and an
    id under an `images/` folder (ultralytics swaps the last `/images/` of a path for `/labels/`)."""
    import io
    import tarfile

    from PIL import Image

    def png(colour, kind="PNG"):
        out = io.BytesIO()
        Image.new("RGB", (40, 30), colour).save(out, kind)
        return out.getvalue()

    pq.write_table(pa.table({"image": [png("red"), png("green")]}), tmp_path / "m.parquet")
    with tarfile.open(tmp_path / "shard.tar", "w") as tar:
        for name, data in [("dir/0001.jpeg", png("blue", "JPEG")), ("dir/0001.png", png("white")),
                           ("dir/0002.png", png("black"))]:  # fmt: skip
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "photos" / "images").mkdir(parents=True)
    Image.new("RGB", (40, 30), "yellow").save(tmp_path / "photos" / "images" / "a.gif")
    box = {"x1": 0.1, "y1": 0.2, "x2": 0.5, "y2": 0.6, "score": 0.9}
    sources = {
        "m.parquet#1": str(tmp_path / "m.parquet#1"),
        "dir/0001": str(tmp_path / "shard.tar#dir/0001"),
        "dir/0002": str(tmp_path / "shard.tar#dir/0002"),
        "images/a.gif": str(tmp_path / "photos" / "images" / "a.gif"),
    }
    rows = [
        {"id": i, "source": s, "width": 40, "height": 30, "prompt": "p", "caption": "a cat", "token_ids": [1],
         "entities": [{"phrase": "a cat", "start": 0, "end": 5, "score": 0.9, "boxes": [box]}], "error": None}
        for i, s in sources.items()
    ]  # fmt: skip
    folder = write_rows(tmp_path / "out", rows)
    dest = tmp_path / "yolo"
    assert labels(folder, "yolo", dest)["images"] == 4
    table = [line.split("\t") for line in (dest / "ids.tsv").read_text().splitlines()[1:]]
    got = {i: Image.open(dest / image).convert("RGB").getpixel((0, 0)) for _, image, i, _ in table}
    assert got["m.parquet#1"] == (0, 128, 0) and got["dir/0002"] == (0, 0, 0)
    assert max(abs(a - b) for a, b in zip(got["dir/0001"], (0, 0, 255))) < 8  # the jpeg member, not the png
    assert got["images/a.gif"] == (255, 255, 0) and Image.open(dest / table[3][1]).format == "PNG"
    for label, image, _, _ in table:  # ultralytics' rule finds every label
        assert Path(str(dest / image).replace("/images/", "/labels/")).with_suffix(".txt") == dest / label

    datasets = pytest.importorskip("datasets", reason='format=hf needs the hf extra: pip install "kosmos-annotate[hf]"')
    labels(folder, "hf", tmp_path / "hf")
    pixels = {
        e["id"]: e["image"].convert("RGB").getpixel((0, 0)) for e in datasets.load_from_disk(str(tmp_path / "hf"))
    }
    assert pixels["m.parquet#1"] == (0, 128, 0) and pixels["dir/0002"] == (0, 0, 0) and len(pixels) == 4


def test_small_splits_and_empty_outputs_still_give_a_dataset(tmp_path, caplog):
    rows = hostile_rows(EXAMPLES)[-1:]
    folder = write_rows(tmp_path / "out", rows)
    with caplog.at_level("WARNING", logger="kosmos-labels"):
        labels(folder, "yolo", tmp_path / "yolo", split=0.5)
    assert (tmp_path / "yolo" / "images" / "train").is_dir() and (tmp_path / "yolo" / "images" / "val").is_dir()
    assert "put no image in" in caplog.text
    datasets = pytest.importorskip("datasets", reason='format=hf needs the hf extra: pip install "kosmos-annotate[hf]"')
    from pipeline.errors import InputError

    assert datasets
    errors = write_rows(tmp_path / "errors", [{**rows[0], "error": "not an image: x", "width": None}])
    assert labels(errors, "coco", tmp_path / "c.json")["images"] == 0  # an empty COCO file
    with pytest.raises(InputError, match="holds no annotated image"):
        labels(errors, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_a_folder_format_refuses_a_file_dest(tmp_path):
    folder = write_rows(tmp_path / "out", hostile_rows(EXAMPLES)[-1:])
    (tmp_path / "coco.json").write_text("{}")
    with pytest.raises(ConfigError, match="is a file"):
        labels(folder, "yolo", tmp_path / "coco.json")
    assert (tmp_path / "coco.json").read_text() == "{}"


def test_a_tar_member_over_the_runs_limit_is_passed_unread(tmp_path):
    """The run refused it unread (input.max_image_bytes); reading forward to a later sample must not read it either."""
    import io
    import tarfile

    from pipeline.errors import InputError
    from pipeline.outputs.labels.images import SourceImages

    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for name, size in (("big.png", 5000), ("small.png", 10)):
            info = tarfile.TarInfo(name)
            info.size = size
            tar.addfile(info, io.BytesIO(b"x" * size))
    images = SourceImages(max_bytes=1000)
    assert images.data(f"{tmp_path}/s.tar#small") == b"x" * 10
    assert "big" not in images._readers[f"{tmp_path}/s.tar"].kept
    with pytest.raises(InputError, match="no longer in"):
        images.data(f"{tmp_path}/s.tar#big")
    images.close()
