//! The source stage: find the Parquet files behind a URI and stream their record batches.
//!
//! Opening a [`Source`] lists the files (a file, a directory, or a glob) and reads every
//! footer up front, so a corrupt or non-Parquet file fails the run before any work, naming the
//! file. Streaming then runs on the IO runtime and hands record batches to the caller's thread
//! over a bounded channel: memory holds a few batches, never a whole file.

use std::sync::Arc;

use arrow::datatypes::SchemaRef;
use arrow::record_batch::RecordBatch;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::ProjectionMask;
use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
use parquet::arrow::async_reader::ParquetRecordBatchStreamBuilder;
use parquet::errors::ParquetError;
use tokio::runtime::Handle;
use tokio::sync::mpsc;

use super::delta::DeltaTable;
use super::storage::{Io, Storage, list_sorted, resolve};
use super::store_reader::StoreReader;
use crate::config::StorageConfig;
use crate::error::{Error, Result, from_store};

/// How many record batches may wait between the reader and the compute thread.
const CHANNEL_DEPTH: usize = 2;
/// How many footers are fetched at once when opening a source.
const FOOTER_CONCURRENCY: usize = 16;

/// One Parquet file of a source, with its footer already read.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The file's URI, as shown to users.
    pub uri: Arc<str>,
    /// Its path in the store.
    pub path: Path,
    /// Its size in bytes.
    pub size: u64,
    /// Its Parquet and Arrow metadata.
    pub metadata: ArrowReaderMetadata,
}

impl SourceFile {
    /// The file's Arrow schema (with field metadata, so extension types are visible).
    pub fn schema(&self) -> &SchemaRef {
        self.metadata.schema()
    }

    /// Rows in the file, from its footer.
    pub fn rows(&self) -> u64 {
        self.metadata.metadata().file_metadata().num_rows().max(0) as u64
    }
}

/// One worker's share of a source: of all row groups, numbered in file order, those whose
/// number is `index` modulo `count`. Every row group belongs to exactly one shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This worker, 0-based.
    pub index: u32,
    /// Workers in all.
    pub count: u32,
}

/// A `--shard` that is not `I/N` with 0 ≤ I < N.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--shard {text:?}: {what}")]
pub struct BadShard {
    /// The text given.
    pub text: String,
    /// What is wrong with it.
    pub what: &'static str,
}

impl Shard {
    /// Parses `I/N` (0 ≤ I < N).
    pub fn parse(text: &str) -> std::result::Result<Self, BadShard> {
        let bad = |what| BadShard {
            text: text.to_string(),
            what,
        };
        let (i, n) = text.split_once('/').ok_or(bad("expected I/N, e.g. 0/4"))?;
        let index: u32 = i.trim().parse().map_err(|_| bad("I is not a number"))?;
        let count: u32 = n.trim().parse().map_err(|_| bad("N is not a number"))?;
        if count == 0 || index >= count {
            return Err(bad("need 0 ≤ I < N"));
        }
        Ok(Self { index, count })
    }

    /// Whether global row group `k` is this shard's.
    pub fn owns(&self, k: usize) -> bool {
        k % self.count as usize == self.index as usize
    }
}

/// The files behind a source URI, in a stable order.
#[derive(Debug, Clone)]
pub struct Source {
    uri: String,
    store: Arc<dyn ObjectStore>,
    files: Vec<SourceFile>,
    rt: Handle,
    shard: Option<Shard>,
}

/// One record batch of one file.
#[derive(Debug)]
pub struct SourceBatch {
    /// Index of the file in [`Source::files`].
    pub file: usize,
    /// Row index within the file of the batch's first row.
    pub first_row: u64,
    /// The rows, with only the requested columns.
    pub batch: RecordBatch,
}

impl Source {
    /// Lists the files at `uri` and reads their footers.
    ///
    /// Errors: 66 when nothing matches, 65 for a file that is not readable Parquet.
    ///
    /// A directory that is a Delta table (it has `_delta_log/`) reads as the files of the table's
    /// latest version, not every file below it.
    pub fn open(uri: &str, io: &Io) -> Result<Self> {
        let rt = &io.rt;
        let (store, files) = match delta_files(uri, io)? {
            Some(found) => found,
            None => rt.block_on(find_files(uri, &io.settings))?,
        };
        let files = rt.block_on(read_footers(&store, files))?;
        Ok(Self {
            uri: uri.to_string(),
            store,
            files,
            rt: rt.clone(),
            shard: None,
        })
    }

    /// The same source, reading only `shard`'s row groups.
    pub fn with_shard(mut self, shard: Option<Shard>) -> Self {
        self.shard = shard;
        self
    }

