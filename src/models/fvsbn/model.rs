//! `fvsbn`: the fully visible sigmoid belief network — the full chain rule with a logistic
//! conditional on *every* earlier sub-pixel: p(x_{o(i)} = 1 | x_{o(<i)}) = σ(b_i + Σ_{j<i} W_ij
//! x_{o(j)}), with W strictly lower triangular in ordering space (D(D+1)/2 parameters).
//!
//! Trained by Adam on minibatches ([`train`](crate::train)); the forward pass is one GEMM per
//! shard (Z = X·Wᵀ + b) and the weight gradient another (∂W = Gᵀ·X), through ndarray's
//! matrixmultiply. The upper triangle of W starts at zero and its gradient is masked, so it
//! stays zero.

use ndarray::{Array2, ArrayView2, ArrayViewMut2, linalg::general_mat_mul};
use rand::RngCore;
use serde_json::json;

use crate::data::ImageShape;
use crate::models::shared::logistic::{log_sigmoid, sigmoid};
use crate::models::shared::ordering::{self, Order};
use crate::models::shared::{
    binary_chain_log_likelihood, logits_at_pixel_means, order_tensor, stored_order, tensor, uniform,
};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// A fitted (or training) FVSBN.
#[derive(Debug, Clone)]
pub struct Fvsbn {
    shape: ImageShape,
    order_kind: Order,
    seed: u64,
    /// Position i holds the sub-pixel index modelled i-th.
    order: Vec<usize>,
    /// W (D×D, row-major, strictly lower triangular) then b (D).
    params: Vec<f32>,
}

impl Fvsbn {
    /// A model with W = 0 and b at the logits of the pixel means (smoothed), i.e. the
    /// independent Bernoulli model, from which training starts.
    pub fn init(
        shape: ImageShape,
        order_kind: Order,
        seed: u64,
        pixels: ArrayView2<'_, u8>,
    ) -> Self {
        let d = shape.dims();
        let order = ordering::ordering(shape, order_kind, seed);
        let mut params = vec![0f32; d * d];
        params.extend(logits_at_pixel_means(pixels, &order));
        Self {
            shape,
            order_kind,
            seed,
            order,
            params,
        }
    }

    /// Fits by gradient (`train.optimizer`) with early stopping on binary pixels; returns the model and its training
    /// curve.
    pub fn fit(
        order_kind: Order,
        seed: u64,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> (Self, Vec<EpochRecord>) {
        let mut model = Self::init(data.shape, order_kind, seed, data.pixels);
        let curve = train::train(&mut model, data, training);
        (model, curve)
    }

    fn d(&self) -> usize {
        self.shape.dims()
    }

    fn weights(&self) -> ArrayView2<'_, f32> {
        let d = self.d();
        ArrayView2::from_shape((d, d), &self.params[..d * d]).expect("D×D")
    }

    /// The images in ordering space, as f32 (one row per image).
    fn ordered(&self, images: ArrayView2<'_, u8>) -> Array2<f32> {
        let mut x = Array2::<f32>::zeros((images.nrows(), self.d()));
        for (mut row, img) in x.rows_mut().into_iter().zip(images.rows()) {
            for (i, &o) in self.order.iter().enumerate() {
                row[i] = f32::from(img[o] != 0);
            }
        }
        x
    }

    /// Z = X·Wᵀ + b for images already in ordering space.
    fn logits(&self, x: &Array2<f32>) -> Array2<f32> {
        let d = self.d();
        let mut z = Array2::<f32>::zeros((x.nrows(), d));
        for mut row in z.rows_mut() {
            row.assign(&ndarray::ArrayView1::from(&self.params[d * d..]));
        }
        general_mat_mul(1.0, x, &self.weights().t(), 1.0, &mut z);
        z
    }

    /// z_i for one image (original layout), accumulated in f64 over its "on" sub-pixels.
    fn logit_at(&self, i: usize, on_positions: &[usize]) -> f64 {
        let d = self.d();
        let row = &self.params[i * d..i * d + d];
        f64::from(self.params[d * d + i])
            + on_positions
                .iter()
                .take_while(|&&j| j < i)
                .map(|&j| f64::from(row[j]))
                .sum::<f64>()
    }

    /// The positions (ascending) whose sub-pixel is on in `image`.
    fn on_positions(&self, image: &[u8]) -> Vec<usize> {
        (0..self.d())
            .filter(|&i| image[self.order[i]] != 0)
            .collect()
    }

