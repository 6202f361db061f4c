"""One-class MNIST (issue 5's quality figure): for each digit c, fit on that digit's shared
training rows, score every shared row not fitted on (normal = c, anomaly = any other digit),
and report `pipeline evaluate`'s AUROC per digit and its mean, for each score method, and the
realised false-discovery rate of the conformal p-value flags (Benjamini–Hochberg at `--fdr`).

Reads ../shared/data/mnist/train.parquet (not in the repository: without it this says so and
exits 0). The first 80% of each digit's rows are its training rows; every other row is scored.
Each digit's AUROC is printed over all scored rows and over two random halves of them: `select`,
to choose a configuration on, and `report`, to quote it on rows that played no part in the choice.

    python3 scripts/one_class.py [--kind ar --set model.k=12 --set model.context=\\"neighbourhood\\"]
                                 [--methods nll,likelihood_ratio,complexity] [--work DIR]

The best configuration measured (README, "Decisions": mean AUROC 0.9827), about 10 minutes on 2 cores:

    python3 scripts/one_class.py --kind nade --set model.hidden=200 --set train.epochs=40 \\
        --set train.patience=3 --set preprocess.draws=8 --methods likelihood_ratio

(the likelihood ratio's default background, a local `ar` with k = 3 and context =
"neighbourhood", is the one measured best; another is `--set score.background.kind=\\"ar\\"
--set score.background.k=4`.)

Needs pyarrow and a release build (`cargo build --release`).
"""

import argparse
import json
import pathlib
import random
import subprocess
import sys

TEMPLATE = """[pipeline]
name = "one-class"
[source]
uri = "{source}"
passthrough = ["label", "half"]
[preprocess]
binarize = "stochastic"
seed = 0
[model]
kind = "{kind}"
[train]
validation_fraction = 0.1
[threshold]
method = "conformal"
fdr = {fdr}
[sink]
uri = "{sink}"
"""


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", default="ar")
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--methods", default="nll,likelihood_ratio,complexity")
    parser.add_argument("--digits", default="0,1,2,3,4,5,6,7,8,9")
    parser.add_argument("--fdr", type=float, default=0.05)
    parser.add_argument("--work", default="/tmp/anomaly-pipeline-one-class")
    args = parser.parse_args()
    mnist = here.parent / "shared" / "data" / "mnist" / "train.parquet"
    if not mnist.exists():
        print(f"skipped: {mnist} is not here (the shared MNIST digits are not in the repository)")
        return 0
    try:
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq
    except ImportError:
        print("skipped: pyarrow is needed to split the MNIST file (pip install pyarrow)")
        return 0
    binary = here / "target" / "release" / "pipeline"
    work = pathlib.Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    table = pq.read_table(mnist)
    labels = table.column("label").to_pylist()
    digits = [int(d) for d in args.digits.split(",")]
    methods = args.methods.split(",")
    sets = [x for kv in args.sets for x in ("--set", kv)]
    results = {m: [] for m in methods}
    fdrs = {m: [] for m in methods}
    print(f"{'':>5} " + " ".join(f"{m:>41}" for m in methods), flush=True)
    print(f"{'digit':>5} " + " ".join(f"{'all':>8}{'select':>8}{'report':>8}{'fdr of flagged':>17}" for _ in methods), flush=True)
    for c in digits:
        rows = [i for i, l in enumerate(labels) if l == c]
        fit_rows = set(rows[: int(0.8 * len(rows))])
        fitted = table.take(sorted(fit_rows))
        fitted = fitted.append_column("half", pa.array(["fit"] * fitted.num_rows))
        pq.write_table(fitted, work / f"fit-{c}.parquet")
        rest = [i for i in range(table.num_rows) if i not in fit_rows]
        scored = table.take(rest)
        # A seeded coin per row splits the scored rows into a half to choose settings on and a
        # half to report, so a configuration picked by its AUROC can be quoted on rows it was not
        # picked on. Not row parity: MNIST's even and odd training rows differ (mean ink 96 vs 109).
        coin = random.Random(c)
        half = pa.array(["select" if coin.random() < 0.5 else "report" for _ in rest])
        pq.write_table(scored.append_column("half", half), work / f"test-{c}.parquet")
        line = f"{c:>5} "
        for m in methods:
            sink = f"out-{c}-{m}"
            def config(name, source):
                path = work / name
                path.write_text(TEMPLATE.format(source=source, kind=args.kind, sink=sink, fdr=args.fdr))
                return path

            cfg = config(f"{c}-{m}.toml", f"fit-{c}.parquet")
            score_cfg = config(f"{c}-{m}-score.toml", f"test-{c}.parquet")
            fit = subprocess.run(
                [binary, "fit", cfg.name, "-q", "--set", f'score.method="{m}"', *sets],
                cwd=work, check=True, capture_output=True, text=True,
            )
            model = fit.stdout.strip().splitlines()[-1].removeprefix("model: ")
            subprocess.run(
                [binary, "score", score_cfg.name, "-q", "--model", model, "--run-id", "test"],
                cwd=work, check=True, capture_output=True,
            )
            ev = subprocess.run(
                [binary, "evaluate", f"{sink}/scores", "--label-column", "label",
                 "--normal", str(c), "--by", "half", "--json"],
                cwd=work, check=True, capture_output=True, text=True,
            )
            report = json.loads(ev.stdout)
            overall = report["overall"]
            by_half = {g["value"]: g["evaluation"]["auroc"] for g in report["groups"]}
            auroc, fdr = overall["auroc"], overall["fdr"]
            results[m].append((auroc, by_half["select"], by_half["report"]))
            fdrs[m].append(fdr)
            shown = "-" if fdr is None else f"{fdr:.4f} of {overall['flagged']:>5}"
            line += f" {auroc:>7.4f} {by_half['select']:>7.4f} {by_half['report']:>7.4f} {shown:>16}"
        print(line, flush=True)
    def mean(v, i):
        return sum(x[i] for x in v) / len(v)

    print(" mean " + " ".join(
        f" {mean(v, 0):>7.4f} {mean(v, 1):>7.4f} {mean(v, 2):>7.4f} {'':>16}" for v in results.values()))
    worst = {m: max((f for f in v if f is not None), default=None) for m, v in fdrs.items()}
    print(f"largest realised FDR per method (level asked: {args.fdr}): {worst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
