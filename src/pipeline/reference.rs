//! The reference sample a fitted model keeps of its training images — their ids, 8-bit pixels
//! and embeddings, in `models/<model_id>/reference.parquet` — so that a run can name, for each
//! flagged image, the normal images it most resembles (and the report can draw them) without
//! rereading the training data.
//!
//! The sample is the [`MAX_IMAGES`] training images with the smallest salted hash of their id:
//! a uniform sample that does not depend on the order the source is read in, gathered in
//! bounded memory.

use std::collections::BinaryHeap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeBinaryArray, FixedSizeListArray, Float32Array, StringArray,
};
use arrow::datatypes::{DataType, Field, Float32Type, Schema};
use arrow::record_batch::RecordBatch;
use bytes::Bytes;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;

use crate::data::{ImageShape, id_hash};
use crate::error::{Error, Result};

/// The most training images a model keeps for nearest-neighbour look-ups.
pub const MAX_IMAGES: usize = 2000;

/// Nearest normal images recorded per flagged image.
pub const NEAREST: usize = 3;

/// The file, in the model's directory.
pub const FILE: &str = "reference.parquet";

/// Salt of the sample's hash, so it is independent of the validation split's.
const SALT: u64 = 0x7265_6665_7265_6e63;

/// Gathers the images of smallest salted id hash, at most `cap` of them, in any read order.
#[derive(Debug)]
pub struct Reservoir {
    cap: usize,
    seed: u64,
    /// A max-heap on the hash: its top is the first to give way to a smaller one.
    heap: BinaryHeap<(u64, String, Vec<u8>)>,
}

impl Reservoir {
    /// An empty reservoir of at most `cap` images, hashing ids with `seed`.
    pub fn new(cap: usize, seed: u64) -> Self {
        Self {
            cap,
            seed: seed ^ SALT,
            heap: BinaryHeap::new(),
        }
    }

    /// Offers image `id` (8-bit pixels `raw`); kept while it is among the `cap` smallest.
    pub fn offer(&mut self, id: &str, raw: &[u8]) {
        if self.cap == 0 {
            return;
        }
        let hash = id_hash(self.seed, id);
        if self.heap.len() < self.cap {
            self.heap.push((hash, id.to_string(), raw.to_vec()));
        } else if self.heap.peek().is_some_and(|top| hash < top.0) {
            self.heap.pop();
            self.heap.push((hash, id.to_string(), raw.to_vec()));
        }
    }

    /// The images kept, by hash: their ids and their pixels one after another.
    pub fn into_images(self) -> (Vec<String>, Vec<u8>) {
        let kept = self.heap.into_sorted_vec();
        let pixels = kept.iter().flat_map(|k| k.2.iter().copied()).collect();
        (kept.into_iter().map(|k| k.1).collect(), pixels)
    }
}

impl Default for Reservoir {
    fn default() -> Self {
        Self::new(MAX_IMAGES, 0)
    }
}

/// Training images with their embeddings: what a flagged image is compared with.
///
/// Images are compared by the cosine of their embeddings *centred* on the sample's mean: the
/// features every normal image shares (all of a sigmoid layer's units are positive, so raw
/// cosines are all near one) say nothing about which normal image an anomaly resembles.
///
/// Invariants: `pixels` holds `ids.len()` images of `shape.dims()` bytes, `embeddings`
/// `ids.len()` vectors of `width` values, `centre` their mean, and `unit` the centred vectors
/// scaled to length one (a zero vector stays zero).
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceSample {
    /// The images' ids.
    pub ids: Vec<String>,
    /// Their 8-bit pixels (as read, before preprocessing), one image after another.
    pub pixels: Vec<u8>,
    /// Their shape.
    pub shape: ImageShape,
    /// Their embeddings, one after another.
    pub embeddings: Vec<f32>,
    /// Values per embedding.
    pub width: usize,
    centre: Vec<f64>,
    unit: Vec<f32>,
}

impl ReferenceSample {
    /// The sample of `ids` with `pixels` of `shape` and `embeddings` of `width` values each.
    pub fn new(
        ids: Vec<String>,
        pixels: Vec<u8>,
        shape: ImageShape,
        embeddings: Vec<f32>,
        width: usize,
    ) -> Result<Self> {
        if pixels.len() != ids.len() * shape.dims() || embeddings.len() != ids.len() * width {
            return Err(Error::Internal(format!(
                "a reference sample of {} ids with {} pixel bytes and {} embedding values",
                ids.len(),
                pixels.len(),
                embeddings.len()
            )));
        }
        let mut centre = vec![0f64; width];
        for v in embeddings.chunks_exact(width.max(1)) {
            centre
                .iter_mut()
                .zip(v)
                .for_each(|(c, &x)| *c += f64::from(x));
        }
        centre
            .iter_mut()
            .for_each(|c| *c /= ids.len().max(1) as f64);
        let mut unit = Vec::with_capacity(embeddings.len());
        for v in embeddings.chunks_exact(width.max(1)) {
            unit.extend(centred_unit(v, &centre).into_iter().map(|x| x as f32));
        }
        Ok(Self {
            ids,
            pixels,
            shape,
            embeddings,
            width,
            centre,
            unit,
        })
    }

