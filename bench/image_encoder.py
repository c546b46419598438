"""The image encoder alone, in each way it can be quantised and computed, on the full-size Kosmos-2.

    python -m bench.image_encoder [--rounds 3] [--batch 16]
    python -m bench.image_encoder --only f32     # the settings whose names hold "f32" (a CPU without bf16)

Builds the encoder four ways from the full-size random checkpoint (cached beside it) with the
export's own code: fp32 weights, fp16 weights, int8 weights (NNCF weight compression, what
`model.quantize_image_encoder=false` gives) and static int8 (NNCF quantisation calibrated as the
export does it, the default). Each setting runs in its own process, rounds interleaved; prints the
seconds per image for a batch of photos, as a ratio to int8 weights with bf16 and dynamic
quantisation (the default before static int8), and how far each one's embeddings are from fp32
computed in f32 on photos that calibration never sees (random weights: a check that nothing broke,
not a measure of caption quality).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from bench.harness import (
    CACHE,
    argument_parser,
    child_arguments,
    child_main,
    cpu,
    full_size_checkpoint,
    photos,
    run_child,
)
from pipeline.config import EngineConfig
from pipeline.export.graphs import _torch_modules
from pipeline.export.quantize import quantize_image_encoder
from pipeline.export.verify import sample_images
from pipeline.model.processor import Processor
from pipeline.model.runtime import compile_properties

# name: (graph, inference precision, dynamic quantisation group size)
SETTINGS = {
    "int8 weights, bf16, dynamic quantisation 256 (before)": ("int8-weights", "bf16", 256),
    "int8 weights, f32, dynamic quantisation 256 (auto on AMX)": ("int8-weights", "f32", 256),
    "static int8, bf16 (auto here)": ("int8-static", "bf16", 256),
    "static int8, f32 (auto on AMX)": ("int8-static", "f32", 256),
    "fp16 weights, bf16": ("fp16", "bf16", 256),
    "fp32 weights, f32 (reference)": ("fp32", "f32", 0),
}
REFERENCE = "fp32 weights, f32 (reference)"


def encoder_photos(n: int):
    """Test photos (mirrored and cropped copies of the examples), and the accuracy photos: the export's
    own check photos, which calibration never sees, whole and mirrored."""
    from PIL import Image, ImageOps

    test = sorted(photos(n).iterdir())
    checks = [Image.open(p).convert("RGB") for p in sample_images()]
    accuracy = [view for image in checks for view in (image, ImageOps.mirror(image))]
    return [Image.open(p).convert("RGB") for p in test], accuracy


def build(folder: Path) -> None:
    """The four graphs, each written once: the export's own conversion and compression code."""
    if all((folder / f"{g}.xml").exists() for g in ("fp32", "fp16", "int8-weights", "int8-static")):
        return
    import nncf
    import openvino as ov
    import torch
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = full_size_checkpoint()
    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    size = model.config.vision_config.image_size
    with torch.no_grad():
        fp32 = ov.convert_model(
            _torch_modules(model)[0],
            example_input=torch.zeros(2, 3, size, size),
            input=[("pixel_values", ov.PartialShape([-1, 3, size, size]), ov.Type.f32)],
        )
    ov.save_model(fp32, folder / "fp32.xml", compress_to_fp16=False)
    ov.save_model(fp32, folder / "fp16.xml", compress_to_fp16=True)
    weights = nncf.compress_weights(fp32.clone(), mode=nncf.CompressWeightsMode.INT8_ASYM)
    ov.save_model(weights, folder / "int8-weights.xml")
    ov.save_model(quantize_image_encoder(fp32, processor), folder / "int8-static.xml")


def child(args) -> dict:
    import openvino as ov

    processor = Processor(full_size_checkpoint())
    test, accuracy = encoder_photos(args.images_n)
    graph, precision, group = SETTINGS[args.setting]
    cfg = EngineConfig(num_requests=1, dynamic_quantization_group_size=group)  # the engine's settings otherwise
    compiled = ov.Core().compile_model(Path(args.folder) / f"{graph}.xml", "CPU", compile_properties(cfg, precision))
    request = compiled.create_infer_request()
    pixels = np.stack([processor.pixel_values(im) for im in test])
    request.infer([pixels[: args.batch]])  # the first call repacks the weights
    seconds = []
    for start in range(0, len(pixels), args.batch):
        t = time.perf_counter()
        request.infer([pixels[start : start + args.batch]])
        seconds.append((time.perf_counter() - t) / len(pixels[start : start + args.batch]))
    embeds = request.infer([np.stack([processor.pixel_values(im) for im in accuracy])])[0]
    np.save(args.embeds, embeds)
    return {"s_per_image": statistics.median(seconds)}


def main() -> None:
    p = argument_parser(__spec__.name, __doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--images-n", type=int, default=64)
    p.add_argument("--only", default="", help="only the settings whose names hold this (the reference always runs)")
    child_arguments(p)
    p.add_argument("--setting", default=None, help=argparse.SUPPRESS)
    p.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    p.add_argument("--embeds", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args, child)
        return

    folder = CACHE / "image-encoder"
    build(folder)
    chosen = [s for s in SETTINGS if args.only in s or s == REFERENCE]
    seconds: dict[str, list[float]] = {s: [] for s in chosen}
    for round_ in range(args.rounds):
        for k, setting in enumerate(chosen):
            row = run_child(
                __spec__.name,
                "encoder",
                setting=setting,
                folder=folder,
                embeds=folder / f"embeds-{k}.npy",
                batch=args.batch,
                images_n=args.images_n,
            )
            seconds[setting].append(row["s_per_image"])
            print(f"round {round_ + 1} {setting}: {row['s_per_image']:.3f} s/image", flush=True)
    embeds = {s: np.load(folder / f"embeds-{k}.npy") for k, s in enumerate(chosen)}
    ref = embeds[REFERENCE]
    base = statistics.median(seconds[chosen[0]])
    print(
        f"\n{cpu()}\nimage encoder, {args.images_n} photos in batches of {args.batch}, medians of {args.rounds} rounds"
    )
    print(
        f"| setting | s/image | runs | x {chosen[0]} | min cosine to fp32 | max abs difference |\n"
        "| --- | --- | --- | --- | --- | --- |"
    )
    for setting, runs in seconds.items():
        got = embeds[setting]
        cos = (got * ref).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
        m = statistics.median(runs)
        print(
            f"| {setting} | {m:.3f} | {' / '.join(f'{r:.3f}' for r in runs)} | {base / m:.2f} | {cos.min():.5f} "
            f"| {np.abs(got - ref).max():.4f} |"
        )


if __name__ == "__main__":
    main()
