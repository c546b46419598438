"""Export the full-size Kosmos-2 architecture (random weights, real shapes) in each weight format.

Run by hand: `python bench/export_full_size.py [--formats fp32 fp16 int8 int4]`. Prints, per format, the
export time, the peak memory of the exporting process, the IR size, and the time of one generate call.
The random checkpoint is built once and cached under ~/.cache/kosmos-annotate/bench/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CACHE = Path(os.environ.get("KOSMOS_ANNOTATE_CACHE", Path.home() / ".cache" / "kosmos-annotate")) / "bench"
REAL_VOCAB = 65037  # microsoft/kosmos-2-patch14-224, processor tokens included


def full_size_checkpoint() -> Path:
    """Kosmos2Config() defaults (the real shapes) with random weights and a 65037-id tokenizer."""
    folder = CACHE / "kosmos2-full-random"
    if (folder / "config.json").exists():
        return folder
    from tests import tiny
    from transformers import Kosmos2Config

    processor = tiny.make_processor(vocab_size=REAL_VOCAB - 1035)
    assert len(processor.tokenizer) == REAL_VOCAB, len(processor.tokenizer)
    model = tiny.make_model(Kosmos2Config(), seed=0)
    return tiny.save_checkpoint(model, processor, folder)


def export_in_child(checkpoint: Path, weight_format: str) -> dict:
    out = CACHE / f"export-{weight_format}"
    code = (
        "import sys, time, logging; sys.path.insert(0, %r);"
        "from pipeline.config import ModelConfig; from pipeline.export import ensure_export;"
        "t = time.perf_counter(); ensure_export(ModelConfig(source=%r, dir=%r, weight_format=%r));"
        "import resource; print('SECONDS', time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    ) % (str(REPO), str(checkpoint), str(out), weight_format)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(proc.stderr[-3000:])
    seconds, peak_kib = proc.stdout.split("SECONDS")[-1].split()
    sizes = {p.name: p.stat().st_size for p in out.glob("*.bin")}
    return {
        "weight_format": weight_format,
        "export_s": round(float(seconds), 1),
        "peak_rss_gb": round(int(peak_kib) / 2**20, 2),  # ru_maxrss is in KiB
        "ir_gb": round(sum(sizes.values()) / 2**30, 2),
        "ir_files_mb": {k: round(v / 2**20) for k, v in sizes.items()},
        "dir": str(out),
    }


def generate_once(export: Path, images: list[Path]) -> float:
    from PIL import Image

    from pipeline.config import EngineConfig
    from pipeline.engine import Engine, Request
    from pipeline.model import KosmosModel

    cfg = EngineConfig(max_new_tokens=32, min_new_tokens=32)
    model = KosmosModel(export, cfg)
    reqs = [
        Request(model.processor.pixel_values(Image.open(p).convert("RGB")), "<grounding>An image of")
        for p in images
    ]
    t = time.perf_counter()
    outs = list(Engine(model, cfg).generate(reqs))
    assert all(len(o.token_ids) == 32 for o in outs)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--formats", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    args = parser.parse_args()
    t = time.perf_counter()
    checkpoint = full_size_checkpoint()
    print(f"checkpoint: {checkpoint} ({time.perf_counter() - t:.0f} s)")
    images = sorted((REPO / "examples" / "images").glob("*.*g"))[:4]
    rows = []
    for fmt in args.formats:
        row = export_in_child(checkpoint, fmt)
        row["generate_4_images_32_tokens_s"] = round(generate_once(Path(row["dir"]), images), 1)
        rows.append(row)
        print(json.dumps(row))
    print(f"{'format':<7} {'export s':>9} {'peak RSS GB':>12} {'IR GB':>7} {'4 img x 32 tok s':>17}")
    for r in rows:
        print(f"{r['weight_format']:<7} {r['export_s']:>9} {r['peak_rss_gb']:>12} {r['ir_gb']:>7} {r['generate_4_images_32_tokens_s']:>17}")


if __name__ == "__main__":
    main()
