"""The exported graphs compiled by OpenVINO, with the processor saved beside them.

Owns the runtime and nothing else: compile settings come from `EngineConfig`, generation lives in
pipeline/engine/. Needs openvino, numpy and the export's files: a run imports neither torch nor
transformers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
from functools import cached_property, lru_cache
from pathlib import Path

import numpy as np

from pipeline.config import EngineConfig, Precision, WeightFormat
from pipeline.hardware import check_bf16, cpu_has, has_bf16, threads
from pipeline.model import export_folder
from pipeline.model.grounding import Tags
from pipeline.model.processor import Processor
from pipeline.model.prompt import Prompt
from pipeline.storage.locks import flock

log = logging.getLogger(__name__)


def num_requests(cfg: EngineConfig) -> int:
    """Decoders side by side: one unless told. A stream reads all decoder weights at every step, so
    one stream with every core beats several (docs/performance/defaults.md, "Streams")."""
    return cfg.num_requests or 1


def precision(cfg: EngineConfig, export: Path) -> Precision:
    """What `engine.precision` means for this export on this machine.

    Unset, it is bf16 only where that keeps an image's tokens independent of its batch, neighbours
    and requests in flight (tests/engine/test_invariance.py), else f32:
    - fp32/fp16 weights: bf16 wherever the device computes bf16 natively;
    - int8 weights: bf16 only where dynamic quantisation covers every layer (its group size divides
      each layer's width) and the CPU has no AMX: layers it does not cover run kernels chosen by the
      number of rows, which changed tokens with the batch;
    - a static int8 text decoder, or int4 weights: f32.
    """
    if cfg.precision is not None:
        check_bf16(cfg)
        return cfg.precision
    if not has_bf16(cfg.device):
        return Precision.f32
    weights = WeightFormat(export_folder.weight_format(export))
    if weights in (WeightFormat.fp32, WeightFormat.fp16):
        return Precision.bf16
    if export_folder.holds_static_decoder(export):
        return Precision.f32
    group = cfg.dynamic_quantization_group_size
    covered = group > 0 and all(width % group == 0 for width in export_folder.layer_widths(export))
    return Precision.bf16 if weights == WeightFormat.int8 and covered and not cpu_has("amx_bf16") else Precision.f32


def compile_properties(cfg: EngineConfig, precision: Precision, decoder: bool = False) -> dict:
    """OpenVINO properties for `cfg` computing in `precision`. The decoder's KV cache is kept in the
    same precision: the CPU's default u8 cache made tokens depend on the batch."""
    props = {
        "PERFORMANCE_HINT": "THROUGHPUT",
        "PERFORMANCE_HINT_NUM_REQUESTS": num_requests(cfg),  # a stream per decoder
        "INFERENCE_NUM_THREADS": threads(cfg),
        "INFERENCE_PRECISION_HINT": str(precision),
        "DYNAMIC_QUANTIZATION_GROUP_SIZE": cfg.dynamic_quantization_group_size,
    }
    if decoder:
        props["KV_CACHE_PRECISION"] = str(precision)
    return props


def paged_decoder(core, path: Path):
    """The exported stateful decoder rewritten for paged attention, the basis of continuous batching.

    OpenVINO's `paged_attention_transformation` makes the KV cache a set of blocks passed in as inputs
    (`key_cache.i`, `value_cache.i`), with the new tokens of several sequences laid end to end
    (`past_lens`, `subsequence_begins`, a block table per sequence): sequences of any lengths share a
    call without padding and can join or leave between calls. It keeps every token's hidden state, so
    a `logits_indices` input picks the tokens whose logits are wanted before the final norm and the
    vocabulary projection (the export took the last position there).
    """
    import openvino as ov
    import openvino.opset13 as ops
    from openvino._offline_transformations import paged_attention_transformation

    model = core.read_model(path)
    paged_attention_transformation(model)
    last = model.get_results()[0].input_value(0).get_node()
    while last.get_type_name() != "Gather":  # the export's `hidden[:, -1]`, now over [tokens, 1, width]
        last = last.input_value(0).get_node()
    indices = ops.parameter([-1], ov.Type.i32, name="logits_indices")
    indices.output(0).set_names({"logits_indices"})
    hidden = ops.squeeze(last.input_value(0), ops.constant(np.array([1], np.int64)))
    last.output(0).replace(ops.gather(hidden, indices, ops.constant(np.array(0, np.int64))).output(0))
    model.add_parameters([indices])
    model.validate_nodes_and_infer_types()
    return model


def cache_folder(root: Path, props: dict, device: str, core) -> Path:
    """A compiled-blob folder of its own for each set of compile settings.

    OpenVINO keys its cache on the model and the plugin's CACHING_PROPERTIES, which on CPU is only
    the device name: a blob compiled for f32 was imported for bf16 (a crash or all-zero tokens on
    AMX). So everything that shapes a blob names the folder: every compile property of each graph,
    the device and its full name, and the OpenVINO version.
    """
    import openvino as ov

    key = {
        "graphs": props,
        "device": device,
        "device_name": core.get_property(device, "FULL_DEVICE_NAME"),
        "openvino": ov.get_version(),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    folder = root / digest
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "settings.json"
    if not key_file.exists():  # for a person looking into the cache
        key_file.write_text(json.dumps(key, indent=2, sort_keys=True, default=str))
    return folder


MADV_DONTNEED = 4


def release_mapped_files(*folders: Path) -> int:
    """Unmap this process's pages of the read-only files mapped from `folders`; the bytes advised
    (Linux; elsewhere nothing is done).

    OpenVINO maps the weights (the export's .bin files, the compiled blobs of its cache) and at a
    graph's first call copies them into the layout its kernels read, never reading the mapping
    again, so afterwards those pages only count twice in the process's memory. MADV_DONTNEED on a
    read-only shared mapping drops the process's page-table entries and nothing else: the pages stay
    in the page cache (the next run starts as warm), and a page read again is mapped back from it.
    """
    if sys.platform != "linux":
        return 0
    import ctypes

    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    prefixes = tuple(str(Path(f).resolve()) + os.sep for f in folders)
    advised = 0
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)  # address, permissions, offset, device, inode, path
            if len(fields) == 6 and fields[1] == "r--s" and fields[5].startswith(prefixes):
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if madvise(start, end - start, MADV_DONTNEED) == 0:
                    advised += end - start
    return advised


class KosmosModel:
    """Compiled image encoder, token embedder and paged text decoder of one export folder."""

    def __init__(self, path: Path, cfg: EngineConfig):
        import openvino as ov

        self.path = Path(path)
        self.cfg = cfg
        core = ov.Core()
        self.precision = precision(cfg, self.path)
        props = compile_properties(cfg, self.precision)
        decoder_props = compile_properties(cfg, self.precision, decoder=True)
        root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else self.path / "_cache"
        folder = cache_folder(root, decoder_props, cfg.device, core)
        cache = {"CACHE_DIR": str(folder)}
        # OpenVINO writes a blob in place and maps it when importing: a shard importing a blob that
        # another shard is still writing died with SIGBUS. One process compiles a folder at a time.
        with flock(folder / ".lock"):
            self.image_encoder = core.compile_model(self.path / "image_encoder.xml", cfg.device, {**props, **cache})
            self.token_embedder = core.compile_model(self.path / "token_embedder.xml", cfg.device, {**props, **cache})
        # Not cached: OpenVINO 2026.4 never imports a compiled PagedAttention graph (its head sizes live
        # in runtime info that the blob does not keep), so a blob as large as its weights would be
        # written at every load and never read.
        self.text_decoder = core.compile_model(
            paged_decoder(core, self.path / "text_decoder.xml"), cfg.device, decoder_props
        )
        self._mapped = (self.path, root)

        self.processor = Processor(self.path)
        self.pad_token_id, self.eos_token_id = export_folder.special_ids(self.path)
        self.max_positions = export_folder.max_positions(self.path)
        # Engine threads encode prompts while the main thread decodes text: a Rust tokenizer shared
        # between threads has failed with "Already borrowed", so one caller at a time.
        self._tokenizer_lock = threading.Lock()

    @property
    def num_requests(self) -> int:
        return num_requests(self.cfg)

    def release_mapped_files(self) -> int:
        """Once each graph has run: its mapped weights are no longer read (release_mapped_files)."""
        return release_mapped_files(*self._mapped)

    def encode_prompt(self, prompt: str) -> Prompt:
        """Token ids exactly as `Kosmos2Processor(text=prompt, images=...)` makes them (cached per prompt)."""
        with self._tokenizer_lock:
            return self._encode_prompt(prompt)

    @lru_cache(maxsize=4096)  # noqa: B019 - one model per run, kept for its lifetime
    def _encode_prompt(self, prompt: str) -> Prompt:
        return Prompt(*self.processor.encode_prompt(prompt))

    def ids_after_image(self, prompt_ids: np.ndarray, generated: list[int]) -> list[int]:
        """The prompt from `</image>` on, then the generated ids: what the caption is read from.
        The image placeholders decode to arbitrary pieces, so they never reach the text."""
        eoi = self.tags.image_end
        ids = [int(i) for i in prompt_ids]
        return ids[ids.index(eoi) if eoi in ids else 0 :] + list(generated)

    def text_after_image(self, prompt_ids: np.ndarray, generated: list[int]) -> str:
        return self.decode(self.ids_after_image(prompt_ids, generated))

    def decode(self, ids: list[int]) -> str:
        """Text with the grounding tags kept: what `post_process_generation` expects."""
        with self._tokenizer_lock:
            return self.processor.decode(ids)

    @cached_property
    def tags(self) -> Tags:
        with self._tokenizer_lock:
            return Tags.of(self.processor.vocab(), self.processor.special_ids)
