"""Locks that a killed run never leaves stuck: kernel file locks on local disks (they die with their
process, even on SIGKILL), and leases that expire in object storage."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from pipeline.errors import OutputError


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


def is_locked(path: Path) -> bool:
    """Whether a process holds `path`'s lock (flock above). Asked with a shared lock on a read-only
    handle, released at once: a reader that may not write in the folder can ask too."""
    try:
        with open(path) as f:
            fcntl.flock(f, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except FileNotFoundError:
        return False
    except BlockingIOError:
        return True
    return False


class LeaseHeld(Exception):
    def __init__(self, holder: dict):
        super().__init__(holder)
        self.holder = holder

    def __str__(self) -> str:
        h = self.holder
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(h["expires"]))
        return f"run {h['run']} (pid {h['pid']} on {h['host']}), whose lease lasts until {until} unless renewed"


class Lease:
    """A lock for a folder in object storage, where no kernel lock reaches: the object `name` says
    which run holds it and until when. A run is known by a random id it holds in memory (host and
    pid are recorded for people: containers share host names and reuse pids); the lease is free once
    expired, so a killed run's blocks a rerun for at most `ttl` seconds. A thread renews it every
    `ttl / 3`; the holder reads it back before every commit (`check`) and stops if it is no longer its
    own, and any renewal failure that is not a passing one (an OSError) stops the run too.

    Taking it writes our record, waits `settle` seconds and reads it back: of two runs that start
    together, the one whose record was overwritten backs off. (Object stores keep the last write;
    this protects against a second run on the same shard, not against writers started within
    milliseconds of each other: their parts carry their run ids, so neither overwrites the other's.)
    """

    def __init__(self, folder, name: str, ttl: float = 120.0, settle: float = 1.0):
        self.folder, self.name, self.ttl, self.settle = folder, name, ttl, settle
        self.run = uuid.uuid4().hex[:12]
        self.record = {"run": self.run, "host": socket.gethostname(), "pid": os.getpid(), "expires": 0.0}
        self.failure: str | None = None  # why the lease is no longer ours, or why renewing it failed
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The record of whoever holds the lease now, if not expired."""
        try:
            record = json.loads(self.folder.read_text(self.name))
        except (FileNotFoundError, ValueError):
            return None
        return record if record.get("expires", 0) >= time.time() else None

    def acquire(self, blocking: bool = False, on_wait: Callable[[], None] | None = None) -> None:
        while True:
            held = self.holder()
            if held is None or held["run"] == self.run:
                self._write()
                time.sleep(self.settle)
                held = self.holder()
                if held is not None and held["run"] == self.run:
                    break
            if not blocking:
                raise LeaseHeld(held or {"run": "?", "pid": "?", "host": "?", "expires": time.time()})
            if on_wait:
                on_wait()
                on_wait = None
            time.sleep(self.settle)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def check(self, detail: str) -> None:
        """Raise OutputError unless the lease is still ours: read back from the store, not assumed. A
        read that fails in passing falls back on our own last renewal while it has not expired."""
        if self.failure is None:
            try:
                held = self.holder()
            except OSError as e:
                if self.record["expires"] <= time.time():
                    self.failure = f"it could not be read back ({type(e).__name__}: {e}) and has expired"
            else:
                if held is None or held["run"] != self.run:
                    self.failure = "another run took it over" if held else "it expired before it could be renewed"
        if self.failure is not None:
            raise OutputError(
                f"{self.folder} {self.name}: this run (id {self.run}) no longer holds the shard: {self.failure}; "
                f"{detail}, a rerun annotates them again"
            )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            held = self.holder()
            if held is not None and held["run"] == self.run:
                self.folder.delete(self.name)
        except OSError:  # the store is unreachable: the lease expires by itself
            pass

    def _write(self) -> None:
        self.record["expires"] = time.time() + self.ttl
        self.folder.write(self.name, json.dumps(self.record))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                held = self.holder()
                if held is not None and held["run"] != self.run:
                    self.failure = "another run took it over"
                    return
                self._write()
            except OSError:  # the store is unreachable for now: try again at the next renewal
                continue
            except Exception as e:  # noqa: BLE001 - anything else ends the run at its next commit
                self.failure = f"renewing it failed ({type(e).__name__}: {e})"
                return
