"""Quality figures of issue 17: do the groups of anomalies match the kinds of defect?

Fits a model that has an embedding on the normal images of a bundled demo (data/demo: the
digits with inverted and noisy frames, or the texture patches with scratches, holes, stains and
foreign material), scores the whole demo file with it, reads the run's anomalies back, and prints the contingency table of `group` against the
`condition` column, with the adjusted Rand index of the two over the flagged images (normal
images flagged by the threshold count as a kind of their own) and over the flagged defects only.

    python3 scripts/groups.py [--demo textures] [--set model.kind=...] [--binary PATH]

Uses only the repository's bundled data; needs pyarrow and a release build.
"""

import argparse
import collections
import json
import math
import pathlib
import subprocess
import sys
import tempfile

DEMOS = {
    "digits": ("pipelines/demo.toml", ["model.kind=nade", "model.hidden=100", "train.epochs=30", "train.learning_rate=0.01"]),
    "textures": ("pipelines/textures.toml", ["model.kind=rnade", "model.hidden=100", "train.epochs=30"]),
}


def adjusted_rand_index(a, b):
    pairs = lambda n: n * (n - 1) / 2
    table = collections.Counter(zip(a, b))
    rows, cols = collections.Counter(a), collections.Counter(b)
    index = sum(pairs(n) for n in table.values())
    row_pairs = sum(pairs(n) for n in rows.values())
    col_pairs = sum(pairs(n) for n in cols.values())
    expected = row_pairs * col_pairs / max(pairs(len(a)), 1)
    most = (row_pairs + col_pairs) / 2
    return 1.0 if most == expected else (index - expected) / (most - expected)


def main() -> int:
    here = pathlib.Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", choices=sorted(DEMOS), default="digits")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="replaces the demo's model settings")
    parser.add_argument("--binary", help="the pipeline executable (default: target/release/pipeline)")
    args = parser.parse_args()
    try:
        import pyarrow.parquet as pq
    except ImportError:
        print("skipped: pyarrow is needed (pip install pyarrow)")
        return 0
    binary = pathlib.Path(args.binary) if args.binary else here / "target" / "release" / "pipeline"
    if not binary.exists():
        print("build first: cargo build --release", file=sys.stderr)
        return 1
    import pyarrow.compute as pc

    config, sets = DEMOS[args.demo]
    sets = args.set or sets
    text = (here / config).read_text()
    # The demo's [model] table is replaced by the chosen model's keys.
    head, rest = text.split("[model]", 1)
    rest = rest[rest.index("\n[") + 1:]
    work = pathlib.Path(tempfile.mkdtemp(prefix="groups-"))
    source = here / text.split('uri = "', 1)[1].split('"', 1)[0]
    demo = pq.read_table(source)
    pq.write_table(demo.filter(pc.equal(demo.column("condition"), "normal")), work / "normal.parquet")
    body = "[model]\n" + rest
    (work / "fit.toml").write_text(head.replace(str(source.relative_to(here)), str(work / "normal.parquet")) + body)
    (work / "score.toml").write_text(head.replace(str(source.relative_to(here)), str(source)) + body)
    out = work / "out"
    flags = [x for kv in sets for x in ("--set", kv)]
    env = {"DEMO_OUT": str(out), "PATH": "/usr/bin:/bin"}
    fit = subprocess.run([binary, "fit", "fit.toml", "-q", *flags], cwd=work, check=True, env=env, capture_output=True, text=True)
    model = fit.stdout.strip().splitlines()[-1].removeprefix("model: ")
    subprocess.run(
        [binary, "score", "score.toml", "-q", "--model", model, "--run-id", "groups", *flags],
        cwd=work, check=True, env=env, capture_output=True,
    )
    manifest = json.loads((out / "runs" / "groups" / "manifest.json").read_text())
    anomalies = pq.read_table(out / "anomalies")
    groups = anomalies.column("group").to_pylist()
    kinds = anomalies.column("condition").to_pylist()
    print(f"{args.demo}: {' '.join(sets)}; {anomalies.num_rows} flagged; groups {[g['images'] for g in manifest.get('anomaly_groups', [])]}")
    names = sorted(set(kinds))
    print(f"{'group':>6} " + " ".join(f"{n:>9}" for n in names))
    for g in sorted(set(x for x in groups if x is not None)):
        counts = collections.Counter(k for k, x in zip(kinds, groups) if x == g)
        print(f"{g:>6} " + " ".join(f"{counts[n]:>9}" for n in names))
    print(f"adjusted Rand index, every flagged image: {adjusted_rand_index(groups, kinds):.3f}")
    defects = [(g, k) for g, k in zip(groups, kinds) if k != "normal"]
    if defects:
        print(f"adjusted Rand index, flagged defects only ({len(defects)}): {adjusted_rand_index(*zip(*defects)):.3f}")
    print(f"the run's tables are under {out} (pipeline report {out} --out report.html draws them)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
