//! Sharded scoring as a Kubernetes Indexed Job would run it: N processes, each told its index
//! by `JOB_COMPLETION_INDEX`, together write exactly the rows of one process.

use std::process::{Command, Stdio};

use crate::common::*;

/// The demo's model fitted once under `d`, the `--set` that points the demo at the bundled
/// digits by absolute path (4 row groups), and the demo pipeline's path.
fn demo_model(d: &std::path::Path) -> (String, String, String) {
    let fit = pipeline(
        &repo(),
        &["fit", "pipelines/demo.toml"],
        &[("DEMO_OUT", d.join("models-sink").to_str().unwrap())],
    );
    let demo = repo().join("data/demo/digits.parquet");
    (
        fitted_model(&fit),
        format!("source.uri=\"{}\"", demo.display()),
        repo().join("pipelines/demo.toml").display().to_string(),
    )
}

#[test]
fn shards_run_in_parallel_write_exactly_the_rows_of_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, set_source, cfg) = demo_model(d);

    let single = d.join("single");
    pipeline(
        d,
        &[
            "score",
            &repo().join("pipelines/demo.toml").display().to_string(),
            "--model",
            &model,
            "--run-id",
            "night",
            "--set",
            &set_source,
        ],
        &[("DEMO_OUT", single.to_str().unwrap())],
    )
    .expect(0);

    // Four workers at once, one row group each, as the pods of an Indexed Job.
    let sharded = d.join("sharded");
    let workers: Vec<_> = (0..4)
        .map(|i| {
            Command::new(env!("CARGO_BIN_EXE_pipeline"))
                .args([
                    "score",
                    &repo().join("pipelines/demo.toml").display().to_string(),
                    "--model",
                    &model,
                ])
                .args(["--run-id", "night", "--shards", "4", "--set", &set_source])
                .env("JOB_COMPLETION_INDEX", i.to_string())
                .env("DEMO_OUT", &sharded)
                .current_dir(d)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<_> = workers
        .into_iter()
        .map(|w| w.wait_with_output().unwrap())
        .collect();
    for o in &outputs {
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let published = outputs
        .iter()
        .filter(|o| String::from_utf8_lossy(&o.stdout).contains("results under"))
        .count();
    let stdout: Vec<_> = outputs
        .iter()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .collect();
    // The last worker to stage sees every record and publishes: exactly one does, whatever
    // the interleaving (the others report waiting, or that another worker published).
    assert_eq!(published, 1, "exactly one worker publishes: {stdout:?}");

    let one = likelihoods(&single.join("scores"));
    let many = likelihoods(&sharded.join("scores"));
    assert_eq!(one.len(), 2000);
    assert_eq!(
        rows(&read_table(&sharded.join("scores"))),
        2000,
        "no image twice"
    );
    assert_eq!(many, one, "no image lost, none scored differently");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sharded.join("runs/night/manifest.json")).unwrap())
            .unwrap();
    assert_eq!(manifest["rows"]["scored"], 2000);
    assert_eq!(manifest["rows"]["read"], 2000);
    assert_eq!(
        manifest["tables"]["scores"].as_array().unwrap().len(),
        4,
        "one part per shard"
    );
    assert!(sharded.join("runs/night/_SUCCESS").exists());
    assert!(
        !sharded.join("_staging/night").exists(),
        "staging is cleaned up"
    );

    // A stale commit lock (a publisher that died holding it): the last shard to stage says so
    // and how to publish, and `pipeline commit` does.
    let manual = d.join("manual");
    std::fs::create_dir_all(manual.join("_staging/late")).unwrap();
    std::fs::write(manual.join("_staging/late/commit.lock"), b"").unwrap();
    for i in 0..2 {
        let shard = format!("{i}/2");
        let out = pipeline(
            d,
            &[
                "score",
                &cfg,
                "--model",
                &model,
                "--run-id",
                "late",
                "--shard",
                &shard,
                "--set",
                &set_source,
            ],
            &[("DEMO_OUT", manual.to_str().unwrap())],
        );
        out.expect(0);
        let said = if i == 0 {
            "waiting for shards [1]"
        } else {
            "pipeline commit"
        };
        assert!(out.stdout.contains(said), "{}", out.stdout);
    }
    assert!(!manual.join("runs/late/_SUCCESS").exists());
    let committed = pipeline(
        d,
        &[
            "commit",
            manual.to_str().unwrap(),
            "--run-id",
            "late",
            "--shards",
            "2",
        ],
        &[],
    );
    committed.expect(0);
    assert!(
        committed.stdout.contains("2000 images scored"),
        "{}",
        committed.stdout
    );
    assert_eq!(likelihoods(&manual.join("scores")), one);
    assert!(manual.join("runs/late/_SUCCESS").exists());
    assert!(
        !manual.join("_staging/late").exists(),
        "lock and records removed"
    );

    // A commit with a shard missing says which.
    pipeline(
        d,
        &[
            "commit",
            sharded.to_str().unwrap(),
            "--run-id",
            "other",
            "--shards",
            "2",
        ],
        &[],
    )
    .expect(66)
    .mentions(&["[0, 1]"]);
    // --shards without JOB_COMPLETION_INDEX, and a bad --shard, are usage errors.
    pipeline(d, &["score", &cfg, "--model", &model, "--shards", "3"], &[])
        .expect(64)
        .mentions(&["JOB_COMPLETION_INDEX"]);
    pipeline(
        d,
        &["score", &cfg, "--model", &model, "--shard", "3/3"],
        &[],
    )
    .expect(64);
}

