"""The OpenVINO engine against transformers' own Kosmos-2 (greedy, fp32), image by image."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.config import EngineConfig
from pipeline.engine import Engine, Request, Sequences
from pipeline.grounding import parse
from pipeline.model import KosmosModel
from tests.conftest import PROMPT, TRAINED_CAPTIONS, EXAMPLES, example_images, load_rgb, pixel_values

PROMPTS = [
    PROMPT,
    "<grounding>",
    "<grounding>Describe this image in detail:",
    "A cat on a mat",
    "<grounding> a big red square next to a small blue circle on the table",
    "photo",
]


def sample_images():
    """The six example photos plus two synthetic ones (odd size, flat colour)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [load_rgb(p) for p in example_images()]
    images.append(Image.fromarray((rng.random((37, 301, 3)) * 255).astype("uint8")))
    images.append(Image.new("RGB", (64, 64), (200, 30, 30)))
    return images


def hf_model(checkpoint):
    from transformers import Kosmos2ForConditionalGeneration

    return Kosmos2ForConditionalGeneration.from_pretrained(checkpoint, dtype=torch.float32).eval()


def hf_generate(model, processor, image, prompt, max_new_tokens, min_new_tokens=0) -> list[int]:
    """transformers on one image alone: the reference. New tokens, end-of-sequence included."""
    enc = processor(text=prompt, images=image, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(
            pixel_values=enc["pixel_values"],
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            image_embeds_position_mask=enc["image_embeds_position_mask"],
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=False,
        )
    return out[0, enc["input_ids"].shape[1] :].tolist()


def as_hf(gen, eos) -> list[int]:
    return gen.token_ids + ([eos] if gen.stopped_by_eos else [])


def engine(export, **overrides) -> Engine:
    cfg = EngineConfig(precision="f32", **overrides)
    return Engine(KosmosModel(export, cfg), cfg)


@pytest.fixture(scope="module")
def random_refs(random_checkpoint, processor):
    """Reference tokens for each (image, prompt) pair, image i with prompt i % len(PROMPTS)."""
    model = hf_model(random_checkpoint)
    images = sample_images()
    pairs = [(im, PROMPTS[i % len(PROMPTS)]) for i, im in enumerate(images)]
    return pairs, [hf_generate(model, processor, im, pr, max_new_tokens=24) for im, pr in pairs]


def requests_for(processor, pairs):
    return [Request(pixel_values(processor, im), pr, tag=i) for i, (im, pr) in enumerate(pairs)]


def test_reference_is_not_degenerate(random_refs):
    """Parity on text that never changes would prove little: the random model must say varied things."""
    _, refs = random_refs
    assert len({tuple(r) for r in refs}) >= 6
    assert all(len(set(r)) >= 2 for r in refs[:6])


@pytest.mark.parametrize("batch_size", [1, 4])
def test_token_parity_with_transformers(random_export, random_refs, processor, batch_size):
    pairs, refs = random_refs
    eng = engine(random_export, batch_size=batch_size, max_new_tokens=24)
    outs = list(eng.generate(requests_for(processor, pairs)))
    assert [o.tag for o in outs] == list(range(len(pairs)))
    for out, ref in zip(outs, refs):
        assert as_hf(out, eng.model.eos_token_id) == ref, f"image {out.tag}"


def test_result_never_depends_on_neighbours(random_export, random_refs, processor):
    """Each image in every position of batches of 4 with other prompts (left padding) gives its own result."""
    pairs, refs = random_refs
    eng = engine(random_export, batch_size=4, max_new_tokens=24, num_requests=2)
    order = [5, 0, 7, 2, 1, 6, 3, 4, 0, 2, 7]  # repeats, different neighbours, a partial last batch
    outs = list(eng.generate(requests_for(processor, [pairs[i] for i in order])))
    for out, i in zip(outs, order):
        assert as_hf(out, eng.model.eos_token_id) == refs[i], f"image {i} at position {out.tag}"


def test_logits_match_torch_when_teacher_forced(random_export, random_checkpoint, processor):
    """Token equality can hide drift on a tiny model: every step's logits match torch within 1e-4 (f32),
    for two rows of different prompt length sharing a batch."""
    model = hf_model(random_checkpoint)
    images = sample_images()[:2]
    prompts = [PROMPTS[0], PROMPTS[4]]
    forced = [[5, 80, 13, 226, 31, 2, 9, 200], [77, 78, 79, 226, 227, 31, 40, 41]]  # eos (2) mid-sequence too

    eng = engine(random_export)
    seqs = Sequences(eng.model, eng._slots.get(), requests_for(processor, list(zip(images, prompts))))
    ov_steps = [seqs.prefill().copy()]
    for k in range(len(forced[0])):
        ov_steps.append(seqs.step(np.arange(2), np.array([forced[0][k], forced[1][k]])).copy())

    for row, (image, prompt) in enumerate(zip(images, prompts)):
        enc = processor(text=prompt, images=image, return_tensors="pt")
        n = enc["input_ids"].shape[1]
        ids = torch.cat([enc["input_ids"], torch.tensor([forced[row]])], dim=1)
        mask = torch.cat([enc["image_embeds_position_mask"], torch.zeros(1, len(forced[row]), dtype=torch.long)], 1)
        with torch.no_grad():
            logits = model(
                pixel_values=enc["pixel_values"],
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                image_embeds_position_mask=mask,
            ).logits[0]
        for k, ov_logits in enumerate(ov_steps):
            np.testing.assert_allclose(ov_logits[row], logits[n - 1 + k].numpy(), atol=1e-4, rtol=0)


def test_rows_finish_at_different_steps(trained_export, processor):
    """Rows end at their own end-of-sequence while others go on; max_new_tokens cuts each row alone."""
    names = list(TRAINED_CAPTIONS)
    reqs = [Request(pixel_values(processor, load_rgb(EXAMPLES / n)), PROMPT, tag=n) for n in names]
    full = {o.tag: o for o in engine(trained_export, batch_size=4).generate(reqs)}
    lengths = {n: len(full[n].token_ids) for n in names}
    assert all(o.stopped_by_eos for o in full.values())
    assert len(set(lengths.values())) == len(names)  # all different: rows left the batch one by one

    cut = sorted(lengths.values())[1]  # the shortest ends by itself, the others are cut
    short = {o.tag: o for o in engine(trained_export, batch_size=4, max_new_tokens=cut).generate(reqs)}
    for n in names:
        assert short[n].token_ids == full[n].token_ids[:cut]
        assert len(short[n].token_ids) == min(cut, lengths[n])
        assert short[n].stopped_by_eos == (lengths[n] < cut)


def test_min_new_tokens_matches_transformers(trained_export, trained_checkpoint, processor):
    model = hf_model(trained_checkpoint)
    image = load_rgb(EXAMPLES / "rocket.jpg")
    ref = hf_generate(model, processor, image, PROMPT, max_new_tokens=20, min_new_tokens=16)
    eng = engine(trained_export, min_new_tokens=16, max_new_tokens=20)
    (out,) = eng.generate([Request(pixel_values(processor, image), PROMPT)])
    assert as_hf(out, eng.model.eos_token_id) == ref
    assert len(out.token_ids) >= 16


def test_trained_captions_and_entities_come_back(trained_export, trained_checkpoint, processor):
    """The whole OpenVINO path says what the trained model says under transformers, down to every box."""
    model = hf_model(trained_checkpoint)
    eng = engine(trained_export, batch_size=3, num_requests=2)
    names = list(TRAINED_CAPTIONS) * 2
    reqs = [Request(pixel_values(processor, load_rgb(EXAMPLES / n)), PROMPT, tag=n) for n in names]
    for out in eng.generate(reqs):
        caption, entities = parse(eng.model.text_after_image(out.prompt_ids, out.token_ids))
        ref_ids = hf_generate(model, processor, load_rgb(EXAMPLES / out.tag), PROMPT, max_new_tokens=128)
        enc = processor(text=PROMPT, images=load_rgb(EXAMPLES / out.tag))
        ref_text = processor.batch_decode([enc["input_ids"] + ref_ids], skip_special_tokens=True)[0]
        ref_caption, ref_entities = processor.post_process_generation(ref_text)
        assert caption == ref_caption
        assert [(e.phrase, (e.start, e.end), e.boxes) for e in entities] == ref_entities
        # ...and that is what it was trained to say.
        want_caption, want_entities = processor.post_process_generation(PROMPT + TRAINED_CAPTIONS[out.tag])
        assert caption.replace(" ", "") == want_caption.replace(" ", "")
        assert [(e.phrase, e.boxes) for e in entities] == [(p, b) for p, _, b in want_entities]


def test_bf16_runs_close_to_f32(trained_export, processor):
    """bf16 (the AMX path) is not held to parity, but the trained model's captions survive it."""
    cfg = EngineConfig(precision="bf16")
    eng = Engine(KosmosModel(trained_export, cfg), cfg)
    reqs = [Request(pixel_values(processor, load_rgb(EXAMPLES / n)), PROMPT, tag=n) for n in TRAINED_CAPTIONS]
    f32 = {o.tag: o.token_ids for o in engine(trained_export).generate(reqs)}
    bf16 = {o.tag: o.token_ids for o in eng.generate(reqs)}
    assert sum(f32[n] == bf16[n] for n in f32) >= len(f32) - 1
