"""Generated text -> caption and entities, exactly as Kosmos2Processor.post_process_generation."""

from __future__ import annotations

from pipeline.model.grounding import parse
from pipeline.records import Entity

SNOWMAN = (
    "<grounding> An image of<phrase> a snowman</phrase><object><patch_index_0044><patch_index_0863>"
    "</object> warming himself by<phrase> a fire</phrase><object><patch_index_0005><patch_index_0911></object>."
)


def test_model_card_example():
    caption, entities = parse("<image>noise noise</image>" + SNOWMAN)
    assert caption == "An image of a snowman warming himself by a fire."
    assert entities == [
        Entity("a snowman", 12, 21, [(0.390625, 0.046875, 0.984375, 0.828125)]),
        Entity("a fire", 41, 47, [(0.171875, 0.015625, 0.484375, 0.890625)]),
    ]
    assert all(caption[e.start : e.end] == e.phrase for e in entities)


def test_matches_the_processor(processor):
    texts = [
        SNOWMAN,
        "<grounding> An image of a dog.",
        "<grounding> Two<phrase> cats</phrase><object><patch_index_0001><patch_index_0100>"
        "</delimiter_of_multi_objects/><patch_index_0500><patch_index_1023></object> asleep.",
        "<grounding><object><patch_index_0010><patch_index_0200></object> unnamed box",
        "<grounding> a broken<phrase> phrase</phrase> with no object",
    ]
    for text in texts:
        caption, entities = parse(text)
        want_caption, want_entities = processor.post_process_generation(text)
        assert caption == want_caption
        assert [(e.phrase, (e.start, e.end), e.boxes) for e in entities] == want_entities


def test_placeholder_noise_before_image_end_never_reaches_the_parser():
    caption, entities = parse(
        "<phrase> junk</phrase><object><patch_index_0001><patch_index_0002></object></image> A cat."
    )
    assert caption == "A cat."
    assert entities == []


def test_matches_transformers_on_random_markup():
    """Texts strung together from the markup, patch indices, words and odd spaces, some well formed,
    most not: the parser here says exactly what transformers' says (caption, names, spans, boxes)."""
    import random

    from transformers.models.kosmos2.processing_kosmos2 import clean_text_and_extract_entities_with_bboxes

    rng = random.Random(0)
    pieces = [
        "<phrase>",
        "</phrase>",
        "<object>",
        "</object>",
        "</delimiter_of_multi_objects/>",
        "<grounding>",
        "</image>",
        "<image>",
        " a dog",
        " the",
        "  sky ",
        "cat",
        ".",
        " ",
        "\n",
        "é",
        "<",
        ">",
        "<x>",
    ]

    def patch() -> str:
        return f"<patch_index_{rng.randrange(1024):04d}>"

    def entity() -> str:
        boxes = "</delimiter_of_multi_objects/>".join(patch() + patch() for _ in range(rng.randint(1, 3)))
        name = f"<phrase>{rng.choice([' a dog', 'cat', '  two  cats ', ' '])}</phrase>" if rng.random() < 0.7 else ""
        return f"{name}<object>{boxes}</object>"

    named = 0
    for _ in range(3000):
        text = "".join(
            rng.choice([entity, patch] + [lambda p=p: p for p in pieces])() for _ in range(rng.randint(0, 14))
        )
        for side in (32, 16):
            caption, entities = parse(text, side)
            want_caption, want_entities = clean_text_and_extract_entities_with_bboxes(text.split("</image>")[-1], side)
            assert (caption, [(e.phrase, (e.start, e.end), e.boxes) for e in entities]) == (
                want_caption,
                want_entities,
            ), text
        named += any(not e.phrase.startswith("<patch") for e in entities)
    assert named > 400  # many texts hold a named entity: the spans are really compared
