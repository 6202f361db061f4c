//! `ar` on 8-bit pixels: AR-k whose conditionals are mixtures of discretized logistics
//! (the output distribution of PixelCNN++, Salimans et al. 2017) with every parameter linear in
//! the context:
//!
//! p(x_{o(i)} = v | context) = Σ_m π_m · [σ((y_v + δ − μ_m) / s_m) − σ((y_v − δ − μ_m) / s_m)],
//!
//! where y_v = 2v/(L−1) − 1 is level v on [−1, 1], δ = 1/(L−1) half a bin, and the lowest and
//! highest bins take the logistic's tails (so the L levels sum to exactly 1). The mixture logits,
//! μ_m and log s_m are each `bias + Σ_j w_j f_j`, with f_j the k context sub-pixels scaled to
//! [−1, 1]. 3·K·(k + 1) parameters per position.
//!
//! Why this output and not a 256-way softmax: the softmax needs 256·(k+1) parameters per
//! position and learns each level separately, so levels that are rare in training (most of them,
//! for a given pixel) get poorly estimated probabilities; the discretized logistic ties
//! neighbouring levels together (level 200 being likely makes 201 likely), puts a point mass at
//! 0 and 255 through its tails (the saturated background of MNIST and of over-exposed frames), and
//! its location moves with the context, which is exactly what "this pixel resembles its
//! neighbours" needs. A handful of components (`model.components`) cover multi-modal
//! conditionals such as edges. Measured against the independent `categorical` baseline in the
//! README.
//!
//! Each position is its own problem, but all are trained together by Adam
//! ([`train`](crate::train)) over rayon shards. The arithmetic is plain f64 per position: the
//! cost is D·K·(3k + a few exps) per image, small beside NADE's, so there is no separate fast
//! kernel and nothing to hold one to.

use ndarray::ArrayView2;
use rand::RngCore;
use serde_json::json;

use crate::data::ImageShape;
use crate::models::shared::logistic::{log_sigmoid, sigmoid};
use crate::models::shared::ordering::{self, Context, Order};
use crate::models::shared::{tensor, uniform};
use crate::models::{DensityModel, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// The most mixture components `model.components` accepts.
pub const MAX_COMPONENTS: usize = 64;

/// Log-scales are clamped from below here (s ≥ e⁻⁷ ≈ 0.001 on [−1, 1], a quarter of an 8-bit
/// level), as in PixelCNN++: a component cannot collapse onto one level and blow up.
const MIN_LOG_SCALE: f64 = -7.0;

/// Hyper-parameters of an 8-bit AR-k model, as stored in model.json.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    /// Context size (0 to 64).
    pub k: usize,
    /// The pixel ordering.
    pub order: Order,
    /// How contexts are chosen.
    pub context: Context,
    /// Logistic components per conditional.
    pub components: usize,
    /// Seed of a random ordering.
    pub seed: u64,
}

/// A fitted (or training) 8-bit AR-k model.
///
/// Invariants: `theta` holds, for position i, `3·K·(k+1)` values at `i·stride`: for each
/// component m the mixture logit, the mean and the log-scale, each as a bias followed by k
/// weights; weights of missing context entries (positions with fewer than k predecessors) stay 0.
#[derive(Debug, Clone)]
pub struct ArMixture {
    shape: ImageShape,
    levels: u16,
    params: Hyperparameters,
    /// Position i holds the sub-pixel index modelled i-th.
    order: Vec<usize>,
    /// The context (sub-pixel indices, each earlier) of each position; at most k.
    context: Vec<Vec<usize>>,
    theta: Vec<f32>,
}

impl ArMixture {
    /// Values per position: 3 heads × K components × (bias + k weights).
    fn stride(&self) -> usize {
        3 * self.params.components * (self.params.k + 1)
    }

    /// A model whose components sit at evenly spaced means with equal weights and no context
    /// dependence yet, from which training starts.
    pub fn init(shape: ImageShape, levels: u16, params: Hyperparameters) -> Self {
        let order = ordering::ordering(shape, params.order, params.seed);
        let context = ordering::contexts(shape, &order, params.context, params.k);
        let mut model = Self {
            shape,
            levels,
            theta: Vec::new(),
            params,
            order,
            context,
        };
        let (stride, kk, comps) = (model.stride(), model.params.k + 1, model.params.components);
        let mut theta = vec![0f32; shape.dims() * stride];
        for pos in theta.chunks_mut(stride) {
            for m in 0..comps {
                let base = 3 * m * kk;
                pos[base + kk] = (-1.0 + 2.0 * (m as f64 + 0.5) / comps as f64) as f32;
                pos[base + 2 * kk] = (1.0 / comps as f64).ln() as f32;
            }
        }
        model.theta = theta;
        model
    }

