"""Typed config schemas. Registered in Hydra's ConfigStore so that a misspelt key or a bad
value fails at start-up with its name, before any model is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

WEIGHT_FORMATS = ("fp32", "fp16", "int8", "int4")
PRECISIONS = ("auto", "f32", "bf16")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key and what to do."""


@dataclass
class ModelConfig:
    # Hugging Face hub id, or a local folder written by `save_pretrained`.
    source: str = "microsoft/kosmos-2-patch14-224"
    # Hub revision (branch, tag or commit) to pin; None takes the default branch.
    revision: str | None = None
    # Where the OpenVINO export lives; None = a per-user cache folder keyed by source and format.
    dir: str | None = None
    # fp32 | fp16 | int8 | int4 (int8/int4: NNCF weight compression).
    weight_format: str = "int8"

    def validate(self) -> None:
        if self.weight_format not in WEIGHT_FORMATS:
            raise ConfigError(
                f"model.weight_format={self.weight_format!r} is not one of {', '.join(WEIGHT_FORMATS)}"
            )
        if not self.source:
            raise ConfigError("model.source is empty: give a hub id or a local checkpoint folder")


@dataclass
class EngineConfig:
    device: str = "CPU"
    # auto | f32 | bf16: OpenVINO's inference precision and KV-cache precision.
    precision: str = "auto"
    # Images per micro-batch; 0 = derived from the machine.
    batch_size: int = 0
    # Batches in flight on the infer-request pool; 0 = OpenVINO's optimal number.
    num_requests: int = 0
    max_new_tokens: int = 128
    # Mirrors transformers' min_new_tokens: end-of-sequence is suppressed until this many.
    min_new_tokens: int = 0
    # Compiled-blob cache (OpenVINO CACHE_DIR); None = inside model.dir.
    cache_dir: str | None = None

    def validate(self) -> None:
        if self.precision not in PRECISIONS:
            raise ConfigError(f"engine.precision={self.precision!r} is not one of {', '.join(PRECISIONS)}")
        for key in ("batch_size", "num_requests", "min_new_tokens"):
            if getattr(self, key) < 0:
                raise ConfigError(f"engine.{key}={getattr(self, key)} must be >= 0")
        if self.max_new_tokens < 1:
            raise ConfigError(f"engine.max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.min_new_tokens > self.max_new_tokens:
            raise ConfigError(
                f"engine.min_new_tokens={self.min_new_tokens} exceeds engine.max_new_tokens={self.max_new_tokens}"
            )


@dataclass
class AppConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    prompt: str = "<grounding>An image of"


def register() -> None:
    ConfigStore.instance().store(name="schema", node=AppConfig)


register()
