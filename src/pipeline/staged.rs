//! Reading and rewriting a run's staged part files, for the steps between scoring and the commit
//! (grouping the anomalies, summarizing the scores into the history row).

use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::{ArrowWriter, ProjectionMask};
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::error::{Error, Result};
use crate::io::storage::Storage;
use crate::io::tables::ROW_GROUP_ROWS;

/// Every batch of the staged part `rel`, only `columns` when given.
pub fn read(sink: &Storage, rel: &str, columns: Option<&[&str]>) -> Result<Vec<RecordBatch>> {
    let unreadable = |e: parquet::errors::ParquetError| {
        Error::data_because(sink.display(rel), "cannot read a staged part", e)
    };
    let builder = ParquetRecordBatchReaderBuilder::try_new(sink.get(rel)?).map_err(unreadable)?;
    let builder = match columns {
        Some(names) => {
            let roots: Vec<usize> = names
                .iter()
                .filter_map(|n| builder.schema().index_of(n).ok())
                .collect();
            let mask = ProjectionMask::roots(builder.parquet_schema(), roots);
            builder.with_projection(mask)
        }
        None => builder,
    };
    builder
        .build()
        .map_err(unreadable)?
        .map(|b| {
            b.map_err(|e| Error::data_because(sink.display(rel), "cannot read a staged part", e))
        })
        .collect()
}

/// `batches` as one Parquet file, written as the table writer writes parts (`rel` names it in
/// errors).
pub fn encode(batches: &[RecordBatch], rel: &str) -> Result<Bytes> {
    let internal = |e: parquet::errors::ParquetError| Error::internal(e, "writing a staged part");
    let schema = batches
        .first()
        .map(RecordBatch::schema)
        .ok_or_else(|| Error::Internal(format!("{rel}: a part with rows but no batch")))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::default()))
        .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
        .build();
    let mut out = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut out, schema, Some(props)).map_err(internal)?;
    for b in batches {
        writer.write(b).map_err(internal)?;
    }
    writer.close().map_err(internal)?;
    Ok(Bytes::from(out))
}
