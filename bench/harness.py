"""What the benchmarks share: the CPU line every table names; a system run in a child process of its
own (so its memory and threads are its own) that hands back a JSON result; the full-size fixture
(Kosmos-2's real shapes with random weights, its exports and test photos, cached under CACHE); and
transformers' Kosmos-2, the baseline that the model benchmarks measure against."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from pipeline.config import ModelConfig
from pipeline.export.store import ensure_export
from pipeline.hardware import cpu_has

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
CACHE = Path(os.environ.get("KOSMOS_ANNOTATE_CACHE", Path.home() / ".cache" / "kosmos-annotate")) / "bench"
REAL_VOCAB = 65037  # microsoft/kosmos-2-patch14-224, processor tokens included


# --------------------------------------------------------------------------- the CPU line


def cpu() -> str:
    """The CPU model, the cores this process may use, and the flags that choose OpenVINO's kernels."""
    info = Path("/proc/cpuinfo").read_text()
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    wanted = ["amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512f", "avx_vnni", "avx2"]
    cores = len(os.sched_getaffinity(0))
    return f"{model or platform.processor()}, {cores} cores; flags: " + " ".join(f for f in wanted if f in flags)


def tf_dtype() -> str:
    """transformers' best precision here: bf16 where the CPU computes it (AVX-512 BF16, AMX), else
    fp32. torch's bf16 matrix product without it ran 220x slower than fp32 on an AVX2-only AMD EPYC."""
    return "bf16" if cpu_has("avx512_bf16") or cpu_has("amx_bf16") else "fp32"


# --------------------------------------------------------------------------- child processes


def run_child(module: str, system: str, repo: Path = REPO, **options) -> dict:
    """`python -m module --child system --result FILE --option value ...` run in the checkout `repo`
    (this one, or another checkout with this bench package, whose own bench and pipeline it imports);
    the JSON the child wrote to FILE. Options that are None are left out (the child's default is
    the project's); booleans are written true / false."""
    with tempfile.NamedTemporaryFile("r", suffix=".json") as result:
        cmd = [sys.executable, "-m", module, "--child", system, "--result", result.name]
        for k, v in options.items():
            if v is not None:
                cmd += [f"--{k.replace('_', '-')}", str(v).lower() if isinstance(v, bool) else str(v)]
        proc = subprocess.run(cmd, cwd=repo, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if proc.returncode:
            raise SystemExit(f"{system} failed:\n{proc.stderr[-3000:]}")
        return json.loads(Path(result.name).read_text())


def argument_parser(module: str, doc: str) -> argparse.ArgumentParser:
    """A benchmark's parser: `python -m <module>`, its module docstring (usage lines included) as --help's text."""
    return argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )


def child_arguments(parser: argparse.ArgumentParser) -> None:
    """The options that only a parent gives its children (run_child); left out of --help."""
    for name in ("--child", "--result", "--checkpoint", "--images", "--model-dir", "--out"):
        parser.add_argument(name, default=None, help=argparse.SUPPRESS)


def child_main(args: argparse.Namespace, work: Callable[[argparse.Namespace], dict]) -> None:
    """In a child: `work(args)`, with the process's peak RSS (`maxrss_kib`), written where the parent reads it."""
    row = work(args)
    row["maxrss_kib"] = peak_rss_kib()
    Path(args.result).write_text(json.dumps(row))


