//! The demo against a real S3-compatible server on loopback: the same rows as on local disk,
//! and a store that goes away ends in exit 75 with a rerun that repairs the run.

use crate::common::s3::S3Server;
use crate::common::*;

/// Runs the demo with `source` and `sink` URIs and `env`, as run `run_id`.
fn demo(source: &str, sink: &str, run_id: &str, env: &[(&str, &str)], extra: &[&str]) -> Output {
    let set = format!("source.uri=\"{source}\"");
    let mut args = vec![
        "run",
        "pipelines/demo.toml",
        "--run-id",
        run_id,
        "--set",
        &set,
    ];
    args.extend(extra);
    let mut env = env.to_vec();
    env.push(("DEMO_OUT", sink));
    pipeline(&repo(), &args, &env)
}

#[test]
fn the_demo_reads_and_writes_a_bucket_with_the_rows_of_a_local_run() {
    let Some(server) = S3Server::start() else {
        return;
    };
    server.create_bucket("frames");
    server.upload(
        "frames",
        "demo/digits.parquet",
        &repo().join("data/demo/digits.parquet"),
    );
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();

    let run = demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/out",
        "night",
        &env,
        &[],
    );
    run.expect(0);
    assert!(
        run.stdout.contains("s3://frames/out/scores/"),
        "{}",
        run.stdout
    );
    let keys = server.keys("frames", "out");
    assert!(
        keys.contains(&"out/runs/night/_SUCCESS".to_string()),
        "{keys:?}"
    );
    assert!(keys.contains(&"out/runs/night/manifest.json".to_string()));
    assert!(
        !keys.iter().any(|k| k.contains("_staging")),
        "staging is cleaned up: {keys:?}"
    );

    let local = tempfile::tempdir().unwrap();
    let local_out = local.path().join("out");
    demo(
        "data/demo/digits.parquet",
        local_out.to_str().unwrap(),
        "night",
        &[],
        &[],
    )
    .expect(0);
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "out/scores", fetched.path());
    let remote = likelihoods(fetched.path());
    let here = likelihoods(&local_out.join("scores"));
    assert_eq!(remote.len(), 2000);
    assert_eq!(remote, here, "same rows from the bucket as from local disk");

    // The tools read the bucket too.
    let evaluate = pipeline(
        &repo(),
        &[
            "evaluate",
            "s3://frames/out/scores",
            "--label-column",
            "condition",
            "--normal",
            "normal",
            "--json",
        ],
        &env,
    );
    evaluate.expect(0);
    let report: serde_json::Value = serde_json::from_str(&evaluate.stdout).unwrap();
    assert_eq!(report["overall"]["images"], 2000);
    // No credential in anything the run printed or wrote.
    let runs = tempfile::tempdir().unwrap();
    server.download("frames", "out/runs", runs.path());
    let manifest = std::fs::read_to_string(runs.path().join("night/manifest.json")).unwrap();
    assert!(manifest.contains("s3://frames/demo/digits.parquet"));
    for text in [
        &run.stdout,
        &run.stderr,
        &evaluate.stdout,
        &evaluate.stderr,
        &manifest,
    ] {
        assert!(!text.contains("test-secret") && !text.contains("test-key-id"));
    }
}

#[test]
fn an_unreachable_store_ends_in_75_and_a_rerun_repairs_the_run() {
    let Some(mut server) = S3Server::start() else {
        return;
    };
    let port = server.port();
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    server.stop();
    let fast = [
        "--set",
        "storage.max_retries=1",
        "--set",
        "storage.request_timeout_seconds=2",
    ];
    let failed = demo(
        "data/demo/digits.parquet",
        "s3://frames/out",
        "r",
        &env,
        &fast,
    );
    failed.expect(75).mentions(&["s3://frames/out"]);

    // The store is back (empty, as moto keeps objects in memory): the same run id completes.
    let server = S3Server::start_on(port).expect("moto restarts");
    server.create_bucket("frames");
    demo(
        "data/demo/digits.parquet",
        "s3://frames/out",
        "r",
        &env,
        &fast,
    )
    .expect(0);
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "out/scores", fetched.path());
    assert_eq!(likelihoods(fetched.path()).len(), 2000);
}
