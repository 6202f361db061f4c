//! A check of a column chunk's dictionary pages before the Parquet reader decodes them.
//!
//! The parquet crate sizes a dictionary by the count its page header declares, before reading
//! a value: a corrupt or hostile header claiming two billion values makes it fill gigabytes
//! (found by fuzzing, `fuzz/`). A dictionary page's values are PLAIN-encoded, so its bytes
//! bound how many it can hold; a page that claims more is refused here, as a corrupt file.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use parquet::basic::Type as PhysicalType;
use parquet::column::page::{Page, PageReader};
use parquet::file::metadata::{ColumnChunkMetaData, ParquetMetaData};
use parquet::file::reader::{ChunkReader, Length};
use parquet::file::serialized_reader::SerializedPageReader;

/// A dictionary page that declares more values than its bytes can hold.
#[derive(Debug, thiserror::Error)]
#[error(
    "column `{column}` of row group {group}: a dictionary page declares {declared} values in \
     {bytes} bytes, more than they can hold: the file is corrupt; rewrite it"
)]
pub struct OversizedDictionary {
    /// The row group.
    pub group: usize,
    /// The column's path.
    pub column: String,
    /// The values the page header declares.
    pub declared: usize,
    /// The page's decompressed bytes.
    pub bytes: usize,
}

/// Checks every column chunk of `metadata` whose bytes `range` are, against those `bytes` (a
/// range that is not a whole column chunk is not checked).
pub fn check_fetched(
    metadata: &ParquetMetaData,
    range: &Range<u64>,
    bytes: &Bytes,
) -> Result<(), OversizedDictionary> {
    check_chunks(metadata, |column| {
        let (start, length) = column.byte_range();
        (start == range.start && start.saturating_add(length) == range.end).then(|| ChunkBytes {
            start,
            bytes: bytes.clone(),
        })
    })
}

/// Checks every column chunk of a whole file held in memory.
pub fn check_file(metadata: &ParquetMetaData, file: &Bytes) -> Result<(), OversizedDictionary> {
    check_chunks(metadata, |_| {
        Some(ChunkBytes {
            start: 0,
            bytes: file.clone(),
        })
    })
}

/// Checks each column chunk of `metadata` for which `bytes_of` has the bytes.
fn check_chunks(
    metadata: &ParquetMetaData,
    bytes_of: impl Fn(&ColumnChunkMetaData) -> Option<ChunkBytes>,
) -> Result<(), OversizedDictionary> {
    for (group, row_group) in metadata.row_groups().iter().enumerate() {
        for column in row_group.columns() {
            if let Some(chunk) = bytes_of(column) {
                check_column_chunk(group, column, row_group.num_rows(), chunk)?;
            }
        }
    }
    Ok(())
}

/// Walks the chunk's page headers (skipping data pages without decompressing them) and checks
/// each dictionary page. Pages the walk cannot read are left to the reader, which reports them
/// in its own words: this check refuses only what it has shown to be oversized.
fn check_column_chunk(
    group: usize,
    column: &ColumnChunkMetaData,
    rows: i64,
    chunk: ChunkBytes,
) -> Result<(), OversizedDictionary> {
    let rows = usize::try_from(rows).unwrap_or(0);
    let Ok(mut pages) = SerializedPageReader::new(Arc::new(chunk), column, rows, None) else {
        return Ok(());
    };
    loop {
        match pages.peek_next_page() {
            Ok(Some(next)) if next.is_dict => {}
            Ok(Some(_)) => {
                if pages.skip_next_page().is_err() {
                    return Ok(());
                }
                continue;
            }
            Ok(None) | Err(_) => return Ok(()),
        }
        let Ok(Some(Page::DictionaryPage {
            buf, num_values, ..
        })) = pages.get_next_page()
        else {
            return Ok(());
        };
        let declared = num_values as usize;
        if declared > most_values(column, buf.len()) {
            return Err(OversizedDictionary {
                group,
                column: column.column_path().to_string(),
                declared,
                bytes: buf.len(),
            });
        }
    }
}

/// The most PLAIN-encoded values of the column's physical type that `bytes` bytes hold.
fn most_values(column: &ColumnChunkMetaData, bytes: usize) -> usize {
    let each = match column.column_type() {
        PhysicalType::BOOLEAN => return bytes.saturating_mul(8),
        PhysicalType::INT32 | PhysicalType::FLOAT => 4,
        PhysicalType::INT64 | PhysicalType::DOUBLE => 8,
        PhysicalType::INT96 => 12,
        // A length prefix of 4 bytes before every value.
        PhysicalType::BYTE_ARRAY => 4,
        PhysicalType::FIXED_LEN_BYTE_ARRAY => column.column_descr().type_length().max(1) as usize,
    };
    bytes / each
}

