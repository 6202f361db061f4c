//! The output tables' schemas (DESIGN.md "Tables") and a writer that stages Parquet part files.
//!
//! Each table is a directory of Parquet files that polars, DuckDB, pyarrow and Spark read as
//! one dataset. Part files are named `part-<run_id>-<shard>-<seq>.parquet`, so a rerun can find
//! and replace exactly its own files. Writers put parts under `_staging/<run_id>/` (ignored by
//! readers, which skip `_`-prefixed paths) and the commit moves them into place.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float32Array, Float64Array, Int32Array, Int64Array, ListArray,
    StringArray,
};
use arrow::buffer::OffsetBuffer;
use arrow::compute::{cast, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::record_batch::RecordBatch;
use object_store::buffered::BufWriter;
use parquet::arrow::AsyncArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use super::storage::Storage;
use crate::data::{ImageShape, Reject};
use crate::error::{Error, Result};

/// Column names the score tables define; a passthrough column may not reuse one.
pub const RESERVED_COLUMNS: &[&str] = &[
    "run_id",
    "id",
    "model",
    "model_id",
    "log_likelihood",
    "bits_per_dim",
    "score",
    "threshold",
    "is_anomaly",
    "p_value",
    "pixel_nll",
    "height",
    "width",
    "channels",
    "source",
    "row",
    "reason",
    "embedding",
    "nearest_ids",
    "group",
];

/// The tables a run writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    /// One row per scored image.
    Scores,
    /// The flagged rows, with per-pixel maps.
    Anomalies,
    /// Rows that could not be used.
    Rejects,
    /// Each scored image's embedding (with `sink.embeddings`).
    Embeddings,
    /// One row per committed run: counts, score quantiles, drift.
    History,
}

impl Table {
    /// Every table, in commit order.
    pub const ALL: [Table; 5] = [
        Table::Scores,
        Table::Anomalies,
        Table::Rejects,
        Table::Embeddings,
        Table::History,
    ];

    /// Whether a shard may stage none of the table: `embeddings` is written only when asked
    /// for, and the `history` row only by the worker that commits the whole run.
    pub fn optional(self) -> bool {
        matches!(self, Table::Embeddings | Table::History)
    }

    /// The table's directory name under the sink.
    pub fn dir(self) -> &'static str {
        match self {
            Table::Scores => "scores",
            Table::Anomalies => "anomalies",
            Table::Rejects => "rejects",
            Table::Embeddings => "embeddings",
            Table::History => "history",
        }
    }
}

/// The passthrough columns' fields, as plain types: extension metadata is dropped so that the
/// score tables hold plain Parquet types only, and unsigned integers become the signed type that
/// holds them (Delta Lake has no unsigned types, and Spark reads an unsigned 64-bit Parquet
/// column as a decimal); a `u64` above `i64::MAX` becomes null.
pub fn passthrough_fields(schema: &Schema, names: &[String]) -> Vec<Field> {
    names
        .iter()
        .filter_map(|n| schema.field_with_name(n).ok())
        .map(|f| Field::new(f.name(), signed(f.data_type()), true))
        .collect()
}

/// The signed integer type holding every value of an unsigned one; other types unchanged.
fn signed(t: &DataType) -> DataType {
    match t {
        DataType::UInt8 => DataType::Int16,
        DataType::UInt16 => DataType::Int32,
        DataType::UInt32 | DataType::UInt64 => DataType::Int64,
        other => other.clone(),
    }
}

