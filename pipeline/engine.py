"""Greedy generation with continuous batching on OpenVINO's paged attention.

A decoder step reads all of its weights once whatever its rows, so many sequences share each
step. Captions stop at different steps: a row that stops leaves the decoder at once and a
new image's rows take its place, so the decoder keeps `batch_size` rows busy and no image waits for a
neighbour's long caption. The KV cache is a pool of fixed-size blocks (model.paged_decoder): a row
holds the blocks its tokens fill, prompts need no padding, and rows join or leave between any two
calls. Each of `num_requests` decoders runs its own rows on its own thread (OpenVINO releases the GIL
while a request runs); results come back in input order.

An image's tokens never depend on its neighbours: every row's attention reads only its own blocks,
its positions count its own tokens exactly as transformers does for that image alone, and every
prompt goes through the same two prefill calls whatever else is admitted with it.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.config import EngineConfig
from pipeline.model import KosmosModel, cpu_has

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


FIRST_ROWS = 1
IMAGES_PER_CALL = 8


def _parts(items: list) -> list[list]:
    """`items` in runs of at most IMAGES_PER_CALL images: a call's intermediate tensors grow with its
    images and OpenVINO keeps them at their largest, so one call of 28 images (an admission that
    fills the batch) held ~0.45 GB more for the rest of the run than calls of 8; per image the
    calls cost the same (bench/profile_ops.py)."""
    return [items[i : i + IMAGES_PER_CALL] for i in range(0, len(items), IMAGES_PER_CALL)]


def default_batch_size(device: str = "CPU") -> int:
    """Rows that share each decoder step: 32, or 16 on a CPU without AVX-512.

    A step reads every weight once for all its rows, so a row costs less the more rows share it
    (8.2 ms a row at 16, 6.3 at 32, 5.7 at 64 on 2 cores of an AMD EPYC with AVX-512:
    bench/profile_ops.py); with rows replaced as they stop, 32 ran captions of real lengths 1.03x
    faster than 16, and 64 rows 1.03x faster than 32 for twice the KV cache (bench/real_lengths.py,
    2 cores); the issue's 16-core AMX machine ran one stream fastest at 64 rows, and 32 within 8 %.
    With AVX2 only, a step's products run in f32 at the cores' peak whatever the rows (39 ms a row at
    8, 35 at 16, 31 at 32: bench/results/profile_ops-rows-avx2-20261207.txt): against 32, 16 rows
    ran real lengths 1.00x, class lists 1.03x and fixed lengths 0.93x, and over 64 photos peaked at
    3.0 GB against 3.7, the f32 KV cache halved (bench/results/rows-avx2-20261207.txt,
    class_lists-avx2-rows-20261207.txt, rss-avx2-rows-20261207.txt)."""
    return 16 if device == "CPU" and not cpu_has("avx512f") else 32


def admit_at(batch_size: int) -> int:
    """Free rows that make an admission worth its two prefill calls (each reads every weight once).
    A quarter, a half and an eighth of 32 rows ran captions of real lengths within 2 %, inside the
    spread between runs (bench/results/admission-20261203.txt, 2 cores)."""
    return max(1, batch_size // 4)


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


@dataclass(eq=False)
class _Image:
    """An image's prefix in the cache: whole blocks that every prompt on the image reads."""

    blocks: list[int]
    rows: int = 0  # rows still reading the blocks


@dataclass(eq=False)
class Row:
    """One prompt's sequence in the paged cache."""

    index: int  # its request's place in the input
    request: Request
    generation: Generation
    image: _Image
    blocks: list[int]  # its own blocks, after the image's
    reserved: int  # its own blocks not yet taken: its longest possible sequence fits when admitted
    length: int = 0  # tokens in the cache
    next_token: int = -1  # chosen, not yet fed

    @property
    def table(self) -> list[int]:
        return self.image.blocks + self.blocks


