"""The export checks itself against transformers on the weights it exported, and catches a broken one."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig
from pipeline.export import store as export
from pipeline.export.verify import PROMPT, _forward_logits, _generate, sample_images, verify
from pipeline.model.grounding import parse
from pipeline.model.processor import Processor
from tests.helpers import hf_model, load_rgb


def verification(path: Path) -> dict:
    return export.read_manifest(path)["verification"]


def test_samples_ship_inside_the_package_with_their_licences():
    names = [p.name for p in sample_images()]
    assert len(names) == 3
    licences = (sample_images()[0].parent / "LICENSES.md").read_text()
    assert all(name in licences for name in names)


def test_one_forward_pass_reads_transformers_greedy_caption(trained_checkpoint, processor):
    """The shortcut the check takes: transformers' logits over a caption in one forward pass are those
    of its step-by-step generation, so its greedy choice there is its own caption. And the samples
    give grounded captions: a check on captions without boxes could not see boxes go wrong."""
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


def test_a_processor_that_differs_from_transformers_fails_the_check(
    trained_checkpoint, trained_export, processor, monkeypatch
):
    """The run's own processor is checked on the user's tokenizer at every export: a prompt encoded
    differently, or pixels off by a rounding, fail it by name."""
    encode, pixel_values = Processor.encode_prompt, Processor.pixel_values

    def shifted(self, prompt):
        ids, mask = encode(self, prompt)
        return (ids + 1 if "Describe" in prompt else ids), mask

    monkeypatch.setattr(Processor, "encode_prompt", shifted)
    monkeypatch.setattr(Processor, "pixel_values", lambda self, image: pixel_values(self, image) + np.float32(1e-6))
    result = verify(trained_export, hf_model(trained_checkpoint), processor, "fp32", EngineConfig(), 0.6)
    assert not result.passed
    assert result.processor_differences == ["prompt ids of '<grounding>Describe this image in detail:'"] + [
        f"pixel values of {p.name}" for p in sample_images()
    ]
    assert "THE RUN'S PROCESSOR DIFFERS from transformers' in: prompt ids of" in result.line()
