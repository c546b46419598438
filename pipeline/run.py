"""The annotation run, one straight line: source -> decode -> engine -> grounding -> sink (+ preview)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from pipeline import images, sources
from pipeline.config import AppConfig
from pipeline.grounding import parse

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
PREVIEWS = "_previews"


@dataclass
class Summary:
    items: int = 0
    errors: int = 0
    entities: int = 0
    boxes: int = 0
    generated_tokens: int = 0
    wall_seconds: float = 0.0
    load_seconds: float = 0.0  # export check, compile, first start
    images_per_s: float = 0.0  # items per second once the model is loaded
    output_dir: str = ""
    parts: list[str] = field(default_factory=list)
    model: str = ""
    weight_format: str = ""


def prepare(cfg: AppConfig) -> None:
    """Everything that can fail on the config or the input as a whole, before anything is written."""
    cfg.validate()
    sources.check(cfg.input)


def run(cfg: AppConfig, output_dir: Path) -> Summary:
    from pipeline.engine import Engine
    from pipeline.export import ensure_export
    from pipeline.model import KosmosModel
    from pipeline.sink import ParquetSink, output_schema

    started = time.perf_counter()
    prepare(cfg)
    schema = output_schema(sources.keep_schema(cfg.input))
    model = KosmosModel(ensure_export(cfg.model), cfg.engine)
    engine = Engine(model, cfg.engine)
    sink = ParquetSink(output_dir, schema, cfg.output.rows_per_file, cfg.output.flush_seconds, cfg.output.compression)
    summary = Summary(output_dir=str(output_dir), model=cfg.model.source, weight_format=cfg.model.weight_format)
    summary.load_seconds = time.perf_counter() - started

    loaded = time.perf_counter()
    with _progress(cfg) as bar:
        for row in _rows(cfg, model, engine, output_dir / PREVIEWS):
            sink.add(row)
            summary.items += 1
            summary.errors += row["error"] is not None
            summary.entities += len(row["entities"] or [])
            summary.boxes += sum(len(e["boxes"]) for e in row["entities"] or [])
            summary.generated_tokens += len(row["token_ids"] or [])
            bar.update(1)
            bar.set_postfix(errors=summary.errors, entities=summary.entities, refresh=False)
    sink.close()

    now = time.perf_counter()
    summary.wall_seconds = round(now - started, 2)
    summary.load_seconds = round(summary.load_seconds, 2)
    summary.images_per_s = round(summary.items / max(now - loaded, 1e-9), 3)
    summary.parts = [p.name for p in sink.parts]
    record = {**asdict(summary), "config": asdict(cfg)}
    (output_dir / SUMMARY).write_text(json.dumps(record, indent=2, default=str))
    return summary


def _rows(cfg: AppConfig, model, engine, previews: Path) -> Iterator[dict]:
    """One output row per input item, in input order; items that failed to decode pass through the
    engine untouched."""
    from pipeline.engine import Request
    from pipeline.preview import write_preview

    preprocess = images.image_preprocessor(model.processor)
    threads = cfg.input.decode_threads or images.default_threads()

    def decode(item):
        decoded = images.decode(item, preprocess, cfg.input.max_image_pixels)
        if decoded.image is not None and cfg.preview.enabled:  # keep only what the preview needs
            decoded.image.thumbnail((cfg.preview.max_side, cfg.preview.max_side))
        else:
            decoded.image = None
        return decoded

    ahead = engine.batch_size * (engine.num_requests + 1)
    decoded = images.ordered_map(decode, sources.iter_items(cfg.input), threads, ahead)
    requests = (Request(d.pixel_values, d.item.prompt or cfg.prompt, tag=d) for d in decoded)
    for gen in engine.generate(requests):
        item = gen.tag.item
        if gen.tag.error:  # failed before the engine: passed through, in order
            yield _row(item, prompt=item.prompt or cfg.prompt, error=item.error)
            continue
        caption, entities = parse(model.text_after_image(gen.prompt_ids, gen.token_ids))
        if gen.tag.image is not None:
            write_preview(previews, item.id, gen.tag.image, entities, cfg.preview.max_side, cfg.preview.quality)
        yield _row(
            item,
            prompt=item.prompt or cfg.prompt,
            width=gen.tag.width,
            height=gen.tag.height,
            caption=caption,
            entities=[
                {"phrase": e.phrase, "start": e.start, "end": e.end, "boxes": [dict(zip("x1 y1 x2 y2".split(), b)) for b in e.boxes]}
                for e in entities
            ],
            token_ids=gen.token_ids,
        )


def _row(item: sources.Item, **values) -> dict:
    row = {"id": item.id, "source": item.source, "width": None, "height": None, "prompt": None}
    row.update({"caption": None, "entities": None, "token_ids": None, "error": None})
    row.update(values)
    row.update(item.extra)
    return row


def _progress(cfg: AppConfig):
    from tqdm import tqdm

    return tqdm(total=cfg.input.limit, unit="img", desc="annotating", dynamic_ncols=True, mininterval=1.0)


def copy_hydra_record(hydra_dir: Path, output_dir: Path) -> None:
    """Hydra's own `.hydra/` config record, next to the data it produced."""
    src = hydra_dir / ".hydra"
    if src.is_dir() and src.resolve() != (output_dir / ".hydra").resolve():
        shutil.copytree(src, output_dir / ".hydra", dirs_exist_ok=True)