class Blocks:
    """The KV-cache blocks of one decoder request, with a free list.

    A row reserves the blocks of its longest possible sequence when it is admitted and takes them as
    its tokens fill them, so a row never waits for a block and pages that are never written are never
    touched (the most recently freed block is handed out first).
    """

    def __init__(self, request, compiled):
        self.request, self.inputs = request, [i for i in compiled.inputs if i.get_any_name().split(".")[0] in ("key_cache", "value_cache")]
        shape = self.inputs[0].get_partial_shape()
        self.size = shape[2].get_length()  # tokens a block holds: [blocks, heads, block, head size]

    def resize(self, count: int) -> None:
        """New tensors of `count` blocks and a scratch block after them; only while no row holds any."""
        import openvino as ov

        for port in self.inputs:
            dims = [d.get_length() for d in list(port.get_partial_shape())[1:]]
            self.request.set_tensor(port, ov.Tensor(port.get_element_type(), [count + 1, *dims]))
        self.count, self.free, self.unreserved = count, list(range(count - 1, -1, -1)), count
        self.scratch = count

    def needed(self, tokens: int) -> int:
        return math.ceil(tokens / self.size)

    def reserve(self, n: int) -> bool:
        if n > self.unreserved:
            return False
        self.unreserved -= n
        return True

    def take(self, n: int) -> list[int]:
        return [self.free.pop() for _ in range(n)]

    def give(self, blocks: list[int], reserved: int = 0) -> None:
        self.free.extend(reversed(blocks))
        self.unreserved += len(blocks) + reserved


