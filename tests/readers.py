"""Outside readers of the tables: every table of a demo run (the demo with a small NADE, so that
it writes embeddings too), opened by the readers the README names, with its row count and column
types checked against schemas/tables.json.

The Parquet layout is read by pyarrow, DuckDB, polars and Spark (pyspark in local mode); the
Delta layout by the deltalake package and by polars' read_delta. (Spark reads Delta through the
delta-spark jars, which come from Maven at run time, and DuckDB through an extension it
downloads: neither can be fetched here, so those two read only the Parquet layout.) Run by
.ci/run after the Rust tests (which build the binary):

    python3 tests/readers.py target/debug/pipeline

Exits non-zero, naming the reader, table and column, on the first disagreement.
"""

import json
import os
import subprocess
import sys
import tempfile

import duckdb
import polars as pl
import pyarrow.dataset as ds
from deltalake import DeltaTable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The demo's passthrough columns, after `id` in scores and anomalies (uint8 label as int16).
PASSTHROUGH = [("label", "Int16"), ("condition", "Utf8")]
TABLES = ["scores", "anomalies", "rejects", "history", "embeddings"]


def canonical_arrow(text):
    """schemas/tables.json's Arrow type text as a reader-neutral token."""
    text = text.replace("non-null ", "")
    table = {
        "Utf8": "string",
        "Float64": "f64",
        "Float32": "f32",
        "Boolean": "bool",
        "Int16": "i16",
        "Int32": "i32",
        "Int64": "i64",
        'Timestamp(µs, "UTC")': "timestamp_utc",
    }
    if text.startswith("List(") and text.endswith(")"):
        return "list<" + canonical_arrow(text[5:-1]) + ">"
    if text.startswith("FixedSizeList(") and text.endswith(")"):
        return "vector<" + canonical_arrow(text[len("FixedSizeList("):-1].split(" x ", 1)[1]) + ">"
    return table[text]


def canonical_pyarrow(t):
    import pyarrow as pa

    if pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t):
        return "string"
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_list_view(t):
        return "list<" + canonical_pyarrow(t.value_type) + ">"
    if pa.types.is_fixed_size_list(t):
        return "vector<" + canonical_pyarrow(t.value_type) + ">"
    if pa.types.is_timestamp(t):
        return "timestamp_utc" if t.tz in ("UTC", "+00:00") and t.unit == "us" else f"timestamp {t}"
    names = {"double": "f64", "float": "f32", "bool": "bool", "int16": "i16", "int32": "i32", "int64": "i64"}
    return names.get(str(t), str(t))


def canonical_duckdb(t):
    t = str(t)
    if t.endswith("[]"):
        return "list<" + canonical_duckdb(t[:-2]) + ">"
    if t.endswith("]") and "[" in t:
        return "vector<" + canonical_duckdb(t[: t.rindex("[")]) + ">"
    names = {
        "VARCHAR": "string",
        "DOUBLE": "f64",
        "FLOAT": "f32",
        "BOOLEAN": "bool",
        "SMALLINT": "i16",
        "INTEGER": "i32",
        "BIGINT": "i64",
        "TIMESTAMP WITH TIME ZONE": "timestamp_utc",
    }
    return names.get(t, t)


def canonical_polars(t):
    if isinstance(t, pl.List):
        return "list<" + canonical_polars(t.inner) + ">"
    if isinstance(t, pl.Array):
        return "vector<" + canonical_polars(t.inner) + ">"
    if isinstance(t, pl.Datetime):
        return "timestamp_utc" if t.time_zone == "UTC" and t.time_unit == "us" else f"datetime {t}"
    names = {pl.String: "string", pl.Float64: "f64", pl.Float32: "f32", pl.Boolean: "bool",
             pl.Int16: "i16", pl.Int32: "i32", pl.Int64: "i64"}
    for k, v in names.items():
        if t == k:
            return v
    return str(t)


def canonical_spark(t):
    t = t.simpleString()
    if t.startswith("array<") and t.endswith(">"):
        return "list<" + {"float": "f32", "string": "string", "double": "f64"}.get(t[6:-1], t[6:-1]) + ">"
    names = {"string": "string", "double": "f64", "float": "f32", "boolean": "bool",
             "smallint": "i16", "int": "i32", "bigint": "i64", "timestamp": "timestamp_utc"}
    return names.get(t, t)


def spark_session():
    from pyspark.sql import SparkSession

    spark = (SparkSession.builder.master("local[2]").appName("readers")
             .config("spark.ui.enabled", "false")
             .config("spark.ui.showConsoleProgress", "false")
             .config("spark.sql.session.timeZone", "UTC")
             .config("spark.driver.bindAddress", "127.0.0.1")
             .config("spark.driver.host", "127.0.0.1")
             .getOrCreate())
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def expected_columns(reference, table, vectors=True):
    """The columns schemas/tables.json gives `table`, with the demo's passthrough columns.

    With `vectors` false, a fixed-size list (the embedding) is expected as a plain list: Parquet
    has no fixed-size list of its own (readers that do not read the Arrow schema stored beside
    it, DuckDB and Spark, see a list), and neither has Delta."""
    cols = [(c["name"], canonical_arrow(c["type"])) for c in reference[table]]
    if table in ("scores", "anomalies", "embeddings"):
        cols[2:2] = [(n, canonical_arrow(t)) for n, t in PASSTHROUGH]
    if not vectors:
        cols = [(n, t.replace("vector<", "list<")) for n, t in cols]
    return cols


