//! `rnade`: the real-valued NADE (Uria, Murray & Larochelle 2013) for 8-bit intensities. NADE's
//! shared hidden layer (rectified linear units), h_d = max(0, c + Σ_{j<d} W_j (y_j − ½)), feeds a mixture of `components` Gaussians
//! per conditional whose weights, means and log standard deviations are linear in h_d.
//!
//! The model is a density over dequantized intensities y = (x + u)/L, u ∈ [0, 1), L = 256 levels.
//! Training draws u uniformly (a fresh draw per image and step, from the seed), which maximizes
//! a lower bound on the discrete likelihood (Theis et al. 2016). Scores are reported on the
//! discrete 8-bit scale so that every model's nats and bits/dim compare: log P(x) ≈
//! log p((x + ½)/L) − D·log L, the density at the centre of x's bin times the bin's volume (the
//! midpoint rule; exact as the density is smooth over a bin). Colour pixels come R, G, B within a
//! pixel, as for every autoregressive model here.
//!
//! The forward and backward passes are the kernels of [`kernels::rnade`](crate::kernels::rnade).
//! Stored tensors (unpadded, ordering position d in row d): `order` [D], `input_weights` [D, H],
//! `output_weights` [D, 3K, H] (heads: K logits, K means, K log-scales), `output_bias` [D, 3K],
//! `hidden_bias` [H].

use ndarray::ArrayView2;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::data::ImageShape;
use crate::kernels::Isa;
use crate::kernels::rnade::{self as kernel, Grads, INPUT_CENTRE, LOG_SCALE_RANGE, Params, TILE};
use crate::models::nade::padded_width;
use crate::models::shared::ordering::{self, Order};
use crate::models::shared::{order_tensor, stored_order, tensor, uniform};
use crate::models::{DensityModel, Embed, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// Hyper-parameters of an RNADE, as stored in model.json.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Hyperparameters {
    /// Hidden units H.
    pub hidden: usize,
    /// Gaussians per conditional K.
    pub components: usize,
    /// The pixel ordering.
    pub order: Order,
    /// Seed of the initial weights, a random ordering and the dequantization noise.
    pub seed: u64,
}

/// A fitted (or training) RNADE.
///
/// Invariants: `theta` is W (D × hp), V (D × 3K × hp), b (D × 3K), c (hp) in kernel layout, and
/// the padded hidden units (columns `hidden..hp`) of W, V and c are zero.
#[derive(Debug, Clone)]
pub struct Rnade {
    shape: ImageShape,
    levels: u16,
    params: Hyperparameters,
    /// Position i holds the sub-pixel index modelled i-th.
    order: Vec<usize>,
    hp: usize,
    theta: Vec<f32>,
    /// The training step whose dequantization noise `nll_gradient` draws.
    step: u64,
    isa: Isa,
}

/// Sizes of W, V, b and c in kernel layout.
fn part_lens(d: usize, hp: usize, components: usize) -> [usize; 4] {
    [d * hp, d * 3 * components * hp, d * 3 * components, hp]
}

impl Rnade {
    /// A model with small random weights (seeded), components spread evenly over [0, 1], and
    /// equal mixture weights, from which training starts.
    pub fn init(shape: ImageShape, levels: u16, params: Hyperparameters) -> Self {
        let order = ordering::ordering(shape, params.order, params.seed);
        let mut model = Self::zeroed(shape, levels, params, order);
        let d = shape.dims();
        let (h, k, hp) = (params.hidden, params.components, model.hp);
        let mut rng = ChaCha8Rng::seed_from_u64(params.seed ^ 0x524e_4144);
        let [lw, lv, lb, _] = part_lens(d, hp, k);
        let (w, rest) = model.theta.split_at_mut(lw);
        let (v, rest) = rest.split_at_mut(lv);
        let b = &mut rest[..lb];
        for (m, scale) in [
            (w, (6.0 / (d + h) as f32).sqrt()),
            (v, 0.1 * (6.0 / (h + 3 * k) as f32).sqrt()),
        ] {
            for row in m.chunks_exact_mut(hp) {
                row[..h]
                    .iter_mut()
                    .for_each(|x| *x = rng.random_range(-scale..scale));
            }
        }
        for heads in b.chunks_exact_mut(3 * k) {
            for m in 0..k {
                heads[k + m] = (m as f32 + 0.5) / k as f32;
                heads[2 * k + m] = (1.0 / k as f32).ln();
            }
        }
        model
    }

