//! Delta Lake tables (`sink.format = "delta"`), through the Delta kernel (`delta_kernel`).
//!
//! Each of a sink's tables is then a Delta table: its Parquet files plus `_delta_log/`, whose
//! numbered commits say which files make up each version. A reader (polars `read_delta`, the
//! `deltalake` package, Spark, DuckDB's delta extension) reads the files of one version, so a
//! commit that removes a run's previous files and adds its new ones is seen whole or not at all,
//! and earlier versions stay readable (time travel) until the table is vacuumed.
//!
//! Commits go through the kernel's transactions: a commit file is created only if absent, so two
//! writers committing at once cannot both take a version; the loser reads the new version and
//! tries again ([`replace_run`]). Our data files are written by the table writer, not by the
//! kernel, and are handed to it as add-file metadata (path, size, time, row count).

use std::collections::BTreeSet;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Int64Array, MapArray, RecordBatch, StringArray, StructArray,
    new_null_array,
};
use arrow::buffer::{OffsetBuffer, ScalarBuffer};
use arrow::datatypes::{DataType, Int64Type, Schema};
use delta_kernel::committer::FileSystemCommitter;
use delta_kernel::engine::arrow_conversion::{TryFromArrow, TryIntoArrow};
use delta_kernel::engine::arrow_data::ArrowEngineData;
use delta_kernel::engine_data::FilteredEngineData;
use delta_kernel::schema::{SchemaRef, StructType};
use delta_kernel::transaction::create_table::create_table;
use delta_kernel::transaction::{CommitResult, UpdateTableOperation};
use delta_kernel::{KernelError, KernelResult, Snapshot};
use delta_kernel_default_engine::DefaultEngine;
use delta_kernel_default_engine::executor::tokio::TokioMultiThreadExecutor;
use url::Url;

use super::storage::Storage;
use crate::error::{Error, Result, from_store};

/// How often a commit is tried again after losing its version to another writer.
const MAX_ATTEMPTS: usize = 50;

/// What the commits say they were written by.
const ENGINE_INFO: &str = concat!("anomaly-pipeline/", env!("CARGO_PKG_VERSION"));

/// The log directory that makes a directory a Delta table.
pub const LOG_DIR: &str = "_delta_log";

/// A data file of a table (to add, or live in a version): its path relative to the table and
/// its size in bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct DataFile {
    /// Relative to the table directory (`part-….parquet`).
    pub path: String,
    /// Bytes.
    pub size: u64,
}

/// One Delta table of a sink: the table directory `dir` under the sink root.
pub struct DeltaTable {
    sink: Storage,
    dir: String,
    url: Url,
    engine: DefaultEngine<TokioMultiThreadExecutor>,
}

impl std::fmt::Debug for DeltaTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DeltaTable({})", self.url)
    }
}

impl DeltaTable {
    /// The table at `dir` (e.g. `scores`) under `sink`, whether or not it exists yet.
    pub fn open(sink: &Storage, dir: &str) -> Result<Self> {
        let url = table_url(sink, dir)?;
        let executor = Arc::new(TokioMultiThreadExecutor::new(sink.runtime().clone()));
        let engine = DefaultEngine::builder(Arc::clone(sink.store()))
            .with_task_executor(executor)
            .build();
        Ok(Self {
            sink: sink.clone(),
            dir: dir.trim_matches('/').to_string(),
            url,
            engine,
        })
    }

    /// Whether the table has a log with at least one commit.
    pub fn exists(&self) -> Result<bool> {
        Ok(self
            .sink
            .list(&format!("{}/{LOG_DIR}", self.dir))?
            .iter()
            .any(|m| m.location.as_ref().ends_with(".json")))
    }

