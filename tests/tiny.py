"""Kosmos-2 checkpoints built offline: a tokenizer, a processor and tiny (or full-size) models.

Nothing here downloads. The tokenizer is a Unigram vocabulary made from a word list, so it is the
same on every machine; the processor is the real `Kosmos2Processor` around it.
"""

from __future__ import annotations

import string
from pathlib import Path

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

WORDS = (
    "An an image of a the cat dog snowman fire person man woman sitting standing on in by with and "
    "warming himself mat table red green blue yellow square circle picture photo small big next to "
    "near under rocket sky coffee cup astronaut camera field stars describe this detail"
).split()


def make_tokenizer(vocab_size: int | None = None):
    """An XLM-R (Unigram) tokenizer: specials, whole words, single characters and filler pieces.

    Ids 4.. are plain pieces, so the 64 image placeholders (`unk_token_id + 1 …`) never collide with the
    tag tokens the processor adds after the vocabulary. `vocab_size` pads the base vocabulary with
    synthetic pieces (the real model has 64007 before the processor's 1030 added tokens).
    """
    from transformers import XLMRobertaTokenizer

    pieces = [f"▁{w}" for w in WORDS]
    pieces += [c for c in string.ascii_letters + string.digits + string.punctuation] + ["▁"]
    pieces += [f"▁{c}" for c in string.ascii_lowercase]
    base = 5 + len(pieces)
    target = max(vocab_size or 0, base + 40)
    pieces += [f"▁zz{i:05d}" for i in range(target - base)]
    vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(p, -float(len(p)) if len(p) > 1 else -20.0) for p in pieces]
    vocab += [("<mask>", 0.0)]
    return XLMRobertaTokenizer(vocab=vocab)


def make_processor(vocab_size: int | None = None):
    from transformers import CLIPImageProcessor, Kosmos2Processor

    image_processor = CLIPImageProcessor(
        size={"height": 224, "width": 224},
        do_center_crop=False,
        resample=3,
        image_mean=CLIP_MEAN,
        image_std=CLIP_STD,
    )
    return Kosmos2Processor(image_processor, make_tokenizer(vocab_size))


def tiny_config(vocab_size: int, width: int = 64, layers: int = 2, heads: int = 4, vision_width: int = 32):
    from transformers import Kosmos2Config

    return Kosmos2Config(
        text_config=dict(
            vocab_size=vocab_size,
            embed_dim=width,
            layers=layers,
            ffn_dim=2 * width,
            attention_heads=heads,
            max_position_embeddings=512,
        ),
        vision_config=dict(
            hidden_size=vision_width,
            intermediate_size=2 * vision_width,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=224,
            patch_size=14,
        ),
        latent_query_num=64,
    )


def make_model(config, seed: int = 0):
    import torch
    from transformers import Kosmos2ForConditionalGeneration

    torch.manual_seed(seed)
    return Kosmos2ForConditionalGeneration(config).eval()


def make_random_model(vocab_size: int, seed: int = 1, scale: float = 2.0, width: int = 64, vision_width: int = 32):
    """A random tiny model whose greedy text varies from token to token.

    With the default init and tied embeddings, the current token dominates the logits and greedy
    decoding repeats one token forever, which would make parity tests nearly vacuous. Untied heads
    and weights of std `scale / sqrt(fan_in)` give varied text.
    """
    import torch

    config = tiny_config(vocab_size, width=width, vision_width=vision_width)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    model = make_model(config, seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for weight in model.parameters():
            if weight.dim() == 2:
                weight.copy_(torch.randn(weight.shape, generator=generator) * scale / weight.shape[-1] ** 0.5)
    return model


def save_checkpoint(model, processor, folder: Path) -> Path:
    """A folder exactly as `save_pretrained` writes one, which `model.source` accepts."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# What the trained tiny model learns to say about each example image (after the prompt).
TRAINED_CAPTIONS = {
    "chelsea.png": "<phrase> a cat</phrase><object><patch_index_0044><patch_index_0863></object> sitting on"
    "<phrase> a mat</phrase><object><patch_index_0005><patch_index_0911></object>.",
    "astronaut.png": "<phrase> a person</phrase><object><patch_index_0100><patch_index_0500></object> next to"
    "<phrase> a rocket</phrase><object><patch_index_0010><patch_index_0330>"
    "</delimiter_of_multi_objects/><patch_index_0600><patch_index_0990></object>.",
    "coffee.png": "<phrase> a coffee cup</phrase><object><patch_index_0200><patch_index_0800></object> on a table.",
    "rocket.jpg": " a rocket in the sky.",
}
PROMPT = "<grounding>An image of"


def make_trained_model(processor, images_dir: Path):
    """A tiny Kosmos-2 trained (a few hundred steps, seconds) to say TRAINED_CAPTIONS for the images
    of that name in `images_dir`: grounded text whose errors show, unlike a random model's."""
    import torch
    from PIL import Image

    config = tiny_config(len(processor.tokenizer), width=64)
    config.text_config.dropout = config.text_config.attention_dropout = config.text_config.activation_dropout = 0.0
    model = make_model(config, seed=0)
    images = []
    for name in TRAINED_CAPTIONS:
        with Image.open(images_dir / name) as im:
            images.append(im.convert("RGB"))
    texts = [PROMPT + caption for caption in TRAINED_CAPTIONS.values()]
    batch = processor(text=texts, images=images, add_eos_token=True, padding=True, return_tensors="pt")
    prompt_len = len(processor(text=PROMPT, images=images[0])["input_ids"])
    labels = batch["input_ids"].clone()
    labels[:, :prompt_len] = -100
    labels[batch["attention_mask"] == 0] = -100

    torch.manual_seed(0)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(400):
        loss = model(**batch, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if loss.item() < 2e-3:
            break
    return model.eval()