/// `scores/`: run_id, id, the passthrough columns, model, model_id, log_likelihood,
/// bits_per_dim, score, threshold, is_anomaly, p_value. The model and score columns are null
/// for an image of a partition that had too few images to fit a model on (it gets no flag
/// rather than a meaningless one); p_value is null where the model has no calibration scores.
pub fn scores_schema(passthrough: &[Field]) -> SchemaRef {
    let mut fields = vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
    ];
    fields.extend(passthrough.iter().cloned());
    fields.extend([
        Field::new("model", DataType::Utf8, true),
        Field::new("model_id", DataType::Utf8, true),
        Field::new("log_likelihood", DataType::Float64, true),
        Field::new("bits_per_dim", DataType::Float64, true),
        Field::new("score", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, true),
        Field::new("is_anomaly", DataType::Boolean, true),
        Field::new("p_value", DataType::Float64, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// `anomalies/`: the scores columns plus `pixel_nll` (`list<float32>`, row-major), height, width,
/// channels; and for a model with an embedding (null otherwise): `nearest_ids`
/// (`list<string>`), the training images the model keeps that the image most resembles, nearest
/// first; `embedding` (`list<float32>`), the image's embedding; and `group` (int32), its group
/// among the run's anomalies of the same model, 0 the largest.
pub fn anomalies_schema(passthrough: &[Field]) -> SchemaRef {
    let mut fields: Vec<Field> = scores_schema(passthrough)
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.extend([
        Field::new(
            "pixel_nll",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            false,
        ),
        Field::new("height", DataType::Int32, false),
        Field::new("width", DataType::Int32, false),
        Field::new("channels", DataType::Int32, false),
        Field::new(
            "nearest_ids",
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, false))),
            true,
        ),
        Field::new(
            "embedding",
            DataType::List(Arc::new(Field::new("item", DataType::Float32, false))),
            true,
        ),
        Field::new("group", DataType::Int32, true),
    ]);
    Arc::new(Schema::new(fields))
}

/// `rejects/`: run_id, id (null where unknown), source, row, reason.
pub fn rejects_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, true),
        Field::new("source", DataType::Utf8, false),
        Field::new("row", DataType::Int64, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
}

/// How the `embedding` column holds its `width` floats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VectorType {
    /// A fixed-size list: the width is part of the type (the Parquet layout, whose readers
    /// take it from the Arrow schema stored in each file).
    FixedSize,
    /// A plain list, as the Delta layout needs: Delta's schema has no fixed-size list, and a
    /// reader that holds each file to the table's schema refuses one.
    List,
}

/// `embeddings/`: run_id, id, the passthrough columns, model_id, and `embedding`, the model's
/// hidden representation of the image as `width` float32 (a fixed-size list, or a list, per
/// `vectors`).
pub fn embeddings_schema(passthrough: &[Field], width: usize, vectors: VectorType) -> SchemaRef {
    let mut fields = vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("id", DataType::Utf8, false),
    ];
    fields.extend(passthrough.iter().cloned());
    fields.extend([
        Field::new("model_id", DataType::Utf8, false),
        Field::new("embedding", vector_type(width, vectors), false),
    ]);
    Arc::new(Schema::new(fields))
}

fn vector_type(width: usize, vectors: VectorType) -> DataType {
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    match vectors {
        VectorType::FixedSize => DataType::FixedSizeList(item, width as i32),
        VectorType::List => DataType::List(item),
    }
}

/// `history/`: one row per committed run. run_id, pipeline, model_id, started_at and
/// finished_at (UTC), the counts scored, flagged and rejected, the score quantiles
/// `score_p50`, `score_p90`, `score_p99`, `score_p999`, the shares of p-values below 0.01 and
/// 0.05, and the drift test of the run's scores against the calibration scores
/// (`drift_statistic`, `drift_p_value`, `drifted`; null where the model has no calibration
/// scores).
pub fn history_schema() -> SchemaRef {
    let time = DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()));
    let float = |name: &str| Field::new(name, DataType::Float64, true);
    Arc::new(Schema::new(vec![
        Field::new("run_id", DataType::Utf8, false),
        Field::new("pipeline", DataType::Utf8, false),
        Field::new("model_id", DataType::Utf8, false),
        Field::new("started_at", time.clone(), false),
        Field::new("finished_at", time, false),
        Field::new("scored", DataType::Int64, false),
        Field::new("flagged", DataType::Int64, false),
        Field::new("rejected", DataType::Int64, false),
        float("score_p50"),
        float("score_p90"),
        float("score_p99"),
        float("score_p999"),
        float("p_below_001"),
        float("p_below_005"),
        float("drift_statistic"),
        float("drift_p_value"),
        Field::new("drifted", DataType::Boolean, true),
    ]))
}

