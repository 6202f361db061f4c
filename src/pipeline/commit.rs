//! The sink's commit protocol: a run is visible only when complete, and a rerun replaces it.
//!
//! Order of operations for run R:
//! 1. delete `runs/R/_SUCCESS` (from here on, R reads as incomplete);
//! 2. delete R's old part files in `scores/`, `anomalies/`, `rejects/`;
//! 3. move R's staged part files from `_staging/R/` into place;
//! 4. write `runs/R/manifest.json`, then `runs/R/_SUCCESS`;
//! 5. remove what is left of `_staging/R/`.
//!
//! A crash anywhere leaves R without `_SUCCESS`; rerunning R repeats the protocol and ends with
//! exactly one copy of its rows.

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::io::storage::Storage;
use crate::io::tables::{Table, WrittenTable, run_of_part};

use super::crash_point;
use super::manifest::Manifest;

/// Where a committed run's pieces are, relative to the sink.
#[derive(Debug, Clone)]
pub struct Committed {
    /// Final part files per table.
    pub files: Vec<(Table, Vec<String>)>,
    /// The manifest's path.
    pub manifest: String,
}

/// Publishes the staged tables of `run_id` and its manifest.
pub fn commit(
    sink: &Storage,
    run_id: &str,
    staged: &[(Table, WrittenTable)],
    manifest: &mut Manifest,
) -> Result<Committed> {
    let run_dir = format!("runs/{run_id}");
    crash_point::reached("commit.started");
    sink.delete(&format!("{run_dir}/_SUCCESS"))?;
    crash_point::reached("commit.success-removed");
    for table in Table::ALL {
        for old in sink.list(table.dir())? {
            let rel = sink.relative(&old.location);
            let name = rel.rsplit('/').next().unwrap_or_default();
            if run_of_part(name) == Some(run_id) {
                sink.delete(&rel)?;
            }
        }
    }
    crash_point::reached("commit.old-parts-removed");
    let mut files = Vec::new();
    for (table, written) in staged {
        let mut finals = Vec::new();
        for from in &written.staged {
            let name = from
                .rsplit('/')
                .next()
                .ok_or_else(|| Error::Internal(format!("odd staged path {from}")))?;
            let to = format!("{}/{name}", table.dir());
            sink.rename(from, &to)?;
            crash_point::reached("commit.first-part-moved");
            finals.push(to);
        }
        files.push((*table, finals));
    }
    manifest.tables = files
        .iter()
        .map(|(t, f)| (t.dir().to_string(), f.clone()))
        .collect();
    manifest.finished_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let mut json = serde_json::to_vec_pretty(manifest)
        .map_err(|e| Error::internal(e, "writing the manifest"))?;
    json.push(b'\n');
    let manifest_path = format!("{run_dir}/manifest.json");
    sink.put(&manifest_path, Bytes::from(json))?;
    crash_point::reached("commit.manifest-written");
    sink.put(&format!("{run_dir}/_SUCCESS"), Bytes::new())?;
    crash_point::reached("commit.published");
    discard_staging(sink, run_id)?;
    Ok(Committed {
        files,
        manifest: manifest_path,
    })
}

/// The commit lock of sharded run `run_id` (see `shards::try_commit`): a create-if-absent
/// object inside the run's staging directory, so exactly one worker takes it.
pub fn lock_path(run_id: &str) -> String {
    format!("_staging/{run_id}/commit.lock")
}

/// Removes everything staged for `run_id` (after a commit, or after a failed run).
///
/// The shards' commit lock goes last: while it stands, no other worker can take it, and once
/// it is gone so are the shard records a second commit would need (see `shards::try_commit`).
pub fn discard_staging(sink: &Storage, run_id: &str) -> Result<()> {
    let dir = format!("_staging/{run_id}");
    let lock = lock_path(run_id);
    for leftover in sink.list(&dir)? {
        let rel = sink.relative(&leftover.location);
        if rel != lock {
            sink.delete(&rel)?;
        }
    }
    sink.delete(&lock)?;
    // Local stores leave empty directories behind; they hold nothing a reader would see, but
    // tidy them where we can.
    if let Some(path) = sink.local_path(&dir) {
        let _ = std::fs::remove_dir_all(path);
    }
    if let Some(parent) = sink.local_path("_staging") {
        let _ = std::fs::remove_dir(parent); // only when empty: other runs may be staging
    }
    Ok(())
}