    /// A model with every parameter zero (hyper-parameters already checked).
    fn zeroed(shape: ImageShape, levels: u16, params: Hyperparameters, order: Vec<usize>) -> Self {
        let hp = padded_width(params.hidden);
        Self {
            shape,
            levels,
            params,
            order,
            hp,
            theta: vec![0f32; part_lens(shape.dims(), hp, params.components).iter().sum()],
            step: 0,
            isa: Isa::detect(),
        }
    }

    /// Fits by gradient (`train.optimizer`) with early stopping on 8-bit intensities; returns the model and its curve.
    pub fn fit(
        params: Hyperparameters,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> (Self, Vec<EpochRecord>) {
        let mut model = Self::init(data.shape, data.levels, params);
        let curve = train::train(&mut model, data, training);
        (model, curve)
    }

    fn d(&self) -> usize {
        self.shape.dims()
    }

    /// The parameters in kernel layout.
    pub fn kernel_params(&self) -> Params<'_> {
        let [lw, lv, lb, _] = part_lens(self.d(), self.hp, self.params.components);
        let (w, rest) = self.theta.split_at(lw);
        let (v, rest) = rest.split_at(lv);
        let (b, c) = rest.split_at(lb);
        Params {
            dims: self.d(),
            hidden: self.params.hidden,
            hp: self.hp,
            components: self.params.components,
            w,
            v,
            b,
            c,
        }
    }

    /// The same model, running its kernels on `isa`.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// log L: what each sub-pixel's continuous log-density gives up to become a discrete
    /// log-probability.
    fn log_levels(&self) -> f64 {
        f64::from(self.levels).ln()
    }

    /// Rows of `images` in ordering space as bin centres (x + ½)/L, one after another.
    fn centres(&self, images: ArrayView2<'_, u8>) -> Vec<f32> {
        let l = f32::from(self.levels);
        let mut y = Vec::with_capacity(images.len());
        for img in images.rows() {
            y.extend(self.order.iter().map(|&o| (f32::from(img[o]) + 0.5) / l));
        }
        y
    }

    /// Rows of `images` in ordering space, dequantized with noise that depends only on the
    /// seed, the training step and the image's pixels (so any sharding gives the same draws).
    fn dequantized(&self, images: ArrayView2<'_, u8>) -> Vec<f32> {
        use std::hash::{Hash, Hasher};
        let l = f32::from(self.levels);
        let mut y = Vec::with_capacity(images.len());
        for img in images.rows() {
            let mut hasher = rustc_hash::FxHasher::default();
            img.iter().for_each(|v| v.hash(&mut hasher));
            let mut rng = ChaCha8Rng::seed_from_u64(self.params.seed ^ hasher.finish());
            rng.set_stream(self.step);
            y.extend(
                self.order
                    .iter()
                    .map(|&o| (f32::from(img[o]) + rng.random::<f32>()) / l),
            );
        }
        y
    }

    /// Continuous log-density of one image already in ordering space (values y), for tests.
    #[cfg(test)]
    fn log_density(&self, y: &[f32]) -> f64 {
        let mut out = [0f64];
        kernel::log_density(self.isa, &self.kernel_params(), y, None, &mut out);
        out[0]
    }

