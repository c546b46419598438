"""Export the full-size Kosmos-2 architecture (random weights, real shapes) in each weight format.

    python -m bench.export_full_size [--formats fp32 fp16 int8 int4]

Prints, per format, the export time, the peak memory of the exporting process (a child of its own),
the IR size, and the time of one generate call (4 photos x 32 tokens). The random checkpoint and the
exports are the full-size fixture of the other benchmarks (bench/harness.py), built once and cached
under ~/.cache/kosmos-annotate/bench/ (or $KOSMOS_ANNOTATE_CACHE/bench/); an export already there
is reused, and its export time is then only the check that it matches.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from bench.harness import (
    REPO,
    argument_parser,
    child_arguments,
    child_main,
    full_size_checkpoint,
    full_size_export,
    run_child,
)
from pipeline.config import EngineConfig
from pipeline.engine import Engine, Request
from pipeline.model.prompt import CAPTION
from pipeline.model.runtime import KosmosModel


def child(args) -> dict:
    """In the child: export (or find) the format's export, timed."""
    started = time.perf_counter()
    folder = full_size_export(args.weight_format)
    return {"seconds": time.perf_counter() - started, "dir": str(folder)}


def export_in_child(weight_format: str) -> dict:
    result = run_child(__spec__.name, "export", weight_format=weight_format)
    out = Path(result["dir"])
    sizes = {p.name: p.stat().st_size for p in out.glob("*.bin")}
    return {
        "weight_format": weight_format,
        "export_s": round(result["seconds"], 1),
        "peak_rss_gb": round(result["maxrss_kib"] / 2**20, 2),  # ru_maxrss is in KiB
        "ir_gb": round(sum(sizes.values()) / 2**30, 2),
        "ir_files_mb": {k: round(v / 2**20) for k, v in sizes.items()},
        "dir": str(out),
    }


def generate_once(export: Path, images: list[Path]) -> float:
    cfg = EngineConfig(max_new_tokens=32, min_new_tokens=32)
    model = KosmosModel(export, cfg)
    reqs = [Request(model.processor.pixel_values(Image.open(p).convert("RGB")), CAPTION) for p in images]
    t = time.perf_counter()
    outs = list(Engine(model, cfg).generate(reqs))
    assert all(len(o.token_ids) == 32 for o in outs)
    return time.perf_counter() - t


def main() -> None:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--formats", nargs="+", default=["fp32", "fp16", "int8", "int4"])
    child_arguments(parser)
    parser.add_argument("--weight-format", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args, child)
        return
    t = time.perf_counter()
    checkpoint = full_size_checkpoint()
    print(f"checkpoint: {checkpoint} ({time.perf_counter() - t:.0f} s)")
    images = sorted((REPO / "examples" / "images").glob("*.*g"))[:4]
    rows = []
    for fmt in args.formats:
        row = export_in_child(fmt)
        row["generate_4_images_32_tokens_s"] = round(generate_once(Path(row["dir"]), images), 1)
        rows.append(row)
        print(json.dumps(row))
    print(f"{'format':<7} {'export s':>9} {'peak RSS GB':>12} {'IR GB':>7} {'4 img x 32 tok s':>17}")
    for r in rows:
        print(
            f"{r['weight_format']:<7} {r['export_s']:>9} {r['peak_rss_gb']:>12} {r['ir_gb']:>7} "
            f"{r['generate_4_images_32_tokens_s']:>17}"
        )


if __name__ == "__main__":
    main()
