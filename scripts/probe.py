"""Quality figures of issue 17: what a model's embedding knows about digits it never saw labels of.

A linear probe on the shared MNIST digits: fit a model without labels on the first 50,000
rows (stochastic binarization, seed 0, as scripts/quality.py), embed all 60,000 with
`pipeline score` and `sink.embeddings = true`, fit a multinomial logistic regression on the
embeddings of the first 50,000 with their labels and report its accuracy on the last 10,000 --
beside the same probe, in the same run, on the raw pixels (scaled to [0, 1]) and on the
binarized pixels the model saw.

Reads ../shared/data/mnist/train.parquet (not part of the repository: without it this script
says so and exits 0). Needs pyarrow and numpy, and a release build (`cargo build --release`).

    python3 scripts/probe.py [--model nade] [--set model.hidden=500] [--work DIR] [--binary PATH]
        [--coarser K ...]

`--coarser K` (pixelrnn) also probes the embedding averaged down from its grid G to K regions a
side (K must divide G and G divide 28, so every region holds as many pixels and the result is
exactly what `model.embedding_grid = K` computes): one fit compares several grids.
"""

import argparse
import pathlib
import subprocess
import sys
import time

MODELS = {
    "nade": ["model.kind=nade", "model.hidden=500", "train.epochs=200", "train.patience=4", "train.anneal=3"],
    "pixelrnn": ["model.kind=pixelrnn", "train.rebinarize=true", "train.max_minutes=30"],
}

TEMPLATE = """[pipeline]
name = "probe"
[source]
uri = "{source}"
passthrough = ["label"]
[preprocess]
binarize = "stochastic"
seed = 0
[model]
kind = "bernoulli"
[train]
validation_fraction = 0.02
[sink]
uri = "{sink}"
"""


def logistic_probe(np, x_train, y_train, x_test, y_test, epochs=60, l2=1e-4, seed=0):
    """Multinomial logistic regression by Adam on mini-batches, features standardized on the
    training rows; returns the test accuracy."""
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0) + 1e-6
    xt = (x_train - mean) / std
    xv = (x_test - mean) / std
    n, d = xt.shape
    k = int(y_train.max()) + 1
    rng = np.random.default_rng(seed)
    w = np.zeros((d, k))
    b = np.zeros(k)
    m = [np.zeros_like(w), np.zeros_like(b)]
    v = [np.zeros_like(w), np.zeros_like(b)]
    lr, beta1, beta2, step = 1e-3, 0.9, 0.999, 0
    onehot = np.eye(k)[y_train]
    for _ in range(epochs):
        order = rng.permutation(n)
        for start in range(0, n, 256):
            idx = order[start:start + 256]
            z = xt[idx] @ w + b
            z -= z.max(axis=1, keepdims=True)
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
            g = (p - onehot[idx]) / len(idx)
            grads = [xt[idx].T @ g + l2 * w, g.sum(axis=0)]
            step += 1
            for j, (param, grad) in enumerate(zip((w, b), grads)):
                m[j] = beta1 * m[j] + (1 - beta1) * grad
                v[j] = beta2 * v[j] + (1 - beta2) * grad * grad
                mhat = m[j] / (1 - beta1**step)
                vhat = v[j] / (1 - beta2**step)
                param -= lr * mhat / (np.sqrt(vhat) + 1e-8)
    return float(((xv @ w + b).argmax(axis=1) == y_test).mean())