    /// Fits by Adam with early stopping; returns the model and its training curve.
    pub fn fit(
        params: Hyperparameters,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> (Self, Vec<EpochRecord>) {
        let mut model = Self::init(data.shape, data.levels, params);
        let curve = train::train(&mut model, data, training);
        (model, curve)
    }

    /// Rebuilds the model from model.safetensors, checking that every context looks only at
    /// earlier sub-pixels.
    pub fn from_tensors(
        shape: ImageShape,
        levels: u16,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let params: Hyperparameters = serde_json::from_value(hyperparameters.clone())?;
        if !matches!(levels, 2..=256) {
            return Err(ModelError::invalid(format!(
                "levels is {levels}, expected 2 to 256"
            )));
        }
        let problems: Vec<_> = [
            super::k_problem(params.k),
            super::components_problem(params.components),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            return Err(ModelError::Params(problems));
        }
        let d = shape.dims();
        let (order, context) = super::binary::stored_contexts(d, params.k, tensors)?;
        let mut model = Self {
            shape,
            levels,
            params,
            order,
            context,
            theta: Vec::new(),
        };
        let theta = tensor(tensors, "theta", d * model.stride())?;
        if theta.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::invalid("tensor `theta` is not all finite"));
        }
        model.theta = theta.iter().map(|&v| v as f32).collect();
        Ok(model)
    }

    /// The context of position i scaled to [−1, 1] (k values; missing entries 0).
    fn features(&self, i: usize, image: &[u8], f: &mut [f64]) {
        let scale = 2.0 / f64::from(self.levels - 1);
        f.fill(0.0);
        for (f, &c) in f.iter_mut().zip(&self.context[i]) {
            *f = f64::from(image[c]) * scale - 1.0;
        }
    }

    /// The three heads of component m at position i: (mixture logit, mean, log-scale before
    /// clamping).
    fn heads(&self, i: usize, m: usize, f: &[f64]) -> [f64; 3] {
        let kk = self.params.k + 1;
        let base = i * self.stride() + 3 * m * kk;
        std::array::from_fn(|h| {
            let p = &self.theta[base + h * kk..base + (h + 1) * kk];
            f64::from(p[0])
                + p[1..]
                    .iter()
                    .zip(f)
                    .map(|(&w, &x)| f64::from(w) * x)
                    .sum::<f64>()
        })
    }

    /// log p(v | context) at position i, adding ∂(−log p)/∂θ_i into `grad` (the position's
    /// `stride` values) when given.
    fn conditional(&self, i: usize, f: &[f64], v: u8, grad: Option<&mut [f32]>) -> f64 {
        let comps = self.params.components;
        let top = f64::from(self.levels - 1);
        let v = f64::from(v).min(top);
        let y = 2.0 * v / top - 1.0;
        let half = 1.0 / top;
        let mut heads = [[0f64; 3]; MAX_COMPONENTS];
        let mut terms = [0f64; MAX_COMPONENTS]; // log π_m + log Δ_m
        let mut slopes = [(0f64, 0f64); MAX_COMPONENTS]; // ∂log Δ_m/∂μ, ∂log Δ_m/∂ls
        for (m, h) in heads[..comps].iter_mut().enumerate() {
            *h = self.heads(i, m, f);
        }
        let log_norm = log_sum_exp(heads[..comps].iter().map(|h| h[0]));
        for m in 0..comps {
            let [logit, mu, raw_ls] = heads[m];
            let ls = raw_ls.max(MIN_LOG_SCALE);
            let inv_s = (-ls).exp();
            let plus = (y + half - mu) * inv_s;
            let minus = (y - half - mu) * inv_s;
            let (log_delta, g_plus, g_minus) = bin_log_probability(plus, minus, v == 0.0, v == top);
            terms[m] = logit - log_norm + log_delta;
            let d_ls = if raw_ls > MIN_LOG_SCALE {
                -(g_plus * plus + g_minus * minus)
            } else {
                0.0
            };
            slopes[m] = (-(g_plus + g_minus) * inv_s, d_ls);
        }
        let log_p = log_sum_exp(terms[..comps].iter().copied());
        if let Some(grad) = grad {
            let kk = self.params.k + 1;
            for m in 0..comps {
                let r = (terms[m] - log_p).exp();
                let pi = (heads[m][0] - log_norm).exp();
                let d_heads = [pi - r, -r * slopes[m].0, -r * slopes[m].1];
                for (h, &g) in d_heads.iter().enumerate() {
                    let p = &mut grad[3 * m * kk + h * kk..3 * m * kk + (h + 1) * kk];
                    p[0] += g as f32;
                    for (p, &x) in p[1..].iter_mut().zip(f) {
                        *p += (g * x) as f32;
                    }
                }
            }
        }
        log_p
    }

    /// log p(x), writing each position's term into `out` (sub-pixel layout) when given, and
    /// adding ∂(−log p)/∂θ into `grad` when given.
    fn chain(
        &self,
        image: &[u8],
        mut out: Option<&mut [f32]>,
        mut grad: Option<&mut [f32]>,
    ) -> f64 {
        let stride = self.stride();
        let mut f = vec![0f64; self.params.k];
        let mut total = 0.0;
        for (i, &d) in self.order.iter().enumerate() {
            self.features(i, image, &mut f);
            let g = grad
                .as_deref_mut()
                .map(|g| &mut g[i * stride..(i + 1) * stride]);
            let ll = self.conditional(i, &f, image[d], g);
            if let Some(out) = out.as_deref_mut() {
                out[d] = ll as f32;
            }
            total += ll;
        }
        total
    }
}

