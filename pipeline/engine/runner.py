"""One decoder's model calls: encode images, prefill prompts, step rows; each returns logits.

Every Kosmos-2 prompt starts with the same image prefix (`<s><image>` and the placeholders), which
differs only by the image's embeddings. Its whole blocks are prefilled once per image in a first
call, and every prompt on the image reads them: the phrases of a class list share them. A second call
prefills the rest of each prompt (the last placeholders, `</image>`, the text), so every prompt goes
through the same two calls whatever else is admitted with it.
"""

from __future__ import annotations

import time

import numpy as np

from pipeline.engine.blocks import Blocks, Prefix
from pipeline.engine.request import Generation, Request, Row
from pipeline.engine.timing import StageTimes
from pipeline.model.prompt import POOL_PROMPT_TOKENS
from pipeline.model.runtime import KosmosModel

# Images per graph call: a call's intermediate tensors grow with its images and OpenVINO keeps them at
# their largest, while per image the calls cost the same (docs/performance/defaults.md, "Memory").
IMAGES_PER_CALL = 8


def _parts(items: list) -> list[list]:
    """`items` in runs of at most IMAGES_PER_CALL."""
    return [items[i : i + IMAGES_PER_CALL] for i in range(0, len(items), IMAGES_PER_CALL)]


class Runner:
    """One paged decoder request, its image encoder and token embedder, its cache blocks and rows.

    `admit(work)` encodes the distinct images of new requests and prefills their prompts, and
    `step(rows, tokens)` feeds each row one token; both return one row of logits per row.
    """

    def __init__(self, model: KosmosModel, max_new_tokens: int, rows: int, times: StageTimes | None = None):
        self.model, self.max_new_tokens = model, max_new_tokens
        self.times = times or StageTimes()
        self.image_encoder = model.image_encoder.create_infer_request()
        self.token_embedder = model.token_embedder.create_infer_request()
        self.text_decoder = model.text_decoder.create_infer_request()
        self.blocks = Blocks(self.text_decoder, model.text_decoder)
        self.encoder_warm = False  # the image encoder has run once: its mapped weights are released
        self.blocks.resize(rows * self.blocks.needed(POOL_PROMPT_TOKENS + max_new_tokens))

    def warm_up(self) -> None:
        """Run the decoder once, on one token, and release the mapped weights: OpenVINO copies a
        graph's weights into its kernels' layout at its first call, and from then on the files'
        pages are only a second copy in memory. The image encoder's first call is the first image's
        (see admit), not a blank image's, which would cost a whole encoding before the first row. The
        decoder goes first, so its two copies are never in memory beside the image encoder's copy."""
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
        images = [0] + [k for k in range(1, len(work)) if work[k][1].pixel_values is not work[k - 1][1].pixel_values]
        parts = _parts(images)
        started = time.perf_counter()
        embeds = []
        for part in parts:
            self.image_encoder.infer(
                {0: np.stack([work[k][1].pixel_values for k in part]).astype(np.float32, copy=False)}
            )
            embeds += list(self.image_encoder.get_output_tensor(0).data.copy())
            if not self.encoder_warm:  # its weights are in the kernels' layout now (warm_up)
                self.model.release_mapped_files()
                self.encoder_warm = True
        self.times.add("vision", started)
        self.times.add_count("images_encoded", len(images))

        started = time.perf_counter()
        prefixes = {k: (Prefix(self.blocks.take(shared // self.blocks.size)), e) for k, e in zip(images, embeds)}
        rows, chunks = [], []
        for k, (index, request) in enumerate(work):  # one image's requests are consecutive: each image its own prefix
            prompt = self.model.encode_prompt(request.prompt)
            if self._shared(request.prompt) != shared:
                raise ValueError("prompts admitted together must share the image prefix <s><image>...")
            if k in prefixes:
                prefix, image_embeds = prefixes[k]
            prefix.rows += 1
            own = self.blocks.needed(len(prompt.input_ids) + self.max_new_tokens) - len(prefix.blocks)
            rows.append(Row(index, request, Generation(request.tag, prompt.input_ids), prefix, [], own))
            chunk = self.embed(prompt.input_ids)
            chunk[prompt.image_mask] = image_embeds
            chunks.append(chunk)
        for part in parts if shared else []:  # the images' shared blocks, once each
            self._call([chunks[k][:shared] for k in part], [0] * len(part), [prefixes[k][0].blocks for k in part])
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
        row.prefix.rows -= 1
        if row.prefix.rows == 0:
            self.blocks.give(row.prefix.blocks)
            row.prefix.blocks = []

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
        (the first image, a run's last row) got other logits than among other rows. So a lone token
        goes with a copy of itself in the scratch block, whose logits are dropped."""
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
