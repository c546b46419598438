"""File locks that die with their process (even on SIGKILL), so a killed run never leaves one stuck."""

from __future__ import annotations

import fcntl
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def flock(path: Path, blocking: bool = True) -> Iterator[IO[str]]:
    """Hold an exclusive flock on `path` (created if needed); raises BlockingIOError if busy and not blocking."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
