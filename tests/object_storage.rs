//! The demo against real object stores on loopback (S3, Google Cloud Storage, Azure Blob; see
//! `common/stores.rs`): the same rows as on local disk, no planted credential anywhere, and a
//! store that goes away ends in exit 75 with a rerun that repairs the run. The fault-injection
//! tests run against S3 only: the retry policy they check is the same for every store.

use crate::common::stores::{Kind, PLANTED_SECRETS, StoreServer};
use crate::common::*;

/// One test per store (modules `s3`, `gcs`, `azure`, `http` under the check's name) for a
/// check that takes the store's kind.
macro_rules! on_every_store {
    ($($check:ident),* $(,)?) => {$(
        mod $check {
            use crate::common::stores::Kind;
            #[test]
            fn s3() {
                super::$check(Kind::S3);
            }
            #[test]
            fn gcs() {
                super::$check(Kind::Gcs);
            }
            #[test]
            fn azure() {
                super::$check(Kind::Azure);
            }
            #[test]
            fn http() {
                super::$check(Kind::Http);
            }
        }
    )*};
}

on_every_store!(
    the_demo_reads_and_writes_a_bucket_with_the_rows_of_a_local_run,
    an_unreachable_store_ends_in_75_and_a_rerun_repairs_the_run,
    the_store_vanishing_mid_run_ends_in_75_with_nothing_published_and_a_rerun_repairs,
);

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

/// Where the demo's digits are in a server from [`StoreServer::with_demo_digits`], as a user
/// writes it (Azure's source in the `abfss://` form, its sink in the `az://` one).
fn demo_digits(server: &StoreServer, kind: Kind) -> String {
    match kind {
        Kind::Azure => {
            "abfss://frames@pipelinetest.dfs.core.windows.net/demo/digits.parquet".into()
        }
        _ => server.uri("frames", "demo/digits.parquet"),
    }
}

