"""`kosmos-status output.dir=labels/`: where a (sharded) run stands, read from the folder alone.

Reads only what is committed: the parts' footers and error column, and the summaries each shard
rewrites at every part commit (`_summary.json`, `_summary-<shard>.json`). So it works on a folder
being written, from any machine that sees it. Per shard: items done, errors by kind, images/s, last
commit and state; for the whole folder: done of total (the total is counted from the recorded
input when it can be read) and an estimate of the time left.

Exit status 5 when a shard that says it is running has not committed for `stall_seconds`: a
scheduled job can alert on it.
"""

from __future__ import annotations

import calendar
import json
import logging
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
from omegaconf import OmegaConf

from pipeline.cli import command
from pipeline.config import InputConfig, StatusConfig
from pipeline.errors import Stalled, UserError
from pipeline.records import error_kind
from pipeline.sources import open_source
from pipeline.storage import layout
from pipeline.storage.files import Folder
from pipeline.storage.locks import is_locked

log = logging.getLogger("kosmos-status")


@dataclass
class ShardStatus:
    shard: int
    # exporting | loading | running | stalled | killed | finished | stopped | aborted | failed | unknown (no summary)
    state: str
    done: int  # rows in committed parts
    errors: dict[str, int]
    images_per_s: float | None  # of its latest run, once loaded
    last_commit_age_s: float | None


def shard_status(folder: Folder, shard: int, summary: dict | None, stall_seconds: float) -> ShardStatus:
    parts = layout.committed_parts(folder, shard)
    done, errors = 0, Counter()
    for part in parts:
        with pq.ParquetFile(folder.open(part)) as f:
            done += f.metadata.num_rows
            column = f.read(columns=["error"]).column("error")
        errors.update(error_kind(e) for e in pc.drop_null(column).to_pylist())
    now = time.time()
    last = max((folder.mtime(p) for p in parts), default=None)
    state = summary["status"] if summary else "unknown"
    if state in LIVE:
        updated = calendar.timegm(time.strptime(summary["updated_at"] or summary["started_at"], "%Y-%m-%dT%H:%M:%SZ"))
        if not held(folder, shard, summary):
            state = "killed"
        elif now - max(last or 0.0, updated) > stall_seconds:
            state = "stalled"
    return ShardStatus(
        shard=shard,
        state=state,
        done=done,
        errors=dict(errors),
        images_per_s=summary.get("images_per_s") if summary else None,
        last_commit_age_s=round(now - last, 1) if last else None,
    )


LIVE = ("exporting", "loading", "running")


def held(folder: Folder, shard: int, summary: dict) -> bool:
    """Whether a run still holds the shard: its lock on a local disk (a kernel lock dies with its
    process, whatever its host or pid), its lease, unexpired and its own, in object storage."""
    if folder.remote:
        try:
            lease = json.loads(folder.read_text(layout.lease_name(shard)))
        except (FileNotFoundError, ValueError):
            return False
        return lease.get("expires", 0) >= time.time() and lease.get("run") == summary.get("run")
    return is_locked(Path(folder.path(layout.lock_name(shard))))


def _summaries(folder: Folder) -> tuple[dict[int, dict], int]:
    """The summaries of the folder's latest shard layout (its shards' count), by shard, and that count:
    a summary left by a run with another number of shards says nothing of the shards now."""
    records = []
    for name in folder.names():
        if not layout.is_summary(name):
            continue
        try:
            records.append(json.loads(folder.read_text(name)))
        except (OSError, ValueError):
            continue
    if not records:
        return {}, 0
    latest = max(records, key=lambda r: r.get("updated_at") or r.get("started_at") or "")
    num_shards = int(latest.get("shard", "0/1").split("/")[1])
    current = [r for r in records if int(r.get("shard", "0/1").split("/")[1]) == num_shards]
    return {int(r.get("shard", "0/1").split("/")[0]): r for r in current}, num_shards


def count_input(record: dict) -> int | None:
    """How many items the recorded input holds (every shard's), or None if it cannot be read here
    (or only at the price of reading it: compressed or remote WebDataset tars)."""
    try:
        recorded = {k: v for k, v in record["config"]["input"].items() if k in InputConfig.__dataclass_fields__}
        cfg: InputConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(InputConfig), recorded))
        cfg.num_shards, cfg.shard_index = 1, 0
        source = open_source(cfg)
        source.check()
        total = source.count()
    except (KeyError, TypeError, ValueError, UserError, OSError):
        return None
    if total is None:
        return None
    return min(total, cfg.limit) if cfg.limit is not None else total


def status(cfg: StatusConfig) -> dict:
    folder = layout.existing_output(cfg.output.dir, summaries_too=True)
    summaries, num_shards = _summaries(folder)
    if not summaries:  # parts alone (a folder copied without its summaries): as many shards as they name
        num_shards = max((layout.part_shard(p) for p in layout.committed_parts(folder)), default=0) + 1
    shards = [shard_status(folder, k, summaries.get(k), cfg.stall_seconds) for k in range(num_shards)]
    done = sum(s.done for s in shards)
    total = count_input(next(iter(summaries.values()))) if cfg.count_input and summaries else None
    rate = sum(s.images_per_s or 0.0 for s in shards if s.state == "running")
    left = round((total - done) / rate) if total is not None and rate > 0 and total > done else None
    return {
        "output_dir": str(folder),
        "shards": [asdict(s) for s in shards],
        "done": done,
        "total": total,
        "errors": dict(sum((Counter(s.errors) for s in shards), Counter())),
        "images_per_s": round(rate, 3),
        "seconds_left": left,
    }


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    return f"{seconds / 60:.0f} min ago" if seconds < 7200 else f"{seconds / 3600:.1f} h ago"


def table(report: dict) -> str:
    lines = [f"{report['output_dir']}: {len(report['shards'])} shard(s)"]
    lines.append(f"{'shard':<7}{'state':<10}{'done':>9}  {'images/s':>8}  {'last commit':<14}errors")
    for s in report["shards"]:
        errors = ", ".join(f"{k}: {n}" for k, n in s["errors"].items()) or "-"
        rate = f"{s['images_per_s']:.2f}" if s["images_per_s"] is not None else "-"
        lines.append(
            f"{s['shard']:<7}{s['state']:<10}{s['done']:>9}  {rate:>8}  {_age(s['last_commit_age_s']):<14}{errors}"
        )
    total = report["total"]
    whole = f"{report['done']} of {total} ({100 * report['done'] / total:.1f} %)" if total else f"{report['done']}"
    errors = sum(report["errors"].values())
    left = report["seconds_left"]
    eta = f"; about {left / 60:.0f} min left at {report['images_per_s']:.2f} images/s" if left is not None else ""
    lines.append(f"all: {whole} done, {errors} errors{eta}")
    return "\n".join(lines)


def main() -> None:
    def work(cfg: StatusConfig) -> None:
        report = status(cfg)
        print(json.dumps(report, indent=2) if cfg.json else table(report))
        sys.stdout.flush()
        stalled = [s["shard"] for s in report["shards"] if s["state"] == "stalled"]
        if stalled:
            raise Stalled(
                f"shard(s) {stalled} say they are running but have not committed for {cfg.stall_seconds:.0f} s"
            )

    command("status", work, log)


if __name__ == "__main__":
    main()
