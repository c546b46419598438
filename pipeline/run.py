"""The annotation run, one straight line: source -> decode -> engine -> grounding -> sink (+ preview).

Before the line starts: the config and the input are checked (nothing written if they fail), this
shard of the output folder is locked, and the ids already committed there are loaded, so a rerun
continues where a killed one stopped and a scheduled rerun only annotates what is new.
"""

from __future__ import annotations

import json
import logging
import math
import os
import socket
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline import images, sources
from pipeline.config import AppConfig, ConfigError, EngineConfig, UserError
from pipeline.files import Folder
from pipeline.grounding import Entity, add_scores, parse

log = logging.getLogger(__name__)

SUMMARY = "_summary.json"
PREVIEWS = "_previews"


class RunAborted(UserError):
    """run.max_error_rate was exceeded; committed parts are kept."""

    exit_code = 3
    label = "Aborted: "


@dataclass
class Summary:
    # running (rewritten at every part commit) | finished | aborted | failed; a run killed outright
    # stays `running`: kosmos-status then looks at its pid and its last commit.
    status: str = "running"
    started_at: str = ""
    updated_at: str = ""
    host: str = ""
    pid: int = 0
    items: int = 0  # rows written by this run
    errors: int = 0
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    skipped: int = 0  # already in committed parts (resume)
    entities: int = 0
    boxes: int = 0
    generated_tokens: int = 0
    images_encoded: int = 0  # by the vision tower (task=ground encodes an image once for all its phrases)
    wall_seconds: float = 0.0
    load_seconds: float = 0.0  # export check, compile, first start
    images_per_s: float = 0.0  # rows per second once the model is loaded
    # Quantiles of box, entity and caption scores (caption: the geometric mean of its tokens'
    # probabilities), so a scheduled job can see a batch of images scoring lower than usual.
    scores: dict[str, dict] = field(default_factory=dict)
    # Busy seconds per stage (threads overlap, so they can add up to more than the wall time).
    stage_seconds: dict[str, float] = field(default_factory=dict)
    output_dir: str = ""
    shard: str = "0/1"
    parts: list[str] = field(default_factory=list)
    model: str = ""
    weight_format: str = ""


def prepare(cfg: AppConfig) -> None:
    """Everything that can fail on the config or the input as a whole, before anything is written."""
    from pipeline.model import check_device

    cfg.validate()
    check_device(cfg.engine)
    sources.check(cfg.input)


def result_settings(cfg: AppConfig, model_dir: Path) -> dict:
    """The settings that change what a row says: one output folder holds results of one setting.
    The precision is recorded as resolved (`auto` -> bf16 or f32 on this machine), so a resume on a
    machine where `auto` means something else is refused instead of mixing results."""
    from pipeline.model import precision, static_text_decoder
    from pipeline.sink import SCHEMA_VERSION

    # Recorded only where it applies, so that fp32/fp16 results made before it existed still resume.
    encoder = {"model.quantize_image_encoder": cfg.model.quantize_image_encoder} if cfg.model.compressed else {}
    if static_text_decoder(model_dir):  # what the export holds: a static decoder that failed its check is not one
        encoder["model.quantize_text_decoder"] = True
    return {
        **encoder,
        "output.schema_version": SCHEMA_VERSION,
        "model.source": cfg.model.source,
        "model.revision": cfg.model.revision,
        "model.weight_format": cfg.model.weight_format,
        "engine.device": cfg.engine.device,
        "engine.precision": precision(cfg.engine, model_dir),
        "engine.dynamic_quantization_group_size": cfg.engine.dynamic_quantization_group_size,
        "engine.max_new_tokens": cfg.engine.max_new_tokens,
        "engine.min_new_tokens": cfg.engine.min_new_tokens,
        "prompt": cfg.prompt,
        "input.prompt_column": cfg.input.prompt_column,
        "task.kind": cfg.task.kind,
        "task.phrases": list(cfg.task.phrases),
        "input.phrases_column": cfg.input.phrases_column,
    }


# <s> <image>, 64 image positions, </image>: what every prompt holds before its text.
IMAGE_PROMPT_TOKENS = 67


