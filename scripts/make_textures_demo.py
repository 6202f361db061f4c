"""Builds data/demo/textures.parquet, the textures demo's bundled sample, from ../shared/data.

Run once by a developer (needs pyarrow and numpy); the output is committed so that a fresh clone
needs neither this script nor ../shared. The sample is 480 RGB 32x32 patches of the
immunohistochemistry texture (rows 0..479 of textures/ihc-train.parquet, unchanged) and 20
patches made from rows 480..499 to be defects (scripts/defects.py): 5 each of scratch, hole,
stain, and a square of brick (textures/brick-train.parquet row 0..4, grey as RGB). The
`condition` column says which is which.
"""

import pathlib
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

here = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(here / "scripts"))
import defects  # noqa: E402

shared = here.parent / "shared" / "data" / "textures"


def pixels_of(table):
    col = table.column("image").combine_chunks()
    return np.asarray(col.storage.flatten(), dtype=np.uint8).reshape([table.num_rows, *col.type.shape])


ihc = pq.read_table(shared / "ihc-train.parquet").slice(0, 500)
brick = pixels_of(pq.read_table(shared / "brick-train.parquet").slice(0, 5))
pixels = pixels_of(ihc).copy()
ids = ihc.column("id").to_pylist()
condition = ["normal"] * 500
rng = np.random.default_rng(0)
for j, kind in enumerate(defects.DEFECTS):
    for i in range(480 + 5 * j, 485 + 5 * j):
        other = np.repeat(brick[i % 5][..., None], 3, axis=-1)
        pixels[i] = defects.damage(kind, pixels[i], rng, other)
        condition[i] = kind

tensor_type = pa.fixed_shape_tensor(pa.uint8(), [32, 32, 3], dim_names=["height", "width", "channels"])
image = pa.ExtensionArray.from_storage(
    tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), 32 * 32 * 3)
)
out = pa.table(
    {
        "id": pa.array(ids, pa.string()),
        "condition": pa.array(condition, pa.string()),
        "image": image,
    }
)
dest = here / "data" / "demo" / "textures.parquet"
pq.write_table(out, dest, compression="zstd", row_group_size=125)
print(f"wrote {dest} ({dest.stat().st_size} bytes, {out.num_rows} rows)")