    /// The row groups of each file this source reads (all, without a shard).
    fn row_groups(&self) -> Vec<Vec<usize>> {
        let mut k = 0;
        self.files
            .iter()
            .map(|f| {
                (0..f.metadata.metadata().num_row_groups())
                    .filter(|_| {
                        let mine = self.shard.is_none_or(|s| s.owns(k));
                        k += 1;
                        mine
                    })
                    .collect()
            })
            .collect()
    }

    /// The URI the source was opened with.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    /// The files, sorted by path.
    pub fn files(&self) -> &[SourceFile] {
        &self.files
    }

    /// Total rows over all files, from their footers.
    pub fn total_rows(&self) -> u64 {
        self.files.iter().map(SourceFile::rows).sum()
    }

    /// Streams every file's record batches, in file order, projected to `columns` (names not in
    /// a file are skipped; the decoder reports missing required ones). The returned iterator
    /// blocks the calling thread, which must not be a runtime thread.
    pub fn stream(&self, columns: &[String], batch_size: usize) -> BatchStream {
        let (tx, rx) = mpsc::channel(CHANNEL_DEPTH);
        let store = Arc::clone(&self.store);
        let files = self.files.clone();
        let row_groups = self.row_groups();
        let columns = columns.to_vec();
        self.rt.spawn(async move {
            for (index, (file, groups)) in files.iter().zip(row_groups).enumerate() {
                if groups.is_empty() {
                    continue;
                }
                let reading = stream_file(&store, index, file, groups, &columns, batch_size, &tx);
                // The parquet crate panics on some corrupt pages (found by fuzzing). Unguarded,
                // the panic would end this task, close the channel, and look to the consumer
                // like the end of the data: rows silently lost.
                let result = crate::caught_panic::catching(reading)
                    .await
                    .unwrap_or_else(|panic| Err(reader_panic(&file.uri, &*panic)));
                if let Err(e) = result {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
                if tx.is_closed() {
                    return;
                }
            }
        });
        BatchStream { rx }
    }
}

/// Record batches arriving from the reader task.
pub struct BatchStream {
    rx: mpsc::Receiver<Result<SourceBatch>>,
}

impl Iterator for BatchStream {
    type Item = Result<SourceBatch>;