    /// Rebuilds the model from model.safetensors.
    pub fn from_tensors(
        shape: ImageShape,
        levels: u16,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let params: Hyperparameters = serde_json::from_value(hyperparameters.clone())?;
        let problems: Vec<_> = [
            crate::models::nade::hidden_problem(params.hidden),
            super::components_problem(params.components),
        ]
        .into_iter()
        .flatten()
        .collect();
        if !problems.is_empty() {
            return Err(ModelError::Params(problems));
        }
        if !matches!(levels, 2..=256) {
            return Err(ModelError::invalid(format!(
                "levels is {levels}, expected 2 to 256"
            )));
        }
        // Every tensor is checked against the shape before anything that size is allocated,
        // so a model.json that claims an enormous image fails on the (small) file's tensors.
        let d = shape.dims();
        let (h, nh) = (params.hidden, 3 * params.components);
        let too_big = || {
            ModelError::invalid(format!(
                "a {shape} image with {h} hidden units is too large"
            ))
        };
        let order = stored_order(tensors, d)?;
        let input = tensor(
            tensors,
            "input_weights",
            d.checked_mul(h).ok_or_else(too_big)?,
        )?;
        let output_rows = d.checked_mul(nh).ok_or_else(too_big)?;
        let output = tensor(
            tensors,
            "output_weights",
            output_rows.checked_mul(h).ok_or_else(too_big)?,
        )?;
        let output_bias = tensor(tensors, "output_bias", output_rows)?;
        let hidden_bias = tensor(tensors, "hidden_bias", h)?;
        let mut model = Self::zeroed(shape, levels, params, order);
        let hp = model.hp;
        let [lw, lv, lb, _] = part_lens(d, hp, params.components);
        let (w, rest) = model.theta.split_at_mut(lw);
        let (v, rest) = rest.split_at_mut(lv);
        let (b, c) = rest.split_at_mut(lb);
        for (m, t) in [(w, input), (v, output)] {
            for (row, src) in m.chunks_exact_mut(hp).zip(t.chunks_exact(h)) {
                row[..h]
                    .iter_mut()
                    .zip(src)
                    .for_each(|(x, &s)| *x = s as f32);
            }
        }
        b.iter_mut()
            .zip(output_bias)
            .for_each(|(x, &s)| *x = s as f32);
        c[..h]
            .iter_mut()
            .zip(hidden_bias)
            .for_each(|(x, &s)| *x = s as f32);
        if model.theta.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::invalid("weights are not all finite"));
        }
        Ok(model)
    }

    /// `rows` rows of the first `hidden` values of each `hp`-wide row of `m`, as a tensor.
    fn unpadded(&self, name: &str, m: &[f32], shape: Vec<usize>) -> NamedTensor {
        let h = self.params.hidden;
        NamedTensor {
            name: name.into(),
            shape,
            data: m
                .chunks_exact(self.hp)
                .flat_map(|row| row[..h].iter().map(|&x| f64::from(x)))
                .collect(),
        }
    }
}

impl GradientModel for Rnade {
    fn params(&self) -> &[f32] {
        &self.theta
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.theta
    }

    fn start_step(&mut self, step: u64) {
        self.step = step;
    }

    /// On dequantized images; the NLL returned is on the discrete scale (+ D·log L per image),
    /// so training and validation curves read in the same nats as the scores.
    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        let [lw, lv, lb, _] = part_lens(self.d(), self.hp, self.params.components);
        let (w, rest) = grad.split_at_mut(lw);
        let (v, rest) = rest.split_at_mut(lv);
        let (b, c) = rest.split_at_mut(lb);
        let mut grads = Grads { w, v, b, c };
        let nll = kernel::gradient(
            self.isa,
            &self.kernel_params(),
            &self.dequantized(images),
            &mut grads,
        );
        nll + images.nrows() as f64 * self.d() as f64 * self.log_levels()
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        let mut out = vec![0f64; images.nrows()];
        self.log_likelihood_batch(images, &mut out);
        -out.iter().sum::<f64>()
    }
}

/// The hidden layer given the whole image, h(x) = max(0, c + W (y − ½)) at the bin centres y
/// that scoring reads: H values, the state the scoring pass ends in.
impl Embed for Rnade {
    fn embedding_width(&self) -> usize {
        self.params.hidden
    }

    fn log_likelihood_and_embedding(
        &self,
        images: ArrayView2<'_, u8>,
        out: &mut [f64],
        embeddings: &mut [f32],
    ) {
        let params = self.kernel_params();
        let correction = self.d() as f64 * self.log_levels();
        crate::models::shared::embed_in_chunks(
            images,
            out,
            embeddings,
            self.params.hidden,
            4 * TILE,
            |rows, out, embeddings| {
                let y = self.centres(rows);
                kernel::log_density_and_hidden(self.isa, &params, &y, embeddings, out);
                out.iter_mut().for_each(|o| *o -= correction);
            },
        );
    }
}

