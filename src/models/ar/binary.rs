//! `ar`: AR-k over binary pixels. Each sub-pixel, in a chosen ordering, is a logistic
//! regression on the k earlier sub-pixels of its context:
//! p(x_{o(i)} = 1 | x_{o(<i)}) = σ(b_i + Σ_j w_ij · x_{c_ij}).
//!
//! With k = 1 and `context = "previous"` this is a first-order Markov chain along the ordering
//! (2D − 1 free parameters). Every conditional is its own convex problem, fitted exactly by
//! Newton's method ([`logistic`](crate::models::shared::logistic)), in parallel over pixels with rayon: the
//! maximum-penalized-likelihood answer, with no learning rate to tune.

use rand::RngCore;
use rayon::prelude::*;
use serde_json::json;

use crate::data::ImageShape;
use crate::models::shared::logistic::{self, Patterns, sigmoid};
use crate::models::shared::ordering::{self, Context, Order};
use crate::models::shared::{
    binary_chain_log_likelihood, order_tensor, permutation, tensor, uniform,
};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::TrainingSet;

/// Hyper-parameters of a binary AR-k model, as stored in model.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    /// Context size (0 to 64).
    pub k: usize,
    /// The pixel ordering.
    pub order: Order,
    /// How contexts are chosen.
    pub context: Context,
    /// L2 penalty on each conditional's weights and bias.
    pub l2: f64,
    /// Seed of a random ordering.
    pub seed: u64,
}

/// A fitted AR-k model.
#[derive(Debug, Clone)]
pub struct Ar {
    shape: ImageShape,
    params: Hyperparameters,
    /// Position i holds the sub-pixel index modelled i-th.
    order: Vec<usize>,
    /// The context (sub-pixel indices) of each position.
    context: Vec<Vec<usize>>,
    /// Weights of each position's conditional, one per context entry.
    weights: Vec<Vec<f64>>,
    /// Bias of each position's conditional.
    bias: Vec<f64>,
}

impl Ar {
    /// Fits every conditional exactly, in parallel over positions.
    pub fn fit(params: Hyperparameters, data: &TrainingSet<'_>) -> Self {
        let order = ordering::ordering(data.shape, params.order, params.seed);
        let context = ordering::contexts(data.shape, &order, params.context, params.k);
        // Pixel-major copy: each context column is then one contiguous run of bytes, and a
        // pixel's keys are built a feature at a time in loops that vectorize.
        let columns = data.pixels.t().as_standard_layout().into_owned();
        let fitted: Vec<Vec<f64>> = (0..order.len())
            .into_par_iter()
            .map(|i| {
                let mut keys = vec![0u64; columns.ncols()];
                for (j, &c) in context[i].iter().enumerate() {
                    let column = columns.row(c);
                    for (key, &v) in keys.iter_mut().zip(column.iter()) {
                        *key |= u64::from(v != 0) << j;
                    }
                }
                let mut patterns = Patterns::default();
                for (&key, &y) in keys.iter().zip(columns.row(order[i]).iter()) {
                    patterns.add(key, y != 0);
                }
                logistic::fit(&patterns, context[i].len(), params.l2)
            })
            .collect();
        let (weights, bias) = fitted
            .into_iter()
            .map(|mut beta| {
                let b = beta.pop().expect("bias");
                (beta, b)
            })
            .unzip();
        Self {
            shape: data.shape,
            params,
            order,
            context,
            weights,
            bias,
        }
    }

    /// Rebuilds the model from model.safetensors, checking that every context looks only at
    /// earlier sub-pixels (so the loaded model is a normalized density).
    pub fn from_tensors(
        shape: ImageShape,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let params: Hyperparameters = serde_json::from_value(hyperparameters.clone())?;
        if let Some(p) = super::k_problem(params.k) {
            return Err(ModelError::Params(vec![p]));
        }
        let d = shape.dims();
        let k = params.k;
        let (order, context) = stored_contexts(d, k, tensors)?;
        let weights_f = tensor(tensors, "weights", d * k)?;
        let bias = tensor(tensors, "bias", d)?.to_vec();
        let weights: Vec<Vec<f64>> = context
            .iter()
            .enumerate()
            .map(|(i, ctx)| weights_f[i * k..i * k + ctx.len()].to_vec())
            .collect();
        if weights
            .iter()
            .flatten()
            .chain(&bias)
            .any(|v| !v.is_finite())
        {
            return Err(ModelError::invalid("weights are not all finite"));
        }
        Ok(Self {
            shape,
            params,
            order,
            context,
            weights,
            bias,
        })
    }

