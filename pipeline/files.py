"""Files that appear whole: written under a temporary name beside their own (starting with `.`, which
parquet readers and globs of `_*.json` skip), then renamed, so a reader never sees half of one."""

from __future__ import annotations

import os
from pathlib import Path


class atomic:
    """Write to a temporary name beside `path`, rename when complete (removed on an error)."""

    def __init__(self, path: Path):
        self.path = path
        self.tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "w")
        return self.f

    def __exit__(self, kind, *_):
        self.f.close()
        if kind is None:
            os.replace(self.tmp, self.path)
        else:
            self.tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    with atomic(path) as f:
        f.write(text)