/// Three workers, the last of which dies right after staging its rows (before it could see that
/// it was the last): nobody publishes the run, the others have gone, and `pipeline commit`
/// publishes it with every row once, as one process scores them. Then the same run again,
/// its last worker dying in the middle of publishing it: `pipeline commit` repeats the commit.
#[test]
fn a_worker_dying_after_staging_or_while_publishing_leaves_the_run_to_pipeline_commit() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (model, set_source, cfg) = demo_model(d);
    let score = |out: &std::path::Path, extra: &[&str], env: &[(&str, &str)]| {
        let mut args = vec![
            "score",
            cfg.as_str(),
            "--model",
            model.as_str(),
            "--run-id",
            "night",
            "--set",
            &set_source,
        ];
        args.extend(extra);
        let mut env = env.to_vec();
        env.push(("DEMO_OUT", out.to_str().unwrap()));
        pipeline(d, &args, &env)
    };
    let single = d.join("single");
    score(&single, &[], &[]).expect(0);
    let one = likelihoods(&single.join("scores"));

    let sharded = d.join("sharded");
    for point in ["shard.staged", "commit.first-part-moved"] {
        for i in 0..2 {
            score(&sharded, &["--shard", &format!("{i}/3")], &[]).expect(0);
        }
        let dying = score(
            &sharded,
            &["--shard", "2/3"],
            &[("PIPELINE_CRASH_AT", point)],
        );
        assert!(
            dying.code != 0 && dying.stderr.contains(&format!("PIPELINE_CRASH_AT={point}")),
            "the worker died at {point}: {}",
            dying.stderr
        );
        assert!(
            !sharded.join("runs/night/_SUCCESS").exists(),
            "nobody published ({point})"
        );
        let committed = pipeline(
            d,
            &[
                "commit",
                sharded.to_str().unwrap(),
                "--run-id",
                "night",
                "--shards",
                "3",
            ],
            &[],
        );
        committed.expect(0);
        assert!(sharded.join("runs/night/_SUCCESS").exists());
        assert_eq!(
            likelihoods(&sharded.join("scores")),
            one,
            "every row once ({point})"
        );
        assert_eq!(
            rows(&read_table(&sharded.join("scores"))),
            one.len(),
            "no second copy ({point})"
        );
        assert_eq!(
            rows(&read_table(&sharded.join("history"))),
            1,
            "one history row for the run ({point})"
        );
        assert!(!sharded.join("_staging/night").exists(), "{point}");
    }
}
