"""Captions of real, varying lengths: the project against transformers when rows stop at different steps.

    python bench/real_lengths.py                  # 32 images, 3 rounds (about 12 minutes on 2 cores)
    python bench/real_lengths.py --images-n 64 --rows 16 32 64 --before ../before   # row counts; an older checkout
    python bench/real_lengths.py --images-n 64 --rows 0 --fixed 32 --tf-batches 8 32  # fixed lengths, transformers at 32
    python bench/real_lengths.py --images-n 64 --rows 0 --encoder-weights-only       # and model.quantize_image_encoder=false
    python bench/real_lengths.py --images-n 64 --rows 0 --admit 2 8 32               # when rows are admitted
    python bench/real_lengths.py --images-n 64 --rows 0 --decoder-weights-only       # and model.quantize_text_decoder=false
    python bench/real_lengths.py --images-n 64 --rows 0 --static-decoder             # and model.quantize_text_decoder=true

Random weights never stop on their own, so each image is given a caption length between 8 and 64
tokens, drawn from its pixel values (the project's and transformers' are equal bit for bit, so both
systems give an image the same length): end-of-sequence is held back before it and forced at it, per
row. transformers stops a batch when its longest row stops, as it does for real captions; the project
lets rows leave the decoder as they stop. Full-size architecture, int8 export for the project, each
system in its own process, rounds interleaved; medians of seconds per image once loaded, as ratios to
transformers batch 8 measured in the same run, in bf16 where the CPU computes it, else fp32 (--tf-dtype).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from harness import cpu, run_child, tf_dtype

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
SHORTEST, LONGEST = 8, 64
PROMPT = "<grounding>An image of"


def length_of(pixel_values: np.ndarray, fixed: int = 0) -> int:
    if fixed:
        return fixed
    digest = hashlib.sha256(np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes()).digest()
    return SHORTEST + int.from_bytes(digest[:4], "little") % (LONGEST - SHORTEST + 1)


def child_project(args) -> dict:
    from pipeline import engine
    from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig
    from pipeline.run import run

    choose = engine.Engine._choose

    def forced(self, decoder, feed, rows, logits):
        """Each row ends at its image's length: end-of-sequence held back before it, forced at it."""
        logits, eos = logits.copy(), self.model.eos_token_id
        for j, row in enumerate(rows):
            if not hasattr(row, "wanted"):
                row.wanted = length_of(row.request.pixel_values, args.fixed)
            logits[j, eos] = 1e4 if row.wanted == len(row.generation.token_ids) else -np.inf
        return choose(self, decoder, feed, rows, logits)

    engine.Engine._choose = forced
    if args.admit_divisor:
        engine.admit_at = lambda batch_size: max(1, batch_size // args.admit_divisor)
    cfg = AppConfig(
        model=ModelConfig(source=args.checkpoint, dir=args.model_dir, weight_format="int8",
                          quantize_image_encoder=bool(args.quantize_image_encoder),
                          quantize_text_decoder=args.quantize_text_decoder),
        engine=EngineConfig(batch_size=args.batch_size, max_new_tokens=LONGEST + 1),
        input=InputConfig(path=args.images),
        output=OutputConfig(dir=args.out, mode="overwrite"),
        prompt=PROMPT,
    )
    summary = run(cfg, Path(args.out))
    return {"images": summary.items, "seconds": summary.items / summary.images_per_s, "tokens": summary.generated_tokens}


def child_transformers(args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.tf_dtype]
    model = Kosmos2ForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    eos = model.config.text_config.eos_token_id
    paths = sorted(Path(args.images).iterdir())

    class Forced(LogitsProcessor):
        def __init__(self, lengths, prompt):
            self.lengths, self.prompt = torch.tensor(lengths), prompt

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - self.prompt
            scores[self.lengths > made, eos] = -float("inf")
            scores[self.lengths == made, eos] = 1e4
            return scores

    start, tokens = time.perf_counter(), 0
    with torch.inference_mode():
        for i in range(0, len(paths), args.batch_size):
            images = [Image.open(p).convert("RGB") for p in paths[i : i + args.batch_size]]
            enc = processor(text=[PROMPT] * len(images), images=images, return_tensors="pt", padding=True)
            lengths = [length_of(p.numpy(), args.fixed) for p in enc["pixel_values"]]
            out = model.generate(
                pixel_values=enc["pixel_values"].to(dtype), input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"], image_embeds_position_mask=enc["image_embeds_position_mask"],
                max_new_tokens=LONGEST + 1, do_sample=False,
                logits_processor=LogitsProcessorList([Forced(lengths, enc["input_ids"].shape[1])]),
            )
            new = out[:, enc["input_ids"].shape[1] :]
            assert all(int((row == eos).nonzero()[0]) == n for row, n in zip(new, lengths)), "a row did not stop at its length"
            tokens += sum(lengths)
    return {"images": len(paths), "seconds": time.perf_counter() - start, "tokens": tokens}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images-n", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, nargs="*", default=[0, 32], help="engine.batch_size values measured (0: the defaults)")
    p.add_argument("--before", default=None, help="another checkout of the project (a git worktree), run by its own copy of this script")
    p.add_argument("--child", default=None)
    p.add_argument("--result", default=None)
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None)
    p.add_argument("--batch-size", type=int, default=0)
    p.add_argument("--quantize-image-encoder", type=int, default=1)
    p.add_argument("--fixed", type=int, default=0, help=f"every caption this many tokens (1 to {LONGEST}) instead of varying lengths")
    p.add_argument("--tf-batches", type=int, nargs="*", default=[8], help="transformers batch sizes measured")
    p.add_argument("--tf-dtype", default=tf_dtype(), choices=["bf16", "fp32"], help="transformers' precision (default: its best here)")
    p.add_argument("--admit", type=int, nargs="*", default=[],
                   help="also run the defaults admitting new rows when batch/D rows are free, for each D (the engine's: 4)")
    p.add_argument("--admit-divisor", type=int, default=0)
    p.add_argument("--quantize-text-decoder", default="auto")
    p.add_argument("--static-decoder", action="store_true",
                   help="also run the defaults with model.quantize_text_decoder=true (its own export)")
    p.add_argument("--decoder-weights-only", action="store_true",
                   help="also run the defaults with model.quantize_text_decoder=false (its own export)")
    p.add_argument("--encoder-weights-only", action="store_true",
                   help="also run the defaults with model.quantize_image_encoder=false (its own export)")
    args = p.parse_args()
    if args.child:
        row = child_transformers(args) if args.child.startswith("tf") else child_project(args)
        Path(args.result).write_text(json.dumps(row))
        return

    from export_full_size import CACHE, full_size_checkpoint
    from throughput import make_images

    from pipeline.config import ModelConfig
    from pipeline.export import ensure_export

    checkpoint = str(full_size_checkpoint())
    model_dir = str(ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8"), weight_format="int8")))
    weights_only = ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8-encoder-weights"), weight_format="int8",
                               quantize_image_encoder=False)
    images = CACHE / f"images-{args.images_n}"
    if not images.exists():
        make_images(images, args.images_n)
    here = str(Path(__file__).resolve())
    assert 0 <= args.fixed <= LONGEST, f"--fixed {args.fixed}: 1 to {LONGEST}"
    systems = {f"tf-{args.tf_dtype}-b{n}": (here, {"batch_size": n, "tf_dtype": args.tf_dtype}) for n in args.tf_batches}
    systems.update({f"project, {n} rows" if n else "project (defaults)": (here, {"batch_size": n}) for n in args.rows})
    if args.encoder_weights_only:
        folder = str(ensure_export(weights_only))
        systems["project (defaults), image encoder weights only"] = (here, {"model_dir": folder, "quantize_image_encoder": 0})
    if args.decoder_weights_only:
        folder = ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8-decoder-weights"), weight_format="int8",
                                           quantize_text_decoder="false"))
        systems["project (defaults), text decoder weights only"] = (here, {"model_dir": str(folder), "quantize_text_decoder": "false"})
    if args.static_decoder:
        folder = ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8-static-decoder"), weight_format="int8",
                                           quantize_text_decoder="true"))
        systems["project (defaults), static int8 text decoder"] = (here, {"model_dir": str(folder), "quantize_text_decoder": "true"})
    systems.update({f"project (defaults), admitting when 1/{d} of the rows are free": (here, {"admit_divisor": d}) for d in args.admit})
    if args.before:
        systems["project before (its defaults)"] = (str(Path(args.before).resolve() / "bench" / "real_lengths.py"), {})
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    tokens = {}
    for round_ in range(args.rounds):
        for k, (system, (script, options)) in enumerate(systems.items()):
            options = {"model_dir": model_dir, "batch_size": 0, "fixed": args.fixed, **options}
            row = run_child(script, "tf" if system.startswith("tf") else "project", checkpoint=checkpoint, images=images,
                            out=work / f"{k}-{round_}", **options)
            seconds[system].append(row["seconds"] / row["images"])
            tokens[system] = row["tokens"]
            print(f"round {round_ + 1} {system}: {seconds[system][-1]:.3f} s/image, {row['tokens']} tokens", flush=True)
    assert len(set(tokens.values())) == 1, f"the systems generated different numbers of tokens: {tokens}"
    lengths = f"every caption {args.fixed} tokens" if args.fixed else f"captions of {SHORTEST} to {LONGEST} tokens"
    baselines = [s for s in systems if s.startswith("tf-")] or list(systems)[:1]  # transformers, or without it (--tf-batches) the first system
    print(f"\n{cpu()}\n{args.images_n} images, {lengths} ({tokens[baselines[0]] / args.images_n:.1f} on average), "
          f"medians of {args.rounds} rounds, seconds per image once loaded")
    base = {s: statistics.median(seconds[s]) for s in (baselines[0], min(baselines, key=lambda s: statistics.median(seconds[s])))}
    print(f"| system | s/image | runs | {' | '.join(f'x {s}' for s in base)} |\n|" + " --- |" * (3 + len(base)))
    for system, runs in seconds.items():
        m = statistics.median(runs)
        print(f"| {system} | {m:.3f} | {' / '.join(f'{r:.2f}' for r in runs)} | {' | '.join(f'{b / m:.2f}' for b in base.values())} |")


if __name__ == "__main__":
    main()