    /// The latest version and its data files, sorted by path; `None` for a table that does
    /// not exist yet.
    pub fn live_files(&self) -> Result<Option<(u64, Vec<DataFile>)>> {
        if !self.exists()? {
            return Ok(None);
        }
        let snapshot = self.snapshot()?;
        let mut files = Vec::new();
        for (batch, live) in self.scan_files(&snapshot)? {
            let sizes = batch
                .column_by_name("size")
                .and_then(|c| c.as_primitive_opt::<Int64Type>())
                .ok_or_else(|| Error::Internal("the kernel's file list has no size".into()))?;
            for (i, path) in paths_of(&batch)?.into_iter().enumerate() {
                if let Some(path) = path.filter(|_| live[i]) {
                    files.push(DataFile {
                        path,
                        size: sizes.value(i).max(0) as u64,
                    });
                }
            }
        }
        files.sort();
        Ok(Some((snapshot.version(), files)))
    }

    /// One commit that removes every file of the latest version that `replaced` says belongs to
    /// what is being replaced (it is given the file's name) and adds
    /// `adds`, creating the table (with `schema`, the files' schema) if it does not exist; with
    /// no `schema` the table's own is kept (and there is nothing to create). Returns the version
    /// committed, or the current one when there was nothing to do: a retry of a commit that went
    /// through (every file of `adds` live, none of the run's others) commits nothing.
    pub fn replace_run(
        &self,
        replaced: impl Fn(&str) -> bool,
        schema: Option<&Schema>,
        adds: &[DataFile],
    ) -> Result<u64> {
        let kernel_schema = schema
            .map(|s| {
                StructType::try_from_arrow(s)
                    .map(Arc::new)
                    .map_err(|e| Error::internal(e, "describing the table for Delta"))
            })
            .transpose()?;
        let ours: BTreeSet<&str> = adds.iter().map(|a| a.path.as_str()).collect();
        for attempt in 0..MAX_ATTEMPTS {
            let committed = if !self.exists()? {
                let Some(kernel_schema) = kernel_schema.clone() else {
                    return Ok(0);
                };
                let mut txn = create_table(self.url.as_str(), kernel_schema, ENGINE_INFO, true)
                    .build(&self.engine, Box::new(FileSystemCommitter::new()))
                    .map_err(|e| self.kernel_error(e, "creating the Delta table"))?;
                txn.add_files(Self::add_metadata(txn.add_files_schema(), adds)?);
                self.version_of(txn.commit(&self.engine), "creating the Delta table")?
            } else {
                let snapshot = self.snapshot()?;
                if let Some(ours) = &kernel_schema {
                    self.check_schema(&snapshot, ours)?;
                }
                let (live_ours, removes) = self.replaced_files(&snapshot, &replaced, &ours)?;
                if live_ours == ours.len() && removes.is_empty() {
                    return Ok(snapshot.version());
                }
                let mut txn = snapshot
                    .clone()
                    .update_table(UpdateTableOperation::Write, ENGINE_INFO, true)
                    .build(&self.engine, Box::new(FileSystemCommitter::new()))
                    .map_err(|e| self.kernel_error(e, "starting a Delta commit"))?;
                for r in removes {
                    txn.remove_files(r);
                }
                txn.add_files(Self::add_metadata(txn.add_files_schema(), adds)?);
                self.version_of(txn.commit(&self.engine), "committing to the Delta table")?
            };
            if let Some(version) = committed {
                return Ok(version);
            }
            tracing::debug!(table = %self.url, attempt, "Another writer took the Delta version; trying again.");
        }
        Err(Error::Transient {
            uri: self.sink.display(&self.dir),
            source: format!("lost the race for a Delta version {MAX_ATTEMPTS} times").into(),
        })
    }

    /// Of `snapshot`'s live files: how many are already `ours` (a retried commit), and the
    /// others that `replaced` names, selected for removal.
    fn replaced_files(
        &self,
        snapshot: &Arc<Snapshot>,
        replaced: &dyn Fn(&str) -> bool,
        ours: &BTreeSet<&str>,
    ) -> Result<(usize, Vec<FilteredEngineData>)> {
        let mut live_ours = 0;
        let mut removes = Vec::new();
        for (batch, live) in self.scan_files(snapshot)? {
            let mut remove = vec![false; live.len()];
            for (i, path) in paths_of(&batch)?.iter().enumerate() {
                let Some(path) = path.as_deref().filter(|_| live[i]) else {
                    continue;
                };
                if ours.contains(path) {
                    live_ours += 1;
                } else if replaced(file_name(path)) {
                    remove[i] = true;
                }
            }
            if remove.contains(&true) {
                let data = Box::new(ArrowEngineData::new(batch));
                removes.push(
                    FilteredEngineData::try_new(data, remove)
                        .map_err(|e| self.kernel_error(e, "removing the run's files"))?,
                );
            }
        }
        Ok((live_ours, removes))
    }

