"""NNCF compression of the exported graphs: int8 or int4 weights, and static int8 quantisation of the
image encoder and (on AMX CPUs) the text decoder, calibrated on the photos in export/samples/calibration/."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

from pipeline.config import ModelConfig, WeightFormat
from pipeline.export.verify import MAX_NEW_TOKENS
from pipeline.hardware import cpu_has
from pipeline.model.prompt import CAPTION

CALIBRATION = Path(__file__).resolve().parent / "samples" / "calibration"


def static_decoder_wanted(cfg: ModelConfig) -> bool:
    """Whether this export's text decoder is to be quantised statically on this machine:
    `model.quantize_text_decoder`, or where it is null, on CPUs with AMX (docs/performance/defaults.md)."""
    wanted = cfg.quantize_text_decoder
    return cfg.weight_format == WeightFormat.int8 and bool(wanted or (wanted is None and cpu_has("amx_int8")))


def compress(models: dict, cfg: ModelConfig, model, processor) -> dict:
    """NNCF compression. int8: every graph's weights; int4: the decoder's in int4, the rest int8 (as
    optimum does for embeddings and heads), since the vision tower is small and sensitive. With
    `model.quantize_image_encoder` the image encoder is quantised statically instead, and with
    `model.quantize_text_decoder` resolved true the text decoder too (see below)."""
    if not cfg.compressed:
        return models
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedCompressionParameters, GroupSizeFallbackMode

    # Layers narrower than a group (only in tiny test models) get a smaller group instead of an error.
    adjust = AdvancedCompressionParameters(
        group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16
    )
    out = {}
    with nncf_on_stderr():
        for name, ov_model in models.items():
            if name == "image_encoder" and cfg.quantize_image_encoder:
                out[name] = quantize_image_encoder(ov_model, processor)
            elif name == "text_decoder" and static_decoder_wanted(cfg):
                out[name] = quantize_text_decoder(ov_model, decoder_calibration(model, processor))
            elif cfg.weight_format == WeightFormat.int4 and name == "text_decoder":
                out[name] = nncf.compress_weights(
                    ov_model,
                    mode=nncf.CompressWeightsMode.INT4_ASYM,
                    group_size=128,
                    ratio=1.0,
                    advanced_parameters=adjust,
                )
            else:
                out[name] = nncf.compress_weights(ov_model, mode=nncf.CompressWeightsMode.INT8_ASYM)
    return out


@contextmanager
def nncf_on_stderr():
    """NNCF logs its tables and draws its progress bars on stdout, which is for a command's results
    (kosmos-export prints the export's path there): send both to stderr, with the run's own logs."""
    for handler in logging.getLogger("nncf").handlers:
        if type(handler) is logging.StreamHandler:
            handler.setStream(sys.stderr)
    with redirect_stdout(sys.stderr):
        yield


def calibration_views() -> list:
    """Each calibration photo whole, mirrored, as its four quadrants and its centre: the scales and
    framings a dataset's photos come in."""
    from PIL import Image, ImageOps

    views = []
    for path in sorted(CALIBRATION.glob("*.jpg")):
        image = Image.open(path).convert("RGB")
        w, h = image.size
        views += [image, ImageOps.mirror(image)]
        views += [
            image.crop(box)
            for box in ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h))
        ]
        views.append(image.crop((w // 4, h // 4, w - w // 4, h - h // 4)))
    return views


def quantize_image_encoder(ov_model, processor):
    """Static int8: the encoder's matrix products take int8 activations at scales fixed by calibration
    (NNCF, SmoothQuant first, as for transformers), so none are computed per call (docs/performance/defaults.md,
    "The image encoder"). int8 products sum exactly, so an image's embeddings do not depend on its batch."""
    import nncf

    pixels = processor.image_processor(calibration_views(), return_tensors="np")["pixel_values"]
    dataset = nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))])
    return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels))


def quantize_text_decoder(ov_model, samples: list[dict]):
    """Static int8 for the text decoder (NNCF, SmoothQuant first): on AMX CPUs its matrix products then
    run AMX int8 kernels instead of AVX-512 ones on activations quantised at every call.

    The lm_head keeps int8 weights only, its input unquantised: with static scales there too, the
    first token of sample captions changed (docs/performance/defaults.md, "Static int8 text decoder")."""
    import nncf

    head = nncf.IgnoredScope(names=[logits_matmul(ov_model)])
    quantized = nncf.quantize(
        ov_model,
        nncf.Dataset(samples),
        model_type=nncf.ModelType.TRANSFORMER,
        subset_size=len(samples),
        ignored_scope=head,
    )
    return nncf.compress_weights(
        quantized, mode=nncf.CompressWeightsMode.INT8_ASYM
    )  # the lm_head's, the only ones left


def decoder_calibration(model, processor) -> list[dict]:
    """The text decoder's inputs for each calibration view: its prompt followed by transformers' greedy
    caption of it, in one pass each, as the engine feeds them. The scales must cover the caption's
    tokens (words, phrase and box tokens), not only the image and the prompt."""
    import numpy as np
    import torch

    views = calibration_views()
    inputs = processor(text=[CAPTION] * len(views), images=views, return_tensors="pt")
    text, eos = model.config.text_config, processor.tokenizer.eos_token_id
    empty = np.zeros((1, text.attention_heads, 0, text.embed_dim // text.attention_heads), np.float32)
    past = {f"past.{i}.{part}": empty for i in range(text.layers) for part in ("key", "value")}
    samples = []
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=MAX_NEW_TOKENS, do_sample=False)
        images = model.get_image_features(inputs["pixel_values"], return_dict=True).pooler_output
        for ids, image, mask in zip(generated.tolist(), images, inputs["image_embeds_position_mask"].bool()):
            prompt, caption = ids[: len(mask)], ids[len(mask) :]
            ids = prompt + (caption[: caption.index(eos)] if eos in caption else caption)  # what the decoder is fed
            embeds = model.get_input_embeddings()(torch.tensor(ids))
            embeds[: len(mask)][mask] = image
            samples.append(
                {
                    "inputs_embeds": embeds[None].numpy(),
                    "attention_mask": np.ones((1, len(ids)), np.int64),
                    "position_ids": np.arange(len(ids))[None]
                    + processor.tokenizer.pad_token_id
                    + 1,  # as the engine counts
                    **past,
                }
            )
    return samples


def logits_matmul(ov_model) -> str:
    """The name of the lm_head's MatMul: the first one up from the `logits` output."""
    node = ov_model.output("logits").get_node()
    while node.get_type_name() != "MatMul":
        node = node.input_value(0).get_node()
    return node.get_friendly_name()
