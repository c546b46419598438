"""Throughput of the annotation run against transformers, side by side, on the full-size Kosmos-2.

    python bench/throughput.py                 # everything (about 15 minutes on 2 cores)
    python bench/throughput.py --skip-sweep    # defaults only
    python bench/throughput.py --only project-int8 --batch-size 16 --num-requests 1   # one probe

Every system captions the same N real images (the example photos, plus flipped and cropped copies)
with `<grounding>An image of` and exactly 32 new tokens, greedy. Each runs in its own process, so
peak RSS is its own. Prints a table and writes it to bench/results/throughput-<time>.json, with each
project row's ratio to the transformers baselines measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

PROMPT = "<grounding>An image of"
NEW_TOKENS = 32


def make_images(folder: Path, n: int) -> list[Path]:
    """N real photos: the examples, then their mirror images, then centre crops."""
    from PIL import Image, ImageOps

    folder.mkdir(parents=True, exist_ok=True)
    sources = sorted((REPO / "examples" / "images").glob("*.*g"))
    out = []
    variants = [lambda im: im, ImageOps.mirror, lambda im: ImageOps.crop(im, (im.width // 8, im.height // 8))]
    while len(out) < n:
        k = len(out)
        src, variant = sources[k % len(sources)], variants[(k // len(sources)) % len(variants)]
        path = folder / f"{k:03d}_{src.stem}.png"
        variant(Image.open(src).convert("RGB")).save(path)
        out.append(path)
    return out


# --------------------------------------------------------------------------- children


def child_transformers(args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    t0 = time.perf_counter()
    model = Kosmos2ForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    load = time.perf_counter() - t0
    paths = sorted(Path(args.images).iterdir())
    start, first, tokens = time.perf_counter(), None, 0
    with torch.inference_mode():
        for i in range(0, len(paths), args.batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + args.batch_size]]
            enc = processor(text=[PROMPT] * len(images), images=images, return_tensors="pt", padding=True)
            out = model.generate(
                pixel_values=enc["pixel_values"].to(dtype),
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                image_embeds_position_mask=enc["image_embeds_position_mask"],
                max_new_tokens=NEW_TOKENS,
                min_new_tokens=NEW_TOKENS,
                do_sample=False,
            )
            tokens += (out.shape[1] - enc["input_ids"].shape[1]) * len(images)
            first = first or time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "tokens": tokens, "load_s": load, "first_row_s": first}


def child_project(args) -> dict:
    from pipeline import sink as sinks
    from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig
    from pipeline.run import run

    t0 = time.perf_counter()
    first = []
    add = sinks.ParquetSink.add

    def timed_add(self, row):
        if not first:
            first.append(time.perf_counter() - t0)
        add(self, row)

    sinks.ParquetSink.add = timed_add
    if args.kv_cache:  # not an engine setting (the engine ties it to the precision): patched in to compare
        import pipeline.model as pm

        original = pm.compile_properties
        pm.compile_properties = lambda c, precision, decoder=False: {
            **original(c, precision, decoder), **({"KV_CACHE_PRECISION": args.kv_cache} if decoder else {})
        }
    cfg = AppConfig(
        model=ModelConfig(source=args.checkpoint, dir=args.model_dir, weight_format=args.weight_format,
                          quantize_text_decoder=args.quantize_text_decoder),
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
        prompt=PROMPT,
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


def spawn(system: str, **kw) -> dict:
    """Run one system in a child process; its result plus its own peak RSS."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, __file__, "--child", system, "--result", result.name]
        for k, v in kw.items():
            cmd += [f"--{k.replace('_', '-')}", str(v)]
        child = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        stderr = child.communicate()[1]
        if child.returncode:
            raise SystemExit(f"{system} failed:\n{stderr[-3000:]}")
        row = json.loads(Path(result.name).read_text())
    row["peak_rss_gb"] = round(row.pop("maxrss_kib") / 2**20, 2)
    row["images_per_s"] = round(row["images"] / row["seconds"], 3)
    row["s_per_image"] = round(row["seconds"] / row["images"], 3)
    row["tokens_per_s"] = round(row["tokens"] / row["seconds"], 1)
    return row


# --------------------------------------------------------------------------- main


def main() -> None:
    from pipeline.config import EngineConfig

    p = argparse.ArgumentParser()
    p.add_argument("--images-n", type=int, default=16)
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--skip-sweep", action="store_true")
    p.add_argument("--only", default=None, help="one system: tf-fp32-b1, tf-bf16-b8, project-fp32, project-fp16, project-int8, project-int4")
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--num-requests", type=int, default=0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--dq", type=int, default=EngineConfig.dynamic_quantization_group_size, help="engine.dynamic_quantization_group_size")
    p.add_argument("--quantize-text-decoder", default="auto", help="model.quantize_text_decoder (false: its own export)")
    p.add_argument("--kv-cache", default="", help="KV cache precision instead of the engine's (u8, bf16, f32)")
    # child mode
    p.add_argument("--child", default=None)
    p.add_argument("--result", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--model-dir", default=None)
    p.add_argument("--weight-format", default="int8")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    if args.child:
        import resource

        row = child_transformers(args) if args.child == "transformers" else child_project(args)
        row["maxrss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        Path(args.result).write_text(json.dumps(row))
        return

    from export_full_size import CACHE, full_size_checkpoint

    from pipeline.config import ModelConfig
    from pipeline.export import ensure_export

    checkpoint = str(full_size_checkpoint())
    images = CACHE / f"images-{args.images_n}"
    if not images.exists():
        make_images(images, args.images_n)
    def export(fmt: str) -> str:
        weights = "-decoder-weights" if args.quantize_text_decoder == "false" else ""
        return str(ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / f"export-{fmt}{weights}"), weight_format=fmt,
                                             quantize_text_decoder=args.quantize_text_decoder)))

    common = {"checkpoint": checkpoint, "images": images}
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))

    def project(fmt, batch_size=args.batch_size, num_requests=args.num_requests, precision=args.precision):
        return spawn(
            "project", **common, model_dir=export(fmt), weight_format=fmt, out=work / f"out-{fmt}",
            batch_size=batch_size, num_requests=num_requests, precision=precision, dq=args.dq, kv_cache=args.kv_cache,
            quantize_text_decoder=args.quantize_text_decoder,
        )

    rows = {}
    systems = {
        "tf-fp32-b1": lambda: spawn("transformers", **common, dtype="fp32", batch_size=1),
        "tf-bf16-b8": lambda: spawn("transformers", **common, dtype="bf16", batch_size=8),
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
    import shutil

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
        line = f"{name:<28}{r['images_per_s']:>8.2f}{r['s_per_image']:>8.2f}{r['tokens_per_s']:>8.1f}{r['peak_rss_gb']:>8.2f}"
        line += f"{r['first_row_s'] or 0:>12.1f}{r['load_s']:>8.1f}"
        line += "".join(f"{r['images_per_s'] / v:>14.1f}" for v in base.values())
        print(line)
    for name, r in rows.items():
        if r.get("stage_seconds"):
            print(f"{name}: stages (busy s) {r['stage_seconds']}")
    results = REPO / "bench" / "results"
    results.mkdir(exist_ok=True)
    path = results / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps({"rows": rows, "ratios_to": base, "cpu": os.cpu_count()}, indent=1))
    print(f"\nwritten {path}")


if __name__ == "__main__":
    main()
