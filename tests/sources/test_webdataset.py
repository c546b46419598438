"""WebDataset tar shards as input: the same rows as the same images in a folder; damage as error rows."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.annotation.run import run
from pipeline.config import InputConfig
from pipeline.errors import ConfigError, InputError
from pipeline.sources import iter_items, open_source
from pipeline.sources.webdataset import expand_braces, tar_files
from tests.helpers import EXAMPLES, config, example_images


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """The six example photos as two tars of three samples: `<key>.<png|jpg>`, `.txt`, `.json`."""
    root = tmp_path_factory.mktemp("wds") / "shards"
    root.mkdir()
    photos = example_images()
    for shard in range(2):
        with tarfile.open(root / f"{shard:05d}.tar", "w") as tar:
            for k, photo in enumerate(photos[3 * shard : 3 * shard + 3]):
                key = f"sample{3 * shard + k:04d}"
                add(tar, f"{key}{photo.suffix}", photo.read_bytes())
                add(tar, f"{key}.txt", f"a photo called {photo.stem}".encode())
                add(tar, f"{key}.json", json.dumps({"file": photo.name}).encode())
    return root


def test_brace_ranges_lists_and_globs(shards):
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert tar_files(str(shards / "{00000..00001}.tar")) == tar_files(str(shards / "*.tar"))
    with pytest.raises(InputError, match="00002.tar' does not exist"):
        tar_files(str(shards / "{00000..00002}.tar"))


def test_samples_stream_with_their_members(shards):
    items = list(
        iter_items(
            InputConfig(kind="webdataset", path=str(shards / "{00000..00001}.tar"), keep_columns=["txt", "json"])
        )
    )
    assert [i.id for i in items] == [f"sample{k:04d}" for k in range(6)]
    assert all(i.data and i.error is None and i.source.endswith(f".tar#{i.id}") for i in items)
    assert [json.loads(i.extra["json"])["file"] for i in items] == [p.name for p in example_images()]


def test_local_tars_are_counted_from_their_headers(shards, tmp_path):
    """The progress bar had no total for tars; compressed tars would be read whole to count, so are not."""
    cfg = InputConfig(kind="webdataset", path=str(shards / "*.tar"))
    assert open_source(cfg).count() == len(list(iter_items(cfg))) == 6
    with tarfile.open(tmp_path / "z.tar.gz", "w:gz") as tar:
        add(tar, "a.jpg", b"x")
    assert open_source(InputConfig(kind="webdataset", path=str(tmp_path / "z.tar.gz"))).count() is None


def test_a_tar_of_many_members_is_read_in_bounded_memory(tmp_path):
    """tarfile keeps every header it reads (about 450 bytes each): a million members held 450 MB."""
    import tracemalloc

    with tarfile.open(tmp_path / "many.tar", "w") as tar:
        for k in range(20_000):
            add(tar, f"{k:06d}.txt", b"")
    add_image = tarfile.open(tmp_path / "many.tar", "a")
    add(add_image, "last.jpg", b"not really")
    add_image.close()
    cfg = InputConfig(kind="webdataset", path=str(tmp_path / "many.tar"))
    tracemalloc.start()
    try:
        items = sum(1 for _ in iter_items(cfg))
        count = open_source(cfg).count()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert items == count == 20_001 and peak < 4e6, peak


def test_rows_equal_the_same_images_as_a_folder(trained_checkpoint, trained_export, shards, tmp_path):
    folder, tars = tmp_path / "folder", tmp_path / "tars"
    run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), folder), folder)
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(kind="webdataset", path=str(shards / "{00000..00001}.tar"), keep_columns=["txt", "json"]),
        tars,
    )
    run(cfg, tars)
    by_file = {r["id"]: r for r in pq.read_table(folder).to_pylist()}
    rows = pq.read_table(tars).to_pylist()
    assert len(rows) == 6
    for row in rows:
        want = by_file[json.loads(row["json"])["file"]]
        assert row["error"] is None and row["txt"].startswith("a photo called")
        assert (row["token_ids"], row["caption"], row["width"], row["height"]) == (
            want["token_ids"],
            want["caption"],
            want["width"],
            want["height"],
        )
    assert pq.read_schema(next(tars.glob("part-*.parquet"))).field("json").type == "string"
    assert run(cfg, tars).skipped == 6  # resume by key


def test_damaged_samples_and_a_truncated_tar_are_error_rows(trained_checkpoint, trained_export, tmp_path):
    root = tmp_path / "bad"
    root.mkdir()
    photo = (EXAMPLES / "chelsea.png").read_bytes()
    with tarfile.open(root / "a.tar", "w") as tar:
        add(tar, "good.png", photo)
        add(tar, "garbage.jpg", b"not an image at all")
        add(tar, "textonly.txt", b"no image here")
    with tarfile.open(root / "b.tar", "w") as tar:
        add(tar, "first.png", photo)
        add(tar, "second.png", photo)
    data = (root / "b.tar").read_bytes()
    (root / "b.tar").write_bytes(data[: 512 + len(photo) + 512 + 20000])  # cut inside the second image
    out = tmp_path / "labels"
    summary = run(
        config(trained_checkpoint, trained_export, InputConfig(kind="webdataset", path=str(root / "*.tar")), out), out
    )
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert rows["good"]["error"] is None and rows["first"]["error"] is None
    assert rows["garbage"]["error"].startswith("not an image")
    assert rows["textonly"]["error"].startswith("null image: sample 'textonly' has no jpg/jpeg/png/webp member")
    assert rows["b.tar#unreadable"]["error"].startswith("cannot read tar: b.tar is damaged after sample 'second'")
    assert "second" not in rows  # its image was cut short: it is in the tar's error row
    assert summary.items == 5 and summary.errors == 3


def test_webdataset_takes_only_member_columns():
    with pytest.raises(ConfigError, match="input.prompt_column applies to parquet manifests only"):
        InputConfig(kind="webdataset", path="x.tar", prompt_column="txt").validate()


def test_the_command_line_spelling_of_a_brace_range():
    """Hydra reads `{` as a dictionary: the README's quoting gets the pattern through whole."""
    from hydra import compose, initialize_config_dir

    from pipeline.cli import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = compose(
            "config",
            overrides=["input=webdataset", "input.path='shards/{00000..00099}.tar'", "input.keep_columns=[txt,json]"],
        )
    assert cfg.input.kind == "webdataset" and cfg.input.path == "shards/{00000..00099}.tar"
    assert list(cfg.input.keep_columns) == ["txt", "json"]
