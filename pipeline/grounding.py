"""Generated text -> caption, entities and normalised boxes.

The parsing is transformers' own (`Kosmos2Processor.post_process_generation` is a split at `</image>`
followed by `clean_text_and_extract_entities_with_bboxes`), so captions and spans are exactly what
users of the processor get.
"""

from __future__ import annotations

from dataclasses import dataclass, field

EOI_TOKEN = "</image>"
BOX_FIELDS = ("x1", "y1", "x2", "y2")


@dataclass
class Entity:
    phrase: str
    start: int  # character span of `phrase` in the caption
    end: int
    boxes: list[tuple[float, float, float, float]] = field(default_factory=list)  # x1, y1, x2, y2 in [0, 1]

    def as_row(self) -> dict:
        """The entity as the output schema stores it."""
        return {"phrase": self.phrase, "start": self.start, "end": self.end, "boxes": [dict(zip(BOX_FIELDS, b)) for b in self.boxes]}

    @classmethod
    def from_row(cls, row: dict) -> Entity:
        return cls(row["phrase"], row["start"], row["end"], [tuple(b[k] for k in BOX_FIELDS) for b in row["boxes"]])


def parse(text: str, patches_per_side: int = 32) -> tuple[str, list[Entity]]:
    """Caption and entities of decoded Kosmos-2 text (tags kept; anything before `</image>` ignored)."""
    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    caption, entities = clean_text_and_extract_entities_with_bboxes(text.split(EOI_TOKEN)[-1], patches_per_side)
    return caption, [Entity(name, start, end, [tuple(b) for b in boxes]) for name, (start, end), boxes in entities]
