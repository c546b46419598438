"""End-to-end annotation runs on the fixture models, through the real OpenVINO path."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.hardware import has_bf16
from pipeline.records import SCHEMA
from tests.helpers import EXAMPLES, PROMPT, TRAINED_CAPTIONS, annotate, config, entity_view, expected, model_overrides


@pytest.fixture(scope="module")
def mixed_folder(tmp_path_factory) -> Path:
    """png, jpg, grayscale, RGBA, EXIF-rotated, nested folders, upper-case extension, a non-image file."""
    root = tmp_path_factory.mktemp("photos")
    (root / "pets" / "indoor").mkdir(parents=True)
    shutil.copy(EXAMPLES / "chelsea.png", root / "pets" / "indoor" / "chelsea.png")
    shutil.copy(EXAMPLES / "coffee.png", root / "coffee.png")
    shutil.copy(EXAMPLES / "astronaut.png", root / "astronaut.png")
    shutil.copy(EXAMPLES / "rocket.jpg", root / "rocket.jpg")
    shutil.copy(EXAMPLES / "camera.png", root / "gray_camera.PNG")  # grayscale, upper-case extension
    Image.open(EXAMPLES / "coffee.png").convert("RGBA").save(root / "pets" / "rgba.png")
    rotated = Image.open(EXAMPLES / "rocket.jpg").convert("RGB").resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    rotated.save(root / "rotated.jpg", exif=exif)
    (root / "notes.txt").write_text("not an image")
    return root


@pytest.fixture(scope="module")
def folder_run(trained_checkpoint, trained_export, mixed_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("labels")
    cfg = config(
        trained_checkpoint, trained_export, InputConfig(path=str(mixed_folder)), out, preview={"enabled": True}
    )
    return run(cfg, out), out


def test_folder_run_writes_one_row_per_image_with_the_contract_schema(folder_run):
    summary, out = folder_run
    table = pq.read_table(out)
    assert table.schema.remove_metadata() == SCHEMA
    ids = table.column("id").to_pylist()
    assert ids == sorted(ids, key=lambda i: i.split("/")) and len(ids) == 7
    assert set(ids) == {
        "astronaut.png",
        "coffee.png",
        "gray_camera.PNG",
        "pets/indoor/chelsea.png",
        "pets/rgba.png",
        "rocket.jpg",
        "rotated.jpg",
    }
    assert table.column("error").null_count == 7
    assert summary.items == 7 and summary.errors == 0
    # Every file in the folder is either a part or starts with "_" or "." (readers skip those).
    assert all(p.name.startswith(("part-", "_", ".")) for p in out.iterdir())


def test_trained_entities_and_boxes_come_back(folder_run, processor):
    _, out = folder_run
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    for name, id_ in [
        ("chelsea.png", "pets/indoor/chelsea.png"),
        ("coffee.png", "coffee.png"),
        ("astronaut.png", "astronaut.png"),
        ("rocket.jpg", "rocket.jpg"),
    ]:
        row = rows[id_]
        want_caption, want_entities = expected(processor, name)
        assert row["caption"].replace(" ", "") == want_caption
        assert entity_view(row) == want_entities
        assert row["prompt"] == PROMPT
        for e in row["entities"]:
            assert row["caption"][e["start"] : e["end"]] == e["phrase"]
        assert row["token_ids"] and processor.tokenizer.eos_token_id not in row["token_ids"]


def test_sizes_are_after_exif_orientation(folder_run):
    _, out = folder_run
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert (rows["rotated.jpg"]["width"], rows["rotated.jpg"]["height"]) == (80, 120)
    assert (rows["gray_camera.PNG"]["width"], rows["gray_camera.PNG"]["height"]) == (512, 512)


def test_previews_and_summary(folder_run):
    summary, out = folder_run
    previews = sorted((out / "_previews").iterdir())
    assert len(previews) == 7
    assert all(Image.open(p).format == "JPEG" and max(Image.open(p).size) <= 768 for p in previews)
    record = json.loads((out / "_summary.json").read_text())
    assert record["items"] == 7 and record["errors"] == 0
    assert record["entities"] == summary.entities >= 5
    assert record["boxes"] > record["entities"] - 1 and record["generated_tokens"] > 0
    assert record["images_per_s"] > 0 and record["weight_format"] == "fp32"
    assert record["config"]["input"]["path"]


def test_output_reads_as_one_table_everywhere(folder_run):
    _, out = folder_run
    import duckdb
    import pandas as pd
    import polars as pl

    assert len(pd.read_parquet(out)) == 7
    assert ds.dataset(out, format="parquet").count_rows() == 7
    assert duckdb.sql(f"select count(*) from read_parquet('{out}/*.parquet')").fetchall() == [(7,)]
    assert pl.read_parquet(f"{out}/*.parquet").height == 7


def write_manifest(path: Path, table: pa.Table, **kw) -> Path:
    pq.write_table(table, path, **kw)
    return path


def test_manifest_with_paths_prompts_and_kept_columns(trained_checkpoint, trained_export, tmp_path, processor):
    (tmp_path / "imgs").mkdir()
    for name in TRAINED_CAPTIONS:
        shutil.copy(EXAMPLES / name, tmp_path / "imgs" / name)
    names = list(TRAINED_CAPTIONS)
    manifest = write_manifest(
        tmp_path / "manifest.parquet",
        pa.table(
            {
                "path": [f"imgs/{n}" for n in names] + ["imgs/missing.png"],
                "prompt": [PROMPT, None, "", "<grounding>A photo of", None],
                "label": [1, 2, 3, 4, 5],
                "meta": [{"a": i} for i in range(5)],
            }
        ),
    )
    out = tmp_path / "out"
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(
            kind="parquet",
            path=str(manifest),
            image_column="path",
            prompt_column="prompt",
            keep_columns=["label", "meta"],
        ),
        out,
    )
    summary = run(cfg, out)
    table = pq.read_table(out)
    assert table.schema.field("label").type == pa.int64() and table.schema.field("meta").type == pa.struct(
        [("a", pa.int64())]
    )
    rows = {r["id"]: r for r in table.to_pylist()}
    assert set(rows) == {f"imgs/{n}" for n in names} | {"imgs/missing.png"}
    assert rows["imgs/chelsea.png"]["source"] == str(tmp_path / "imgs" / "chelsea.png")
    assert [rows[f"imgs/{n}"]["label"] for n in names] == [1, 2, 3, 4]
    assert rows["imgs/missing.png"]["error"].startswith("file not found") and rows["imgs/missing.png"]["label"] == 5
    assert rows["imgs/missing.png"]["caption"] is None and rows["imgs/missing.png"]["width"] is None
    # Null and empty prompts fall back to `prompt`; a given one is used.
    assert [rows[f"imgs/{n}"]["prompt"] for n in names] == [PROMPT, PROMPT, PROMPT, "<grounding>A photo of"]
    assert rows["imgs/rocket.jpg"]["caption"].startswith("A photo of")
    assert entity_view(rows["imgs/chelsea.png"]) == expected(processor, "chelsea.png")[1]
    assert summary.errors == 1


def test_manifest_with_image_bytes(trained_checkpoint, trained_export, tmp_path, processor):
    """A binary column, and the {bytes, path} struct that Hugging Face datasets writes."""
    names = list(TRAINED_CAPTIONS)
    raw = [(EXAMPLES / n).read_bytes() for n in names]
    struct = pa.array(
        [{"bytes": b, "path": n} for b, n in zip(raw, names)],
        pa.struct([("bytes", pa.binary()), ("path", pa.string())]),
    )
    manifest = write_manifest(tmp_path / "hf.parquet", pa.table({"image": struct, "key": [f"k{i}" for i in range(4)]}))
    binary = write_manifest(tmp_path / "bin.parquet", pa.table({"jpeg": pa.array(raw + [None], pa.binary())}))

    out = tmp_path / "hf"
    run(
        config(
            trained_checkpoint, trained_export, InputConfig(kind="parquet", path=str(manifest), id_column="key"), out
        ),
        out,
    )
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == ["k0", "k1", "k2", "k3"]
    assert rows["k0"]["source"] == f"{tmp_path / 'hf.parquet'}#0"
    for i, n in enumerate(names):
        assert entity_view(rows[f"k{i}"]) == expected(processor, n)[1]

    out = tmp_path / "bin"
    run(
        config(
            trained_checkpoint, trained_export, InputConfig(kind="parquet", path=str(binary), image_column="jpeg"), out
        ),
        out,
    )
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert list(rows) == [f"bin.parquet#{i}" for i in range(5)]  # no path: the file and the row in it
    assert rows["bin.parquet#4"]["error"] == "null image: column 'jpeg' is null in this row"
    assert entity_view(rows["bin.parquet#2"]) == expected(processor, names[2])[1]


def test_parts_are_bounded_in_rows(trained_checkpoint, trained_export, mixed_folder, tmp_path):
    out = tmp_path / "out"
    run(
        config(
            trained_checkpoint, trained_export, InputConfig(path=str(mixed_folder)), out, output={"rows_per_file": 3}
        ),
        out,
    )
    parts = sorted(p.name for p in out.glob("*.parquet"))
    assert parts == ["part-00000-00000.parquet", "part-00000-00001.parquet", "part-00000-00002.parquet"]
    assert [pq.read_metadata(out / p).num_rows for p in parts] == [3, 3, 1]


def test_command_annotates_a_folder(trained_checkpoint, trained_export, tmp_path):
    out = tmp_path / "labels"
    proc, _ = annotate(
        f"input.path={EXAMPLES}",
        f"output.dir={out}",
        *model_overrides(trained_checkpoint, trained_export),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Annotated 6 images (0 errors)" in proc.stderr and proc.stdout == ""  # logs on stderr
    assert pq.read_table(out).num_rows == 6
    assert (out / ".hydra" / "config.yaml").exists() and (out / "_summary.json").exists()


@pytest.mark.parametrize(
    "script, override, message",
    [
        (
            "kosmos-annotate",
            "model.weight_format=int3",
            "Invalid value 'int3', expected one of [fp32, fp16, int8, int4]",
        ),
        ("kosmos-export", "model.weight_format=int3", "Invalid value 'int3', expected one of [fp32, fp16, int8, int4]"),
        ("kosmos-status", "output.dir=nothing-here", "holds no part files"),
    ],
)
def test_console_scripts_find_their_config_from_anywhere(tmp_path, script, override, message):
    """Installed entry points (not `python -m`) start from any folder and reach the config."""
    exe = Path(sys.executable).parent / script
    if not exe.exists():
        pytest.skip(f"{script} is not installed in this environment (pip install -e .)")
    proc = subprocess.run([str(exe), override], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr + proc.stdout and override.split("=")[0] in proc.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["input.path=does/not/exist"], "input.path='does/not/exist' does not exist"),
        (["input.path=empty"], "holds no images"),
        (["input=parquet", "input.path=m.parquet", "input.image_column=photo"], "has no column 'photo'"),
        (
            ["input.path=photos", "model.source=nobody/no-such-model", "model.dir=null"],
            "model.source=/path/to/that/folder",
        ),
        (["input.path=photos", "input.limit=-1"], "input.limit=-1"),
        (
            ["input.path=photos", "output.compression=zstandard"],
            "Invalid value 'zstandard', expected one of [zstd, snappy",
        ),
        (["input.path=photos", "engine.device=NPU"], "engine.device='NPU'"),
        pytest.param(
            ["input.path=photos", "engine.precision=bf16"],
            "engine.precision=bf16: CPU on this machine computes no bf16",
            marks=pytest.mark.skipif(
                has_bf16("CPU"), reason="this CPU computes bf16, so engine.precision=bf16 is allowed"
            ),
        ),
        (
            ["input.path=photos", "input.phrases_column=classes", "task=ground"],
            "input.phrases_column applies to parquet",
        ),
        (["input.path=photos", "engine.max_new_tokens=500"], "engine.max_new_tokens=500 does not fit"),
        (["input.path=photos", "input.extensions=[jpg,svg,heic]"], "input.extensions holds svg, heic, which this"),
        (["input.path=photos", "engine.batchsize=4"], "batchsize"),  # Hydra's own error: a misspelt key
    ],
)
def test_bad_input_is_one_clear_line_and_nothing_written(
    tmp_path, overrides, message, trained_checkpoint, trained_export
):
    """Exit status 2, the reason on stderr (stdout empty), before anything is loaded or written."""
    if "model.source=nobody/no-such-model" not in overrides:
        overrides = [*model_overrides(trained_checkpoint, trained_export), *overrides]
    (tmp_path / "empty").mkdir()
    (tmp_path / "photos").mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / "photos" / "rocket.jpg")
    pq.write_table(pa.table({"path": ["photos/rocket.jpg"]}), tmp_path / "m.parquet")
    os.environ["KOSMOS_ANNOTATE_CACHE"] = str(tmp_path / "cache")
    try:
        proc, _ = annotate(
            *overrides, f"output.dir={tmp_path / 'labels'}", "hydra.run.dir=" + str(tmp_path / "hydra"), cwd=tmp_path
        )
    finally:
        del os.environ["KOSMOS_ANNOTATE_CACHE"]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "labels").exists()


def test_million_row_manifest_streams(trained_checkpoint, trained_export, tmp_path):
    """input.limit=50 on 1,000,000 rows with distinct ids: the reader streams, so peak memory is that of
    a small manifest, and all 50 rows are annotated."""
    paths = pa.array(np.array(["imgs/rocket.jpg", "imgs/coffee.png"])[np.arange(1_000_000) % 2])
    (tmp_path / "imgs").mkdir()
    shutil.copy(EXAMPLES / "rocket.jpg", tmp_path / "imgs")
    shutil.copy(EXAMPLES / "coffee.png", tmp_path / "imgs")
    ids = pa.array([f"row-{i:07d}" for i in range(1_000_000)])
    big = write_manifest(tmp_path / "big.parquet", pa.table({"path": paths, "key": ids, "n": np.arange(1_000_000)}))
    small = write_manifest(
        tmp_path / "small.parquet", pa.table({"path": paths[:100], "key": ids[:100], "n": np.arange(100)})
    )

    peaks = {}
    for name, manifest in [("small", small), ("big", big)]:
        proc, usage = annotate(
            "input=parquet",
            f"input.path={manifest}",
            "input.image_column=path",
            "input.id_column=key",
            "input.limit=50",
            "input.keep_columns=[n]",
            f"output.dir={tmp_path / name}",
            *model_overrides(trained_checkpoint, trained_export),
            cwd=tmp_path,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        table = pq.read_table(tmp_path / name)
        assert table.column("n").to_pylist() == list(range(50))
        assert table.column("error").null_count == 50 and all(table.column("caption").to_pylist())
        peaks[name] = usage.ru_maxrss / 1024  # MiB
    print(f"peak RSS: small manifest {peaks['small']:.0f} MiB, 1M-row manifest {peaks['big']:.0f} MiB")
    assert peaks["big"] < peaks["small"] + 64


def test_a_prompt_too_long_for_the_model_is_an_error_row(trained_checkpoint, trained_export, tmp_path, processor):
    """Past the position table a row's positions would silently be wrong: such a row becomes an error
    row naming the limit, and its neighbours are annotated as usual."""
    (tmp_path / "imgs").mkdir()
    shutil.copy(EXAMPLES / "chelsea.png", tmp_path / "imgs")
    long = PROMPT + " cat" * 400  # 471 tokens; the tiny model has 512 positions
    manifest = write_manifest(
        tmp_path / "m.parquet",
        pa.table({"path": ["imgs/chelsea.png"] * 3, "key": ["a", "b", "c"], "q": [None, long, None]}),
    )
    out = tmp_path / "out"
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(kind="parquet", path=str(manifest), image_column="path", id_column="key", prompt_column="q"),
        out,
    )
    summary = run(cfg, out)
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["b"]["error"] == (
        "prompt too long: 471 tokens and engine.max_new_tokens=128 exceed the model's 512 positions; "
        "shorten this row's prompt"
    )
    assert entity_view(rows["a"]) == entity_view(rows["c"]) == expected(processor, "chelsea.png")[1]
    assert summary.errors_by_kind == {"prompt too long": 1}
