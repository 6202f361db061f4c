//! `nade`: the neural autoregressive distribution estimator (Larochelle & Murray 2011) for
//! binary pixels. One hidden layer is shared by every conditional:
//! h_d = σ(c + Σ_{j<d} W_j x_{o(j)}), p(x_{o(d)} = 1 | x_{o(<d)}) = σ(b_d + V_d · h_d),
//! so the model has 2·D·H + D + H parameters and costs O(D·H) per image.
//!
//! Trained by Adam over rayon shards ([`train`](crate::train)); the forward and backward passes
//! are the fused kernels of [`kernels::nade`](crate::kernels::nade). Stored tensors (unpadded,
//! position d of the ordering in row d): `order` [D], `input_weights` [D, H] (W_d),
//! `output_weights` [D, H] (V_d), `output_bias` [D] (b), `hidden_bias` [H] (c).

use ndarray::ArrayView2;
use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::json;

use crate::data::ImageShape;
use crate::kernels::Isa;
use crate::kernels::math::LANES;
use crate::kernels::nade::{self as kernel, Grads, Params, TILE};
use crate::models::shared::logistic::sigmoid;
use crate::models::shared::ordering::{self, Order};
use crate::models::shared::{logits_at_pixel_means, order_tensor, stored_order, tensor, uniform};
use crate::models::{DensityModel, Embed, Family, ModelError, NamedTensor};
use crate::train::{self, EpochRecord, GradientModel, Training, TrainingSet};

/// The largest hidden layer `model.hidden` accepts.
pub const MAX_HIDDEN: usize = 65_536;

/// H rounded up to the kernels' vector width.
pub fn padded_width(hidden: usize) -> usize {
    hidden.div_ceil(LANES) * LANES
}

/// Parameters in kernel layout: W and V (D × hp each), b (D), c (hp).
fn param_len(d: usize, hp: usize) -> usize {
    2 * d * hp + d + hp
}

/// A fitted (or training) NADE.
///
/// Invariants: `params` is W (D × hp), V (D × hp), b (D), c (hp) in kernel layout, and the
/// padded hidden units (columns `hidden..hp`) of W, V and c are zero.
#[derive(Debug, Clone)]
pub struct Nade {
    shape: ImageShape,
    order_kind: Order,
    seed: u64,
    /// Position i holds the sub-pixel index modelled i-th.
    order: Vec<usize>,
    hidden: usize,
    hp: usize,
    params: Vec<f32>,
    /// The instruction set the kernels run on (the process's choice unless a benchmark or
    /// test picks another).
    isa: Isa,
}