impl DensityModel for Rnade {
    fn kind(&self) -> &'static str {
        <Self as Family>::NAME
    }

    fn shape(&self) -> ImageShape {
        self.shape
    }

    fn levels(&self) -> u16 {
        self.levels
    }

    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
        let d = self.d();
        let mut terms = vec![0f32; d];
        let mut total = [0f64];
        let y = self.centres(ArrayView2::from_shape((1, d), image).expect("one image"));
        kernel::log_density(
            self.isa,
            &self.kernel_params(),
            &y,
            Some(&mut terms),
            &mut total,
        );
        let log_levels = self.log_levels();
        for (&o, &t) in self.order.iter().zip(&terms) {
            out[o] = (f64::from(t) - log_levels) as f32;
        }
        total[0] - d as f64 * log_levels
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        let mut total = [0f64];
        let images = ArrayView2::from_shape((1, self.d()), image).expect("one image");
        self.log_likelihood_batch(images, &mut total);
        total[0]
    }

    /// Scores whole tiles per rayon task, so the kernel shares each weight row across images.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        let params = self.kernel_params();
        let correction = self.d() as f64 * self.log_levels();
        crate::models::shared::score_in_chunks(images, out, 4 * TILE, |rows, out| {
            kernel::log_density(self.isa, &params, &self.centres(rows), None, out);
            out.iter_mut().for_each(|o| *o -= correction);
        });
    }

    fn embedder(&self) -> Option<&dyn Embed> {
        Some(self)
    }

    /// Draws each sub-pixel from its mixture, rounds it to its level (values outside [0, 1]
    /// to the end levels), and conditions what follows on the level's bin centre, as scoring
    /// does.
    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let p = self.kernel_params();
        let (hp, h, k) = (self.hp, self.params.hidden, self.params.components);
        let nh = 3 * k;
        let top = f64::from(self.levels - 1);
        let mut a: Vec<f64> = p.c[..h].iter().map(|&c| f64::from(c)).collect();
        out.fill(0);
        for (d, &o) in self.order.iter().enumerate() {
            let hidden: Vec<f64> = a.iter().map(|&a| a.max(0.0)).collect();
            let z: Vec<f64> = (0..nh)
                .map(|j| {
                    let row = &p.v[(d * nh + j) * hp..(d * nh + j) * hp + h];
                    f64::from(p.b[d * nh + j])
                        + row
                            .iter()
                            .zip(&hidden)
                            .map(|(&v, &h)| f64::from(v) * h)
                            .sum::<f64>()
                })
                .collect();
            let max = z[..k].iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let weights: Vec<f64> = z[..k].iter().map(|l| (l - max).exp()).collect();
            let mut u = uniform(rng) * weights.iter().sum::<f64>();
            let m = weights
                .iter()
                .position(|&w| {
                    u -= w;
                    u < 0.0
                })
                .unwrap_or(k - 1);
            let (lo, hi) = (f64::from(LOG_SCALE_RANGE.0), f64::from(LOG_SCALE_RANGE.1));
            let s = z[2 * k + m].clamp(lo, hi).exp();
            // Box–Muller.
            let normal = (-2.0 * (1.0 - uniform(rng)).ln()).sqrt()
                * (2.0 * std::f64::consts::PI * uniform(rng)).cos();
            let y = z[k + m] + s * normal;
            let level = (y * f64::from(self.levels)).floor().clamp(0.0, top);
            out[o] = level as u8;
            let centre = (level + 0.5) / f64::from(self.levels);
            for (a, &w) in a.iter_mut().zip(&p.w[d * hp..d * hp + h]) {
                *a += f64::from(w) * (centre - f64::from(INPUT_CENTRE));
            }
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!(self.params)
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let p = self.kernel_params();
        let (d, h, nh) = (self.d(), self.params.hidden, p.heads());
        vec![
            order_tensor(&self.order),
            self.unpadded("input_weights", p.w, vec![d, h]),
            self.unpadded("output_weights", p.v, vec![d, nh, h]),
            NamedTensor {
                name: "output_bias".into(),
                shape: vec![d, nh],
                data: p.b.iter().map(|&x| f64::from(x)).collect(),
            },
            NamedTensor {
                name: "hidden_bias".into(),
                shape: vec![h],
                data: p.c[..h].iter().map(|&x| f64::from(x)).collect(),
            },
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::testing::*;
    use crate::train::TrainSettings;
    use ndarray::Array2;

    /// A model with random weights: means kept inside (0.3, 0.7) and scales at most 0.06, so
    /// almost no mass falls outside [0, 1]; mixture weights and scales depend on the context.
    fn random_model(shape: ImageShape, hidden: usize, components: usize, seed: u64) -> Rnade {
        let params = Hyperparameters {
            hidden,
            components,
            order: Order::Random,
            seed,
        };
        let mut m = Rnade::init(shape, 256, params);
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (d, hp, k) = (shape.dims(), m.hp, components);
        let nh = 3 * k;
        let [lw, lv, lb, _] = part_lens(d, hp, k);
        let (w, rest) = m.theta.split_at_mut(lw);
        let (v, rest) = rest.split_at_mut(lv);
        let (b, c) = rest.split_at_mut(lb);
        for row in w.chunks_exact_mut(hp) {
            row[..hidden]
                .iter_mut()
                .for_each(|x| *x = rng.random_range(-3.0..3.0));
        }
        for (r, row) in v.chunks_exact_mut(hp).enumerate() {
            let head = (r % nh) / k;
            let scale = [2.0, 0.0, 0.3][head];
            row[..hidden]
                .iter_mut()
                .for_each(|x| *x = rng.random_range(-scale..=scale));
        }
        for heads in b.chunks_exact_mut(nh) {
            for j in 0..k {
                heads[j] = rng.random_range(-1.0..1.0);
                heads[k + j] = rng.random_range(0.3..0.7);
                heads[2 * k + j] = rng.random_range(-4.5..-3.4);
            }
        }
        c[..hidden]
            .iter_mut()
            .for_each(|x| *x = rng.random_range(-1.0..1.0));
        m
    }

    /// ∫ over a grid of `n` points per axis on [lo, hi]^D of exp(log-density), midpoint rule.
    fn integral(m: &Rnade, lo: f32, hi: f32, n: usize) -> f64 {
        let dims = m.d();
        let step = (hi - lo) / n as f32;
        let points = n.pow(dims as u32);
        (0..points)
            .map(|mut idx| {
                let y: Vec<f32> = (0..dims)
                    .map(|_| {
                        let v = lo + (idx % n) as f32 * step + step / 2.0;
                        idx /= n;
                        v
                    })
                    .collect();
                m.log_density(&y).exp()
            })
            .sum::<f64>()
            * f64::from(step).powi(dims as i32)
    }

    #[test]
    fn density_integrates_to_one() {
        for (dims, n) in [(1, 4000), (2, 500)] {
            let mut m = random_model(ImageShape::new(1, dims, 1), 5, 3, 1);
            // Wider scales for this test, so that the grid resolves every component.
            let [lw, lv, _, _] = part_lens(dims, m.hp, 3);
            for heads in m.theta[lw + lv..].chunks_exact_mut(9).take(dims) {
                heads[6..9].iter_mut().for_each(|s| *s += 1.0);
            }
            let total = integral(&m, -1.0, 2.0, n);
            assert!((total - 1.0).abs() < 1e-3, "D = {dims}: ∫ p = {total}");
        }
    }

    #[test]
    fn discrete_scores_sum_to_the_mass_inside_the_unit_cube() {
        for dims in [1, 2] {
            let m = random_model(ImageShape::new(1, dims, 1), 4, 3, 2);
            let discrete: f64 = all_images(dims, 256)
                .iter()
                .map(|x| m.log_likelihood(x).exp())
                .sum();
            assert!(
                (discrete - 1.0).abs() < 2e-3,
                "D = {dims}: Σ P(x) = {discrete}"
            );
            let inside = integral(&m, 0.0, 1.0, if dims == 1 { 4096 } else { 512 });
            assert!(
                (discrete - inside).abs() < 1e-3,
                "D = {dims}: Σ P(x) = {discrete} vs ∫ over [0,1]^D = {inside}"
            );
        }
    }

    #[test]
    fn samples_follow_the_discrete_scores() {
        // D = 2 at 256 levels, compared on a 32 × 32 grid of 8-level cells.
        let m = random_model(ImageShape::new(1, 2, 1), 3, 2, 4);
        let cell = |x: &[u8]| usize::from(x[0] / 8) * 32 + usize::from(x[1] / 8);
        let mut expected = [0f64; 1024];
        for x in all_images(2, 256) {
            expected[cell(&x)] += m.log_likelihood(&x).exp();
        }
        let total: f64 = expected.iter().sum();
        let n = 100_000;
        let mut counts = [0f64; 1024];
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let mut img = [0u8; 2];
        for _ in 0..n {
            m.sample(&mut rng, &mut img);
            counts[cell(&img)] += 1.0;
        }
        let mut chi2 = 0.0;
        let mut used = 0;
        for (o, e) in counts.iter().zip(&expected) {
            let e = e / total * f64::from(n);
            if e >= 5.0 {
                chi2 += (o - e).powi(2) / e;
                used += 1;
            } else {
                assert!(*o < 20.0, "a cell expected to be empty holds {o} samples");
            }
        }
        let dof = f64::from(used - 1);
        let q = 2.0 / (9.0 * dof);
        let critical = dof * (1.0 - q + 3.09 * q.sqrt()).powi(3);
        assert!(
            used > 10 && chi2 < critical,
            "chi-square {chi2} ≥ {critical} over {used} cells"
        );
    }

    #[test]
    fn maps_sum_to_the_score_and_artifacts_round_trip() {
        let m = random_model(ImageShape::new(2, 2, 3), 7, 4, 5);
        let images: Vec<Vec<u8>> = (0..20u8)
            .map(|i| {
                (0..12)
                    .map(|j| i.wrapping_mul(37).wrapping_add(j * 19))
                    .collect()
            })
            .collect();
        assert_maps_sum_to_likelihood(&m, &images);
        let back = Rnade::from_tensors(m.shape, 256, &m.hyperparameters(), &m.tensors()).unwrap();
        for x in &images {
            assert_eq!(m.log_likelihood(x), back.log_likelihood(x));
        }
    }

    #[test]
    fn dequantization_noise_depends_on_step_not_on_batching() {
        let mut m = random_model(ImageShape::new(1, 3, 1), 3, 2, 6);
        let images = Array2::from_shape_vec((2, 3), vec![0, 128, 255, 7, 7, 7]).unwrap();
        let both = m.dequantized(images.view());
        let second = m.dequantized(images.slice(ndarray::s![1.., ..]));
        assert_eq!(both[3..], second[..]);
        m.start_step(1);
        assert_ne!(m.dequantized(images.view()), both);
        for (y, &x) in both.iter().zip(
            m.order
                .iter()
                .map(|&o| &images[[0, o]])
                .chain(m.order.iter().map(|&o| &images[[1, o]])),
        ) {
            assert!(*y >= f32::from(x) / 256.0 && *y < (f32::from(x) + 1.0) / 256.0);
        }
    }

    /// RGB pixels in a chain R → G → B ([`chained_channels`]): R is spread over many values, G
    /// given R over the noise's 33 (ln 33 ≈ 3.5 nats), and B is certain given G; a wrong channel
    /// order or a B that does not see G fails.
    #[test]
    fn colour_channels_see_their_predecessors() {
        let n = 2000;
        let pixels = chained_channels(n, 8);
        let data = TrainingSet {
            shape: ImageShape::new(1, 1, 3),
            levels: 256,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..400, ..]),
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 300,
            batch_size: 50,
            learning_rate: 0.02,
            patience: 20,
            anneal: 2,
            weight_decay: 0.0,
            seed: 0,
            ..TrainSettings::default()
        };
        let params = Hyperparameters {
            hidden: 32,
            components: 3,
            order: Order::Raster,
            seed: 0,
        };
        let (m, _) = Rnade::fit(params, &data, &Training::unmonitored(&settings));
        let per_channel = per_channel_nll(&m, pixels.view());
        eprintln!("per-channel NLL {per_channel:?}");
        assert!(per_channel[0] > 4.0, "R is uncertain: {per_channel:?}");
        let ideal_g = f64::from(2 * CHAIN_NOISE + 1).ln();
        assert!(
            per_channel[1] > ideal_g - 0.3 && per_channel[1] < ideal_g + 0.7,
            "G given R is as uncertain as its noise: {per_channel:?}"
        );
        // RNADE's conditional is a smooth density on dequantized values, so B given G is at best
        // a triangle two levels wide around the right level, whose own level holds 3/4 of it:
        // −ln 0.75 ≈ 0.29 nats is its floor. (A bound of 0.3 sat on that floor, and the
        // trajectories of the AVX-512, AVX2 and portable kernels, which differ in rounding
        // only, landed on either side of it: 0.22 to 0.43.) A B that did not see G would cost
        // as much as G itself, above 3 nats.
        assert!(per_channel[2] < 0.6, "B given G: {per_channel:?}");
        assert_samples_follow_the_chain(&m, 2);
    }
}
