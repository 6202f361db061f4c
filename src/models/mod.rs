//! Density models p(x) behind one trait, and the registry that fits or loads them by kind.
//!
//! A model scores an image by its exact log-likelihood log p(x) = Σ_d log p(x_d | x_<d) (in
//! nats), explains the score pixel by pixel, and can draw new images. Adding a model is adding a
//! file here and a line in [`fit`] and [`from_tensors`].

pub mod ar;
pub mod ar_mixture;
pub mod artifact;
pub mod bernoulli;
pub mod categorical;
pub mod fvsbn;
pub mod logistic;
pub mod nade;
pub mod ordering;
pub mod rnade;

use ndarray::{Array2, ArrayView2};
use rand::RngCore;
use rayon::prelude::*;

use crate::config::{ModelConfig, ModelKind, TrainConfig};
use crate::data::ImageShape;
use crate::data::preprocess::Preprocessor;
use crate::error::{Error, Result};
use crate::pipeline::progress::Progress;
use crate::train::{EpochRecord, TrainSettings};

/// A fitted density model over images of one shape whose pixels take `levels()` values.
///
/// Invariants: `shape().dims()` is D for every image passed in; pixel values are below
/// `levels()`; the per-pixel log-likelihoods sum to the image's log-likelihood; Σ_x p(x) = 1 over
/// all `levels()^D` images.
pub trait DensityModel: Send + Sync + std::fmt::Debug {
    /// The model family.
    fn kind(&self) -> ModelKind;

    /// The image shape the model was fitted on.
    fn shape(&self) -> ImageShape;

    /// Values a pixel takes: 2 (binary) or 256 (8-bit).
    fn levels(&self) -> u16;

    /// Writes log p(x_d | x_<d) for every value of `image` into `out` (both D long), and returns
    /// their sum, log p(x), accumulated in f64.
    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64;

    /// log p(x) in nats for one image of D values.
    fn log_likelihood(&self, image: &[u8]) -> f64;

    /// Draws one image from p(x) into `out` (D values).
    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]);

    /// The hyper-parameters the model was fitted with, for model.json.
    fn hyperparameters(&self) -> serde_json::Value;

    /// The learned parameters, by name, for model.safetensors.
    fn tensors(&self) -> Vec<NamedTensor>;

    /// log p(x) for each row of `images` into `out`; parallel over images.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        out.par_iter_mut()
            .zip(images.axis_iter(ndarray::Axis(0)).into_par_iter())
            .for_each(|(o, row)| {
                *o = self.log_likelihood(row.as_slice().expect("rows are contiguous"));
            });
    }
}

/// A named f64 tensor of model parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Its name in the safetensors file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f64>,
}

/// The images a model is fitted on: preprocessed pixels, one row per image.
#[derive(Debug, Clone)]
pub struct TrainingSet<'a> {
    /// Shape of every image.
    pub shape: ImageShape,
    /// Values a pixel takes after preprocessing.
    pub levels: u16,
    /// One row per image.
    pub pixels: ArrayView2<'a, u8>,
    /// Held-out images (same layout) for early stopping; may have no rows.
    pub validation: ArrayView2<'a, u8>,
    /// With `train.rebinarize`: where each epoch's fresh binarization of `pixels` comes from.
    /// Models fitted in closed form ignore it and fit `pixels`.
    pub redraw: Option<Redraw<'a>>,
}

/// The training images as 8-bit intensities and the stochastic binarization that draws them
/// anew for every epoch (`train.rebinarize`).
///
/// Invariant: `raw` has one row per id, in the order of [`TrainingSet::pixels`], and draw 0
/// of it is `pixels`.
#[derive(Debug, Clone, Copy)]
pub struct Redraw<'a> {
    /// The binarization (`preprocess.binarize = "stochastic"`).
    pub preprocess: &'a Preprocessor,
    /// The training images' ids, which seed their coins.
    pub ids: &'a [String],
    /// The training images' 8-bit intensities.
    pub raw: ArrayView2<'a, u8>,
}