impl Nade {
    /// A model with small random weights (seeded) and output biases at the logits of the pixel
    /// means, from which training starts.
    pub fn init(
        shape: ImageShape,
        hidden: usize,
        order_kind: Order,
        seed: u64,
        pixels: ArrayView2<'_, u8>,
    ) -> Self {
        let d = shape.dims();
        let hp = padded_width(hidden);
        let order = ordering::ordering(shape, order_kind, seed);
        let mut model = Self {
            shape,
            order_kind,
            seed,
            order,
            hidden,
            hp,
            params: vec![0f32; param_len(d, hp)],
            isa: Isa::detect(),
        };
        let scale = (6.0 / (d + hidden) as f32).sqrt();
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x4e41_4445);
        let (w, rest) = model.params.split_at_mut(d * hp);
        let (v, rest) = rest.split_at_mut(d * hp);
        for m in [w, v] {
            for row in m.chunks_exact_mut(hp) {
                row[..hidden]
                    .iter_mut()
                    .for_each(|x| *x = rng.random_range(-scale..scale));
            }
        }
        rest[..d].copy_from_slice(&logits_at_pixel_means(pixels, &model.order));
        model
    }

    /// Fits by gradient (`train.optimizer`) with early stopping on binary pixels; returns the model and its curve.
    pub fn fit(
        hidden: usize,
        order_kind: Order,
        seed: u64,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> (Self, Vec<EpochRecord>) {
        let mut model = Self::init(data.shape, hidden, order_kind, seed, data.pixels);
        let curve = train::train(&mut model, data, training);
        (model, curve)
    }

    fn d(&self) -> usize {
        self.shape.dims()
    }

    /// The parameters in kernel layout.
    pub fn kernel_params(&self) -> Params<'_> {
        let (d, hp) = (self.d(), self.hp);
        let (w, rest) = self.params.split_at(d * hp);
        let (v, rest) = rest.split_at(d * hp);
        let (b, c) = rest.split_at(d);
        Params {
            dims: d,
            hidden: self.hidden,
            hp,
            w,
            v,
            b,
            c,
        }
    }

    /// Rows of `images` permuted into ordering space as 0/1 bytes, one after another.
    pub fn ordered(&self, images: ArrayView2<'_, u8>) -> Vec<u8> {
        let mut x = Vec::with_capacity(images.len());
        for img in images.rows() {
            x.extend(self.order.iter().map(|&o| u8::from(img[o] != 0)));
        }
        x
    }

    fn ordered_one(&self, image: &[u8]) -> Vec<u8> {
        self.order
            .iter()
            .map(|&o| u8::from(image[o] != 0))
            .collect()
    }

    /// Rebuilds the model from model.safetensors.
    pub fn from_tensors(
        shape: ImageShape,
        hyperparameters: &serde_json::Value,
        tensors: &[NamedTensor],
    ) -> Result<Self, ModelError> {
        let d = shape.dims();
        let order_kind: Order = serde_json::from_value(hyperparameters["order"].clone())?;
        let seed = hyperparameters["seed"].as_u64().unwrap_or(0);
        let hidden = hyperparameters["hidden"]
            .as_u64()
            .ok_or_else(|| ModelError::invalid("hyper-parameter `hidden` is missing"))?
            as usize;
        if let Some(p) = super::hidden_problem(hidden) {
            return Err(ModelError::Params(vec![p]));
        }
        let hp = padded_width(hidden);
        let order = stored_order(tensors, d)?;
        let mut params = vec![0f32; param_len(d, hp)];
        let (w, rest) = params.split_at_mut(d * hp);
        let (v, rest) = rest.split_at_mut(d * hp);
        let (b, c) = rest.split_at_mut(d);
        for (name, m) in [("input_weights", w), ("output_weights", v)] {
            let t = tensor(tensors, name, d * hidden)?;
            for (row, src) in m.chunks_exact_mut(hp).zip(t.chunks_exact(hidden)) {
                row.iter_mut().zip(src).for_each(|(x, &s)| *x = s as f32);
            }
        }
        b.iter_mut()
            .zip(tensor(tensors, "output_bias", d)?)
            .for_each(|(x, &s)| *x = s as f32);
        c.iter_mut()
            .zip(tensor(tensors, "hidden_bias", hidden)?)
            .for_each(|(x, &s)| *x = s as f32);
        if params.iter().any(|v| !v.is_finite()) {
            return Err(ModelError::invalid("weights are not all finite"));
        }
        Ok(Self {
            shape,
            order_kind,
            seed,
            order,
            hidden,
            hp,
            params,
            isa: Isa::detect(),
        })
    }

    /// The same model, running its kernels on `isa`.
    pub fn with_isa(mut self, isa: Isa) -> Self {
        self.isa = isa;
        self
    }

    /// A tensor of D rows of the first `hidden` values of each `hp`-wide row of `m`.
    fn unpadded(&self, name: &str, m: &[f32]) -> NamedTensor {
        NamedTensor {
            name: name.into(),
            shape: vec![self.d(), self.hidden],
            data: m
                .chunks_exact(self.hp)
                .flat_map(|row| row[..self.hidden].iter().map(|&x| f64::from(x)))
                .collect(),
        }
    }
}

impl GradientModel for Nade {
    fn params(&self) -> &[f32] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [f32] {
        &mut self.params
    }

    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
        let (d, hp) = (self.d(), self.hp);
        let (w, rest) = grad.split_at_mut(d * hp);
        let (v, rest) = rest.split_at_mut(d * hp);
        let (b, c) = rest.split_at_mut(d);
        let mut grads = Grads { w, v, b, c };
        kernel::gradient(
            self.isa,
            &self.kernel_params(),
            &self.ordered(images),
            &mut grads,
        )
    }

    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
        let mut out = vec![0f64; images.nrows()];
        kernel::log_likelihood(
            self.isa,
            &self.kernel_params(),
            &self.ordered(images),
            None,
            &mut out,
        );
        -out.iter().sum::<f64>()
    }
}

/// The hidden layer given the whole image, h(x) = σ(c + W x): H values, the state the
/// scoring pass ends in (one more sparse update than scoring needs).
impl Embed for Nade {
    fn embedding_width(&self) -> usize {
        self.hidden
    }

    fn log_likelihood_and_embedding(
        &self,
        images: ArrayView2<'_, u8>,
        out: &mut [f64],
        embeddings: &mut [f32],
    ) {
        let params = self.kernel_params();
        crate::models::shared::embed_in_chunks(
            images,
            out,
            embeddings,
            self.hidden,
            4 * TILE,
            |rows, out, embeddings| {
                kernel::log_likelihood_and_hidden(
                    self.isa,
                    &params,
                    &self.ordered(rows),
                    embeddings,
                    out,
                );
            },
        );
    }
}

