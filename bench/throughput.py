"""Throughput of the annotation run against transformers, side by side, on the full-size Kosmos-2.

    python -m bench.throughput                 # everything (about 15 minutes on 2 cores)
    python -m bench.throughput --skip-sweep    # defaults only
    python -m bench.throughput --only project-int8 --batch-size 16 --num-requests 1   # one system

Every system captions the same N real photos (the examples, plus mirrored and cropped copies) with
`<grounding>An image of` and exactly 32 new tokens, greedy, each in its own process, so peak RSS is
its own. Prints a table and writes it to bench/results/throughput-<time>.json, with each row's ratio
to the transformers baselines measured in the same run. `--only` prints one system's JSON instead:
load, first row written, images/s once loaded, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from bench.harness import (
    RESULTS,
    argument_parser,
    child_arguments,
    child_main,
    full_size_checkpoint,
    full_size_export,
    optional_bool,
    photos,
    run_child,
    transformers_child,
)
from pipeline.annotation.run import run
from pipeline.annotation.sink import ParquetSink
from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig
from pipeline.model import runtime
from pipeline.model.prompt import CAPTION

NEW_TOKENS = 32


def child_project(args) -> dict:
    t0 = time.perf_counter()
    first = []
    add = ParquetSink.add

    def timed_add(self, row):
        if not first:
            first.append(time.perf_counter() - t0)
        add(self, row)

    ParquetSink.add = timed_add
    if args.kv_cache:  # not an engine setting (the engine ties it to the precision): patched in to compare
        original = runtime.compile_properties
        runtime.compile_properties = lambda c, precision, decoder=False: {
            **original(c, precision, decoder),
            **({"KV_CACHE_PRECISION": args.kv_cache} if decoder else {}),
        }
    cfg = AppConfig(
        model=ModelConfig(
            source=args.checkpoint,
            dir=args.model_dir,
            weight_format=args.weight_format,
            quantize_text_decoder=args.quantize_text_decoder,
        ),
        engine=EngineConfig(
            precision=args.precision,
            dynamic_quantization_group_size=args.dq,
            batch_size=args.batch_size,
            num_requests=args.num_requests,
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
        ),
        input=InputConfig(path=args.images),
        output=OutputConfig(dir=args.out, mode="overwrite"),
        prompt=CAPTION,
    )
    summary = run(cfg, Path(args.out))
    seconds = summary.items / summary.images_per_s
    return {
        "images": summary.items,
        "seconds": seconds,
        "tokens": summary.generated_tokens,
        "load_s": summary.load_seconds,
        "first_row_s": first[0] if first else None,
        "stage_seconds": summary.stage_seconds,
        "errors": summary.errors,
    }


def child(args) -> dict:
    if args.child == "transformers":
        return transformers_child(args.checkpoint, args.images, args.tf_dtype, args.batch_size, [CAPTION], NEW_TOKENS)
    return child_project(args)


def spawn(system: str, **kw) -> dict:
    """Run one system in a child process; its result plus its own peak RSS."""
    row = run_child(__spec__.name, system, **kw)
    row["peak_rss_gb"] = round(row.pop("maxrss_kib") / 2**20, 2)
    row["images_per_s"] = round(row["images"] / row["seconds"], 3)
    row["s_per_image"] = round(row["seconds"] / row["images"], 3)
    row["tokens_per_s"] = round(row["tokens"] / row["seconds"], 1)
    return row


def main() -> None:
    p = argument_parser(__spec__.name, __doc__)
    p.add_argument("--images-n", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument(
        "--only",
        default=None,
        help="one system: tf-fp32-b1, tf-bf16-b8, project-fp32, project-fp16, project-int8, project-int4",
    )
    p.add_argument("--batch-size", type=int, default=None, help="engine.batch_size (unset: the engine's)")
    p.add_argument("--num-requests", type=int, default=None, help="engine.num_requests (unset: the engine's)")
    p.add_argument("--precision", choices=["f32", "bf16"], default=None, help="engine.precision (unset: the engine's)")
    p.add_argument(
        "--dq",
        type=int,
        default=EngineConfig.dynamic_quantization_group_size,
        help="engine.dynamic_quantization_group_size",
    )
    p.add_argument(
        "--quantize-text-decoder",
        type=optional_bool,
        default=None,
        metavar="{true,false,null}",
        help="model.quantize_text_decoder (true, false: an export of its own; unset: the project's)",
    )
    p.add_argument("--kv-cache", default="", help="KV cache precision instead of the engine's (u8, bf16, f32)")
    child_arguments(p)
    p.add_argument("--tf-dtype", default="fp32", help=argparse.SUPPRESS)
    p.add_argument("--weight-format", default="int8", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.batch_size, args.num_requests = args.batch_size or None, args.num_requests or None
    if args.child:
        child_main(args, child)
        return

    checkpoint = str(full_size_checkpoint())
    images = photos(args.images_n)

    def export(fmt: str) -> str:
        return str(full_size_export(fmt, quantize_text_decoder=args.quantize_text_decoder))

    common = {"checkpoint": checkpoint, "images": images}
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))

    def project(fmt, batch_size=args.batch_size, num_requests=args.num_requests, precision=args.precision):
        return spawn(
            "project",
            **common,
            model_dir=export(fmt),
            weight_format=fmt,
            out=work / f"out-{fmt}",
            batch_size=batch_size,
            num_requests=num_requests,
            precision=precision,
            dq=args.dq,
            kv_cache=args.kv_cache or None,
            quantize_text_decoder=args.quantize_text_decoder,
        )

    rows = {}
    systems = {
        "tf-fp32-b1": lambda: spawn("transformers", **common, tf_dtype="fp32", batch_size=1),
        "tf-bf16-b8": lambda: spawn("transformers", **common, tf_dtype="bf16", batch_size=8),
        "project-fp32": lambda: project("fp32"),
        "project-fp16": lambda: project("fp16"),
        "project-int8": lambda: project("int8"),
        "project-int4": lambda: project("int4"),
    }
    if args.only:
        rows[args.only] = systems[args.only]()
        print(json.dumps(rows[args.only], indent=1))
        return

    for name, fn in systems.items():
        if args.skip_transformers and name.startswith("tf-"):
            continue
        print(f"running {name} ...", flush=True)
        rows[name] = fn()

    # Cold start (no compiled-model cache) and warm start, with the default settings.
    shutil.rmtree(Path(export("int8")) / "_cache", ignore_errors=True)
    rows["project-int8 cold start"] = project("int8")
    rows["project-int8 warm start"] = project("int8")

    if not args.skip_sweep:
        for fmt in ("int8", "int4"):
            for bs in (4, 8, 16):
                for nr in (1, 2):
                    print(f"sweep {fmt} batch {bs} requests {nr} ...", flush=True)
                    rows[f"sweep {fmt} b{bs} r{nr}"] = project(fmt, batch_size=bs, num_requests=nr)

    base = {k: rows[k]["images_per_s"] for k in ("tf-fp32-b1", "tf-bf16-b8") if k in rows}
    print()
    header = f"{'system':<28}{'img/s':>8}{'s/img':>8}{'tok/s':>8}{'RSS GB':>8}{'first row s':>12}{'load s':>8}"
    header += "".join(f"{'x ' + k:>14}" for k in base)
    print(header)
    for name, r in rows.items():
        line = f"{name:<28}{r['images_per_s']:>8.2f}{r['s_per_image']:>8.2f}{r['tokens_per_s']:>8.1f}"
        line += f"{r['peak_rss_gb']:>8.2f}{r['first_row_s'] or 0:>12.1f}{r['load_s']:>8.1f}"
        line += "".join(f"{r['images_per_s'] / v:>14.1f}" for v in base.values())
        print(line)
    for name, r in rows.items():
        if r.get("stage_seconds"):
            print(f"{name}: stages (busy s) {r['stage_seconds']}")
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"rows": rows, "ratios_to": base, "cpu": os.cpu_count()}, indent=1))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