/// Builds an `embeddings` batch from a scores batch: the rows scored by a model
/// (`embeddings[i]` is row i's, `None` where no model covered it), with their run id, id,
/// passthrough columns and model id.
pub fn embeddings_batch(
    schema: &SchemaRef,
    scores: &RecordBatch,
    embeddings: &[Option<&[f32]>],
) -> Result<RecordBatch> {
    let keep = BooleanArray::from_iter(embeddings.iter().map(|e| Some(e.is_some())));
    let kept = filter_record_batch(scores, &keep)
        .map_err(|e| Error::internal(e, "selecting embedded rows"))?;
    let column_type = schema.field(schema.fields().len() - 1).data_type();
    let Some(width) = embeddings.iter().flatten().next().map(|e| e.len()) else {
        return Ok(RecordBatch::new_empty(Arc::clone(schema)));
    };
    let values =
        Float32Array::from_iter_values(embeddings.iter().flatten().flat_map(|e| e.iter().copied()));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let fixed =
        arrow::array::FixedSizeListArray::try_new(item, width as i32, Arc::new(values), None)
            .map_err(|e| Error::internal(e, "building the embedding column"))?;
    let vectors = arrow::compute::cast(&fixed, column_type)
        .map_err(|e| Error::internal(e, "building the embedding column"))?;
    let mut columns: Vec<ArrayRef> = schema.fields()[..schema.fields().len() - 1]
        .iter()
        .map(|f| {
            kept.column_by_name(f.name())
                .cloned()
                .ok_or_else(|| Error::Internal(format!("scores have no column {}", f.name())))
        })
        .collect::<Result<_>>()?;
    columns.push(vectors);
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| Error::internal(e, "building an embeddings batch"))
}

/// One image's result under its (partition's) model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RowScore<'a> {
    /// The model kind's name.
    pub model: &'a str,
    /// The fitted artifact's id.
    pub model_id: &'a str,
    /// log p(x) in nats.
    pub log_likelihood: f64,
    /// The anomaly score.
    pub score: f64,
    /// The threshold in force for this image.
    pub threshold: f64,
    /// The decision.
    pub is_anomaly: bool,
    /// Conformal p-value, where the model has calibration scores.
    pub p_value: Option<f64>,
}

/// Per-image results of scoring one batch, ready to become table rows.
#[derive(Debug, Clone, Copy)]
pub struct ScoredRows<'a> {
    /// The run's id.
    pub run_id: &'a str,
    /// The file the rows came from (for messages).
    pub source: &'a str,
    /// Image ids.
    pub ids: &'a [String],
    /// Passthrough columns for these rows.
    pub passthrough: &'a [ArrayRef],
    /// D, to compute bits per dimension.
    pub dims: usize,
    /// Each image's result; `None` where no model covers its partition.
    pub results: &'a [Option<RowScore<'a>>],
}

/// Builds a `scores` record batch.
pub fn scores_batch(schema: &SchemaRef, rows: &ScoredRows<'_>) -> Result<RecordBatch> {
    let n = rows.ids.len();
    let bits = 1.0 / (rows.dims as f64 * std::f64::consts::LN_2);
    let mut columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![rows.run_id; n])),
        Arc::new(StringArray::from_iter_values(rows.ids.iter())),
    ];
    let passthrough_fields = &schema.fields()[2..2 + rows.passthrough.len()];
    for (array, field) in rows.passthrough.iter().zip(passthrough_fields) {
        let array = if array.data_type() == field.data_type() {
            Arc::clone(array)
        } else {
            cast(array, field.data_type()).map_err(|e| {
                Error::data(
                    rows.source,
                    format!(
                        "passthrough column `{}` has type {} here but {} in the first file, and cannot be converted: {e}",
                        field.name(),
                        array.data_type(),
                        field.data_type()
                    ),
                )
            })?
        };
        columns.push(array);
    }
    let r = rows.results;
    let f64s = |f: &dyn Fn(&RowScore<'_>) -> Option<f64>| -> ArrayRef {
        Arc::new(Float64Array::from_iter(
            r.iter().map(|x| x.as_ref().and_then(f)),
        ))
    };
    columns.extend([
        Arc::new(StringArray::from_iter(r.iter().map(|x| x.map(|x| x.model)))) as ArrayRef,
        Arc::new(StringArray::from_iter(
            r.iter().map(|x| x.map(|x| x.model_id)),
        )),
        f64s(&|x| Some(x.log_likelihood)),
        f64s(&|x| Some(-x.log_likelihood * bits)),
        f64s(&|x| Some(x.score)),
        f64s(&|x| Some(x.threshold)),
        Arc::new(BooleanArray::from_iter(
            r.iter().map(|x| x.map(|x| x.is_anomaly)),
        )),
        f64s(&|x| x.p_value),
    ]);
    debug_assert_eq!(r.len(), n);
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| Error::internal(e, "building a scores batch"))
}

