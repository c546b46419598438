"""Greedy choice of each row's next token, with its log-probability."""

from __future__ import annotations

import numpy as np


def greedy(logits: np.ndarray, eos: int, early: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """Each row's most likely token and its log-probability: the chosen logit less the row's
    log-sum-exp. End of sequence is masked in the `early` rows (engine.min_new_tokens), before the
    softmax, as transformers' processed scores are."""
    if early:
        logits = logits.copy()
        logits[early, eos] = -np.inf
    tokens = logits.argmax(axis=-1)
    best = logits[np.arange(len(tokens)), tokens]
    logprobs = -np.log(np.exp(logits - best[:, None]).sum(axis=-1))
    return tokens, logprobs
