"""Quality figures of issue 4: bits/dim of the 8-bit models and AUROC against synthetic defects.

Reads ../shared/data (not part of the repository: without it this script says so and exits 0):
- mnist/train.parquet: fit on the first 50,000 rows, measure on the last 10,000;
- textures/brick-train.parquet (grayscale 32x32) and textures/ihc-train.parquet (RGB 32x32):
  fit on the first 80% of rows, measure on the last 20%; then damage the held-out patches with
  each defect of scripts/defects.py and report the AUROC of the NLL, normal held-out patches
  against damaged ones (a higher NLL should mean a defect).
Every model is fitted with `pipeline fit` (5% of the fitting rows held out for early stopping)
and scored with `pipeline score`; pixels stay 8-bit (`preprocess.binarize = "none"`).

    python3 scripts/quality_8bit.py [--data brick] [--model rnade] [--epochs N] [--work DIR]
        [--set KEY=VALUE] [--binary PATH] [--other-scores]

With --other-scores, each model's AUROC is also given for the product's two other score methods,
computed from the same fit: `likelihood_ratio` (NLL minus the NLL of the default background, an
`ar` model with k = 3 over the neighbourhood, fitted here on the same rows) and `complexity`
(NLL minus the PNG length L(x), read off a `categorical` model scored with that method:
L(x) = its NLL − its score).

Needs pyarrow and numpy, and a release build (`cargo build --release`).
"""

import argparse
import pathlib
import subprocess
import sys
import time

MODELS = {
    "categorical": ["model.kind=categorical"],
    "ar": [
        "model.kind=ar", "model.k=12", 'model.context="neighbourhood"', "model.components=5",
        "train.epochs=30", "train.learning_rate=0.01", "train.patience=2", "train.anneal=2",
    ],
    "rnade": [
        "model.kind=rnade", "model.hidden=100", "model.components=10",
        "train.epochs=30", "train.learning_rate=0.001", "train.patience=2", "train.anneal=2",
    ],
    # PixelRNN (issue 16) as `kind = "pixelrnn"` alone gives it: a fit stops after the default
    # hour (`train.max_minutes`) at the latest.
    "pixelrnn": ["model.kind=pixelrnn"],
}

TEMPLATE = """[pipeline]
name = "quality-8bit"
[source]
uri = "{source}"
passthrough = {passthrough}
[preprocess]
binarize = "none"
[model]
kind = "categorical"
[train]
validation_fraction = 0.05
[sink]
uri = "{sink}"
"""


