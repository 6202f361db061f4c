//! Crash consistency: the process killed (SIGKILL) at many points of a run leaves readers the
//! previous complete state of that run or nothing, and a rerun completes with exactly the rows
//! of a clean run; SIGTERM stops the run within seconds with exit 75 and publishes nothing.
//!
//! A "reader" here is what DESIGN's commit protocol promises to: it trusts a run only when
//! `runs/R/_SUCCESS` exists, and then reads the part files its manifest lists.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::*;

const RUN: &str = "crashy";

/// A run long enough to be killed in each stage: read, fit (NADE, a few epochs), score, commit.
fn setup(dir: &Path) {
    let ids = ids(0, 2000);
    write_tensor_u8(
        &dir.join("frames.parquet"),
        &ids,
        &images(2000, 12, 12, 5),
        &[12, 12],
    );
    write_epochs(dir, 4);
}

/// The run's configuration, training NADE for exactly `epochs` epochs.
fn write_epochs(dir: &Path, epochs: usize) {
    write_config(
        dir,
        "p.toml",
        "frames.parquet",
        "out",
        &format!(
            "[model]\nkind = \"nade\"\nhidden = 24\n\n[train]\nepochs = {epochs}\npatience = {epochs}\n"
        ),
    );
}

/// Lengthens the run until it takes at least a few seconds, so that kill points spread over
/// it land mid-run on fast machines and optimized builds too; leaves no output behind.
fn calibrate(dir: &Path) {
    for epochs in [4, 16, 64, 256] {
        write_epochs(dir, epochs);
        let started = Instant::now();
        let run = start(dir).wait_with_output().unwrap();
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::remove_dir_all(dir.join("out")).unwrap();
        if started.elapsed() >= Duration::from_secs(3) {
            return;
        }
    }
}

fn start(dir: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "p.toml", "--run-id", RUN, "-q"])
        .current_dir(dir)
        .env_remove("PIPELINE_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the binary starts")
}

/// The score rows (id, log-likelihood) a reader sees for the run, or `None` when the run is
/// not visible. Checks that a visible run's manifest lists only files that exist, and that no
/// part file of the run lies in a table directory unlisted.
fn visible_rows(out: &Path) -> Option<Vec<(String, f64)>> {
    let run_dir = out.join("runs").join(RUN);
    if !run_dir.join("_SUCCESS").exists() {
        return None;
    }
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(run_dir.join("manifest.json")).expect("manifest"))
            .expect("manifest is JSON");
    let mut rows = Vec::new();
    for (table, files) in manifest["tables"].as_object().expect("tables") {
        let listed: Vec<String> = files
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f.as_str().unwrap().to_string())
            .collect();
        for f in &listed {
            assert!(
                out.join(f).exists(),
                "the manifest lists {f}, which is missing"
            );
        }
        let present: Vec<String> = std::fs::read_dir(out.join(table))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| format!("{table}/{}", e.file_name().to_string_lossy()))
                    .filter(|name| name.contains(&format!("part-{RUN}-")))
                    .collect()
            })
            .unwrap_or_default();
        for p in &present {
            assert!(listed.contains(p), "{p} is visible but not in the manifest");
        }
        if table == "scores" {
            for f in &listed {
                let batches = read_table_file(&out.join(f));
                let ids = strings(&batches, "id");
                let ll = floats(&batches, "log_likelihood");
                rows.extend(ids.into_iter().map(Option::unwrap).zip(ll));
            }
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    Some(rows)
}

