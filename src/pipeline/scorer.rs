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
//! Fitting (for the calibration scores) and scoring both go through [`Scorer::mean_scores`], so
//! a model's threshold and its run's scores are in the same units — including the same number
//! of stochastic binarizations averaged (`preprocess.draws`).

use ndarray::ArrayView2;
use rayon::prelude::*;

use crate::config::ScoreMethod;
use crate::data::ImageShape;
use crate::data::preprocess::Preprocessor;
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

/// NLL and score of a batch of images, and their embeddings when asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    /// −log p(x) in nats under the model.
    pub nll: Vec<f64>,
    /// The anomaly score (higher is more anomalous), in nats.
    pub score: Vec<f64>,
    /// Each image's embedding under the model (images × its width), when asked for.
    pub embeddings: Option<Vec<f32>>,
}

impl Scorer<'_> {
    /// Scores every row of `images` (preprocessed pixels).
    pub fn scores(&self, images: ArrayView2<'_, u8>) -> Result<Scores> {
        self.scores_embedding(images, false)
    }

    /// Scores every row of `images`, and with `embed` also embeds it under the model, in the
    /// same pass.
    fn scores_embedding(&self, images: ArrayView2<'_, u8>, embed: bool) -> Result<Scores> {
        let (nll, embeddings) = nll_and_embeddings(self.model, images, embed)?;
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
        Ok(Scores {
            nll,
            score,
            embeddings,
        })
    }

    /// Scores every row of `raw` (8-bit intensities; row i is the image whose id is `ids[i]`)
    /// as the mean, over `preprocess`'s draws, of the scores of its binarizations. With one
    /// draw this is exactly [`Self::scores`] of the preprocessed images.
    pub fn mean_scores<S: AsRef<str> + Sync>(
        &self,
        preprocess: &Preprocessor,
        ids: &[S],
        raw: ArrayView2<'_, u8>,
    ) -> Result<Scores> {
        self.mean_over_draws(preprocess, ids, raw, false)
    }

    /// [`Self::mean_scores`] with each image's embedding, also the mean over the draws.
    pub fn mean_scores_and_embeddings<S: AsRef<str> + Sync>(
        &self,
        preprocess: &Preprocessor,
        ids: &[S],
        raw: ArrayView2<'_, u8>,
    ) -> Result<Scores> {
        self.mean_over_draws(preprocess, ids, raw, true)
    }

    fn mean_over_draws<S: AsRef<str> + Sync>(
        &self,
        preprocess: &Preprocessor,
        ids: &[S],
        raw: ArrayView2<'_, u8>,
        embed: bool,
    ) -> Result<Scores> {
        let draws = preprocess.draws();
        let mut total = self.scores_embedding(preprocess.draw(0, ids, raw).view(), embed)?;
        for draw in 1..draws {
            let s = self.scores_embedding(preprocess.draw(draw, ids, raw).view(), embed)?;
            total.nll.iter_mut().zip(s.nll).for_each(|(t, v)| *t += v);
            total
                .score
                .iter_mut()
                .zip(s.score)
                .for_each(|(t, v)| *t += v);
            if let (Some(t), Some(e)) = (total.embeddings.as_mut(), s.embeddings) {
                t.iter_mut().zip(e).for_each(|(t, v)| *t += v);
            }
        }
        if draws > 1 {
            let n = draws as f64;
            total.nll.iter_mut().for_each(|t| *t /= n);
            total.score.iter_mut().for_each(|t| *t /= n);
            if let Some(t) = total.embeddings.as_mut() {
                t.iter_mut().for_each(|t| *t /= draws as f32);
            }
        }
        Ok(total)
    }
}

/// The per-pixel map of one image whose id is `id`, from its 8-bit intensities `raw`: −log of
/// each sub-pixel's conditional under `model`, averaged over `preprocess`'s draws.
pub fn pixel_nll_map(
    model: &dyn DensityModel,
    preprocess: &Preprocessor,
    id: &str,
    raw: &[u8],
) -> Vec<f32> {
    let draws = preprocess.draws();
    let mut map = vec![0f32; raw.len()];
    let mut image = vec![0u8; raw.len()];
    let mut one = vec![0f32; raw.len()];
    for draw in 0..draws {
        image.copy_from_slice(raw);
        preprocess.apply_draw(draw, id, &mut image);
        model.pixel_log_likelihood(&image, &mut one);
        map.iter_mut().zip(&one).for_each(|(m, v)| *m -= v);
    }
    if draws > 1 {
        map.iter_mut().for_each(|m| *m /= draws as f32);
    }
    map
}

/// A compressed length in bytes, in nats.
pub fn complexity_nats(bytes: usize) -> f64 {
    bytes as f64 * 8.0 * std::f64::consts::LN_2
}

/// The complexity of one image, L(x) in nats (see [`png::compressed_len`]).
pub fn complexity(pixels: &[u8], shape: ImageShape, levels: u16) -> Result<f64> {
    Ok(complexity_nats(png::compressed_len(pixels, shape, levels)?))
}

