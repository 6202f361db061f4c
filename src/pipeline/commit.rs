//! The sink's commit protocol: a run is visible only when complete, and a rerun replaces it.
//!
//! Order of operations for run R:
//! 1. delete `runs/R/_SUCCESS` (from here on, R reads as incomplete);
//! 2. delete R's old part files in every table;
//! 3. copy R's staged part files from `_staging/R/` into place (a hard link on a local disk, a
//!    server-side copy in a cloud store);
//! 4. write `runs/R/manifest.json`, then `runs/R/_SUCCESS`;
//! 5. remove `_staging/R/`.
//!
//! A crash anywhere leaves R without `_SUCCESS`; rerunning R repeats the protocol and ends with
//! exactly one copy of its rows. The staged files stay until the end, so a commit that crashed
//! part-way can also be repeated as it was (`pipeline commit` for a sharded run).
//!
//! With `sink.format = "delta"` steps 2 and 3 are instead:
//! 2. copy R's staged part files into their tables under names unique to this attempt (no
//!    Delta reader sees a file before a commit adds it; a repeated commit finds them there);
//! 3. per table, one Delta commit that removes R's previous files and adds the new ones
//!    ([`DeltaTable::replace_run`]): a reader sees R's previous rows or its new ones, never a
//!    mix and never none, whatever the moment of a crash. Copied files that a crash left out of
//!    every commit are never read (vacuuming the table deletes them).

use bytes::Bytes;

use crate::config::SinkFormat;
use crate::error::{Error, Result};
use crate::io::delta::{DataFile, DeltaTable};
use crate::io::storage::Storage;
use crate::io::tables::{self, Table, WrittenTable, run_of_part};

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
    let files = match manifest.config.sink.format {
        SinkFormat::Parquet => publish_parts(sink, run_id, staged)?,
        SinkFormat::Delta => commit_delta(sink, run_id, staged, manifest)?,
    };
    finish(sink, run_id, files, manifest)
}

/// Parquet layout: replaces R's part files in every table by its staged ones.
fn publish_parts(
    sink: &Storage,
    run_id: &str,
    staged: &[(Table, WrittenTable)],
) -> Result<Vec<(Table, Vec<String>)>> {
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
            let to = format!("{}/{}", table.dir(), staged_name(from)?);
            sink.copy(from, &to)?;
            crash_point::reached("commit.first-part-moved");
            finals.push(to);
        }
        files.push((*table, finals));
    }
    Ok(files)
}

/// Delta layout: copies the staged files into their tables, then commits each table.
fn commit_delta(
    sink: &Storage,
    run_id: &str,
    staged: &[(Table, WrittenTable)],
    manifest: &Manifest,
) -> Result<Vec<(Table, Vec<String>)>> {
    let tag = attempt_tag(staged, manifest);
    let mut placed: Vec<(Table, Vec<DataFile>)> = Vec::new();
    for (table, written) in staged {
        let mut adds = Vec::new();
        for from in &written.staged {
            let stem = staged_name(from)?
                .strip_suffix(".parquet")
                .ok_or_else(|| Error::Internal(format!("odd staged path {from}")))?;
            let path = format!("{stem}.{tag}.parquet");
            let to = format!("{}/{path}", table.dir());
            // A repeated commit (`pipeline commit` after a crash) finds some files there already,
            // perhaps in a committed version: they must not change.
            if !sink.exists(&to)? {
                sink.copy(from, &to)?;
            }
            crash_point::reached("commit.first-part-moved");
            adds.push(DataFile {
                size: sink.size(&to)?,
                path,
            });
        }
        placed.push((*table, adds));
    }
    crash_point::reached("commit.parts-placed");
    let of_run = |name: &str| run_of_part(name) == Some(run_id);
    let mut files = Vec::new();
    for table in Table::ALL {
        let delta = DeltaTable::open(sink, table.dir())?;
        let version = match placed.iter().find(|(t, _)| *t == table) {
            Some((_, adds)) => {
                let schema =
                    tables::part_schema(sink, &format!("{}/{}", table.dir(), adds[0].path))?;
                let v = delta.replace_run(of_run, Some(&schema), adds)?;
                files.push((
                    table,
                    adds.iter()
                        .map(|a| format!("{}/{}", table.dir(), a.path))
                        .collect(),
                ));
                v
            }
            // A table this run no longer writes (embeddings turned off): its earlier rows go.
            None if delta.exists()? => delta.replace_run(of_run, None, &[])?,
            None => continue,
        };
        tracing::debug!(table = table.dir(), version, "Delta commit.");
        crash_point::reached("commit.first-table-committed");
    }
    Ok(files)
}

/// The file name of a staged part (`_staging/R/<table>/<name>`).
fn staged_name(from: &str) -> Result<&str> {
    from.rsplit('/')
        .next()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| Error::Internal(format!("odd staged path {from}")))
}

/// A tag unique to this attempt at publishing R, the same for every retry of it: a hash of
/// what was staged and when the run started.
fn attempt_tag(staged: &[(Table, WrittenTable)], manifest: &Manifest) -> String {
    use sha2::Digest;
    let mut h = sha2::Sha256::new();
    h.update(manifest.run_id.as_bytes());
    h.update(manifest.started_at.as_bytes());
    for (t, w) in staged {
        h.update(t.dir().as_bytes());
        for f in &w.staged {
            h.update(f.as_bytes());
        }
    }
    h.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes the manifest and `_SUCCESS`, and clears the staging area.
fn finish(
    sink: &Storage,
    run_id: &str,
    files: Vec<(Table, Vec<String>)>,
    manifest: &mut Manifest,
) -> Result<Committed> {
    let run_dir = format!("runs/{run_id}");
    manifest.tables = files
        .iter()
        .map(|(t, f)| (t.dir().to_string(), f.clone()))
        .collect();
    if manifest.finished_at.is_empty() {
        manifest.finished_at =
            chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    }
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