impl Redraw<'_> {
    /// The training images of epoch `epoch` (1-based): draw `epoch − 1`, so that epoch 1 sees
    /// the binarization the set's `pixels` hold and every later epoch a fresh one.
    pub fn epoch(&self, epoch: u32) -> Array2<u8> {
        let draw = epoch.saturating_sub(1) as usize;
        self.preprocess.draw(draw, self.ids, self.raw).into_owned()
    }
}

/// A fitted model and, for models trained by gradient, its training curve.
#[derive(Debug)]
pub struct Fitted {
    /// The model.
    pub model: Box<dyn DensityModel>,
    /// One record per epoch (empty for models fitted in closed form).
    pub curve: Vec<EpochRecord>,
}

/// Fits the model `config.kind` on `data`; `train.seed` fixes anything random.
pub fn fit(
    config: &ModelConfig,
    train: &TrainConfig,
    data: &TrainingSet<'_>,
    progress: &Progress,
) -> Result<Fitted> {
    let seed = train.seed;
    if data.pixels.nrows() == 0 {
        return Err(Error::data(
            "source",
            "no images to fit on: every row was rejected or held out",
        ));
    }
    if config.kind.needs_binary_pixels() && data.levels != 2 {
        return Err(Error::config(
            "model.kind",
            format!(
                "`{}` needs binary pixels: set preprocess.binarize to \"threshold\" or \"stochastic\"",
                config.kind.name()
            ),
        ));
    }
    if config.kind.needs_intensities() && data.levels != 256 {
        return Err(Error::config(
            "model.kind",
            format!(
                "`{}` models 8-bit intensities: set preprocess.binarize = \"none\"",
                config.kind.name()
            ),
        ));
    }
    let closed = |model: Box<dyn DensityModel>| Fitted {
        model,
        curve: Vec::new(),
    };
    Ok(match config.kind {
        ModelKind::Bernoulli => closed(Box::new(bernoulli::Bernoulli::fit(config.alpha, data))),
        ModelKind::Categorical => {
            closed(Box::new(categorical::Categorical::fit(config.alpha, data)?))
        }
        ModelKind::Ar if data.levels > 2 => {
            let (model, curve) = ar_mixture::ArMixture::fit(
                ar_mixture::ArMixtureParams {
                    k: config.k,
                    order: config.order,
                    context: config.context,
                    components: config.components,
                    seed,
                },
                data,
                &train_settings(train),
                progress,
            )?;
            Fitted {
                model: Box::new(model),
                curve,
            }
        }
        ModelKind::Ar => closed(Box::new(ar::Ar::fit(
            ar::ArParams {
                k: config.k,
                order: config.order,
                context: config.context,
                l2: config.l2,
                seed,
            },
            data,
        )?)),
        ModelKind::Fvsbn => {
            let (model, curve) =
                fvsbn::Fvsbn::fit(config.order, seed, data, &train_settings(train), progress);
            Fitted {
                model: Box::new(model),
                curve,
            }
        }
        ModelKind::Rnade => {
            let (model, curve) = rnade::Rnade::fit(
                rnade::RnadeParams {
                    hidden: config.hidden,
                    components: config.components,
                    order: config.order,
                    seed,
                },
                data,
                &train_settings(train),
                progress,
            )?;
            Fitted {
                model: Box::new(model),
                curve,
            }
        }
        ModelKind::Nade => {
            let (model, curve) = nade::Nade::fit(
                config.hidden,
                config.order,
                seed,
                data,
                &train_settings(train),
                progress,
            );
            Fitted {
                model: Box::new(model),
                curve,
            }
        }
    })
}

/// The `[train]` settings of the models trained by gradient.
fn train_settings(train: &TrainConfig) -> TrainSettings {
    TrainSettings {
        epochs: train.epochs,
        batch_size: train.batch_size,
        learning_rate: train.learning_rate,
        patience: train.patience,
        anneal: train.anneal,
        weight_decay: train.weight_decay,
        seed: train.seed,
    }
}