    /// Rebuilds the model from model.safetensors, refusing weights that look ahead.
    pub fn from_tensors(
        shape: ImageShape,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let d = shape.dims();
        let order_kind: Order = serde_json::from_value(hyperparameters["order"].clone())?;
        let seed = hyperparameters["seed"].as_u64().unwrap_or(0);
        let order = stored_order(tensors, d)?;
        let w = tensor(tensors, "weights", d * d)?;
        let b = tensor(tensors, "bias", d)?;
        for i in 0..d {
            if let Some(j) = (i..d).find(|&j| w[i * d + j] != 0.0) {
                return Err(ModelError::invalid(format!(
                    "tensor `weights`: position {i} has a weight on later position {j}"
                )));
            }
        }
        let params: Vec<f32> = w.iter().chain(b).map(|&v| v as f32).collect();
        if params.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::invalid("weights are not all finite"));
        }
        Ok(Self {
            shape,
            order_kind,
            seed,
            order,
            params,
        })
    }
}

impl GradientModel for Fvsbn {
    fn params(&self) -> &[f32] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        let d = self.d();
        let x = self.ordered(images);
        let mut g = self.logits(&x);
        let mut nll = 0.0;
        // G = ∂NLL/∂Z = σ(Z) − X.
        for (gz, &xv) in g.iter_mut().zip(x.iter()) {
            let z = f64::from(*gz);
            nll -= log_sigmoid(if xv > 0.5 { z } else { -z });
            *gz = (sigmoid(z) - f64::from(xv)) as f32;
        }
        let (gw, gb) = grad.split_at_mut(d * d);
        let mut dw = ArrayViewMut2::from_shape((d, d), gw).expect("D×D");
        general_mat_mul(1.0, &g.t(), &x, 1.0, &mut dw);
        for i in 0..d {
            for j in i..d {
                dw[[i, j]] = 0.0; // W stays strictly lower triangular
            }
        }
        for row in g.rows() {
            gb.iter_mut().zip(row).for_each(|(a, b)| *a += b);
        }
        nll
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        let x = self.ordered(images);
        let z = self.logits(&x);
        z.iter()
            .zip(x.iter())
            .map(|(&z, &xv)| {
                let z = f64::from(z);
                -log_sigmoid(if xv > 0.5 { z } else { -z })
            })
            .sum()
    }
}