def check_positions(cfg: EngineConfig, model_dir: Path) -> None:
    """The decoder's position table bounds prompt plus generated tokens: refuse a max_new_tokens
    that cannot fit before anything is loaded, instead of failing mid-run."""
    from pipeline.model import max_positions

    table = max_positions(model_dir)
    room = table - IMAGE_PROMPT_TOKENS
    if cfg.max_new_tokens > room:
        raise ConfigError(
            f"engine.max_new_tokens={cfg.max_new_tokens} does not fit the model's {table} positions "
            f"({IMAGE_PROMPT_TOKENS} go to the image prompt): use at most {room} less the prompt's own tokens"
        )


def run(cfg: AppConfig, output_dir: str | Path) -> Summary:
    """Annotate the input into `output_dir`: a local folder or a URI such as s3://bucket/prefix."""
    from pipeline import sink as sinks
    from pipeline.export import ensure_export

    started = time.perf_counter()
    prepare(cfg)
    schema = sinks.output_schema(sources.keep_schema(cfg.input))
    model_dir = ensure_export(cfg.model, cfg.engine)  # may fail on the checkpoint: before the output folder is touched
    check_positions(cfg.engine, model_dir)
    shard, output = cfg.input.shard_index, Folder(output_dir)
    with sinks.exclusive(output, shard) as lease:
        sinks.prepare_folder(output, cfg.output.mode, shard, cfg.input.num_shards, result_settings(cfg, model_dir))
        done = sinks.DoneIds(output)
        if len(done):
            log.info("Resuming: %d items are already in %s and will be skipped", len(done), output)
        summary = Summary(
            started_at=_now(),
            host=socket.gethostname(),
            pid=os.getpid(),
            output_dir=str(output),
            shard=f"{shard}/{cfg.input.num_shards}",
            model=cfg.model.source,
            weight_format=cfg.model.weight_format,
        )

        def write_summary(status: str = "running") -> None:
            summary.status, summary.updated_at = status, _now()
            summary.parts = list(sink.parts)
            summary.wall_seconds = round(time.perf_counter() - started, 2)
            record = {**asdict(summary), "config": asdict(cfg)}
            output.write(summary_name(shard, cfg.input.num_shards), json.dumps(record, indent=2, default=str))

        sink = sinks.ParquetSink(
            output, schema, cfg.output.rows_per_file, cfg.output.flush_seconds, cfg.output.compression, shard,
            on_commit=write_summary, lease=lease,
        )
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


def summary_name(shard: int, num_shards: int) -> str:
    return f"_summary-{shard:05d}.json" if num_shards > 1 else SUMMARY


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _annotate(cfg: AppConfig, model_dir: Path, output: Folder, done, sink, summary: Summary, started: float) -> None:
    from pipeline.engine import Engine
    from pipeline.model import KosmosModel

    model = KosmosModel(model_dir, cfg.engine)
    engine = Engine(model, cfg.engine)
    summary.load_seconds = round(time.perf_counter() - started, 2)
    loaded = time.perf_counter()
    scores = ScoreQuantiles()
    with _progress() as bar:
        for row in _rows(cfg, model, engine, _todo(cfg, done, summary), output.sub(PREVIEWS)):
            summary.items += 1
            if row["error"] is not None:
                summary.errors += 1
                kind = images.error_kind(row["error"])
                summary.errors_by_kind[kind] = summary.errors_by_kind.get(kind, 0) + 1
            summary.entities += len(row["entities"] or [])
            summary.boxes += sum(len(e["boxes"]) for e in row["entities"] or [])
            summary.generated_tokens += len(row["token_ids"] or [])
            scores.add(row)
            summary.images_per_s = round(summary.items / max(time.perf_counter() - loaded, 1e-9), 3)
            sink.add(row)  # after the counts: a commit records a summary that includes this row
            bar.update(1)
            bar.set_postfix(errors=summary.errors, entities=summary.entities, refresh=False)
            _check_error_rate(cfg, summary)
    sink.flush()
    engine.times.seconds["parquet"] += sink.write_seconds
    summary.stage_seconds = {k: round(v, 2) for k, v in engine.times.seconds.items()}
    summary.images_encoded = engine.times.counts["images_encoded"]
    summary.scores = scores.summary()


