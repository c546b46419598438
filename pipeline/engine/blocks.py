"""The KV cache of one decoder: a pool of fixed-size blocks that rows take and give back."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(eq=False)
class Prefix:
    """An image's prefix in the cache: whole blocks that every prompt on the image reads."""

    blocks: list[int]
    rows: int = 0  # rows still reading the blocks


class Blocks:
    """The KV-cache blocks of one decoder request, with a free list.

    A row reserves the blocks of its longest possible sequence when it is admitted and takes them as
    its tokens fill them, so a row never waits for a block and pages that are never written are never
    touched (the most recently freed block is handed out first).
    """

    def __init__(self, request, compiled):
        names = ("key_cache", "value_cache")
        self.request = request
        self.inputs = [i for i in compiled.inputs if i.get_any_name().split(".")[0] in names]
        self.size = (
            self.inputs[0].get_partial_shape()[2].get_length()
        )  # tokens a block holds: [blocks, heads, block, head size]
        self.count = self.unreserved = self.scratch = 0
        self.free: list[int] = []

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