impl DensityModel for Fvsbn {
    fn kind(&self) -> &'static str {
        <super::Fvsbn as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        2
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let on = self.on_positions(image);
        binary_chain_log_likelihood(&self.order, image, Some(out), |i| self.logit_at(i, &on))
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        let on = self.on_positions(image);
        binary_chain_log_likelihood(&self.order, image, None, |i| self.logit_at(i, &on))
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        out.fill(0);
        let mut on = Vec::new();
        for (i, &o) in self.order.iter().enumerate() {
            if uniform(rng) < sigmoid(self.logit_at(i, &on)) {
                out[o] = 1;
                on.push(i);
            }
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({ "order": self.order_kind, "seed": self.seed })
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let d = self.d();
        vec![
            order_tensor(&self.order),
            NamedTensor {
                name: "weights".into(),
                shape: vec![d, d],
                data: self.params[..d * d].iter().map(|&v| f64::from(v)).collect(),
            },
            NamedTensor {
                name: "bias".into(),
                shape: vec![d],
                data: self.params[d * d..].iter().map(|&v| f64::from(v)).collect(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::*;
    use crate::train::TrainSettings;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_model(shape: ImageShape, order: Order, seed: u64) -> Fvsbn {
        let d = shape.dims();
        let pixels = Array2::<u8>::zeros((1, d));
        let mut m = Fvsbn::init(shape, order, seed, pixels.view());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        for i in 0..d {
            for j in 0..i {
                m.params[i * d + j] = rng.random_range(-2.0..2.0);
            }
            m.params[d * d + i] = rng.random_range(-1.0..1.0);
        }
        m
    }

    fn binary(n: usize, d: usize, seed: u64) -> Array2<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |(_, j)| {
            u8::from(rng.random_bool(0.2 + 0.05 * j as f64))
        })
    }

    /// Binary RGB in a chain R → G → B: FVSBN takes the channels in R, G, B order.
    #[test]
    fn colour_channels_see_their_predecessors() {
        check_binary_chain(|data, s| {
            Fvsbn::fit(Order::Raster, 0, data, &Training::unmonitored(s)).0
        });
    }

    #[test]
    fn normalizes_over_all_images_for_both_orders() {
        for order in [Order::Raster, Order::Random] {
            let m = random_model(ImageShape::new(2, 5, 1), order, 3); // D = 10
            let total = total_probability(&m);
            assert!((total - 1.0).abs() < 1e-6, "{order:?}: Σ p(x) = {total}");
            assert_maps_sum_to_likelihood(&m, &all_images(10, 2)[..200]);
        }
    }

    #[test]
    fn a_plateau_halves_the_learning_rate_from_the_best_epoch_before_stopping() {
        let shape = ImageShape::new(2, 3, 1);
        let x = binary(600, 6, 3);
        let (train, valid) = x.view().split_at(ndarray::Axis(0), 400);
        let data = TrainingSet {
            shape,
            levels: 2,
            pixels: train,
            validation: valid,
            redraw: None,
        };
        // A step far too large for the problem, so the validation NLL soon stalls.
        let settings = TrainSettings {
            epochs: 60,
            batch_size: 20,
            learning_rate: 0.5,
            patience: 1,
            anneal: 2,
            weight_decay: 0.0,
            seed: 1,
            ..TrainSettings::default()
        };
        let (m, curve) = Fvsbn::fit(Order::Raster, 0, &data, &Training::unmonitored(&settings));
        let rates: Vec<f64> = curve.iter().map(|r| r.learning_rate).collect();
        assert!(rates.contains(&0.25) && rates.contains(&0.125), "{rates:?}");
        assert!(rates.windows(2).all(|w| w[1] <= w[0]), "{rates:?}");
        assert!(curve.len() < 60, "stopped after the last halving stalled");
        let best = curve
            .iter()
            .filter_map(|r| r.validation_nll)
            .fold(f64::INFINITY, f64::min);
        assert!((train::mean_nll(&m, valid) - best).abs() < 1e-9);
    }

    /// `train.rebinarize`: trained on a fresh binarization each epoch, the model learns the
    /// intensities' coin flips; trained on one binarization, it learns those few outcomes.
    #[test]
    fn rebinarizing_each_epoch_learns_the_intensities_not_one_draw_of_them() {
        use crate::config::{Binarize, PreprocessConfig};
        use crate::data::preprocess::Preprocessor;
        use crate::train::Redraw;

        /// Epoch e draws binarization e − 1, as the pipeline's rebinarization does.
        #[derive(Debug)]
        struct Draws<'a> {
            preprocess: &'a Preprocessor,
            ids: &'a [String],
            raw: ndarray::ArrayView2<'a, u8>,
        }
        impl Redraw for Draws<'_> {
            fn epoch(&self, epoch: u32) -> Array2<u8> {
                let draw = epoch.saturating_sub(1) as usize;
                self.preprocess.draw(draw, self.ids, self.raw).into_owned()
            }
        }

        // Every pixel of every image has intensity 64: independent coins with P(1) = 64/255.
        let (shape, n) = (ImageShape::new(3, 4, 1), 8);
        let raw = Array2::from_elem((n, 12), 64u8);
        let ids: Vec<String> = (0..n).map(|i| format!("train-{i}")).collect();
        let preprocess = Preprocessor::new(PreprocessConfig {
            binarize: Binarize::Stochastic,
            ..PreprocessConfig::default()
        });
        let first = preprocess.draw(0, &ids, raw.view()).into_owned();
        let redraw = Draws {
            preprocess: &preprocess,
            ids: &ids,
            raw: raw.view(),
        };
        assert_eq!(redraw.epoch(1), first, "epoch 1 trains on draw 0");
        assert_ne!(redraw.epoch(2), first, "later epochs draw afresh");

        let settings = TrainSettings {
            epochs: 1500,
            batch_size: n,
            learning_rate: 0.02,
            patience: 3,
            anneal: 0,
            weight_decay: 0.0,
            seed: 1,
            ..TrainSettings::default()
        };
        let fit = |redraw| {
            let data = TrainingSet {
                shape,
                levels: 2,
                pixels: first.view(),
                validation: first.slice(ndarray::s![..0, ..]),
                redraw,
            };
            Fvsbn::fit(Order::Raster, 0, &data, &Training::unmonitored(&settings)).0
        };
        let (fixed, rebinarized) = (fit(None), fit(Some(&redraw as &dyn Redraw)));

        // Images the training never saw, drawn from the same intensities.
        let unseen_ids: Vec<String> = (0..4000).map(|i| format!("unseen-{i}")).collect();
        let unseen_raw = Array2::from_elem((4000, 12), 64u8);
        let unseen = preprocess.draw(0, &unseen_ids, unseen_raw.view());
        let p = 64.0 / 255.0f64;
        let entropy = -12.0 * (p * p.ln() + (1.0 - p) * (1.0 - p).ln());
        let (fixed_nll, rebinarized_nll) = (
            train::mean_nll(&fixed, unseen.view()),
            train::mean_nll(&rebinarized, unseen.view()),
        );
        assert!(
            (rebinarized_nll - entropy).abs() < 0.3,
            "rebinarized {rebinarized_nll} vs the coins' entropy {entropy}"
        );
        assert!(
            fixed_nll > entropy + 1.0,
            "one draw {fixed_nll} vs the coins' entropy {entropy}"
        );
    }

