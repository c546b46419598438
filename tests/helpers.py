"""What several test modules share: paths, the reference (transformers on one image alone), configs
and command runners. Fixtures live in conftest.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.annotation.run import run
from pipeline.config import (
    AppConfig,
    EngineConfig,
    GalleryConfig,
    InputConfig,
    LabelsConfig,
    ModelConfig,
    OutputConfig,
    PreviewConfig,
    build,
)
from pipeline.engine import Engine, Request
from pipeline.model.runtime import KosmosModel
from pipeline.outputs.gallery import write_gallery
from pipeline.outputs.labels import export_labels
from pipeline.records import SCHEMA
from tests import tiny

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples" / "images"
TRAINED_CAPTIONS, PROMPT = tiny.TRAINED_CAPTIONS, tiny.PROMPT
PROMPTS = [
    PROMPT,
    "<grounding>",
    "<grounding>Describe this image in detail:",
    "A cat on a mat",
    "<grounding> a big red square next to a small blue circle on the table",
    "photo",
]


def example_images() -> list[Path]:
    return sorted(p for p in EXAMPLES.iterdir() if p.suffix in (".png", ".jpg"))


def load_rgb(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def pixel_values(processor, image) -> np.ndarray:
    return processor.image_processor(image, return_tensors="np")["pixel_values"][0]


def sample_images():
    """The six example photos plus two synthetic ones (odd size, flat colour)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [load_rgb(p) for p in example_images()]
    images.append(Image.fromarray((rng.random((37, 301, 3)) * 255).astype("uint8")))
    images.append(Image.new("RGB", (64, 64), (200, 30, 30)))
    return images


# --------------------------------------------------------------------------- the reference


def hf_model(checkpoint):
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_generate(model, processor, image, prompt, max_new_tokens, min_new_tokens=0) -> list[int]:
    """transformers on one image alone: the reference. New tokens, end-of-sequence included."""
    import torch

    enc = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            pixel_values=enc["pixel_values"],
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            image_embeds_position_mask=enc["image_embeds_position_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


# --------------------------------------------------------------------------- the engine


def engine(export, **overrides) -> Engine:
    cfg = EngineConfig(precision="f32", **overrides)
    return Engine(KosmosModel(export, cfg), cfg)


def requests_by_name(processor, names) -> list[Request]:
    """The default prompt on each named example image, tagged with its name."""
    return [Request(pixel_values(processor, load_rgb(EXAMPLES / n)), PROMPT, tag=n) for n in names]


def requests_for(processor, pairs) -> list[Request]:
    return [Request(pixel_values(processor, im), pr, tag=i) for i, (im, pr) in enumerate(pairs)]


def as_hf(gen, eos) -> list[int]:
    return gen.token_ids + ([eos] if gen.stopped_by_eos else [])


def tokens_of(export, reqs, **settings) -> list[list[int]]:
    cfg = EngineConfig(**settings)
    return [o.token_ids for o in Engine(KosmosModel(export, cfg), cfg).generate(reqs)]


def distinct_prompt_requests(processor, n: int) -> list[Request]:
    """n requests, each with its own prompt (so each batch mixes prompt lengths), over the example photos."""
    words = tiny.WORDS
    pixels = [pixel_values(processor, load_rgb(p)) for p in example_images()]
    prompts = [f"{PROMPT} {words[i % len(words)]}" + f" {words[(7 * i) % len(words)]}" * (i % 3) for i in range(n)]
    return [Request(pixels[i % len(pixels)], prompt, tag=i) for i, prompt in enumerate(prompts)]


# --------------------------------------------------------------------------- runs


def config(checkpoint, export, input_cfg: InputConfig, out: Path, **kw) -> AppConfig:
    return AppConfig(
        model=ModelConfig(source=str(checkpoint), dir=str(export), weight_format="fp32"),
        engine=EngineConfig(precision="f32", batch_size=3, num_requests=2),
        input=input_cfg,
        output=OutputConfig(dir=str(out), **kw.pop("output", {})),
        preview=PreviewConfig(**kw.pop("preview", {})),
        **kw,
    )


def model_overrides(checkpoint, export) -> list[str]:
    return [f"model.source={checkpoint}", f"model.dir={export}", "model.weight_format=fp32", "engine.precision=f32"]


def expected(processor, name):
    """Caption (spaces ignored: the tiny tokenizer spaces punctuation) and entities it was trained on."""
    caption, entities = processor.post_process_generation(PROMPT + TRAINED_CAPTIONS[name])
    return caption.replace(" ", ""), [(p, [list(b) for b in boxes]) for p, _, boxes in entities]


def entity_view(row):
    return [(e["phrase"], [[b["x1"], b["y1"], b["x2"], b["y2"]] for b in e["boxes"]]) for e in row["entities"]]


def rows_by_id(folder: Path) -> dict[str, dict]:
    rows = pq.read_table(folder).to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)), "an id was written twice"
    return {r["id"]: r for r in rows}