    /// The version a commit took, or `None` when another writer took it first (or the commit
    /// hit an error worth retrying).
    fn version_of<S>(
        &self,
        result: KernelResult<CommitResult<S>>,
        doing: &str,
    ) -> Result<Option<u64>> {
        match result {
            Ok(CommitResult::Committed(c)) => Ok(Some(c.commit_version())),
            Ok(CommitResult::Conflicted(_) | CommitResult::Retryable(_)) => Ok(None),
            Err(e) => Err(self.kernel_error(e, doing)),
        }
    }

    fn snapshot(&self) -> Result<Arc<Snapshot>> {
        Snapshot::builder_for(self.url.as_str())
            .build(&self.engine)
            .map_err(|e| self.kernel_error(e, "reading the Delta log"))
    }

    /// The scan-file batches of `snapshot`, each with which of its rows are live files (the
    /// kernel's selection, spelled out for every row).
    fn scan_files(&self, snapshot: &Arc<Snapshot>) -> Result<Vec<(RecordBatch, Vec<bool>)>> {
        let listing = |e| self.kernel_error(e, "listing the table's files");
        let scan = snapshot.clone().scan_builder().build().map_err(listing)?;
        let mut out = Vec::new();
        for meta in scan.scan_metadata(&self.engine).map_err(listing)? {
            let (data, selection) = meta.map_err(listing)?.scan_files.into_parts();
            let batch = record_batch(data)?;
            let live = (0..batch.num_rows())
                .map(|i| selection.get(i).copied().unwrap_or(true))
                .collect();
            out.push((batch, live));
        }
        Ok(out)
    }

    /// A run writes the columns the table has: a change (another passthrough column, another
    /// embedding width) would make the table unreadable as one, so it is refused.
    fn check_schema(&self, snapshot: &Snapshot, ours: &StructType) -> Result<()> {
        let theirs = snapshot.schema();
        let names = |s: &StructType| -> Vec<(String, String)> {
            s.fields()
                .map(|f| (f.name().clone(), f.data_type().to_string()))
                .collect()
        };
        if names(&theirs) != names(ours) {
            return Err(Error::data(
                self.sink.display(&self.dir),
                format!(
                    "the Delta table has columns {:?} but this run writes {:?}: keep the passthrough columns and the model's embedding width of the runs before, or write to a new sink.uri",
                    names(&theirs)
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>(),
                    names(ours)
                        .iter()
                        .map(|(n, _)| n.as_str())
                        .collect::<Vec<_>>()
                ),
            ));
        }
        Ok(())
    }

    /// The add-file metadata of `adds`, in the kernel's add-file schema (no partition values,
    /// no statistics: readers then read every file, which a run's few files make cheap).
    fn add_metadata(schema: &SchemaRef, adds: &[DataFile]) -> Result<Box<ArrowEngineData>> {
        let arrow: Schema = schema
            .as_ref()
            .try_into_arrow()
            .map_err(|e| Error::internal(e, "the add-file schema"))?;
        let now = chrono::Utc::now().timestamp_millis();
        let n = adds.len();
        let long = |f: &dyn Fn(&DataFile) -> i64| -> ArrayRef {
            Arc::new(Int64Array::from_iter_values(adds.iter().map(f)))
        };
        let columns: Vec<ArrayRef> = arrow
            .fields()
            .iter()
            .map(|field| -> Result<ArrayRef> {
                Ok(match field.name().as_str() {
                    "path" => Arc::new(StringArray::from_iter_values(
                        adds.iter().map(|a| a.path.as_str()),
                    )),
                    "size" => long(&|a| a.size as i64),
                    "modificationTime" => long(&|_| now),
                    "partitionValues" => empty_maps(field.data_type(), n)?,
                    _ => new_null_array(field.data_type(), n),
                })
            })
            .collect::<Result<_>>()?;
        let batch = RecordBatch::try_new(Arc::new(arrow), columns)
            .map_err(|e| Error::internal(e, "building the add-file metadata"))?;
        Ok(Box::new(ArrowEngineData::new(batch)))
    }

