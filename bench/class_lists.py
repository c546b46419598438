"""What a class list costs: task=ground with ten phrases against one caption of the same images.

    python -m bench.class_lists                       # 8 images, 3 rounds (about 15 minutes on 2 cores)
    python -m bench.class_lists --before ../before    # also the project at another checkout (a git worktree)

On the full-size Kosmos-2 architecture (random weights, its int8 export), every system runs in its
own process, rounds interleaved, and the table gives medians of the seconds per image once loaded,
as ratios to the caption measured in the same run:
- `caption`: the project's defaults, `<grounding>An image of`, exactly 32 new tokens;
- `ground-10`: the project's defaults, task=ground with ten phrases (PHRASES), exactly 4 new tokens a
  phrase (what the real model answers for one box: `<object>`, two patch tokens, `</object>`);
- `ground-10-before`: the same, run by another checkout's own bench package (--before);
- `tf-bf16-ground-10`: transformers, the ten referring prompts of an image as one batch, 4 tokens; in
  bf16 where the CPU computes it, else fp32 (`tf-fp32-ground-10`; --tf-dtype).
Random weights say nothing sensible, so lengths are forced (min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

from bench.harness import (
    REPO,
    argument_parser,
    child_arguments,
    child_main,
    cpu,
    full_size_checkpoint,
    full_size_export,
    photos,
    run_child,
    tf_dtype,
    transformers_child,
)
from pipeline.annotation.run import run
from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig, TaskConfig
from pipeline.model.prompt import ground

PHRASES = [
    "a person",
    "a dog",
    "a cat",
    "a car",
    "a bicycle",
    "a traffic light",
    "a chair",
    "a cup of coffee",
    "a tree",
    "the sky",
]
CAPTION_TOKENS, PHRASE_TOKENS = 32, 4


def child_project(args) -> dict:
    grounding = args.child != "caption"
    tokens = PHRASE_TOKENS if grounding else CAPTION_TOKENS
    cfg = AppConfig(
        model=ModelConfig(source=args.checkpoint, dir=args.model_dir, weight_format="int8"),
        engine=EngineConfig(batch_size=args.batch_size, max_new_tokens=tokens, min_new_tokens=tokens),
        input=InputConfig(path=args.images),
        output=OutputConfig(dir=args.out, mode="overwrite"),
        task=TaskConfig(kind="ground", phrases=PHRASES) if grounding else TaskConfig(),
    )
    summary = run(cfg, Path(args.out))
    return {
        "images": summary.items,
        "seconds": summary.items / summary.images_per_s,
        "errors": summary.errors,
        "stage_seconds": summary.stage_seconds,
    }


def child(args) -> dict:
    if args.child.startswith("tf-"):
        prompts = [ground(phrase) for phrase in PHRASES]
        return transformers_child(args.checkpoint, args.images, args.tf_dtype, 1, prompts, PHRASE_TOKENS)
    return child_project(args)


def main() -> None:
    p = argument_parser(__spec__.name, __doc__)
    p.add_argument("--images-n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=None, help="another checkout of the project, measured as ground-10-before")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument(
        "--batch-size", type=int, default=None, help="engine.batch_size of the project's systems (unset: its default)"
    )
    p.add_argument(
        "--tf-dtype",
        default=tf_dtype(),
        choices=["bf16", "fp32"],
        help="transformers' precision (default: its best here)",
    )
    child_arguments(p)
    args = p.parse_args()
    args.batch_size = args.batch_size or None
    if args.child:
        child_main(args, child)
        return

    checkpoint = str(full_size_checkpoint())
    model_dir = str(full_size_export())
    images = photos(args.images_n)
    systems = {"caption": ("caption", REPO), "ground-10": ("ground-10", REPO)}
    if args.before:
        systems["ground-10-before"] = ("ground-10", Path(args.before).resolve())
    tf = f"tf-{args.tf_dtype}-ground-10"
    if not args.skip_transformers:
        systems[tf] = (tf, REPO)
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    for round_ in range(args.rounds):
        for system, (kind, repo) in systems.items():
            row = run_child(
                __spec__.name,
                kind,
                repo=repo,
                checkpoint=checkpoint,
                images=images,
                model_dir=model_dir,
                out=work / f"{system}-{round_}",
                batch_size=args.batch_size,
                tf_dtype=args.tf_dtype,
            )
            seconds[system].append(row["seconds"] / row["images"])
            print(f"round {round_ + 1} {system}: {seconds[system][-1]:.3f} s/image", flush=True)
    print(f"\n{cpu()}\n{args.images_n} images, medians of {args.rounds} rounds, seconds per image once loaded")
    caption = statistics.median(seconds["caption"])
    print("| system | s/image | runs | x caption |\n| --- | --- | --- | --- |")
    for system, runs in seconds.items():
        m = statistics.median(runs)
        print(f"| {system} | {m:.3f} | {' / '.join(f'{r:.2f}' for r in runs)} | {m / caption:.2f} |")
    if tf in seconds:
        print(
            f"ground-10 is {statistics.median(seconds[tf]) / statistics.median(seconds['ground-10']):.2f}x faster "
            f"than transformers {args.tf_dtype} (ten prompts as one batch)"
        )


if __name__ == "__main__":
    main()
