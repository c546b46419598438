"""Hugging Face Kosmos-2 checkpoint -> three OpenVINO graphs, the processor and a manifest.

The graphs each do all of their own math, so the run needs neither torch nor transformers' model code:
  image_encoder   pixel_values[B,3,224,224] -> image embeddings[B,64,D]
                  (vision tower, post_layernorm, L2 normalisation, image-to-text projection)
  token_embedder  input_ids[B,T] -> token embeddings[B,T,D]  (unscaled, as `embed_tokens` gives them)
  text_decoder    inputs_embeds, attention_mask, position_ids, beam_idx -> logits of the last position;
                  stateful: the KV cache lives in the infer request, `beam_idx` reorders or drops its rows
                  (a run rewrites it for paged attention at load time: model.paged_decoder).
An export is written to a temporary folder, checked against transformers on the weights just loaded
(pipeline/verify.py), and renamed into place, with `manifest.json` (holding that check) written last,
so a folder with a complete manifest is a complete export.

    kosmos-export                       # export the configured model unless model.dir already holds it
    kosmos-export verify=true           # and check an existing export again (exit 4 if it disagrees)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
import warnings
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import ConfigError, EngineConfig, ModelConfig
from pipeline.files import write_text
from pipeline.locks import flock

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
GRAPHS = ("image_encoder", "token_embedder", "text_decoder")
CALIBRATION = Path(__file__).resolve().parent / "samples" / "calibration"


def default_export_dir(cfg: ModelConfig) -> Path:
    """Per-user cache folder keyed by source, revision, weight format and how the graphs are quantised."""
    root = Path(os.environ.get("KOSMOS_ANNOTATE_CACHE") or Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kosmos-annotate")
    source = cfg.source
    if Path(source).is_dir():
        source = str(Path(source).resolve())
    slug = re.sub(r"[^A-Za-z0-9._-]+", "--", source.strip("/"))[-80:]
    key = hashlib.sha256(f"{source}@{cfg.revision}".encode()).hexdigest()[:8]
    # An image encoder with int8 weights only, or a static int8 decoder, gets a folder of its own:
    # switching does not replace the other export (auto differs between CPUs sharing a cache).
    encoder = "-encoder-weights" if cfg.compressed and not cfg.quantize_image_encoder else ""
    decoder = "-static-decoder" if cfg.static_text_decoder else ""
    return root / f"{slug}-{key}-{cfg.weight_format}{encoder}{decoder}"


def export_dir(cfg: ModelConfig) -> Path:
    return Path(cfg.dir).expanduser() if cfg.dir else default_export_dir(cfg)


def _source_fingerprint(cfg: ModelConfig) -> dict:
    """What identifies the checkpoint: for a local folder, the config's hash and the weight files' stats."""
    source = Path(cfg.source).expanduser()
    if not source.is_dir():
        return {"source": cfg.source, "revision": cfg.revision}
    config = source / "config.json"
    if not config.is_file():
        raise ConfigError(f"model.source={cfg.source!r} is a folder without config.json: not a save_pretrained checkpoint")
    weights = sorted(p for p in source.iterdir() if p.suffix in (".safetensors", ".bin"))
    return {
        "source": str(source.resolve()),
        "revision": cfg.revision,
        "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
        "weights": {p.name: [p.stat().st_size, int(p.stat().st_mtime)] for p in weights},
    }


def _wanted(cfg: ModelConfig) -> dict:
    key = {"format_version": FORMAT_VERSION, "weight_format": cfg.weight_format}
    if cfg.compressed:
        key["quantize_image_encoder"] = cfg.quantize_image_encoder
    if cfg.static_text_decoder:  # only then, so that exports made before it existed still match
        key["quantize_text_decoder"] = True
    return {**key, **_source_fingerprint(cfg)}


def read_manifest(path: Path) -> dict | None:
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def stale_reason(cfg: ModelConfig, path: Path) -> str | None:
    """None if `path` holds a complete export matching `cfg`; otherwise why not."""
    manifest = read_manifest(path)
    if manifest is None:
        return "no export" if not path.exists() else "no complete manifest (a half-written export?)"
    wanted, have = _wanted(cfg), manifest.get("key", {})
    for key in [*wanted, *(k for k in have if k not in wanted)]:
        if have.get(key) != wanted.get(key):
            return f"{key} changed ({have.get(key)!r} -> {wanted.get(key)!r})"
    for name, size in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{name} is missing or truncated"
    return None


def ensure_export(cfg: ModelConfig, engine: EngineConfig | None = None) -> Path:
    """Export unless `model.dir` already holds a matching export; returns the folder. `engine` gives
    the device and threads that the check after exporting runs with.

    Shards started together (a cluster job, `-m cluster=local`) would each export the checkpoint:
    an flock beside the folder lets exactly one export while the others wait and then load it.
    """
    cfg.validate()
    path = export_dir(cfg)
    if stale_reason(cfg, path) is None:
        log.info("Using the export in %s", path)
        return path

    def waiting() -> None:
        log.info("Another process is exporting to %s; waiting for it", path)

    with flock(_lock(path), on_wait=waiting):
        reason = stale_reason(cfg, path)
        if reason is None:
            log.info("Using the export in %s", path)
            return path
        log.info(
            "No usable export in %s (%s): exporting %s as %s first (minutes: the full-size model took 3 to 6 on 2 cores)",
            path, reason, cfg.source, cfg.weight_format,
        )
        _export(cfg, path, engine or EngineConfig())
    return path


def _lock(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


# --------------------------------------------------------------------------- loading


def load_checkpoint(cfg: ModelConfig):
    """The transformers model (fp32, eval) and processor, from the hub or a local folder."""
    from transformers import AutoProcessor, Kosmos2ForConditionalGeneration

    kwargs = {"revision": cfg.revision} if cfg.revision else {}
    try:
        processor = AutoProcessor.from_pretrained(cfg.source, **kwargs)
        model = Kosmos2ForConditionalGeneration.from_pretrained(
            cfg.source, dtype="float32", use_safetensors=True, attn_implementation="eager", **kwargs
        )
    except OSError as e:
        local = Path(cfg.source).expanduser().is_dir()
        hint = (
            "check that the folder holds a save_pretrained checkpoint (config.json, model.safetensors, processor files)"
            if local
            else "if this machine is offline, download the checkpoint elsewhere (save_pretrained) and set "
            "model.source=/path/to/that/folder"
        )
        raise ConfigError(f"cannot load model.source={cfg.source!r}: {str(e).splitlines()[0]}; {hint}") from None
    return model.eval(), processor


# --------------------------------------------------------------------------- graphs


def _torch_modules(model):
    """The three torch wrappers whose forward is exactly what each graph computes."""
    import torch
    import torch.nn.functional as F

    class ImageEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            # get_image_features: vision tower, post_layernorm, normalize, projection. Only the embeddings
            # are returned (the projection's attention weights would be None under sdpa).
            return self.model.get_image_features(pixel_values, return_dict=True).pooler_output

    class TokenEmbedder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed(input_ids)

    text = model.text_model.model

    class TextDecoder(torch.nn.Module):
        """Kosmos-2's text transformer with flat per-layer key/value tensors instead of a Cache object.

        Position ids come in from the caller, who counts real tokens only, so left padding changes
        nothing. A query may always attend to itself: a padding row is then never fully masked (no NaN
        that could leak into the cache), and real rows give padding keys exactly zero weight.
        """

        def __init__(self):
            super().__init__()
            self.text = text
            self.lm_head = model.text_model.lm_head
            self.register_buffer("positions", text.embed_positions.weights.clone(), persistent=False)

        def forward(self, inputs_embeds, attention_mask, position_ids, *past):
            batch, length, width = inputs_embeds.shape
            hidden = inputs_embeds * self.text.embed_scale + self.positions[position_ids]
            total = attention_mask.shape[1]
            query_pos = torch.arange(length, device=hidden.device).unsqueeze(1) + (total - length)
            key_pos = torch.arange(total, device=hidden.device).unsqueeze(0)
            allowed = (key_pos <= query_pos).unsqueeze(0) & attention_mask.bool().unsqueeze(1)
            allowed = allowed | (key_pos == query_pos).unsqueeze(0)
            bias = torch.zeros(allowed.shape, dtype=hidden.dtype).masked_fill(~allowed, torch.finfo(hidden.dtype).min)
            bias = bias.unsqueeze(1)
            present = []
            for i, layer in enumerate(self.text.layers):
                attn = layer.self_attn
                x = layer.self_attn_layer_norm(hidden)
                heads = (batch, length, attn.num_heads, attn.head_dim)
                q = attn.q_proj(x).view(heads).transpose(1, 2)
                k = torch.cat([past[2 * i], attn.k_proj(x).view(heads).transpose(1, 2)], dim=2)
                v = torch.cat([past[2 * i + 1], attn.v_proj(x).view(heads).transpose(1, 2)], dim=2)
                present += [k, v]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.scaling)
                out = attn.out_proj(attn.inner_attn_ln(out.transpose(1, 2).reshape(batch, length, width)))
                hidden = hidden + out
                hidden = hidden + layer.ffn(layer.final_layer_norm(hidden))
            logits = self.lm_head(self.text.layer_norm(hidden[:, -1, :]))
            return (logits, *present)

    return ImageEncoder().eval(), TokenEmbedder().eval(), TextDecoder().eval()


def convert(model) -> dict:
    """Trace the three wrappers into OpenVINO models (fp32)."""
    import openvino as ov
    import torch

    image_encoder, token_embedder, _ = _torch_modules(model)
    size = model.config.vision_config.image_size
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about frozen Python branches, expected here
        ov_image = ov.convert_model(
            image_encoder,
            example_input=torch.zeros(2, 3, size, size),
            input=[("pixel_values", ov.PartialShape([-1, 3, size, size]), ov.Type.f32)],
        )
        ov_embed = ov.convert_model(
            token_embedder,
            example_input=torch.ones(2, 3, dtype=torch.int64),
            input=[("input_ids", ov.PartialShape([-1, -1]), ov.Type.i64)],
        )
    ov_image.outputs[0].get_tensor().set_names({"image_embeds"})
    ov_embed.outputs[0].get_tensor().set_names({"inputs_embeds"})
    return {"image_encoder": ov_image, "token_embedder": ov_embed, "text_decoder": convert_text_decoder(model)}


def convert_text_decoder(model):
    """Trace the decoder wrapper (fp32). It takes its KV cache as inputs, as quantisation calibrates
    it; `make_stateful` moves the cache into its state."""
    import openvino as ov
    import torch

    text_decoder = _torch_modules(model)[2]
    cfg = model.config
    width = cfg.text_config.embed_dim
    heads = cfg.text_config.attention_heads
    layers = cfg.text_config.layers

    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer chatter about frozen Python branches, expected here
        # Trace with a multi-token input and a non-empty cache, so one graph serves prefill and decode.
        batch, length, past_len = 2, 3, 2
        kv = torch.zeros(batch, heads, past_len, width // heads)
        example = (
            torch.zeros(batch, length, width),
            torch.ones(batch, past_len + length, dtype=torch.int64),
            torch.arange(length, dtype=torch.int64).expand(batch, length) + 2,
            *[kv] * (2 * layers),
        )
        names = ["inputs_embeds", "attention_mask", "position_ids"]
        shapes = [([-1, -1, width], ov.Type.f32), ([-1, -1], ov.Type.i64), ([-1, -1], ov.Type.i64)]
        for i in range(layers):
            names += [f"past.{i}.key", f"past.{i}.value"]
            shapes += [([-1, heads, -1, width // heads], ov.Type.f32)] * 2
        ov_decoder = ov.convert_model(
            text_decoder, example_input=example, input=[(ov.PartialShape(s), t) for s, t in shapes]
        )
    for port, name in zip(ov_decoder.inputs, names):
        port.get_tensor().set_names({name})
    ov_decoder.outputs[0].get_tensor().set_names({"logits"})
    for i in range(layers):
        ov_decoder.outputs[1 + 2 * i].get_tensor().set_names({f"present.{i}.key"})
        ov_decoder.outputs[2 + 2 * i].get_tensor().set_names({f"present.{i}.value"})
    return ov_decoder


def make_stateful(ov_model) -> None:
    """Move the KV cache into the infer request's state, reordered by a new `beam_idx` input.

    Each cache input first passes through Gather(beam_idx) on the batch axis, so the runtime can drop
    finished rows; each state starts from zeros whose batch comes from `inputs_embeds` (a ReadValue
    without an initializer does not compile on CPU).
    """
    import numpy as np
    import openvino as ov
    from openvino import opset13 as ops
    from openvino._offline_transformations import apply_make_stateful_transformation

    layers = sum(port.get_any_name().endswith(".key") for port in ov_model.inputs)
    beam_idx = ops.parameter(ov.PartialShape([-1]), ov.Type.i32, name="beam_idx")
    beam_idx.output(0).get_tensor().set_names({"beam_idx"})
    ov_model.add_parameters([beam_idx])
    pairs = {}
    for i in range(layers):
        for part in ("key", "value"):
            port = ov_model.input(f"past.{i}.{part}")
            consumers = port.get_target_inputs()
            gathered = ops.gather(port, beam_idx, ops.constant(np.int64(0)))
            for consumer in consumers:
                consumer.replace_source_output(gathered.output(0))
            pairs[f"past.{i}.{part}"] = f"present.{i}.{part}"
    ov_model.validate_nodes_and_infer_types()
    apply_make_stateful_transformation(ov_model, pairs)

    embeds = ov_model.input("inputs_embeds")
    batch = ops.gather(ops.shape_of(embeds, output_type="i64"), ops.constant(np.array([0])), ops.constant(np.int64(0)))
    for op in ov_model.get_ops():
        if op.get_type_name() == "ReadValue":
            shape = op.get_output_partial_shape(0)
            dims = [batch] + [ops.constant(np.array([d.get_length() if d.is_static else 0])) for d in list(shape)[1:]]
            zeros = ops.broadcast(ops.constant(np.float32(0)), ops.concat(dims, axis=0))
            op.set_arguments([zeros])
    ov_model.validate_nodes_and_infer_types()


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
    adjust = AdvancedCompressionParameters(group_size_fallback_mode=GroupSizeFallbackMode.ADJUST, min_adjusted_group_size=16)
    out = {}
    with nncf_on_stderr():
        for name, ov_model in models.items():
            if name == "image_encoder" and cfg.quantize_image_encoder:
                out[name] = quantize_image_encoder(ov_model, processor)
            elif name == "text_decoder" and cfg.static_text_decoder:
                out[name] = quantize_text_decoder(ov_model, decoder_calibration(model, processor))
            elif cfg.weight_format == "int4" and name == "text_decoder":
                out[name] = nncf.compress_weights(
                    ov_model, mode=nncf.CompressWeightsMode.INT4_ASYM, group_size=128, ratio=1.0, advanced_parameters=adjust
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
        views += [image.crop(box) for box in ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h))]
        views.append(image.crop((w // 4, h // 4, w - w // 4, h - h // 4)))
    return views


def quantize_image_encoder(ov_model, processor):
    """Static int8: the encoder's matrix products take int8 activations at scales fixed by calibration
    (NNCF, SmoothQuant first, as for transformers), so none are computed per call. 1.42x weight-only
    int8 with dynamic quantisation on 2 AMD cores (bench/image_encoder.py). int8 products sum exactly,
    so an image's embeddings do not depend on its batch (its tokens: tests/test_engine.py)."""
    import nncf

    pixels = processor.image_processor(calibration_views(), return_tensors="np")["pixel_values"]
    dataset = nncf.Dataset([pixels[i : i + 1] for i in range(len(pixels))])
    return nncf.quantize(ov_model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(pixels))


