"""Where a step's time goes, per operation: OpenVINO's performance counters for the image encoder and
for the paged text decoder as the engine calls it (the image prefixes, the rest of the prompts, a
decode step) on the full-size Kosmos-2 (random weights, its int8 export by default).

    python -m bench.profile_ops                      # the engine's defaults (32 rows, 16 without AVX-512)
    python -m bench.profile_ops --precision f32 --rows 64
    python -m bench.profile_ops --export FOLDER      # an export folder as it is (e.g. a static int8 decoder's)

Each graph is compiled with PERF_COUNT on, with the compile settings the engine uses. A request's
counters are the mean over the calls made on it (calls of one shape give their wall time; after a
change of shape they move like a running mean, though not exactly: a prefill followed by steps did
not average out), so each measurement takes a fresh request and calls of one kind only (the decode
steps run on 74 to 105 positions), and recovers their totals as mean x calls less a first warm-up
call's. "counted / wall" checks that against the wall clock; the milliseconds are shares of the wall
time. Per graph: the time by operation type and the kernel OpenVINO chose (`exec_type`:
`brgemm_avx512_amx` = AMX, `brgemm_avx512` / `jit_avx512` = AVX-512, with the precision it ran in,
`_bf16` / `_f32` / `_I8`; `ref` = reference C++); then the CPU and its flags.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from bench.harness import argument_parser, cpu, full_size_export
from pipeline.config import EngineConfig
from pipeline.engine.runner import IMAGES_PER_CALL, Runner
from pipeline.engine.scheduler import default_batch_size
from pipeline.model import runtime


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

    p = argument_parser(__spec__.name, __doc__)
    p.add_argument("--weight-format", default="int8")
    p.add_argument("--precision", choices=["f32", "bf16"], default=None, help="engine.precision (unset: the engine's)")
    p.add_argument("--dq", type=int, default=EngineConfig.dynamic_quantization_group_size)
    p.add_argument("--rows", type=int, default=default_batch_size(), help="rows of the prefill and the decode steps")
    p.add_argument(
        "--images", type=int, default=IMAGES_PER_CALL, help="images per image-encoder call (the engine's most)"
    )
    p.add_argument("--calls", type=int, default=4, help="measured calls per graph, after one warm-up call")
    p.add_argument("--top", type=int, default=8)
    p.add_argument(
        "--export",
        default=None,
        help="an export folder to profile as it is (e.g. real_lengths --decoder-weights-only's)",
    )
    args = p.parse_args()

    export = Path(args.export) if args.export else full_size_export(args.weight_format)
    cfg = EngineConfig(precision=args.precision, dynamic_quantization_group_size=args.dq, num_requests=1)
    compile_properties = runtime.compile_properties  # the engine's settings, with the counters on
    runtime.compile_properties = lambda *a, **k: {**compile_properties(*a, **k), "PERF_COUNT": True}
    model = runtime.KosmosModel(export, cfg)
    rows, rng = args.rows, np.random.default_rng(0)
    width = model.token_embedder.output(0).get_partial_shape()[-1].get_length()
    # <s><image>, 64 image positions, </image>, `<grounding>An image of`; the first 64 in whole blocks
    prefix, prompt = 64, 73

    pixels = rng.standard_normal((args.images, 3, 224, 224), dtype=np.float32)
    encode = lambda r, *_: r.infer({0: pixels})  # noqa: E731
    totals, wall = measure(model.image_encoder.create_infer_request(), encode, encode, args.calls)
    report(f"image encoder, {args.images} images", totals, wall, args.calls, args.top)

    # The decoder as the engine calls it (engine/runner.py: Runner._call): each row's tokens laid end
    # to end, its KV cache in blocks. A fresh Runner (a fresh request) for each measurement.
    def chunks(length: int) -> list[np.ndarray]:
        return [rng.standard_normal((length, width), dtype=np.float32) * 0.02 for _ in range(rows)]

    def runner() -> tuple[Runner, list[list[int]]]:
        d = Runner(model, 32, rows)
        blocks = d.blocks.needed(prompt + 32)
        d.blocks.reserve(rows * blocks)
        return d, [d.blocks.take(blocks) for _ in range(rows)]

    d, tables = runner()
    images = chunks(prefix)
    call = lambda r, *_: d._call(images, [0] * rows, tables)  # noqa: E731
    totals, wall = measure(d.text_decoder, call, call, args.calls)
    report(f"prefill, image prefixes of {rows} images x {prefix} positions", totals, wall, args.calls, args.top)

    d, tables = runner()  # on blocks holding no prefix: the same work, calls of one kind on the request
    rest = chunks(prompt - prefix)
    call = lambda r, *_: d._call(rest, [prefix] * rows, tables)  # noqa: E731
    totals, wall = measure(d.text_decoder, call, call, args.calls)
    report(f"prefill, the rest of {rows} prompts x {prompt - prefix} positions", totals, wall, args.calls, args.top)

    # Only steps on this request (a prefill's counters would not average out: see the docstring),
    # from a cache holding the prompt to a caption of 32 tokens.
    d, tables = runner()
    steps = [chunks(1) for _ in range(33)]
    step = lambda r, k: d._call(steps[k], [prompt + k] * rows, tables)  # noqa: E731
    totals, wall = measure(d.text_decoder, lambda r: step(r, 0), lambda r, k: step(r, k + 1), len(steps) - 1)
    title = f"decode step, {rows} rows, a cache of {prompt + 1} to {prompt + 32} positions"
    report(title, totals, wall, len(steps) - 1, args.top)

    ids = np.ones((rows, 1), np.int64)
    embed = lambda r, *_: r.infer({"input_ids": ids})  # noqa: E731
    totals, wall = measure(model.token_embedder.create_infer_request(), embed, embed, 20)
    report(f"token embedder, {rows} ids (once per decode step)", totals, wall, 20, 3)

    logits = rng.standard_normal((rows, 65037), dtype=np.float32)
    started = time.perf_counter()
    for _ in range(20):
        tokens = logits.argmax(-1)
        best = logits[np.arange(rows), tokens]
        -np.log(np.exp(logits - best[:, None]).sum(-1))
    step_ms = (time.perf_counter() - started) / 20 * 1000
    print(f"\ngreedy choice and its log-probability in numpy: {step_ms:.1f} ms a step")
    print(
        f"\n{cpu()}; OpenVINO {ov.get_version()}; {args.weight_format} weights, "
        f"precision {args.precision or 'null'} -> {model.precision}, dynamic quantisation group {args.dq}"
    )


if __name__ == "__main__":
    main()
