"""What copying the decoder's KV state out and back in costs: the price of continuous batching done by
merging the state of newly prefilled rows into a running request (`query_state` / `set_state`).

    python bench/state_copy.py      # full-size int8 export (bench/export_full_size.py), the defaults, 16 rows

Prefills 16 rows of 73 positions, decodes 20 steps, copies every state out and back in, checks that
the next step's logits are unchanged by the round trip, and prints each cost beside a decode step's.
"""
import sys
import time
from pathlib import Path

import numpy as np
import openvino as ov

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from export_full_size import CACHE  # noqa: E402

from pipeline.config import EngineConfig  # noqa: E402
from pipeline.model import compile_properties, precision  # noqa: E402

ROWS, WIDTH, PROMPT = 16, 2048, 73


def inputs(rng, length: int, cached: int) -> dict:
    return {
        "inputs_embeds": rng.standard_normal((ROWS, length, WIDTH), dtype=np.float32) * 0.02,
        "attention_mask": np.ones((ROWS, cached + length), np.int64),
        "position_ids": np.broadcast_to(np.arange(cached, cached + length) + 2, (ROWS, length)).copy(),
        "beam_idx": np.arange(ROWS, dtype=np.int32),
    }


def main() -> None:
    export, cfg, rng = CACHE / "export-int8", EngineConfig(num_requests=1), np.random.default_rng(0)
    resolved = precision(cfg, export)
    decoder = ov.Core().compile_model(export / "text_decoder.xml", "CPU", compile_properties(cfg, resolved, decoder=True))
    request = decoder.create_infer_request()
    request.reset_state()
    request.infer(inputs(rng, PROMPT, 0))
    for k in range(20):
        request.infer(inputs(rng, 1, PROMPT + k))
    cached = PROMPT + 20

    states = request.query_state()
    started = time.perf_counter()
    arrays = [np.array(s.state.data, copy=True) for s in states]
    copy_out = time.perf_counter() - started
    probe = inputs(rng, 1, cached)
    request.infer(probe)
    want = request.get_output_tensor(0).data.copy()
    started = time.perf_counter()
    for state, array in zip(states, arrays):
        state.state = ov.Tensor(array)
    copy_in = time.perf_counter() - started
    request.infer(probe)
    same = np.array_equal(want, request.get_output_tensor(0).data)
    started = time.perf_counter()
    request.infer(inputs(rng, 1, cached + 1))
    step = time.perf_counter() - started

    print(f"precision {resolved}: {len(states)} states of {arrays[0].shape} {arrays[0].dtype} as read, "
          f"{sum(a.nbytes for a in arrays) // 2**20} MB in all ({ROWS} rows, {cached} positions)")
    print(f"copy out {copy_out * 1000:.0f} ms, copy in {copy_in * 1000:.0f} ms, a decode step {step * 1000:.0f} ms; "
          f"the next step's logits unchanged by the round trip: {same}")


if __name__ == "__main__":
    main()