/// The configuration error of embedding with `model` (named `which` in the message), whose
/// family has no hidden representation.
pub fn no_embedding(model: &dyn DensityModel, which: &str) -> Error {
    Error::setting(
        "sink.embeddings",
        format!(
            "{which} is a `{}`, which has no hidden representation to embed images with: score with a model of {}, or set `sink.embeddings = false`",
            model.kind(),
            crate::models::families::with_embedding().join(", ")
        ),
    )
}

/// −log p(x) for every row, checked to be finite.
pub fn nll_scores(model: &dyn DensityModel, images: ArrayView2<'_, u8>) -> Result<Vec<f64>> {
    Ok(nll_and_embeddings(model, images, false)?.0)
}

/// −log p(x) for every row and, with `embed`, every row's embedding from the same pass (rows ×
/// the model's embedding width), all checked to be finite.
pub fn nll_and_embeddings(
    model: &dyn DensityModel,
    images: ArrayView2<'_, u8>,
    embed: bool,
) -> Result<(Vec<f64>, Option<Vec<f32>>)> {
    let mut ll = vec![0.0; images.nrows()];
    let embeddings = if embed {
        let embedder = model
            .embedder()
            .ok_or_else(|| no_embedding(model, "the model"))?;
        let mut e = vec![0f32; images.nrows() * embedder.embedding_width()];
        embedder.log_likelihood_and_embedding(images, &mut ll, &mut e);
        if let Some(bad) = e.par_iter().position_any(|v| !v.is_finite()) {
            return Err(Error::Internal(format!(
                "the {} model gave a non-finite embedding value {} (value {bad} of the batch)",
                model.kind(),
                e[bad]
            )));
        }
        Some(e)
    } else {
        model.log_likelihood_batch(images, &mut ll);
        None
    };
    if let Some(bad) = ll.par_iter().position_any(|v| !v.is_finite()) {
        return Err(Error::Internal(format!(
            "the {} model gave log-likelihood {} to image {bad}",
            model.kind(),
            ll[bad]
        )));
    }
    Ok((ll.into_iter().map(|v| -v).collect(), embeddings))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::bernoulli::Bernoulli;
    use crate::train::TrainingSet;
    use ndarray::Array2;

    fn model() -> Bernoulli {
        let pixels = Array2::from_shape_fn((50, 16), |(i, j)| u8::from((i + j) % 3 == 0));
        let data = TrainingSet {
            shape: ImageShape::new(4, 4, 1),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
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
    fn scores_and_maps_over_draws_are_the_means_of_each_draws() {
        use crate::config::{Binarize, PreprocessConfig};
        let m = model();
        let preprocess = Preprocessor::new(PreprocessConfig {
            binarize: Binarize::Stochastic,
            threshold: 128,
            seed: 9,
            draws: 3,
        });
        // 7 images (an odd count) of intermediate intensities, so that draws differ.
        let raw = Array2::from_shape_fn((7, 16), |(i, j)| ((i * 31 + j * 57) % 256) as u8);
        let ids = ["a", "b", "c", "d", "e", "f", "g"];
        let scorer = Scorer {
            method: ScoreMethod::Complexity,
            model: &m,
            background: None,
        };
        let got = scorer.mean_scores(&preprocess, &ids, raw.view()).unwrap();
        // The reference: binarize each image by hand per draw, score it alone, average.
        for (i, id) in ids.iter().enumerate() {
            let (mut nll, mut score) = (0.0, 0.0);
            for draw in 0..3 {
                let mut image = raw.row(i).to_vec();
                preprocess.apply_draw(draw, id, &mut image);
                let one = Array2::from_shape_vec((1, 16), image).unwrap();
                let s = scorer.scores(one.view()).unwrap();
                nll += s.nll[0] / 3.0;
                score += s.score[0] / 3.0;
            }
            assert!(
                (got.nll[i] - nll).abs() < 1e-9,
                "image {i}: {} vs {nll}",
                got.nll[i]
            );
            assert!((got.score[i] - score).abs() < 1e-9, "image {i}");
            // The map is per sub-pixel and sums to the image's (mean) NLL.
            let map = pixel_nll_map(&m, &preprocess, id, raw.row(i).as_slice().unwrap());
            let total: f64 = map.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (total - nll).abs() < 1e-4 * nll,
                "image {i}: map {total} vs {nll}"
            );
        }
        let one_draw = Preprocessor::new(PreprocessConfig {
            draws: 1,
            ..preprocess.config().clone()
        });
        let first = scorer.mean_scores(&one_draw, &ids, raw.view()).unwrap();
        assert_ne!(
            first.nll, got.nll,
            "three draws average to something else than one"
        );
        let drawn = one_draw.draw(0, &ids, raw.view());
        assert_eq!(first, scorer.scores(drawn.view()).unwrap());
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