def quantize_text_decoder(ov_model, samples: list[dict]):
    """Static int8 for the text decoder (NNCF, SmoothQuant first): on AMX CPUs its matrix products then
    run AMX int8 kernels instead of AVX-512 ones on int8 activations quantised at every call (prefill
    2.3x, decode steps 1.34x; bench/profile_ops.py).

    The lm_head keeps int8 weights only, its input unquantised: with static scales there too, the
    full-size model (random weights) chose another first token on 2 of the 3 sample photos; without,
    3 of 3 were transformers' own, for a decode step 3 % slower (bench/static_decoder_variants.py, bench/results/profile_ops-static-decoder-variants-amx-20261205.txt)."""
    import nncf

    head = nncf.IgnoredScope(names=[logits_matmul(ov_model)])
    quantized = nncf.quantize(ov_model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                              subset_size=len(samples), ignored_scope=head)
    return nncf.compress_weights(quantized, mode=nncf.CompressWeightsMode.INT8_ASYM)  # the lm_head's, the only ones left


def decoder_calibration(model, processor) -> list[dict]:
    """The text decoder's inputs for each calibration view: its prompt followed by transformers' greedy
    caption of it, in one pass each, as the engine feeds them. The scales must cover the caption's
    tokens (words, phrase and box tokens), not only the image and the prompt."""
    import numpy as np
    import torch

    from pipeline.verify import MAX_NEW_TOKENS, PROMPT

    views = calibration_views()
    inputs = processor(text=[PROMPT] * len(views), images=views, return_tensors="pt")
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
            samples.append({
                "inputs_embeds": embeds[None].numpy(),
                "attention_mask": np.ones((1, len(ids)), np.int64),
                "position_ids": np.arange(len(ids))[None] + processor.tokenizer.pad_token_id + 1,  # as the engine counts
                **past,
            })
    return samples