impl DensityModel for Nade {
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
        let mut terms = vec![0f32; self.d()];
        let mut total = [0f64];
        let x = self.ordered_one(image);
        kernel::log_likelihood(
            self.isa,
            &self.kernel_params(),
            &x,
            Some(&mut terms),
            &mut total,
        );
        for (&o, &t) in self.order.iter().zip(&terms) {
            out[o] = t;
        }
        total[0]
    }

    fn log_likelihood(&self, image: &[u8]) -> f64 {
        let mut total = [0f64];
        let x = self.ordered_one(image);
        kernel::log_likelihood(self.isa, &self.kernel_params(), &x, None, &mut total);
        total[0]
    }

    /// Scores whole tiles per rayon task, so the kernel shares each weight row across images.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        let params = self.kernel_params();
        crate::models::shared::score_in_chunks(images, out, 4 * TILE, |rows, out| {
            kernel::log_likelihood(self.isa, &params, &self.ordered(rows), None, out);
        });
    }

    fn embedder(&self) -> Option<&dyn Embed> {
        Some(self)
    }

    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
        let p = self.kernel_params();
        let (hp, hidden) = (self.hp, self.hidden);
        let mut a: Vec<f64> = p.c[..hidden].iter().map(|&c| f64::from(c)).collect();
        let mut h: Vec<f64> = a.iter().map(|&a| sigmoid(a)).collect();
        out.fill(0);
        for (i, &o) in self.order.iter().enumerate() {
            let v = &p.v[i * hp..i * hp + hidden];
            let z = f64::from(p.b[i])
                + v.iter()
                    .zip(&h)
                    .map(|(&v, h)| f64::from(v) * h)
                    .sum::<f64>();
            if uniform(rng) < sigmoid(z) {
                out[o] = 1;
                let w = &p.w[i * hp..i * hp + hidden];
                for ((a, h), &w) in a.iter_mut().zip(h.iter_mut()).zip(w) {
                    *a += f64::from(w);
                    *h = sigmoid(*a);
                }
            }
        }
    }

    fn hyperparameters(&self) -> serde_json::Value {
        json!({ "hidden": self.hidden, "order": self.order_kind, "seed": self.seed })
    }

    fn tensors(&self) -> Vec<NamedTensor> {
        let p = self.kernel_params();
        let d = self.d();
        vec![
            order_tensor(&self.order),
            self.unpadded("input_weights", p.w),
            self.unpadded("output_weights", p.v),
            NamedTensor {
                name: "output_bias".into(),
                shape: vec![d],
                data: p.b.iter().map(|&x| f64::from(x)).collect(),
            },
            NamedTensor {
                name: "hidden_bias".into(),
                shape: vec![self.hidden],
                data: p.c[..self.hidden].iter().map(|&x| f64::from(x)).collect(),
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

    /// A NADE with larger-than-trained random weights, so every conditional matters.
    fn random_model(shape: ImageShape, hidden: usize, order: Order, seed: u64) -> Nade {
        let pixels = Array2::<u8>::zeros((1, shape.dims()));
        let mut m = Nade::init(shape, hidden, order, seed, pixels.view());
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let (d, hp) = (shape.dims(), m.hp);
        for (k, x) in m.params.iter_mut().enumerate() {
            let padded = k < 2 * d * hp && k % hp >= hidden || k >= 2 * d * hp + d + hidden;
            if !padded {
                *x = rng.random_range(-2.0..2.0);
            }
        }
        m
    }

    fn binary(n: usize, d: usize, seed: u64) -> Array2<u8> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Array2::from_shape_fn((n, d), |(_, j)| {
            u8::from(rng.random_bool(0.1 + 0.8 * j as f64 / d as f64))
        })
    }

    #[test]
    fn normalizes_over_all_images_for_both_orders_and_several_widths() {
        for order in [Order::Raster, Order::Random] {
            for hidden in [1, 7, 20] {
                let m = random_model(ImageShape::new(3, 4, 1), hidden, order, hidden as u64); // D = 12
                let total = total_probability(&m);
                assert!(
                    (total - 1.0).abs() < 1e-6,
                    "{order:?} H={hidden}: Σ p(x) = {total}"
                );
                assert_maps_sum_to_likelihood(&m, &all_images(12, 2)[..300]);
            }
        }
        let rgb = random_model(ImageShape::new(2, 2, 3), 5, Order::Random, 1);
        let total = total_probability(&rgb);
        assert!((total - 1.0).abs() < 1e-6, "RGB: Σ p(x) = {total}");
    }

    #[test]
    fn batch_scores_and_nll_agree_with_one_image_at_a_time() {
        let m = random_model(ImageShape::new(3, 5, 1), 9, Order::Random, 4);
        let x = binary(45, 15, 1); // not a multiple of the tile
        let mut batch = vec![0f64; 45];
        m.log_likelihood_batch(x.view(), &mut batch);
        for (row, &b) in x.rows().into_iter().zip(&batch) {
            let one = m.log_likelihood(row.as_slice().unwrap());
            assert!((one - b).abs() < 1e-9, "{one} vs {b}");
        }
        let nll = m.total_nll(x.view());
        assert!((nll + batch.iter().sum::<f64>()).abs() < 1e-6);
    }

    #[test]
    fn gradients_match_finite_differences() {
        let m = random_model(ImageShape::new(2, 3, 1), 4, Order::Random, 7);
        let x = binary(9, 6, 2);
        let mut grad = vec![0f32; m.params.len()];
        m.nll_gradient(x.view(), &mut grad);
        let nll = |m: &Nade| -> f64 {
            x.rows()
                .into_iter()
                .map(|r| {
                    -crate::kernels::nade::reference::log_likelihood(
                        &m.kernel_params(),
                        &m.ordered_one(r.as_slice().unwrap()),
                    )
                    .0
                })
                .sum()
        };
        for (k, &g) in grad.iter().enumerate() {
            let mut plus = m.clone();
            let mut minus = m.clone();
            plus.params[k] += 1e-2;
            minus.params[k] -= 1e-2;
            let h = f64::from(plus.params[k]) - f64::from(minus.params[k]);
            let fd = (nll(&plus) - nll(&minus)) / h;
            let (d, hp) = (6, m.hp);
            let padded = k < 2 * d * hp && k % hp >= 4 || k >= 2 * d * hp + d + 4;
            let want = if padded { 0.0 } else { fd };
            assert!(
                (f64::from(g) - want).abs() < 2e-3 * (1.0 + want.abs()),
                "parameter {k}: gradient {g} vs finite difference {want}"
            );
        }
    }

    #[test]
    fn a_training_step_is_the_same_on_any_thread_count() {
        let m = random_model(ImageShape::new(4, 5, 1), 24, Order::Random, 3);
        let x = binary(150, 20, 4); // several shards, the last one short
        let step = |threads: usize| -> (f64, Vec<f32>) {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| {
                let mut work = crate::train::GradientWorkspace::default();
                let (nll, g) = work.mean_gradient(&m, x.view());
                let mut params = m.params.clone();
                let mut adam = crate::train::Optimizer::adam(params.len(), 0.01);
                adam.step(&mut params, g);
                (nll, params)
            })
        };
        let one = step(1);
        assert_eq!(one, step(3));
        assert_ne!(one.1, m.params, "the step moved the parameters");
    }

    #[test]
    fn samples_follow_the_model() {
        let m = random_model(ImageShape::new(2, 3, 1), 3, Order::Random, 11); // D = 6
        assert_samples_follow_the_model(&m, 200_000, 5);
    }

    /// Binary RGB in a chain R → G → B: NADE takes the channels in R, G, B order.
    #[test]
    fn colour_channels_see_their_predecessors() {
        check_binary_chain(|data, s| {
            Nade::fit(8, Order::Raster, 0, data, &Training::unmonitored(s)).0
        });
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
            epochs: 15,
            batch_size: 50,
            learning_rate: 0.02,
            patience: 3,
            anneal: 0,
            weight_decay: 0.0,
            seed: 1,
            ..TrainSettings::default()
        };
        let start = Nade::init(shape, 16, Order::Raster, 0, train);
        let before = train::mean_nll(&start, valid);
        let (m, curve) = Nade::fit(
            16,
            Order::Raster,
            0,
            &data,
            &Training::unmonitored(&settings),
        );
        let after = train::mean_nll(&m, valid);
        assert!(after < before - 3.0, "validation NLL {before} → {after}");
        let best = curve
            .iter()
            .filter_map(|r| r.validation_nll)
            .fold(f64::INFINITY, f64::min);
        assert!((after - best).abs() < 1e-9, "the best epoch is kept");
        let back = Nade::from_tensors(shape, &m.hyperparameters(), &m.tensors()).unwrap();
        for img in all_images(12, 2).iter().step_by(97) {
            assert_eq!(back.log_likelihood(img), m.log_likelihood(img));
        }
        let again = Nade::fit(
            16,
            Order::Raster,
            0,
            &data,
            &Training::unmonitored(&settings),
        )
        .0;
        assert_eq!(again.params, m.params, "a fixed seed gives the same model");
    }
}