class ScoreQuantiles:
    """Quantiles of the run's scores in constant memory: histograms of 1000 bins over [0, 1]."""

    BINS = 1000
    QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)

    def __init__(self):
        self.counts = {kind: np.zeros(self.BINS, np.int64) for kind in ("box", "entity", "caption")}

    def add(self, row: dict) -> None:
        for entity in row["entities"] or []:
            self._add("entity", entity["score"])
            for box in entity["boxes"]:
                self._add("box", box["score"])
        if row["token_logprobs"]:
            self._add("caption", math.exp(row["caption_logprob"] / len(row["token_logprobs"])))

    def _add(self, kind: str, value: float | None) -> None:
        if value is not None:
            self.counts[kind][min(int(value * self.BINS), self.BINS - 1)] += 1

    def summary(self) -> dict[str, dict]:
        out = {}
        for kind, counts in self.counts.items():
            n = int(counts.sum())
            cumulative = np.cumsum(counts)
            quantiles = {f"p{round(q * 100):02d}": round((np.searchsorted(cumulative, q * n) + 0.5) / self.BINS, 4) for q in self.QUANTILES}
            out[kind] = {"count": n, **(quantiles if n else {})}
        return out


def _todo(cfg: AppConfig, done, summary: Summary) -> Iterator[sources.Item]:
    """This shard's items not yet committed. A repeated id becomes an error row, never a silent drop;
    the n-th use of an id (the first may be another shard's item) is done once n rows have it."""
    from pipeline.sources import id_hash

    seen: Counter[int] = Counter()  # uses so far of each id's 64-bit hash: a few tens of bytes an item
    for item in sources.iter_items(cfg.input, keep=lambda item_id: done.count(id_hash(item_id)) == 0):
        h = id_hash(item.id)
        seen[h] += 1
        if not item.mine:
            continue
        if done.count(h) >= seen[h]:
            summary.skipped += 1
            continue
        if seen[h] > 1:
            item.error = item.error or f"duplicate id: {item.id!r} was already used by an earlier item"
        yield item


def _check_error_rate(cfg: AppConfig, summary: Summary) -> None:
    rate = cfg.run.max_error_rate
    if rate is None or summary.items < cfg.run.error_rate_min_items:
        return
    if summary.errors > rate * summary.items:
        raise RunAborted(
            f"{summary.errors} of {summary.items} items failed, over run.max_error_rate={rate} "
            f"({', '.join(f'{k}: {n}' for k, n in summary.errors_by_kind.items())}); committed parts are kept "
            "and a rerun resumes after them"
        )


def _rows(cfg: AppConfig, model, engine, items: Iterator[sources.Item], previews: Folder) -> Iterator[dict]:
    """One output row per item, in input order; items that failed to decode pass through the
    engine untouched."""
    from pipeline.preview import write_preview

    preprocess = model.processor.pixel_values
    threads = cfg.input.decode_threads or images.default_threads()

    def decode(item):
        started = time.perf_counter()
        decoded = images.decode(item, preprocess, cfg.input.max_image_pixels)
        engine.times.add("decode_preprocess", started)
        if decoded.image is not None and cfg.preview.enabled:  # keep only what the preview needs
            decoded.image.thumbnail((cfg.preview.max_side, cfg.preview.max_side))
        else:
            decoded.image = None
        return decoded

    ahead = engine.batch_size * (engine.num_requests + 1)
    decoded = images.ordered_map(decode, items, threads, ahead)
    grounded: list = []  # task=ground: the generations of the current image, one per phrase
    for gen in engine.generate(_requests(cfg, model, decoded)):
        d = gen.tag
        item = d.item
        if d.error:  # failed before the engine: passed through, in order
            yield _row(item, prompt=item.prompt or cfg.prompt, error=item.error)
            continue
        started = time.perf_counter()
        if cfg.task.kind == "ground":
            grounded.append(gen)
            phrases = _phrases(cfg, item)
            if len(grounded) < len(phrases):
                continue
            row = _ground_row(model, item, phrases, grounded)
            grounded = []
        else:
            caption, entities = _parse(model, gen)
            row = _row(
                item,
                prompt=item.prompt or cfg.prompt,
                caption=caption,
                entities=[e.as_row() for e in entities],
                **_tokens(gen.token_ids, gen.token_logprobs),
            )
        row.update(width=d.width, height=d.height)
        if d.image is not None:
            shown = [Entity.from_row(e) for e in row["entities"]]
            write_preview(previews, item.id, d.image, shown, cfg.preview.max_side, cfg.preview.quality)
        engine.times.add("grounding_preview", started)
        yield row


