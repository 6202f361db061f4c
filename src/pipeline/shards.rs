//! Sharded scoring: N workers (processes or Kubernetes Indexed Job pods) each score their share
//! of the source's row groups and stage their part files under `_staging/<run_id>/`, plus a
//! record of what they did (`_staging/<run_id>/shards/<i>-of-<n>.json`). Whichever worker sees
//! all N records takes the commit lock (a create-if-absent object) and publishes the run with
//! one manifest that adds the shards up; `pipeline commit` does the same by hand.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::artifact::ModelSet;
use super::commit::{self, Committed};
use super::manifest::Manifest;
use super::publish;
use crate::error::{Error, Result};
use crate::io::source::Shard;
use crate::io::storage::{Io, Storage};
use crate::io::tables::{Table, WrittenTable};

/// What one shard staged: its share of the run's manifest, and its part files.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ShardRecord {
    /// This shard.
    pub index: u32,
    /// Shards in all.
    pub count: u32,
    /// The manifest as this shard alone would write it (counts of its rows only).
    pub manifest: Manifest,
    /// Staged part files per table directory.
    pub staged: BTreeMap<String, Vec<String>>,
}

fn shards_dir(run_id: &str) -> String {
    format!("_staging/{run_id}/shards")
}

/// Removes this shard's staged parts and record from an earlier attempt, leaving the others'.
pub fn discard_own(sink: &Storage, run_id: &str, shard: Shard) -> Result<()> {
    let mine = format!("-{:04}-", shard.index);
    let record = format!("/{}-of-", shard.index);
    for object in sink.list(&format!("_staging/{run_id}"))? {
        let rel = sink.relative(&object.location);
        let name = rel.rsplit('/').next().unwrap_or_default();
        let part = name.starts_with("part-") && name.contains(&mine);
        if part || rel.contains(&format!("shards{record}")) {
            sink.delete(&rel)?;
        }
    }
    Ok(())
}

/// Writes this shard's record (after its part files are staged).
pub fn stage(
    sink: &Storage,
    shard: Shard,
    manifest: &Manifest,
    tables: &[(Table, WrittenTable)],
) -> Result<()> {
    let record = ShardRecord {
        index: shard.index,
        count: shard.count,
        manifest: manifest.clone(),
        staged: tables
            .iter()
            .map(|(t, w)| (t.dir().to_string(), w.staged.clone()))
            .collect(),
    };
    let json = serde_json::to_vec_pretty(&record)
        .map_err(|e| Error::internal(e, "writing a shard record"))?;
    let rel = format!(
        "{}/{}-of-{}.json",
        shards_dir(&manifest.run_id),
        shard.index,
        shard.count
    );
    sink.put(&rel, Bytes::from(json))
}

/// The records staged for `run_id` by shards of `count`, by index.
///
/// A record listed but gone by the time it is read was taken by a worker that published the run
/// meanwhile (it removes the records after publishing); it counts as not staged.
fn records(sink: &Storage, run_id: &str, count: u32) -> Result<BTreeMap<u32, ShardRecord>> {
    let mut found = BTreeMap::new();
    for (_, rel) in staged(sink, run_id, count)? {
        let bytes = match sink.get(&rel) {
            Ok(bytes) => bytes,
            Err(Error::InputMissing { .. }) => continue,
            Err(e) => return Err(e),
        };
        let record: ShardRecord = serde_json::from_slice(&bytes)
            .map_err(|e| Error::data_because(sink.display(&rel), "not a shard record", e))?;
        found.insert(record.index, record);
    }
    Ok(found)
}

/// The records staged for `run_id` by shards of `count`, as (shard index, path), known by their
/// names `<index>-of-<count>.json` from one listing.
fn staged(sink: &Storage, run_id: &str, count: u32) -> Result<Vec<(u32, String)>> {
    let suffix = format!("-of-{count}.json");
    Ok(sink
        .list(&shards_dir(run_id))?
        .iter()
        .filter_map(|object| {
            let rel = sink.relative(&object.location);
            let index = rel
                .rsplit('/')
                .next()?
                .strip_suffix(&suffix)?
                .parse()
                .ok()?;
            Some((index, rel))
        })
        .collect())
}

/// The shards of `count` that have not staged their record yet, by the records' names alone
/// (one listing, no reads).
pub fn missing(sink: &Storage, run_id: &str, count: u32) -> Result<Vec<u32>> {
    let staged: BTreeSet<u32> = staged(sink, run_id, count)?
        .into_iter()
        .map(|(index, _)| index)
        .collect();
    Ok((0..count).filter(|i| !staged.contains(i)).collect())
}