    /// Images in the sample.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// Whether the sample holds no image.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let d = self.shape.dims();
        &self.pixels[i * d..(i + 1) * d]
    }

    /// The `k` images whose embeddings are nearest `embedding` by centred cosine similarity,
    /// nearest first (ties: the earlier image). An embedding at the centre is equally far from
    /// everything.
    pub fn nearest(&self, embedding: &[f32], k: usize) -> Vec<usize> {
        assert_eq!(
            embedding.len(),
            self.width,
            "an embedding of the sample's width"
        );
        let query = centred_unit(embedding, &self.centre);
        let mut similarity: Vec<(f64, usize)> = self
            .unit
            .chunks_exact(self.width.max(1))
            .enumerate()
            .map(|(i, u)| {
                let dot: f64 = u.iter().zip(&query).map(|(&a, &b)| f64::from(a) * b).sum();
                (dot, i)
            })
            .collect();
        let k = k.min(similarity.len());
        let by_nearness =
            |a: &(f64, usize), b: &(f64, usize)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        if k < similarity.len() {
            similarity.select_nth_unstable_by(k, by_nearness);
        }
        similarity.truncate(k);
        similarity.sort_by(by_nearness);
        similarity.into_iter().map(|(_, i)| i).collect()
    }

    /// The sample as a Parquet file: `id`, `pixels` (fixed-size binary) and `embedding`
    /// (fixed-size list of float32), one row per image.
    pub fn to_parquet(&self) -> Result<Bytes> {
        let item = Arc::new(Field::new("item", DataType::Float32, false));
        let d = self.shape.dims() as i32;
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("pixels", DataType::FixedSizeBinary(d), false),
            Field::new(
                "embedding",
                DataType::FixedSizeList(Arc::clone(&item), self.width as i32),
                false,
            ),
        ]));
        let internal = |e: &dyn std::fmt::Display| {
            Error::Internal(format!("writing the reference sample: {e}"))
        };
        let pixels = FixedSizeBinaryArray::try_new(d, self.pixels.clone().into(), None)
            .map_err(|e| internal(&e))?;
        let embeddings = FixedSizeListArray::try_new(
            item,
            self.width as i32,
            Arc::new(Float32Array::from(self.embeddings.clone())),
            None,
        )
        .map_err(|e| internal(&e))?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(&self.ids)),
            Arc::new(pixels),
            Arc::new(embeddings),
        ];
        let batch = RecordBatch::try_new(Arc::clone(&schema), columns).map_err(|e| internal(&e))?;
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(ZstdLevel::default()))
            .build();
        let mut out = Vec::new();
        let mut writer =
            ArrowWriter::try_new(&mut out, schema, Some(props)).map_err(|e| internal(&e))?;
        writer.write(&batch).map_err(|e| internal(&e))?;
        writer.close().map_err(|e| internal(&e))?;
        Ok(Bytes::from(out))
    }

    /// Reads a sample written by [`Self::to_parquet`] for images of `shape` (`uri` names the
    /// file in messages), refusing one that does not fit.
    pub fn from_parquet(bytes: Bytes, shape: ImageShape, uri: &str) -> Result<Self> {
        let bad = |what: String| Error::data(uri, format!("{what}; refit the model"));
        let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
            .and_then(|b| b.build())
            .map_err(|e| Error::data_because(uri, "not a readable reference sample", e))?;
        let (mut ids, mut pixels, mut embeddings, mut width) =
            (Vec::new(), Vec::new(), Vec::new(), None);
        for batch in reader {
            let batch = batch
                .map_err(|e| Error::data_because(uri, "not a readable reference sample", e))?;
            let column = |name: &str| {
                batch
                    .column_by_name(name)
                    .cloned()
                    .ok_or_else(|| bad(format!("the reference sample has no `{name}` column")))
            };
            let (id, px, emb) = (column("id")?, column("pixels")?, column("embedding")?);
            let (Some(id), Some(px), Some(emb)) = (
                id.as_string_opt::<i32>(),
                px.as_fixed_size_binary_opt(),
                emb.as_fixed_size_list_opt(),
            ) else {
                return Err(bad("the reference sample's columns have other types".into()));
            };
            if px.value_length() as usize != shape.dims() {
                return Err(bad(format!(
                    "the reference images have {} values, the model's {}",
                    px.value_length(),
                    shape.dims()
                )));
            }
            if id.null_count() + px.null_count() + emb.null_count() > 0 {
                return Err(bad("the reference sample has nulls".into()));
            }
            width = Some(emb.value_length() as usize);
            ids.extend(id.iter().flatten().map(str::to_string));
            pixels.extend_from_slice(px.value_data());
            let values = emb
                .values()
                .as_primitive_opt::<Float32Type>()
                .ok_or_else(|| bad("the reference embeddings are not float32".into()))?;
            let start = emb.offset() * emb.value_length() as usize;
            embeddings
                .extend_from_slice(&values.values()[start..start + emb.len() * width.unwrap_or(0)]);
        }
        if embeddings.iter().any(|v| !v.is_finite()) {
            return Err(bad("the reference embeddings are not all finite".into()));
        }
        Self::new(ids, pixels, shape, embeddings, width.unwrap_or(0))
    }
}