def _phrases(cfg: AppConfig, item: sources.Item) -> list[str]:
    return [p for p in (item.phrases if item.phrases else cfg.task.phrases) if p and p.strip()]


def _requests(cfg: AppConfig, model, decoded):
    """One request per image, or per (image, phrase) for task=ground, all sharing one pixel array.
    A row whose prompt leaves no room for engine.max_new_tokens in the model's positions is an error
    row: past the table its positions would silently be wrong."""
    from pipeline.config import GROUND_PROMPT
    from pipeline.engine import Request

    for d in decoded:
        if cfg.task.kind == "ground" and not d.error and not _phrases(cfg, d.item):
            d.item.error = "no phrases: this row's phrases are empty and task.phrases is empty"
        if cfg.task.kind == "ground":
            prompts = [GROUND_PROMPT.format(phrase=phrase.strip()) for phrase in _phrases(cfg, d.item)]
        else:
            prompts = [d.item.prompt or cfg.prompt]
        longest = max((len(model.encode_prompt(p).input_ids) for p in prompts), default=0) if not d.error else 0
        if longest + cfg.engine.max_new_tokens > model.max_positions:
            d.item.error = (
                f"prompt too long: {longest} tokens and engine.max_new_tokens={cfg.engine.max_new_tokens} "
                f"exceed the model's {model.max_positions} positions; shorten this row's prompt"
            )
        if d.error:
            yield Request(None, "", tag=d)
        else:
            for prompt in prompts:
                yield Request(d.pixel_values, prompt, tag=d)


def _ground_row(model, item: sources.Item, phrases: list[str], gens: list) -> dict:
    """One entity per requested phrase, named exactly as requested, with the boxes the model gave it.

    The caption is the phrases joined with "; ", so that every entity's span points at its phrase.
    """
    from pipeline.config import GROUND_PROMPT

    caption, entities, tokens, logprobs = "", [], [], []
    for phrase, gen in zip(phrases, gens):
        _, found = _parse(model, gen)
        wanted = " ".join(phrase.split()).lower()
        match = next((e for e in found if " ".join(e.phrase.split()).lower() == wanted), Entity(phrase, 0, 0))
        start = len(caption) + (2 if caption else 0)
        caption = f"{caption}; {phrase}" if caption else phrase
        entities.append(Entity(phrase, start, start + len(phrase), match.boxes, match.box_scores, match.score).as_row())
        tokens += gen.token_ids
        logprobs += gen.token_logprobs
    return _row(item, prompt=GROUND_PROMPT, caption=caption, entities=entities, **_tokens(tokens, logprobs))


def _parse(model, gen) -> tuple[str, list[Entity]]:
    """Caption and entities of a generation, each entity and box scored from its tokens."""
    ids = model.ids_after_image(gen.prompt_ids, gen.token_ids)
    caption, entities = parse(model.decode(ids))
    add_scores(entities, ids, [None] * (len(ids) - len(gen.token_ids)) + gen.token_logprobs, model.tags)
    return caption, entities


def _tokens(token_ids: list[int], logprobs: list[float]) -> dict:
    return {"token_ids": token_ids, "token_logprobs": logprobs, "caption_logprob": float(sum(logprobs))}


def _row(item: sources.Item, **values) -> dict:
    row = {"id": item.id, "source": item.source, "width": None, "height": None, "prompt": None}
    row.update({"caption": None, "entities": None, "token_ids": None, "token_logprobs": None, "caption_logprob": None, "error": None})
    row.update(values)
    row.update(item.extra)
    return row


def _progress():
    from tqdm import tqdm

    return tqdm(unit="img", desc="annotating", dynamic_ncols=True, mininterval=1.0)


def copy_hydra_record(hydra_dir: Path, output_dir: str | Path, cfg: AppConfig) -> None:
    """Hydra's own `.hydra/` config record, next to the data it produced (one per shard)."""
    src = hydra_dir / ".hydra"
    dst = Folder(output_dir).sub(".hydra" if cfg.input.num_shards == 1 else f".hydra-{cfg.input.shard_index:05d}")
    if src.is_dir() and (dst.remote or src.resolve() != Path(dst.root).resolve()):
        for record in sorted(src.iterdir()):
            dst.write(record.name, record.read_bytes())