def logits_matmul(ov_model) -> str:
    """The name of the lm_head's MatMul: the first one up from the `logits` output."""
    node = ov_model.output("logits").get_node()
    while node.get_type_name() != "MatMul":
        node = node.input_value(0).get_node()
    return node.get_friendly_name()


# --------------------------------------------------------------------------- writing


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("transformers", "openvino", "nncf", "torch"):
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            out[package] = None
    return out


def _export(cfg: ModelConfig, path: Path, engine: EngineConfig) -> None:
    started = time.perf_counter()
    model, processor = load_checkpoint(cfg)
    if model.config.latent_query_num != 64:
        raise ConfigError(f"model.source={cfg.source!r} has latent_query_num={model.config.latent_query_num}; Kosmos-2 uses 64")
    models = compress(convert(model), cfg, model, processor)
    make_stateful(models["text_decoder"])

    path.parent.mkdir(parents=True, exist_ok=True)
    _refuse_foreign_folder(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    try:
        _save(models, tmp, cfg)
        processor.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        manifest = {
            "key": _wanted(cfg),
            "static_text_decoder": cfg.static_text_decoder,
            "resolved_commit": getattr(model.config, "_commit_hash", None),
            "versions": _versions(),
            "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        _write_manifest(tmp, manifest, started)  # the check loads the export as a run does
        if cfg.verify_after_export:
            record = _verify(tmp, model, processor, cfg, engine)
            if cfg.static_text_decoder and record.get("identical") != len(record.get("images", [])):
                record = _weights_only_decoder(tmp, manifest, record, model, processor, cfg, engine, started)
            manifest["verification"] = record
            _write_manifest(tmp, manifest, started)
        _replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("Exported to %s in %.1f s", path, time.perf_counter() - started)


def _save(models: dict, folder: Path, cfg: ModelConfig) -> None:
    import openvino as ov

    for name, ov_model in models.items():
        ov.save_model(ov_model, folder / f"{name}.xml", compress_to_fp16=cfg.weight_format == "fp16")


def _write_manifest(folder: Path, manifest: dict, started: float) -> None:
    manifest["export_seconds"] = round(time.perf_counter() - started, 1)
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def _weights_only_decoder(folder: Path, manifest: dict, record: dict, model, processor, cfg: ModelConfig, engine: EngineConfig, started: float) -> dict:
    """A static int8 decoder is kept only if every sample caption is transformers' own: where it is
    not, the decoder is exported again with int8 weights only (as `model.quantize_text_decoder=false`)
    and checked again; the manifest keeps what the static one scored."""
    log.warning(
        "The text decoder quantised statically (model.quantize_text_decoder) gave %s of %s sample captions identical "
        "to transformers: exporting it with int8 weights only instead", record.get("identical"), len(record.get("images", [])),
    )
    weights = replace(cfg, quantize_text_decoder="false")
    decoder = compress({"text_decoder": convert_text_decoder(model)}, weights, model, processor)["text_decoder"]
    make_stateful(decoder)
    _save({"text_decoder": decoder}, folder, cfg)
    shutil.rmtree(folder / "_cache", ignore_errors=True)  # compiled from the static decoder
    manifest["static_text_decoder"] = False
    manifest["static_text_decoder_rejected"] = record.get("summary") or record.get("error")
    _write_manifest(folder, manifest, started)
    return _verify(folder, model, processor, weights, engine)


def _verify(path: Path, model, processor, cfg: ModelConfig, engine: EngineConfig) -> dict:
    """The check of pipeline/verify.py as a manifest record. A check that crashes is reported and
    recorded, never allowed to throw away the export it checks."""
    from pipeline.verify import as_record, report, verify

    try:
        result = verify(path, model, processor, cfg.weight_format, engine, cfg.min_identical)
    except Exception as e:  # noqa: BLE001 - the export stays usable; the record says what went wrong
        log.exception("The check of the export against transformers failed to run")
        return {"error": f"{type(e).__name__}: {e}", "passed": False}
    report(result)
    return as_record(result)


def verify_existing(cfg: ModelConfig, engine: EngineConfig, path: Path) -> dict:
    """Check an existing export again (the checkpoint is loaded) and record it in its manifest."""
    model, processor = load_checkpoint(cfg)
    with flock(_lock(path)):
        record = _verify(path, model, processor, cfg, engine)
        manifest = read_manifest(path)
        manifest["verification"] = record
        write_text(path / MANIFEST, json.dumps(manifest, indent=2))
    return record


def _refuse_foreign_folder(path: Path) -> None:
    """Never replace a folder that is not ours: it must be absent, empty, or hold our files."""
    if not path.is_dir() or not any(path.iterdir()):
        return
    ours = (path / MANIFEST).exists() or any((path / f"{g}.xml").exists() for g in GRAPHS)
    if not ours:
        raise ConfigError(f"model.dir={str(path)!r} holds other files and is not a kosmos-annotate export; choose an empty or new folder")


def _replace(tmp: Path, path: Path) -> None:
    """Rename the finished export into place; an older export is moved aside first, then removed."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        path.rename(old)
    tmp.rename(path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- command


@dataclass
class ExportConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)  # device and threads of the check
    verify: bool = False  # check an existing export against transformers again (loads the checkpoint)


def main() -> None:
    from pipeline.cli import command
    from pipeline.verify import VerificationFailed

    def work(cfg: ExportConfig) -> None:
        cfg.model.validate()
        fresh = stale_reason(cfg.model, export_dir(cfg.model)) is not None  # the export checks itself
        path = ensure_export(cfg.model, cfg.engine)
        record = verify_existing(cfg.model, cfg.engine, path) if cfg.verify and not fresh else read_manifest(path).get("verification")
        print(f"Export ready: {path}")
        if record:
            print(f"Verification: {record.get('summary') or record.get('error')}")
        if cfg.verify and not (record or {}).get("passed"):
            raise VerificationFailed(f"see {path / MANIFEST} (verification)")

    command("export", work, log, schema=ExportConfig)


if __name__ == "__main__":
    main()