def auroc(normal, anomalous):
    """P(score of an anomaly > score of a normal), ties counting half."""
    import numpy as np

    scores = np.concatenate([normal, anomalous])
    order = scores.argsort(kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    n0, n1 = len(normal), len(anomalous)
    return (ranks[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1)


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", action="append", choices=["mnist", "brick", "ihc"])
    parser.add_argument("--model", action="append", choices=sorted(MODELS))
    parser.add_argument("--work", default="/tmp/anomaly-pipeline-quality-8bit")
    parser.add_argument("--epochs", type=int, help="override train.epochs of the trained models")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="added to every model's settings")
    parser.add_argument("--binary", help="the pipeline executable (default: target/release/pipeline)")
    parser.add_argument("--other-scores", action="store_true", help="also the likelihood-ratio and complexity AUROCs")
    args = parser.parse_args()
    shared = here.parent / "shared" / "data"
    if not shared.exists():
        print(f"skipped: {shared} is not here (the shared data is not in the repository)")
        return 0
    try:
        import numpy as np
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        print("skipped: pyarrow and numpy are needed (pip install pyarrow numpy)")
        return 0
    sys.path.insert(0, str(here / "scripts"))
    import defects

    binary = pathlib.Path(args.binary) if args.binary else here / "target" / "release" / "pipeline"
    if not binary.exists():
        print("build first: cargo build --release", file=sys.stderr)
        return 1
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    def pixels_of(table):
        col = table.column("image").combine_chunks()
        shape = col.type.shape
        flat = np.asarray(col.storage.flatten(), dtype=np.uint8)
        return flat.reshape([table.num_rows, *shape]), list(shape)

    def write(path, ids, conditions, pixels, shape):
        names = ["height", "width", "channels"][: len(shape)]
        tensor_type = pa.fixed_shape_tensor(pa.uint8(), shape, dim_names=names)
        size = int(np.prod(shape))
        image = pa.ExtensionArray.from_storage(
            tensor_type, pa.FixedSizeListArray.from_arrays(pa.array(pixels.reshape(-1)), size)
        )
        table = pa.table({"id": pa.array(ids), "condition": pa.array(conditions), "image": image})
        pq.write_table(table, path, row_group_size=2000)

    sources = {
        "mnist": shared / "mnist" / "train.parquet",
        "brick": shared / "textures" / "brick-train.parquet",
        "ihc": shared / "textures" / "ihc-train.parquet",
    }
    tables = {name: pq.read_table(path) for name, path in sources.items()}
    print(f"{'data':<6} {'model':<12} {'NLL nats':>10} {'bits/dim':>9} {'fit s':>7}  AUROC per defect")
    for data in args.data or ["brick", "ihc", "mnist"]:
        table = tables[data]
        pixels, shape = pixels_of(table)
        n = table.num_rows
        cut = 50_000 if data == "mnist" else int(n * 0.8)
        dims = int(np.prod(shape))
        d = work / data
        d.mkdir(exist_ok=True)
        ids = table.column("id").to_pylist()
        write(d / "fit.parquet", ids[:cut], ["normal"] * cut, pixels[:cut], shape)
        held = pixels[cut:]
        rows, conds, out_ids = [held], ["normal"] * len(held), list(ids[cut:])
        if data != "mnist":
            other_name = "ihc" if data == "brick" else "brick"
            other, _ = pixels_of(tables[other_name])
            if data == "brick":
                other = other.mean(axis=-1).astype(np.uint8)
            else:
                other = np.repeat(other[..., None], 3, axis=-1)
            rng = np.random.default_rng(0)
            for kind in defects.DEFECTS:
                damaged = np.stack([
                    defects.damage(kind, p, rng, other[rng.integers(len(other))]) for p in held[:300]
                ])
                rows.append(damaged)
                conds += [kind] * len(damaged)
                out_ids += [f"{kind}-{i}" for i in range(len(damaged))]
        write(d / "score.parquet", out_ids, conds, np.concatenate(rows), shape)
        (d / "fit.toml").write_text(TEMPLATE.format(source="fit.parquet", sink="out", passthrough='["condition"]'))
        (d / "score.toml").write_text(TEMPLATE.format(source="score.parquet", sink="scored", passthrough='["condition"]'))
        def fit_and_score(run_id, settings):
            """Fits with `settings`, scores the held-out rows; seconds of the fit, and each
            row's (NLL, score, condition) by id."""
            sets = [x for kv in settings for x in ("--set", kv)]
            start = time.monotonic()
            fit = subprocess.run(
                [binary, "fit", "fit.toml", "-q", *sets], cwd=d, check=True, capture_output=True, text=True
            )
            seconds = time.monotonic() - start
            model = fit.stdout.strip().splitlines()[-1].removeprefix("model: ")
            subprocess.run(
                [binary, "score", "score.toml", "-q", "--model", model, "--run-id", run_id],
                cwd=d, check=True, capture_output=True,
            )
            scores = pq.read_table(d / "scored" / "scores", filters=[("run_id", "=", run_id)])
            rows = zip(
                scores.column("id").to_pylist(),
                scores.column("log_likelihood").to_pylist(),
                scores.column("score").to_pylist(),
                scores.column("condition").to_pylist(),
            )
            return seconds, {i: (-ll, sc, c) for i, ll, sc, c in rows}

        def aurocs(by_id, score):
            cond = np.asarray([c for _, _, c in by_id.values()])
            values = np.asarray([score(i) for i in by_id])
            normal = values[cond == "normal"]
            return "  ".join(
                f"{k} {auroc(normal, values[cond == k]):.3f}" for k in defects.DEFECTS if (cond == k).any()
            )

        other = {}
        if args.other_scores and data != "mnist":
            _, background = fit_and_score(
                "background", ["model.kind=ar", "model.k=3", 'model.context="neighbourhood"'] + args.set
            )
            _, simple = fit_and_score("complexity", ["model.kind=categorical", 'score.method="complexity"'])
            other = {
                "likelihood ratio": lambda i, by_id: by_id[i][0] - background[i][0],
                "complexity": lambda i, by_id: by_id[i][0] - (simple[i][0] - simple[i][1]),
            }
        for name in args.model or MODELS:
            settings = MODELS[name] + ([f"train.epochs={args.epochs}"] if args.epochs else []) + args.set
            seconds, by_id = fit_and_score(name, settings)
            cond = np.asarray([c for _, _, c in by_id.values()])
            nll = np.asarray([v[0] for v in by_id.values()])
            normal = nll[cond == "normal"]
            bpd = normal.mean() / (dims * np.log(2))
            aucs = aurocs(by_id, lambda i: by_id[i][0])
            print(f"{data:<6} {name:<12} {normal.mean():>10.1f} {bpd:>9.3f} {seconds:>7.0f}  {aucs}", flush=True)
            for method, score in other.items():
                aucs = aurocs(by_id, lambda i: score(i, by_id))
                print(f"{'':<6} {'  ' + method:<30}  {aucs}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