def count_parts(out: Path) -> int:
    return len(list(out.glob("part-*.parquet"))) if out.exists() else 0


def annotate(*overrides: str, cwd: Path) -> tuple[subprocess.CompletedProcess, object]:
    """Run `python -m pipeline` in a child; returns the process and the child's own resource usage."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "pipeline", *overrides]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen(args, stdout=out, stderr=err, text=True, env=env, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak memory, not the session's
        child.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return subprocess.CompletedProcess(args, child.returncode, out.read(), err.read()), usage


def start(folder: Path, out: Path, checkpoint, export) -> subprocess.Popen:
    """`python -m pipeline` in the background, committing every 2 rows."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        f"input.path={folder}",
        f"output.dir={out}",
        "output.rows_per_file=2",
        "engine.batch_size=2",
        "engine.num_requests=1",
        *model_overrides(checkpoint, export),
    ]
    return subprocess.Popen(args, env=env, cwd=out.parent, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def multirun(cluster: str, shards: int, folder: Path, out: Path, checkpoint, export, *extra: str):
    """`python -m pipeline -m cluster=...`: every shard of the input through a Hydra launcher."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = [
        sys.executable,
        "-m",
        "pipeline",
        "-m",
        f"cluster={cluster}",
        f"hydra.sweep.dir={out.parent / ('sweep-' + cluster)}",
        f"input.path={folder}",
        f"output.dir={out}",
        f"input.num_shards={shards}",
        "input.shard_index=" + ",".join(str(i) for i in range(shards)),
        *model_overrides(checkpoint, export),
        *extra,
    ]
    proc = subprocess.run(args, env=env, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def write_rows(folder: Path, rows: list[dict]) -> Path:
    """An output folder of one part holding `rows`."""
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), folder / "part-00000-00000.parquet")
    return folder


def gallery_of(checkpoint, export, tmp_path_factory) -> Path:
    """The gallery (4 rows a page) of the example photos and a broken file, annotated by the trained model."""
    photos = tmp_path_factory.mktemp("photos")
    for p in EXAMPLES.glob("*.*g"):
        shutil.copy(p, photos / p.name)
    (photos / "zz_broken.jpg").write_text("not an image")
    out = tmp_path_factory.mktemp("labels")
    run(config(checkpoint, export, InputConfig(path=str(photos)), out, preview={"enabled": True}), out)
    result = write_gallery(build(GalleryConfig, {"output.dir": str(out), "gallery.page_size": 4}))
    assert result == {"rows": 7, "pages": 2, "phrases": 5, "index": str(out / "_gallery" / "index.html")}
    return out / "_gallery"


def labels(folder, fmt, dest, labelstudio=None, yolo=None, **kw) -> dict:
    """`kosmos-labels` on `folder`, the options as the command line names them."""
    options = {f"labelstudio.{k}": v for k, v in (labelstudio or {}).items()} | {
        f"yolo.{k}": v for k, v in (yolo or {}).items()
    }
    return export_labels(
        build(LabelsConfig, {"output.dir": str(folder), "format": fmt, "dest": str(dest), **options, **kw})
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_export_command(*overrides: str, env_extra: dict | None = None, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "pipeline.export", *overrides],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


def copy_export(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("_cache"))
    return dst


# `python -c` code that runs a module as its command while torch, transformers and nncf cannot be
# imported, as in an install without the export extra: `args = [sys.executable, "-c", WITHOUT_EXPORT, module, *argv]`.
WITHOUT_EXPORT = """
import runpy, sys
class Absent:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "nncf"):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, Absent())
module, sys.argv = sys.argv[1], [sys.argv[1], *sys.argv[2:]]
runpy.run_module(module, run_name="__main__")
"""