/// The demo from and to the store: the rows of a local run, the tools read the sink there, and
/// no planted credential appears in anything printed or written.
fn the_demo_reads_and_writes_a_bucket_with_the_rows_of_a_local_run(kind: Kind) {
    let Some(server) = StoreServer::with_demo_digits(kind) else {
        return;
    };
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let scratch = tempfile::tempdir().unwrap();
    let sink = server.uri("frames", "out");
    // A directory holding what the sink holds under `rel`.
    let fetched = |rel: &str| -> std::path::PathBuf {
        let into = scratch.path().join("fetched").join(rel);
        server.download("frames", &format!("out/{rel}"), &into);
        into
    };

    let run = demo(&demo_digits(&server, kind), &sink, "night", &env, &[]);
    run.expect(0);
    assert!(
        run.stdout.contains(&format!("{sink}/scores/")),
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
    let remote = likelihoods(&fetched("scores"));
    let here = likelihoods(&local_out.join("scores"));
    assert_eq!(remote.len(), 2000);
    assert_eq!(remote, here, "same rows from the bucket as from local disk");

    // The tools read the bucket too.
    let evaluate = pipeline(
        &repo(),
        &[
            "evaluate",
            &format!("{sink}/scores"),
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
    let query = pipeline(
        &repo(),
        &[
            "query",
            "--sink",
            &sink,
            "SELECT count(*) AS images, sum(CAST(is_anomaly AS INT)) AS flagged FROM scores",
            "--out",
            &format!("{sink}/answers/counts.csv"),
        ],
        &env,
    );
    query.expect(0);
    let flagged = bools(&read_table(&local_out.join("scores")), "is_anomaly")
        .into_iter()
        .filter(|&f| f)
        .count();
    assert_eq!(
        std::fs::read_to_string(fetched("answers").join("counts.csv")).unwrap(),
        format!("images,flagged\n2000,{flagged}\n")
    );
    // No credential in anything the run printed or wrote.
    let manifest = std::fs::read_to_string(fetched("runs").join("night/manifest.json")).unwrap();
    assert!(manifest.contains(&demo_digits(&server, kind)), "{manifest}");
    for text in [
        &run.stdout,
        &run.stderr,
        &evaluate.stdout,
        &evaluate.stderr,
        &query.stdout,
        &query.stderr,
        &manifest,
    ] {
        for secret in PLANTED_SECRETS {
            assert!(!text.contains(secret), "{secret} appears in {text}");
        }
    }
}

/// The sink's store down from the start: exit 75 naming it; the same run id completes once
/// the store is back.
fn an_unreachable_store_ends_in_75_and_a_rerun_repairs_the_run(kind: Kind) {
    let Some(mut server) = StoreServer::start(kind) else {
        return;
    };
    let sink = server.uri("frames", "out");
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
    let failed = demo("data/demo/digits.parquet", &sink, "r", &env, &fast);
    failed.expect(75).mentions(&[&sink]);

    // The store is back (empty, as each server keeps objects in memory): the same run id
    // completes.
    let server = StoreServer::start_on(kind, port).expect("the server restarts");
    server.create_bucket("frames");
    demo("data/demo/digits.parquet", &sink, "r", &env, &fast).expect(0);
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "out/scores", fetched.path());
    assert_eq!(likelihoods(fetched.path()).len(), 2000);
}

/// The source's store stopped once scoring has started: exit 75, nothing published, the
/// failed run's staging removed; a rerun completes.
fn the_store_vanishing_mid_run_ends_in_75_with_nothing_published_and_a_rerun_repairs(kind: Kind) {
    let Some(mut server) = StoreServer::start(kind) else {
        return;
    };
    let port = server.port();
    let env_owned = server.env();
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let demo = repo().join("data/demo/digits.parquet");
    let upload = |server: &StoreServer| {
        server.create_bucket("frames");
        for i in 0..24 {
            server.upload("frames", &format!("day/part-{i:02}.parquet"), &demo);
        }
    };
    upload(&server);
    let day = server.uri("frames", "day/");
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A model fitted once, on local disk; the sink is local too, so what was published can be
    // checked while the store is down.
    let fit = pipeline(
        &repo(),
        &["fit", "pipelines/demo.toml"],
        &[("DEMO_OUT", d.join("m").to_str().unwrap())],
    );
    let model = fitted_model(&fit);
    let sink = d.join("out");
    let args = |run: &'static str| -> Vec<String> {
        [
            "score",
            &repo().join("pipelines/demo.toml").display().to_string(),
            "--model",
            &model,
        ]
        .into_iter()
        .map(String::from)
        .chain(["--run-id", run, "--log-format", "json"].map(String::from))
        .chain(["--set".to_string(), format!("source.uri=\"{day}\"")])
        .chain(
            [
                "--set",
                "storage.max_retries=1",
                "--set",
                "storage.request_timeout_seconds=2",
            ]
            .map(String::from),
        )
        .collect()
    };

    // The server goes away once scoring has started (every footer read, row groups pending).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(args("day"))
        .envs(env.iter().copied())
        .env("DEMO_OUT", &sink)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut log = String::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("\"message\":\"Scoring.\"") {
            server.stop();
        }
    }
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(75), "{log}");
    assert!(
        !sink.join("runs/day/_SUCCESS").exists(),
        "nothing published"
    );
    for table in ["scores", "anomalies", "rejects"] {
        let dir = sink.join(table);
        let parts = std::fs::read_dir(&dir).map(|r| r.count()).unwrap_or(0);
        assert_eq!(
            parts,
            0,
            "no part under {} after a failed run",
            dir.display()
        );
    }
    assert!(
        !sink.join("_staging/day").exists(),
        "the failed run's staging is removed"
    );

    // Back up (empty: the files are uploaded again); the rerun completes.
    let server = StoreServer::start_on(kind, port).expect("the server restarts");
    upload(&server);
    let mut env2 = env.clone();
    let sink_s = sink.to_str().unwrap().to_string();
    env2.push(("DEMO_OUT", &sink_s));
    let rerun_args = args("day");
    let rerun: Vec<&str> = rerun_args.iter().map(String::as_str).collect();
    pipeline(d, &rerun, &env2).expect(0);
    let scores = likelihoods(&sink.join("scores"));
    assert_eq!(rows(&read_table(&sink.join("scores"))), 24 * 2000);
    assert_eq!(scores.len(), 2000, "the 24 files share their 2,000 ids");
}