/// Rebuilds a model of `kind` from its stored parameters; errors describe what does not fit.
pub fn from_tensors(
    kind: ModelKind,
    shape: ImageShape,
    levels: u16,
    hyperparameters: &serde_json::Value,
    tensors: &[NamedTensor],
) -> std::result::Result<Box<dyn DensityModel>, String> {
    Ok(match kind {
        ModelKind::Bernoulli => Box::new(bernoulli::Bernoulli::from_tensors(
            shape,
            hyperparameters,
            tensors,
        )?),
        ModelKind::Categorical => Box::new(categorical::Categorical::from_tensors(
            shape,
            levels,
            hyperparameters,
            tensors,
        )?),
        ModelKind::Ar if levels > 2 => Box::new(ar_mixture::ArMixture::from_tensors(
            shape,
            levels,
            hyperparameters,
            tensors,
        )?),
        ModelKind::Ar => Box::new(ar::Ar::from_tensors(shape, hyperparameters, tensors)?),
        ModelKind::Fvsbn => Box::new(fvsbn::Fvsbn::from_tensors(shape, hyperparameters, tensors)?),
        ModelKind::Nade => Box::new(nade::Nade::from_tensors(shape, hyperparameters, tensors)?),
        ModelKind::Rnade => Box::new(rnade::Rnade::from_tensors(
            shape,
            levels,
            hyperparameters,
            tensors,
        )?),
    })
}