/// log P of a bin of the logistic, with the bin's edges `plus` and `minus` in standard units,
/// and its derivatives with respect to them. The lowest bin extends to −∞, the highest to +∞.
///
/// Fast path: σ at both edges (two exponentials) and one logarithm of their difference; where
/// the difference is below 1e-6 it would lose digits, so the tail-safe log-space form is used.
fn bin_log_probability(plus: f64, minus: f64, lowest: bool, highest: bool) -> (f64, f64, f64) {
    if lowest {
        return (log_sigmoid(plus), sigmoid(-plus), 0.0);
    }
    if highest {
        return (log_sigmoid(-minus), 0.0, -sigmoid(minus));
    }
    // σ(t) and σ(t)(1 − σ(t)) = σ(t)·σ(−t) from one exponential, accurate in both tails.
    let edge = |t: f64| {
        let e = (-t.abs()).exp();
        let big = 1.0 / (1.0 + e);
        let (s, s_neg) = if t >= 0.0 {
            (big, e * big)
        } else {
            (e * big, big)
        };
        (s, s_neg)
    };
    let (sp, sp_neg) = edge(plus);
    let (sm, sm_neg) = edge(minus);
    // σ(plus) − σ(minus) = σ(−minus) − σ(−plus): take the form whose terms are not near 1.
    let delta = if plus + minus > 0.0 {
        sm_neg - sp_neg
    } else {
        sp - sm
    };
    if delta > 1e-6 {
        (delta.ln(), sp * sp_neg / delta, -sm * sm_neg / delta)
    } else {
        let ld = log_sigmoid_difference(plus, minus);
        let density = |t: f64| (log_sigmoid(t) + log_sigmoid(-t) - ld).exp();
        (ld, density(plus), -density(minus))
    }
}

/// log(e^a₁ + e^a₂ + …), stable for any magnitudes.
fn log_sum_exp(values: impl Iterator<Item = f64> + Clone) -> f64 {
    let max = values.clone().fold(f64::NEG_INFINITY, f64::max);
    if max == f64::NEG_INFINITY {
        return max;
    }
    max + values.map(|v| (v - max).exp()).sum::<f64>().ln()
}

/// log(σ(b) − σ(a)) for b > a, without cancellation in either tail: σ(b) − σ(a) = σ(−a) − σ(−b),
/// so the form whose terms are far from 1 is used.
fn log_sigmoid_difference(b: f64, a: f64) -> f64 {
    let (hi, lo) = if a + b > 0.0 { (-a, -b) } else { (b, a) };
    let (lh, ll) = (log_sigmoid(hi), log_sigmoid(lo));
    lh + (-(ll - lh).exp_m1()).ln()
}

impl GradientModel for ArMixture {
    fn params(&self) -> &[f32] {
        &self.theta
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.theta
    }

    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        images
            .rows()
            .into_iter()
            .map(|row| {
                -self.chain(
                    row.as_slice().expect("rows are contiguous"),
                    None,
                    Some(grad),
                )
            })
            .sum()
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        images
            .rows()
            .into_iter()
            .map(|row| -self.log_likelihood(row.as_slice().expect("rows are contiguous")))
            .sum()
    }
}

