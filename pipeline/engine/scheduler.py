"""What runs next: how many rows a step holds, when new images are admitted, and the queue that
hands whole images to the decoders and gives their generations back in input order."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator

from pipeline.engine.request import Generation, Request
from pipeline.engine.runner import Runner
from pipeline.hardware import cpu_has

# Until the run's first result is given back a decoder runs this many rows, so the first rows are
# written in seconds rather than after a whole batch's prefill and its longest caption.
FIRST_ROWS = 1


def default_batch_size(device: str = "CPU") -> int:
    """Rows that share each decoder step: 32, or 16 on a CPU without AVX-512. A step reads every
    weight once for all its rows, so a row costs less the more rows share it; with AVX2 only a step
    runs at the cores' f32 peak whatever its rows, and 16 rows are as fast as 32 for half the KV
    cache (docs/performance/defaults.md, "Rows per step")."""
    return 16 if device == "CPU" and not cpu_has("avx512f") else 32


def admit_at(batch_size: int) -> int:
    """Free rows that make an admission worth its two prefill calls (each reads every weight once):
    a quarter of the batch (docs/performance/defaults.md, "Admission")."""
    return max(1, batch_size // 4)


def rows_wanted(batch_size: int, started: bool) -> int:
    """The rows a decoder may hold now: FIRST_ROWS until the run's first result is out."""
    return batch_size if started else min(batch_size, FIRST_ROWS)


class Feed:
    """The input, one image's requests at a time, to the decoders' threads; their generations back
    in input order. A decoder takes new work only within `window` requests of the oldest one not yet
    given back, so memory stays bounded however long the input and however long one caption runs."""

    def __init__(self, requests: Iterable[Request], window: int, decoders: int):
        self._it, self._window = iter(requests), window
        self._lookahead: Request | None = None  # the first request of the image after `_group`
        self._group: list[Request] | None = None  # the next image's requests, read and not yet taken
        self._exhausted = False
        self._taken = 0  # requests handed out or passed through
        self._read = threading.Lock()
        self._results = threading.Condition(threading.RLock())
        self._done: dict[int, Generation] = {}
        self._next = 0  # the next index to give back
        self._running = decoders  # decoder threads still at work
        self.error: BaseException | None = None
        self.stopped = False
        self.started = False  # the first result is done

    def take(self, runner: Runner, rows: int, wait: bool) -> list[tuple[int, Request]] | None:
        """Whole images' requests for `runner`: at most `rows` of them and as many as its blocks can
        hold; None once the input is finished. With `wait` (the runner has no rows) one image goes
        in whatever its size, after waiting for room in the window if need be."""
        with self._read:
            work: list[tuple[int, Request]] = []
            while (group := self._peek()) is not None:
                alone = wait and not work
                if not alone and len(work) + len(group) > rows:
                    break
                if not self._room(len(group), alone) or not runner.reserve(group):
                    break
                work += [(self._taken + k, r) for k, r in enumerate(group)]
                self._taken += len(group)
                self._group = None
            return None if not work and self._exhausted and self._group is None else work

    def _peek(self) -> list[Request] | None:
        """The next image's requests (consecutive ones sharing one pixel array), read once and held
        until taken; requests without pixels on the way are given back at once."""
        while self._group is None and not self._exhausted:
            first, self._lookahead = self._lookahead or next(self._it, None), None
            if first is None:
                self._exhausted = True
            elif first.pixel_values is None:
                self.put(self._taken, Generation(first.tag, None))
                self._taken += 1
            else:
                self._group = [first]
                for r in self._it:
                    if r.pixel_values is not first.pixel_values:
                        self._lookahead = r
                        break
                    self._group.append(r)
        return self._group

    def _room(self, n: int, wait: bool) -> bool:
        with self._results:
            while self._taken + n > self._next + self._window and self._taken > self._next:
                if not wait or self.stopped:
                    return False
                self._results.wait()
        return True

    def put(self, index: int, generation: Generation) -> None:
        with self._results:
            self.started = self.started or index == 0
            self._done[index] = generation
            self._results.notify_all()

    def finish(self, error: BaseException | None) -> None:
        """A decoder thread is done, or failed with `error` (raised to the caller)."""
        with self._results:
            self._running -= 1
            self.error = self.error or error
            self._results.notify_all()

    def results(self) -> Iterator[Generation]:
        """Generations in input order; once stopped, only those already done in order."""
        while True:
            with self._results:
                while self._next not in self._done and self._running and self.error is None and not self.stopped:
                    self._results.wait()
                if self.error is not None:
                    raise self.error
                if self._next not in self._done:
                    return
                generation = self._done.pop(self._next)
                self._next += 1
                self._results.notify_all()
            yield generation

    def stop(self) -> None:
        """Stop taking work and giving results (callable from a signal handler: the lock is re-entrant)."""
        with self._results:
            self.stopped = True
            self._results.notify_all()
