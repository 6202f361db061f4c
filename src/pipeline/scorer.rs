//! The anomaly score of an image under a fitted model, by `score.method`:
//!
//! - `nll`: −log p(x);
//! - `likelihood_ratio`: −log p(x) + log p_bg(x), where the background model was fitted on
//!   corrupted images (or is a simpler kind) and so explains what is merely generic about an
//!   image — low-level statistics, smoothness — leaving the ratio to measure what is specific
//!   to the training data (Ren et al. 2019);
//! - `complexity`: −log p(x) − L(x), with L(x) the PNG-compressed length in nats, since simple
//!   images get high likelihood under any model (Serrà et al. 2020).
//!
//! Fitting (for the calibration scores) and scoring both go through [`Scorer`], so a model's
//! threshold and its run's scores are in the same units.

use ndarray::ArrayView2;
use rayon::prelude::*;

use super::fit::nll_scores;
use crate::config::ScoreMethod;
use crate::data::ImageShape;
use crate::error::{Error, Result};
use crate::io::png;
use crate::models::DensityModel;

/// Computes scores for one model (and its background).
#[derive(Debug, Clone, Copy)]
pub struct Scorer<'a> {
    /// The score method.
    pub method: ScoreMethod,
    /// The fitted model.
    pub model: &'a dyn DensityModel,
    /// Its background, for `likelihood_ratio`.
    pub background: Option<&'a dyn DensityModel>,
}

/// NLL and score of a batch of images.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// −log p(x) in nats under the model.
    pub nll: Vec<f64>,
    /// The anomaly score (higher is more anomalous), in nats.
    pub score: Vec<f64>,
}

impl Scorer<'_> {
    /// Scores every row of `images` (preprocessed pixels).
    pub fn scores(&self, images: ArrayView2<'_, u8>) -> Result<Scores> {
        let nll = nll_scores(self.model, images)?;
        let score = match self.method {
            ScoreMethod::Nll => nll.clone(),
            ScoreMethod::LikelihoodRatio => {
                let background = self.background.ok_or_else(|| {
                    Error::Internal("a likelihood-ratio score without a background model".into())
                })?;
                let bg = nll_scores(background, images)?;
                nll.iter().zip(&bg).map(|(m, b)| m - b).collect()
            }
            ScoreMethod::Complexity => {
                let shape = self.model.shape();
                let levels = self.model.levels();
                let lengths = images
                    .outer_iter()
                    .into_par_iter()
                    .map(|row| {
                        let pixels = row.as_slice().expect("contiguous rows");
                        png::compressed_len(pixels, shape, levels)
                    })
                    .collect::<Result<Vec<usize>>>()?;
                nll.iter()
                    .zip(lengths)
                    .map(|(n, len)| n - complexity_nats(len))
                    .collect()
            }
        };
        Ok(Scores { nll, score })
    }
}

/// A compressed length in bytes, in nats.
pub fn complexity_nats(bytes: usize) -> f64 {
    bytes as f64 * 8.0 * std::f64::consts::LN_2
}

/// The complexity of one image, L(x) in nats (see [`png::compressed_len`]).
pub fn complexity(pixels: &[u8], shape: ImageShape, levels: u16) -> Result<f64> {
    Ok(complexity_nats(png::compressed_len(pixels, shape, levels)?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::TrainingSet;
    use crate::models::bernoulli::Bernoulli;
    use ndarray::Array2;

    fn model() -> Bernoulli {
        let pixels = Array2::from_shape_fn((50, 16), |(i, j)| u8::from((i + j) % 3 == 0));
        let data = TrainingSet {
            shape: ImageShape::new(4, 4, 1),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
        };
        Bernoulli::fit(1.0, &data)
    }

    #[test]
    fn a_model_against_itself_scores_zero() {
        let m = model();
        let images = Array2::from_shape_fn((9, 16), |(i, j)| u8::from((i * j) % 5 == 1));
        let s = Scorer {
            method: ScoreMethod::LikelihoodRatio,
            model: &m,
            background: Some(&m),
        }
        .scores(images.view())
        .unwrap();
        assert!(s.score.iter().all(|&v| v == 0.0), "{:?}", s.score);
        assert!(s.nll.iter().all(|&v| v > 0.0));
    }

    #[test]
    fn the_complexity_score_of_a_constant_image_is_its_nll_minus_its_png_length() {
        let m = model();
        let images = Array2::<u8>::zeros((1, 16));
        let s = Scorer {
            method: ScoreMethod::Complexity,
            model: &m,
            background: None,
        }
        .scores(images.view())
        .unwrap();
        let length = complexity(&[0u8; 16], ImageShape::new(4, 4, 1), 2).unwrap();
        assert!(
            length > 0.0 && length < complexity_nats(100),
            "L = {length} nats"
        );
        assert_eq!(s.score[0], s.nll[0] - length);
    }
}
