"""Would a statically quantised text decoder pay? A probe of speed, not of captions.

    python bench/static_decoder.py            # builds CACHE/export-int8-static-decoder (3.5 minutes on 2 cores)
    python bench/profile_ops.py --export ~/.cache/kosmos-annotate/bench/export-int8-static-decoder
    python bench/real_lengths.py --images-n 64 --rows 0 --fixed 32 --tf-batches 32 --static-decoder

The engine's decoder has int8 weights and int8 activations quantised at every call (dynamic
quantisation); on AMX its products run in AVX-512 kernels, while the statically quantised image
encoder runs AMX int8 ones. This builds the full-size decoder (random weights) in fp32 without its
KV state, quantises it with NNCF as the export quantises the image encoder (SmoothQuant, scales
fixed by calibration), calibrated on the prompts of the export's calibration photos (image
embeddings from the int8 export's encoder, 71 positions each), makes it stateful again and writes a
copy of the int8 export with this decoder in it. Random weights say nothing of what static scales do
to real captions: that is what the export's check against transformers is for.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def calibration_prompts(export: Path) -> list[np.ndarray]:
    """inputs_embeds [71, D] of `<grounding>An image of` on each calibration view, as the engine builds them."""
    from pipeline.config import EngineConfig
    from pipeline.export import calibration_views
    from pipeline.model import KosmosModel

    model = KosmosModel(export, EngineConfig())
    prompt = model.encode_prompt("<grounding>An image of")
    tokens = model.token_embedder.create_infer_request().infer({"input_ids": prompt.input_ids[None].astype(np.int64)})[0][0]
    encoder = model.image_encoder.create_infer_request()
    embeds = []
    for view in calibration_views():
        chunk = tokens.copy()
        chunk[prompt.image_mask] = encoder.infer({0: model.processor.pixel_values(view)[None]})[0][0]
        embeds.append(chunk)
    return embeds


def record_files(folder: Path) -> None:
    """The copy's manifest lists its own files' sizes, so ensure_export takes the folder as it is
    (bench/real_lengths.py --static-decoder) instead of exporting over it."""
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file() and p.name != "manifest.json"}
    manifest["text_decoder"] = "static int8, bench/static_decoder.py"
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2))


def main() -> None:
    import nncf
    import openvino as ov

    import pipeline.export as export
    from export_full_size import CACHE, full_size_checkpoint
    from pipeline.config import ModelConfig

    checkpoint = str(full_size_checkpoint())
    int8 = export.ensure_export(ModelConfig(source=checkpoint, dir=str(CACHE / "export-int8"), weight_format="int8"))
    out = CACHE / "export-int8-static-decoder"
    started = time.perf_counter()
    prompts = calibration_prompts(int8)

    model, _ = export.load_checkpoint(ModelConfig(source=checkpoint))
    text = model.config.text_config
    layers, heads, head = text.layers, text.attention_heads, text.embed_dim // text.attention_heads
    stateful = export.make_stateful
    export.make_stateful = lambda *a: None  # the graph with its KV cache as inputs, to calibrate
    decoder = export.convert(model)["text_decoder"]
    export.make_stateful = stateful
    del model

    empty = np.zeros((1, heads, 0, head), np.float32)
    samples = [
        {"inputs_embeds": e[None], "attention_mask": np.ones((1, len(e)), np.int64),
         "position_ids": (np.arange(len(e)) + 2)[None], **{f"past.{i}.{p}": empty for i in range(layers) for p in ("key", "value")}}
        for e in prompts
    ]
    print(f"{len(samples)} calibration prompts; converted in {time.perf_counter() - started:.0f} s", flush=True)
    decoder = nncf.quantize(decoder, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples))
    export.make_stateful(decoder, layers)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(int8, out, ignore=shutil.ignore_patterns("text_decoder.*", "_cache"))
    ov.save_model(decoder, out / "text_decoder.xml", compress_to_fp16=False)
    record_files(out)
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s: text_decoder.bin "
          f"{(out / 'text_decoder.bin').stat().st_size / 2**30:.2f} GB", flush=True)


if __name__ == "__main__":
    main()
