"""The annotation run, one straight line: source -> decode -> engine -> tasks -> sink (+ preview).

Before the line starts the config and the input are checked (nothing written if they fail), this
shard of the output folder is locked, and the ids already committed there are loaded, so a rerun
continues where a killed one stopped and a scheduled rerun only annotates what is new.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from pipeline import sources
from pipeline.annotation import decode as decoding
from pipeline.annotation import resume, tasks
from pipeline.annotation.preview import write_preview
from pipeline.annotation.sink import ParquetSink
from pipeline.annotation.stop import GracefulStop
from pipeline.annotation.summary import RunRecord, ScoreQuantiles, Summary, check_error_rate, now
from pipeline.config import AppConfig, EngineConfig, InputConfig, InputKind, PreviewConfig
from pipeline.engine import Engine
from pipeline.errors import ConfigError, RunAborted, Stopped
from pipeline.export.store import check_source, ensure_export, export_dir, stale_reason
from pipeline.hardware import check_device
from pipeline.model import export_folder
from pipeline.model.prompt import IMAGE_PROMPT_TOKENS
from pipeline.model.runtime import KosmosModel, precision
from pipeline.records import SCHEMA_VERSION, Entity, Item, output_schema
from pipeline.storage import layout
from pipeline.storage.files import Folder, check_location

log = logging.getLogger(__name__)


def prepare(cfg: AppConfig, output_dir: str | Path) -> None:
    """Everything that can fail on the config or the input as a whole, before anything is written."""
    cfg.validate()
    check_device(cfg.engine)
    for path in [cfg.input.path] if isinstance(cfg.input.path, str) else cfg.input.path:
        check_location(path, "input.path")
    check_location(output_dir, "output.dir")
    if cfg.input.kind == InputKind.folder:
        decoding.check_extensions(cfg.input)
    sources.open_source(cfg.input).check()
    model_dir = export_dir(cfg.model)
    if stale_reason(cfg.model, model_dir) is None:
        check_positions(cfg.engine, model_dir)
    else:
        check_source(cfg.model)


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
    """Annotate the input into `output_dir`: a local folder or a URI such as s3://bucket/prefix.

    The summary says where the run stands from its first second (exporting, loading, running) to its
    end (finished, stopped, aborted, failed, with the reason). Whatever ends it, the rows already
    annotated are committed first; SIGTERM and SIGINT end it gracefully (annotation/stop.py)."""
    started = time.perf_counter()
    prepare(cfg, output_dir)
    schema = output_schema(sources.open_source(cfg.input).keep_fields())
    shard, num_shards, output = cfg.input.shard_index, cfg.input.num_shards, Folder(output_dir)
    with GracefulStop() as stop, resume.exclusive(output, shard, cfg.output.lease_seconds) as lease:
        resume.check_mode(output, cfg.output.mode, shard)
        summary = Summary(
            started_at=now(),
            host=socket.gethostname(),
            pid=os.getpid(),
            output_dir=str(output),
            shard=f"{shard}/{num_shards}",
            model=cfg.model.source,
            weight_format=str(cfg.model.weight_format),
            run=lease.run if lease else "",
        )
        with RunRecord(output, summary, cfg, started) as record:
            try:
                _run(cfg, output, schema, lease, stop, record)
            except RunAborted as e:
                record.end("aborted", str(e))
                raise
            except BaseException as e:  # a refusal before the first summary leaves the last run's as it was
                if record.written and isinstance(e, Stopped):
                    record.end("stopped", f"{signal.Signals(e.signum).name} received")
                elif record.written:
                    record.end("failed", f"{type(e).__name__}: {e}")
                raise
    return summary


def _run(cfg: AppConfig, output: Folder, schema, lease, stop: GracefulStop, record: RunRecord) -> None:
    summary, shard, num_shards = record.summary, cfg.input.shard_index, cfg.input.num_shards
    if stale_reason(cfg.model, export_dir(cfg.model)) is not None:
        record.write("exporting")
    model_dir = ensure_export(cfg.model, cfg.engine)
    check_positions(cfg.engine, model_dir)
    resume.prepare_folder(output, cfg.output.mode, shard, num_shards, result_settings(cfg, model_dir))
    record.write("loading")
    model = KosmosModel(model_dir, cfg.engine)
    engine = Engine(model, cfg.engine)
    stop.on_stop = engine.stop  # from here a signal lets the rows in hand be committed
    summary.load_seconds = round(time.perf_counter() - record.started, 2)
    # Once the model is in hand: a run that cannot load it leaves the parts as they were.
    retried = resume.take_out_errors(output, shard, cfg.output.retry_errors, str(cfg.output.compression))
    if retried:
        log.info("Trying again %d items whose rows had errors of the kinds in output.retry_errors", retried)
    done = resume.DoneIds(output)
    if len(done):
        log.info("Resuming: %d items are already in %s and will be skipped", len(done), output)

    def committed() -> None:
        record.parts = sink.parts
        record.write("running")

    sink = ParquetSink(output, schema, cfg.output, shard, on_commit=committed, lease=lease, on_failure=engine.stop)
    record.write("running")
    ended: BaseException | None = None
    try:
        _annotate(cfg, model, engine, output, done, sink, summary)
    except BaseException as e:
        ended = e
        raise
    finally:
        stop.on_stop = lambda: None  # a signal now: the commit below goes on, then the run stops
        try:
            sink.close()  # whatever ended the loop, the rows already annotated are committed
        except Exception as e:
            if ended is None:
                raise
            if e is not ended:  # told, but never raised over what ended the loop
                log.error("The rows in hand could not be committed either: %s", e)
        record.parts = sink.parts
    if stop.signum is not None:
        raise Stopped(stop.signum)
    engine.times.seconds["parquet"] += sink.write_seconds
    summary.stage_seconds = {k: round(v, 2) for k, v in engine.times.seconds.items()}
    summary.images_encoded = engine.times.counts["images_encoded"]
    record.write("finished")
    kinds = ", ".join(f"{k}: {n}" for k, n in summary.errors_by_kind.items())
    log.info(
        "Annotated %d images (%d errors%s) in %.1f s: %.2f images/s, %d entities, %d boxes%s. Output: %s",
        summary.items,
        summary.errors,
        f" - {kinds}" if kinds else "",
        summary.wall_seconds,
        summary.images_per_s,
        summary.entities,
        summary.boxes,
        f"; {summary.skipped} already done, skipped" if summary.skipped else "",
        output,
    )


def _annotate(
    cfg: AppConfig, model: KosmosModel, engine: Engine, output: Folder, done, sink: ParquetSink, summary: Summary
) -> None:
    loaded = time.perf_counter()
    scores = ScoreQuantiles()
    skipped: Counter = Counter()
    keep = lambda item_id: done.count(resume.id_hash(item_id)) == 0  # noqa: E731
    items = resume.todo(sources.iter_items(cfg.input, keep=keep), done, skipped)
    task = tasks.make_task(cfg, model)
    total = _count_left(cfg, output)
    with _progress() as bar:
        for row in annotate_items(task, model, engine, items, cfg.input, cfg.preview, output.sub(layout.PREVIEWS)):
            if total and bar.total is None:
                bar.total = total[0]
            with sink.lock:  # a commit by the timer records a summary: counts and rows must agree
                summary.add(row)
                summary.skipped = skipped["done"]
                scores.add(row)
                summary.images_per_s = round(summary.items / max(time.perf_counter() - loaded, 1e-9), 3)
                sink.add(row)  # after the counts: a commit records a summary that includes this row
            bar.update(1)
            bar.set_postfix(errors=summary.errors, entities=summary.entities, refresh=False)
            check_error_rate(cfg.run, summary)
    with sink.lock:
        summary.skipped = skipped["done"]
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
        decoded = decoding.decode(item, preprocess, input_cfg)
        engine.times.add("decode_preprocess", began)
        if decoded.image is not None and preview.enabled:  # keep only what the preview needs
            decoded.image.thumbnail((preview.max_side, preview.max_side))
        else:
            decoded.image = None
        return decoded

    ahead = engine.batch_size * (engine.num_requests + 1)
    timeout = input_cfg.decode_timeout
    decoded = decoding.ordered_map(
        decode, items, threads, ahead, timeout, lambda item: decoding.timed_out(item, timeout)
    )
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


def _count_left(cfg: AppConfig, output: Folder) -> list[int]:
    """The items this shard has left, counted in a thread where it is cheap (a folder's walk, a
    manifest's footers, local tars' headers): a list that holds the count once it is known."""
    found: list[int] = []

    def count() -> None:
        try:
            total = sources.open_source(cfg.input).count()
            done = sum(
                pq.read_metadata(output.open(p)).num_rows for p in layout.committed_parts(output, cfg.input.shard_index)
            )
        except Exception:  # noqa: BLE001 - a bar without a total, nothing worse
            return
        if total is not None:
            total = min(total, cfg.input.limit) if cfg.input.limit is not None else total
            found.append(max(0, total // cfg.input.num_shards - done))  # shards by hash: about a share each

    threading.Thread(target=count, name="kosmos-count", daemon=True).start()
    return found


def _progress():
    from tqdm import tqdm

    return tqdm(unit="img", desc="annotating", dynamic_ncols=True, mininterval=1.0)