/// Builds an `anomalies` batch from a scores batch: its flagged rows (`flagged[i]`) plus their
/// per-pixel negative log-likelihood maps (`maps[k]` for the k-th flagged row, each
/// `shape.dims()` long), the ids of their nearest normal images (`nearest[k]`) and their
/// embeddings (`embeddings[k]`); `group` is left null for [`with_groups`] to fill once the run's
/// anomalies are all known.
pub fn anomalies_batch(
    schema: &SchemaRef,
    scores: &RecordBatch,
    flagged: &[bool],
    maps: &[Vec<f32>],
    nearest: &[Option<Vec<String>>],
    embeddings: &[Option<Vec<f32>>],
    shape: ImageShape,
) -> Result<RecordBatch> {
    let mask = BooleanArray::from(flagged.to_vec());
    let flagged = filter_record_batch(scores, &mask)
        .map_err(|e| Error::internal(e, "selecting anomalies"))?;
    let n = flagged.num_rows();
    debug_assert_eq!(n, maps.len());
    let values = Float32Array::from_iter_values(maps.iter().flatten().copied());
    let offsets = OffsetBuffer::from_lengths(maps.iter().map(Vec::len));
    let item = Arc::new(Field::new("item", DataType::Float32, false));
    let pixel_nll = ListArray::try_new(item, offsets, Arc::new(values), None)
        .map_err(|e| Error::internal(e, "building pixel_nll"))?;
    let dim = |v: usize| Arc::new(Int32Array::from(vec![v as i32; n])) as ArrayRef;
    debug_assert_eq!(n, nearest.len());
    let mut ids = arrow::array::ListBuilder::new(arrow::array::StringBuilder::new())
        .with_field(Arc::new(Field::new("item", DataType::Utf8, false)));
    for near in nearest {
        ids.append_option(near.as_ref().map(|v| v.iter().map(Some)));
    }
    let mut vectors = arrow::array::ListBuilder::new(arrow::array::Float32Builder::new())
        .with_field(Arc::new(Field::new("item", DataType::Float32, false)));
    for e in embeddings {
        vectors.append_option(e.as_ref().map(|v| v.iter().copied().map(Some)));
    }
    let mut columns = flagged.columns().to_vec();
    columns.extend([
        Arc::new(pixel_nll) as ArrayRef,
        dim(shape.height),
        dim(shape.width),
        dim(shape.channels),
        Arc::new(ids.finish()),
        Arc::new(vectors.finish()),
        Arc::new(Int32Array::new_null(n)),
    ]);
    RecordBatch::try_new(Arc::clone(schema), columns)
        .map_err(|e| Error::internal(e, "building an anomalies batch"))
}

/// `anomalies` (a batch of the anomalies schema) with its `group` column replaced by `groups`.
pub fn with_groups(anomalies: &RecordBatch, groups: Vec<Option<i32>>) -> Result<RecordBatch> {
    let schema = anomalies.schema();
    let at = schema
        .index_of("group")
        .map_err(|e| Error::internal(e, "an anomalies batch without `group`"))?;
    let mut columns = anomalies.columns().to_vec();
    columns[at] = Arc::new(Int32Array::from(groups));
    RecordBatch::try_new(schema, columns).map_err(|e| Error::internal(e, "setting the groups"))
}

/// Builds a `rejects` batch.
pub fn rejects_batch(run_id: &str, rejects: &[Reject]) -> Result<RecordBatch> {
    let n = rejects.len();
    RecordBatch::try_new(
        rejects_schema(),
        vec![
            Arc::new(StringArray::from(vec![run_id; n])),
            Arc::new(StringArray::from_iter(
                rejects.iter().map(|r| r.id.as_deref()),
            )),
            Arc::new(StringArray::from_iter_values(
                rejects.iter().map(|r| r.source.as_ref()),
            )),
            Arc::new(Int64Array::from_iter_values(
                rejects
                    .iter()
                    .map(|r| i64::try_from(r.row).unwrap_or(i64::MAX)),
            )),
            Arc::new(StringArray::from_iter_values(
                rejects.iter().map(|r| r.reason.as_str()),
            )),
        ],
    )
    .map_err(|e| Error::internal(e, "building a rejects batch"))
}

