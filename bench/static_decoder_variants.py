"""Which static int8 text decoder passes the export's check? (model.quantize_text_decoder)

    python bench/static_decoder_variants.py     # about 10 minutes on 2 cores
    python bench/profile_ops.py --export ~/.cache/kosmos-annotate/bench/static-decoder-0   # its kernels (1, 2: the others), ms a step

Quantises the full-size decoder (random weights) statically three ways, each from the same
calibration set the export builds, puts each into a copy of the int8 export and runs the export's
check (pipeline/verify.py: three sample photos captioned by transformers fp32 and by the export):

- what the export does: SmoothQuant, then static scales everywhere but the lm_head, whose weights
  are then compressed to int8 (its input quantised per call, as in a weights-only decoder);
- static scales on the lm_head's input too;
- no SmoothQuant (its alpha for matrix products -1; NNCF's default is 0.95).

Random weights give near-equal logits, so this is a hard test of the first token; it says nothing of
real captions' quality, which is what the check does on the user's own checkpoint.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))


def main() -> None:
    import nncf
    import openvino as ov

    import pipeline.export as pe
    from export_full_size import CACHE, full_size_checkpoint
    from harness import cpu
    from pipeline.config import EngineConfig, ModelConfig
    from pipeline.verify import verify

    cfg = ModelConfig(source=str(full_size_checkpoint()), dir=str(CACHE / "export-int8-decoder-weights"), weight_format="int8",
                      quantize_text_decoder="false")
    base = pe.ensure_export(cfg)
    model, processor = pe.load_checkpoint(cfg)
    fp32 = pe.convert_text_decoder(model)
    started = time.perf_counter()
    samples = pe.decoder_calibration(model, processor)
    print(f"calibration set: {time.perf_counter() - started:.0f} s", flush=True)

    def static(advanced=None, head=False):
        ignored = None if head else nncf.IgnoredScope(names=[pe.logits_matmul(fp32)])
        quantized = nncf.quantize(fp32.clone(), nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER,
                                  subset_size=len(samples), ignored_scope=ignored, advanced_parameters=advanced)
        return nncf.compress_weights(quantized, mode=nncf.CompressWeightsMode.INT8_ASYM)

    variants = {
        "the export's (lm_head int8 weights only)": lambda: pe.quantize_text_decoder(fp32.clone(), samples),
        "static lm_head too": lambda: static(head=True),
        "no SmoothQuant": lambda: static(nncf.AdvancedQuantizationParameters(
            smooth_quant_alphas=nncf.AdvancedSmoothQuantParameters(matmul=-1))),
    }
    lines = []
    for k, (name, make) in enumerate(variants.items()):
        folder = CACHE / f"static-decoder-{k}"
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(base, folder, ignore=shutil.ignore_patterns("_cache", "text_decoder.*"))
        decoder = make()
        pe.make_stateful(decoder)
        ov.save_model(decoder, folder / "text_decoder.xml")
        manifest = json.loads((folder / pe.MANIFEST).read_text())
        (folder / pe.MANIFEST).write_text(json.dumps({**manifest, "static_text_decoder": True}))
        result = verify(folder, model, processor, "int8", EngineConfig(), cfg.min_identical)
        size = (folder / "text_decoder.bin").stat().st_size / 1e9
        lines.append(f"| {name} | {result.identical} of {len(result.images)} | {result.first_difference} | {size:.2f} GB | {folder.name} |")
        print(lines[-1], flush=True)
    print(f"\n{cpu()}\nfull-size architecture, random weights; the export's check (greedy, up to 64 tokens)")
    print("| decoder | captions identical to transformers fp32 | first token that differs | text_decoder.bin | folder |")
    print("| --- | --- | --- | --- | --- |\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
