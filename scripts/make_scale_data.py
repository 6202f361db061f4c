#!/usr/bin/env python3
"""Tiled MNIST for the scale benchmark (scripts/scale.py): N images made by repeating the
shared MNIST training digits with fresh ids, as a fixed_shape_tensor column, in row groups of
10,000 rows. Needs ../shared/data/mnist/train.parquet (not in the repository); exits 0 with a
message without it.

    python3 scripts/make_scale_data.py 200000 /tmp/scale-200k.parquet
"""
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist", "train.parquet")
ROW_GROUP = 10_000


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    n, out = int(sys.argv[1]), sys.argv[2]
    if not os.path.exists(MNIST):
        print(f"skipped: {MNIST} is not here (the shared data is not part of the repository)")
        return
    digits = pq.read_table(MNIST, columns=["id", "label", "image"])
    base = digits.num_rows
    writer = None
    written = 0
    while written < n:
        take = min(ROW_GROUP, n - written)
        start = written % base
        take = min(take, base - start)
        chunk = digits.slice(start, take)
        ids = pa.array([f"t{(written + i) // base}-{start + i}" for i in range(take)])
        chunk = chunk.set_column(0, "id", ids)
        if writer is None:
            writer = pq.ParquetWriter(out, chunk.schema, compression="zstd")
        writer.write_table(chunk, row_group_size=ROW_GROUP)
        written += take
    writer.close()
    print(f"{out}: {written} images")


if __name__ == "__main__":
    main()