/// The tables' columns as JSON (`schemas/tables.json`): for each table, its columns in order
/// with their Arrow type and nullability. Passthrough columns sit after `id`.
pub fn tables_reference() -> serde_json::Value {
    let describe = |schema: SchemaRef| -> serde_json::Value {
        schema
            .fields()
            .iter()
            .map(|f| {
                serde_json::json!({
                    "name": f.name(),
                    "type": f.data_type().to_string(),
                    "nullable": f.is_nullable(),
                })
            })
            .collect()
    };
    serde_json::json!({
        "note": "Generated by `pipeline schema --out-dir schemas/`; passthrough columns follow `id` in scores, anomalies and embeddings; the embedding's width is the model's (500 shown: NADE's default hidden layer); in the Delta layout the embedding is a List of Float32 (Delta has no fixed-size list).",
        "scores": describe(scores_schema(&[])),
        "anomalies": describe(anomalies_schema(&[])),
        "rejects": describe(rejects_schema()),
        "embeddings": describe(embeddings_schema(&[], 500, VectorType::FixedSize)),
        "history": describe(history_schema()),
    })
}

/// The Arrow schema in the footer of the Parquet file `rel` under `sink`.
pub fn part_schema(sink: &Storage, rel: &str) -> Result<Schema> {
    use parquet::arrow::arrow_reader::{ArrowReaderMetadata, ArrowReaderOptions};
    let size = sink.size(rel)?;
    let mut reader =
        super::store_reader::StoreReader::new(Arc::clone(sink.store()), sink.path(rel), size);
    sink.runtime()
        .block_on(ArrowReaderMetadata::load_async(
            &mut reader,
            ArrowReaderOptions::new(),
        ))
        .map(|m| m.schema().as_ref().clone())
        .map_err(|e| Error::data_because(sink.display(rel), "cannot read the part's footer", e))
}

/// The file name of part `seq` of shard `shard` of run `run_id`.
pub fn part_name(run_id: &str, shard: u32, seq: u32) -> String {
    format!("part-{run_id}-{shard:04}-{seq:05}.parquet")
}

/// The run id a part file name belongs to, if it is one of ours: `part-<run>-<shard>-<seq>`,
/// and in a Delta table with the commit attempt's tag before the extension
/// (`part-<run>-<shard>-<seq>.<16 hex digits>.parquet`).
pub fn run_of_part(name: &str) -> Option<&str> {
    let stem = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let untagged = stem
        .rsplit_once('.')
        .filter(|(_, tag)| tag.len() == 16 && tag.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|(head, _)| run_of_stem(head));
    untagged.or_else(|| run_of_stem(stem))
}

/// The run of `<run>-<shard>-<seq>`.
fn run_of_stem(stem: &str) -> Option<&str> {
    let mut parts = stem.rsplitn(3, '-');
    let seq = parts.next()?;
    let shard = parts.next()?;
    let run = parts.next()?;
    let digits = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_digit());
    (digits(seq, 5) && digits(shard, 4)).then_some(run)
}

/// Rows per Parquet row group of the tables written.
pub const ROW_GROUP_ROWS: usize = 65_536;

/// Bytes a row group may reach in memory before it is written out. The anomalies table (a
/// per-pixel map per row) reaches it first; at 8 MiB a run that flags many images holds no
/// more in the writer than one that flags few, so peak memory does not grow with the input.
pub const ROW_GROUP_BYTES: usize = 8 << 20;

/// What a finished [`TableWriter`] wrote.
#[derive(Debug, Clone, Default)]
pub struct WrittenTable {
    /// The staged files, relative to the sink root.
    pub staged: Vec<String>,
    /// Rows written.
    pub rows: u64,
}

/// Writes one table's rows as Parquet part files under the run's staging directory, starting a
/// new file every `max_rows` rows. At least one file is written, so that a table with no rows
/// still has a schema for readers.
pub struct TableWriter {
    storage: Storage,
    table: Table,
    run_id: String,
    shard: u32,
    schema: SchemaRef,
    max_rows: usize,
    current: Option<AsyncArrowWriter<BufWriter>>,
    rows_in_file: usize,
    written: WrittenTable,
}

impl TableWriter {
    /// A writer for `table` of run `run_id` under `storage` (the sink root).
    pub fn new(
        storage: &Storage,
        table: Table,
        run_id: &str,
        shard: u32,
        schema: SchemaRef,
        max_rows: usize,
    ) -> Self {
        Self {
            storage: storage.clone(),
            table,
            run_id: run_id.to_string(),
            shard,
            schema,
            max_rows: max_rows.max(1),
            current: None,
            rows_in_file: 0,
            written: WrittenTable::default(),
        }
    }

