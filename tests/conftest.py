"""Session fixtures: offline Kosmos-2 checkpoints (random and trained) and their OpenVINO exports."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipeline.cli import register
from pipeline.config import ModelConfig
from pipeline.export.store import ensure_export
from pipeline.model.export_folder import holds_static_decoder
from tests import tiny
from tests.helpers import EXAMPLES

register()  # the commands' schemas, for tests that compose conf/ with Hydra's compose API
E2E = Path(__file__).resolve().parent / "e2e"


def pytest_collection_modifyitems(items) -> None:
    """Everything under tests/e2e/ is marked e2e: `pytest -m "not e2e"` leaves it out."""
    for item in items:
        if Path(str(item.fspath)).is_relative_to(E2E):
            item.add_marker(pytest.mark.e2e)


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
    return tiny.save_checkpoint(
        tiny.make_trained_model(processor, EXAMPLES), processor, tmp_path_factory.mktemp("trained_ckpt")
    )


def _export(
    checkpoint: Path,
    folder: Path,
    weight_format: str = "fp32",
    quantize_text_decoder: bool | None = None,
    verify: bool = True,
) -> Path:
    """An export for tests; one asked for a static text decoder has one, never the int8-weights
    decoder that the export's check puts in its place when it fails (tests/export/test_export.py tests that)."""
    export = ensure_export(
        ModelConfig(
            source=str(checkpoint),
            dir=str(folder),
            weight_format=weight_format,
            quantize_text_decoder=quantize_text_decoder,
            verify_after_export=verify,
        )
    )
    if quantize_text_decoder:
        assert holds_static_decoder(export), (
            f"{export}: the export's check replaced the static decoder by int8 weights only"
        )
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


@pytest.fixture(scope="module")
def many_images(tmp_path_factory) -> Path:
    """24 images: the six examples, four copies each under different names and folders."""
    root = tmp_path_factory.mktemp("many")
    for copy in range(4):
        for src in sorted(EXAMPLES.glob("*.*g")):
            dst = root / f"set{copy}" / f"{src.stem}_{copy}{src.suffix}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(src, dst)
    return root


@pytest.fixture(scope="session")
def trained_int8(trained_checkpoint, tmp_path_factory) -> Path:
    """The trained model in the default weight format, its text decoder's weights only (the default
    on CPUs without AMX)."""
    return _export(trained_checkpoint, tmp_path_factory.mktemp("trained_int8") / "int8", "int8", False)
