"""What a class list costs: task=ground with ten phrases against one caption of the same images.

    python bench/class_lists.py                       # 8 images, 3 rounds (about 15 minutes on 2 cores)
    python bench/class_lists.py --before ../before    # also the project at another checkout (a git worktree)

On the full-size Kosmos-2 architecture (random weights, the int8 export of bench/export_full_size.py),
every system runs in its own process, rounds interleaved, and the table gives medians of the seconds
per image once loaded, as ratios to the caption measured in the same run:
- `caption`: the project's defaults, `<grounding>An image of`, exactly 32 new tokens;
- `ground-10`: the project's defaults, task=ground with the ten phrases below, exactly 4 new tokens a
  phrase (what the real model answers for one box: `<object>`, two patch tokens, `</object>`);
- `tf-bf16-ground-10`: transformers, the ten referring prompts of an image as one batch, 4 tokens; in
  bf16 where the CPU computes it, else fp32 (`tf-fp32-ground-10`; --tf-dtype).
Random weights say nothing sensible, so lengths are forced (min_new_tokens = max_new_tokens).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from harness import cpu, run_child, tf_dtype

REPO = Path(__file__).resolve().parent.parent
PHRASES = ["a person", "a dog", "a cat", "a car", "a bicycle", "a traffic light", "a chair", "a cup of coffee",
           "a tree", "the sky"]
CAPTION_TOKENS, PHRASE_TOKENS = 32, 4


def child_project(args) -> dict:
    sys.path.insert(0, args.repo)
    from pipeline.config import AppConfig, EngineConfig, InputConfig, ModelConfig, OutputConfig, TaskConfig
    from pipeline.run import run

    ground = args.child != "caption"
    tokens = PHRASE_TOKENS if ground else CAPTION_TOKENS
    cfg = AppConfig(
        model=ModelConfig(source=args.checkpoint, dir=args.model_dir, weight_format="int8"),
        engine=EngineConfig(batch_size=args.batch_size, max_new_tokens=tokens, min_new_tokens=tokens),
        input=InputConfig(path=args.images),
        output=OutputConfig(dir=args.out, mode="overwrite"),
        task=TaskConfig(kind="ground", phrases=PHRASES) if ground else TaskConfig(),
    )
    summary = run(cfg, Path(args.out))
    return {"images": summary.items, "seconds": summary.items / summary.images_per_s, "errors": summary.errors,
            "stage_seconds": summary.stage_seconds}


def child_transformers(args) -> dict:
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    sys.path.insert(0, str(REPO))
    from pipeline.config import GROUND_PROMPT

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[args.tf_dtype]
    model = Kosmos2ForConditionalGeneration.from_pretrained(args.checkpoint, dtype=dtype).eval()
    processor = AutoProcessor.from_pretrained(args.checkpoint)
    paths = sorted(Path(args.images).iterdir())
    prompts = [GROUND_PROMPT.format(phrase=p) for p in PHRASES]
    start = time.perf_counter()
    with torch.inference_mode():
        for path in paths:
            image = Image.open(path).convert("RGB")
            enc = processor(text=prompts, images=[image] * len(prompts), return_tensors="pt", padding=True)
            model.generate(pixel_values=enc["pixel_values"].to(dtype), input_ids=enc["input_ids"],
                           attention_mask=enc["attention_mask"], image_embeds_position_mask=enc["image_embeds_position_mask"],
                           max_new_tokens=PHRASE_TOKENS, min_new_tokens=PHRASE_TOKENS, do_sample=False)
    return {"images": len(paths), "seconds": time.perf_counter() - start}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images-n", type=int, default=8)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--before", default=None, help="another checkout of the project, measured as ground-10-before")
    p.add_argument("--skip-transformers", action="store_true")
    p.add_argument("--batch-size", type=int, default=0, help="engine.batch_size of the project's systems (0: its default)")
    p.add_argument("--tf-dtype", default=tf_dtype(), choices=["bf16", "fp32"], help="transformers' precision (default: its best here)")
    p.add_argument("--child", default=None)
    p.add_argument("--result", default=None)
    p.add_argument("--repo", default=str(REPO))
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--images", default=None)
    p.add_argument("--model-dir", default=None)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.child:
        row = child_transformers(args) if args.child.startswith("tf-") else child_project(args)
        Path(args.result).write_text(json.dumps(row))
        return

    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "bench"))
    from export_full_size import CACHE, full_size_checkpoint
    from throughput import make_images

    from pipeline.config import ModelConfig
    from pipeline.export import ensure_export

    checkpoint = str(full_size_checkpoint())
    model_dir = str(ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8"), weight_format="int8")))
    images = CACHE / f"images-{args.images_n}"
    if not images.exists():
        make_images(images, args.images_n)
    systems = {"caption": REPO, "ground-10": REPO}
    if args.before:
        systems["ground-10-before"] = Path(args.before).resolve()
    tf = f"tf-{args.tf_dtype}-ground-10"
    if not args.skip_transformers:
        systems[tf] = REPO
    work = Path(tempfile.mkdtemp(prefix="kosmos-bench-"))
    seconds: dict[str, list[float]] = {s: [] for s in systems}
    for round_ in range(args.rounds):
        for system, repo in systems.items():
            row = run_child(__file__, system, repo=repo, checkpoint=checkpoint, images=images, model_dir=model_dir,
                        out=work / f"{system}-{round_}", batch_size=args.batch_size, tf_dtype=args.tf_dtype)
            seconds[system].append(row["seconds"] / row["images"])
            print(f"round {round_ + 1} {system}: {seconds[system][-1]:.3f} s/image", flush=True)
    print(f"\n{cpu()}\n{args.images_n} images, medians of {args.rounds} rounds, seconds per image once loaded")
    caption = statistics.median(seconds["caption"])
    print("| system | s/image | runs | x caption |\n| --- | --- | --- | --- |")
    for system, runs in seconds.items():
        m = statistics.median(runs)
        print(f"| {system} | {m:.3f} | {' / '.join(f'{r:.2f}' for r in runs)} | {m / caption:.2f} |")
    if tf in seconds:
        print(f"ground-10 is {statistics.median(seconds[tf]) / statistics.median(seconds['ground-10']):.2f}x faster than "
              f"transformers {args.tf_dtype} (ten prompts as one batch)")


if __name__ == "__main__":
    main()
