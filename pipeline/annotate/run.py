"""The annotation run, one straight line: source -> decode -> engine -> tasks -> sink (+ preview).

Before the line starts the config and the input are checked (nothing written if they fail), this
shard of the output folder is locked, and the ids already committed there are loaded, so a rerun
continues where a killed one stopped and a scheduled rerun only annotates what is new.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path

from pipeline import sources
from pipeline.annotate import decode as decoding
from pipeline.annotate import resume, tasks
from pipeline.annotate.preview import write_preview
from pipeline.annotate.sink import ParquetSink
from pipeline.annotate.summary import ScoreQuantiles, Summary, check_error_rate, now
from pipeline.config import AppConfig, EngineConfig, InputConfig, PreviewConfig, plain
from pipeline.engine import Engine
from pipeline.errors import ConfigError, RunAborted
from pipeline.export.store import ensure_export
from pipeline.hardware import check_device
from pipeline.model import export_folder
from pipeline.model.prompt import IMAGE_PROMPT_TOKENS
from pipeline.model.runtime import KosmosModel, precision
from pipeline.records import SCHEMA_VERSION, Entity, Item, output_schema
from pipeline.storage import layout
from pipeline.storage.files import Folder

log = logging.getLogger(__name__)


def prepare(cfg: AppConfig) -> None:
    """Everything that can fail on the config or the input as a whole, before anything is written."""
    cfg.validate()
    check_device(cfg.engine)
    sources.open_source(cfg.input).check()


def result_settings(cfg: AppConfig, model_dir: Path) -> dict:
    """The settings that change what a row says: one output folder holds results of one setting.
    The precision is recorded as resolved on this machine, so a resume on a machine where it resolves
    otherwise is refused instead of mixing results."""
    # Recorded only where it applies, so that fp32/fp16 results made before it existed still resume.
    encoder = {"model.quantize_image_encoder": cfg.model.quantize_image_encoder} if cfg.model.compressed else {}
    if export_folder.holds_static_decoder(model_dir):
        encoder["model.quantize_text_decoder"] = True
    return {
        **encoder,
        "output.schema_version": SCHEMA_VERSION,
        "model.source": cfg.model.source,
        "model.revision": cfg.model.revision,
        "model.weight_format": str(cfg.model.weight_format),
        "engine.device": cfg.engine.device,
        "engine.precision": str(precision(cfg.engine, model_dir)),
        "engine.dynamic_quantization_group_size": cfg.engine.dynamic_quantization_group_size,
        "engine.max_new_tokens": cfg.engine.max_new_tokens,
        "engine.min_new_tokens": cfg.engine.min_new_tokens,
        "prompt": tasks.task_prompt(cfg),
        "input.prompt_column": cfg.input.prompt_column,
        "task.kind": str(cfg.task.kind),
        "task.phrases": list(cfg.task.phrases),
        "input.phrases_column": cfg.input.phrases_column,
    }


def check_positions(cfg: EngineConfig, model_dir: Path) -> None:
    """The decoder's position table bounds prompt plus generated tokens: refuse a max_new_tokens
    that cannot fit before anything is loaded, instead of failing mid-run."""
    table = export_folder.max_positions(model_dir)
    room = table - IMAGE_PROMPT_TOKENS
    if cfg.max_new_tokens > room:
        raise ConfigError(
            f"engine.max_new_tokens={cfg.max_new_tokens} does not fit the model's {table} positions "
            f"({IMAGE_PROMPT_TOKENS} go to the image prompt): use at most {room} less the prompt's own tokens"
        )


def run(cfg: AppConfig, output_dir: str | Path) -> Summary:
    """Annotate the input into `output_dir`: a local folder or a URI such as s3://bucket/prefix."""
    started = time.perf_counter()
    prepare(cfg)
    schema = output_schema(sources.open_source(cfg.input).keep_fields())
    model_dir = ensure_export(cfg.model, cfg.engine)  # may fail on the checkpoint: before the output folder is touched
    check_positions(cfg.engine, model_dir)
    shard, num_shards, output = cfg.input.shard_index, cfg.input.num_shards, Folder(output_dir)
    with resume.exclusive(output, shard) as lease:
        resume.prepare_folder(output, cfg.output.mode, shard, num_shards, result_settings(cfg, model_dir))
        done = resume.DoneIds(output)
        if len(done):
            log.info("Resuming: %d items are already in %s and will be skipped", len(done), output)
        summary = Summary(
            started_at=now(),
            host=socket.gethostname(),
            pid=os.getpid(),
            output_dir=str(output),
            shard=f"{shard}/{num_shards}",
            model=cfg.model.source,
            weight_format=str(cfg.model.weight_format),
        )

        def write_summary(status: str = "running") -> None:
            summary.status, summary.updated_at = status, now()
            summary.parts = list(sink.parts)
            summary.wall_seconds = round(time.perf_counter() - started, 2)
            record = {**asdict(summary), "config": plain(cfg)}
            output.write(layout.summary_name(shard, num_shards), json.dumps(record, indent=2, default=str))

        sink = ParquetSink(output, schema, cfg.output, shard, on_commit=write_summary, lease=lease)
        write_summary()
        status = "failed"
        try:
            _annotate(cfg, model_dir, output, done, sink, summary, started)
            status = "finished"
        except RunAborted:
            status = "aborted"
            raise
        finally:
            sink.close()  # whatever happens, rows already annotated are committed
            write_summary(status)
    return summary


