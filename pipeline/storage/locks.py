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
    which run holds it (run id, host, pid) and until when. A thread renews it every `ttl / 3`; it is
    free once expired, or at once when its holder is a dead process on this host (a killed run).

    Taking it writes our record, waits `settle` seconds and reads it back: of two runs that start
    together, the one whose record was overwritten backs off. (Object stores keep the last write;
    this protects against a second run on the same shard, not against writers started within
    milliseconds of each other.) `lost` is set if another run took it over (we failed to renew).
    """

    def __init__(self, folder, name: str, ttl: float = 600.0, settle: float = 1.0):
        self.folder, self.name, self.ttl, self.settle = folder, name, ttl, settle
        self.record = {"run": uuid.uuid4().hex[:12], "host": socket.gethostname(), "pid": os.getpid(), "expires": 0.0}
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def holder(self) -> dict | None:
        """The record of whoever holds the lease now, if not expired and not a dead process here."""
        try:
            record = json.loads(self.folder.read_text(self.name))
        except (FileNotFoundError, ValueError):
            return None
        if record["expires"] < time.time():
            return None
        if record["host"] == socket.gethostname() and record["run"] != self.record["run"] and not alive(record["pid"]):
            return None
        return record

    def acquire(self, blocking: bool = False, on_wait: Callable[[], None] | None = None) -> None:
        while True:
            held = self.holder()
            if held is None or held["run"] == self.record["run"]:
                self._write()
                time.sleep(self.settle)
                held = self.holder()
                if held is not None and held["run"] == self.record["run"]:
                    break
            if not blocking:
                raise LeaseHeld(held or {"run": "?", "pid": "?", "host": "?", "expires": time.time()})
            if on_wait:
                on_wait()
                on_wait = None
            time.sleep(self.settle)
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.name}", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        held = self.holder()
        if held is not None and held["run"] == self.record["run"]:
            self.folder.delete(self.name)

    def _write(self) -> None:
        self.record["expires"] = time.time() + self.ttl
        self.folder.write(self.name, json.dumps(self.record))

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                held = self.holder()
                if held is not None and held["run"] != self.record["run"]:
                    self.lost = True
                    return
                self._write()
            except OSError:  # the store is unreachable for now: try again at the next renewal
                continue


def alive(pid: int) -> bool:
    """Whether a process of this host is running (a pid of someone else's counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0