    fn next(&mut self) -> Option<Self::Item> {
        self.rx.blocking_recv()
    }
}

async fn stream_file(
    store: &Arc<dyn ObjectStore>,
    index: usize,
    file: &SourceFile,
    row_groups: Vec<usize>,
    columns: &[String],
    batch_size: usize,
    tx: &mpsc::Sender<Result<SourceBatch>>,
) -> Result<()> {
    let reader = StoreReader::new(Arc::clone(store), file.path.clone(), file.size)
        .checking(Arc::clone(file.metadata.metadata()));
    let schema = file.schema();
    let roots: Vec<usize> = columns
        .iter()
        .filter_map(|c| schema.index_of(c).ok())
        .collect();
    let mask = ProjectionMask::roots(file.metadata.parquet_schema(), roots);
    let mut stream =
        ParquetRecordBatchStreamBuilder::new_with_metadata(reader, file.metadata.clone())
            .with_batch_size(batch_size)
            .with_projection(mask)
            .with_row_groups(row_groups.clone())
            .build()
            .map_err(|e| from_parquet(&file.uri, e))?;
    // Row numbers stay those of the whole file: each selected group starts where the groups
    // before it (read or not) end. Batches never span two row groups.
    let md = file.metadata.metadata();
    let start_of = |g: usize| -> u64 {
        (0..g)
            .map(|j| md.row_group(j).num_rows().max(0) as u64)
            .sum()
    };
    let mut groups = row_groups.into_iter();
    let mut group = groups.next();
    let mut offset = 0u64;
    while let Some(batch) = stream.next().await {
        let batch = batch.map_err(|e| from_parquet(&file.uri, e))?;
        let n = batch.num_rows() as u64;
        let Some(g) = group else {
            return Err(Error::data(
                &*file.uri,
                "more rows than its row groups declare",
            ));
        };
        let message = SourceBatch {
            file: index,
            first_row: start_of(g) + offset,
            batch,
        };
        offset += n;
        if offset >= md.row_group(g).num_rows().max(0) as u64 {
            group = groups.next();
            offset = 0;
        }
        if tx.send(Ok(message)).await.is_err() {
            return Ok(()); // The consumer stopped early: nothing more to do.
        }
    }
    if let Some(g) = group {
        // The footer claims rows the pages do not hold: a corrupt (or hostile) file, whose
        // claimed counts must not be trusted for anything.
        return Err(Error::data(
            &*file.uri,
            format!(
                "row group {g} declares {} rows but holds {offset}: the file is corrupt; rewrite it",
                md.row_group(g).num_rows()
            ),
        ));
    }
    Ok(())
}

/// The store a source's files are in, and each file's URI (as shown), path and size.
type Found = (Arc<dyn ObjectStore>, Vec<(Arc<str>, Path, u64)>);

/// The files of the Delta table at `uri` (a directory without a glob), or `None` when it is
/// not one.
fn delta_files(uri: &str, io: &Io) -> Result<Option<Found>> {
    if uri.contains(['*', '?', '[']) || uri.ends_with(".parquet") {
        return Ok(None);
    }
    let root = Storage::open(uri, io)?;
    let Some((_, live)) = DeltaTable::open(&root, "")?.live_files()? else {
        return Ok(None);
    };
    let files = live
        .into_iter()
        .map(|f| (Arc::from(root.display(&f.path)), root.path(&f.path), f.size))
        .collect();
    Ok(Some((Arc::clone(root.store()), files)))
}

/// Lists what `uri` names: one file, every `*.parquet` below a directory, or a glob's matches.
async fn find_files(uri: &str, settings: &StorageConfig) -> Result<Found> {
    let glob_at = uri.find(['*', '?', '[']);
    let (base, pattern) = match glob_at {
        Some(i) => {
            let cut = uri[..i].rfind('/').map(|j| j + 1).unwrap_or(0);
            (&uri[..cut], Some(&uri[cut..]))
        }
        None => (uri, None),
    };
    let (store, base_path) = resolve(if base.is_empty() { "." } else { base }, settings)?;
    let display_base = base.trim_end_matches('/');
    let show = |p: &Path| -> Arc<str> {
        let rel: Vec<String> = p
            .prefix_match(&base_path)
            .map(|parts| parts.map(|x| x.as_ref().to_string()).collect())
            .unwrap_or_default();
        if display_base.is_empty() {
            rel.join("/").into()
        } else if rel.is_empty() {
            display_base.into()
        } else {
            format!("{display_base}/{}", rel.join("/")).into()
        }
    };

    // A zero-byte object is never a Parquet file: it is how a WebDAV server answers HEAD on
    // a directory, and how some tools mark a prefix as a folder. Listing decides, and if it
    // finds nothing the object is read as the file it claims to be (and reported as empty).
    let mut empty_object = None;
    if pattern.is_none() && !uri.ends_with('/') {
        match store.head(&base_path).await {
            Ok(meta) if meta.size == 0 => empty_object = Some(meta),
            Ok(meta) => return Ok((store, vec![(uri.into(), meta.location, meta.size)])),
            Err(object_store::Error::NotFound { .. }) => {}
            // A local directory answers `head` with an error of its own; listing decides.
            Err(_) if std::path::Path::new(uri).is_dir() => {}
            Err(e) => return Err(from_store(uri, e)),
        }
    }

    let matcher = match pattern {
        Some(p) => Some(
            globset::GlobBuilder::new(p)
                .literal_separator(true)
                .build()
                .map_err(|e| Error::usage_because(format!("{uri}: not a valid glob"), e))?
                .compile_matcher(),
        ),
        None => None,
    };
    let listed = match list_sorted(&store, &base_path).await {
        Ok(l) => l,
        Err(object_store::Error::NotFound { .. }) => Vec::new(),
        Err(e) => return Err(from_store(uri, e)),
    };
    let files: Vec<_> = listed
        .into_iter()
        .filter(|m| {
            let rel: Vec<String> = m
                .location
                .prefix_match(&base_path)
                .map(|parts| parts.map(|p| p.as_ref().to_string()).collect())
                .unwrap_or_default();
            let hidden = rel.iter().any(|s| s.starts_with(['_', '.']));
            let wanted = match &matcher {
                Some(g) => g.is_match(rel.join("/")),
                None => rel.last().is_some_and(|n| n.ends_with(".parquet")),
            };
            wanted && !hidden
        })
        .map(|m| (show(&m.location), m.location, m.size))
        .collect();
    if files.is_empty() {
        if let Some(meta) = empty_object {
            return Ok((store, vec![(uri.into(), meta.location, meta.size)]));
        }
        return Err(Error::InputMissing {
            uri: uri.to_string(),
            hint: "no Parquet file matched; check source.uri (a file, a directory of *.parquet files, or a glob)".into(),
        });
    }
    Ok((store, files))
}

async fn read_footers(
    store: &Arc<dyn ObjectStore>,
    files: Vec<(Arc<str>, Path, u64)>,
) -> Result<Vec<SourceFile>> {
    futures::stream::iter(files)
        .map(|(uri, path, size)| async move {
            let mut reader = StoreReader::new(Arc::clone(store), path.clone(), size);
            let metadata = ArrowReaderMetadata::load_async(&mut reader, ArrowReaderOptions::new())
                .await
                .map_err(|e| from_parquet(&uri, e))?;
            check_footer(metadata.metadata(), size)
                .map_err(|e| Error::data_because(&*uri, "the Parquet footer is corrupt", e))?;
            Ok(SourceFile {
                uri,
                path,
                size,
                metadata,
            })
        })
        .buffered(FOOTER_CONCURRENCY)
        .try_collect()
        .await
}

/// The error for a panic inside the Parquet reader on `uri`: the file is corrupt.
pub fn reader_panic(uri: &str, panic: &(dyn std::any::Any + Send)) -> Error {
    let what = panic
        .downcast_ref::<String>()
        .map(String::as_str)
        .or_else(|| panic.downcast_ref::<&str>().copied())
        .unwrap_or("a panic");
    Error::data(
        uri,
        format!(
            "the Parquet reader failed inside this file ({what}): the file is corrupt; rewrite it"
        ),
    )
}

/// A Parquet footer that does not describe its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CorruptFooter {
    /// A row group with a negative row count.
    #[error("row group {group} declares {rows} rows")]
    NegativeRows {
        /// The row group.
        group: usize,
        /// Its declared rows.
        rows: i64,
    },
    /// A column chunk placed outside the file.
    #[error(
        "row group {group}, column `{column}`: the footer places it at bytes {start}..+{length}, outside the {file_size}-byte file; the file is corrupt"
    )]
    ChunkOutside {
        /// The row group.
        group: usize,
        /// The column's path.
        column: String,
        /// Where the footer says the chunk starts.
        start: i64,
        /// Its declared length.
        length: i64,
        /// The file's size.
        file_size: u64,
    },
    /// Row groups that do not add up to the file's row count.
    #[error(
        "the footer declares {declared} rows but its row groups hold {rows}; the file is corrupt"
    )]
    RowsDisagree {
        /// The file's declared rows.
        declared: i64,
        /// The row groups' sum.
        rows: i64,
    },
}

