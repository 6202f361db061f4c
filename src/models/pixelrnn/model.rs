//! A fitted (or training) PixelRNN: the flat parameters of
//! [`kernels::pixelrnn`](crate::kernels::pixelrnn), trained by Adam over rayon chunks.
//!
//! Stored tensors are the kernels' tensors, named and shaped as [`Shape::tensors`] lists them
//! (`input` [2h, 7, 7], `layer{k}.input{d}` [4h, 2h, taps], `layer{k}.state{d}` [4h, h, taps],
//! `layer{k}.output` [2h, h], `head` [2h, 2h], `logit` [2h] and their biases); the
//! hyper-parameters are the architecture, `layers`, `hidden` and the seed.

use ndarray::ArrayView2;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{ArchitectureName, size_problems};
use crate::data::ImageShape;
use crate::kernels::Isa;
use crate::kernels::pixelrnn::{Net, Shape};
use crate::models::shared::logistic::{log_sigmoid, sigmoid};
use crate::models::shared::{tensor, uniform};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// A PixelRNN over one-channel binary images.
///
/// Invariant: `params` has `net.param_len()` finite values in the kernels' layout.
#[derive(Debug, Clone)]
pub struct PixelRnn {
    shape: ImageShape,
    net: Shape,
    seed: u64,
    params: Vec<f32>,
    /// The instruction set of the element-wise kernels.
    isa: Isa,
}

impl PixelRnn {
    /// A model with seeded random weights (uniform within ±1/√fan-in, forget gates' biases at
    /// 1 so that cells start by remembering) and the logit bias at the mean pixel's log-odds.
    pub fn init(
        shape: ImageShape,
        net: Shape,
        seed: u64,
        pixels: ArrayView2<'_, u8>,
    ) -> Result<Self, ModelError> {
        if shape.channels != 1 {
            return Err(ModelError::invalid(format!(
                "`pixelrnn` models one-channel images so far, and these have {} channels: use \
                 `nade` or `rnade` for colour",
                shape.channels
            )));
        }
        let mut params = vec![0f32; net.param_len()];
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5049_5845_4c52);
        for (name, range, dims) in net.tensors() {
            let values = &mut params[range];
            if dims.len() > 1 {
                let fan_in: usize = dims[1..].iter().product();
                let scale = 1.0 / (fan_in as f32).sqrt();
                values
                    .iter_mut()
                    .for_each(|v| *v = rng.random_range(-scale..scale));
            } else if name.contains(".input_bias") {
                // Gates o, f, i, g: the forget gate's bias at 1.
                values[net.hidden..2 * net.hidden].fill(1.0);
            }
        }
        let total = pixels.len().max(1) as f64;
        let on = pixels.iter().filter(|&&v| v != 0).count() as f64;
        let mean = ((on + 0.5) / (total + 1.0)).clamp(1e-4, 1.0 - 1e-4);
        let at = net.tensors().last().expect("a logit bias").1.start;
        params[at] = (mean / (1.0 - mean)).ln() as f32;
        Ok(Self {
            shape,
            net,
            seed,
            params,
            isa: Isa::detect(),
        })
    }

    /// Fits by Adam with early stopping; returns the model and its curve.
    pub fn fit(
        net: Shape,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<(Self, Vec<EpochRecord>), ModelError> {
        let mut model = Self::init(data.shape, net, training.settings.seed, data.pixels)?;
        let curve = train::train(&mut model, data, training);
        Ok((model, curve))
    }

    /// The network shape.
    pub fn net_shape(&self) -> Shape {
        self.net
    }

    /// The flat parameters.
    pub fn flat(&self) -> &[f32] {
        &self.params
    }

    /// The same model, running its element-wise kernels on `isa`.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    fn kernel(&self) -> Net<'_> {
        Net {
            shape: self.net,
            params: &self.params,
            height: self.shape.height,
            width: self.shape.width,
            isa: self.isa,
        }
    }

    /// Rebuilds the model from model.safetensors.
    pub fn from_tensors(
        shape: ImageShape,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let architecture: ArchitectureName =
            serde_json::from_value(hyperparameters["architecture"].clone())?;
        let size = |key: &str| {
            hyperparameters[key]
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| ModelError::invalid(format!("hyper-parameter `{key}` is missing")))
        };
        let (layers, hidden) = (size("layers")?, size("hidden")?);
        let problems: Vec<_> = size_problems(layers, hidden)
            .into_iter()
            .flatten()
            .collect();
        if !problems.is_empty() {
            return Err(ModelError::Params(problems));
        }
        if shape.channels != 1 {
            return Err(ModelError::invalid(format!(
                "a `pixelrnn` model has one channel, and this one says {}",
                shape.channels
            )));
        }
        let net = Shape {
            architecture: architecture.architecture(),
            hidden,
            layers,
        };
        let mut params = vec![0f32; net.param_len()];
        for (name, range, _) in net.tensors() {
            let t = tensor(tensors, &name, range.len())?;
            params[range]
                .iter_mut()
                .zip(t)
                .for_each(|(p, &v)| *p = v as f32);
        }
        if params.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::invalid("weights are not all finite"));
        }
        Ok(Self {
            shape,
            net,
            seed: hyperparameters["seed"].as_u64().unwrap_or(0),
            params,
            isa: Isa::detect(),
        })
    }

    fn d(&self) -> usize {
        self.shape.dims()
    }
}