fn read_table_file(path: &Path) -> Vec<arrow::record_batch::RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn sigkill_at_any_point_leaves_the_previous_run_or_nothing_and_a_rerun_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    calibrate(d);
    // Killed before any run of R was complete: nothing of R is visible.
    for ms in [200, 700, 1500] {
        let mut child = start(d);
        std::thread::sleep(Duration::from_millis(ms));
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended within {ms} ms, before the kill"
        );
        let _ = child.kill();
        let _ = child.wait();
        assert_eq!(visible_rows(&d.join("out")), None, "killed at {ms} ms");
    }
    let started = Instant::now();
    let clean = start(d).wait_with_output().unwrap();
    let duration = started.elapsed();
    assert!(
        clean.status.success(),
        "{}",
        String::from_utf8_lossy(&clean.stderr)
    );
    let want = visible_rows(&d.join("out")).expect("the clean run is visible");
    assert_eq!(want.len(), 2000);

    // Kill points spread over the whole run, denser near the end where the commit is. A run
    // can go faster than the clean one did (the tests running beside it finish, the host's
    // neighbours quieten): a kill that finds the run already ended shortens the estimate and
    // tries that point again, so that the points still land mid-run.
    let fractions = [0.05, 0.2, 0.4, 0.6, 0.75, 0.85, 0.92, 0.96, 0.99];
    let mut estimate = duration;
    let mut killed_running = 0;
    for f in fractions {
        for _attempt in 0..4 {
            let mut child = start(d);
            std::thread::sleep(estimate.mul_f64(f));
            // SIGKILL; the run may also have finished already.
            let running = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            let _ = child.wait();
            // The previous complete run stays visible (the commit hides it only for the
            // milliseconds it takes to move the new parts in), or R is invisible.
            if let Some(rows) = visible_rows(&d.join("out")) {
                assert_eq!(
                    rows, want,
                    "killed at {f}: a visible run has the clean rows"
                );
            }
            if running {
                killed_running += 1;
                break;
            }
            estimate = estimate.mul_f64(0.8);
        }
    }
    assert!(
        killed_running >= fractions.len() - 1,
        "only {killed_running} of {} kills landed mid-run",
        fractions.len()
    );
    // Each model directory is complete (model.json is written last) or ignorable.
    for entry in std::fs::read_dir(d.join("out/models")).unwrap() {
        let dir = entry.unwrap().path();
        if dir.join("model.json").exists() {
            assert!(dir.join("model.safetensors").exists(), "{dir:?}");
        }
    }
    let rerun = start(d).wait_with_output().unwrap();
    assert!(
        rerun.status.success(),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
    assert_eq!(visible_rows(&d.join("out")).as_deref(), Some(&want[..]));
    let staged = std::fs::read_dir(d.join("out/_staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "the rerun leaves nothing staged");
}

#[test]
fn sigterm_stops_within_seconds_with_75_and_publishes_nothing() {
    signal_stops_the_run("TERM");
}

/// Ctrl-C at a terminal: the same as SIGTERM.
#[test]
fn sigint_stops_within_seconds_with_75_and_publishes_nothing() {
    signal_stops_the_run("INT");
}

/// Sends SIG`signal` mid-training and checks the run stops within seconds, with 75, naming the
/// signal, having published and left nothing.
fn signal_stops_the_run(signal: &str) {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    setup(d);
    // Long enough that the signal lands in training.
    write_config(
        d,
        "p.toml",
        "frames.parquet",
        "out",
        "[model]\nkind = \"nade\"\nhidden = 64\n\n[train]\nepochs = 500\npatience = 500\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipeline"))
        .args(["run", "p.toml", "--run-id", RUN, "--log-format", "json"])
        .current_dir(d)
        .env_remove("PIPELINE_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the first finished epoch in the log, so the signal lands mid-training.
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut all = String::new();
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            if line.contains("Epoch done") {
                let _ = tx.send(());
            }
            all.push_str(&line);
            all.push('\n');
        }
        all
    });
    rx.recv_timeout(Duration::from_secs(120))
        .expect("training starts");
    let signalled = Instant::now();
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s.code();
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(10),
            "still running 10 s after SIG{signal}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let stopped_in = signalled.elapsed();
    let log = reader.join().unwrap();
    assert_eq!(code, Some(75), "{log}");
    assert!(stopped_in < Duration::from_secs(5), "took {stopped_in:?}");
    assert!(
        log.contains(&format!("SIG{signal}")) && !log.contains("panicked"),
        "{log}"
    );
    let out = d.join("out");
    assert!(!out.join("runs").join(RUN).join("_SUCCESS").exists());
    for table in ["scores", "anomalies", "rejects", "models"] {
        let entries = std::fs::read_dir(out.join(table))
            .map(|d| d.count())
            .unwrap_or(0);
        assert_eq!(entries, 0, "{table}/ has output from the stopped run");
    }
    let staged = std::fs::read_dir(out.join("_staging"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(staged, 0, "nothing staged is left behind");
}

fn staged_entries(out: &Path) -> usize {
    std::fs::read_dir(out.join("_staging"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// A crash at each named point of a run (the model's weights written but not its model.json,
/// and each step of the commit protocol): readers see exactly the previous complete run where
/// the protocol promises it (before `_SUCCESS` is removed, and after the new one is written)
/// and nothing in between, never a mix; a rerun then publishes exactly the clean rows. The
/// same for a shard killed after staging: rerunning it, then the other, publishes once.
#[test]
fn a_crash_at_every_commit_step_leaves_the_previous_run_or_nothing_and_a_rerun_repairs() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let out = d.join("out");
    write_tensor_u8(
        &d.join("frames.parquet"),
        &ids(0, 600),
        &images(600, 10, 10, 9),
        &[10, 10],
    );
    // Several part files per table, so a crash can fall between two moves.
    std::fs::write(
        d.join("p.toml"),
        "[pipeline]\nname = \"test\"\n\n[source]\nuri = \"frames.parquet\"\n\n\
         [sink]\nuri = \"out\"\nmax_rows_per_file = 250\n\n[model]\nkind = \"ar\"\nk = 3\n",
    )
    .unwrap();
    let run = ["run", "p.toml", "--run-id", RUN, "-q"];

    // Nothing complete yet: a crash anywhere leaves the run invisible.
    for point in ["model.weights-written", "commit.manifest-written"] {
        crash_at(d, &run, point);
        assert_eq!(visible_rows(&out), None, "{point}");
    }
    pipeline(d, &run, &[]).expect(0);
    let want = visible_rows(&out).expect("the clean run is visible");
    assert_eq!(want.len(), 600);

    // (point, whether the previous complete run is still visible after a crash there)
    let points = [
        ("model.weights-written", true),
        ("commit.started", true),
        ("commit.success-removed", false),
        ("commit.old-parts-removed", false),
        ("commit.first-part-moved", false),
        ("commit.manifest-written", false),
        ("commit.published", true),
    ];
    for (point, previous_visible) in points {
        crash_at(d, &run, point);
        let seen = visible_rows(&out);
        if previous_visible {
            assert_eq!(seen.as_deref(), Some(&want[..]), "after a crash at {point}");
        } else {
            assert_eq!(seen, None, "after a crash at {point}");
        }
        for entry in std::fs::read_dir(out.join("models")).unwrap() {
            let model = entry.unwrap().path();
            if model.join("model.json").exists() {
                assert!(model.join("model.safetensors").exists(), "{model:?}");
            }
        }
        pipeline(d, &run, &[]).expect(0);
        assert_eq!(
            visible_rows(&out).as_deref(),
            Some(&want[..]),
            "rerun after {point}"
        );
        assert_eq!(
            staged_entries(&out),
            0,
            "rerun after {point} leaves nothing staged"
        );
    }

    // A shard dies after staging its rows; rerunning it and the other publishes them once. The
    // file is one row group, so shard 1 owns none: it must stage an empty share, not fail.
    let model = fit_model(d, "p.toml");
    let shard = |i: &'static str| {
        [
            "score", "p.toml", "--model", &model, "--run-id", "sharded", "--shard", i, "-q",
        ]
    };
    crash_at(d, &shard("0/2"), "shard.staged");
    pipeline(d, &shard("0/2"), &[]).expect(0);
    pipeline(d, &shard("1/2"), &[]).expect(0);
    assert!(out.join("runs/sharded/_SUCCESS").exists());
    let mut sharded: Vec<(String, f64)> = Vec::new();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("runs/sharded/manifest.json")).unwrap())
            .unwrap();
    for f in manifest["tables"]["scores"].as_array().unwrap() {
        let batches = read_table_file(&out.join(f.as_str().unwrap()));
        let ids = strings(&batches, "id");
        sharded.extend(
            ids.into_iter()
                .map(Option::unwrap)
                .zip(floats(&batches, "log_likelihood")),
        );
    }
    sharded.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(sharded, want, "each image once, scored as in one process");
    assert_eq!(staged_entries(&out), 0);
}
