"""What goes into the engine and what comes out, and a request's state while it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.engine.blocks import Prefix


@dataclass
class Request:
    """One prompt on one image. A request without pixel values (an item that failed before the
    engine) passes through untouched, so the caller gets exactly one Generation per Request, in order."""

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


@dataclass(eq=False)
class Row:
    """One request's sequence in the paged cache while it runs."""

    index: int  # its request's place in the input
    request: Request
    generation: Generation
    prefix: Prefix  # the image's blocks, shared with the other prompts on the image
    blocks: list[int]  # its own blocks, after the prefix's
    reserved: int  # its own blocks not yet taken: its longest possible sequence fits when admitted
    length: int = 0  # tokens in the cache
    next_token: int = -1  # chosen, not yet fed

    @property
    def table(self) -> list[int]:
        return self.prefix.blocks + self.blocks
