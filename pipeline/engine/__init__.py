"""Continuous batching on OpenVINO's paged attention: the KV blocks (blocks), the model calls
(runner), what runs next (scheduler), the token choice (sampler), and the loop that drives them (core)."""

from pipeline.engine.core import Engine
from pipeline.engine.request import Generation, Request

__all__ = ["Engine", "Generation", "Request"]
