//! `sink.format = "delta"`: every table a Delta Lake table, read back by an independent reader
//! (the `deltalake` package) at every moment a crash can leave it, with concurrent shards, and
//! on the S3, GCS and Azure emulators.

use std::path::Path;
use std::process::{Command, Stdio};

use crate::common::delta::{self, DeltaRead};
use crate::common::stores::{Kind, StoreServer};
use crate::common::*;

const RUN: &str = "nightly";

/// Two sources with the same ids and different images, so a reader can tell which run's rows
/// it sees; and a pipeline with several part files per table (a crash can fall between them).
fn setup(d: &Path) {
    for (name, seed) in [("a.parquet", 9), ("b.parquet", 10)] {
        write_tensor_u8(
            &d.join(name),
            &ids(0, 600),
            &images(600, 10, 10, seed),
            &[10, 10],
        );
    }
    std::fs::write(
        d.join("p.toml"),
        "[pipeline]\nname = \"test\"\n\n[source]\nuri = \"a.parquet\"\n\n\
         [sink]\nuri = \"out\"\nformat = \"delta\"\nmax_rows_per_file = 250\n\n\
         [model]\nkind = \"ar\"\nk = 3\n",
    )
    .unwrap();
}

fn run_args(source: &str) -> Vec<String> {
    ["run", "p.toml", "--run-id", RUN, "-q", "--set"]
        .iter()
        .map(|s| s.to_string())
        .chain([format!("source.uri=\"{source}\"")])
        .collect()
}

/// A directory set up by [`setup`], or `None` where the reader is missing (outside CI).
fn prepared() -> Option<tempfile::TempDir> {
    if !delta::available() {
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    setup(dir.path());
    Some(dir)
}

fn scores(d: &Path) -> Option<DeltaRead> {
    delta::read_local(&d.join("out/scores"), None, RUN)
}

fn crash_at(dir: &Path, args: &[String], point: &str) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    crate::common::crash_at(dir, &args, point);
}

fn run_ok(d: &Path, args: &[String]) {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pipeline(d, &args, &[]).expect(0);
}

/// The tables are Delta tables that the `deltalake` package reads: the rows `pipeline` reports,
/// a `history/` row per committed run, and last night's version still readable after a rerun
/// replaced its rows (time travel).
#[test]
fn a_delta_sink_reads_with_the_deltalake_package_and_keeps_last_nights_version() {
    let Some(dir) = prepared() else {
        return;
    };
    let d = dir.path();
    run_ok(d, &run_args("a.parquet"));
    let first = scores(d).expect("a scores table");
    assert_eq!(first.rows.len(), 600);
    assert!(d.join("out/scores/_delta_log").is_dir());
    assert!(d.join("out/runs/nightly/_SUCCESS").exists());
    // The rows are the ones the binary reads back itself (`pipeline query` reads Delta too).
    let ours = pipeline(
        d,
        &[
            "query",
            "--sink",
            "out",
            "SELECT count(*) AS n, sum(log_likelihood) AS s FROM scores",
            "--out",
            "q.csv",
        ],
        &[],
    );
    ours.expect(0);
    let csv = std::fs::read_to_string(d.join("q.csv")).unwrap();
    let sum: f64 = first.rows.iter().map(|r| r.1).sum();
    let line = csv.lines().nth(1).unwrap();
    let (n, s) = line.split_once(',').unwrap();
    assert_eq!(n, "600");
    assert!((s.parse::<f64>().unwrap() - sum).abs() < 1e-6 * sum.abs());

    // A rerun on other images replaces the run's rows in one new version.
    run_ok(d, &run_args("b.parquet"));
    let second = scores(d).unwrap();
    assert_eq!(
        second.rows.len(),
        600,
        "one copy of each row after the rerun"
    );
    assert_eq!(second.version, first.version + 1, "one commit per rerun");
    assert_ne!(second.rows, first.rows, "the rerun's rows are new");
    let last_night = delta::read_local(&d.join("out/scores"), Some(first.version), RUN).unwrap();
    assert_eq!(
        last_night.rows, first.rows,
        "time travel reads last night's rows"
    );

    // Another run appends; the history table has one row per run.
    let mut other = run_args("a.parquet");
    other[3] = "second".into();
    run_ok(d, &other);
    let all = scores(d).unwrap();
    assert_eq!(all.runs.len(), 1200);
    let history = delta::read_local(&d.join("out/history"), None, RUN).unwrap();
    let mut runs = history.runs.clone();
    runs.sort();
    assert_eq!(runs, ["nightly", "second"]);
    for column in [
        "score_p99",
        "p_below_001",
        "drift_statistic",
        "drift_p_value",
        "drifted",
    ] {
        assert!(
            history.columns.iter().any(|c| c == column),
            "history lacks {column}"
        );
    }
    // Anomalies and rejects are Delta tables too.
    for table in ["anomalies", "rejects"] {
        assert!(
            delta::read_local(&d.join("out").join(table), None, RUN).is_some(),
            "{table} is not a Delta table"
        );
    }
}

