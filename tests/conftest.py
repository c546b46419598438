"""Session fixtures: offline Kosmos-2 checkpoints (random and trained) and their OpenVINO exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"

TRAINED_CAPTIONS, PROMPT = tiny.TRAINED_CAPTIONS, tiny.PROMPT


def example_images() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


def load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


@pytest.fixture(scope="session")
def processor():
    return tiny.make_processor()


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory, processor) -> Path:
    """A tiny random Kosmos-2 that says varied things."""
    model = tiny.make_random_model(len(processor.tokenizer))
    return tiny.save_checkpoint(model, processor, tmp_path_factory.mktemp("random_ckpt"))


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory, processor) -> Path:
    """A tiny Kosmos-2 trained (a few hundred steps, seconds) to emit TRAINED_CAPTIONS for their images."""
    return tiny.save_checkpoint(tiny.make_trained_model(processor, EXAMPLES), processor, tmp_path_factory.mktemp("trained_ckpt"))


def _export(checkpoint: Path, folder: Path, weight_format: str = "fp32", quantize_text_decoder: str = "auto",
            verify: bool = True) -> Path:
    """An export for tests; one asked for a static text decoder has one, never the int8-weights
    decoder that the export's check puts in its place when it fails (tests/test_export.py tests that)."""
    from pipeline.config import ModelConfig
    from pipeline.export import ensure_export
    from pipeline.model import static_text_decoder

    export = ensure_export(ModelConfig(source=str(checkpoint), dir=str(folder), weight_format=weight_format,
                                       quantize_text_decoder=quantize_text_decoder, verify_after_export=verify))
    if quantize_text_decoder == "true":
        assert static_text_decoder(export), f"{export}: the export's check replaced the static decoder by int8 weights only"
    return export


@pytest.fixture(scope="session")
def random_export(tmp_path_factory, random_checkpoint) -> Path:
    return _export(random_checkpoint, tmp_path_factory.mktemp("random_ov") / "fp32")


@pytest.fixture(scope="session")
def trained_export(tmp_path_factory, trained_checkpoint) -> Path:
    return _export(trained_checkpoint, tmp_path_factory.mktemp("trained_ov") / "fp32")


@pytest.fixture(scope="session")
def export_of():
    return _export


def pixel_values(processor, image) -> np.ndarray:
    return processor.image_processor(image, return_tensors="np")["pixel_values"][0]