/// The rows of `images` as 0/1 bytes, one after another.
fn binary(images: ArrayView2<'_, u8>) -> Vec<u8> {
    images.iter().map(|&v| u8::from(v != 0)).collect()
}

/// One image as 0/1 bytes.
fn binary_image(image: &[u8]) -> Vec<u8> {
    image.iter().map(|&v| u8::from(v != 0)).collect()
}

impl GradientModel for PixelRnn {
    fn params(&self) -> &[f32] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        self.kernel().gradient(&binary(images), grad)
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        let mut out = vec![0f64; images.nrows()];
        self.kernel()
            .log_likelihood(&binary(images), &mut out, None);
        -out.iter().sum::<f64>()
    }
}

impl DensityModel for PixelRnn {
    fn kind(&self) -> &'static str {
        <Self as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        2
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let x = binary_image(image);
        let mut total = [0f64];
        let mut logits = vec![0f32; self.d()];
        self.kernel()
            .log_likelihood(&x, &mut total, Some(&mut logits));
        for ((o, &z), &v) in out.iter_mut().zip(&logits).zip(&x) {
            *o = log_sigmoid(f64::from(if v != 0 { z } else { -z })) as f32;
        }
        total[0]
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        let mut total = [0f64];
        let x = binary_image(image);
        self.kernel().log_likelihood(&x, &mut total, None);
        total[0]
    }

    /// The whole batch at once: the kernel splits it into chunks over the threads.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        self.kernel().log_likelihood(&binary(images), out, None);
    }

    /// Pixel by pixel in raster order, each drawn from its conditional given those before; a
    /// pixel of row r needs only rows 0..=r of the network.
    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let width = self.shape.width;
        let mut logits = vec![0f32; self.d()];
        out.fill(0);
        for r in 0..self.shape.height {
            for c in 0..width {
                self.kernel().logits_up_to(out, r + 1, &mut logits);
                let p = sigmoid(f64::from(logits[r * width + c]));
                out[r * width + c] = u8::from(uniform(rng) < p);
            }
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({
            "architecture": ArchitectureName::of(self.net.architecture),
            "layers": self.net.layers,
            "hidden": self.net.hidden,
            "seed": self.seed,
        })
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        self.net
            .tensors()
            .into_iter()
            .map(|(name, range, dims)| NamedTensor {
                name,
                shape: dims,
                data: self.params[range].iter().map(|&v| f64::from(v)).collect(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::pixelrnn::Architecture;
    use crate::models::testing::*;
    use crate::train::TrainSettings;
    use ndarray::Array2;

    const ARCHITECTURES: [Architecture; 2] = [Architecture::RowLstm, Architecture::DiagonalBiLstm];

    /// A PixelRNN with larger-than-initial random weights, so every conditional matters.
    fn random_model(shape: ImageShape, architecture: Architecture, seed: u64) -> PixelRnn {
        let net = Shape {
            architecture,
            hidden: 3,
            layers: 2,
        };
        let pixels = Array2::<u8>::zeros((1, shape.dims()));
        let mut m = PixelRnn::init(shape, net, seed, pixels.view()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        m.params
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-0.8..0.8));
        m
    }

    fn binary_images(n: usize, d: usize, seed: u64) -> Array2<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |(_, j)| {
            u8::from(rng.random_bool(0.1 + 0.8 * j as f64 / d as f64))
        })
    }

    /// Σ over all 2^12 images of a 3 × 4 image of p(x) = 1 on the fast kernels, and the
    /// per-pixel maps sum to the image's log-likelihood.
    #[test]
    fn normalizes_over_all_images() {
        for arch in ARCHITECTURES {
            let m = random_model(ImageShape::new(3, 4, 1), arch, 3);
            let total = total_probability(&m);
            assert!((total - 1.0).abs() < 1e-5, "{arch:?}: Σ p(x) = {total}");
            assert_maps_sum_to_likelihood(&m, &all_images(12, 2)[..200]);
        }
    }

    #[test]
    fn batch_scores_and_nll_agree_with_one_image_at_a_time() {
        for arch in ARCHITECTURES {
            let m = random_model(ImageShape::new(3, 5, 1), arch, 4);
            let x = binary_images(21, 15, 1); // not a multiple of the chunk
            let mut batch = vec![0f64; 21];
            m.log_likelihood_batch(x.view(), &mut batch);
            for (row, &b) in x.rows().into_iter().zip(&batch) {
                let one = m.log_likelihood(row.as_slice().unwrap());
                assert!((one - b).abs() < 1e-9, "{one} vs {b}");
            }
            let nll = m.total_nll(x.view());
            assert!((nll + batch.iter().sum::<f64>()).abs() < 1e-6);
        }
    }

    /// Samples of a 2 × 3 image follow p(x) (chi-square over the 64 images).
    #[test]
    fn samples_follow_the_model() {
        for arch in ARCHITECTURES {
            let m = random_model(ImageShape::new(2, 3, 1), arch, 11);
            assert_samples_follow_the_model(&m, 6_000, 5);
        }
    }

    #[test]
    fn colour_images_are_refused_with_what_to_use() {
        let net = super::super::PixelRnnParams::default().shape();
        let x = Array2::<u8>::zeros((2, 12));
        let err = PixelRnn::init(ImageShape::new(2, 2, 3), net, 0, x.view()).unwrap_err();
        assert!(err.to_string().contains("3 channels"), "{err}");
        assert!(err.to_string().contains("nade"), "{err}");
    }

    #[test]
    fn training_lowers_the_validation_nll_and_round_trips() {
        let shape = ImageShape::new(4, 4, 1);
        let x = sticky_chains(600, 16, 9);
        let (train, valid) = x.view().split_at(ndarray::Axis(0), 500);
        let data = TrainingSet {
            shape,
            levels: 2,
            pixels: train,
            validation: valid,
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 6,
            batch_size: 20,
            learning_rate: 0.01,
            seed: 1,
            ..TrainSettings::default()
        };
        let net = Shape {
            architecture: Architecture::RowLstm,
            hidden: 4,
            layers: 2,
        };
        let start = PixelRnn::init(shape, net, 1, train).unwrap();
        let before = train::mean_nll(&start, valid);
        let (m, curve) = PixelRnn::fit(net, &data, &Training::unmonitored(&settings)).unwrap();
        let after = train::mean_nll(&m, valid);
        assert!(after < before - 2.0, "validation NLL {before} → {after}");
        let best = curve
            .iter()
            .filter_map(|r| r.validation_nll)
            .fold(f64::INFINITY, f64::min);
        assert!((after - best).abs() < 1e-9, "the best epoch is kept");
        let back = PixelRnn::from_tensors(shape, &m.hyperparameters(), &m.tensors()).unwrap();
        assert_eq!(back.params, m.params);
        assert_eq!(back.net, m.net);
        let again = PixelRnn::fit(net, &data, &Training::unmonitored(&settings))
            .unwrap()
            .0;
        assert_eq!(again.params, m.params, "a fixed seed gives the same model");
    }

    #[test]
    fn stored_models_that_do_not_fit_are_refused() {
        let shape = ImageShape::new(3, 4, 1);
        let m = random_model(shape, Architecture::DiagonalBiLstm, 2);
        let (hyper, tensors) = (m.hyperparameters(), m.tensors());
        let refused = |hyper: &serde_json::Value, tensors: &[NamedTensor]| {
            PixelRnn::from_tensors(shape, hyper, tensors)
                .unwrap_err()
                .to_string()
        };
        let mut short = tensors.clone();
        short[3].data.pop();
        assert!(refused(&hyper, &short).contains(&short[3].name));
        let missing: Vec<_> = tensors[1..].to_vec();
        assert!(refused(&hyper, &missing).contains("input"));
        let mut nan = tensors.clone();
        nan[0].data[0] = f64::NAN;
        assert!(refused(&hyper, &nan).contains("finite"));
        let mut big = hyper.clone();
        big["layers"] = 0.into();
        assert!(refused(&big, &tensors).contains("layers"));
        let mut other = hyper.clone();
        other["architecture"] = "row_lstm".into();
        // A Row LSTM's input-to-state has two taps where the diagonal's has one.
        assert!(refused(&other, &tensors).contains("layer0.input0"));
        assert!(PixelRnn::from_tensors(ImageShape::new(3, 4, 3), &hyper, &tensors).is_err());
    }
}