/// A rerun of R that crashes at any step of the commit leaves a reader of the Delta table
/// exactly the previous version's rows of R or exactly the new version's: never a mix, never
/// none; and a rerun completes with the new rows.
#[test]
fn a_crash_at_every_commit_step_leaves_the_previous_version_or_the_new_one() {
    let Some(dir) = prepared() else {
        return;
    };
    let d = dir.path();
    run_ok(d, &run_args("a.parquet"));
    let a = scores(d).unwrap().rows;
    run_ok(d, &run_args("b.parquet"));
    let b = scores(d).unwrap().rows;
    assert_ne!(a, b);
    let rows = |source: &str| if source == "a.parquet" { &a } else { &b };

    // (point, whether a crash there leaves the new rows already visible)
    let points = [
        ("commit.started", false),
        ("commit.success-removed", false),
        ("commit.first-part-moved", false),
        ("commit.parts-placed", false),
        ("commit.first-table-committed", true),
        ("commit.manifest-written", true),
        ("commit.published", true),
    ];
    let mut current = "b.parquet";
    for (point, new_visible) in points {
        let next = if current == "a.parquet" {
            "b.parquet"
        } else {
            "a.parquet"
        };
        crash_at(d, &run_args(next), point);
        let seen = scores(d).expect("the table stays readable").rows;
        let want = if new_visible {
            rows(next)
        } else {
            rows(current)
        };
        assert!(
            &seen == want,
            "after a crash at {point}: the reader sees {} rows, not exactly the {} version's",
            seen.len(),
            if new_visible { "new" } else { "previous" }
        );
        run_ok(d, &run_args(next));
        assert_eq!(&scores(d).unwrap().rows, rows(next), "rerun after {point}");
        current = next;
    }
}

/// Four shards started at once: the run is published once, as one Delta version of each table
/// holding exactly one copy of every row; on local disk and on the S3 server (read back there
/// by the `deltalake` package with storage options pointing at the server).
#[test]
fn four_shards_at_once_commit_one_version_with_one_copy_of_every_row() {
    if !delta::available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // The bundled digits: four row groups, one per shard.
    std::fs::copy(
        repo().join("data/demo/digits.parquet"),
        d.join("frames.parquet"),
    )
    .unwrap();
    let total = parquet::file::reader::FileReader::metadata(
        &parquet::file::serialized_reader::SerializedFileReader::new(
            std::fs::File::open(d.join("frames.parquet")).unwrap(),
        )
        .unwrap(),
    )
    .file_metadata()
    .num_rows() as usize;
    let local = "[sink]\nuri = \"out\"\nformat = \"delta\"\n";
    std::fs::write(
        d.join("p.toml"),
        format!("[pipeline]\nname = \"t\"\n\n[source]\nuri = \"frames.parquet\"\n\n{local}\n[model]\nkind = \"ar\"\nk = 2\n"),
    )
    .unwrap();
    let model = fit_model(d, "p.toml");
    let before = delta::read_local(&d.join("out/scores"), None, "sharded").map(|r| r.version);
    shards_at_once(d, &model, &[]);
    let read = delta::read_local(&d.join("out/scores"), None, "sharded").unwrap();
    assert_one_copy(&read, total);
    assert_eq!(
        read.version,
        before.map_or(0, |v| v + 1),
        "one version in all"
    );

    let Some(server) = StoreServer::start(Kind::S3) else {
        return;
    };
    server.create_bucket("sink");
    let env = server.env();
    let s3 = "[sink]\nuri = \"s3://sink/nightly\"\nformat = \"delta\"\n";
    std::fs::write(
        d.join("p.toml"),
        format!("[pipeline]\nname = \"t\"\n\n[source]\nuri = \"frames.parquet\"\n\n{s3}\n[model]\nkind = \"ar\"\nk = 2\n"),
    )
    .unwrap();
    shards_at_once(d, &model, &env);
    let options: Vec<(&str, String)> = vec![
        ("AWS_ENDPOINT_URL", server.endpoint.clone()),
        ("AWS_ALLOW_HTTP", "true".into()),
        ("AWS_ACCESS_KEY_ID", "test-key-id".into()),
        ("AWS_SECRET_ACCESS_KEY", "test-secret".into()),
        ("AWS_REGION", "us-east-1".into()),
    ];
    let read = delta::read("s3://sink/nightly/scores", None, &options, "sharded")
        .expect("a Delta table on the S3 server");
    assert_one_copy(&read, total);
    assert_eq!(read.version, 0, "one version in all");
    assert!(
        server
            .keys("sink", "nightly/runs/sharded/")
            .iter()
            .any(|k| k.ends_with("_SUCCESS"))
    );
}

