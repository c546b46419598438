"""The export checks itself against transformers on the weights it exported, and catches a broken one."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pipeline import export
from pipeline.config import ModelConfig
from pipeline.verify import sample_images
from tests.test_export import run_export_command


def verification(path: Path) -> dict:
    return export.read_manifest(path)["verification"]


def test_samples_ship_inside_the_package_with_their_licences():
    names = [p.name for p in sample_images()]
    assert len(names) == 3
    licences = (sample_images()[0].parent / "LICENSES.md").read_text()
    assert all(name in licences for name in names)


@pytest.mark.parametrize("weight_format", ["fp32", "int8"])
def test_a_new_export_records_its_agreement_with_transformers(trained_checkpoint, tmp_path, weight_format, caplog):
    with caplog.at_level("INFO"):
        path = export.ensure_export(ModelConfig(source=str(trained_checkpoint), dir=str(tmp_path / "m"), weight_format=weight_format))
    record = verification(path)
    assert record["passed"] and record["identical"] == 3 and record["entities_equal"] == 3
    assert record["first_difference"] == [None, None, None] and record["processor_differences"] == []
    assert record["weight_format"] == weight_format and record["precision"] in ("f32", "bf16")
    if weight_format == "fp32":
        assert record["max_logit_diff_f32"] < 1e-4
    else:
        assert record["max_logit_diff_f32"] is None  # compressed weights differ by design
    assert f"Export verified: {weight_format} weights" in caplog.text and "3 of 3 sample captions identical" in caplog.text


def test_one_forward_pass_reads_transformers_greedy_caption(trained_checkpoint, processor):
    """The shortcut the check takes: transformers' logits over a caption in one forward pass are those
    of its step-by-step generation, so its greedy choice there is its own caption. And the samples
    give grounded captions: a check on captions without boxes could not see boxes go wrong."""
    from pipeline.grounding import parse
    from pipeline.verify import PROMPT, _forward_logits, _generate
    from tests.conftest import load_rgb
    from tests.test_engine import hf_model

    model = hf_model(trained_checkpoint)
    boxes = 0
    for path in sample_images():
        ids, step_logits = _generate(model, processor, load_rgb(path))
        logits = _forward_logits(model, processor, load_rgb(path), ids)
        assert logits.argmax(axis=-1).tolist() == ids
        np.testing.assert_allclose(logits, step_logits, atol=1e-4, rtol=0)
        enc = processor(text=PROMPT, images=load_rgb(path))
        boxes += sum(len(e.boxes) for e in parse(processor.decode(enc["input_ids"] + ids, skip_special_tokens=True))[1])
    assert boxes >= 3


def alter_layer(export_dir: Path, name_part: str, scale: float) -> str:
    """Multiply one f32 weight of the exported decoder in place (its file keeps its size): a broken export."""
    root = ET.parse(export_dir / "text_decoder.xml").getroot()
    consts = [
        layer for layer in root.iter("layer")
        if layer.get("type") == "Const" and name_part in layer.get("name", "") and layer.find("data").get("element_type") == "f32"
    ]
    data = max(consts, key=lambda layer: int(layer.find("data").get("size"))).find("data")
    offset, size = int(data.get("offset")), int(data.get("size"))
    weights = np.memmap(export_dir / "text_decoder.bin", dtype=np.float32, mode="r+", offset=offset, shape=(size // 4,))
    weights *= scale
    weights.flush()
    return name_part


def test_verify_true_passes_a_good_export_and_fails_an_altered_one(trained_checkpoint, trained_export, tmp_path):
    good = tmp_path / "good"
    shutil.copytree(trained_export, good, ignore=shutil.ignore_patterns("_cache"))
    args = [f"model.source={trained_checkpoint}", "model.weight_format=fp32"]
    proc = run_export_command(*args, f"model.dir={good}", "verify=true", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"Verification: fp32 weights, precision \w+ \(engine defaults\): 3 of 3 sample captions identical", proc.stdout)

    broken = tmp_path / "broken"
    shutil.copytree(trained_export, broken, ignore=shutil.ignore_patterns("_cache"))
    alter_layer(broken, "layers.1.ffn.fc2", -3.0)
    assert export.stale_reason(ModelConfig(source=str(trained_checkpoint), weight_format="fp32"), broken) is None  # looks intact
    proc = run_export_command(*args, f"model.dir={broken}", "verify=true", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "EXPORT DISAGREES WITH TRANSFORMERS" in proc.stderr and "Verification failed" in proc.stderr
    record = verification(broken)
    assert not record["passed"] and record["identical"] < 2 and record["max_logit_diff_f32"] > 0.1
    assert json.loads((good / "manifest.json").read_text())["verification"]["passed"]


def test_a_processor_that_differs_from_transformers_fails_the_check(trained_checkpoint, trained_export, processor, monkeypatch):
    """The run's own processor is checked on the user's tokenizer at every export: a prompt encoded
    differently, or pixels off by a rounding, fail it by name."""
    from pipeline.config import EngineConfig
    from pipeline.processor import Processor
    from pipeline.verify import verify
    from tests.test_engine import hf_model

    encode, pixel_values = Processor.encode_prompt, Processor.pixel_values

    def shifted(self, prompt):
        ids, mask = encode(self, prompt)
        return (ids + 1 if "Describe" in prompt else ids), mask

    monkeypatch.setattr(Processor, "encode_prompt", shifted)
    monkeypatch.setattr(Processor, "pixel_values", lambda self, image: pixel_values(self, image) + np.float32(1e-6))
    result = verify(trained_export, hf_model(trained_checkpoint), processor, "fp32", EngineConfig(), 0.6)
    assert not result.passed
    assert result.processor_differences == ["prompt ids of '<grounding>Describe this image in detail:'"] + [
        f"pixel values of {p.name}" for p in sample_images()]
    assert "THE RUN'S PROCESSOR DIFFERS from transformers' in: prompt ids of" in result.line()
