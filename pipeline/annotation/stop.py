"""SIGTERM and SIGINT stop a run gracefully: what is finished is committed, the summary says
`stopped`, and the command exits 128 + the signal's number (143, 130). A second signal exits at once.

`scancel`, SLURM preemption, `docker stop`, Kubernetes and systemd all stop a job with SIGTERM and
kill it a while later (SLURM's KillWait: 30 s by default). While the model is exported or loaded a
signal interrupts the run where it is (nothing is committed yet); once it is loaded the signal only
asks the engine to stop, so that the rows in hand are committed and no part is cut in its commit.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from pipeline.errors import Stopped

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class GracefulStop:
    """Within its block, the signals stop the run; `on_stop` (set once the model is loaded) is called
    instead of raising. Installed only in the main thread, where Python delivers signals."""

    def __init__(self):
        self.signum: int | None = None
        self.on_stop: Callable[[], None] | None = None
        self._previous: dict = {}

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            os._exit(128 + signum)  # a second signal: at once
        self.signum = signum
        name = signal.Signals(signum).name
        log.warning(
            "%s: stopping; the rows already annotated are being committed (send it again to exit at once)", name
        )
        if self.on_stop is None:
            raise Stopped(signum)
        self.on_stop()
