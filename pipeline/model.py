"""The exported graphs compiled by OpenVINO, and the processor saved beside them.

Owns the runtime and nothing else: compile settings come from `EngineConfig`, generation lives in
`engine.py`. Needs openvino, numpy and the processor; never torch's model code (transformers still
imports torch for the processor when it is installed).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class Prompt:
    """A prompt as the processor encodes it: `<s><image> 64 placeholders </image> text`."""

    input_ids: np.ndarray  # int64 [T]
    image_mask: np.ndarray  # bool [T], True at the 64 placeholder positions


def threads(cfg: EngineConfig) -> int:
    """This process's share of the machine: shards side by side must not oversubscribe its cores."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return cfg.threads or max(1, cores // cfg.shards_per_machine)


def num_requests(cfg: EngineConfig) -> int:
    """Batches in flight: one per 8 cores. A stream reads all decoder weights at every step, so on a
    small machine one stream with every core beats several (measured 1.16x on 2 cores)."""
    return cfg.num_requests or max(1, threads(cfg) // 8)


def compile_properties(cfg: EngineConfig, cache_dir: Path, decoder: bool = False) -> dict:
    """OpenVINO properties for `cfg`. f32 must also pin the decoder's KV cache, which is u8 on CPU by default."""
    props = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "PERFORMANCE_HINT_NUM_REQUESTS": num_requests(cfg),  # as many streams as batches in flight
        "CACHE_DIR": str(cache_dir),
        "INFERENCE_NUM_THREADS": threads(cfg),
    }
    if cfg.precision != "auto":
        props["INFERENCE_PRECISION_HINT"] = cfg.precision
        if decoder:
            props["KV_CACHE_PRECISION"] = cfg.precision
    # Larger groups than OpenVINO's default (32) were measured 1.4x faster for vision and prefill here.
    props["DYNAMIC_QUANTIZATION_GROUP_SIZE"] = 0 if cfg.precision == "f32" else cfg.dynamic_quantization_group_size
    return props


class KosmosModel:
    """Compiled image encoder, token embedder and stateful text decoder of one export folder."""

    def __init__(self, path: Path, cfg: EngineConfig):
        import openvino as ov
        from transformers import AutoProcessor

        self.path = Path(path)
        self.cfg = cfg
        core = ov.Core()
        cache_dir = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else self.path / "_cache"
        props = compile_properties(cfg, cache_dir)
        self.image_encoder = core.compile_model(self.path / "image_encoder.xml", cfg.device, props)
        self.token_embedder = core.compile_model(self.path / "token_embedder.xml", cfg.device, props)
        self.text_decoder = core.compile_model(
            self.path / "text_decoder.xml", cfg.device, compile_properties(cfg, cache_dir, decoder=True)
        )

        self.processor = AutoProcessor.from_pretrained(self.path)
        config = json.loads((self.path / "config.json").read_text())
        text = config.get("text_config", {})
        self.pad_token_id = int(text.get("pad_token_id", 1))
        self.eos_token_id = int(text.get("eos_token_id", 2))
        self._blank = None

    @property
    def num_requests(self) -> int:
        return num_requests(self.cfg)

    @lru_cache(maxsize=4096)
    def encode_prompt(self, prompt: str) -> Prompt:
        """Token ids exactly as `Kosmos2Processor(text=prompt, images=...)` makes them (cached per prompt)."""
        from PIL import Image

        if self._blank is None:
            self._blank = Image.new("RGB", (8, 8))
        enc = self.processor(text=prompt, images=self._blank)
        return Prompt(
            input_ids=np.asarray(enc["input_ids"], dtype=np.int64),
            image_mask=np.asarray(enc["image_embeds_position_mask"], dtype=bool),
        )

    def text_after_image(self, prompt_ids: np.ndarray, generated: list[int]) -> str:
        """Decoded text from `</image>` on, tags kept: what `post_process_generation` expects.

        The 64 image placeholders decode to arbitrary pieces, so they never reach the text.
        """
        eoi = self.processor.tokenizer.convert_tokens_to_ids(self.processor.eoi_token)
        ids = list(prompt_ids)
        start = ids.index(eoi) if eoi in ids else 0
        return self.processor.tokenizer.decode(ids[start:] + list(generated), skip_special_tokens=True)
