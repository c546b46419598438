"""The run's own processor (pipeline/model/processor.py) against transformers' Kosmos2Processor saved with the
same export: prompt ids and image mask, decoded text, special and tag tokens, pixel values. And a run
that imports neither torch nor transformers."""

from __future__ import annotations

import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline.annotation.decode import decode
from pipeline.config import InputConfig
from pipeline.model.grounding import Tags
from pipeline.model.processor import Processor
from pipeline.model.prompt import ground
from pipeline.records import Item
from tests.helpers import EXAMPLES, PROMPTS, REPO, example_images


@pytest.fixture(scope="module")
def pair(random_export):
    from transformers import AutoProcessor

    return Processor(random_export), AutoProcessor.from_pretrained(random_export)


def test_prompt_ids_and_image_mask(pair):
    mine, theirs = pair
    blank = Image.new("RGB", (8, 8))
    prompts = (
        PROMPTS
        + [ground(p) for p in ["a cat", "A   dog", "the red square"]]
        + [
            "",
            "   ",
            "  padded  both sides ",
            "tabs\tand\nlines",
            "ünïcödé and 中文 and emoji 🐱",
            "<phrase>open",
            "<grounding><phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863></object> by",
            "</image> in the text",
            "<image>",
            "x" * 300,
            "A cat. A dog! (Two) 'quotes' \"double\" 1,234.5",
        ]
    )
    for prompt in prompts:
        enc = theirs(text=prompt, images=blank)
        ids, mask = mine.encode_prompt(prompt)
        assert ids.tolist() == enc["input_ids"], repr(prompt)
        assert mask.astype(int).tolist() == enc["image_embeds_position_mask"], repr(prompt)


def test_decoding_and_tags(pair):
    mine, theirs = pair
    tokenizer = theirs.tokenizer
    assert mine.special_ids == frozenset(tokenizer.all_special_ids)
    assert Tags.of(mine.vocab(), mine.special_ids) == Tags.of(tokenizer.get_vocab(), tokenizer.all_special_ids)
    rng = random.Random(0)
    vocab = len(tokenizer)
    tags = [tokenizer.convert_tokens_to_ids(t) for t in ["<phrase>", "</phrase>", "<object>", "</object>", "</image>"]]
    for _ in range(500):
        ids = [rng.choice(tags) if rng.random() < 0.2 else rng.randrange(vocab) for _ in range(rng.randint(0, 50))]
        assert mine.decode(ids) == tokenizer.decode(ids, skip_special_tokens=True), ids


def test_pixel_values_of_every_kind_of_image(pair):
    """Bit for bit, on the example photos, odd sizes and every mode a decoded image can come from."""
    mine, theirs = pair
    rng = np.random.default_rng(0)
    images = [Image.open(p).convert("RGB") for p in example_images()]
    images += [
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))
        for h, w in [(1, 1), (37, 301), (1000, 3), (224, 224)]
    ]
    base = images[0].resize((64, 48))
    for mode in ["L", "LA", "RGBA", "P", "CMYK", "1"]:
        images.append(
            decode(
                Item(id=mode, source="mem", data=_encoded(base.convert(mode))), mine.pixel_values, InputConfig(path="x")
            ).image
        )
    for image in images:
        want = theirs.image_processor(image, return_tensors="np")["pixel_values"][0]
        got = mine.pixel_values(image)
        assert got.dtype == np.float32 and got.flags.c_contiguous
        np.testing.assert_array_equal(got, want)


def _encoded(image: Image.Image) -> bytes:
    import io

    buffer = io.BytesIO()
    image.save(buffer, "TIFF" if image.mode in ("1", "CMYK") else "PNG")
    return buffer.getvalue()


def test_a_run_imports_neither_torch_nor_transformers(trained_checkpoint, trained_export, tmp_path):
    """Start-up and memory: with the export in place, `kosmos-annotate` never loads them (4.8 s and
    450 MB measured); grounding, scores and previews included."""
    code = (
        "import runpy, sys\n"
        "code = 0\n"
        "try:\n    runpy.run_module('pipeline', run_name='__main__')\n"
        "except SystemExit as e:\n    code = e.code\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules), file=sys.stderr)\n"
        "sys.exit(code)\n"
    )
    args = [
        sys.executable,
        "-c",
        code,
        f"input.path={EXAMPLES}",
        f"output.dir={tmp_path / 'out'}",
        "preview.enabled=true",
        f"model.source={trained_checkpoint}",
        f"model.dir={trained_export}",
        "model.weight_format=fp32",
    ]
    proc = subprocess.run(
        args,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(Path.home())},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "[]", proc.stderr[-2000:]
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert len(rows) == 6 and all(r["error"] is None for r in rows) and any(r["entities"] for r in rows)
