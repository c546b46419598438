"""Where a step's time goes, per operation: OpenVINO's performance counters for the image encoder, a
prefill and a decode step of the full-size Kosmos-2 (random weights, bench/export_full_size.py).

    python bench/profile_ops.py                      # int8 export, the engine's defaults, 16 rows
    python bench/profile_ops.py --precision f32 --rows 32

Each graph is compiled with PERF_COUNT on, with the compile settings the engine uses. A request's
counters are the mean over the calls made on it (calls of one shape give their wall time; after a
change of shape they move like a running mean, though not exactly: a prefill followed by steps did
not average out), so each measurement takes a fresh request and calls of one kind only (the decode
steps run from an empty cache), and recovers their totals as mean x calls less a first warm-up
call's. "counted / wall" checks that against the wall clock; the milliseconds are shares of the wall
time. Per graph: the time by operation type and the kernel OpenVINO
chose (`exec_type`: `brgemm_avx512_amx` = AMX, `brgemm_avx512` / `jit_avx512` = AVX-512, with the
precision it ran in, `_bf16` / `_f32` / `_I8`; `ref` = reference C++); then the CPU and its flags.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from harness import cpu

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def counters(request) -> dict:
    """The request's counters (mean seconds per call so far), summed by (operation type, kernel)."""
    by_kind: dict = defaultdict(float)
    for info in request.get_profiling_info():
        if info.status.name == "EXECUTED":
            by_kind[(info.node_type, info.exec_type)] += info.real_time.total_seconds()
    return by_kind


def measure(request, first, call, n: int) -> tuple[dict, float]:
    """`first(request)`, then `call(request, k)` for k < n: the n calls' total seconds by kind, and their wall time."""
    first(request)
    base = counters(request)
    started = time.perf_counter()
    for k in range(n):
        call(request, k)
    wall = time.perf_counter() - started
    return {kind: mean * (n + 1) - base.get(kind, 0.0) for kind, mean in counters(request).items()}, wall


def report(title: str, totals: dict, wall: float, n: int, top: int) -> None:
    counted = sum(totals.values())
    print(f"\n{title}: {wall / n * 1000:.1f} ms a call (wall, {n} calls); counted / wall = {counted / wall:.2f}")
    print("| operation | kernel | share | ms a call |\n| --- | --- | --- | --- |")
    for (kind, kernel), seconds in sorted(totals.items(), key=lambda kv: -kv[1])[:top]:
        print(f"| {kind} | {kernel} | {seconds / counted:.1%} | {seconds / counted * wall / n * 1000:.1f} |")


def main() -> None:
    import openvino as ov
    from export_full_size import CACHE, full_size_checkpoint

    from pipeline.config import EngineConfig, ModelConfig
    from pipeline.export import ensure_export
    from pipeline.model import compile_properties, precision

    p = argparse.ArgumentParser()
    p.add_argument("--weight-format", default="int8")
    p.add_argument("--precision", default="auto")
    p.add_argument("--dq", type=int, default=EngineConfig.dynamic_quantization_group_size)
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--calls", type=int, default=4, help="measured calls per graph, after one warm-up call")
    p.add_argument("--top", type=int, default=8)
    args = p.parse_args()

    checkpoint = str(full_size_checkpoint())
    export = ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / f"export-{args.weight_format}"), weight_format=args.weight_format))
    cfg = EngineConfig(precision=args.precision, dynamic_quantization_group_size=args.dq, num_requests=1)
    resolved = precision(cfg, export)
    core = ov.Core()
    compiled = {
        name: core.compile_model(export / f"{name}.xml", "CPU", {**compile_properties(cfg, resolved, decoder=name == "text_decoder"), "PERF_COUNT": True})
        for name in ("image_encoder", "token_embedder", "text_decoder")
    }
    rows, rng = args.rows, np.random.default_rng(0)
    width = compiled["token_embedder"].output(0).get_partial_shape()[-1].get_length()
    prompt = 73  # <s><image>, 64 image positions, </image>, `<grounding>An image of`

    pixels = rng.standard_normal((rows, 3, 224, 224), dtype=np.float32)
    encode = lambda r, *_: r.infer({0: pixels})  # noqa: E731
    totals, wall = measure(compiled["image_encoder"].create_infer_request(), encode, encode, args.calls)
    report(f"image encoder, {rows} images", totals, wall, args.calls, args.top)

    def decoder_inputs(length: int, cached: int) -> dict:
        return {
            "inputs_embeds": rng.standard_normal((rows, length, width), dtype=np.float32) * 0.02,
            "attention_mask": np.ones((rows, cached + length), np.int64),
            "position_ids": np.broadcast_to(np.arange(cached, cached + length) + 2, (rows, length)).copy(),
            "beam_idx": np.arange(rows, dtype=np.int32),
        }

    def prefill(r, *_):
        r.reset_state()
        r.infer(decoder_inputs(prompt, 0))

    totals, wall = measure(compiled["text_decoder"].create_infer_request(), prefill, prefill, args.calls)
    report(f"prefill, {rows} rows x {prompt} positions", totals, wall, args.calls, args.top)

    # Only steps on this request (a prefill's counters would not average out: see the docstring),
    # from an empty cache to a caption's length past the prompt.
    steps = [decoder_inputs(1, k) for k in range(prompt + 32)]
    first = lambda r: (r.reset_state(), r.infer(steps[0]))  # noqa: E731
    totals, wall = measure(compiled["text_decoder"].create_infer_request(), first, lambda r, k: r.infer(steps[k + 1]), len(steps) - 1)
    report(f"decode step, {rows} rows, a cache of 1 to {prompt + 32} positions", totals, wall, len(steps) - 1, args.top)

    ids = np.ones((rows, 1), np.int64)
    embed = lambda r, *_: r.infer({"input_ids": ids})  # noqa: E731
    totals, wall = measure(compiled["token_embedder"].create_infer_request(), embed, embed, 20)
    report(f"token embedder, {rows} ids (once per decode step)", totals, wall, 20, 3)

    logits = rng.standard_normal((rows, 65037), dtype=np.float32)
    started = time.perf_counter()
    for _ in range(20):
        tokens = logits.argmax(-1)
        best = logits[np.arange(rows), tokens]
        -np.log(np.exp(logits - best[:, None]).sum(-1))
    print(f"\ngreedy choice and its log-probability in numpy: {(time.perf_counter() - started) / 20 * 1000:.1f} ms a step")
    print(f"\n{cpu()}; OpenVINO {ov.get_version()}; {args.weight_format} weights, precision {args.precision} -> {resolved}, "
          f"dynamic quantisation group {args.dq}")


if __name__ == "__main__":
    main()
