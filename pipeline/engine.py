"""Greedy generation for micro-batches of images on a pool of OpenVINO infer requests.

Decoding a large decoder on CPU is bound by reading its weights once per step, so many sequences
share each step: prompts are left-padded into one batch, finished rows leave the KV cache through
`beam_idx`, and several batches are in flight at once (one per request slot, each driven by its own
thread; OpenVINO releases the GIL while a request runs). Results come back in input order.

An image's result never depends on its batch: position ids count real tokens only, exactly as
transformers computes them for that image alone.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np

from pipeline.config import EngineConfig
from pipeline.model import KosmosModel

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One image to caption. A request without pixel values (an item that failed before the engine)
    passes through untouched, so the caller gets exactly one Generation per Request, in order."""

    pixel_values: np.ndarray | None  # float32 [3, H, W], as the image processor makes it
    prompt: str
    tag: Any = None  # carried through to the Generation untouched


@dataclass
class Generation:
    tag: Any
    prompt_ids: np.ndarray | None  # the full prompt, image placeholders included; None if passed through
    token_ids: list[int] = field(default_factory=list)  # generated, end-of-sequence excluded
    # log-probability of each of token_ids under the model (log-softmax over the whole vocabulary at
    # its step, after min_new_tokens has masked end-of-sequence, as transformers' processed scores)
    token_logprobs: list[float] = field(default_factory=list)
    stopped_by_eos: bool = False


FIRST_BATCH = 4


def default_batch_size() -> int:
    """16 rows share each decoder step: measured 1.16x faster end to end than 8 on 2 cores (int8),
    since a step costs about the same for 8 or 16 rows (it is bound by reading the weights)."""
    return 16


class StageTimes:
    """Busy seconds per stage, summed over the threads that run them (so they can exceed wall time)."""

    def __init__(self):
        self.seconds: Counter = Counter()
        self.counts: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, stage: str, started: float) -> None:
        with self._lock:
            self.seconds[stage] += time.perf_counter() - started

    def add_count(self, name: str, n: int) -> None:
        with self._lock:
            self.counts[name] += n


class _Slot:
    """One request per graph: the unit that one batch occupies from image to last token."""

    def __init__(self, model: KosmosModel):
        self.image_encoder = model.image_encoder.create_infer_request()
        self.token_embedder = model.token_embedder.create_infer_request()
        self.text_decoder = model.text_decoder.create_infer_request()

    def embed(self, ids: np.ndarray) -> np.ndarray:
        self.token_embedder.infer({"input_ids": ids})
        return self.token_embedder.get_output_tensor(0).data.copy()

    def decode(self, embeds, attention_mask, position_ids, beam_idx) -> np.ndarray:
        """One decoder call; returns a view of the last-position logits (valid until the next call)."""
        self.text_decoder.infer(
            {
                "inputs_embeds": embeds,
                "attention_mask": attention_mask,
                "position_ids": position_ids,
                "beam_idx": beam_idx.astype(np.int32),
            }
        )
        return self.text_decoder.get_output_tensor(0).data


class Engine:
    def __init__(self, model: KosmosModel, cfg: EngineConfig):
        self.model = model
        self.cfg = cfg
        self.batch_size = cfg.batch_size or default_batch_size()
        self.num_requests = model.num_requests
        self.times = StageTimes()
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(self.num_requests):
            self._slots.put(_Slot(model))
        log.info("Engine: batch_size=%d, %d requests in flight", self.batch_size, self.num_requests)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Stream generations in input order, keeping every request slot busy.

        At most one batch waits beyond those running, so memory stays bounded however long the input.
        """
        pool = ThreadPoolExecutor(self.num_requests, thread_name_prefix="kosmos-engine")
        pending: deque = deque()
        try:
            for batch in self._batches(iter(requests)):
                pending.append(pool.submit(self._run_batch, batch))
                while len(pending) > self.num_requests:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _batches(self, it: Iterator[Request]) -> Iterator[list[Request]]:
        """Batches of `batch_size`, after a first one of 4: the first rows come out in seconds instead
        of after a whole large batch (measured: warm start to first row 17.5 s -> 8.7 s). A batch takes
        in the rest of its last image's requests (a class list), so each image is encoded and its
        prefix prefilled once."""
        size, held = min(self.batch_size, FIRST_BATCH), []
        while batch := held + list(islice(it, size - len(held))):
            held = []
            for r in it:
                if r.pixel_values is None or r.pixel_values is not batch[-1].pixel_values:
                    held = [r]
                    break
                batch.append(r)
            yield batch
            size = self.batch_size

    def _run_batch(self, batch: list[Request]) -> list[Generation]:
        work = [r for r in batch if r.pixel_values is not None]
        done = iter(())
        if work:
            slot = self._slots.get()
            try:
                done = iter(self._generate(slot, work))
            finally:
                self._slots.put(slot)
        return [next(done) if r.pixel_values is not None else Generation(r.tag, None) for r in batch]

    def _generate(self, slot: _Slot, batch: list[Request]) -> list[Generation]:
        cfg, eos = self.cfg, self.model.eos_token_id
        seqs = Sequences(self.model, slot, batch, self.times)
        results = [Generation(tag=r.tag, prompt_ids=ids) for r, ids in zip(batch, seqs.prompt_ids)]
        logits = seqs.prefill()
        for step in range(cfg.max_new_tokens):
            if step < cfg.min_new_tokens:
                logits = logits.copy()
                logits[:, eos] = -np.inf
            tokens, logprobs = self._greedy(logits)
            keep = []
            for j, (row, token) in enumerate(zip(seqs.rows, tokens)):
                if token == eos:
                    results[row].stopped_by_eos = True
                    continue
                results[row].token_ids.append(int(token))
                results[row].token_logprobs.append(float(logprobs[j]))
                if len(results[row].token_ids) < cfg.max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            logits = seqs.step(np.asarray(keep), tokens[keep])
        return results

    def _greedy(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's most likely token and its log-probability: the chosen logit less the row's
        log-sum-exp (about 1 ms for 16 rows of the real vocabulary, under 2 % of a decoder step)."""
        started = time.perf_counter()
        tokens = logits.argmax(axis=-1)
        best = logits[np.arange(len(tokens)), tokens]
        logprobs = -np.log(np.exp(logits - best[:, None]).sum(axis=-1))
        self.times.add("token_scores", started)
        return tokens, logprobs