    /// The table's schema.
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// Appends rows, splitting them across part files as needed.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        let mut offset = 0;
        while offset < batch.num_rows() {
            if self.current.is_none() {
                self.open_part()?;
            }
            let room = self.max_rows - self.rows_in_file;
            let take = room.min(batch.num_rows() - offset);
            let slice = batch.slice(offset, take);
            let rt = self.storage.runtime().clone();
            let writer = self.current.as_mut().expect("opened above");
            rt.block_on(async {
                writer.write(&slice).await?;
                // Wide rows (the anomalies' pixel maps) fill memory long before the row count
                // does: end the row group once it holds this many bytes.
                if writer.in_progress_size() > ROW_GROUP_BYTES {
                    writer.flush().await?;
                }
                Ok(())
            })
            .map_err(|e| self.write_error(e))?;
            self.rows_in_file += take;
            self.written.rows += take as u64;
            offset += take;
            if self.rows_in_file == self.max_rows {
                self.close_part()?;
            }
        }
        Ok(())
    }

    /// Closes the last part (writing an empty one if there were no rows) and says what was
    /// staged.
    pub fn finish(mut self) -> Result<WrittenTable> {
        if self.written.staged.is_empty() {
            self.open_part()?;
        }
        self.close_part()?;
        Ok(self.written)
    }

    fn open_part(&mut self) -> Result<()> {
        let seq = self.written.staged.len() as u32;
        let rel = format!(
            "_staging/{}/{}/{}",
            self.run_id,
            self.table.dir(),
            part_name(&self.run_id, self.shard, seq)
        );
        let sink = BufWriter::new(Arc::clone(self.storage.store()), self.storage.path(&rel));
        // The writer holds a row group in memory until it is full: bounded groups keep a
        // scoring run's memory flat however many images it writes (and let readers skip).
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .build();
        let writer = AsyncArrowWriter::try_new(sink, Arc::clone(&self.schema), Some(props))
            .map_err(|e| Error::internal(e, "opening a Parquet writer"))?;
        self.current = Some(writer);
        self.rows_in_file = 0;
        self.written.staged.push(rel);
        Ok(())
    }

    fn close_part(&mut self) -> Result<()> {
        if let Some(writer) = self.current.take() {
            self.storage
                .runtime()
                .block_on(writer.close())
                .map_err(|e| self.write_error(e))?;
        }
        Ok(())
    }

    fn write_error(&self, e: parquet::errors::ParquetError) -> Error {
        let e_text = e.to_string();
        let uri = self.storage.display(
            self.written
                .staged
                .last()
                .map(String::as_str)
                .unwrap_or(self.table.dir()),
        );
        match super::source::from_parquet(&uri, e) {
            // The read-side wording ("not a readable Parquet file") would mislead here.
            Error::Data { .. } | Error::DataCause { .. } => Error::Io {
                source: format!(
                    "cannot write the table: {}; check free space and write access at the sink",
                    root_cause(&e_text)
                )
                .into(),
                uri,
            },
            other => other,
        }
    }
}

/// The innermost message of a chained error text ("External: Generic …: No space left on
/// device (os error 28)" → "No space left on device (os error 28)").
fn root_cause(text: &str) -> &str {
    text.rsplit(": ").next().unwrap_or(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_names_round_trip_even_with_dashes_in_the_run_id() {
        let name = part_name("2026-11-28-a", 3, 12);
        assert_eq!(name, "part-2026-11-28-a-0003-00012.parquet");
        assert_eq!(run_of_part(&name), Some("2026-11-28-a"));
        assert_eq!(run_of_part("part-x-1-2.parquet"), None);
        // In a Delta table, with the attempt's tag; a run id with dots is still whole.
        assert_eq!(
            run_of_part("part-2026-11-28-a-0003-00012.0123456789abcdef.parquet"),
            Some("2026-11-28-a")
        );
        assert_eq!(run_of_part("part-v1.2-0000-00000.parquet"), Some("v1.2"));
        assert_eq!(
            run_of_part("part-v1.2-0000-00000.00000000ffffffff.parquet"),
            Some("v1.2")
        );
        assert_eq!(run_of_part("other.parquet"), None);
    }

    #[test]
    fn anomalies_extend_the_scores_schema() {
        let pass = vec![Field::new("label", DataType::UInt8, true)];
        let s = scores_schema(&pass);
        let a = anomalies_schema(&pass);
        assert_eq!(&a.fields()[..s.fields().len()], &s.fields()[..]);
        assert_eq!(a.field(a.fields().len() - 7).name(), "pixel_nll");
    }
}