/// `v − centre` scaled to length one (zero stays zero).
fn centred_unit(v: &[f32], centre: &[f64]) -> Vec<f64> {
    let centred: Vec<f64> = v
        .iter()
        .zip(centre)
        .map(|(&x, &c)| f64::from(x) - c)
        .collect();
    let norm = centred.iter().map(|x| x * x).sum::<f64>().sqrt();
    let scale = if norm > 0.0 { 1.0 / norm } else { 0.0 };
    centred.into_iter().map(|x| x * scale).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn sample(n: usize, width: usize, seed: u64) -> ReferenceSample {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let shape = ImageShape::new(2, 3, 1);
        ReferenceSample::new(
            (0..n).map(|i| format!("ref-{i}")).collect(),
            (0..n * 6).map(|_| rng.random()).collect(),
            shape,
            (0..n * width)
                .map(|_| rng.random_range(-1.0..1.0))
                .collect(),
            width,
        )
        .unwrap()
    }

    /// The nearest images are the true nearest by cosine after centring on the sample's mean,
    /// found by brute force in f64 over the raw (unnormalized) embeddings.
    #[test]
    fn the_nearest_images_are_the_brute_force_nearest() {
        let s = sample(300, 7, 1);
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2);
        for _ in 0..50 {
            let q: Vec<f32> = (0..7).map(|_| rng.random_range(-1.0..1.0)).collect();
            let mean: Vec<f64> = (0..7)
                .map(|j| {
                    (0..300)
                        .map(|i| f64::from(s.embeddings[i * 7 + j]))
                        .sum::<f64>()
                        / 300.0
                })
                .collect();
            let centred = |v: &[f32]| -> Vec<f64> {
                v.iter()
                    .zip(&mean)
                    .map(|(&x, m)| f64::from(x) - m)
                    .collect()
            };
            let cosine = |i: usize| {
                let (e, q) = (centred(&s.embeddings[i * 7..(i + 1) * 7]), centred(&q));
                let dot: f64 = e.iter().zip(&q).map(|(a, b)| a * b).sum();
                let n = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
                dot / (n(&e) * n(&q))
            };
            let mut all: Vec<usize> = (0..300).collect();
            all.sort_by(|&a, &b| cosine(b).total_cmp(&cosine(a)));
            assert_eq!(s.nearest(&q, NEAREST), all[..NEAREST].to_vec());
        }
        // An image's own embedding is nearest itself.
        assert_eq!(s.nearest(&s.embeddings[70..77], 1), vec![10]);
        let flat = ReferenceSample::new(
            vec!["a".into(), "b".into()],
            vec![0; 12],
            ImageShape::new(2, 3, 1),
            vec![0.5; 14],
            7,
        )
        .unwrap();
        assert_eq!(
            flat.nearest(&[0.5; 7], 2),
            vec![0, 1],
            "all at the centre: ties, by index"
        );
        assert_eq!(sample(2, 7, 3).nearest(&[1.0; 7], 5).len(), 2);
    }

    #[test]
    fn the_sample_round_trips_through_parquet_and_refuses_another_shape() {
        let s = sample(40, 5, 4);
        let bytes = s.to_parquet().unwrap();
        let back = ReferenceSample::from_parquet(bytes.clone(), s.shape, "r.parquet").unwrap();
        assert_eq!(back, s);
        let e = ReferenceSample::from_parquet(bytes, ImageShape::new(3, 3, 1), "r.parquet")
            .unwrap_err();
        assert!(e.to_string().contains("6 values, the model's 9"), "{e}");
        let e = ReferenceSample::from_parquet(Bytes::from_static(b"PAR1"), s.shape, "r.parquet")
            .unwrap_err();
        assert!(e.to_string().contains("r.parquet"), "{e}");
    }

    /// The reservoir keeps the same images whatever order they come in, and no more than asked.
    #[test]
    fn the_reservoir_is_bounded_and_independent_of_the_read_order() {
        let images: Vec<(String, Vec<u8>)> = (0..500)
            .map(|i| (format!("img-{i}"), vec![i as u8; 4]))
            .collect();
        let mut forward = Reservoir::new(50, 9);
        images.iter().for_each(|(id, px)| forward.offer(id, px));
        let mut backward = Reservoir::new(50, 9);
        images
            .iter()
            .rev()
            .for_each(|(id, px)| backward.offer(id, px));
        let (ids, pixels) = forward.into_images();
        assert_eq!(ids.len(), 50);
        assert_eq!((ids.clone(), pixels.clone()), backward.into_images());
        for (id, px) in ids.iter().zip(pixels.chunks(4)) {
            let i: usize = id[4..].parse().unwrap();
            assert_eq!(px, &[i as u8; 4][..], "pixels stay with their id");
        }
        let mut other = Reservoir::new(50, 10);
        images.iter().for_each(|(id, px)| other.offer(id, px));
        assert_ne!(other.into_images().0, ids, "the seed picks the sample");
    }
}
