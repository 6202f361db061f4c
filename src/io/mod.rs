//! Everything that touches storage: URIs, reading Parquet sources, decoding image columns,
//! writing tables, and PNG images. Only this module knows tokio and object_store.

pub mod decode;
pub mod delta;
pub mod pages;
pub mod png;
pub mod source;
pub mod storage;
pub mod store_reader;
pub mod tables;
