"""Greedy generation with continuous batching on OpenVINO's paged attention.

A decoder step reads all of its weights once whatever its rows, so many sequences share each
step. Captions stop at different steps: a row that stops leaves the decoder at once and a new image's
rows take its place, so the decoder keeps `batch_size` rows busy and no image waits for a neighbour's
long caption. Each of `num_requests` decoders runs its own rows on its own thread (OpenVINO releases
the GIL while a request runs); results come back in input order.

An image's tokens never depend on its neighbours: every row's attention reads only its own blocks,
and its positions count its own tokens exactly as transformers does for that image alone.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.config import EngineConfig
from pipeline.engine.request import Generation, Request, Row
from pipeline.engine.runner import Runner
from pipeline.engine.sampler import greedy
from pipeline.engine.scheduler import Feed, admit_at, default_batch_size, rows_wanted
from pipeline.engine.timing import StageTimes
from pipeline.model.runtime import KosmosModel

log = logging.getLogger(__name__)


class Engine:
    def __init__(self, model: KosmosModel, cfg: EngineConfig):
        self.model = model
        self.cfg = cfg
        self.batch_size = cfg.batch_size or default_batch_size(cfg.device)
        self.num_requests = model.num_requests
        self.times = StageTimes()
        self.runners = [
            Runner(model, cfg.max_new_tokens, self.batch_size, self.times) for _ in range(self.num_requests)
        ]
        self.runners[0].warm_up()  # the runners share the compiled graphs: once is enough
        self._feed: Feed | None = None
        self._stopped = False  # a stop before the generation begins is kept for it
        log.info("Engine: %d rows per decoder step, %d decoders", self.batch_size, self.num_requests)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Stream generations in input order, every decoder on its own thread."""
        feed = self._feed = Feed(requests, 4 * self.batch_size * self.num_requests, len(self.runners))
        if self._stopped:
            feed.stop()
        threads = [
            threading.Thread(target=self._work, args=(r, feed), name=f"kosmos-decoder-{i}", daemon=True)
            for i, r in enumerate(self.runners)
        ]
        for t in threads:
            t.start()
        try:
            yield from feed.results()
        finally:
            feed.stop()
            for t in threads:
                t.join()

    def stop(self) -> None:
        """End the generation under way after the results already done, or the next one before it
        starts (a signal handler may call it)."""
        self._stopped = True
        if self._feed is not None:
            self._feed.stop()

    def _work(self, runner: Runner, feed: Feed) -> None:
        """One decoder's loop: admit new images' rows when enough rows are free, else step every row."""
        rows: list[Row] = []
        error = None
        runner.blocks.resize(runner.blocks.count)  # a fresh pool: nothing left from an earlier run
        try:
            while not feed.stopped:
                limit = rows_wanted(self.batch_size, feed.started)
                if not rows or limit - len(rows) >= admit_at(self.batch_size):
                    work = feed.take(runner, limit - len(rows), wait=not rows)
                    if work is None and not rows:
                        break
                    if work:
                        rows += self._choose(runner, feed, *runner.admit(work))
                        continue
                if rows:
                    rows = self._choose(runner, feed, rows, runner.step(rows, np.array([r.next_token for r in rows])))
        except BaseException as e:  # noqa: BLE001 - given to the caller's thread
            error = e
        finally:
            feed.finish(error)

    def _choose(self, runner: Runner, feed: Feed, rows: list[Row], logits: np.ndarray) -> list[Row]:
        """Each row's next token; rows that stop are given back. Returns the rows still running."""
        cfg, eos = self.cfg, self.model.eos_token_id
        started = time.perf_counter()
        early = [j for j, r in enumerate(rows) if len(r.generation.token_ids) < cfg.min_new_tokens]
        tokens, logprobs = greedy(logits, eos, early)
        self.times.add("token_scores", started)
        running = []
        for row, token, logprob in zip(rows, tokens, logprobs):
            generation = row.generation
            if token == eos:
                generation.stopped_by_eos = True
            else:
                generation.token_ids.append(int(token))
                generation.token_logprobs.append(float(logprob))
                if len(generation.token_ids) < cfg.max_new_tokens:
                    row.next_token = int(token)
                    running.append(row)
                    continue
            runner.release(row)
            feed.put(row.index, generation)
        return running
