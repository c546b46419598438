"""An export checks itself at once against transformers, and `kosmos-export verify=true` catches an
altered one. Slow: each exports and checks a model."""

from __future__ import annotations

import json
import re
import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import ModelConfig
from pipeline.export import store as export
from tests.helpers import run_export_command


def verification(path: Path) -> dict:
    return export.read_manifest(path)["verification"]


@pytest.mark.parametrize("weight_format", ["fp32", "int8"])
def test_a_new_export_records_its_agreement_with_transformers(trained_checkpoint, tmp_path, weight_format, caplog):
    with caplog.at_level("INFO"):
        path = export.ensure_export(
            ModelConfig(source=str(trained_checkpoint), dir=str(tmp_path / "m"), weight_format=weight_format)
        )
    record = verification(path)
    assert record["passed"] and record["identical"] == 3 and record["entities_equal"] == 3
    assert record["first_difference"] == [None, None, None] and record["processor_differences"] == []
    assert record["weight_format"] == weight_format and record["precision"] in ("f32", "bf16")
    if weight_format == "fp32":
        assert record["max_logit_diff_f32"] < 1e-4
    else:
        assert record["max_logit_diff_f32"] is None  # compressed weights differ by design
    assert (
        f"Export verified: {weight_format} weights" in caplog.text and "3 of 3 sample captions identical" in caplog.text
    )


def alter_layer(export_dir: Path, name_part: str, scale: float) -> str:
    """Multiply one f32 weight of the exported decoder in place (its file keeps its size): a broken export."""
    root = ET.parse(export_dir / "text_decoder.xml").getroot()
    consts = [
        layer
        for layer in root.iter("layer")
        if layer.get("type") == "Const"
        and name_part in layer.get("name", "")
        and layer.find("data").get("element_type") == "f32"
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
    assert re.search(
        r"Verification: fp32 weights, precision \w+ \(engine defaults\): 3 of 3 sample captions identical", proc.stdout
    )

    broken = tmp_path / "broken"
    shutil.copytree(trained_export, broken, ignore=shutil.ignore_patterns("_cache"))
    alter_layer(broken, "layers.1.ffn.fc2", -3.0)
    assert (
        export.stale_reason(ModelConfig(source=str(trained_checkpoint), weight_format="fp32"), broken) is None
    )  # looks intact
    proc = run_export_command(*args, f"model.dir={broken}", "verify=true", cwd=tmp_path)
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "EXPORT DISAGREES WITH TRANSFORMERS" in proc.stderr and "Verification failed" in proc.stderr
    record = verification(broken)
    assert not record["passed"] and record["identical"] < 2 and record["max_logit_diff_f32"] > 0.1
    assert json.loads((good / "manifest.json").read_text())["verification"]["passed"]
