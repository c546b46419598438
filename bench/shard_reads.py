"""Bytes a shard reads from a parquet manifest of image bytes, against the manifest's size.

    python -m bench.shard_reads [--rows 10000] [--kb 10] [--row-group 100] [--id-column]

Builds a manifest of random (incompressible) image bytes, then reads it the way a run's source does
(`sources.iter_items` for one shard, with the run's keep-predicate: not yet done) and counts the
bytes the process read (`rchar` in /proc/self/io), for: 8 shards of a fresh run, and a rerun of a run
that finished 99 % of its rows; each next to a plain read of everything (the baseline, in the same run).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from bench.harness import argument_parser
from pipeline.config import InputConfig
from pipeline.sources import iter_items


def rchar() -> int:
    return int(
        next(line for line in Path("/proc/self/io").read_text().splitlines() if line.startswith("rchar")).split()[1]
    )


def read(cfg: InputConfig, keep=None) -> int:
    before = rchar()
    for _ in iter_items(cfg, keep):
        pass
    return rchar() - before


def main() -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    parser = argument_parser(__spec__.name, __doc__)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--kb", type=int, default=10)
    parser.add_argument("--row-group", type=int, default=100)
    parser.add_argument("--id-column", action="store_true", help="ids from a string column (read by every shard)")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp())
    path = folder / "manifest.parquet"
    with pq.ParquetWriter(
        path, pa.schema([("image", pa.binary()), ("key", pa.string())]), compression="none"
    ) as writer:
        for start in range(0, args.rows, args.row_group):
            n = min(args.row_group, args.rows - start)
            images = [os.urandom(args.kb * 1000) for _ in range(n)]
            writer.write_table(
                pa.table({"image": images, "key": [f"sample-{start + i:09d}" for i in range(n)]}),
                row_group_size=args.row_group,
            )
    size = path.stat().st_size
    id_column = "key" if args.id_column else None
    cfg = InputConfig(kind="parquet", path=str(path), id_column=id_column)
    ids = [item.id for item in iter_items(cfg, keep=lambda _: False)]
    print(
        f"manifest: {args.rows} rows x {args.kb} KB, row groups of {args.row_group}, "
        f"ids {'from a string column' if id_column else 'by row'}: {size / 1e6:.1f} MB"
    )

    plain = read(cfg)
    print(f"plain read of everything (baseline):          {plain / size:.3f} x the manifest")
    shards = 8
    total = sum(
        read(InputConfig(kind="parquet", path=str(path), id_column=id_column, num_shards=shards, shard_index=k))
        for k in range(shards)
    )
    print(f"{shards} shards, fresh run, all shards together:    {total / size:.3f} x ({total / plain:.2f} x baseline)")
    done = set(ids[: int(0.99 * len(ids))])
    rerun = read(cfg, lambda i: i not in done)
    print(f"rerun of a 99 % finished run (one shard):     {rerun / size:.3f} x ({rerun / plain:.3f} x baseline)")
    path.unlink()


if __name__ == "__main__":
    main()