/// log p(x) of a binary image under a chain rule over `order`: Σ_i log σ(±z_i), where
/// `logit(i)` is the logit of position i given the earlier sub-pixels and the sign is + when
/// the sub-pixel is on. Each term is also written to `out[o(i)]` when `out` is given.
pub(crate) fn binary_chain_log_likelihood(
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
pub(crate) fn score_in_chunks(
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
fn tensor<'a>(
    tensors: &'a [NamedTensor],
    name: &str,
    len: usize,
) -> std::result::Result<&'a [f64], String> {
    let t = tensors
        .iter()
        .find(|t| t.name == name)
        .ok_or_else(|| format!("tensor `{name}` is missing"))?;
    if t.data.len() != len || t.shape.iter().product::<usize>() != len {
        return Err(format!(
            "tensor `{name}` has shape {:?} ({} values), expected {len} values",
            t.shape,
            t.data.len()
        ));
    }
    Ok(&t.data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array2;

    #[test]
    fn binary_models_refuse_8bit_pixels() {
        let pixels = Array2::<u8>::zeros((1, 4));
        let data = TrainingSet {
            shape: ImageShape::new(2, 2, 1),
            levels: 256,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        for kind in [ModelKind::Bernoulli, ModelKind::Fvsbn, ModelKind::Nade] {
            let config = ModelConfig {
                kind,
                ..ModelConfig::default()
            };
            let e = fit(&config, &TrainConfig::default(), &data, &Progress::hidden()).unwrap_err();
            assert_eq!(e.exit_code(), 78, "{kind:?}: {e}");
        }
        let config = ModelConfig {
            kind: ModelKind::Categorical,
            ..ModelConfig::default()
        };
        assert!(fit(&config, &TrainConfig::default(), &data, &Progress::hidden()).is_ok());
    }
}

/// Test helpers shared by every model's tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    /// Every image of D pixels with `levels` values, in lexicographic order.
    pub fn all_images(dims: usize, levels: u16) -> Vec<Vec<u8>> {
        let total = (levels as usize).pow(dims as u32);
        (0..total)
            .map(|mut k| {
                (0..dims)
                    .map(|_| {
                        let v = (k % levels as usize) as u8;
                        k /= levels as usize;
                        v
                    })
                    .collect()
            })
            .collect()
    }

    /// Σ over all images of p(x), summed in f64.
    pub fn total_probability(model: &dyn DensityModel) -> f64 {
        all_images(model.shape().dims(), model.levels())
            .iter()
            .map(|x| model.log_likelihood(x).exp())
            .sum()
    }

    /// Draws `n` images and checks their histogram against the exact p(x) of every image with a
    /// chi-square test at the 99.9th percentile (Wilson–Hilferty), so a sampler that disagrees
    /// with the likelihood fails. For small D only: every image is a category.
    pub fn assert_samples_follow_the_model(model: &dyn DensityModel, n: u32, seed: u64) {
        use rand::SeedableRng;
        let (dims, levels) = (model.shape().dims(), usize::from(model.levels()));
        let index = |x: &[u8]| x.iter().rev().fold(0, |k, &v| k * levels + usize::from(v));
        let images = all_images(dims, model.levels());
        let mut counts = vec![0u32; images.len()];
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut img = vec![0u8; dims];
        for _ in 0..n {
            model.sample(&mut rng, &mut img);
            counts[index(&img)] += 1;
        }
        let chi2: f64 = images
            .iter()
            .map(|x| {
                let expected = f64::from(n) * model.log_likelihood(x).exp();
                (f64::from(counts[index(x)]) - expected).powi(2) / expected
            })
            .sum();
        let dof = (images.len() - 1) as f64;
        let q = 2.0 / (9.0 * dof);
        let critical = dof * (1.0 - q + 3.09 * q.sqrt()).powi(3);
        assert!(
            chi2 < critical,
            "chi-square {chi2} ≥ {critical} ({dof} degrees of freedom)"
        );
    }

    /// `n` binary images of `d` pixels in which each pixel copies its predecessor with
    /// probability 0.9: far more likely under a chain rule than under independent pixels.
    pub fn sticky_chains(n: usize, d: usize, seed: u64) -> ndarray::Array2<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut x = ndarray::Array2::<u8>::zeros((n, d));
        for mut row in x.rows_mut() {
            let mut prev = rng.random_bool(0.5);
            for v in row.iter_mut() {
                prev = if rng.random_bool(0.9) { prev } else { !prev };
                *v = u8::from(prev);
            }
        }
        x
    }

    /// `n` one-pixel RGB images with R uniform on 20..236, G = R and B = 255 − G: G and B are
    /// certain given their predecessors in R, G, B order.
    pub fn copied_channels(n: usize, seed: u64) -> ndarray::Array2<u8> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let mut v = Vec::with_capacity(n * 3);
        for _ in 0..n {
            let r: u8 = rng.random_range(20..236);
            v.extend([r, r, 255 - r]);
        }
        ndarray::Array2::from_shape_vec((n, 3), v).unwrap()
    }

    /// Mean −log p(x_c | x_<c) of each channel over one-pixel RGB images.
    pub fn per_channel_nll(model: &dyn DensityModel, pixels: ArrayView2<'_, u8>) -> [f64; 3] {
        let mut per_channel = [0f64; 3];
        let mut map = [0f32; 3];
        for row in pixels.rows() {
            model.pixel_log_likelihood(row.as_slice().unwrap(), &mut map);
            for (total, &m) in per_channel.iter_mut().zip(&map) {
                *total -= f64::from(m) / pixels.nrows() as f64;
            }
        }
        per_channel
    }

    /// Checks that the per-pixel map sums to the log-likelihood on a few images.
    pub fn assert_maps_sum_to_likelihood(model: &dyn DensityModel, images: &[Vec<u8>]) {
        for x in images {
            let mut map = vec![0f32; x.len()];
            let total = model.pixel_log_likelihood(x, &mut map);
            let ll = model.log_likelihood(x);
            assert!(
                (total - ll).abs() < 1e-9 * ll.abs().max(1.0),
                "{total} vs {ll}"
            );
            let summed: f64 = map.iter().map(|&v| f64::from(v)).sum();
            assert!(
                (summed - ll).abs() < 1e-4 * ll.abs().max(1.0),
                "{summed} vs {ll}"
            );
        }
    }
}