    /// The logit of position `i` given the image so far.
    fn logit(&self, i: usize, image: &[u8]) -> f64 {
        self.bias[i]
            + self.context[i]
                .iter()
                .zip(&self.weights[i])
                .map(|(&c, &w)| if image[c] != 0 { w } else { 0.0 })
                .sum::<f64>()
    }

    /// Weights and bias of position `i`, for tests.
    #[cfg(test)]
    fn conditional(&self, i: usize) -> (&[f64], f64) {
        (&self.weights[i], self.bias[i])
    }
}

impl DensityModel for Ar {
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
        binary_chain_log_likelihood(&self.order, image, Some(out), |i| self.logit(i, image))
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        binary_chain_log_likelihood(&self.order, image, None, |i| self.logit(i, image))
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        out.fill(0);
        for (i, &d) in self.order.iter().enumerate() {
            out[d] = u8::from(uniform(rng) < sigmoid(self.logit(i, out)));
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!(self.params)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let d = self.shape.dims();
        let k = self.params.k;
        let mut weights = vec![0.0; d * k];
        for (i, w) in self.weights.iter().enumerate() {
            weights[i * k..i * k + w.len()].copy_from_slice(w);
        }
        let mut tensors = order_and_context_tensors(&self.order, &self.context, k);
        tensors.push(NamedTensor {
            name: "weights".into(),
            shape: vec![d, k],
            data: weights,
        });
        tensors.push(NamedTensor {
            name: "bias".into(),
            shape: vec![d],
            data: self.bias.clone(),
        });
        tensors
    }
}

/// The `order` [D] and `context` [D, k] tensors of an AR-k model (context padded with −1).
pub(super) fn order_and_context_tensors(
    order: &[usize],
    context: &[Vec<usize>],
    k: usize,
) -> Vec<NamedTensor> {
    let d = order.len();
    let mut padded = vec![-1.0; d * k];
    for (i, ctx) in context.iter().enumerate() {
        for (j, &c) in ctx.iter().enumerate() {
            padded[i * k + j] = c as f64;
        }
    }
    vec![
        order_tensor(order),
        NamedTensor {
            name: "context".into(),
            shape: vec![d, k],
            data: padded,
        },
    ]
}