    /// The kernel's error as ours: a store failure is classified as the store's own errors
    /// are (transient, permission, ...); anything else is a table we cannot use.
    fn kernel_error(&self, e: KernelError, doing: &str) -> Error {
        let uri = self.sink.display(&self.dir);
        match without_backtrace(e) {
            KernelError::ObjectStore(store) => from_store(&uri, store),
            other => Error::DataCause {
                uri,
                message: format!("{doing} failed"),
                source: Box::new(other),
            },
        }
    }
}

/// The table's URL for the kernel: the sink root's own URL (so that the kernel's paths are the
/// store's paths) with the table directory appended, ending in `/`.
fn table_url(sink: &Storage, dir: &str) -> Result<Url> {
    let dir = dir.trim_matches('/');
    let url = match sink.local_path(dir) {
        Some(path) => Url::from_directory_path(&path)
            .map_err(|()| Error::Usage(format!("{}: not an absolute path", path.display())))?,
        None => {
            let text = format!("{}/", sink.display(dir));
            Url::parse(&text).map_err(|e| Error::usage_because(format!("{text}: not a URL"), e))?
        }
    };
    Ok(url)
}

/// The error under the kernel's backtrace wrappers.
fn without_backtrace(e: KernelError) -> KernelError {
    match e {
        KernelError::Backtraced { source, .. } => without_backtrace(*source),
        other => other,
    }
}

/// The last segment of a `/`-separated path.
fn file_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn record_batch(data: Box<dyn delta_kernel::EngineData>) -> Result<RecordBatch> {
    ArrowEngineData::try_from_engine_data(data)
        .map(|d| d.record_batch().clone())
        .map_err(|e| Error::internal(e, "reading the kernel's file list"))
}

/// The `path` column of a scan-files batch.
fn paths_of(batch: &RecordBatch) -> Result<Vec<Option<String>>> {
    let paths = batch
        .column_by_name("path")
        .and_then(|c| c.as_string_opt::<i32>())
        .ok_or_else(|| Error::Internal("the kernel's file list has no path column".into()))?;
    Ok((0..paths.len())
        .map(|i| (!paths.is_null(i)).then(|| paths.value(i).to_string()))
        .collect())
}

