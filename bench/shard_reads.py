"""Bytes a shard reads from a parquet manifest of image bytes, against the manifest's size.

    python bench/shard_reads.py [--rows 10000] [--kb 10] [--row-group 100]

Builds a manifest of random (incompressible) image bytes, then reads it the way a run's source does
(`sources.iter_items` with the run's keep-predicate: this shard, not yet done) and counts the bytes
the process read (`rchar` in /proc/self/io), for: 8 shards of a fresh run, and a rerun of a run that
finished 99 % of its rows; each next to a plain read of everything (the baseline, in the same run).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.config import InputConfig  # noqa: E402
from pipeline.sink import id_hash  # noqa: E402
from pipeline.sources import iter_items  # noqa: E402


def rchar() -> int:
    return int(next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1])


def read(cfg: InputConfig, keep=None) -> int:
    before = rchar()
    for _ in iter_items(cfg, keep):
        pass
    return rchar() - before


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--kb", type=int, default=10)
    parser.add_argument("--row-group", type=int, default=100)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    path = folder / "manifest.parquet"
    with pq.ParquetWriter(path, pa.schema([("image", pa.binary())]), compression="none") as writer:
        for start in range(0, args.rows, args.row_group):
            n = min(args.row_group, args.rows - start)
            writer.write_table(pa.table({"image": [os.urandom(args.kb * 1000) for _ in range(n)]}), row_group_size=args.row_group)
    size = path.stat().st_size
    cfg = InputConfig(kind="parquet", path=str(path))
    ids = [item.id for item in iter_items(cfg, keep=lambda _: False)]
    print(f"manifest: {args.rows} rows x {args.kb} KB, row groups of {args.row_group}: {size / 1e6:.1f} MB")

    plain = read(cfg)
    print(f"plain read of everything (baseline):          {plain / size:.3f} x the manifest")
    shards = 8
    total = sum(read(cfg, lambda i, k=k: id_hash(i) % shards == k) for k in range(shards))
    print(f"{shards} shards, fresh run, all shards together:    {total / size:.3f} x ({total / plain:.2f} x baseline)")
    done = set(ids[: int(0.99 * len(ids))])
    rerun = read(cfg, lambda i: i not in done)
    print(f"rerun of a 99 % finished run (one shard):     {rerun / size:.3f} x ({rerun / plain:.3f} x baseline)")
    path.unlink()


if __name__ == "__main__":
    main()