impl DensityModel for ArMixture {
    fn kind(&self) -> &'static str {
        <super::Ar as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        self.levels
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        self.chain(image, Some(out), None)
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        self.chain(image, None, None)
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let comps = self.params.components;
        let top = f64::from(self.levels - 1);
        let mut f = vec![0f64; self.params.k];
        out.fill(0);
        for (i, &d) in self.order.iter().enumerate() {
            self.features(i, out, &mut f);
            let heads: Vec<[f64; 3]> = (0..comps).map(|m| self.heads(i, m, &f)).collect();
            let log_norm = log_sum_exp(heads.iter().map(|h| h[0]));
            let u = uniform(rng);
            let mut cdf = 0.0;
            let mut chosen = comps - 1;
            for (m, h) in heads.iter().enumerate() {
                cdf += (h[0] - log_norm).exp();
                if u < cdf {
                    chosen = m;
                    break;
                }
            }
            let [_, mu, ls] = heads[chosen];
            // Inverse CDF of the logistic; rounding to the nearest level is exactly the
            // discretization (the end bins take the tails).
            let u = uniform(rng).clamp(1e-12, 1.0 - 1e-12);
            let y = mu + ls.max(MIN_LOG_SCALE).exp() * (u / (1.0 - u)).ln();
            out[d] = ((y + 1.0) / 2.0 * top).round().clamp(0.0, top) as u8;
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        let mut v = json!(self.params);
        v["output"] = json!("discretized_logistic_mixture");
        v
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let d = self.shape.dims();
        let mut tensors =
            super::binary::order_and_context_tensors(&self.order, &self.context, self.params.k);
        tensors.push(NamedTensor {
            name: "theta".into(),
            shape: vec![d, self.stride()],
            data: self.theta.iter().map(|&v| f64::from(v)).collect(),
        });
        tensors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::*;
    use crate::train::TrainSettings;
    use ndarray::Array2;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn params(k: usize, components: usize) -> Hyperparameters {
        Hyperparameters {
            k,
            order: Order::Raster,
            context: Context::Previous,
            components,
            seed: 3,
        }
    }

    /// A model with random parameters of a size that makes every head matter.
    fn random_model(shape: ImageShape, levels: u16, p: Hyperparameters, seed: u64) -> ArMixture {
        let mut m = ArMixture::init(shape, levels, p);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let kk = m.params.k + 1;
        let stride = m.stride();
        for (i, pos) in m.theta.chunks_mut(stride).enumerate() {
            for (j, x) in pos.iter_mut().enumerate() {
                let slot = j % kk;
                if slot > m.context[i].len() {
                    continue; // a missing context entry's weight stays 0
                }
                let head = (j / kk) % 3;
                *x = match (head, slot) {
                    (2, 0) => rng.random_range(-3.0..-0.5),
                    (_, 0) => rng.random_range(-1.0..1.0),
                    _ => rng.random_range(-1.5..1.5),
                };
            }
        }
        m
    }

    #[test]
    fn normalizes_over_every_8bit_image_of_two_pixels() {
        // 1×2 with 256 levels: 65,536 images.
        let m = random_model(ImageShape::new(1, 2, 1), 256, params(1, 3), 1);
        let total = total_probability(&m);
        assert!((total - 1.0).abs() < 1e-9, "Σ p(x) = {total}");
    }

    #[test]
    fn normalizes_over_rgb_pixels_with_reduced_levels() {
        // 1×2×3 with 6 levels: 46,656 images; G sees R, B sees R and G.
        for context in [Context::Previous, Context::Neighbourhood] {
            let p = Hyperparameters {
                context,
                order: Order::Random,
                ..params(4, 2)
            };
            let m = random_model(ImageShape::new(1, 2, 3), 6, p, 2);
            let total = total_probability(&m);
            assert!((total - 1.0).abs() < 1e-9, "{context:?}: Σ p(x) = {total}");
            assert_maps_sum_to_likelihood(&m, &all_images(6, 6)[..200]);
        }
    }

    #[test]
    fn samples_follow_the_model() {
        let m = random_model(ImageShape::new(1, 3, 1), 5, params(2, 2), 4); // 125 images
        assert_samples_follow_the_model(&m, 100_000, 5);
    }

    #[test]
    fn gradient_matches_finite_differences() {
        let m = random_model(ImageShape::new(1, 3, 1), 16, params(2, 3), 6);
        let images = Array2::from_shape_vec((3, 3), vec![0, 7, 15, 3, 3, 9, 15, 14, 0]).unwrap();
        let mut grad = vec![0f32; m.theta.len()];
        m.nll_gradient(images.view(), &mut grad);
        let nll = |theta: &[f32]| {
            let mut m2 = m.clone();
            m2.theta.copy_from_slice(theta);
            m2.total_nll(images.view())
        };
        let mut checked = 0;
        for j in 0..m.theta.len() {
            let eps = 1e-3f32;
            let mut t = m.theta.clone();
            t[j] += eps;
            let up = nll(&t);
            t[j] -= 2.0 * eps;
            let down = nll(&t);
            let numeric = (up - down) / (2.0 * f64::from(eps));
            let analytic = f64::from(grad[j]);
            assert!(
                (numeric - analytic).abs() < 2e-3 * numeric.abs().max(1.0),
                "parameter {j}: numeric {numeric} vs analytic {analytic}"
            );
            checked += usize::from(analytic != 0.0);
        }
        assert!(
            checked > m.theta.len() / 2,
            "most parameters have a gradient"
        );
    }

    #[test]
    fn both_bin_formulas_agree() {
        for (plus, minus) in [
            (0.3, -0.2),
            (5.0, 4.0),
            (-4.0, -5.0),
            (12.0, 11.9),
            (0.01, -0.01),
        ] {
            let (fast, gp, gm) = bin_log_probability(plus, minus, false, false);
            let slow = log_sigmoid_difference(plus, minus);
            let density = |t: f64| (log_sigmoid(t) + log_sigmoid(-t) - slow).exp();
            assert!(
                (fast - slow).abs() < 1e-9 * slow.abs().max(1.0),
                "{plus} {minus}"
            );
            assert!((gp - density(plus)).abs() < 1e-8 * gp.abs().max(1.0));
            assert!((gm + density(minus)).abs() < 1e-8 * gm.abs().max(1.0));
        }
    }

    #[test]
    fn log_sigmoid_difference_is_exact_in_both_tails() {
        for (b, a) in [(0.3, -0.2), (40.0, 39.0), (-39.0, -40.0), (1e-9, -1e-9)] {
            let want = (sigmoid(b) - sigmoid(a)).ln();
            let exact_tail = if a > 20.0 {
                -a + (1.0 - (a - b).exp()).ln() // σ(−a) − σ(−b) ≈ e⁻ᵃ − e⁻ᵇ
            } else if b < -20.0 {
                b + (1.0 - (a - b).exp()).ln()
            } else {
                want
            };
            let got = log_sigmoid_difference(b, a);
            assert!(
                (got - exact_tail).abs() < 1e-6 * exact_tail.abs().max(1.0),
                "{b} {a}: {got} vs {exact_tail}"
            );
        }
    }

    /// RGB pixels in a chain R → G → B ([`chained_channels`]): R is spread over many values, G
    /// given R over the noise's 33 (ln 33 ≈ 3.5 nats), and B is certain given G; a wrong channel
    /// order or a B that does not see G fails.
    #[test]
    fn colour_channels_see_their_predecessors() {
        let n = 1500;
        let pixels = chained_channels(n, 8);
        let data = TrainingSet {
            shape: ImageShape::new(1, 1, 3),
            levels: 256,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..300, ..]),
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 150,
            batch_size: 50,
            learning_rate: 0.03,
            patience: 10,
            anneal: 2,
            weight_decay: 0.0,
            seed: 0,
            ..TrainSettings::default()
        };
        let (m, _) = ArMixture::fit(params(2, 2), &data, &Training::unmonitored(&settings));
        let per_channel = per_channel_nll(&m, pixels.view());
        eprintln!("per-channel NLL {per_channel:?}");
        assert!(per_channel[0] > 4.0, "R is uncertain: {per_channel:?}");
        let ideal_g = f64::from(2 * CHAIN_NOISE + 1).ln();
        assert!(
            per_channel[1] > ideal_g - 0.3 && per_channel[1] < ideal_g + 0.7,
            "G given R is as uncertain as its noise: {per_channel:?}"
        );
        assert!(per_channel[2] < 0.15, "B given G: {per_channel:?}");
        assert_samples_follow_the_chain(&m, 1);
    }

    #[test]
    fn artifacts_round_trip() {
        let m = random_model(ImageShape::new(2, 2, 1), 256, params(2, 2), 9);
        let back =
            ArMixture::from_tensors(m.shape, 256, &m.hyperparameters(), &m.tensors()).unwrap();
        let x = [0u8, 100, 255, 3];
        assert_eq!(m.log_likelihood(&x), back.log_likelihood(&x));
    }
}
