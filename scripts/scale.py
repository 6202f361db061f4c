#!/usr/bin/env python3
"""The scale benchmark (issue 6): score 200,000 and 2,000,000 tiled MNIST images with a NADE-500,
from local Parquet and from moto's S3 server on loopback, and compare with the kernel-only
scoring rate of the same model shape measured in the same run (`pipeline bench`).

Reports, per input: wall seconds, images/s, peak RSS (from wait4, the process's max resident
set) and images/s as a fraction of the kernel-only rate; medians over --repeats. Needs the
shared MNIST (../shared/data, not in the repository: skips cleanly without it), a release build
(`cargo build --release`), and for the S3 rows moto[server] and boto3 (PyPI).

    python3 scripts/scale.py [--sizes 200000,2000000] [--repeats 3] [--no-s3] [--dir /tmp/anomaly-scale]

moto is a Python server and takes a good share of two cores itself; `--s3s-fs PATH` serves the
bucket with s3s-fs instead (a Rust S3 server over a directory: `cargo install s3s-fs@0.14.1
--features binary`), which leaves the cores to the pipeline.
"""
import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "pipeline")
MNIST = os.path.join(ROOT, "..", "shared", "data", "mnist", "train.parquet")

CONFIG = """[pipeline]
name = "scale"

[source]
uri = "{source}"
image_column = "image"
id_column = "id"

[preprocess]
binarize = "threshold"
threshold = 128

[model]
kind = "nade"
hidden = 500

[train]
epochs = 2
seed = 0

[sink]
uri = "{sink}"
"""


def run(args, env=None):
    """Runs a command that must succeed; returns its stdout."""
    proc = subprocess.run(args, capture_output=True, env=env, text=True)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout


