"""Tasks: describe (a longer prompt) and ground (given phrases, one entity each, one encoding per image)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.annotation.run import run
from pipeline.cli import CONF_DIR
from pipeline.config import InputConfig, TaskConfig
from pipeline.errors import ConfigError
from pipeline.model.prompt import GROUND
from tests.helpers import EXAMPLES, config, hf_generate, hf_model, load_rgb

PHRASES = ["a cat", "a mat", "A   dog"]


def reference_boxes(model, processor, name, phrase):
    """What transformers answers for the referring prompt, parsed by the processor."""
    prompt = GROUND.format(phrase=phrase.strip())
    ids = hf_generate(model, processor, load_rgb(EXAMPLES / name), prompt, max_new_tokens=32)
    enc = processor(text=prompt, images=load_rgb(EXAMPLES / name))
    text = processor.batch_decode([enc["input_ids"] + ids], skip_special_tokens=True)[0]
    wanted = " ".join(phrase.split()).lower()
    return next(
        (
            [list(b) for b in boxes]
            for p, _, boxes in processor.post_process_generation(text)[1]
            if " ".join(p.split()).lower() == wanted
        ),
        [],
    )


def test_ground_phrases_for_every_image(trained_checkpoint, trained_export, tmp_path, processor):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ["chelsea.png", "coffee.png"]:
        (photos / name).write_bytes((EXAMPLES / name).read_bytes())
    out = tmp_path / "labels"
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(path=str(photos)),
        out,
        task=TaskConfig(kind="ground", phrases=PHRASES),
    )
    cfg.engine.max_new_tokens = 32
    summary = run(cfg, out)
    assert summary.images_encoded == 2  # not 6: one encoding serves all three phrases of an image
    model = hf_model(trained_checkpoint)
    for row in pq.read_table(out).to_pylist():
        assert row["caption"] == "a cat; a mat; A   dog"
        assert [e["phrase"] for e in row["entities"]] == PHRASES  # exactly as requested
        assert all(row["caption"][e["start"] : e["end"]] == e["phrase"] for e in row["entities"])
        for e, phrase in zip(row["entities"], PHRASES):
            got = [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in e["boxes"]]
            assert got == reference_boxes(model, processor, row["id"], phrase), (row["id"], phrase)
        assert row["prompt"] == GROUND and row["token_ids"]


def test_ground_phrases_from_a_manifest_column(trained_checkpoint, trained_export, tmp_path):
    pq.write_table(
        pa.table({"image": [str(EXAMPLES / "chelsea.png"), str(EXAMPLES / "rocket.jpg")], "classes": [["a cat"], []]}),
        tmp_path / "m.parquet",
    )
    out = tmp_path / "labels"
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(kind="parquet", path=str(tmp_path / "m.parquet"), phrases_column="classes"),
        out,
        task=TaskConfig(kind="ground"),
    )
    run(cfg, out)
    rows = pq.read_table(out).to_pylist()
    assert [e["phrase"] for e in rows[0]["entities"]] == ["a cat"] and rows[0]["error"] is None
    assert rows[1]["error"].startswith("no phrases:")


def test_ground_needs_phrases(trained_checkpoint, trained_export, tmp_path):
    cfg = config(
        trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), tmp_path, task=TaskConfig(kind="ground")
    )
    with pytest.raises(ConfigError, match="task=ground needs phrases"):
        cfg.validate()


def test_describe_end_to_end(trained_checkpoint, trained_export, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        cfg = OmegaConf.to_object(
            compose(
                "config",
                overrides=[
                    "task=describe",
                    f"input.path={EXAMPLES}",
                    "input.limit=2",
                    f"output.dir={tmp_path}",
                    f"model.source={trained_checkpoint}",
                    f"model.dir={trained_export}",
                    "model.weight_format=fp32",
                ],
            )
        )
    summary = run(cfg, tmp_path)
    rows = pq.read_table(tmp_path).to_pylist()
    assert summary.items == 2 and cfg.engine.max_new_tokens == 256
    assert all(r["prompt"] == "<grounding>Describe this image in detail:" for r in rows)
    assert all(r["caption"].startswith("Describe this image in detail:") and r["token_ids"] for r in rows)