/// Reads the `order` and `context` tensors of an AR-k model, checking that the order is a
/// permutation, that every context entry is an earlier sub-pixel (so the loaded model is a
/// normalized density), and that padding (−1) only trails.
pub(super) fn stored_contexts(
    d: usize,
    k: usize,
    tensors: &[NamedTensor],
) -> Result<(Vec<usize>, Vec<Vec<usize>>), ModelError> {
    let order = permutation(tensor(tensors, "order", d)?)?;
    let context_f = tensor(tensors, "context", d * k)?;
    let mut position = vec![0; d];
    order.iter().enumerate().for_each(|(i, &o)| position[o] = i);
    let mut context = Vec::with_capacity(d);
    for i in 0..d {
        let mut ctx = Vec::new();
        let mut padded = false;
        for &c in &context_f[i * k..(i + 1) * k] {
            if c < 0.0 {
                padded = true;
            } else if !padded && c.fract() == 0.0 && (c as usize) < d && position[c as usize] < i {
                ctx.push(c as usize);
            } else {
                return Err(ModelError::invalid(format!(
                    "tensor `context`: position {i} looks at sub-pixel {c}, which is not an earlier one (or follows padding)"
                )));
            }
        }
        context.push(ctx);
    }
    Ok((order, context))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::*;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random_binary(n: usize, dims: usize, seed: u64) -> Array2<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        // Correlated pixels: each copies its left neighbour 70% of the time.
        let mut v = Vec::with_capacity(n * dims);
        for _ in 0..n {
            let mut prev = rng.random_bool(0.5);
            for _ in 0..dims {
                prev = if rng.random_bool(0.7) {
                    prev
                } else {
                    rng.random_bool(0.3)
                };
                v.push(u8::from(prev));
            }
        }
        Array2::from_shape_vec((n, dims), v).unwrap()
    }

    fn fit(shape: ImageShape, k: usize, order: Order, context: Context, seed: u64) -> Ar {
        let pixels = random_binary(500, shape.dims(), seed);
        let data = TrainingSet {
            shape,
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let params = Hyperparameters {
            k,
            order,
            context,
            l2: 0.1,
            seed,
        };
        Ar::fit(params, &data)
    }

    /// Binary RGB in a chain R → G → B: AR-2 takes the channels in R, G, B order (its two
    /// predecessors of B are R and G).
    #[test]
    fn colour_channels_see_their_predecessors() {
        let shape = ImageShape::new(1, 1, 3);
        let x = binary_chained_channels(3000, 5);
        let data = TrainingSet {
            shape,
            levels: 2,
            pixels: x.view(),
            validation: x.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let params = Hyperparameters {
            k: 2,
            order: Order::Raster,
            context: Context::Previous,
            l2: 0.1,
            seed: 0,
        };
        let m = Ar::fit(params, &data);
        assert_binary_chain_in_rgb_order(&m, x.view());
        assert_samples_follow_the_binary_chain(&m);
    }

    #[test]
    fn every_ordering_and_context_normalizes_over_all_images() {
        let shape = ImageShape::new(3, 4, 1); // D = 12: 4,096 images
        for order in [Order::Raster, Order::Random] {
            for context in [Context::Previous, Context::Neighbourhood] {
                for k in [0, 1, 3, 11] {
                    let m = fit(shape, k, order, context, 9);
                    let total = total_probability(&m);
                    assert!(
                        (total - 1.0).abs() < 1e-6,
                        "{order:?} {context:?} k={k}: Σ p(x) = {total}"
                    );
                }
            }
        }
        let m = fit(
            ImageShape::new(2, 2, 3),
            4,
            Order::Random,
            Context::Neighbourhood,
            2,
        );
        assert!((total_probability(&m) - 1.0).abs() < 1e-6, "RGB sub-pixels");
        assert_maps_sum_to_likelihood(&m, &all_images(12, 2)[..300]);
    }

    #[test]
    fn ar1_recovers_the_parameters_of_a_known_markov_chain() {
        // x_0 ~ Bernoulli(σ(b_0)); x_i | x_{i-1} ~ Bernoulli(σ(b_i + w_i x_{i-1})).
        let d = 6;
        let b = [0.5, -1.0, 0.3, -0.2, 1.0, -1.5];
        let w = [0.0, 2.5, -1.0, 1.5, -2.0, 3.0];
        let n = 200_000;
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut v = Vec::with_capacity(n * d);
        for _ in 0..n {
            let mut prev = 0.0;
            for i in 0..d {
                let x = rng.random_bool(sigmoid(b[i] + w[i] * prev));
                v.push(u8::from(x));
                prev = f64::from(u8::from(x));
            }
        }
        let pixels = Array2::from_shape_vec((n, d), v).unwrap();
        let data = TrainingSet {
            shape: ImageShape::new(1, d, 1),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let params = Hyperparameters {
            k: 1,
            order: Order::Raster,
            context: Context::Previous,
            l2: 1e-3,
            seed: 0,
        };
        let m = Ar::fit(params, &data);
        for i in 0..d {
            let (wi, bi) = m.conditional(i);
            // Standard errors at n = 200,000 are below 0.02; allow 0.06.
            assert!((bi - b[i]).abs() < 0.06, "bias {i}: {bi} vs {}", b[i]);
            if i > 0 {
                assert!(
                    (wi[0] - w[i]).abs() < 0.06,
                    "weight {i}: {} vs {}",
                    wi[0],
                    w[i]
                );
            }
        }
    }

    #[test]
    fn samples_follow_the_model() {
        // D = 6: a chi-square test of 200,000 samples against the 64 exact probabilities.
        let m = fit(
            ImageShape::new(2, 3, 1),
            2,
            Order::Random,
            Context::Neighbourhood,
            4,
        );
        assert_samples_follow_the_model(&m, 200_000, 8);
    }

    #[test]
    fn tensors_round_trip_and_refuse_a_context_that_looks_ahead() {
        let m = fit(
            ImageShape::new(3, 3, 1),
            3,
            Order::Random,
            Context::Neighbourhood,
            1,
        );
        let t = m.tensors();
        let back = Ar::from_tensors(m.shape, &m.hyperparameters(), &t).unwrap();
        for x in all_images(9, 2).iter().step_by(7) {
            assert_eq!(back.log_likelihood(x), m.log_likelihood(x));
        }
        let mut bad = t.clone();
        let context = bad.iter_mut().find(|t| t.name == "context").unwrap();
        context.data[3] = m.order[8] as f64; // position 1 looking at the last sub-pixel
        assert!(Ar::from_tensors(m.shape, &m.hyperparameters(), &bad).is_err());
    }
}
