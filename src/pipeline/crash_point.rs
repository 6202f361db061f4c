//! Named points where a test can make the process die at once, to check what a crash there
//! leaves behind (tests/crash.rs).
//!
//! Killing a process after a measured delay rarely lands inside the few milliseconds a commit
//! takes; a crash point lands exactly. `PIPELINE_CRASH_AT=<name>` makes the process abort
//! (no unwinding, no destructors, no flushing: as abrupt as SIGKILL for everything it has
//! written) when it reaches the point of that name. Unset, a point costs one comparison.

use std::sync::OnceLock;

/// The environment variable naming the point to die at.
pub const CRASH_AT_VAR: &str = "PIPELINE_CRASH_AT";

/// Every point, in the order a run reaches them (`model.*` only when it fits, `shard.*` only
/// when sharded; `commit.old-parts-removed` only with `sink.format = "parquet"`,
/// `commit.parts-placed` and `commit.first-table-committed` only with `"delta"`).
pub const POINTS: &[&str] = &[
    "model.weights-written",
    "shard.staged",
    "commit.started",
    "commit.success-removed",
    "commit.old-parts-removed",
    "commit.first-part-moved",
    "commit.parts-placed",
    "commit.first-table-committed",
    "commit.manifest-written",
    "commit.published",
];

fn target() -> Option<&'static str> {
    static TARGET: OnceLock<Option<String>> = OnceLock::new();
    TARGET
        .get_or_init(|| std::env::var(CRASH_AT_VAR).ok())
        .as_deref()
}

/// Dies here if `PIPELINE_CRASH_AT` names this point. `name` must be one of [`POINTS`].
pub fn reached(name: &'static str) {
    debug_assert!(POINTS.contains(&name), "unlisted crash point {name}");
    if target() == Some(name) {
        eprintln!("{CRASH_AT_VAR}={name}: aborting here.");
        std::process::abort();
    }
}