def peak_rss_kib() -> int:
    """This process's own peak RSS in KiB (VmHWM). Not ru_maxrss: Linux carries a parent's peak into
    its children's ru_maxrss across fork and exec, so a parent that had just built the checkpoint or
    an export in memory would raise every child's figure to its own."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def optional_bool(text: str) -> bool | None:
    """true, false, or null (the project's own choice), as the project's command line spells them."""
    values = {"true": True, "false": False, "null": None}
    if text.lower() not in values:
        raise argparse.ArgumentTypeError(f"{text!r}: true, false or null")
    return values[text.lower()]


# --------------------------------------------------------------------------- the full-size fixture


def full_size_checkpoint() -> Path:
    """Kosmos2Config() defaults (the real shapes) with random weights and a 65037-id tokenizer, built once."""
    folder = CACHE / "kosmos2-full-random"
    if (folder / "config.json").exists():
        return folder
    from transformers import Kosmos2Config

    from tests import tiny

    processor = tiny.make_processor(vocab_size=REAL_VOCAB - 1035)
    assert len(processor.tokenizer) == REAL_VOCAB, len(processor.tokenizer)
    model = tiny.make_model(Kosmos2Config(), seed=0)
    return tiny.save_checkpoint(model, processor, folder)


def full_size_model(
    weight_format: str = "int8", quantize_image_encoder: bool = True, quantize_text_decoder: bool | None = None
) -> ModelConfig:
    """The model config of the full-size checkpoint's export in CACHE: export-<format> with the
    project's defaults, with a suffix for each default changed (-encoder-weights: the image encoder's
    int8 weights only; -decoder-weights, -static-decoder: model.quantize_text_decoder false, true)."""
    encoder = "" if quantize_image_encoder else "-encoder-weights"
    decoder = {None: "", False: "-decoder-weights", True: "-static-decoder"}[quantize_text_decoder]
    return ModelConfig(
        source=str(full_size_checkpoint()),
        dir=str(CACHE / f"export-{weight_format}{encoder}{decoder}"),
        weight_format=weight_format,
        quantize_image_encoder=quantize_image_encoder,
        quantize_text_decoder=quantize_text_decoder,
    )


def full_size_export(
    weight_format: str = "int8", quantize_image_encoder: bool = True, quantize_text_decoder: bool | None = None
) -> Path:
    """The full-size checkpoint exported (the first time: minutes, and up to 13 GB of memory)."""
    return ensure_export(full_size_model(weight_format, quantize_image_encoder, quantize_text_decoder))


def photos(n: int) -> Path:
    """A folder of n real photos (made once): the examples, then their mirror images, then centre crops."""
    from PIL import Image, ImageOps

    folder = CACHE / f"images-{n}"
    if folder.exists():
        return folder
    folder.mkdir(parents=True)
    sources = sorted((REPO / "examples" / "images").glob("*.*g"))
    variants = [lambda im: im, ImageOps.mirror, lambda im: ImageOps.crop(im, (im.width // 8, im.height // 8))]
    for k in range(n):
        src, variant = sources[k % len(sources)], variants[(k // len(sources)) % len(variants)]
        variant(Image.open(src).convert("RGB")).save(folder / f"{k:03d}_{src.stem}.png")
    return folder


# --------------------------------------------------------------------------- transformers


def transformers_child(
    checkpoint: str,
    images: str,
    dtype: str,
    batch_size: int,
    prompts: list[str],
    new_tokens: int | Callable[[np.ndarray], int],
) -> dict:
    """transformers' Kosmos-2 in `dtype` (fp32, bf16) on every photo in the folder `images`, greedy:
    `batch_size` photos a generate call, each photo once with each of `prompts` (a row each).
    `new_tokens`: every row exactly this many (min_new_tokens = max_new_tokens), or a function of a
    row's pixel values giving its length, end-of-sequence held back before it and forced at it (how
    a random checkpoint is made to stop as real captions do, a batch ending with its longest row).
    Returns the seconds once loaded, the tokens generated, the load's seconds and the first call's
    end (`first_row_s`, from the start of the load)."""
    import torch
    from PIL import Image
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration, LogitsProcessor, LogitsProcessorList

    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    t0 = time.perf_counter()
    model = Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch_dtype).eval()
    processor = AutoProcessor.from_pretrained(checkpoint)
    load = time.perf_counter() - t0
    eos = model.config.text_config.eos_token_id

    class Forced(LogitsProcessor):
        def __init__(self, lengths: list[int], prompt: int):
            self.lengths, self.prompt = torch.tensor(lengths), prompt

        def __call__(self, input_ids, scores):
            made = input_ids.shape[1] - self.prompt
            scores[self.lengths > made, eos] = -float("inf")
            scores[self.lengths == made, eos] = 1e4
            return scores

    paths = sorted(Path(images).iterdir())
    start, first, tokens = time.perf_counter(), None, 0
    with torch.inference_mode():
        for i in range(0, len(paths), batch_size):
            batch = [Image.open(p).convert("RGB") for p in paths[i : i + batch_size]]
            enc = processor(
                text=[prompt for _ in batch for prompt in prompts],
                images=[image for image in batch for _ in prompts],
                return_tensors="pt",
                padding=True,
            )
            prompt = enc["input_ids"].shape[1]
            if callable(new_tokens):
                lengths = [new_tokens(p.numpy()) for p in enc["pixel_values"]]
                limits = {
                    "max_new_tokens": max(lengths) + 1,
                    "logits_processor": LogitsProcessorList([Forced(lengths, prompt)]),
                }
            else:
                limits = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
            out = model.generate(
                pixel_values=enc["pixel_values"].to(torch_dtype),
                input_ids=enc["input_ids"],
                attention_mask=enc["attention_mask"],
                image_embeds_position_mask=enc["image_embeds_position_mask"],
                do_sample=False,
                **limits,
            )
            if callable(new_tokens):
                new = out[:, prompt:]
                stops = [int((row == eos).nonzero()[0]) for row in new]
                assert stops == lengths, "a row did not stop at its length"
                tokens += sum(lengths)
            else:
                tokens += (out.shape[1] - prompt) * len(out)
            first = first or time.perf_counter() - t0
    seconds = time.perf_counter() - start
    return {"images": len(paths), "seconds": seconds, "tokens": tokens, "load_s": load, "first_row_s": first}
