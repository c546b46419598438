"""The records that travel down the line: an input `Item`, an `Entity` found in a caption, and the
output row, whose parquet schema is the contract every reader of an output folder relies on."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa

from pipeline.errors import ConfigError


@dataclass
class Item:
    """One image to annotate, as a source yields it."""

    id: str
    source: str  # path, or manifest location (`file.parquet#row`)
    path: str | None = None  # image file to read...
    data: bytes | None = None  # ...or its bytes...
    image: Any = None  # ...or the image itself, in memory (a PIL image: the Python API)
    prompt: str | None = None  # per-item prompt, if the manifest gives one
    phrases: list[str] | None = None  # per-item phrases to ground, if the manifest gives them
    extra: dict[str, Any] = field(default_factory=dict)  # kept columns
    error: str | None = None  # set when the item itself is unusable (null path, ...)
    mine: bool = True  # False: another shard's item, maybe given by its id alone


def printable(name: str) -> str:
    """A file name as a string that UTF-8 can store: bytes that are not UTF-8 (an old Latin-1 name
    on disk, `caf\\xe9.jpg`) are written as `\\xNN`, so an id is always text and always the same."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def id_hash(item_id: str) -> int:
    """A stable 64-bit hash of an id (the same on every machine and Python): shards and the resume index."""
    return int.from_bytes(hashlib.blake2b(item_id.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


BOX_FIELDS = ("x1", "y1", "x2", "y2")


@dataclass
class Entity:
    """A phrase of the caption and the boxes the model gave it."""

    phrase: str
    start: int  # character span of `phrase` in the caption
    end: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x1, y1, x2, y2 in [0, 1]
    # Probability of each box's two patch-index tokens (their product); None where not generated.
    box_scores: list[float | None] = field(default_factory=list)
    # Probability of the generated tokens that name and open the entity: `<phrase>` ... `</phrase><object>`
    # (task=ground gives the phrase, so only `<object>`: that the model grounds it at all).
    score: float | None = None

    def as_row(self) -> dict:
        """The entity as the output schema stores it."""
        scores = self.box_scores or [None] * len(self.boxes)
        boxes = [{**dict(zip(BOX_FIELDS, b)), "score": s} for b, s in zip(self.boxes, scores)]
        return {"phrase": self.phrase, "start": self.start, "end": self.end, "score": self.score, "boxes": boxes}

    @classmethod
    def from_row(cls, row: dict) -> Entity:
        boxes = row["boxes"]
        return cls(
            row["phrase"],
            row["start"],
            row["end"],
            [tuple(b[k] for k in BOX_FIELDS) for b in boxes],
            [b.get("score") for b in boxes],
            row.get("score"),
        )


# Recorded in _settings.json: a folder holds parts of one schema (2 added the scores).
SCHEMA_VERSION = 2
BOX = pa.struct([*((k, pa.float32()) for k in BOX_FIELDS), ("score", pa.float32())])
ENTITY = pa.struct(
    [
        ("phrase", pa.string()),
        ("start", pa.int32()),
        ("end", pa.int32()),
        ("score", pa.float32()),
        ("boxes", pa.list_(BOX)),
    ]
)
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("prompt", pa.string()),
        ("caption", pa.string()),
        ("entities", pa.list_(ENTITY)),
        ("token_ids", pa.list_(pa.int32())),
        ("token_logprobs", pa.list_(pa.float32())),
        ("caption_logprob", pa.float32()),
        ("error", pa.string()),
    ]
)


def columns(*names: str) -> list[str]:
    """Columns of the contract a reader wants (a name that is not one fails where it is written)."""
    unknown = [n for n in names if n not in SCHEMA.names]
    if unknown:
        raise KeyError(f"not output columns: {unknown}")
    return list(names)


def output_schema(keep_fields: list[pa.Field]) -> pa.Schema:
    """The contract's columns, then the kept input columns."""
    schema = SCHEMA
    for f in keep_fields:
        if f.name in SCHEMA.names:
            raise ConfigError(
                f"input.keep_columns: {f.name!r} clashes with an output column; rename it in the manifest"
            )
        schema = schema.append(f)
    return schema


def row(item: Item, **values) -> dict:
    """An output row of `item`: every column of the contract (null unless given), then its kept columns.
    Text is made printable: an error message quoting a name that is not UTF-8 must not fail the commit."""
    out: dict[str, Any] = dict.fromkeys(SCHEMA.names)
    out.update(id=printable(item.id), source=printable(item.source))
    out.update({k: printable(v) if isinstance(v, str) else v for k, v in values.items()})
    out.update(item.extra)
    return out


def caption_score(row: dict) -> float | None:
    """A caption's score: the mean probability of its generated tokens (geometric), None without any."""
    if row.get("caption_logprob") is None or not row.get("token_ids"):
        return None
    return math.exp(row["caption_logprob"] / len(row["token_ids"]))


def tokens(token_ids: list[int], logprobs: list[float]) -> dict:
    """The token columns of a row."""
    return {"token_ids": token_ids, "token_logprobs": logprobs, "caption_logprob": float(sum(logprobs))}


def error_kind(error: str) -> str:
    """The words before the first colon: every item error starts with its kind."""
    return error.split(":", 1)[0]