/// Checks what the reader would otherwise trust blindly (and assert on): every column chunk
/// lies inside the file, at a non-negative offset and size, and the row counts are
/// non-negative and add up. A footer that fails is corrupt or hostile.
pub fn check_footer(
    metadata: &parquet::file::metadata::ParquetMetaData,
    file_size: u64,
) -> std::result::Result<(), CorruptFooter> {
    let mut rows: i64 = 0;
    for (g, group) in metadata.row_groups().iter().enumerate() {
        if group.num_rows() < 0 {
            return Err(CorruptFooter::NegativeRows {
                group: g,
                rows: group.num_rows(),
            });
        }
        rows = rows.saturating_add(group.num_rows());
        for column in group.columns() {
            let start = column
                .dictionary_page_offset()
                .unwrap_or_else(|| column.data_page_offset());
            let length = column.compressed_size();
            let inside = start >= 0
                && length >= 0
                && column.data_page_offset() >= 0
                && (start as u64).saturating_add(length as u64) <= file_size;
            if !inside {
                return Err(CorruptFooter::ChunkOutside {
                    group: g,
                    column: column.column_path().to_string(),
                    start,
                    length,
                    file_size,
                });
            }
        }
    }
    let declared = metadata.file_metadata().num_rows();
    if declared != rows {
        return Err(CorruptFooter::RowsDisagree { declared, rows });
    }
    Ok(())
}

/// Maps a Parquet error on `uri`: a storage failure underneath keeps its own kind; anything
/// else means the file is not readable Parquet (65).
pub fn from_parquet(uri: &str, err: ParquetError) -> Error {
    let err = match err {
        ParquetError::External(inner) => match inner.downcast::<object_store::Error>() {
            Ok(store_err) => {
                return match *store_err {
                    object_store::Error::NotFound { .. } => Error::InputMissing {
                        uri: uri.to_string(),
                        hint: format!("the file disappeared while reading: {store_err}"),
                    },
                    _ => Error::Transient {
                        uri: uri.to_string(),
                        source: store_err,
                    },
                };
            }
            Err(other) => ParquetError::External(other),
        },
        other => other,
    };
    Error::data_because(
        uri,
        "not a readable Parquet file; check that it is complete and really Parquet",
        err,
    )
}