/// Throttling (503), server errors (500), connection resets and stalls, injected by a proxy in
/// front of the S3 server on a fixed schedule, are retried per `[storage]`: the run succeeds
/// with the rows of a local run. Faults on every connection end in 75 with nothing published.
#[test]
fn injected_storage_faults_are_retried_or_end_in_75() {
    use crate::common::fault_proxy::{Fault, FaultProxy};
    use std::time::Duration;
    let Some(server) = StoreServer::with_demo_digits(Kind::S3) else {
        return;
    };
    let proxy = FaultProxy::start(server.port(), |n| match n % 6 {
        1 => Fault::Throttle,
        3 if (n / 6) % 2 == 0 => Fault::ServerError,
        3 => Fault::Reset,
        5 => Fault::Slow(Duration::from_millis(700)),
        _ => Fault::None,
    });
    let env_owned = server.env_via(&proxy.endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let retries = [
        "--set",
        "storage.max_retries=6",
        "--set",
        "storage.request_timeout_seconds=10",
    ];
    demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/out",
        "faulty",
        &env,
        &retries,
    )
    .expect(0);
    let faulted = proxy.faulted.load(std::sync::atomic::Ordering::SeqCst);
    let seen = proxy.seen.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!("{faulted} faults injected over {seen} connections");
    assert!(faulted >= 4, "only {faulted} faults were injected");
    let local = tempfile::tempdir().unwrap();
    let local_out = local.path().join("out");
    demo(
        "data/demo/digits.parquet",
        local_out.to_str().unwrap(),
        "faulty",
        &[],
        &[],
    )
    .expect(0);
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "out/scores", fetched.path());
    assert_eq!(
        likelihoods(fetched.path()),
        likelihoods(&local_out.join("scores")),
        "the rows of a clean local run, despite {faulted} injected faults"
    );
    drop(proxy);

    // Throttled on every connection: the retries run out and the run ends in 75.
    let always = FaultProxy::start(server.port(), |_| Fault::Throttle);
    let env_owned = server.env_via(&always.endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = std::time::Instant::now();
    demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/throttled",
        "t",
        &env,
        &["--set", "storage.max_retries=2"],
    )
    .expect(75)
    .mentions(&["storage unavailable"]);
    assert!(started.elapsed() < Duration::from_secs(120));
    assert!(
        server.keys("frames", "throttled").is_empty(),
        "nothing published"
    );
}

