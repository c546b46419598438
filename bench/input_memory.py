"""Memory that an input's shape costs a run, over the process's own before it reads: the figures
behind the README's memory formula.

    python -m bench.input_memory [--before CHECKOUT] [--rounds 3]

Cases, each in a child process of its own (VmHWM over the child's peak once imported):
- `manifest`: 1 GB of incompressible image bytes (256 rows of 4 MB) in one row group, as
  `pyarrow.parquet.write_table` writes by default (its dictionary page holds every value, 1 GB);
  read through `sources.iter_items` to its end. `manifest64`: the same written with
  `write_batch_size=64`, as the README advises (pages of 64 values).
- `tar`: a tar whose first sample declares a 1 GiB member (sparse on disk), then a small image.
- `grey16`, `grey8`: one 48 Mpx (8000x6000) grayscale PNG, 16 and 8 bits, opened as a run decodes.

`--before CHECKOUT` runs the same cases with another checkout's pipeline (this file is copied into
its bench/ for the run): the ratio is the change. Prints medians of `--rounds` in MB.
"""

from __future__ import annotations

import inspect
import io
import shutil
import statistics
import tarfile
import tempfile
from pathlib import Path

from bench.harness import REPO, argument_parser, child_arguments, child_main, cpu, peak_rss_kib, run_child

CASES = ("manifest", "manifest64", "tar", "grey16", "grey8")


def make_inputs(folder: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    rng = np.random.default_rng(0)
    images = [rng.bytes(4 << 20) for _ in range(256)]
    table = pa.table({"image": pa.array(images, pa.binary())})
    pq.write_table(table, folder / "manifest.parquet")
    pq.write_table(table, folder / "manifest64.parquet", write_batch_size=64)
    with open(folder / "sparse.tar", "wb") as raw:
        big = tarfile.TarInfo("a.json")
        big.size = 1 << 30
        raw.write(big.tobuf())
        raw.seek(big.size, 1)  # a hole the size of the member: 10 KB on disk
        with tarfile.open(fileobj=raw, mode="w") as tar:  # goes on from here
            small = tarfile.TarInfo("b.jpg")
            small.size = 3
            tar.addfile(small, io.BytesIO(b"jpg"))
    ramp = np.linspace(0, 65535, 8000, dtype=np.uint16)[None, :].repeat(6000, axis=0)
    Image.fromarray(ramp).save(folder / "grey16.png")
    Image.fromarray((ramp // 257).astype(np.uint8)).save(folder / "grey8.png")


def case(args) -> dict:
    """In a child: read one input the way a run does; its peak over the peak once everything is imported."""
    from pipeline.config import InputConfig
    from pipeline.sources import iter_items

    try:
        from pipeline.annotation import decode as decoding
    except ImportError:  # before the package was renamed
        from pipeline.annotate import decode as decoding
    folder = Path(args.images)
    base = peak_rss_kib()
    if args.child.startswith("manifest"):
        path = folder / f"{args.child}.parquet"
        for _ in iter_items(InputConfig(kind="parquet", path=str(path), image_column="image")):
            pass
    elif args.child == "tar":
        for _ in iter_items(InputConfig(kind="webdataset", path=str(folder / "sparse.tar"))):
            pass
    else:
        from pipeline.records import Item

        path = folder / f"{args.child}.png"
        item = Item(id=path.name, source=str(path), path=str(path))
        settings = InputConfig(path=str(folder))
        if list(inspect.signature(decoding.decode).parameters)[2] == "max_pixels":  # before it took the settings
            settings = settings.max_image_pixels
        decoded = decoding.decode(item, lambda image: None, settings)
        assert decoded.error is None, decoded.error
    return {"rise_mb": (peak_rss_kib() - base) / 1024}


def main() -> None:
    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--before", type=Path, help="another checkout, measured the same way")
    parser.add_argument("--rounds", type=int, default=3)
    child_arguments(parser)
    args = parser.parse_args()
    if args.child:
        return child_main(args, case)
    checkouts = {"now": REPO}
    if args.before:
        shutil.copy(Path(__file__), args.before / "bench" / "input_memory.py")
        checkouts = {"before": args.before.resolve(), **checkouts}
    with tempfile.TemporaryDirectory() as tmp:
        make_inputs(Path(tmp))
        rises = {(name, c): [] for name in checkouts for c in CASES}
        for _ in range(args.rounds):
            for name, repo in checkouts.items():
                for c in CASES:
                    rises[name, c].append(run_child(__spec__.name, c, repo=repo, images=tmp)["rise_mb"])
    print("case       " + "".join(f"{name:>12}" for name in checkouts) + ("       ratio" if args.before else ""))
    for c in CASES:
        row = [statistics.median(rises[name, c]) for name in checkouts]
        ratio = f"{row[1] / row[0]:12.2f}" if args.before and row[0] > 0 else ""
        print(f"{c:<11}" + "".join(f"{v:10.0f} MB" for v in row) + ratio)
    print(cpu())


if __name__ == "__main__":
    main()
