//! The adapter between object_store and the async Parquet reader: byte ranges of one object.

use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use parquet::arrow::arrow_reader::ArrowReaderOptions;
use parquet::arrow::async_reader::AsyncFileReader;
use parquet::errors::{ParquetError, Result};
use parquet::file::metadata::{ParquetMetaData, ParquetMetaDataReader};

use super::pages;

/// Reads one Parquet object of known size from a store.
#[derive(Debug, Clone)]
pub struct StoreReader {
    store: Arc<dyn ObjectStore>,
    path: Path,
    size: u64,
    /// The file's footer, once read: fetched column chunks are checked against it
    /// ([`pages`](super::pages)) before the reader decodes them.
    checked_against: Option<Arc<ParquetMetaData>>,
}

impl StoreReader {
    /// A reader for the object at `path`, which is `size` bytes long (from the listing, which
    /// saves a request per file).
    pub fn new(store: Arc<dyn ObjectStore>, path: Path, size: u64) -> Self {
        Self {
            store,
            path,
            size,
            checked_against: None,
        }
    }

    /// The same reader, refusing column chunks of `metadata` whose dictionary pages declare
    /// more values than they hold.
    pub fn checking(self, metadata: Arc<ParquetMetaData>) -> Self {
        Self {
            checked_against: Some(metadata),
            ..self
        }
    }

    fn check(&self, range: &Range<u64>, bytes: &Bytes) -> Result<()> {
        match &self.checked_against {
            Some(metadata) => pages::check_fetched(metadata, range, bytes)
                .map_err(|e| ParquetError::General(e.to_string())),
            None => Ok(()),
        }
    }
}

fn external(e: object_store::Error) -> ParquetError {
    ParquetError::External(Box::new(e))
}

impl AsyncFileReader for StoreReader {
    fn get_bytes(&mut self, range: Range<u64>) -> BoxFuture<'_, Result<Bytes>> {
        async move {
            let bytes = self
                .store
                .get_range(&self.path, range.clone())
                .await
                .map_err(external)?;
            self.check(&range, &bytes)?;
            Ok(bytes)
        }
        .boxed()
    }

    fn get_byte_ranges(&mut self, ranges: Vec<Range<u64>>) -> BoxFuture<'_, Result<Vec<Bytes>>> {
        async move {
            let fetched = self
                .store
                .get_ranges(&self.path, &ranges)
                .await
                .map_err(external)?;
            for (range, bytes) in ranges.iter().zip(&fetched) {
                self.check(range, bytes)?;
            }
            Ok(fetched)
        }
        .boxed()
    }

    fn get_metadata<'a>(
        &'a mut self,
        options: Option<&'a ArrowReaderOptions>,
    ) -> BoxFuture<'a, Result<Arc<ParquetMetaData>>> {
        async move {
            let size = self.size;
            let metadata = ParquetMetaDataReader::new()
                .with_metadata_options(options.map(|o| o.metadata_options().clone()))
                .load_and_finish(self, size)
                .await?;
            Ok(Arc::new(metadata))
        }
        .boxed()
    }
}