    #[test]
    fn samples_follow_the_model() {
        let m = random_model(ImageShape::new(2, 3, 1), Order::Random, 12); // D = 6
        assert_samples_follow_the_model(&m, 200_000, 6);
    }

    #[test]
    fn batch_nll_agrees_with_the_per_image_likelihood() {
        let m = random_model(ImageShape::new(3, 3, 1), Order::Random, 5);
        let x = binary(37, 9, 1);
        let per_image: f64 = x
            .rows()
            .into_iter()
            .map(|r| -m.log_likelihood(r.as_slice().unwrap()))
            .sum();
        let batch = m.total_nll(x.view());
        assert!(
            (per_image - batch).abs() < 1e-4 * per_image,
            "{per_image} vs {batch}"
        );
    }

    #[test]
    fn gradients_match_finite_differences() {
        let m = random_model(ImageShape::new(2, 3, 1), Order::Random, 7);
        let x = binary(41, 6, 2);
        let mut grad = vec![0f32; m.params.len()];
        m.nll_gradient(x.view(), &mut grad);
        let nll = |m: &Fvsbn| -> f64 {
            x.rows()
                .into_iter()
                .map(|r| -m.log_likelihood(r.as_slice().unwrap()))
                .sum()
        };
        for (k, &g) in grad.iter().enumerate() {
            let mut plus = m.clone();
            let mut minus = m.clone();
            plus.params[k] += 1e-2;
            minus.params[k] -= 1e-2;
            let h = f64::from(plus.params[k]) - f64::from(minus.params[k]);
            let fd = (nll(&plus) - nll(&minus)) / h;
            let (i, j) = (k / 6, k % 6);
            let want = if k < 36 && j >= i { 0.0 } else { fd };
            assert!(
                (f64::from(g) - want).abs() < 1e-3 * (1.0 + want.abs()),
                "parameter {k}: gradient {g} vs finite difference {want}"
            );
        }
    }

    #[test]
    fn training_lowers_the_validation_nll_and_round_trips() {
        let shape = ImageShape::new(3, 4, 1);
        let x = sticky_chains(2000, 12, 9);
        let (train, valid) = x.view().split_at(ndarray::Axis(0), 1600);
        let data = TrainingSet {
            shape,
            levels: 2,
            pixels: train,
            validation: valid,
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 30,
            batch_size: 50,
            learning_rate: 0.05,
            patience: 3,
            anneal: 0,
            weight_decay: 0.0,
            seed: 1,
            ..TrainSettings::default()
        };
        let start = Fvsbn::init(shape, Order::Raster, 0, train);
        let before = train::mean_nll(&start, valid);
        let (m, curve) = Fvsbn::fit(Order::Raster, 0, &data, &Training::unmonitored(&settings));
        let after = train::mean_nll(&m, valid);
        assert!(after < before - 3.0, "validation NLL {before} → {after}");
        let best = curve
            .iter()
            .filter_map(|r| r.validation_nll)
            .fold(f64::INFINITY, f64::min);
        assert!((after - best).abs() < 1e-9, "the best epoch is kept");
        let back = Fvsbn::from_tensors(shape, &m.hyperparameters(), &m.tensors()).unwrap();
        for img in all_images(12, 2).iter().step_by(97) {
            assert!((back.log_likelihood(img) - m.log_likelihood(img)).abs() < 1e-9);
        }
    }
}