def run_measured(args, env=None):
    """Runs a command in a fresh Python child that reports the command's own wait4 rusage, so
    each run's peak RSS is its own and not a maximum over earlier children."""
    probe = (
        "import os,sys,time,json;"
        "t=time.monotonic();pid=os.fork()\n"
        "if pid==0:\n"
        " fd=os.open(os.devnull,os.O_WRONLY);os.dup2(fd,1);os.execv(sys.argv[1],sys.argv[1:])\n"
        "_,status,ru=os.wait4(pid,0);"
        "print(json.dumps({'wall':time.monotonic()-t,'rss_kb':ru.ru_maxrss,'status':status}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, *args], capture_output=True, env=env, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if result["status"] != 0:
        sys.exit(f"{' '.join(args)} failed: {out.stderr[-3000:]}")
    return result["wall"], result["rss_kb"] / 1024


def cpu_seconds(pid):
    """User + system CPU seconds a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port, s3s_fs, root):
    """moto's server, or s3s-fs over `root` when its binary is given."""
    if s3s_fs:
        shutil.rmtree(root, ignore_errors=True)  # an earlier run's bucket
        os.makedirs(root)
        args = [s3s_fs, "--host", "127.0.0.1", "--port", str(port),
                "--access-key", "k", "--secret-key", "s", root]
    else:
        args = [sys.executable, "-m", "moto.server", "-p", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"the S3 server did not start: {args}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--sizes", default="200000,2000000")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-s3", action="store_true")
    ap.add_argument("--no-local", action="store_true")
    ap.add_argument("--s3s-fs", metavar="PATH", help="serve S3 with this s3s-fs binary, not moto")
    ap.add_argument("--dir", default="/tmp/anomaly-scale")
    a = ap.parse_args()
    if not os.path.exists(MNIST):
        print(f"skipped: {MNIST} is not here (the shared data is not part of the repository)")
        return
    if not os.path.exists(BIN):
        sys.exit("build first: cargo build --release")
    os.makedirs(a.dir, exist_ok=True)
    sizes = [int(s) for s in a.sizes.split(",")]
    for n in sizes:
        path = os.path.join(a.dir, f"tiled-{n}.parquet")
        if not os.path.exists(path):
            subprocess.run(
                [sys.executable, os.path.join(ROOT, "scripts", "make_scale_data.py"), str(n), path],
                check=True,
            )

    out = os.path.join(a.dir, "out")
    config = os.path.join(a.dir, "scale.toml")
    with open(config, "w") as f:
        f.write(CONFIG.format(source=os.path.join(ROOT, "data/demo/digits.parquet"), sink=out))
    fitted = run([BIN, "fit", config, "-q"])
    model = fitted.strip().splitlines()[-1].removeprefix("model: ").strip()

    bench_json = os.path.join(a.dir, "bench.json")
    run([BIN, "bench", "--images", "2000", "--reference-images", "4",
         "--repeats", str(max(a.repeats, 3)), "--json", bench_json, "-q"])
    with open(bench_json) as f:
        bench = json.load(f)
    kernel = next(x for x in bench["fast"] if x["isa"] == bench["isa"])["score_images_per_s"]
    print(f"kernel-only scoring, NADE-500, {bench['isa']}, {bench['threads']} threads "
          f"(pipeline bench, median of {bench['repeats']}): {kernel:,.0f} img/s")

    rows = []

    def measure(label, n, source, sink, env=None, server=None):
        walls, rss, server_cpu = [], [], []
        for r in range(a.repeats):
            before = cpu_seconds(server.pid) if server else 0.0
            wall, peak = run_measured(
                [BIN, "score", config, "--model", model, "--run-id", f"scale-{n}-{r}",
                 "--set", f'source.uri="{source}"', "--set", f'sink.uri="{sink}"', "-q"],
                env=env,
            )
            walls.append(wall)
            rss.append(peak)
            if server:
                server_cpu.append(cpu_seconds(server.pid) - before)
        wall = statistics.median(walls)
        rate = n / wall
        rows.append((label, wall, rate, statistics.median(rss), max(rss), rate / kernel))
        print(f"  {label}: {wall:.1f} s, {rate:,.0f} img/s ({rate / kernel:.0%} of kernel-only), "
              f"peak RSS {statistics.median(rss):.0f} MB (max {max(rss):.0f})", flush=True)
        if server_cpu:
            # The server shares the two cores with the pipeline; say how much it took.
            cpu = statistics.median(server_cpu)
            print(f"    the S3 server itself used {cpu:.1f} CPU-seconds per run "
                  f"({cpu / wall:.0%} of one core over the run)", flush=True)

    for n in [] if a.no_local else sizes:
        measure(f"{n:,} images, local Parquet", n,
                os.path.join(a.dir, f"tiled-{n}.parquet"), os.path.join(a.dir, "sink-local"))

    if not a.no_s3:
        try:
            import boto3  # noqa: F401
            if not a.s3s_fs:
                import moto.server  # noqa: F401
        except ImportError:
            print("S3 rows skipped: pip install 'moto[server]' boto3")
        else:
            port = free_port()
            server = start_server(port, a.s3s_fs, os.path.join(a.dir, "s3s-root"))
            server_name = "s3s-fs" if a.s3s_fs else "moto's S3"
            try:
                endpoint = f"http://127.0.0.1:{port}"
                s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="k",
                                  aws_secret_access_key="s", region_name="us-east-1")
                s3.create_bucket(Bucket="frames")
                env = dict(os.environ, AWS_ENDPOINT=endpoint, AWS_ALLOW_HTTP="true",
                           AWS_ACCESS_KEY_ID="k", AWS_SECRET_ACCESS_KEY="s",
                           AWS_REGION="us-east-1")
                for n in sizes:
                    s3.upload_file(os.path.join(a.dir, f"tiled-{n}.parquet"), "frames",
                                   f"tiled-{n}.parquet")
                    measure(f"{n:,} images, {server_name} on loopback", n,
                            f"s3://frames/tiled-{n}.parquet", f"s3://frames/out-{n}", env, server)
                    s3.delete_object(Bucket="frames", Key=f"tiled-{n}.parquet")
            finally:
                server.kill()

    print()
    print("| input | wall s | images/s | of kernel-only | peak RSS MB (median / max) |")
    print("|---|---|---|---|---|")
    for label, wall, rate, rss, rss_max, frac in rows:
        print(f"| {label} | {wall:.1f} | {rate:,.0f} | {frac:.0%} | {rss:.0f} / {rss_max:.0f} |")
    local = [r for r in rows if "local" in r[0]]
    if len(local) >= 2:
        print(f"\npeak RSS, largest vs smallest local input: {local[-1][3] / local[0][3]:.2f}×")


if __name__ == "__main__":
    main()
