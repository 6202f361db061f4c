//! An independent reader of the Delta tables: the `deltalake` Python package (delta-rs, PyPI;
//! `.ci/run` installs it), run as a subprocess on the table the binary wrote.

use std::path::Path;
use std::process::Command;

/// What the reader saw of one version of a table.
#[derive(Debug, Clone, PartialEq)]
pub struct DeltaRead {
    /// The version read.
    pub version: i64,
    /// (id, log_likelihood) of the rows of run `run`, sorted by id.
    pub rows: Vec<(String, f64)>,
    /// Every row's run id, in no particular order.
    pub runs: Vec<String>,
    /// The column names in order.
    pub columns: Vec<String>,
}

const READER: &str = r#"
import json, sys
from deltalake import DeltaTable
args = json.loads(sys.argv[1])
table = DeltaTable(args["uri"], version=args["version"], storage_options=args["options"] or None)
data = table.to_pyarrow_table()
out = {"version": table.version(), "columns": data.column_names,
       "runs": data.column("run_id").to_pylist(), "rows": []}
if "log_likelihood" in data.column_names:
    for i, r, ll in zip(data.column("id").to_pylist(), data.column("run_id").to_pylist(),
                        data.column("log_likelihood").to_pylist()):
        if r == args["run"]:
            out["rows"].append([i, ll])
print(json.dumps(out), flush=True)
# Skip the interpreter's teardown, where the package's threads sometimes abort the process
# ("terminate called without an active exception") after the answer is out.
import os
os._exit(0)
"#;

/// Whether the package imports; panics when it does not and `PIPELINE_REQUIRE_DELTA` is set
/// (CI), so that these tests cannot skip there.
pub fn available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import deltalake, pyarrow"])
        .env_remove("RUST_BACKTRACE")
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("PIPELINE_REQUIRE_DELTA").is_none(),
            "PIPELINE_REQUIRE_DELTA is set but the deltalake package does not import"
        );
        eprintln!(
            "skipped: the deltalake package is not installed (pip install deltalake; .ci/run does)"
        );
    }
    ok
}

/// Reads `uri` (a table directory or URI) at `version` (latest when `None`) with
/// `options` (storage options, e.g. for the S3 server), keeping the rows of run `run`.
/// `None` when there is no table there yet.
pub fn read(
    uri: &str,
    version: Option<i64>,
    options: &[(&str, String)],
    run: &str,
) -> Option<DeltaRead> {
    let options: serde_json::Map<String, serde_json::Value> = options
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str())))
        .collect();
    let args = serde_json::json!({"uri": uri, "version": version, "options": options, "run": run});
    // With RUST_BACKTRACE set (cargo test sets it for panics) the package aborts at exit
    // ("terminate called without an active exception") after printing its answer.
    let out = Command::new("python3")
        .args(["-c", READER, &args.to_string()])
        // Some settings reach object_store (inside delta-rs) only from the environment, as
        // they reach the binary (the Azure emulator's URL).
        .envs(
            options
                .iter()
                .map(|(k, v)| (k.to_uppercase(), v.as_str().unwrap_or_default())),
        )
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .expect("python3 runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if !out.status.success() {
        if stderr.contains("TableNotFoundError") || stderr.contains("no log files") {
            return None;
        }
        panic!("the deltalake reader failed on {uri}:\n{stderr}");
    }
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the reader's JSON");
    let mut rows: Vec<(String, f64)> = v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| (r[0].as_str().unwrap().to_string(), r[1].as_f64().unwrap()))
        .collect();
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Some(DeltaRead {
        version: v["version"].as_i64().unwrap(),
        rows,
        runs: v["runs"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap().to_string())
            .collect(),
        columns: v["columns"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_str().unwrap().to_string())
            .collect(),
    })
}

/// [`read`] of a local table directory.
pub fn read_local(table: &Path, version: Option<i64>, run: &str) -> Option<DeltaRead> {
    read(table.to_str().unwrap(), version, &[], run)
}
