"""Scores: every generated token's log-probability, and the entity and box scores read off them,
against transformers' own `compute_transition_scores` on each image alone (fp32)."""

from __future__ import annotations

import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.annotation.run import run
from pipeline.config import InputConfig, TaskConfig
from pipeline.model.grounding import Tags, add_scores, parse
from pipeline.model.prompt import GROUND
from tests.helpers import (
    EXAMPLES,
    PROMPT,
    PROMPTS,
    TRAINED_CAPTIONS,
    config,
    engine,
    example_images,
    hf_model,
    load_rgb,
    requests_for,
    sample_images,
)


def hf_scored(model, processor, image, prompt, max_new_tokens):
    """transformers alone on one image: (prompt ids, new ids, their log-probabilities), eos included."""
    enc = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            **{k: enc[k] for k in ("pixel_values", "input_ids", "attention_mask", "image_embeds_position_mask")},
            max_new_tokens=max_new_tokens,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
        logprobs = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)[0]
    n = enc["input_ids"].shape[1]
    return enc["input_ids"][0].tolist(), out.sequences[0, n:].tolist(), logprobs.tolist()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_token_logprobs_match_transformers(random_export, random_checkpoint, processor, batch_size):
    """Mixed prompts (left padding), 8 images: each token's log-probability within 1e-4 of transformers'."""
    model = hf_model(random_checkpoint)
    pairs = [(im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(sample_images())]
    eng = engine(random_export, batch_size=batch_size, max_new_tokens=16)
    spread = []
    for out, (image, prompt) in zip(eng.generate(requests_for(processor, pairs)), pairs):
        _, ref_ids, ref_lps = hf_scored(model, processor, image, prompt, 16)
        assert out.token_ids == ref_ids[: len(out.token_ids)]
        np.testing.assert_allclose(out.token_logprobs, ref_lps[: len(out.token_ids)], atol=1e-4, rtol=0)
        spread += out.token_logprobs
    assert max(spread) - min(spread) > 1.0  # the values vary: the check is not on constants


def entity_scores_by_hand(ids: list[int], logprobs: list[float | None], tags: Tags) -> list[tuple[float, list[float]]]:
    """For text whose every `<object>` follows a phrase: (entity score, box scores), read position by position."""
    out = []
    for k, token in enumerate(ids):
        if token != tags.object:
            continue
        start = max(i for i in range(k) if ids[i] == tags.phrase)
        named = [lp for lp in logprobs[start : k + 1] if lp is not None]
        end = ids.index(tags.object_end, k)
        patches = [i for i in range(k, end) if ids[i] in tags.patches]
        boxes = [math.exp(logprobs[x] + logprobs[y]) for x, y in zip(patches[::2], patches[1::2])]
        out.append((math.exp(sum(named)), boxes))
    return out


def test_scores_follow_the_tokens_of_each_entity(processor):
    """Distinct made-up log-probabilities at every position: each score is the product over its own tokens."""
    tags = Tags.of(processor.tokenizer.get_vocab(), processor.tokenizer.all_special_ids)
    for caption in TRAINED_CAPTIONS.values():
        ids = processor.tokenizer(PROMPT + caption, add_special_tokens=False)["input_ids"]
        prompt_len = len(processor.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
        logprobs = [None] * prompt_len + [-0.01 * (k + 1) for k in range(len(ids) - prompt_len)]
        _, entities = parse(processor.tokenizer.decode(ids, skip_special_tokens=True))
        add_scores(entities, ids, logprobs, tags)
        want = entity_scores_by_hand(ids, logprobs, tags)
        assert [e.score for e in entities] == pytest.approx([score for score, _ in want])
        assert [s for e in entities for s in e.box_scores] == pytest.approx([s for _, boxes in want for s in boxes])
        assert all(e.score is not None and len(e.box_scores) == len(e.boxes) for e in entities)


def test_boxes_without_a_phrase_and_broken_markup(processor):
    tags = Tags.of(processor.tokenizer.get_vocab(), processor.tokenizer.all_special_ids)
    text = (
        "<grounding><object><patch_index_0010><patch_index_0200></delimiter_of_multi_objects/>"
        "<patch_index_0300><patch_index_0400></object> and<phrase> a cat</phrase><object><patch_index_0001></object>"
    )
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    logprobs = [-0.1] * len(ids)
    _, entities = parse(processor.tokenizer.decode(ids, skip_special_tokens=True))
    add_scores(entities, ids, logprobs, tags)
    # Two phrase-less entities, one per box, each scored by its <object> and its own pair; the broken one is no entity.
    assert [len(e.boxes) for e in entities] == [1, 1]
    assert [e.score for e in entities] == pytest.approx([math.exp(-0.1)] * 2)
    assert [s for e in entities for s in e.box_scores] == pytest.approx([math.exp(-0.2)] * 2)


def test_scores_agree_when_the_token_walk_and_the_text_disagree(processor):
    """If the entities found in the text are not those found in the tokens, no score is better than a wrong one."""
    tags = Tags.of(processor.tokenizer.get_vocab(), processor.tokenizer.all_special_ids)
    ids = processor.tokenizer(PROMPT + TRAINED_CAPTIONS["chelsea.png"], add_special_tokens=False)["input_ids"]
    _, entities = parse(processor.tokenizer.decode(ids, skip_special_tokens=True))
    add_scores(entities[:1], ids, [-0.1] * len(ids), tags)  # one entity where the tokens hold two
    assert entities[0].score is None and entities[0].box_scores == []


def test_rows_carry_scores_that_match_transformers(trained_checkpoint, trained_export, processor, tmp_path):
    """Every example image, including two the model was not trained on (where it hesitates)."""
    out = tmp_path / "labels"
    summary = run(config(trained_checkpoint, trained_export, InputConfig(path=str(EXAMPLES)), out), out)
    model = hf_model(trained_checkpoint)
    tags = Tags.of(processor.tokenizer.get_vocab(), processor.tokenizer.all_special_ids)
    rows = {r["id"]: r for r in pq.read_table(out).to_pylist()}
    assert set(rows) == {p.name for p in example_images()}
    for name, row in rows.items():
        prompt_ids, ref_ids, ref_lps = hf_scored(model, processor, load_rgb(EXAMPLES / name), PROMPT, 128)
        n = len(row["token_ids"])
        assert row["token_ids"] == ref_ids[:n]
        np.testing.assert_allclose(row["token_logprobs"], ref_lps[:n], atol=1e-4, rtol=0)
        assert row["caption_logprob"] == pytest.approx(sum(ref_lps[:n]), abs=1e-3)
        eoi = prompt_ids.index(tags.image_end)
        ids = prompt_ids[eoi:] + ref_ids[:n]
        want = entity_scores_by_hand(ids, [None] * (len(prompt_ids) - eoi) + ref_lps[:n], tags)
        got = [(e["score"], [b["score"] for b in e["boxes"]]) for e in row["entities"]]
        assert len(got) == len(want)
        for (score, boxes), (want_score, want_boxes) in zip(got, want):
            assert score == pytest.approx(want_score, abs=1e-4)
            assert boxes == pytest.approx(want_boxes, abs=1e-4)
    assert summary.scores["box"]["count"] == sum(len(e["boxes"]) for r in rows.values() for e in r["entities"])
    assert (
        0
        < summary.scores["caption"]["p05"]
        <= summary.scores["caption"]["p50"]
        <= summary.scores["caption"]["p95"]
        <= 1
    )


def test_ground_rows_score_the_requested_phrases(trained_checkpoint, trained_export, processor, tmp_path):
    """task=ground: each phrase's boxes score as transformers' referring run scores them; the entity's
    score is the probability of its `<object>` (the phrase itself is given)."""
    phrases = ["a cat", "a mat"]
    out = tmp_path / "labels"
    cfg = config(
        trained_checkpoint,
        trained_export,
        InputConfig(path=str(EXAMPLES)),
        out,
        task=TaskConfig(kind="ground", phrases=phrases),
    )
    cfg.input.limit, cfg.engine.max_new_tokens = 2, 32
    run(cfg, out)
    model = hf_model(trained_checkpoint)
    for row in pq.read_table(out).to_pylist():
        image = load_rgb(EXAMPLES / row["id"])
        all_lps = []
        for entity, phrase in zip(row["entities"], phrases):
            _, ref_ids, ref_lps = hf_scored(model, processor, image, GROUND.format(phrase=phrase), 32)
            all_lps += ref_lps[: len(ref_ids) - (ref_ids[-1] == 2)]
            if not entity["boxes"]:
                continue
            assert ref_ids[0] == processor.tokenizer.convert_tokens_to_ids("<object>")
            assert entity["score"] == pytest.approx(math.exp(ref_lps[0]), abs=1e-4)
            assert [b["score"] for b in entity["boxes"]][0] == pytest.approx(
                math.exp(ref_lps[1] + ref_lps[2]), abs=1e-4
            )
        np.testing.assert_allclose(row["token_logprobs"], all_lps, atol=1e-4, rtol=0)