def coarser(np, features, kind, model, work, k):
    """A PixelRNN embedding of G x G regions (row-major, 2h features each) averaged down to k x k."""
    import json
    if kind != "pixelrnn":
        raise SystemExit("--coarser is for pixelrnn embeddings")
    hyper = json.loads((work / model / "model.json").read_text())
    hyper = hyper.get("hyperparameters", hyper)
    grid, f = hyper["embedding_grid"], 2 * hyper["hidden"]
    if grid % k or 28 % grid:
        raise SystemExit(f"--coarser {k}: needs k to divide the grid {grid}, and the grid 28")
    step = grid // k
    x = features.reshape(len(features), k, step, k, step, f)
    return x.mean(axis=(2, 4)).reshape(len(features), -1)


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="nade")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="added to the model's settings")
    parser.add_argument("--work", default="/tmp/anomaly-pipeline-probe")
    parser.add_argument("--binary", help="the pipeline executable (default: target/release/pipeline)")
    parser.add_argument("--epochs", type=int, default=60, help="passes of the logistic regression")
    parser.add_argument("--coarser", type=int, action="append", default=[], metavar="K",
                        help="pixelrnn: also probe the embedding pooled down to K x K regions")
    args = parser.parse_args()
    mnist = here.parent / "shared" / "data" / "mnist" / "train.parquet"
    if not mnist.exists():
        print(f"skipped: {mnist} is not here (the shared MNIST digits are not in the repository)")
        return 0
    try:
        import numpy as np
        import pyarrow.parquet as pq
    except ImportError:
        print("skipped: pyarrow and numpy are needed (pip install pyarrow numpy)")
        return 0
    binary = pathlib.Path(args.binary) if args.binary else here / "target" / "release" / "pipeline"
    if not binary.exists():
        print("build first: cargo build --release", file=sys.stderr)
        return 1
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(mnist)
    pq.write_table(table.slice(0, 50_000), work / "train.parquet")
    pq.write_table(table, work / "all.parquet")
    (work / "fit.toml").write_text(TEMPLATE.format(source="train.parquet", sink="out"))
    (work / "embed.toml").write_text(
        TEMPLATE.format(source="all.parquet", sink="embedded").replace("[sink]\n", "[sink]\nembeddings = true\n")
    )
    sets = [x for kv in MODELS[args.model] + args.set for x in ("--set", kv)]
    start = time.monotonic()
    fit = subprocess.run([binary, "fit", "fit.toml", "-q", *sets], cwd=work, check=True, capture_output=True, text=True)
    fit_seconds = time.monotonic() - start
    model = fit.stdout.strip().splitlines()[-1].removeprefix("model: ")
    start = time.monotonic()
    subprocess.run(
        [binary, "score", "embed.toml", "-q", "--model", model, "--run-id", args.model, *sets],
        cwd=work, check=True, capture_output=True,
    )
    embed_seconds = time.monotonic() - start
    emb = pq.read_table(work / "embedded" / "embeddings", filters=[("run_id", "=", args.model)])
    order = {id_: i for i, id_ in enumerate(table.column("id").to_pylist())}
    rows = np.array([order[i] for i in emb.column("id").to_pylist()])
    width = emb.schema.field("embedding").type.list_size
    vectors = np.asarray(emb.column("embedding").combine_chunks().flatten()).reshape(-1, width)
    features = np.zeros((table.num_rows, width))
    features[rows] = vectors
    labels = np.asarray(table.column("label"))
    pixels = np.asarray(table.column("image").combine_chunks().storage.flatten()).reshape(table.num_rows, -1) / 255.0
    rng = np.random.default_rng(0)
    binarized = (rng.random(pixels.shape) < pixels).astype(float)
    split = 50_000
    print(f"model {args.model} ({model}): fit {fit_seconds:.0f} s, embed 60,000 images {embed_seconds:.0f} s, width {width}")
    print(f"{'features':<28} {'test accuracy':>14}")
    probes = [(f"{args.model} embedding", features)]
    for k in args.coarser:
        probes.append((f"{args.model} pooled to {k}x{k}", coarser(np, features, args.model, model, work, k)))
    for name, x in probes + [("raw pixels", pixels), ("binarized pixels", binarized)]:
        acc = logistic_probe(np, x[:split], labels[:split], x[split:], labels[split:], epochs=args.epochs)
        print(f"{name:<28} {100 * acc:>13.2f}%", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
