"""Generated text -> caption, entities and normalised boxes, and each entity's and box's score.

`parse` gives what transformers' `Kosmos2Processor.post_process_generation` gives (a split at
`</image>`, then `clean_text_and_extract_entities_with_bboxes`), so captions and spans are exactly what
users of the processor get; it is written here because importing that function imports torch (seconds
and hundreds of MB of a run's start-up), and tests/model/test_grounding.py holds it to transformers' on every case.
Scores are read off the generated tokens: `add_scores` finds the same entities in the token ids that
the pattern finds in their text.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from pipeline.records import Entity

EOI_TOKEN = "</image>"


TAG = re.compile(r"<.*?>")
# An object, optionally named by the phrase just before it: its boxes are patch-index pairs.
ENTITY = re.compile(
    r"(?:<phrase>([^<]+)</phrase>)?<object>((?:<patch_index_\d+><patch_index_\d+>"
    r"</delimiter_of_multi_objects/>)*<patch_index_\d+><patch_index_\d+>)</object>"
)
PAIR = re.compile(r"<patch_index_(\d+)><patch_index_(\d+)>")


def parse(text: str, patches_per_side: int = 32) -> tuple[str, list[Entity]]:
    """Caption and entities of decoded Kosmos-2 text (tags kept; anything before `</image>` ignored).

    The caption is the text without tags, stripped; an entity's span is its phrase's place there
    (spaces around the phrase excluded). An object without a phrase is one entity per box, named
    `<patch_index_A><patch_index_B>` and spanning nothing where the object starts."""
    text = text.split(EOI_TOKEN)[-1]
    plain = TAG.sub("", text)
    lead = len(plain) - len(plain.lstrip())

    def at(i: int) -> int:  # a position in `text` as a position in the stripped caption
        return len(TAG.sub("", text[:i])) - lead

    entities = []
    for m in ENTITY.finditer(text):
        pairs = [(int(a), int(b)) for a, b in PAIR.findall(m.group(2))]
        if m.group(1) is not None:
            name = m.group(1)
            start = at(m.start(1)) + len(name) - len(name.lstrip())
            end = at(m.end(1)) - (len(name) - len(name.rstrip()))
            entities.append(Entity(name.strip(), start, end, [_box(a, b, patches_per_side) for a, b in pairs]))
        else:
            where = at(m.start())
            entities += [
                Entity(f"<patch_index_{a}><patch_index_{b}>", where, where, [_box(a, b, patches_per_side)])
                for a, b in pairs
            ]
    return plain.strip(), entities


def _box(first: int, last: int, n: int) -> tuple[float, float, float, float]:
    """Patch indices of the upper-left and lower-right cells -> (x1, y1, x2, y2) in [0, 1]: the cells'
    centres, or their outer edges when both lie in one row or column."""
    cell = 1.0 / n
    (y1, x1), (y2, x2) = divmod(first, n), divmod(last, n)
    if x1 == x2 or y1 == y2:  # one cell, one row or one column
        return x1 * cell, y1 * cell, x2 * cell + cell, y2 * cell + cell
    return x1 * cell + cell / 2, y1 * cell + cell / 2, x2 * cell + cell / 2, y2 * cell + cell / 2


@dataclass(frozen=True)
class Tags:
    """The token ids of Kosmos-2's grounding markup in one tokenizer."""

    image_end: int
    phrase: int
    phrase_end: int
    object: int
    object_end: int
    delimiter: int
    patches: frozenset[int]
    breaks: frozenset[int]  # tokens a phrase cannot contain: any tag, or a piece with "<" in it
    silent: frozenset[int]  # special tokens that decoding drops (the text never sees them)

    @classmethod
    def of(cls, vocab: dict[str, int], special_ids) -> Tags:
        """From a tokenizer's vocabulary (added tokens included) and its special token ids."""
        return cls(
            image_end=vocab[EOI_TOKEN],
            phrase=vocab["<phrase>"],
            phrase_end=vocab["</phrase>"],
            object=vocab["<object>"],
            object_end=vocab["</object>"],
            delimiter=vocab["</delimiter_of_multi_objects/>"],
            patches=frozenset(i for p, i in vocab.items() if p.startswith("<patch_index_")),
            breaks=frozenset(i for p, i in vocab.items() if "<" in p),
            silent=frozenset(special_ids),
        )


def add_scores(entities: list[Entity], ids: list[int], logprobs: list[float | None], tags: Tags) -> None:
    """Fill in the scores of `entities` (as `parse` found them in the text of `ids`) from the
    log-probabilities of the generated tokens (`logprobs[i]` is None for a prompt token).

    The token ids are walked with the pattern transformers applies to their text; should the two ever
    disagree (a text piece that spells a tag), the entities keep no scores rather than wrong ones.
    """
    pairs = [(t, lp) for t, lp in zip(ids, logprobs) if t not in tags.silent]
    found = _token_entities([t for t, _ in pairs], tags)
    if [len(boxes) for _, _, boxes in found] != [len(e.boxes) for e in entities]:
        return
    lps = [lp for _, lp in pairs]
    for entity, (first, opened, boxes) in zip(entities, found):
        named = [lp for lp in lps[first : opened + 1] if lp is not None]
        entity.score = math.exp(sum(named)) if named else None
        entity.box_scores = [
            math.exp(lps[x] + lps[y]) if lps[x] is not None and lps[y] is not None else None for x, y in boxes
        ]


def _token_entities(ids: list[int], tags: Tags) -> list[tuple[int, int, list[tuple[int, int]]]]:
    """Entities as (position of their first token, of their `<object>`, [(x, y) positions of each box's
    patch tokens]), matching `(<phrase>[^<]+</phrase>)?<object>(<p><p></delimiter/>)*<p><p></object>`.
    An `<object>` without a phrase gives one entity per box, as transformers does."""
    found, i = [], 0
    while i < len(ids):
        if ids[i] == tags.phrase:
            j = i + 1
            while j < len(ids) and ids[j] not in tags.breaks:
                j += 1
            if j > i + 1 and ids[j : j + 2] == [tags.phrase_end, tags.object]:
                boxes, end = _boxes(ids, j + 1, tags)
                if boxes:
                    found.append((i, j + 1, boxes))
                    i = end
                    continue
        elif ids[i] == tags.object:
            boxes, end = _boxes(ids, i, tags)
            if boxes:
                found += [(i, i, [box]) for box in boxes]
                i = end
                continue
        i += 1
    return found


def _boxes(ids: list[int], at: int, tags: Tags) -> tuple[list[tuple[int, int]], int]:
    """The patch-token positions of the box list opened by the `<object>` at `at`, and the position
    after its `</object>`; no boxes if the list is malformed."""
    boxes, k = [], at + 1
    while k + 2 < len(ids) and ids[k] in tags.patches and ids[k + 1] in tags.patches:
        boxes.append((k, k + 1))
        if ids[k + 2] == tags.object_end:
            return boxes, k + 3
        if ids[k + 2] != tags.delimiter:
            break
        k += 3
    return [], at + 1