def check(reader, table, got_columns, got_rows, want_columns, want_rows):
    if got_columns != want_columns:
        for (gn, gt), (wn, wt) in zip(got_columns, want_columns):
            if (gn, gt) != (wn, wt):
                sys.exit(f"{reader} reads {table}.{gn} as {gt}; schemas/tables.json says {wn} {wt}")
        sys.exit(f"{reader} reads {table} with columns {got_columns}, not {want_columns}")
    if got_rows != want_rows:
        sys.exit(f"{reader} reads {got_rows} rows of {table}, the manifest says {want_rows}")
    print(f"ok  {reader:<18} {table:<10} {got_rows:>5} rows, {len(got_columns)} columns")


def nade_demo(tmp):
    """pipelines/demo.toml with a 16-unit NADE (which has embeddings) for its Bernoulli model."""
    with open(os.path.join(REPO, "pipelines/demo.toml")) as f:
        text = f.read()
    model = '[model]\nkind = "bernoulli"\nalpha = 1.0\n'
    if model not in text:
        sys.exit("pipelines/demo.toml's [model] changed: update tests/readers.py's nade_demo")
    path = os.path.join(tmp, "demo-nade.toml")
    with open(path, "w") as f:
        f.write(text.replace(model, '[model]\nkind = "nade"\nhidden = 16\n'))
    return path


def run_demo(binary, config, out, fmt):
    env = dict(os.environ, DEMO_OUT=out)
    env.pop("RUST_BACKTRACE", None)
    subprocess.run([binary, "run", config, "--run-id", "readers", "-q",
                    "--set", f'sink.format="{fmt}"', "--set", "sink.embeddings=true",
                    "--set", "train.epochs=2"], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    with open(os.path.join(out, "runs/readers/manifest.json")) as f:
        rows = json.load(f)["rows"]
    return {"scores": rows["scored"], "anomalies": rows["anomalies"],
            "rejects": rows["rejected"], "history": 1, "embeddings": rows["scored"]}


def main():
    binary = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.join(REPO, "target/debug/pipeline"))
    with open(os.path.join(REPO, "schemas/tables.json")) as f:
        reference = json.load(f)
    with tempfile.TemporaryDirectory() as tmp:
        parquet_out = os.path.join(tmp, "parquet")
        config = nade_demo(tmp)
        counts = run_demo(binary, config, parquet_out, "parquet")
        spark = spark_session()
        for table in TABLES:
            want = expected_columns(reference, table)
            path = os.path.join(parquet_out, table)
            data = ds.dataset(path, format="parquet").to_table()
            check("pyarrow", table, [(f.name, canonical_pyarrow(f.type)) for f in data.schema],
                  data.num_rows, want, counts[table])
            rel = duckdb.sql(f"SELECT * FROM read_parquet('{path}/*.parquet')")
            n = duckdb.sql(f"SELECT count(*) FROM read_parquet('{path}/*.parquet')").fetchall()[0][0]
            check("duckdb", table, [(c, canonical_duckdb(t)) for c, t in zip(rel.columns, rel.types)],
                  n, expected_columns(reference, table, vectors=False), counts[table])
            frame = pl.read_parquet(f"{path}/*.parquet")
            check("polars", table, [(c, canonical_polars(t)) for c, t in frame.schema.items()],
                  frame.height, want, counts[table])
            df = spark.read.parquet(path)
            check("spark", table, [(f.name, canonical_spark(f.dataType)) for f in df.schema.fields],
                  df.count(), expected_columns(reference, table, vectors=False), counts[table])
        spark.stop()

        delta_out = os.path.join(tmp, "delta")
        counts = run_demo(binary, config, delta_out, "delta")
        for table in TABLES:
            want = expected_columns(reference, table, vectors=False)
            path = os.path.join(delta_out, table)
            data = DeltaTable(path).to_pyarrow_table()
            check("deltalake", table, [(f.name, canonical_pyarrow(f.type)) for f in data.schema],
                  data.num_rows, want, counts[table])
            frame = pl.read_delta(path)
            check("polars read_delta", table, [(c, canonical_polars(t)) for c, t in frame.schema.items()],
                  frame.height, want, counts[table])
    print("readers: every table read with the types schemas/tables.json gives")
    sys.stdout.flush()
    # The deltalake package's threads can abort the interpreter's teardown; the checks are done.
    os._exit(0)


if __name__ == "__main__":
    main()
