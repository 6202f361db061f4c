//! A fitted (or training) PixelRNN: the flat parameters of
//! [`kernels::pixelrnn`](crate::kernels::pixelrnn), trained by Adam or RMSProp (`train.optimizer`) over rayon chunks.
//!
//! Stored tensors are the kernels' tensors, named and shaped as [`Shape::tensors`] lists them
//! (`input` [2h, C, 7, 7], `layer{k}.input{d}` [4h, 2h, taps], `layer{k}.state{d}`
//! [4h, h, taps], `layer{k}.output` [2h, h], `head` [2h, 2h], `logit` [C·1 or C·256, 2h] and
//! their biases, and with skip connections `layer{k}.skip` [2h, 2h]); the hyper-parameters are
//! the architecture, `layers`, `hidden`, `embedding_grid`, `skip_connections` and the seed.
//! Channels and levels are the image's, stored beside them as for every model.

use std::borrow::Cow;

use ndarray::ArrayView2;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use super::{ArchitectureName, PixelRnnParams, STORED_EMBEDDING_GRID, size_problems};
use crate::data::ImageShape;
use crate::kernels::Isa;
use crate::kernels::pixelrnn::reference::logits_per_channel;
use crate::kernels::pixelrnn::{Net, Shape};
use crate::models::shared::logistic::sigmoid;
use crate::models::shared::{inverse_cdf, tensor, uniform};
use crate::models::{DensityModel, Embed, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// A PixelRNN over binary or 8-bit images of any number of channels (at most `hidden`).
///
/// Invariant: `params` has `net.param_len()` finite values in the kernels' layout, zero
/// wherever [`Shape::mask`] is; `net.channels` and `net.levels` are the images'.
#[derive(Debug, Clone)]
pub struct PixelRnn {
    shape: ImageShape,
    net: Shape,
    seed: u64,
    params: Vec<f32>,
    /// Regions a side of the embedding's pooling.
    embedding_grid: usize,
    /// The instruction set of the element-wise kernels.
    isa: Isa,
}

impl PixelRnn {
    /// A model with seeded random weights (uniform within ±1/√fan-in, forget gates' biases at
    /// 1 so that cells start by remembering, masked weights zero) and the logit biases at each
    /// channel's marginal over `pixels` (log-odds, or log-frequencies smoothed by one count).
    pub fn init(
        shape: ImageShape,
        net: Shape,
        seed: u64,
        pixels: ArrayView2<'_, u8>,
    ) -> Result<Self, ModelError> {
        if shape.channels != net.channels {
            return Err(ModelError::invalid(format!(
                "the network is built for {} channels and the images have {}",
                net.channels, shape.channels
            )));
        }
        if net.hidden < net.channels {
            return Err(ModelError::invalid(format!(
                "`model.hidden` must be at least the images' {} channels (one colour group of \
                 LSTM units each), got {}",
                net.channels, net.hidden
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
        net.apply_mask(&mut params);
        let bias = net.tensors().pop().expect("a logit bias").1;
        params[bias].copy_from_slice(&marginal_logits(net, pixels));
        Ok(Self {
            shape,
            net,
            seed,
            params,
            embedding_grid: PixelRnnParams::default().embedding_grid,
            isa: Isa::detect(),
        })
    }

    /// Fits by gradient (`train.optimizer`) with early stopping; returns the model and its curve.
    pub fn fit(
        net: Shape,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<(Self, Vec<EpochRecord>), ModelError> {
        debug_assert_eq!(usize::from(data.levels), net.levels);
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

    /// The same model, embedding images over `grid` × `grid` regions (at least 1).
    pub fn with_embedding_grid(mut self, grid: usize) -> Self {
        assert!(grid > 0, "an embedding grid of at least one region");
        self.embedding_grid = grid;
        self
    }

    /// The same model, running its element-wise kernels on `isa`.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// The rows of `images` as the kernels read them: 0/1 bytes for two levels (any non-zero
    /// byte is on), the bytes themselves (borrowed when contiguous) otherwise.
    fn kernel_input<'a>(&self, images: ArrayView2<'a, u8>) -> Cow<'a, [u8]> {
        if self.net.levels == 2 {
            Cow::Owned(images.iter().map(|&v| u8::from(v != 0)).collect())
        } else if let Some(bytes) = images.to_slice() {
            Cow::Borrowed(bytes)
        } else {
            Cow::Owned(images.iter().copied().collect())
        }
    }

    /// One image as the kernels read it.
    fn kernel_image<'a>(&self, image: &'a [u8]) -> Cow<'a, [u8]> {
        self.kernel_input(ArrayView2::from_shape((1, image.len()), image).expect("one row"))
    }

    fn kernel(&self) -> Net<'_> {
        Net {
            shape: self.net,
            params: &self.params,
            height: self.shape.height,
            width: self.shape.width,
            isa: self.isa,
            pool_grid: self.embedding_grid,
        }
    }

    /// Rebuilds the model from model.safetensors; weights a mask removes are zeroed (they are
    /// never meant to be read).
    pub fn from_tensors(
        shape: ImageShape,
        levels: u16,
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
        let embedding_grid = match hyperparameters.get("embedding_grid") {
            None => STORED_EMBEDDING_GRID,
            Some(_) => size("embedding_grid")?,
        };
        let skip = match hyperparameters.get("skip_connections") {
            None => false,
            Some(v) => v.as_bool().ok_or_else(|| {
                ModelError::invalid("hyper-parameter `skip_connections` is not true or false")
            })?,
        };
        let problems: Vec<_> = size_problems(layers, hidden, embedding_grid)
            .into_iter()
            .flatten()
            .collect();
        if !problems.is_empty() {
            return Err(ModelError::Params(problems));
        }
        if !(1..=hidden).contains(&shape.channels) || levels < 2 {
            return Err(ModelError::invalid(format!(
                "a `pixelrnn` model of {hidden} LSTM units models 1 to {hidden} channels of at \
                 least 2 levels, and this one says {} channels of {levels}",
                shape.channels
            )));
        }
        let net = Shape {
            architecture: architecture.architecture(),
            hidden,
            layers,
            channels: shape.channels,
            levels: usize::from(levels),
            skip,
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
        net.apply_mask(&mut params);
        Ok(Self {
            shape,
            net,
            seed: hyperparameters["seed"].as_u64().unwrap_or(0),
            params,
            embedding_grid,
            isa: Isa::detect(),
        })
    }
}

/// Each channel's marginal over `pixels` (rows of H·W·C sub-pixels) as the output layer's
/// biases: the log-odds of a 1 (two levels), or the log-frequency of every value, smoothed by
/// one count per value so that none is impossible.
fn marginal_logits(net: Shape, pixels: ArrayView2<'_, u8>) -> Vec<f32> {
    let (ch, levels) = (net.channels, net.levels);
    let mut counts = vec![vec![1f64; levels]; ch];
    for row in pixels.rows() {
        for (k, &v) in row.iter().enumerate() {
            counts[k % ch][usize::from(v).min(levels - 1)] += 1.0;
        }
    }
    counts
        .iter()
        .flat_map(|c| {
            let total: f64 = c.iter().sum();
            if levels == 2 {
                let mean = (c[1] / total).clamp(1e-4, 1.0 - 1e-4);
                vec![(mean / (1.0 - mean)).ln() as f32]
            } else {
                c.iter().map(|&n| (n / total).ln() as f32).collect()
            }
        })
        .collect()
}

/// The value drawn from the softmax of `z` at `u` ∈ [0, 1).
fn draw_softmax(z: &[f32], u: f64) -> u8 {
    let top = z.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    let weights: Vec<f64> = z.iter().map(|&v| f64::from(v - top).exp()).collect();
    let total: f64 = weights.iter().sum();
    inverse_cdf(weights.iter().map(|w| w / total), u)
}

impl GradientModel for PixelRnn {
    fn params(&self) -> &[f32] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        self.kernel().gradient(&self.kernel_input(images), grad)
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        let mut out = vec![0f64; images.nrows()];
        self.kernel()
            .log_likelihood(&self.kernel_input(images), &mut out, None);
        -out.iter().sum::<f64>()
    }
}

/// The final features (what the output layers read, after their ReLU) averaged over each
/// region of an `embedding_grid` × `embedding_grid` grid of the image: grid² · 2h values.
impl Embed for PixelRnn {
    fn embedding_width(&self) -> usize {
        self.net.embedding_width(self.embedding_grid)
    }

    fn log_likelihood_and_embedding(
        &self,
        images: ArrayView2<'_, u8>,
        out: &mut [f64],
        embeddings: &mut [f32],
    ) {
        self.kernel()
            .log_likelihood_and_embedding(&self.kernel_input(images), out, embeddings);
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
        self.net.levels as u16
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let mut total = [0f64];
        self.kernel()
            .log_likelihood(&self.kernel_image(image), &mut total, Some(out));
        total[0]
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        let mut total = [0f64];
        self.kernel()
            .log_likelihood(&self.kernel_image(image), &mut total, None);
        total[0]
    }

    /// The whole batch at once: the kernel splits it into chunks over the threads.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        self.kernel()
            .log_likelihood(&self.kernel_input(images), out, None);
    }

    fn embedder(&self) -> Option<&dyn Embed> {
        Some(self)
    }

    /// Sub-pixel by sub-pixel in raster order (R, G, B within a pixel), each drawn from its
    /// conditional given those before; a pixel of row r needs only rows 0..=r of the network.
    /// Binary images come out as 0/1.
    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let (width, ch) = (self.shape.width, self.shape.channels);
        let (outs, per) = (self.net.outputs(), logits_per_channel(self.net.levels));
        let mut logits = vec![0f32; self.shape.height * width * outs];
        out.fill(0);
        for r in 0..self.shape.height {
            for c in 0..width {
                for k in 0..ch {
                    self.kernel().logits_up_to(out, r + 1, &mut logits);
                    let at = (r * width + c) * outs + k * per;
                    let z = &logits[at..at + per];
                    out[(r * width + c) * ch + k] = if per == 1 {
                        u8::from(uniform(rng) < sigmoid(f64::from(z[0])))
                    } else {
                        draw_softmax(z, uniform(rng))
                    };
                }
            }
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({
            "architecture": ArchitectureName::of(self.net.architecture),
            "layers": self.net.layers,
            "hidden": self.net.hidden,
            "embedding_grid": self.embedding_grid,
            "skip_connections": self.net.skip,
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

    /// A PixelRNN of sub-pixels of `levels` values with larger-than-initial random weights
    /// (masked), so every conditional matters.
    fn random_model(
        shape: ImageShape,
        levels: usize,
        architecture: Architecture,
        seed: u64,
    ) -> PixelRnn {
        let net = Shape {
            architecture,
            hidden: 3,
            layers: 2,
            channels: shape.channels,
            levels,
            skip: true,
        };
        let pixels = Array2::<u8>::zeros((1, shape.dims()));
        let mut m = PixelRnn::init(shape, net, seed, pixels.view()).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        m.params
            .iter_mut()
            .for_each(|v| *v = rng.random_range(-0.8..0.8));
        net.apply_mask(&mut m.params);
        m
    }

    fn binary_images(n: usize, d: usize, seed: u64) -> Array2<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |(_, j)| {
            u8::from(rng.random_bool(0.1 + 0.8 * j as f64 / d as f64))
        })
    }

    /// Σ p(x) = 1 on the fast kernels over every image: binary 3 × 4 grey (2^12 images),
    /// binary 2 × 2 RGB (2^12), 4-level 1 × 2 RGB (4^6, the softmax through the colour masks);
    /// and the per-sub-pixel maps sum to the image's log-likelihood.
    #[test]
    fn normalizes_over_all_images() {
        for arch in ARCHITECTURES {
            let cases = [
                (ImageShape::new(3, 4, 1), 2),
                (ImageShape::new(2, 2, 3), 2),
                (ImageShape::new(1, 2, 3), 4),
            ];
            for (shape, levels) in cases {
                let m = random_model(shape, levels, arch, 3);
                let total = total_probability(&m);
                assert!(
                    (total - 1.0).abs() < 1e-5,
                    "{arch:?} {shape:?} L={levels}: Σ p(x) = {total}"
                );
                let images = all_images(shape.dims(), levels as u16);
                assert_maps_sum_to_likelihood(&m, &images[..200]);
            }
        }
    }

    #[test]
    fn batch_scores_and_nll_agree_with_one_image_at_a_time() {
        for arch in ARCHITECTURES {
            let m = random_model(ImageShape::new(3, 5, 1), 2, arch, 4);
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

    /// Samples follow p(x) (chi-square over every image): binary 2 × 3 grey, binary 1 × 2 RGB
    /// and one 4-level RGB pixel, 64 images each.
    #[test]
    fn samples_follow_the_model() {
        for arch in ARCHITECTURES {
            let cases = [
                (ImageShape::new(2, 3, 1), 2),
                (ImageShape::new(1, 2, 3), 2),
                (ImageShape::new(1, 1, 3), 4),
            ];
            for (shape, levels) in cases {
                let m = random_model(shape, levels, arch, 11);
                assert_samples_follow_the_model(&m, 6_000, 5);
            }
        }
    }

    /// One-pixel RGB images of 8 levels in which G is R or R + 1 (mod 8) at random and B is
    /// 7 − G: B depends on G alone. Fitted in R, G, B order, B's NLL is near 0 and G's near
    /// ln 2; a model that ordered R, B, G (or let B miss G) would put ln 2 on B and 0 on G.
    #[test]
    fn colour_is_modelled_in_r_g_b_order() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let rows: Vec<u8> = (0..1_200)
            .flat_map(|_| {
                let r: u8 = rng.random_range(0..8);
                let g = (r + u8::from(rng.random_bool(0.5))) % 8;
                [r, g, 7 - g]
            })
            .collect();
        let x = Array2::from_shape_vec((1_200, 3), rows).unwrap();
        let (train, valid) = x.view().split_at(ndarray::Axis(0), 1_000);
        let shape = ImageShape::new(1, 1, 3);
        let data = TrainingSet {
            shape,
            levels: 8,
            pixels: train,
            validation: valid,
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 60,
            batch_size: 20,
            learning_rate: 0.01,
            seed: 2,
            ..TrainSettings::default()
        };
        for architecture in ARCHITECTURES {
            let net = Shape {
                architecture,
                hidden: 6,
                layers: 1,
                channels: 3,
                levels: 8,
                skip: false,
            };
            let (m, _) = PixelRnn::fit(net, &data, &Training::unmonitored(&settings)).unwrap();
            let [r, g, b] = per_channel_nll(&m, valid);
            let ln2 = std::f64::consts::LN_2;
            assert!((r - 8f64.ln()).abs() < 0.15, "{architecture:?}: R {r}");
            assert!((g - ln2).abs() < 0.15, "{architecture:?}: G {g}");
            // Half of G's: far from the ln 2 that B would have if it missed G.
            assert!(b < ln2 / 2.0, "{architecture:?}: B {b} (G {g})");
            // Its samples follow the chain: G is R or R + 1, B is 7 − G. B's fit above may
            // leave it ln 2 / 2 uncertain, so B = 7 − G in somewhat fewer samples than G's
            // share; a B drawn blind to G would match half the time, independent channels 1/8.
            let shares = sampled_share(
                &m,
                2000,
                [&|x| x[1] == x[0] || x[1] == (x[0] + 1) % 8, &|x| {
                    x[2] == 7 - x[1]
                }],
            );
            assert!(
                shares[0] > 0.85 && shares[1] > 0.7,
                "{architecture:?}: samples with G from R, B from G: {shares:?}"
            );
        }
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
            channels: 1,
            levels: 2,
            skip: true,
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
        let back = PixelRnn::from_tensors(shape, 2, &m.hyperparameters(), &m.tensors()).unwrap();
        assert_eq!(back.params, m.params);
        assert_eq!(back.net, m.net);
        let again = PixelRnn::fit(net, &data, &Training::unmonitored(&settings))
            .unwrap()
            .0;
        assert_eq!(again.params, m.params, "a fixed seed gives the same model");
    }

    /// The embedding grid goes into the artifact and comes back; a model stored before it was
    /// a key embeds over quarters, as its stored reference sample was.
    #[test]
    fn the_embedding_grid_is_stored() {
        let shape = ImageShape::new(5, 6, 1);
        let m = random_model(shape, 2, Architecture::RowLstm, 3).with_embedding_grid(3);
        assert_eq!(m.embedding_width(), 3 * 3 * 2 * m.net.hidden);
        let back = PixelRnn::from_tensors(shape, 2, &m.hyperparameters(), &m.tensors()).unwrap();
        assert_eq!(back.embedding_width(), m.embedding_width());
        let mut old = m.hyperparameters();
        old.as_object_mut().unwrap().remove("embedding_grid");
        let old = PixelRnn::from_tensors(shape, 2, &old, &m.tensors()).unwrap();
        assert_eq!(old.embedding_width(), 2 * 2 * 2 * m.net.hidden);
    }

    #[test]
    fn stored_models_that_do_not_fit_are_refused() {
        let shape = ImageShape::new(3, 4, 1);
        let m = random_model(shape, 2, Architecture::DiagonalBiLstm, 2);
        let (hyper, tensors) = (m.hyperparameters(), m.tensors());
        let refused = |hyper: &serde_json::Value, tensors: &[NamedTensor]| {
            PixelRnn::from_tensors(shape, 2, hyper, tensors)
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
        let mut no_regions = hyper.clone();
        no_regions["embedding_grid"] = 0.into();
        assert!(refused(&no_regions, &tensors).contains("embedding_grid"));
        let mut other = hyper.clone();
        other["architecture"] = "row_lstm".into();
        // A Row LSTM's input-to-state has two taps where the diagonal's has one.
        assert!(refused(&other, &tensors).contains("layer0.input0"));
        // Colour's mask-A convolution reads three channels, and 256 levels need 256 logits.
        let colour = PixelRnn::from_tensors(ImageShape::new(3, 4, 3), 2, &hyper, &tensors);
        assert!(colour.unwrap_err().to_string().contains("input"));
        let eight_bit = PixelRnn::from_tensors(shape, 256, &hyper, &tensors);
        assert!(eight_bit.unwrap_err().to_string().contains("logit"));
        // More channels than LSTM units (one colour group each) cannot be split.
        let wide = PixelRnn::from_tensors(ImageShape::new(3, 4, 4), 2, &hyper, &tensors);
        assert!(wide.unwrap_err().to_string().contains("channels"));
    }
}
