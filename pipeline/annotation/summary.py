"""A run's record in its output folder: the summary (counts, timings, score quantiles, status),
rewritten as the run goes so that `kosmos-status` and a scheduled job can read where it stands from
its first second, and the run's log beside it; and when to give up (run.max_error_rate)."""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import AppConfig, RunConfig, plain
from pipeline.errors import RunAborted
from pipeline.records import caption_score, error_kind
from pipeline.storage import layout
from pipeline.storage.files import Folder


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Summary:
    # exporting | loading | running (rewritten at every part commit) | finished | stopped (a signal) |
    # aborted (run.max_error_rate) | failed (`error` says why); a run killed outright stays what it
    # was: kosmos-status then finds its lock free, or its lease expired.
    status: str = "loading"
    error: str | None = None
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
    run: str = ""  # the run's id (object storage: its lease and its parts carry it)

    def add(self, row: dict) -> None:
        """Count a row about to be committed."""
        self.items += 1
        if row["error"] is not None:
            self.errors += 1
            kind = error_kind(row["error"])
            self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1
        self.entities += len(row["entities"] or [])
        self.boxes += sum(len(e["boxes"]) for e in row["entities"] or [])
        self.generated_tokens += len(row["token_ids"] or [])


def check_error_rate(cfg: RunConfig, summary: Summary) -> None:
    """Abort once more than run.max_error_rate of the items failed (after run.error_rate_min_items)."""
    rate = cfg.max_error_rate
    if rate is None or summary.items < cfg.error_rate_min_items:
        return
    if summary.errors > rate * summary.items:
        raise RunAborted(
            f"{summary.errors} of {summary.items} items failed, over run.max_error_rate={rate} "
            f"({', '.join(f'{k}: {n}' for k, n in summary.errors_by_kind.items())}); committed parts are kept "
            "and a rerun resumes after them"
        )


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
        self._add("caption", caption_score(row))

    def _add(self, kind: str, value: float | None) -> None:
        if value is not None:
            self.counts[kind][min(int(value * self.BINS), self.BINS - 1)] += 1

    def summary(self) -> dict[str, dict]:
        out = {}
        for kind, counts in self.counts.items():
            n = int(counts.sum())
            cumulative = np.cumsum(counts)
            quantiles = {
                f"p{round(q * 100):02d}": round((np.searchsorted(cumulative, q * n) + 0.5) / self.BINS, 4)
                for q in self.QUANTILES
            }
            out[kind] = {"count": n, **(quantiles if n else {})}
        return out


class RunRecord:
    """Writes the summary (`_summary.json`, or `_summary-<shard>.json` for one of several shards) and
    keeps the run's log in `_run.log` (`_run-<shard>.log`) beside it: appended to on a local disk,
    uploaded whole with each summary in object storage."""

    def __init__(self, folder: Folder, summary: Summary, cfg: AppConfig, started: float):
        shard, num_shards = cfg.input.shard_index, cfg.input.num_shards
        self.folder, self.summary, self.cfg, self.started = folder, summary, cfg, started
        self.name, self.log_name = layout.summary_name(shard, num_shards), layout.run_log(shard, num_shards)
        self.parts: list[str] = []
        self.written = False  # the summary was written by this run
        self._handler: logging.Handler | None = None
        self._log_file: Path | None = None

    def __enter__(self) -> RunRecord:
        if self.folder.remote:
            self._log_file = Path(tempfile.mkstemp(prefix="kosmos-run-", suffix=".log")[1])
        else:
            self._log_file = Path(self.folder.path(self.log_name))
        self._handler = logging.FileHandler(self._log_file, mode="a", encoding="utf-8", errors="backslashreplace")
        self._handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        logging.getLogger().addHandler(self._handler)
        return self

    def __exit__(self, *exc) -> None:
        logging.getLogger().removeHandler(self._handler)
        self._handler.close()
        if self.folder.remote:
            try:
                self._upload_log()
            except Exception as e:  # never raised over what ended the run
                logging.getLogger(__name__).warning("The run's log could not be uploaded (%s: %s)", type(e).__name__, e)
            self._log_file.unlink(missing_ok=True)

    def write(self, status: str | None = None, error: str | None = None) -> None:
        summary = self.summary
        summary.status = status or summary.status
        summary.error = error or summary.error
        summary.updated_at = now()
        summary.parts = list(self.parts)
        summary.wall_seconds = round(time.perf_counter() - self.started, 2)
        record = {**asdict(summary), "config": plain(self.cfg)}
        self.folder.write(self.name, json.dumps(record, indent=2, default=str))
        self.written = True
        if self.folder.remote and self._handler is not None:
            self._upload_log()

    def end(self, status: str, error: str) -> None:
        """Record how a run ended on an error; a summary that cannot be written then (the store is
        what failed) is logged, never raised over the error that ended the run."""
        try:
            self.write(status, error)
        except Exception as e:
            logging.getLogger(__name__).warning(
                "The summary (%s) could not be written to %s (%s: %s)", status, self.folder, type(e).__name__, e
            )

    def _upload_log(self) -> None:
        self._handler.flush()
        self.folder.write(self.log_name, self._log_file.read_bytes())