/// A Delta sink in Google Cloud Storage and in Azure Blob (each on its emulator): the
/// `deltalake` package reads the rows through the store, and a rerun replaces them in one new
/// version.
#[test]
fn a_delta_sink_in_gcs_reads_back_through_the_store() {
    a_delta_sink_in_a_bucket_reads_back_through_the_store(Kind::Gcs);
}

#[test]
fn a_delta_sink_in_azure_reads_back_through_the_store() {
    a_delta_sink_in_a_bucket_reads_back_through_the_store(Kind::Azure);
}

fn a_delta_sink_in_a_bucket_reads_back_through_the_store(kind: Kind) {
    let Some(dir) = prepared() else {
        return;
    };
    let Some(server) = StoreServer::start(kind) else {
        return;
    };
    let d = dir.path();
    server.create_bucket("sink");
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let sink = server.uri("sink", "nightly");
    let with_sink = |source: &str| {
        let mut args = run_args(source);
        args.extend(["--set".to_string(), format!("sink.uri=\"{sink}\"")]);
        args
    };
    let args = with_sink("a.parquet");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pipeline(d, &args, &env).expect(0);
    // delta-rs takes object_store's own configuration keys, and reads the emulator's URL
    // from the environment as the binary does.
    let options: Vec<(&str, String)> = env_owned.iter().map(|(k, v)| (*k, v.clone())).collect();
    let table = format!("{sink}/scores");
    let first = delta::read(&table, None, &options, RUN).expect("a Delta table in the bucket");
    assert_eq!(first.rows.len(), 600);

    let args = with_sink("b.parquet");
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    pipeline(d, &args, &env).expect(0);
    let second = delta::read(&table, None, &options, RUN).unwrap();
    assert_eq!(
        second.rows.len(),
        600,
        "one copy of each row after the rerun"
    );
    assert_eq!(second.version, first.version + 1);
    assert_ne!(second.rows, first.rows);
    let history = delta::read(&format!("{sink}/history"), None, &options, RUN).unwrap();
    assert_eq!(history.runs, [RUN]);
}

fn shards_at_once(d: &Path, model: &str, env: &[(&'static str, String)]) {
    let children: Vec<_> = (0..4)
        .map(|i| {
            let mut c = Command::new(env!("CARGO_BIN_EXE_pipeline"));
            c.args([
                "score",
                "p.toml",
                "--model",
                model,
                "--run-id",
                "sharded",
                "--shard",
                &format!("{i}/4"),
                "-q",
            ])
            .current_dir(d)
            .env_remove("PIPELINE_LOG")
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().unwrap()
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

fn assert_one_copy(read: &DeltaRead, total: usize) {
    let ids: Vec<&str> = read.rows.iter().map(|r| r.0.as_str()).collect();
    let mut unique = ids.clone();
    unique.dedup();
    assert_eq!(ids.len(), total, "every row");
    assert_eq!(unique.len(), ids.len(), "one copy of each");
}
