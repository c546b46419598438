"""Captions of real, varying lengths: the project against transformers when rows stop at different steps.

    python -m bench.real_lengths                  # 32 images, 3 rounds (about 12 minutes on 2 cores)
    python -m bench.real_lengths --images-n 64 --rows 16 32 64 --before ../before  # row counts; another checkout
    python -m bench.real_lengths --images-n 64 --rows 0 --fixed 32 --tf-batches 8 32  # fixed lengths
    python -m bench.real_lengths --images-n 64 --rows 0 --encoder-weights-only  # model.quantize_image_encoder=false
    python -m bench.real_lengths --images-n 64 --rows 0 --admit 2 8 32          # when rows are admitted
    python -m bench.real_lengths --images-n 64 --rows 0 --decoder-weights-only  # model.quantize_text_decoder=false
    python -m bench.real_lengths --images-n 64 --rows 0 --static-decoder        # model.quantize_text_decoder=true

Random weights never stop on their own, so each image is given a caption length between 8 and 64
tokens, drawn from its pixel values (the project's and transformers' are equal bit for bit, so both
systems give an image the same length): end-of-sequence is held back before it and forced at it, per
row. transformers stops a batch when its longest row stops, as it does for real captions; the project
lets rows leave the decoder as they stop. Full-size architecture, int8 export for the project, each
system in its own process, rounds interleaved; prints medians of seconds per image once loaded, as
ratios to transformers measured in the same run (bf16 where the CPU computes it, else fp32).
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
from pathlib import Path

import numpy as np

from bench.harness import (
    REPO,
    argument_parser,
    child_arguments,
    child_main,
    cpu,
    full_size_checkpoint,
    full_size_export,
    optional_bool,
    photos,
    run_child,
    tf_dtype,
    transformers_child,
)
from pipeline.annotation.run import run
from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig
from pipeline.engine import core
from pipeline.model.prompt import CAPTION

SHORTEST, LONGEST = 8, 64


def length_of(pixel_values: np.ndarray, fixed: int = 0) -> int:
    if fixed:
        return fixed
    digest = hashlib.sha256(np.ascontiguousarray(pixel_values, dtype=np.float32).tobytes()).digest()
    return SHORTEST + int.from_bytes(digest[:4], "little") % (LONGEST - SHORTEST + 1)


def child_project(args) -> dict:
    choose = core.Engine._choose

    def forced(self, runner, feed, rows, logits):
        """Each row ends at its image's length: end-of-sequence held back before it, forced at it."""
        logits, eos = logits.copy(), self.model.eos_token_id
        for j, row in enumerate(rows):
            if not hasattr(row, "wanted"):
                row.wanted = length_of(row.request.pixel_values, args.fixed)
            logits[j, eos] = 1e4 if row.wanted == len(row.generation.token_ids) else -np.inf
        return choose(self, runner, feed, rows, logits)

    core.Engine._choose = forced
    if args.admit_divisor:  # the engine's loop calls admit_at (engine/scheduler.py) by its name in core
        core.admit_at = lambda batch_size: max(1, batch_size // args.admit_divisor)
    cfg = AppConfig(
        model=ModelConfig(
            source=args.checkpoint,
            dir=args.model_dir,
            weight_format="int8",
            quantize_image_encoder=args.quantize_image_encoder,
            quantize_text_decoder=args.quantize_text_decoder,
        ),
        engine=EngineConfig(batch_size=args.batch_size, max_new_tokens=LONGEST + 1),
        input=InputConfig(path=args.images),
        output=OutputConfig(dir=args.out, mode="overwrite"),
        prompt=CAPTION,
    )
    summary = run(cfg, Path(args.out))
    return {
        "images": summary.items,
        "seconds": summary.items / summary.images_per_s,
        "tokens": summary.generated_tokens,
    }


def child(args) -> dict:
    if args.child == "tf":
        return transformers_child(
            args.checkpoint, args.images, args.tf_dtype, args.batch_size, [CAPTION], lambda p: length_of(p, args.fixed)
        )
    return child_project(args)


def main() -> None:
    p = argument_parser(__spec__.name, __doc__)
    p.add_argument("--images-n", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument(
        "--rows", type=int, nargs="*", default=[0, 32], help="engine.batch_size values measured (0: the defaults)"
    )
    p.add_argument(
        "--before", default=None, help="another checkout of the project (a git worktree), run by its own bench package"
    )
    p.add_argument(
        "--fixed",
        type=int,
        default=0,
        help=f"every caption this many tokens (1 to {LONGEST}) instead of varying lengths",
    )
    p.add_argument("--tf-batches", type=int, nargs="*", default=[8], help="transformers batch sizes measured")
    p.add_argument(
        "--tf-dtype",
        default=tf_dtype(),
        choices=["bf16", "fp32"],
        help="transformers' precision (default: its best here)",
    )
    p.add_argument(
        "--admit",
        type=int,
        nargs="*",
        default=[],
        help="also run the defaults admitting new rows when batch/D rows are free, for each D (the engine's: 4)",
    )
    p.add_argument(
        "--static-decoder",
        action="store_true",
        help="also run the defaults with model.quantize_text_decoder=true (its own export)",
    )
    p.add_argument(
        "--decoder-weights-only",
        action="store_true",
        help="also run the defaults with model.quantize_text_decoder=false (its own export)",
    )
    p.add_argument(
        "--encoder-weights-only",
        action="store_true",
        help="also run the defaults with model.quantize_image_encoder=false (its own export)",
    )
    child_arguments(p)
    p.add_argument("--batch-size", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--admit-divisor", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--quantize-image-encoder", type=optional_bool, default=True, help=argparse.SUPPRESS)
    p.add_argument("--quantize-text-decoder", type=optional_bool, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child_main(args, child)
        return

    assert 0 <= args.fixed <= LONGEST, f"--fixed {args.fixed}: 1 to {LONGEST}"
    checkpoint = str(full_size_checkpoint())
    model_dir = str(full_size_export())
    images = photos(args.images_n)
    systems = {
        f"tf-{args.tf_dtype}-b{n}": (REPO, {"batch_size": n, "tf_dtype": args.tf_dtype}) for n in args.tf_batches
    }
    systems.update({f"project, {n} rows" if n else "project (defaults)": (REPO, {"batch_size": n}) for n in args.rows})
    if args.encoder_weights_only:
        folder = str(full_size_export(quantize_image_encoder=False))
        systems["project (defaults), image encoder weights only"] = (
            REPO,
            {"model_dir": folder, "quantize_image_encoder": False},
        )
    if args.decoder_weights_only:
        folder = str(full_size_export(quantize_text_decoder=False))
        systems["project (defaults), text decoder weights only"] = (
            REPO,
            {"model_dir": folder, "quantize_text_decoder": False},
        )
    if args.static_decoder:
        folder = str(full_size_export(quantize_text_decoder=True))
        systems["project (defaults), static int8 text decoder"] = (
            REPO,
            {"model_dir": folder, "quantize_text_decoder": True},
        )
    systems.update(
        {
            f"project (defaults), admitting when 1/{d} of the rows are free": (REPO, {"admit_divisor": d})
            for d in args.admit
        }
    )
    if args.before:
        systems["project before (its defaults)"] = (Path(args.before).resolve(), {})
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    tokens = {}
    for round_ in range(args.rounds):
        for k, (system, (repo, options)) in enumerate(systems.items()):
            options = {"model_dir": model_dir, "fixed": args.fixed, **options}
            options["batch_size"] = options.get("batch_size") or None  # 0 or none: the engine's own
            row = run_child(
                __spec__.name,
                "tf" if system.startswith("tf") else "project",
                repo=repo,
                checkpoint=checkpoint,
                images=images,
                out=work / f"{k}-{round_}",
                **options,
            )
            seconds[system].append(row["seconds"] / row["images"])
            tokens[system] = row["tokens"]
            print(f"round {round_ + 1} {system}: {seconds[system][-1]:.3f} s/image, {row['tokens']} tokens", flush=True)
    assert len(set(tokens.values())) == 1, f"the systems generated different numbers of tokens: {tokens}"
    lengths = f"every caption {args.fixed} tokens" if args.fixed else f"captions of {SHORTEST} to {LONGEST} tokens"
    # transformers, or without it (--tf-batches with no sizes) the first system
    baselines = [s for s in systems if s.startswith("tf-")] or list(systems)[:1]
    print(
        f"\n{cpu()}\n{args.images_n} images, {lengths} ({tokens[baselines[0]] / args.images_n:.1f} on average), "
        f"medians of {args.rounds} rounds, seconds per image once loaded"
    )
    fastest = min(baselines, key=lambda s: statistics.median(seconds[s]))
    base = {s: statistics.median(seconds[s]) for s in (baselines[0], fastest)}
    print(f"| system | s/image | runs | {' | '.join(f'x {s}' for s in base)} |\n|" + " --- |" * (3 + len(base)))
    for system, runs in seconds.items():
        m = statistics.median(runs)
        ratios = " | ".join(f"{b / m:.2f}" for b in base.values())
        print(f"| {system} | {m:.3f} | {' / '.join(f'{r:.2f}' for r in runs)} | {ratios} |")


if __name__ == "__main__":
    main()
