"""Session fixtures: offline Kosmos-2 checkpoints (random and trained) and their OpenVINO exports."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests import tiny

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "images"

# What the trained tiny model learns to say about each example image (after the prompt).
TRAINED_CAPTIONS = {
    "chelsea.png": "<phrase> a cat</phrase><object><patch_index_0044><patch_index_0863></object> sitting on"
    "<phrase> a mat</phrase><object><patch_index_0005><patch_index_0911></object>.",
    "astronaut.png": "<phrase> a person</phrase><object><patch_index_0100><patch_index_0500></object> next to"
    "<phrase> a rocket</phrase><object><patch_index_0010><patch_index_0330>"
    "</delimiter_of_multi_objects/><patch_index_0600><patch_index_0990></object>.",
    "coffee.png": "<phrase> a coffee cup</phrase><object><patch_index_0200><patch_index_0800></object> on a table.",
    "rocket.jpg": " a rocket in the sky.",
}
PROMPT = "<grounding>An image of"


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
    import torch

    config = tiny.tiny_config(len(processor.tokenizer), width=64)
    config.text_config.dropout = config.text_config.attention_dropout = config.text_config.activation_dropout = 0.0
    model = tiny.make_model(config, seed=0)
    images = [load_rgb(EXAMPLES / name) for name in TRAINED_CAPTIONS]
    texts = [PROMPT + caption for caption in TRAINED_CAPTIONS.values()]
    batch = processor(text=texts, images=images, add_eos_token=True, padding=True, return_tensors="pt")
    prompt_len = len(processor(text=PROMPT, images=images[0])["input_ids"])
    labels = batch["input_ids"].clone()
    labels[:, :prompt_len] = -100
    labels[batch["attention_mask"] == 0] = -100

    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(400):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 2e-3:
            break
    model.eval()
    return tiny.save_checkpoint(model, processor, tmp_path_factory.mktemp("trained_ckpt"))


def _export(checkpoint: Path, folder: Path, weight_format: str = "fp32") -> Path:
    from pipeline.config import ModelConfig
    from pipeline.export import ensure_export

    return ensure_export(ModelConfig(source=str(checkpoint), dir=str(folder), weight_format=weight_format))


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
