"""Hugging Face Kosmos-2 -> three OpenVINO graphs, each doing all of its own math, so a run needs
neither torch nor transformers' model code:

    image_encoder   pixel_values[B,3,224,224] -> image embeddings[B,64,D]
                    (vision tower, post_layernorm, L2 normalisation, image-to-text projection)
    token_embedder  input_ids[B,T] -> token embeddings[B,T,D]  (unscaled, as `embed_tokens` gives them)
    text_decoder    inputs_embeds, attention_mask, position_ids, beam_idx -> logits of the last position;
                    stateful: the KV cache lives in the infer request, `beam_idx` reorders or drops its
                    rows (a run rewrites it for paged attention at load time: model.runtime.paged_decoder).
"""

from __future__ import annotations

import warnings


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
