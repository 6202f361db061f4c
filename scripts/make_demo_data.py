"""Builds data/demo/digits.parquet, the demo's bundled sample, from ../shared/data/mnist.

Run once by a developer (needs pyarrow and numpy); the output is committed so that a fresh
clone needs neither this script nor ../shared. The sample is 1,980 MNIST training digits
(rows 0..1979, unchanged) and 20 frames made from rows 1980..1999 to be anomalies a camera
might produce: 10 inverted (255 - x) and 10 with 25% of pixels replaced by seeded noise.
The `condition` column says which is which, so a reader of the demo's tables can check
what was flagged.
"""

import pathlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

here = pathlib.Path(__file__).resolve().parent.parent
src = here.parent.parent / "shared" / "data" / "mnist" / "train.parquet"
if not src.exists():
    src = here.parent / "shared" / "data" / "mnist" / "train.parquet"
table = pq.read_table(src).slice(0, 2000)
ids = table.column("id").to_pylist()
labels = table.column("label").to_pylist()
storage = table.column("image").combine_chunks().storage
pixels = np.asarray(storage.flatten(), dtype=np.uint8).reshape(2000, 784).copy()

rng = np.random.default_rng(0)
condition = ["normal"] * 2000
for i in range(1980, 1990):
    pixels[i] = 255 - pixels[i]
    condition[i] = "inverted"
for i in range(1990, 2000):
    mask = rng.random(784) < 0.25
    pixels[i][mask] = rng.integers(0, 256, size=mask.sum(), dtype=np.uint8)
    condition[i] = "noise"

tensor_type = pa.fixed_shape_tensor(pa.uint8(), [28, 28], dim_names=["height", "width"])
image = pa.ExtensionArray.from_storage(
    tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 784)
)
out = pa.table(
    {
        "id": pa.array(ids, pa.string()),
        "label": pa.array(labels, pa.uint8()),
        "condition": pa.array(condition, pa.string()),
        "image": image,
    }
)
dest = here / "data" / "demo" / "digits.parquet"
pq.write_table(out, dest, compression="zstd", row_group_size=500)
print(f"wrote {dest} ({dest.stat().st_size} bytes, {out.num_rows} rows)")