/// What [`try_commit`] did.
#[derive(Debug)]
pub enum CommitOutcome {
    /// This worker published the run.
    Published(Box<Manifest>, Committed),
    /// These shards have not staged yet; the last of them will publish.
    Waiting(Vec<u32>),
    /// Every shard had staged and another worker holds the commit lock, or has already
    /// published the run (and removed the records, this worker's among them).
    PublishedElsewhere,
}

/// What this worker writes into the commit lock: unique to it (host, process, time), so a
/// retried create can tell its own lock from another worker's.
fn lock_token() -> Bytes {
    let host = std::env::var("HOSTNAME").unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    Bytes::from(format!("{host} {} {nanos}", std::process::id()))
}

/// Publishes the run when every shard has staged. `own` is the calling shard (whose record
/// is staged); `force` (for `pipeline commit`) publishes even when the lock is taken.
///
/// The records are listed before the lock is taken and read only under it: a worker may list
/// every record just before the publishing worker removes them and take the lock just after it
/// is removed (the lock goes last, see [`commit::discard_staging`]); reading the records under
/// the lock then finds them gone, and this worker lets go instead of publishing the run again.
pub fn try_commit(
    sink: &Storage,
    io: &Io,
    run_id: &str,
    count: u32,
    own: Option<u32>,
    force: bool,
    models: Option<&ModelSet>,
) -> Result<CommitOutcome> {
    let waiting = missing(sink, run_id, count)?;
    if !waiting.is_empty() {
        if own.is_some_and(|i| waiting.contains(&i)) {
            // Our own record is gone: a worker that saw it has published it.
            return Ok(CommitOutcome::PublishedElsewhere);
        }
        return Ok(CommitOutcome::Waiting(waiting));
    }
    let lock = commit::lock_path(run_id);
    if !sink.put_if_absent(&lock, lock_token())? && !force {
        tracing::info!(run_id, "Another worker is committing this run.");
        return Ok(CommitOutcome::PublishedElsewhere);
    }
    let found = records(sink, run_id, count)?;
    if found.len() < count as usize {
        sink.delete(&lock)?;
        tracing::info!(run_id, "Another worker has committed this run.");
        return Ok(CommitOutcome::PublishedElsewhere);
    }
    let (mut manifest, staged) = merge(found.into_values().collect())?;
    let committed = publish::publish(sink, io, run_id, &staged, &mut manifest, models)?;
    Ok(CommitOutcome::Published(Box::new(manifest), committed))
}

/// One manifest for the whole run: counts added up, partition counts added up, the earliest
/// start; and every shard's staged files.
fn merge(records: Vec<ShardRecord>) -> Result<(Manifest, Vec<(Table, WrittenTable)>)> {
    let mut iter = records.into_iter();
    let first = iter
        .next()
        .ok_or_else(|| Error::Internal("no shard records".into()))?;
    let mut manifest = first.manifest;
    let mut staged: BTreeMap<String, Vec<String>> = first.staged;
    for r in iter {
        let m = r.manifest;
        if m.model.model_id != manifest.model.model_id {
            return Err(Error::data(
                format!("_staging/{}/shards", manifest.run_id),
                format!(
                    "shards scored with different models ({} and {}): rerun every shard with the same model",
                    manifest.model.model_id, m.model.model_id
                ),
            ));
        }
        manifest.rows.read += m.rows.read;
        manifest.rows.scored += m.rows.scored;
        manifest.rows.rejected += m.rows.rejected;
        manifest.rows.anomalies += m.rows.anomalies;
        manifest.rows.unmodelled += m.rows.unmodelled;
        if m.started_at < manifest.started_at {
            manifest.started_at = m.started_at;
        }
        for (value, p) in m.partitions {
            manifest
                .partitions
                .entry(value)
                .and_modify(|q| {
                    q.scored += p.scored;
                    q.anomalies += p.anomalies;
                })
                .or_insert(p);
        }
        for (value, n) in m.unmodelled_partitions {
            *manifest.unmodelled_partitions.entry(value).or_default() += n;
        }
        for (table, files) in r.staged {
            staged.entry(table).or_default().extend(files);
        }
    }
    let present: Vec<Table> = Table::ALL
        .into_iter()
        .filter(|t| !t.optional() || staged.contains_key(t.dir()))
        .collect();
    let tables = present
        .iter()
        .map(|t| {
            let files = staged.remove(t.dir()).unwrap_or_default();
            (
                *t,
                WrittenTable {
                    staged: files,
                    rows: 0,
                },
            )
        })
        .collect();
    Ok((manifest, tables))
}
