//! A full local disk: the run ends in 74 (an IO error) with nothing half-visible. The sink is a
//! tiny tmpfs mounted in a private mount namespace (`unshare -rm`); where the machine does not
//! allow that, the test says so and skips, except where `PIPELINE_REQUIRE_FULL_DISK` is set
//! (CI), where it fails.

use std::process::Command;

use crate::common::*;

#[test]
fn a_full_disk_ends_in_74_with_nothing_visible() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir(d.join("sink")).unwrap();
    let probe = Command::new("unshare")
        .args(["-rm", "sh", "-c"])
        .arg(format!(
            "mount -t tmpfs -o size=64k tmpfs {}",
            d.join("sink").display()
        ))
        .output();
    if !probe.is_ok_and(|o| o.status.success()) {
        skip_unless_required(
            "PIPELINE_REQUIRE_FULL_DISK",
            "cannot mount a tmpfs in a private mount namespace here (unshare -rm)",
        );
        return;
    }
    // Inside the namespace: mount a 64 KiB sink, run the demo into it, then list what is there.
    let script = format!(
        "mount -t tmpfs -o size=64k tmpfs {sink} && cd {repo} && DEMO_OUT={sink} {bin} run pipelines/demo.toml --run-id full -q; echo \"EXIT=$?\"; cd {sink} && find . -type f | sort",
        sink = d.join("sink").display(),
        repo = repo().display(),
        bin = env!("CARGO_BIN_EXE_pipeline"),
    );
    let out = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("EXIT=74"),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("No space left") && !stderr.contains("panicked"),
        "{stderr}"
    );
    let files: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.starts_with("EXIT="))
        .skip(1)
        .collect();
    for f in &files {
        assert!(
            !f.contains("_SUCCESS")
                && !f.starts_with("./scores/")
                && !f.starts_with("./anomalies/")
                && !f.starts_with("./rejects/"),
            "{f} is visible after a failed run: {files:?}"
        );
    }
}