/// `n` empty `map<string, string>` values of type `t`.
fn empty_maps(t: &DataType, n: usize) -> Result<ArrayRef> {
    let DataType::Map(entries, sorted) = t else {
        return Err(Error::Internal(format!(
            "partitionValues is {t}, not a map"
        )));
    };
    let empty = arrow::array::new_empty_array(entries.data_type());
    let entries_array = empty
        .as_any()
        .downcast_ref::<StructArray>()
        .ok_or_else(|| Error::Internal("map entries are not a struct".into()))?
        .clone();
    let offsets = OffsetBuffer::new(ScalarBuffer::from(vec![0i32; n + 1]));
    let maps = MapArray::try_new(Arc::clone(entries), offsets, entries_array, None, *sorted)
        .map_err(|e| Error::internal(e, "building partition values"))?;
    Ok(Arc::new(maps))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::storage::Io;
    use crate::io::storage::tests::runtime;
    use arrow::datatypes::Field;

    /// Writes a one-column part `name` with `rows` rows into table `t` and says what to add.
    fn part(sink: &Storage, t: &str, name: &str, rows: i64) -> DataFile {
        let schema = Arc::new(Schema::new(vec![Field::new("x", DataType::Int64, false)]));
        let batch = RecordBatch::try_new(
            Arc::clone(&schema),
            vec![Arc::new(Int64Array::from_iter_values(0..rows))],
        )
        .unwrap();
        let mut bytes = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut bytes, schema, None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        let rel = format!("{t}/{name}");
        sink.put(&rel, bytes.into()).unwrap();
        DataFile {
            path: name.to_string(),
            size: sink.size(&rel).unwrap(),
        }
    }

    /// The files of run `run` by our part names.
    fn of_run(run: &str) -> impl Fn(&str) -> bool + '_ {
        move |name| crate::io::tables::run_of_part(name) == Some(run)
    }

    fn names(table: &DeltaTable) -> Vec<String> {
        table
            .live_files()
            .unwrap()
            .map(|(_, files)| files.into_iter().map(|f| f.path).collect())
            .unwrap_or_default()
    }

    /// A run's commit replaces exactly its own files; a retried commit commits nothing; a table
    /// the run no longer writes loses the run's files; another schema is refused.
    #[test]
    fn replacing_a_run_touches_only_its_files_and_a_retry_commits_nothing() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let sink =
            Storage::open(dir.path().to_str().unwrap(), &Io::new(rt.handle().clone())).unwrap();
        let table = DeltaTable::open(&sink, "t").unwrap();
        assert!(!table.exists().unwrap());
        assert_eq!(table.live_files().unwrap(), None);
        let schema = Schema::new(vec![Field::new("x", DataType::Int64, false)]);
        let a1 = part(&sink, "t", "part-a-0000-00000.0000000000000001.parquet", 3);
        let b1 = part(&sink, "t", "part-b-0000-00000.0000000000000001.parquet", 4);
        assert_eq!(
            table
                .replace_run(of_run("a"), Some(&schema), std::slice::from_ref(&a1))
                .unwrap(),
            0
        );
        assert_eq!(
            table
                .replace_run(of_run("b"), Some(&schema), std::slice::from_ref(&b1))
                .unwrap(),
            1
        );
        let a2 = part(&sink, "t", "part-a-0000-00000.0000000000000002.parquet", 5);
        assert_eq!(
            table
                .replace_run(of_run("a"), Some(&schema), std::slice::from_ref(&a2))
                .unwrap(),
            2
        );
        assert_eq!(names(&table), [a2.path.clone(), b1.path.clone()]);
        // The same commit again (a retry after a crash): nothing new.
        assert_eq!(
            table
                .replace_run(of_run("a"), Some(&schema), std::slice::from_ref(&a2))
                .unwrap(),
            2
        );
        // Run a no longer writes this table.
        assert_eq!(table.replace_run(of_run("a"), None, &[]).unwrap(), 3);
        assert_eq!(names(&table), std::slice::from_ref(&b1.path));
        // Another schema would make the table unreadable as one.
        let other = Schema::new(vec![Field::new("y", DataType::Utf8, true)]);
        let e = table
            .replace_run(of_run("c"), Some(&other), &[])
            .unwrap_err();
        assert!(e.to_string().contains("columns"), "{e}");
        assert_eq!(e.exit_code(), 65);
    }

    /// Writers racing for the same versions all commit, each once: the losers of a version
    /// retry against the new one.
    #[test]
    fn concurrent_commits_each_land_once() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let sink =
            Storage::open(dir.path().to_str().unwrap(), &Io::new(rt.handle().clone())).unwrap();
        let schema = Schema::new(vec![Field::new("x", DataType::Int64, false)]);
        let seed = part(&sink, "t", "part-seed-0000-00000.parquet", 1);
        DeltaTable::open(&sink, "t")
            .unwrap()
            .replace_run(of_run("seed"), Some(&schema), &[seed])
            .unwrap();
        let files: Vec<DataFile> = (0..6)
            .map(|i| part(&sink, "t", &format!("part-r{i}-0000-00000.parquet"), i + 1))
            .collect();
        let versions: Vec<u64> = std::thread::scope(|s| {
            let handles: Vec<_> = files
                .iter()
                .enumerate()
                .map(|(i, f)| {
                    let sink = sink.clone();
                    let schema = schema.clone();
                    s.spawn(move || {
                        DeltaTable::open(&sink, "t")
                            .unwrap()
                            .replace_run(
                                of_run(&format!("r{i}")),
                                Some(&schema),
                                std::slice::from_ref(f),
                            )
                            .unwrap()
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            (1..=6).collect::<Vec<u64>>(),
            "one version each: {versions:?}"
        );
        assert_eq!(names(&DeltaTable::open(&sink, "t").unwrap()).len(), 7);
    }
}
