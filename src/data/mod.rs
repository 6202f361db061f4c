//! Images in memory: shapes, decoded batches, and the rows that could not be used.
//!
//! Pixels are stored as `u8`, row-major and channel-last (`[height, width, channels]`, so the
//! colour sub-pixels of one pixel are adjacent in R, G, B order). Before preprocessing they are
//! 8-bit intensities; after binarization they are 0 or 1.

pub mod preprocess;

use std::sync::Arc;

use arrow::array::ArrayRef;
use ndarray::Array2;
use serde::{Deserialize, Serialize};

/// The shape of every image in a source, and of a model's inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ImageShape {
    /// Rows of pixels.
    pub height: usize,
    /// Columns of pixels.
    pub width: usize,
    /// Sub-pixels per pixel: 1 (grayscale) or 3 (R, G, B).
    pub channels: usize,
}

impl ImageShape {
    /// A shape; `channels` is 1 for grayscale.
    pub fn new(height: usize, width: usize, channels: usize) -> Self {
        Self {
            height,
            width,
            channels,
        }
    }

    /// D, the number of values per image (height × width × channels).
    pub fn dims(&self) -> usize {
        self.height * self.width * self.channels
    }
}

impl std::fmt::Display for ImageShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.channels == 1 {
            write!(f, "{}x{}", self.height, self.width)
        } else {
            write!(f, "{}x{}x{}", self.height, self.width, self.channels)
        }
    }
}

/// Decoded images from one record batch of one source file, with what identifies each row.
#[derive(Debug, Clone)]
pub struct ImageBatch {
    /// Shape of every image in the batch.
    pub shape: ImageShape,
    /// One row per image, `shape.dims()` columns.
    pub pixels: Array2<u8>,
    /// The id of each image (the id column, as a string).
    pub ids: Vec<String>,
    /// Index of each image's row within its file.
    pub rows: Vec<u64>,
    /// URI of the file the batch came from.
    pub source: Arc<str>,
    /// The passthrough columns, holding only the accepted rows, in config order.
    pub passthrough: Vec<ArrayRef>,
}

impl ImageBatch {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when no row of the record batch was usable.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A row that could not be used, and why; it goes to the `rejects` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// The row's id, where it could be read.
    pub id: Option<String>,
    /// URI of the file.
    pub source: Arc<str>,
    /// Index of the row within the file.
    pub row: u64,
    /// What is wrong with it.
    pub reason: String,
}

/// A hash of an image id under a seed that is stable across platforms, versions and runs
/// (FNV-1a, then the SplitMix64 finalizer to spread the bits). It seeds per-image randomness
/// and assigns images to the validation split, so both are independent of row order and of
/// how the input is sharded.
pub fn id_hash(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ seed.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for b in id.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Maps a hash to a number uniform in [0, 1).
pub fn unit_interval(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn id_hash_is_stable_and_seed_dependent() {
        // Pinned so that a change to the hash, which would silently move images between the
        // training and validation splits of existing models, fails here.
        // The values come from an independent Python transcription of the same arithmetic.
        assert_eq!(id_hash(0, "mnist-train-00000"), 0xe087_b18d_e121_ae07);
        assert_eq!(id_hash(3, "frame-1"), 0x7eaf_d8a7_39c6_e454);
        assert_ne!(id_hash(0, "a"), id_hash(1, "a"));
        assert_ne!(id_hash(0, "a"), id_hash(0, "b"));
        let n = 100_000;
        let below = (0..n)
            .filter(|i| unit_interval(id_hash(7, &format!("img-{i}"))) < 0.1)
            .count();
        assert!((9_500..10_500).contains(&below), "{below} of {n} below 0.1");
    }
}
