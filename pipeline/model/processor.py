"""The Kosmos-2 processor of an export, with `tokenizers`, Pillow and numpy only.

A run needs three things of the processor: prompt ids (with the image placeholders), pixel values and
decoded text. Loading transformers' `Kosmos2Processor` for them would import torch, seconds of start-up
and hundreds of MB (docs/performance/defaults.md, "Start-up"). This does the same from the files the export
saved beside the graphs (`tokenizer.json`, `tokenizer_config.json`, `processor_config.json`), step for
step as transformers 5 does; tests/model/test_processor.py holds each result to transformers' own.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.model.prompt import IMAGE_TOKENS

# Kosmos-2's grounding markup, added to the tokenizer by the processor (as transformers adds it).
TAGS = [
    "</doc>",
    "<image>",
    "</image>",
    "</chunk>",
    "</line>",
    "<phrase>",
    "</phrase>",
    "<object>",
    "</object>",
    "</delimiter_of_multi_objects/>",
    "<grounding>",
]


class Processor:
    def __init__(self, folder: Path):
        from tokenizers import AddedToken, Tokenizer

        folder = Path(folder)
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        config = json.loads((folder / "processor_config.json").read_text())
        special = json.loads((folder / "tokenizer_config.json").read_text())
        patches = config.get("num_patch_index_tokens", 1024)
        # What Kosmos2Processor.__init__ adds (a no-op where the saved tokenizer has them already).
        added = TAGS + [f"<patch_index_{i:04d}>" for i in range(patches)]
        self.tokenizer.add_tokens([AddedToken(t, lstrip=True, rstrip=False, normalized=False) for t in added])
        self.bos_token = special.get("bos_token", "<s>")
        self.unk_token_id = self.tokenizer.token_to_id(special.get("unk_token", "<unk>"))
        self.special_ids = frozenset(i for i, t in self.tokenizer.get_added_tokens_decoder().items() if t.special)

        image = config["image_processor"]
        if image.get("do_center_crop") or not image.get("do_resize", True) or "height" not in image["size"]:
            raise ValueError(
                f"{folder}: an image processor that resizes to a fixed height and width is expected, got {image}"
            )
        self.size = (image["size"]["width"], image["size"]["height"])
        self.resample = image.get("resample", Image.BICUBIC)
        self.scale = image.get("rescale_factor", 1 / 255) if image.get("do_rescale", True) else 1.0
        normalize = image.get("do_normalize", True)
        self.mean = np.array(image["image_mean"] if normalize else [0.0] * 3, np.float32)
        self.std = np.array(image["image_std"] if normalize else [1.0] * 3, np.float32)

    def vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab(with_added_tokens=True)

    def encode_prompt(self, prompt: str) -> tuple[np.ndarray, np.ndarray]:
        """Input ids and image-position mask, as `Kosmos2Processor(text=prompt, images=image)` makes
        them: `<s><image>`, 64 placeholders (ids unk+1 …), `</image>`, then the stripped prompt."""
        image_part = " ".join(["<image>"] * (IMAGE_TOKENS + 1) + ["</image>"])
        ids = self.tokenizer.encode(f"{self.bos_token}{image_part} {prompt.strip()}", add_special_tokens=False).ids
        first = self.unk_token_id + 1
        ids[2 : 2 + IMAGE_TOKENS] = range(first, first + IMAGE_TOKENS)
        mask = np.zeros(len(ids), dtype=bool)
        mask[2 : 2 + IMAGE_TOKENS] = True
        return np.asarray(ids, dtype=np.int64), mask

    def decode(self, ids: list[int]) -> str:
        """Text without special tokens, grounding tags kept (they are not special)."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def pixel_values(self, image: Image.Image) -> np.ndarray:
        """float32 [3, H, W]: resized (bicubic), rescaled in float64 then float32, normalised per channel."""
        if image.mode != "RGB":
            image = image.convert("RGB")
        resized = np.asarray(image.resize(self.size, resample=self.resample))
        pixels = (resized.astype(np.float64) * self.scale).astype(np.float32)
        return ((pixels - self.mean) / self.std).transpose(2, 0, 1).copy()
