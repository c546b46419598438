"""Can the exported decoder run with OpenVINO's paged attention, the basis of continuous batching?

    python bench/paged_attention_probe.py     # full-size int8 export (bench/export_full_size.py), bf16

`paged_attention_transformation` turns the stateful decoder into one whose KV cache is a set of
blocks given as inputs (`key_cache.i`, `value_cache.i`), with the sequences of a call laid end to end
(`subsequence_begins`, `past_lens`, a block table per sequence): rows of different lengths need no
padding, and a sequence can join or leave between any two calls. This probe prefills two sequences of
different lengths in one call, compares their last-position logits with the stateful decoder on each
alone, takes a decode step, and times decode steps of 32 sequences. The engine now runs on it
(pipeline/model.py: paged_decoder, which also restores the last-position slice).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov
from openvino._offline_transformations import paged_attention_transformation

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_full_size import CACHE  # noqa: E402

from pipeline.config import EngineConfig  # noqa: E402
from pipeline.model import compile_properties  # noqa: E402

WIDTH, LAYERS, HEADS, BLOCK, HEAD_SIZE = 2048, 24, 32, 32, 64
rng = np.random.default_rng(0)


def embeds(n: int) -> np.ndarray:
    return rng.standard_normal((n, WIDTH), dtype=np.float32) * 0.02


class Paged:
    """The paged decoder with `blocks` cache blocks a layer; each call takes whole sequences' new tokens."""

    def __init__(self, core, path: Path, props: dict, blocks: int):
        model = core.read_model(path)
        paged_attention_transformation(model)
        self.request = core.compile_model(model, "CPU", props).create_infer_request()
        for layer in range(LAYERS):
            for kind in ("key_cache", "value_cache"):
                self.request.set_tensor(f"{kind}.{layer}", ov.Tensor(ov.Type.bf16, [blocks, HEADS, BLOCK, HEAD_SIZE]))

    def __call__(self, chunks, past, tables) -> np.ndarray:
        """Logits of every new token, the sequences' tokens end to end (positions as Kosmos-2 counts them)."""
        self.request.infer({
            "inputs_embeds": np.concatenate(chunks),
            "position_ids": np.concatenate([np.arange(p, p + len(c)) + 2 for p, c in zip(past, chunks)]),
            "past_lens": np.array(past, np.int32),
            "subsequence_begins": np.cumsum([0] + [len(c) for c in chunks]).astype(np.int32),
            "block_indices": np.concatenate(tables).astype(np.int32),
            "block_indices_begins": np.cumsum([0] + [len(t) for t in tables]).astype(np.int32),
            "max_context_len": np.array(max(p + len(c) for p, c in zip(past, chunks)), np.int32),
        })
        return self.request.get_output_tensor(0).data.copy()


def stateful_alone(request, chunks: list[np.ndarray]) -> np.ndarray:
    """The stateful decoder on one sequence, fed `chunks` in turn: the last call's logits."""
    request.reset_state()
    seen = 0
    for chunk in chunks:
        request.infer({"inputs_embeds": chunk[None], "attention_mask": np.ones((1, seen + len(chunk)), np.int64),
                       "position_ids": (np.arange(seen, seen + len(chunk)) + 2)[None], "beam_idx": np.zeros(1, np.int32)})
        seen += len(chunk)
    return request.get_output_tensor(0).data[0].copy()


def main() -> None:
    core, path = ov.Core(), CACHE / "export-int8" / "text_decoder.xml"
    props = compile_properties(EngineConfig(num_requests=1), "bf16", decoder=True)
    paged, stateful = Paged(core, path, props, blocks=16), core.compile_model(path, "CPU", props).create_infer_request()

    lengths, tables = [73, 70], [np.arange(0, 3), np.arange(3, 6)]
    prompts, steps = [embeds(n) for n in lengths], [embeds(1) for _ in lengths]
    prefill = paged(prompts, [0, 0], tables)
    print(f"prefill of {lengths} positions in one call: logits {prefill.shape} (one row per token)")
    for k, last in enumerate(np.cumsum(lengths) - 1):
        alone = stateful_alone(stateful, [prompts[k]])
        print(f"  sequence {k}: largest difference from the stateful decoder alone {np.abs(prefill[last] - alone).max():.3g}, "
              f"same argmax {prefill[last].argmax() == alone.argmax()}")
    step = paged(steps, lengths, tables)
    alone = stateful_alone(stateful, [prompts[0], steps[0]])
    print(f"a decode step, sequence 0: largest difference {np.abs(step[0] - alone).max():.3g}, same argmax {step[0].argmax() == alone.argmax()}")

    rows = 32
    paged = Paged(core, path, props, blocks=rows * 4)
    tables = [np.arange(4 * k, 4 * k + 4) for k in range(rows)]
    paged([embeds(73) for _ in range(rows)], [0] * rows, tables)
    started = time.perf_counter()
    for k in range(5):
        paged([embeds(1) for _ in range(rows)], [73 + k] * rows, tables)
    print(f"decode step, {rows} sequences: {(time.perf_counter() - started) / 5 * 1000:.0f} ms")


if __name__ == "__main__":
    main()