/// A column chunk's bytes, read at their offsets in the file.
struct ChunkBytes {
    /// Where `bytes` start in the file.
    start: u64,
    bytes: Bytes,
}

impl ChunkBytes {
    /// The part of `bytes` at file offset `at`, `length` long at most.
    fn slice(&self, at: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let from = at
            .checked_sub(self.start)
            .map(|v| v as usize)
            .filter(|&v| v <= self.bytes.len())
            .ok_or_else(|| {
                parquet::errors::ParquetError::EOF(format!("offset {at} is outside the chunk"))
            })?;
        let to = from.saturating_add(length).min(self.bytes.len());
        Ok(self.bytes.slice(from..to))
    }
}

impl Length for ChunkBytes {
    fn len(&self) -> u64 {
        self.start + self.bytes.len() as u64
    }
}

impl ChunkReader for ChunkBytes {
    type T = bytes::buf::Reader<Bytes>;

    fn get_read(&self, start: u64) -> parquet::errors::Result<Self::T> {
        use bytes::Buf;
        Ok(self.slice(start, usize::MAX)?.reader())
    }

    fn get_bytes(&self, start: u64, length: usize) -> parquet::errors::Result<Bytes> {
        let bytes = self.slice(start, length)?;
        if bytes.len() < length {
            return Err(parquet::errors::ParquetError::EOF(format!(
                "{length} bytes at offset {start} run past the chunk"
            )));
        }
        Ok(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{ArrayRef, Int32Array, StringArray};
    use arrow::record_batch::RecordBatch;
    use parquet::file::reader::{FileReader, SerializedFileReader};

    /// A file as the pipeline's own writers make them: dictionary-encoded strings and integers.
    fn dictionary_file() -> Bytes {
        let names: ArrayRef = Arc::new(StringArray::from_iter_values(
            (0..500).map(|i| format!("camera-{}", i % 7)),
        ));
        let codes: ArrayRef = Arc::new(Int32Array::from_iter_values((0..500).map(|i| i % 5)));
        let batch = RecordBatch::try_from_iter([("name", names), ("code", codes)]).unwrap();
        let mut out = Vec::new();
        let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, batch.schema(), None).unwrap();
        w.write(&batch).unwrap();
        w.close().unwrap();
        Bytes::from(out)
    }

    fn metadata(file: &Bytes) -> ParquetMetaData {
        SerializedFileReader::new(file.clone())
            .unwrap()
            .metadata()
            .clone()
    }

    #[test]
    fn honest_dictionaries_pass_whole_and_chunk_by_chunk() {
        let file = dictionary_file();
        let md = metadata(&file);
        let dictionaries = md.row_group(0).columns().iter();
        assert!(
            dictionaries
                .clone()
                .all(|c| c.dictionary_page_offset().is_some()),
            "the test file has dictionary pages"
        );
        check_file(&md, &file).unwrap();
        for column in dictionaries {
            let (start, length) = column.byte_range();
            let range = start..start + length;
            let chunk = file.slice(start as usize..(start + length) as usize);
            check_fetched(&md, &range, &chunk).unwrap();
        }
    }

    /// The fuzzer's file, whole and as the chunk a store would fetch; the bound is the page's
    /// bytes over the width of one value.
    #[test]
    fn a_dictionary_that_claims_more_values_than_its_bytes_is_refused() {
        let file = Bytes::from_static(include_bytes!(
            "../../tests/data/fuzz-oversized-dictionary.parquet"
        ));
        let md = metadata(&file);
        let e = check_file(&md, &file).unwrap_err();
        assert_eq!((e.declared, e.bytes), (1_690_932_006, 384), "{e}");
        assert!(e.column.contains("image"), "{e}");
        let column = md
            .row_groups()
            .iter()
            .flat_map(|g| g.columns())
            .find(|c| c.column_path().to_string() == e.column)
            .unwrap();
        let (start, length) = column.byte_range();
        let chunk = file.slice(start as usize..(start + length) as usize);
        assert!(check_fetched(&md, &(start..start + length), &chunk).is_err());
        let int32 = metadata(&dictionary_file()).row_group(0).column(1).clone();
        assert_eq!(most_values(&int32, 20), 5);
        assert_eq!(most_values(&int32, 19), 4);
    }
}
