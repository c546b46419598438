"""File locks that die with their process (even on SIGKILL), so a killed run never leaves one stuck."""

from __future__ import annotations

import fcntl
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def flock(path: Path, blocking: bool = True, on_wait: Callable[[], None] | None = None) -> Iterator[IO[str]]:
    """Hold an exclusive flock on `path` (created if needed). If another process holds it: raise
    BlockingIOError, or (blocking) call `on_wait` and wait for it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if not blocking:
                raise
            if on_wait:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield f
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
