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
from collections import deque
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
    pixel_values: np.ndarray  # float32 [3, H, W], as the image processor makes it
    prompt: str
    tag: Any = None  # carried through to the Generation untouched


@dataclass
class Generation:
    tag: Any
    prompt_ids: np.ndarray  # the full prompt, image placeholders included
    token_ids: list[int] = field(default_factory=list)  # generated, end-of-sequence excluded
    stopped_by_eos: bool = False


def default_batch_size() -> int:
    return 8


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
        self.num_requests = cfg.num_requests or model.optimal_requests
        self._slots: queue.Queue[_Slot] = queue.Queue()
        for _ in range(self.num_requests):
            self._slots.put(_Slot(model))
        log.info("Engine: batch_size=%d, %d requests in flight", self.batch_size, self.num_requests)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Stream generations in input order, keeping every request slot busy.

        At most one batch waits beyond those running, so memory stays bounded however long the input.
        """
        it = iter(requests)
        pool = ThreadPoolExecutor(self.num_requests, thread_name_prefix="kosmos-engine")
        pending: deque = deque()
        try:
            while batch := list(islice(it, self.batch_size)):
                pending.append(pool.submit(self._run_batch, batch))
                while len(pending) > self.num_requests:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _run_batch(self, batch: list[Request]) -> list[Generation]:
        slot = self._slots.get()
        try:
            return self._generate(slot, batch)
        finally:
            self._slots.put(slot)

    def _generate(self, slot: _Slot, batch: list[Request]) -> list[Generation]:
        model, cfg = self.model, self.cfg
        pad, eos = model.pad_token_id, model.eos_token_id
        prompts = [model.encode_prompt(r.prompt) for r in batch]
        rows, length = len(batch), max(len(p.input_ids) for p in prompts)

        # Left-pad the prompts into one batch.
        input_ids = np.full((rows, length), pad, dtype=np.int64)
        attention = np.zeros((rows, length), dtype=np.int64)
        image_mask = np.zeros((rows, length), dtype=bool)
        for i, p in enumerate(prompts):
            n = len(p.input_ids)
            input_ids[i, length - n :] = p.input_ids
            attention[i, length - n :] = 1
            image_mask[i, length - n :] = p.image_mask

        slot.image_encoder.infer({0: np.stack([r.pixel_values for r in batch]).astype(np.float32, copy=False)})
        image_embeds = slot.image_encoder.get_output_tensor(0).data
        embeds = slot.embed(input_ids)
        embeds[image_mask] = image_embeds.reshape(-1, embeds.shape[-1])

        # Kosmos-2 positions: padding_idx + running count of non-pad tokens; pads sit at padding_idx.
        counted = (attention == 1) & (input_ids != pad)
        positions = np.where(counted, pad + np.cumsum(counted, axis=1), pad)
        cache_len = attention.sum(axis=1)  # real tokens in each row's cache, as transformers counts them

        slot.text_decoder.reset_state()
        logits = slot.decode(embeds, attention, positions, np.arange(rows))

        results = [Generation(tag=r.tag, prompt_ids=p.input_ids) for r, p in zip(batch, prompts)]
        active = np.arange(rows)  # batch row of each row in the decoder's state
        for step in range(cfg.max_new_tokens):
            if step < cfg.min_new_tokens:
                logits = logits.copy()
                logits[:, eos] = -np.inf
            tokens = logits.argmax(axis=-1)
            keep = []
            for j, (row, token) in enumerate(zip(active, tokens)):
                if token == eos:
                    results[row].stopped_by_eos = True
                    continue
                results[row].token_ids.append(int(token))
                if len(results[row].token_ids) < cfg.max_new_tokens:
                    keep.append(j)
            if not keep:
                break
            keep = np.asarray(keep)
            active, tokens = active[keep], tokens[keep]
            attention = np.concatenate([attention[keep], np.ones((len(keep), 1), dtype=np.int64)], axis=1)
            step_positions = np.where(tokens == pad, pad, pad + 1 + cache_len[active])[:, None]
            cache_len[active] += 1
            logits = slot.decode(slot.embed(tokens[:, None]), attention, step_positions, keep)
        return results
