"""Exports of the parquet output: COCO (loaded by pycocotools), Label Studio, YOLO."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import ConfigError
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
    """(phrase, pixel x, y, w, h) per image id, from the parquet output."""
    out = {}
    for row in pq.read_table(folder).to_pylist():
        if row["error"]:
            continue
        w, h = row["width"], row["height"]
        out[row["id"]] = [
            (
                e["phrase"],
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
    assert counts == {"images": len(want), "annotations": sum(len(v) for v in want.values())}
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
    labels(labels_dir, "coco", tmp_path / "coco.json", classes=["A Cat", "dog"])
    data = json.loads((tmp_path / "coco.json").read_text())
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "a cat"), (2, "dog")]
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
        i: f for f, i, _ in (line.split("\t") for line in (tmp_path / "yolo" / "ids.tsv").read_text().splitlines()[1:])
    }
    assert set(mapping) == set(want)
    for image_id, boxes in want.items():
        assert mapping[image_id] == "labels/" + Path(image_id).with_suffix(".txt").name
        lines = (tmp_path / "yolo" / mapping[image_id]).read_text().splitlines()
        assert [classes[int(line.split()[0])] for line in lines] == [b[0] for b in boxes]
        assert all(0 <= float(v) <= 1 for line in lines for v in line.split()[1:])


def test_yolo_gives_every_id_its_own_label_file(tmp_path):
    """`a.jpg` and `a.png` would both be `a.txt`: the second keeps its extension, the mapping says which."""
    box = {"x1": 0.1, "y1": 0.2, "x2": 0.3, "y2": 0.4}
    rows = [
        {
            "id": i,
            "source": f"/data/{i}",
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
        "label_file\tid\tsource",
        "labels/a.txt\ta.jpg\t/data/a.jpg",
        "labels/a.png.txt\ta.png\t/data/a.png",
        "labels/sub/a.txt\tsub/a.jpg\t/data/sub/a.jpg",
        "labels/a.1.txt\ta\t/data/a",
    ]
    classes = (tmp_path / "yolo" / "classes.txt").read_text().splitlines()
    for line in lines[1:]:
        name, image_id, _ = line.split("\t")
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
    with pytest.raises(ConfigError, match="format='voc'"):
        labels(labels_dir, "voc", tmp_path / "x")
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
    assert [c["name"] for c in coco["categories"]] == ["a cat"]  # "a mat" scored 0.2 only

    assert labels(scored_folder, "coco_results", tmp_path / "results.json") == {"detections": 3}
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
    assert labels(folder, "yolo", dest) == {"images": len(rows), "boxes": len(rows)}
    written = [p for p in dest.rglob("*.txt") if p.name != "classes.txt"]
    assert len(written) == len(rows) and all(p.resolve().is_relative_to((dest / "labels").resolve()) for p in written)
    with open(dest / "ids.tsv", newline="") as f:
        table = list(csv.reader(f, delimiter="\t"))
    assert [r[1] for r in table[1:]] == [r["id"] for r in rows]
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


def test_a_failed_export_leaves_no_half_dataset(tmp_path, monkeypatch):
    from pipeline.outputs.labels import yolo

    folder = write_rows(tmp_path / "out", hostile_rows(EXAMPLES))
    real = yolo.rows

    def breaks(folder):
        for k, row in enumerate(real(folder)):
            if k == 3:
                raise OSError(28, "No space left on device")
            yield row

    monkeypatch.setattr(yolo, "rows", breaks)
    with pytest.raises(OSError):
        labels(folder, "yolo", tmp_path / "yolo")
    assert not (tmp_path / "yolo").exists() and not list(tmp_path.glob(".yolo*"))