/// Requests whose answer is lost after the store acted on them, so the client cannot tell
/// whether they took effect: deletes (S3's bulk `POST ?delete` and `DELETE`), creates-if-absent
/// (the shards' commit lock) and copies (half of a rename) lose every other answer. The run
/// publishes the rows of a local run, and a two-shard run publishes exactly once.
#[test]
fn requests_whose_answer_is_lost_are_retried_without_harm() {
    use crate::common::fault_proxy::{FaultProxy, RequestFault};
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    let Some(server) = StoreServer::with_demo_digits(Kind::S3) else {
        return;
    };
    // Lost answers per kind: delete, create, copy.
    let lost: Arc<[AtomicUsize; 3]> = Arc::new(Default::default());
    let attempts: Mutex<HashMap<String, usize>> = Mutex::default();
    let lost2 = lost.clone();
    let proxy = FaultProxy::per_request(server.port(), move |head| {
        let line = head.lines().next().unwrap_or_default();
        let headers = head.to_ascii_lowercase();
        let kind = if line.starts_with("DELETE ")
            || line.starts_with("POST ") && line.contains("?delete")
        {
            0
        } else if headers.contains("\r\nif-none-match:") {
            1
        } else if headers.contains("\r\nx-amz-copy-source:") {
            2
        } else {
            return RequestFault::Forward;
        };
        let mut attempts = attempts.lock().unwrap();
        let n = attempts.entry(line.to_string()).or_default();
        *n += 1;
        if *n % 2 == 1 {
            lost2[kind].fetch_add(1, Ordering::SeqCst);
            RequestFault::LoseAnswer
        } else {
            RequestFault::Forward
        }
    });
    let env_owned = server.env_via(&proxy.endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let run = demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/out",
        "lossy",
        &env,
        &[],
    );
    run.expect(0);
    let model = run
        .stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("model"))
        .map(|m| m.trim().to_string())
        .expect("the run names its model");

    let local = tempfile::tempdir().unwrap();
    let local_out = local.path().join("out");
    demo(
        "data/demo/digits.parquet",
        local_out.to_str().unwrap(),
        "lossy",
        &[],
        &[],
    )
    .expect(0);
    let expected = likelihoods(&local_out.join("scores"));
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "out/scores", fetched.path());
    assert_eq!(likelihoods(fetched.path()), expected);

    let set_source = "source.uri=\"s3://frames/demo/digits.parquet\"";
    let mut env = env.clone();
    env.push(("DEMO_OUT", "s3://frames/sharded"));
    let published: Vec<bool> = ["0/2", "1/2"]
        .iter()
        .map(|shard| {
            let out = pipeline(
                &repo(),
                &[
                    "score",
                    "pipelines/demo.toml",
                    "--model",
                    &model,
                    "--run-id",
                    "lossy",
                    "--shard",
                    shard,
                    "--set",
                    set_source,
                ],
                &env,
            );
            out.expect(0);
            out.stdout.contains("results under")
        })
        .collect();
    assert_eq!(published, [false, true], "the second shard publishes");
    let fetched = tempfile::tempdir().unwrap();
    server.download("frames", "sharded/scores", fetched.path());
    assert_eq!(likelihoods(fetched.path()), expected);
    assert!(server.keys("frames", "sharded/_staging").is_empty());
    let lost: Vec<usize> = lost.iter().map(|n| n.load(Ordering::SeqCst)).collect();
    eprintln!("answers lost (delete, create, copy): {lost:?}");
    assert!(lost.iter().all(|&n| n >= 1), "every kind was hit: {lost:?}");
}

/// A store that refuses access (403 AccessDenied: wrong credentials or policy) ends the run in
/// exit 77 at once, not after retries, saying to check the credentials; and the binary never
/// prints the secret it was given.
#[test]
fn a_store_that_refuses_access_ends_in_77() {
    use crate::common::fault_proxy::{Fault, FaultProxy};
    let Some(server) = StoreServer::with_demo_digits(Kind::S3) else {
        return;
    };
    let proxy = FaultProxy::start(server.port(), |_| Fault::Forbidden);
    let env_owned = server.env_via(&proxy.endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let started = std::time::Instant::now();
    let out = demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/out",
        "refused",
        &env,
        &[],
    );
    out.expect(77)
        .mentions(&["permission denied", "credentials"]);
    assert!(
        started.elapsed() < std::time::Duration::from_secs(30),
        "a refusal is not retried as if transient"
    );
    assert!(!out.stderr.contains("test-secret") && !out.stdout.contains("test-secret"));
}

/// A store that lacks a request the pipeline makes (answers 501 Not Implemented, as
/// gcp-storage-emulator does to HEAD) ends the run in 74, saying so, not in 75: rerunning the
/// same request against the same store cannot succeed.
#[test]
fn a_store_without_a_request_ends_in_74_not_75() {
    use crate::common::fault_proxy::{Fault, FaultProxy};
    let Some(server) = StoreServer::with_demo_digits(Kind::S3) else {
        return;
    };
    let proxy = FaultProxy::start(server.port(), |_| Fault::NotImplemented);
    let env_owned = server.env_via(&proxy.endpoint);
    let env: Vec<(&str, &str)> = env_owned.iter().map(|(k, v)| (*k, v.as_str())).collect();
    demo(
        "s3://frames/demo/digits.parquet",
        "s3://frames/out",
        "incomplete",
        &env,
        &["--set", "storage.max_retries=1"],
    )
    .expect(74)
    .mentions(&["501 Not Implemented", "does not implement"]);
}
