"""How a Kosmos-2 prompt is laid out, and the prompts of the tasks.

Every prompt starts with the image: `<s><image>`, one placeholder per latent query of the image
encoder, `</image>`; its text follows. The placeholders' embeddings are replaced by the image's, so
they never reach the text that captions are read from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IMAGE_TOKENS = 64  # placeholders between <image> and </image>: Kosmos-2's latent queries
IMAGE_PROMPT_TOKENS = IMAGE_TOKENS + 3  # <s> <image> ... </image>: what every prompt holds before its text
# A prompt's tokens the KV-cache pool is first sized for: the image and a short text prompt (a
# caption's is 71 tokens); a pool too small for a longer prompt grows while it is empty.
POOL_PROMPT_TOKENS = 96

CAPTION = "<grounding>An image of"
DESCRIBE = "<grounding>Describe this image in detail:"
GROUND = "<grounding><phrase> {phrase}</phrase>"  # Kosmos-2's referring-expression format


def ground(phrase: str) -> str:
    return GROUND.format(phrase=phrase.strip())


@dataclass(frozen=True)
class Prompt:
    """A prompt as the processor encodes it: `<s><image>`, the placeholders, `</image>`, the text."""

    input_ids: np.ndarray  # int64 [T]
    image_mask: np.ndarray  # bool [T], True at the placeholder positions
