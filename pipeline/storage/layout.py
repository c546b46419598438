"""Every name in an output folder, in one place.

An output folder is itself the dataset: `part-<shard>-<n>.parquet` files, and everything else under a
name starting with `_` or `.`, which parquet readers skip, so `pandas.read_parquet(folder)` reads it
as one table.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.storage.files import Folder, is_remote

# part-<shard>-<n>.parquet; in object storage part-<shard>-<n>-<run>.parquet (storage/locks.py: Lease)
PART = re.compile(r"^part-(\d{5})-(\d{5,})(?:-([0-9a-f]{12}))?\.parquet$")
SETTINGS = "_settings.json"  # the settings that change what a row says: one result set per folder
SUMMARY = "_summary.json"  # a single run's summary; shards write _summary-<shard>.json
PREVIEWS = "_previews"
GALLERY = "_gallery"
SETTINGS_LOCK = ".lock-settings"  # local: shards prepare the folder one at a time
SETTINGS_LEASE = ".lease-settings.json"  # the same in object storage


def part_name(shard: int, number: int, run: str | None = None) -> str:
    return f"part-{shard:05d}-{number:05d}{f'-{run}' if run else ''}.parquet"


def unfinished_part_prefix(shard: int) -> str:
    """What the temporary files of a shard's parts start with (storage.files.atomic names them)."""
    return f".part-{shard:05d}-"


def part_shard(name: str) -> int:
    return int(PART.match(name).group(1))


def part_number(name: str) -> int:
    return int(PART.match(name).group(2))


def summary_name(shard: int, num_shards: int) -> str:
    return f"_summary-{shard:05d}.json" if num_shards > 1 else SUMMARY


def is_summary(name: str) -> bool:
    return name.startswith("_summary") and name.endswith(".json")


def run_log(shard: int, num_shards: int) -> str:
    """The run's log (the lines it wrote on stderr), beside the summary."""
    return f"_run-{shard:05d}.log" if num_shards > 1 else "_run.log"


def lock_name(shard: int) -> str:
    return f".lock-{shard:05d}"


def lease_name(shard: int) -> str:
    return f".lease-{shard:05d}.json"


def default_output(input_path: str | list[str], task: str) -> str:
    """Where a run writes without output.dir: `outputs/<input's name>-<task>-<8 hex>`, under the
    working directory, the hex a hash of the input's absolute location, so that the same command run
    again from the same folder finds its output and resumes."""
    paths = [input_path] if isinstance(input_path, str) else list(input_path)
    where = [p if is_remote(p) else str(Path(p).expanduser().resolve()) for p in paths]
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(paths[0].partition("?")[0].rstrip("/")).name).strip("._") or "input"
    digest = hashlib.sha256("\n".join(where).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    return f"outputs/{name[:60]}-{task}-{digest}"


def hydra_record(shard: int, num_shards: int) -> str:
    """The composed config of the run that made the folder and its overrides (one per shard)."""
    return ".hydra" if num_shards == 1 else f".hydra-{shard:05d}"


def recorded_settings(folder: Folder) -> dict | None:
    """The settings the folder's rows were made with (SETTINGS), None before the first run recorded them."""
    return json.loads(folder.read_text(SETTINGS)) if folder.exists(SETTINGS) else None


def committed_parts(folder: Folder, shard: int | None = None) -> list[str]:
    """The names of the folder's committed parts (of one shard), in order."""
    parts = [name for name in folder.names() if PART.match(name)]
    return parts if shard is None else [p for p in parts if part_shard(p) == shard]


def existing_output(location: str | None, summaries_too: bool = False) -> Folder:
    """The output folder a reader of results (labels, gallery, status) was pointed at; it must hold
    parts (or, `summaries_too`, the summary of a run that has not committed yet)."""
    if not location:
        raise ConfigError("output.dir is not set: point it at a kosmos-annotate output folder")
    folder = Folder(location)
    names = folder.names()
    if not any(PART.match(n) or (summaries_too and is_summary(n)) for n in names):
        raise ConfigError(f"output.dir={location!r} holds no part files: is it a kosmos-annotate output?")
    return folder