def _annotate(
    cfg: AppConfig, model_dir: Path, output: Folder, done, sink: ParquetSink, summary: Summary, started: float
) -> None:
    model = KosmosModel(model_dir, cfg.engine)
    engine = Engine(model, cfg.engine)
    summary.load_seconds = round(time.perf_counter() - started, 2)
    loaded = time.perf_counter()
    scores = ScoreQuantiles()
    skipped: Counter = Counter()
    items = resume.todo(
        sources.iter_items(cfg.input, keep=lambda item_id: done.count(resume.id_hash(item_id)) == 0), done, skipped
    )
    task = tasks.make_task(cfg, model)
    with _progress() as bar:
        for row in annotate_items(task, model, engine, items, cfg.input, cfg.preview, output.sub(layout.PREVIEWS)):
            summary.add(row)
            summary.skipped = skipped["done"]
            scores.add(row)
            summary.images_per_s = round(summary.items / max(time.perf_counter() - loaded, 1e-9), 3)
            sink.add(row)  # after the counts: a commit records a summary that includes this row
            bar.update(1)
            bar.set_postfix(errors=summary.errors, entities=summary.entities, refresh=False)
            check_error_rate(cfg.run, summary)
    summary.skipped = skipped["done"]
    sink.flush()
    engine.times.seconds["parquet"] += sink.write_seconds
    summary.stage_seconds = {k: round(v, 2) for k, v in engine.times.seconds.items()}
    summary.images_encoded = engine.times.counts["images_encoded"]
    summary.scores = scores.summary()


def annotate_items(
    task: tasks.Task,
    model: KosmosModel,
    engine: Engine,
    items: Iterable[Item],
    input_cfg: InputConfig,
    preview: PreviewConfig,
    previews: Folder | None,
) -> Iterator[dict]:
    """One output row per item, in input order, with its width and height; items that failed to
    decode pass through the engine untouched. With previews enabled, each image's is written."""
    preprocess = model.processor.pixel_values
    threads = input_cfg.decode_threads or decoding.default_threads()

    def decode(item: Item) -> decoding.Decoded:
        began = time.perf_counter()
        decoded = decoding.decode(item, preprocess, input_cfg.max_image_pixels)
        engine.times.add("decode_preprocess", began)
        if decoded.image is not None and preview.enabled:  # keep only what the preview needs
            decoded.image.thumbnail((preview.max_side, preview.max_side))
        else:
            decoded.image = None
        return decoded

    ahead = engine.batch_size * (engine.num_requests + 1)
    decoded = decoding.ordered_map(decode, items, threads, ahead)
    gens: list = []  # the generations of the current image, one per request
    for gen in engine.generate(tasks.requests(task, model, engine.cfg.max_new_tokens, decoded)):
        d, wanted = gen.tag
        if d.error:  # failed before the engine: passed through, in order
            yield task.error_row(d.item)
            continue
        gens.append(gen)
        if len(gens) < wanted:
            continue
        began = time.perf_counter()
        row = task.row(d.item, gens)
        gens = []
        row.update(width=d.width, height=d.height)
        if d.image is not None and previews is not None:
            shown = [Entity.from_row(e) for e in row["entities"]]
            write_preview(previews, d.item.id, d.image, shown, preview.max_side, preview.quality)
        engine.times.add("grounding_preview", began)
        yield row


def _progress():
    from tqdm import tqdm

    return tqdm(unit="img", desc="annotating", dynamic_ncols=True, mininterval=1.0)


def copy_hydra_record(hydra_dir: Path, output_dir: str | Path, cfg: AppConfig) -> None:
    """Hydra's own `.hydra/` config record, next to the data it produced (one per shard)."""
    src = hydra_dir / ".hydra"
    dst = Folder(output_dir).sub(layout.hydra_record(cfg.input.shard_index, cfg.input.num_shards))
    if src.is_dir() and (dst.remote or src.resolve() != Path(dst.root).resolve()):
        for record in sorted(src.iterdir()):
            dst.write(record.name, record.read_bytes())
