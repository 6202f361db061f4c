"""Quality figures of issue 3: validation NLL of each model on the shared MNIST digits.

Reads ../shared/data/mnist/train.parquet (not part of the repository: without it this script
says so and exits 0), splits it into the first 50,000 rows (fitting; the pipeline holds 2% of
them out for early stopping and calibration) and the last 10,000 (validation), binarizes
stochastically with seed 0, and for every model fits with `pipeline fit` and scores the
validation rows with `pipeline score`. Prints the mean NLL in nats and the fit's wall time.

    python3 scripts/quality.py [--only nade] [--work /tmp/quality]

Needs pyarrow (to split the file) and a release build (`cargo build --release`).
"""

import argparse
import pathlib
import subprocess
import sys
import time

MODELS = {
    "bernoulli": [],
    "ar-k1": ["model.kind=ar", "model.k=1", 'model.context="previous"'],
    "ar-previous-28": ["model.kind=ar", "model.k=28", 'model.context="previous"'],
    "ar-neighbourhood-12": ["model.kind=ar", "model.k=12", 'model.context="neighbourhood"'],
    "fvsbn": ["model.kind=fvsbn", "train.epochs=40"],
    "nade": ["model.kind=nade", "model.hidden=500", "train.epochs=200", "train.patience=4", "train.anneal=3"],
    # The same, trained on a fresh binarization of the fitted rows every epoch.
    "fvsbn-rebinarized": ["model.kind=fvsbn", "train.epochs=40", "train.rebinarize=true"],
    "nade-rebinarized": ["model.kind=nade", "model.hidden=500", "train.epochs=200", "train.patience=4", "train.anneal=3", "train.rebinarize=true"],
    # PixelRNN (issue 15) as `kind = "pixelrnn"` alone gives it, and with the other architecture;
    # each fit stops after the default hour (`train.max_minutes`) at the latest.
    "pixelrnn": ["model.kind=pixelrnn", "train.rebinarize=true"],
    "pixelrnn-diagonal": ["model.kind=pixelrnn", 'model.architecture="diagonal_bilstm"', "train.rebinarize=true"],
}

TEMPLATE = """[pipeline]
name = "quality"
[source]
uri = "{source}"
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


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", action="append", choices=sorted(MODELS))
    parser.add_argument("--work", default="/tmp/anomaly-pipeline-quality")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="added to every model's settings")
    parser.add_argument("--binary", help="the pipeline executable (default: target/release/pipeline)")
    args = parser.parse_args()
    mnist = here.parent / "shared" / "data" / "mnist" / "train.parquet"
    if not mnist.exists():
        print(f"skipped: {mnist} is not here (the shared MNIST digits are not in the repository)")
        return 0
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print("skipped: pyarrow is needed to split the MNIST file (pip install pyarrow)")
        return 0
    binary = pathlib.Path(args.binary) if args.binary else here / "target" / "release" / "pipeline"
    if not binary.exists():
        print("build first: cargo build --release", file=sys.stderr)
        return 1
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(mnist)
    pq.write_table(table.slice(0, 50_000), work / "train.parquet")
    pq.write_table(table.slice(table.num_rows - 10_000, 10_000), work / "valid.parquet")
    (work / "fit.toml").write_text(TEMPLATE.format(source="train.parquet", sink="out"))
    (work / "score.toml").write_text(TEMPLATE.format(source="valid.parquet", sink="scored"))
    print(f"{'model':<22} {'validation NLL':>15} {'fit seconds':>12}")
    for name in args.only or MODELS:
        sets = [x for kv in MODELS[name] + args.set for x in ("--set", kv)]
        start = time.monotonic()
        fit = subprocess.run(
            [binary, "fit", "fit.toml", "-q", *sets], cwd=work, check=True, capture_output=True, text=True
        )
        seconds = time.monotonic() - start
        model = fit.stdout.strip().splitlines()[-1].removeprefix("model: ")
        subprocess.run(
            [binary, "score", "score.toml", "-q", "--model", model, "--run-id", name],
            cwd=work, check=True, capture_output=True,
        )
        scores = pq.read_table(work / "scored" / "scores", filters=[("run_id", "=", name)])
        nll = -sum(scores.column("log_likelihood").to_pylist()) / scores.num_rows
        print(f"{name:<22} {nll:>15.2f} {seconds:>12.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