class Sequences:
    """One batch's decoder state on one slot: attention mask, positions, rows still in the KV cache.

    `prefill()` runs the prompts; each `step(keep, tokens)` keeps the listed rows (indices into the
    current rows; the others leave the cache through `beam_idx`) and feeds them one token each. Both
    return a view of the last-position logits, one row per current row.

    Every Kosmos-2 prompt starts with the same image prefix (`<s><image>` and 64 placeholders, 65
    tokens), which differs only by the image's embeddings. The prefill runs it once per distinct image,
    then the rest of each prompt (`</image>` and its text, left-padded) on a cache whose rows
    `beam_idx` copies from that image's row: the K phrases of a class list share one prefix.
    """

    def __init__(self, model: KosmosModel, slot: _Slot, batch: list[Request], times: StageTimes | None = None):
        self.model, self.slot, self.batch = model, slot, batch
        self.times = times or StageTimes()
        prompts = [model.encode_prompt(r.prompt) for r in batch]
        self.prompt_ids = [p.input_ids for p in prompts]
        n = int(np.flatnonzero(prompts[0].image_mask)[-1]) + 1
        self.prefix, self.prefix_mask = prompts[0].input_ids[:n], prompts[0].image_mask[:n]
        if any(not np.array_equal(p.input_ids[:n], self.prefix) for p in prompts):
            raise ValueError("prompts of one batch must share the image prefix <s><image>...")
        distinct: dict[int, int] = {}  # id of a pixel array -> its row in the prefix's cache
        self.pixels = []  # each distinct image once
        for r in batch:
            if id(r.pixel_values) not in distinct:
                distinct[id(r.pixel_values)] = len(self.pixels)
                self.pixels.append(r.pixel_values)
        self.image_row = np.array([distinct[id(r.pixel_values)] for r in batch], np.int32)
        texts = [p.input_ids[len(self.prefix) :] for p in prompts]
        rows, length, pad = len(batch), max(len(t) for t in texts), model.pad_token_id
        self.input_ids = np.full((rows, length), pad, dtype=np.int64)  # the texts, left-padded
        self.attention = np.zeros((rows, len(self.prefix) + length), dtype=np.int64)
        self.attention[:, : len(self.prefix)] = 1
        for i, text in enumerate(texts):
            self.input_ids[i, length - len(text) :] = text
            self.attention[i, self.attention.shape[1] - len(text) :] = 1
        self.rows = np.arange(rows)  # batch row of each row in the decoder's state
        self.cache_len = self.attention.sum(axis=1)  # tokens in each row's cache, as transformers counts them

    def prefill(self) -> np.ndarray:
        slot, pad = self.slot, self.model.pad_token_id
        started = time.perf_counter()
        slot.image_encoder.infer({0: np.stack(self.pixels).astype(np.float32, copy=False)})
        image_embeds = slot.image_encoder.get_output_tensor(0).data
        self.times.add("vision", started)
        self.times.add_count("images_encoded", len(self.pixels))
        started = time.perf_counter()
        # Kosmos-2 positions: padding_idx + running count of non-pad tokens; pads sit at padding_idx.
        n, images = len(self.prefix), len(self.pixels)
        ids = np.concatenate([np.broadcast_to(self.prefix, (len(self.batch), n)), self.input_ids], axis=1)
        counted = (self.attention == 1) & (ids != pad)
        positions = np.where(counted, pad + np.cumsum(counted, axis=1), pad)
        prefix = np.repeat(slot.embed(self.prefix[None]), images, axis=0)
        prefix[:, self.prefix_mask] = image_embeds
        slot.text_decoder.reset_state()
        slot.decode(prefix, np.ones((images, n), np.int64), np.repeat(positions[:1, :n], images, axis=0), np.arange(images))
        logits = slot.decode(slot.embed(self.input_ids), self.attention, positions[:, n:], self.image_row)
        self.times.add("prefill", started)
        return logits

    def step(self, keep: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        pad, started = self.model.pad_token_id, time.perf_counter()
        self.rows = self.rows[keep]
        self.attention = np.concatenate([self.attention[keep], np.ones((len(keep), 1), np.int64)], axis=1)
        # transformers' decode-step position: padding_idx + 1 + tokens already cached (pad ids sit at padding_idx).
        positions = np.where(tokens == pad, pad, pad + 1 + self.cache_len[self.rows])[:, None]
        self.cache_len[self.rows] += 1
        logits = self.slot.decode(self.slot.embed(tokens[:, None].astype(np.int64)), self.attention, positions, keep)
        self.times.add("decode_steps", started)
        return logits
