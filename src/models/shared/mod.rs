//! Helpers that more than one family uses: orderings and contexts, the logistic function, the
//! stored `order` tensor, initial logits at the pixel means, uniform draws, chunked scoring and
//! value counts.

pub mod logistic;
pub mod ordering;

use ndarray::ArrayView2;
use rand::RngCore;
use rayon::prelude::*;

use super::{ModelError, NamedTensor};
use crate::train::TrainingSet;

/// A uniform draw from [0, 1) with 53 random bits.
pub fn uniform(rng: &mut dyn RngCore) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// The `order` tensor: position i holds the sub-pixel index modelled i-th.
pub fn order_tensor(order: &[usize]) -> NamedTensor {
    NamedTensor {
        name: "order".into(),
        shape: vec![order.len()],
        data: order.iter().map(|&o| o as f64).collect(),
    }
}

/// Reads a stored ordering, checking that it is a permutation of 0..len.
pub fn permutation(values: &[f64]) -> Result<Vec<usize>, ModelError> {
    let d = values.len();
    let mut seen = vec![false; d];
    values
        .iter()
        .map(|&v| {
            let idx = v as usize;
            if v.fract() != 0.0 || v < 0.0 || idx >= d || std::mem::replace(&mut seen[idx], true) {
                Err(ModelError::invalid(
                    "tensor `order` is not a permutation of the sub-pixels",
                ))
            } else {
                Ok(idx)
            }
        })
        .collect()
}

/// The stored `order` tensor of D sub-pixels, checked to be a permutation.
pub fn stored_order(tensors: &[NamedTensor], d: usize) -> Result<Vec<usize>, ModelError> {
    permutation(tensor(tensors, "order", d)?)
}

/// For each position of `order`, the logit of how often its sub-pixel is on in `pixels`
/// (Laplace-smoothed): where a binary model's output biases start, so that training begins at
/// the independent-pixel model.
pub fn logits_at_pixel_means(pixels: ArrayView2<'_, u8>, order: &[usize]) -> Vec<f32> {
    let n = pixels.nrows() as f64;
    order
        .iter()
        .map(|&o| {
            let on = pixels.column(o).iter().filter(|&&v| v != 0).count() as f64;
            let p = (on + 1.0) / (n + 2.0);
            (p / (1.0 - p)).ln() as f32
        })
        .collect()
}

/// log p(x) of a binary image under a chain rule over `order`: Σ_i log σ(±z_i), where
/// `logit(i)` is the logit of position i given the earlier sub-pixels and the sign is + when
/// the sub-pixel is on. Each term is also written to `out[o(i)]` when `out` is given.
pub fn binary_chain_log_likelihood(
    order: &[usize],
    image: &[u8],
    mut out: Option<&mut [f32]>,
    mut logit: impl FnMut(usize) -> f64,
) -> f64 {
    let mut total = 0.0;
    for (i, &d) in order.iter().enumerate() {
        let z = logit(i);
        let ll = logistic::log_sigmoid(if image[d] != 0 { z } else { -z });
        if let Some(out) = out.as_deref_mut() {
            out[d] = ll as f32;
        }
        total += ll;
    }
    total
}

/// Scores `images` into `out` in chunks of `rows` images per rayon task, so that a tiled kernel
/// shares each weight row across the images of a chunk; `score(chunk, out)` fills one chunk.
pub fn score_in_chunks(
    images: ArrayView2<'_, u8>,
    out: &mut [f64],
    rows: usize,
    score: impl Fn(ArrayView2<'_, u8>, &mut [f64]) + Sync,
) {
    out.par_chunks_mut(rows)
        .zip(
            images
                .axis_chunks_iter(ndarray::Axis(0), rows)
                .into_par_iter(),
        )
        .for_each(|(out, chunk)| score(chunk, out));
}

/// [`score_in_chunks`] that also fills each image's embedding (`width` values per image, rows of
/// `embeddings`): `score(chunk, out, embeddings)` fills one chunk of both.
pub fn embed_in_chunks(
    images: ArrayView2<'_, u8>,
    out: &mut [f64],
    embeddings: &mut [f32],
    width: usize,
    rows: usize,
    score: impl Fn(ArrayView2<'_, u8>, &mut [f64], &mut [f32]) + Sync,
) {
    assert_eq!(embeddings.len(), images.nrows() * width);
    out.par_chunks_mut(rows)
        .zip(embeddings.par_chunks_mut(rows * width.max(1)))
        .zip(
            images
                .axis_chunks_iter(ndarray::Axis(0), rows)
                .into_par_iter(),
        )
        .for_each(|((out, embeddings), chunk)| score(chunk, out, embeddings));
}

/// The first value whose cumulative probability exceeds `u` ∈ [0, 1), for `probabilities` of
/// values 0, 1, …; the last value takes whatever rounding leaves over.
pub fn inverse_cdf(probabilities: impl ExactSizeIterator<Item = f64>, u: f64) -> u8 {
    let last = probabilities.len().saturating_sub(1);
    let mut cdf = 0.0;
    for (v, p) in probabilities.enumerate() {
        cdf += p;
        if u < cdf {
            return v as u8;
        }
    }
    last as u8
}

/// How often each pixel takes each value: `counts[d * levels + v]`, counted in parallel over
/// images (values at or above `levels` count as `levels - 1`).
pub fn value_counts(data: &TrainingSet<'_>) -> Vec<u64> {
    let k = data.levels as usize;
    let size = data.shape.dims() * k;
    data.pixels
        .axis_iter(ndarray::Axis(0))
        .into_par_iter()
        .fold(
            || vec![0u64; size],
            |mut acc, row| {
                for (d, &x) in row.iter().enumerate() {
                    acc[d * k + usize::from(x).min(k - 1)] += 1;
                }
                acc
            },
        )
        .reduce(
            || vec![0u64; size],
            |mut a, b| {
                a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                a
            },
        )
}

/// Finds tensor `name` with `len` values.
pub fn tensor<'a>(
    tensors: &'a [NamedTensor],
    name: &str,
    len: usize,
) -> Result<&'a [f64], ModelError> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| ModelError::MissingTensor { name: name.into() })?;
    if t.data.len() != len || t.shape.iter().product::<usize>() != len {
        return Err(ModelError::TensorSize {
            name: name.into(),
            shape: t.shape.clone(),
            values: t.data.len(),
            expected: len,
        });
    }
    Ok(&t.data)
}