class Decoder:
    """One paged decoder request, its image encoder and token embedder, its cache blocks and rows.

    `admit(work)` encodes the distinct images of new requests and prefills their prompts, and
    `step(rows, tokens)` feeds each row one token; both return one row of logits per row.

    Every Kosmos-2 prompt starts with the same image prefix (`<s><image>` and 64 placeholders), which
    differs only by the image's embeddings. Its whole blocks (64 tokens) are prefilled once per image
    in a first call, and every prompt on the image reads them: the K phrases of a class list share
    them. A second call prefills the rest of each prompt (the last placeholders, `</image>`, the text).
    """

    def __init__(self, model: KosmosModel, max_new_tokens: int, rows: int, times: StageTimes | None = None):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.times = times or StageTimes()
        self.image_encoder = model.image_encoder.create_infer_request()
        self.token_embedder = model.token_embedder.create_infer_request()
        self.text_decoder = model.text_decoder.create_infer_request()
        self.blocks = Blocks(self.text_decoder, model.text_decoder)
        self.encoder_warm = False  # the image encoder has run once: its mapped weights are released
        self.blocks.resize(rows * self.blocks.needed(96 + max_new_tokens))  # a caption's prompt is 71 tokens

    def warm_up(self) -> None:
        """Run the decoder once, on one token, and release the mapped weights: OpenVINO copies a
        graph's weights into its kernels' layout at its first call, and from then on the files'
        pages are only a second copy in memory. The image encoder's first call is the first image's
        (see admit): a blank image there cost a whole image's encoding before the first row (1.7 s
        with AVX2 only). The decoder goes first, so its two copies are never in memory beside the
        image encoder's copy."""
        self.blocks.reserve(1)
        blocks = self.blocks.take(1)
        self._call([self.embed(np.array([self.model.pad_token_id]))], [0], [blocks])
        self.blocks.give(blocks)
        self.model.release_mapped_files()

    def reserve(self, requests: list[Request]) -> bool:
        """Reserve the blocks that one image's requests can come to fill: the image's shared blocks
        and each row's own. An empty pool too small for them grows first."""
        lengths = [len(self.model.encode_prompt(r.prompt).input_ids) for r in requests]
        shared = self._shared(requests[0].prompt) // self.blocks.size
        need = shared + sum(self.blocks.needed(n + self.max_new_tokens) - shared for n in lengths)
        if need > self.blocks.count and self.blocks.unreserved == self.blocks.count:
            self.blocks.resize(need)
        return self.blocks.reserve(need)

    def _shared(self, prompt: str) -> int:
        """Tokens of the image prefix in whole blocks: what the prompts on one image share."""
        mask = self.model.encode_prompt(prompt).image_mask
        return (int(np.flatnonzero(mask)[-1]) + 1) // self.blocks.size * self.blocks.size

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings [len(ids), D]: one lookup per token, so any number at once."""
        self.token_embedder.infer({"input_ids": np.asarray(ids, np.int64)[None]})
        return self.token_embedder.get_output_tensor(0).data[0].copy()

    def admit(self, work: list[tuple[int, Request]]) -> tuple[list[Row], np.ndarray]:
        """Rows for `work` (index, request), whose blocks the caller has reserved, and their first logits."""
        shared = self._shared(work[0][1].prompt)
        groups = [0] + [k for k in range(1, len(work)) if work[k][1].pixel_values is not work[k - 1][1].pixel_values]
        parts = _parts(groups)
        started = time.perf_counter()
        embeds = []
        for part in parts:
            self.image_encoder.infer({0: np.stack([work[k][1].pixel_values for k in part]).astype(np.float32, copy=False)})
            embeds += list(self.image_encoder.get_output_tensor(0).data.copy())
            if not self.encoder_warm:  # its weights are in the kernels' layout now (warm_up)
                self.model.release_mapped_files()
                self.encoder_warm = True
        self.times.add("vision", started)
        self.times.add_count("images_encoded", len(groups))

        started = time.perf_counter()
        images = {k: (_Image(self.blocks.take(shared // self.blocks.size)), e) for k, e in zip(groups, embeds)}
        rows, chunks = [], []
        for k, (index, request) in enumerate(work):  # one image's requests are consecutive: each image its own prefix
            prompt = self.model.encode_prompt(request.prompt)
            if self._shared(request.prompt) != shared:
                raise ValueError("prompts admitted together must share the image prefix <s><image>...")
            if k in images:
                image, image_embeds = images[k]
            image.rows += 1
            own = self.blocks.needed(len(prompt.input_ids) + self.max_new_tokens) - len(image.blocks)
            row = Row(index, request, Generation(request.tag, prompt.input_ids), image, [], own)
            chunk = self.embed(prompt.input_ids)
            chunk[prompt.image_mask] = image_embeds
            rows.append(row)
            chunks.append(chunk)
        for part in parts if shared else []:  # the images' shared blocks, once each
            self._call([chunks[k][:shared] for k in part], [0] * len(part), [images[k][0].blocks for k in part])
        for row in rows:
            row.length = shared
        logits = self._feed(rows, [c[shared:] for c in chunks])
        self.times.add("prefill", started)
        return rows, logits

    def step(self, rows: list[Row], tokens: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        embeds = self.embed(tokens)
        logits = self._feed(rows, [embeds[j : j + 1] for j in range(len(rows))])
        self.times.add("decode_steps", started)
        return logits

    def release(self, row: Row) -> None:
        self.blocks.give(row.blocks, row.reserved)
        row.blocks, row.reserved = [], 0
        row.image.rows -= 1
        if row.image.rows == 0:
            self.blocks.give(row.image.blocks)
            row.image.blocks = []

    def _feed(self, rows: list[Row], chunks: list[np.ndarray]) -> np.ndarray:
        """Append each row's chunk to its sequence (taking blocks as they fill); its last token's logits."""
        past = [row.length for row in rows]
        for row, chunk in zip(rows, chunks):
            row.length += len(chunk)
            more = self.blocks.needed(row.length) - len(row.table)
            if more > 0:
                row.blocks += self.blocks.take(more)
                row.reserved -= more
        return self._call(chunks, past, [row.table for row in rows])

    def _call(self, chunks: list[np.ndarray], past: list[int], tables: list[list[int]]) -> np.ndarray:
        """One decoder call on several sequences' new tokens, laid end to end; a view of each
        sequence's last-token logits, valid until the next call. Kosmos-2 positions are
        padding_idx + 1 + the token's place in its sequence.

        OpenVINO computes a call of a single token apart from calls of several: a row decoding alone
        (the first image, a run's last row) got logits up to 0.06 off those it gets among other rows
        (an Intel Xeon with AMX, full-size int8; equal among 2 to 31). So a lone token goes with a
        copy of itself in the scratch block, whose logits are dropped."""
        if len(chunks) == 1 and len(chunks[0]) == 1:
            return self._call(chunks * 2, [*past, 0], [*tables, [self.blocks.scratch]])[:1]
        ends = np.cumsum([len(c) for c in chunks])
        first = self.model.pad_token_id + 1
        self.text_decoder.infer(
            {
                "inputs_embeds": np.concatenate(chunks),
                "position_ids": np.concatenate([np.arange(p, p + len(c)) for p, c in zip(past, chunks)]) + first,
                "past_lens": np.array(past, np.int32),
                "subsequence_begins": np.concatenate([[0], ends]).astype(np.int32),
                "block_indices": np.concatenate(tables).astype(np.int32),
                "block_indices_begins": np.cumsum([0] + [len(t) for t in tables]).astype(np.int32),
                "max_context_len": np.array(max(p + len(c) for p, c in zip(past, chunks)), np.int32),
                "logits_indices": (ends - 1).astype(np.int32),
            }
        )
        return self.text_decoder.get_output_tensor(0).data


class _Feed:
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
        self._results = threading.Condition()
        self._done: dict[int, Generation] = {}
        self._next = 0  # the next index to give back
        self._running = decoders  # decoder threads still at work
        self.error: BaseException | None = None
        self.stopped = False
        self.started = False  # the first result is done

    def take(self, decoder: Decoder, rows: int, wait: bool) -> list[tuple[int, Request]] | None:
        """Whole images' requests for `decoder`: at most `rows` of them and as many as its blocks can
        hold; None once the input is finished. With `wait` (the decoder has no rows) one image goes
        in whatever its size, after waiting for room in the window if need be."""
        with self._read:
            work: list[tuple[int, Request]] = []
            while (group := self._peek()) is not None:
                alone = wait and not work
                if not alone and len(work) + len(group) > rows:
                    break
                if not self._room(len(group), alone) or not decoder.reserve(group):
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
        while True:
            with self._results:
                while self._next not in self._done and self._running and self.error is None:
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
        with self._results:
            self.stopped = True
            self._results.notify_all()


class Engine:
    def __init__(self, model: KosmosModel, cfg: EngineConfig):
        self.model = model
        self.cfg = cfg
        self.batch_size = cfg.batch_size or default_batch_size(cfg.device)
        self.num_requests = model.num_requests
        self.times = StageTimes()
        self.decoders = [Decoder(model, cfg.max_new_tokens, self.batch_size, self.times) for _ in range(self.num_requests)]
        self.decoders[0].warm_up()  # the decoders share the compiled graphs: once is enough
        log.info("Engine: %d rows per decoder step, %d decoders", self.batch_size, self.num_requests)

    def generate(self, requests: Iterable[Request]) -> Iterator[Generation]:
        """Stream generations in input order, every decoder on its own thread."""
        feed = _Feed(requests, 4 * self.batch_size * self.num_requests, len(self.decoders))
        threads = [
            threading.Thread(target=self._work, args=(d, feed), name=f"kosmos-decoder-{i}", daemon=True)
            for i, d in enumerate(self.decoders)
        ]
        for t in threads:
            t.start()
        try:
            yield from feed.results()
        finally:
            feed.stop()
            for t in threads:
                t.join()

    def _work(self, decoder: Decoder, feed: _Feed) -> None:
        """One decoder's loop: admit new images' rows when enough rows are free, else step every row.
        Until the run's first result is given back it runs only FIRST_ROWS rows, so the first rows
        are written in seconds rather than after a whole batch's prefill and its longest caption: one
        row wrote the first in 6.8 s against 8.9 s for four, at the same images/s over 16 photos
        (bench/results/first_rows-20261203.txt)."""
        rows: list[Row] = []
        error = None
        decoder.blocks.resize(decoder.blocks.count)  # a fresh pool: nothing left from an earlier run
        try:
            while not feed.stopped:
                limit = self.batch_size if feed.started else min(self.batch_size, FIRST_ROWS)
                if not rows or limit - len(rows) >= admit_at(self.batch_size):
                    work = feed.take(decoder, limit - len(rows), wait=not rows)
                    if work is None and not rows:
                        break
                    if work:
                        rows += self._choose(decoder, feed, *decoder.admit(work))
                        continue
                if rows:
                    rows = self._choose(decoder, feed, rows, decoder.step(rows, np.array([r.next_token for r in rows])))
        except BaseException as e:  # noqa: BLE001 - given to the caller's thread
            error = e
        finally:
            feed.finish(error)

    def _choose(self, decoder: Decoder, feed: _Feed, rows: list[Row], logits: np.ndarray) -> list[Row]:
        """Each row's next token; rows that stop are given back. Returns the rows still running."""
        cfg, eos = self.cfg, self.model.eos_token_id
        early = [j for j, r in enumerate(rows) if len(r.generation.token_ids) < cfg.min_new_tokens]
        if early:
            logits = logits.copy()
            logits[early, eos] = -np.inf
        tokens, logprobs = self._greedy(logits)
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
            decoder.release(row)
            feed.put(row.index, generation)
        return running

    def _greedy(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's most likely token and its log-probability: the chosen logit less the row's
        log-sum-exp (about 1 ms for 16 rows of the real vocabulary, under 2 % of a decoder step)."""
        started = time.perf_counter()
        tokens = logits.argmax(axis=-1)
        best = logits[np.arange(len(tokens)), tokens]
        logprobs = -np.log(np.exp(logits - best[:, None]).sum(axis=-1))
        self.times.add("token_scores", started)
        return tokens, logprobs
