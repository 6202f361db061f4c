//! Source → decode → preprocess, batch by batch, for the fit, score and inspect stages.

use crate::config::SourceConfig;
use crate::data::preprocess::Preprocessor;
use crate::data::{ImageBatch, ImageShape, Reject};
use crate::error::{Error, Result};
use crate::io::decode::Decoder;
use crate::io::source::Source;

use super::progress::Progress;

/// How many reject reasons are kept to quote in an error.
const QUOTED_REJECTS: usize = 5;

/// Row counts of one pass over a source.
#[derive(Debug, Clone, Default)]
pub struct ReadCounts {
    /// Rows read from the files.
    pub rows: u64,
    /// Rows that could not be used.
    pub rejected: u64,
    /// The first few rejects, to quote in messages.
    pub examples: Vec<Reject>,
}

impl ReadCounts {
    /// Fails with exit 65 when more than `max_fraction` of the rows were rejected.
    pub fn check(&self, uri: &str, max_fraction: f64) -> Result<()> {
        if self.rows == 0 {
            return Err(Error::data(
                uri,
                "the source has no rows: there is nothing to fit or score; check that the right files were written",
            ));
        }
        let fraction = self.rejected as f64 / self.rows as f64;
        if fraction > max_fraction {
            let examples: Vec<String> = self
                .examples
                .iter()
                .map(|r| format!("{} row {}: {}", r.source, r.row, r.reason))
                .collect();
            return Err(Error::data(
                uri,
                format!(
                    "{} of {} rows ({:.2}%) could not be used, more than source.max_reject_fraction = {}; nothing was published. First problems:\n    {}",
                    self.rejected,
                    self.rows,
                    100.0 * fraction,
                    max_fraction,
                    examples.join("\n    ")
                ),
            ));
        }
        Ok(())
    }
}

/// Builds one decoder per file, checking every file's schema (and, when `expected` is given,
/// its fixed image shape) before any row is read.
pub fn decoders(
    source: &Source,
    config: &SourceConfig,
    expected: Option<ImageShape>,
) -> Result<Vec<Decoder>> {
    source
        .files()
        .iter()
        .map(|f| {
            let d = Decoder::new(f.schema(), config, &f.uri)?;
            if let (Some(e), Some(s)) = (expected, d.fixed_shape())
                && e != s
            {
                return Err(Error::data(
                    f.uri.to_string(),
                    format!("holds {s} images, but the model was fitted on {e} images"),
                ));
            }
            Ok(d)
        })
        .collect()
}

/// Streams the source and calls `each` with every decoded, preprocessed batch and its rejects.
///
/// `shape` starts as the shape images must have (the model's), or `None` to take the first
/// image's; rows of any other shape are rejected.
///
/// Decoding and preprocessing run on a thread of their own, one batch ahead of `each`: while
/// `each` scores batch k on every core, batch k + 1 is being made ready, so the cores do not
/// wait for it between batches. The channel between them holds one batch, which bounds memory.
pub fn for_each_batch(
    source: &Source,
    config: &SourceConfig,
    preprocess: &Preprocessor,
    shape: Option<ImageShape>,
    progress: &Progress,
    mut each: impl FnMut(ImageBatch, Vec<Reject>) -> Result<()>,
) -> Result<ReadCounts> {
    let decoders = decoders(source, config, shape)?;
    let mut columns: Vec<String> = decoders.iter().flat_map(Decoder::columns).collect();
    columns.sort();
    columns.dedup();
    let mut counts = ReadCounts::default();
    std::thread::scope(|scope| {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Result<Prepared>>(1);
        scope.spawn(move || {
            let mut shape = shape;
            for item in source.stream(&columns, config.batch_size) {
                let prepared = super::cancel::check().and(item).and_then(|item| {
                    let (mut batch, rejects) =
                        decoders[item.file].decode(&item.batch, item.first_row, &mut shape)?;
                    preprocess.apply(&mut batch);
                    Ok(Prepared {
                        rows: item.batch.num_rows() as u64,
                        batch,
                        rejects,
                    })
                });
                let failed = prepared.is_err();
                // A closed channel means the consumer stopped (on an error of its own).
                if tx.send(prepared).is_err() || failed {
                    return;
                }
            }
        });
        for prepared in rx {
            let Prepared {
                rows,
                batch,
                rejects,
            } = prepared?;
            counts.rows += rows;
            counts.rejected += rejects.len() as u64;
            let room = QUOTED_REJECTS.saturating_sub(counts.examples.len());
            counts.examples.extend(rejects.iter().take(room).cloned());
            progress.inc(rows);
            each(batch, rejects)?;
        }
        Ok(())
    })?;
    Ok(counts)
}

/// A batch made ready for `each` by the decoding thread.
struct Prepared {
    rows: u64,
    batch: ImageBatch,
    rejects: Vec<Reject>,
}

/// The partition value of every image of `batch`: the values of `config.partition_by` (which
/// are among the passthrough columns) as text, joined by `/`; `""` for every image when the
/// source is not partitioned.
pub fn partition_keys(batch: &ImageBatch, config: &SourceConfig) -> Result<Vec<String>> {
    if config.partition_by.is_empty() {
        return Ok(vec![String::new(); batch.len()]);
    }
    let options = arrow::util::display::FormatOptions::default().with_null("(null)");
    let formatters = config
        .partition_by
        .iter()
        .map(|name| {
            let at = config
                .passthrough
                .iter()
                .position(|p| p == name)
                .ok_or_else(|| {
                    Error::Internal(format!("partition column `{name}` is not passed through"))
                })?;
            arrow::util::display::ArrayFormatter::try_new(batch.passthrough[at].as_ref(), &options)
                .map_err(|e| {
                    Error::data_because(
                        &*batch.source,
                        format!("partition column `{name}` cannot be shown as text"),
                        e,
                    )
                })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok((0..batch.len())
        .map(|i| {
            formatters
                .iter()
                .map(|f| f.value(i).to_string())
                .collect::<Vec<_>>()
                .join("/")
        })
        .collect())
}
