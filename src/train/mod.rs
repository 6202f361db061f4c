//! Training by gradient: Adam or RMSProp on minibatches, data-parallel over fixed shards with
//! rayon, and early stopping on the validation split that keeps the best epoch.
//!
//! Each minibatch is cut into shards of [`SHARD_ROWS`] images; rayon computes the shards'
//! gradients in parallel and they are summed in shard order. Because the shards do not depend
//! on the number of threads, a fixed seed gives the same model on any machine size.

use std::time::Instant;

use ndarray::{Array2, ArrayView2, Axis};
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::data::ImageShape;

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
    pub redraw: Option<&'a dyn Redraw>,
}

/// Where each epoch's fresh binarization of the training images comes from
/// (`train.rebinarize`); the caller knows how the images were preprocessed, training does not.
pub trait Redraw: Sync + std::fmt::Debug {
    /// The training images of epoch `epoch` (1-based), one row per row of
    /// [`TrainingSet::pixels`] and in its order: epoch 1 sees exactly `pixels`, every later
    /// epoch a fresh draw.
    fn epoch(&self, epoch: u32) -> Array2<u8>;
}

/// What a training run reports to and asks whether to go on: the caller's progress display and
/// stop request, passed in so that training knows nothing of either.
pub trait Monitor: Sync {
    /// `images` more images went through a gradient step.
    fn advance(&self, _images: u64) {}

    /// Whether to stop now. Training then returns at once with what it has; the caller, which
    /// asked, discards the model.
    fn should_stop(&self) -> bool {
        false
    }
}

/// A monitor that shows nothing and never stops training.
#[derive(Debug, Clone, Copy, Default)]
pub struct Unmonitored;

impl Monitor for Unmonitored {}

/// Everything a fit takes besides the data and the model's own parameters.
#[derive(Clone, Copy)]
pub struct Training<'a> {
    /// The `[train]` settings.
    pub settings: &'a TrainSettings,
    /// Where progress goes, and whether to stop.
    pub monitor: &'a dyn Monitor,
}

impl<'a> Training<'a> {
    /// Training with `settings` that reports nowhere and never stops early.
    pub fn unmonitored(settings: &'a TrainSettings) -> Self {
        Self {
            settings,
            monitor: &Unmonitored,
        }
    }
}

/// Images per gradient shard.
pub const SHARD_ROWS: usize = 32;

/// A model whose parameters are one flat f32 vector, trained by minimizing the summed
/// negative log-likelihood.
pub trait GradientModel: Send + Sync {
    /// The parameters.
    fn params(&self) -> &[f32];

    /// The parameters, to update.
    fn params_mut(&mut self) -> &mut [f32];

    /// Adds ∂(Σ NLL)/∂θ over `images` into `grad` and returns Σ NLL (nats).
    fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64;

    /// Σ NLL over `images` (nats).
    fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64;

    /// Called before each step's gradient with the step's number (from 0), for models whose
    /// gradient is stochastic (dequantization noise) and must stay a function of the seed and
    /// step alone.
    fn start_step(&mut self, _step: u64) {}
}

/// The update rule of a gradient step (`train.optimizer`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// Adam (Kingma & Ba 2015): a step along the gradient's running mean, scaled by its running
    /// RMS, both bias-corrected (β₁ = 0.9, β₂ = 0.999).
    #[default]
    Adam,
    /// RMSProp (Tieleman & Hinton 2012), the optimizer of the PixelRNN paper: a step along the
    /// gradient itself, scaled by its running RMS (ρ = 0.9).
    Rmsprop,
}

/// A gradient optimizer: [`Rule`] Adam or RMSProp, with optional decoupled weight decay.
#[derive(Debug, Clone)]
pub struct Optimizer {
    rule: Rule,
    lr: f32,
    beta1: f32,
    beta2: f32,
    eps: f32,
    /// Adam's running mean of the gradient (empty for RMSProp).
    m: Vec<f32>,
    /// The running mean of the squared gradient.
    v: Vec<f32>,
    t: i32,
    /// Decoupled weight decay per unit of step size (AdamW); 0 for none.
    decay: f32,
}

impl Optimizer {
    /// Adam for `n` parameters with step size `lr` and the usual betas.
    pub fn adam(n: usize, lr: f32) -> Self {
        Self::with_rule(Rule::Adam, n, lr)
    }

    /// An optimizer following `rule` for `n` parameters with step size `lr`.
    pub fn with_rule(rule: Rule, n: usize, lr: f32) -> Self {
        Self {
            rule,
            lr,
            beta1: 0.9,
            beta2: match rule {
                Rule::Adam => 0.999,
                Rule::Rmsprop => 0.9,
            },
            eps: 1e-8,
            m: match rule {
                Rule::Adam => vec![0.0; n],
                Rule::Rmsprop => Vec::new(),
            },
            v: vec![0.0; n],
            t: 0,
            decay: 0.0,
        }
    }

    /// The same optimizer with decoupled weight decay (Loshchilov & Hutter 2019): each step
    /// also subtracts `lr × decay × θ`.
    pub fn with_weight_decay(mut self, decay: f32) -> Self {
        self.decay = decay;
        self
    }

    /// One step against the mean gradient `grad`, in parallel over chunks of parameters (each
    /// parameter's update depends only on its own state, so any thread count gives the same
    /// result).
    pub fn step(&mut self, params: &mut [f32], grad: &[f32]) {
        self.t += 1;
        let (beta1, beta2, eps) = (self.beta1, self.beta2, self.eps);
        let shrink = 1.0 - self.lr * self.decay;
        match self.rule {
            Rule::Adam => {
                let c1 = 1.0 - beta1.powi(self.t);
                let c2 = 1.0 - beta2.powi(self.t);
                let step = self.lr * c2.sqrt() / c1;
                params
                    .par_chunks_mut(ELEMENT_CHUNK)
                    .zip(grad.par_chunks(ELEMENT_CHUNK))
                    .zip(self.m.par_chunks_mut(ELEMENT_CHUNK))
                    .zip(self.v.par_chunks_mut(ELEMENT_CHUNK))
                    .for_each(|(((p, g), m), v)| {
                        for (((p, g), m), v) in
                            p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut())
                        {
                            *m = beta1 * *m + (1.0 - beta1) * g;
                            *v = beta2 * *v + (1.0 - beta2) * g * g;
                            *p = *p * shrink - step * *m / (v.sqrt() + eps);
                        }
                    });
            }
            Rule::Rmsprop => {
                let step = self.lr;
                params
                    .par_chunks_mut(ELEMENT_CHUNK)
                    .zip(grad.par_chunks(ELEMENT_CHUNK))
                    .zip(self.v.par_chunks_mut(ELEMENT_CHUNK))
                    .for_each(|((p, g), v)| {
                        for ((p, g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
                            *v = beta2 * *v + (1.0 - beta2) * g * g;
                            *p = *p * shrink - step * g / (v.sqrt() + eps);
                        }
                    });
            }
        }
    }
}

/// Settings of a training run (`[train]`).
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSettings {
    /// Passes over the training images.
    pub epochs: u32,
    /// Images per step.
    pub batch_size: usize,
    /// The optimizer's step size.
    pub learning_rate: f64,
    /// The update rule.
    pub optimizer: Rule,
    /// Epochs without a better validation NLL before stopping.
    pub patience: u32,
    /// Halvings of the learning rate allowed on a plateau before stopping.
    pub anneal: u32,
    /// Decoupled (AdamW) weight decay per unit of learning rate.
    pub weight_decay: f64,
    /// Seed of the minibatch shuffle, and of anything random in the model (initial weights, a
    /// random ordering, dequantization noise).
    pub seed: u64,
    /// A wall-clock budget: training stops at the first step that ends after it, and keeps its
    /// best epoch.
    pub max_seconds: Option<f64>,
    /// Clip each step's mean gradient to this L2 norm (a step whose gradient is longer is
    /// scaled down to it, keeping its direction).
    pub clip: Option<f64>,
}

impl Default for TrainSettings {
    fn default() -> Self {
        Self {
            epochs: 20,
            batch_size: 100,
            learning_rate: 0.001,
            optimizer: Rule::Adam,
            patience: 3,
            anneal: 2,
            weight_decay: 0.0,
            seed: 0,
            max_seconds: None,
            clip: None,
        }
    }
}

/// `[train]` values a model family needs in place of the general defaults (each `None` keeps
/// the general one); they apply only where the pipeline file does not set the key.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainDefaults {
    /// `train.epochs`.
    pub epochs: Option<u32>,
    /// `train.batch_size`.
    pub batch_size: Option<usize>,
    /// `train.learning_rate`.
    pub learning_rate: Option<f64>,
    /// `train.max_minutes`.
    pub max_minutes: Option<f64>,
}

/// One epoch of the training curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    /// 1-based epoch.
    pub epoch: u32,
    /// Mean NLL (nats) over the training images during the epoch.
    pub train_nll: f64,
    /// Mean NLL on the validation images after the epoch, where there are some.
    pub validation_nll: Option<f64>,
    /// Wall time since training started, in seconds.
    pub seconds: f64,
    /// The step size during the epoch (halved on plateaus, see `train.anneal`).
    #[serde(default)]
    pub learning_rate: f64,
    /// Whether the wall-clock budget (`train.max_minutes`) ran out in this epoch, ending
    /// training (the epoch's NLL is over the images it reached).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub budget_ended: bool,
}

/// Scales `grad` down to L2 norm `clip` when it is longer (its direction kept); returns the
/// norm it had.
pub fn clip_norm(grad: &mut [f32], clip: f64) -> f64 {
    let norm = grad
        .iter()
        .map(|&g| f64::from(g) * f64::from(g))
        .sum::<f64>()
        .sqrt();
    if norm > clip {
        let scale = (clip / norm) as f32;
        grad.iter_mut().for_each(|g| *g *= scale);
    }
    norm
}

/// Reusable per-shard gradient buffers, so a training step neither allocates nor page-faults.
#[derive(Debug, Default)]
pub struct GradientWorkspace {
    shards: Vec<Vec<f32>>,
}

/// Parameters per rayon task in the element-wise passes (reduction, Adam).
const ELEMENT_CHUNK: usize = 1 << 14;

impl GradientWorkspace {
    /// Σ NLL and the *mean* gradient over `images`: shards of [`SHARD_ROWS`] images in parallel,
    /// then summed element by element in shard order (in parallel over elements), so the
    /// result does not depend on the thread count.
    pub fn mean_gradient<M: GradientModel>(
        &mut self,
        model: &M,
        images: ArrayView2<'_, u8>,
    ) -> (f64, &mut [f32]) {
        let n = model.params().len();
        let count = images.nrows().div_ceil(SHARD_ROWS).max(1);
        if self.shards.len() < count {
            self.shards.resize_with(count, Vec::new);
        }
        let shards = &mut self.shards[..count];
        let nll: Vec<f64> = shards
            .par_iter_mut()
            .zip(images.axis_chunks_iter(Axis(0), SHARD_ROWS).into_par_iter())
            .map(|(g, shard)| {
                g.clear();
                g.resize(n, 0.0);
                model.nll_gradient(shard, g)
            })
            .collect();
        let (first, rest) = shards.split_first_mut().expect("at least one shard");
        let scale = 1.0 / images.nrows().max(1) as f32;
        first
            .par_chunks_mut(ELEMENT_CHUNK)
            .enumerate()
            .for_each(|(c, out)| {
                let range = c * ELEMENT_CHUNK..c * ELEMENT_CHUNK + out.len();
                for other in rest.iter() {
                    out.iter_mut()
                        .zip(&other[range.clone()])
                        .for_each(|(a, b)| *a += b);
                }
                out.iter_mut().for_each(|a| *a *= scale);
            });
        (nll.iter().sum(), first)
    }
}
/// Mean NLL over `images`, in parallel over shards.
pub fn mean_nll<M: GradientModel>(model: &M, images: ArrayView2<'_, u8>) -> f64 {
    let total: f64 = images
        .axis_chunks_iter(Axis(0), SHARD_ROWS)
        .into_par_iter()
        .map(|shard| model.total_nll(shard))
        .collect::<Vec<_>>()
        .into_iter()
        .sum();
    total / images.nrows().max(1) as f64
}

/// Trains `model` on `data.pixels` (or, with `data.redraw`, on a fresh binarization of them
/// each epoch), keeping the parameters of the epoch with the best NLL on `data.validation` (the
/// last epoch when there is no validation split). After `patience` epochs without a better
/// validation NLL it returns to the best epoch and halves the learning rate, up to `anneal`
/// times, then stops; it also stops when `max_seconds` has passed (the last record says so).
/// Returns the curve.
pub fn train<M: GradientModel>(
    model: &mut M,
    data: &TrainingSet<'_>,
    training: &Training<'_>,
) -> Vec<EpochRecord> {
    let (settings, monitor) = (training.settings, training.monitor);
    let validation = data.validation;
    let mut lr = settings.learning_rate;
    let mut halvings = 0;
    let n = model.params().len();
    let new_optimizer = |lr: f64| {
        Optimizer::with_rule(settings.optimizer, n, lr as f32)
            .with_weight_decay(settings.weight_decay as f32)
    };
    let mut optimizer = new_optimizer(lr);
    let mut workspace = GradientWorkspace::default();
    let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
    let mut index: Vec<usize> = (0..data.pixels.nrows()).collect();
    let mut curve = Vec::new();
    let mut best: Option<(f64, Vec<f32>)> = None;
    let mut since_best = 0;
    let started = Instant::now();
    let batch_size = settings.batch_size.max(1);
    let mut step = 0u64;
    for epoch in 1..=settings.epochs {
        index.shuffle(&mut rng);
        let redrawn = data.redraw.map(|r| r.epoch(epoch));
        let train = redrawn.as_ref().map_or(data.pixels, |r| r.view());
        let (mut epoch_nll, mut seen) = (0.0, 0usize);
        let mut budget_ended = false;
        for chunk in index.chunks(batch_size) {
            if monitor.should_stop() {
                return curve;
            }
            let batch = train.select(Axis(0), chunk);
            model.start_step(step);
            step += 1;
            let (nll, grad) = workspace.mean_gradient(model, batch.view());
            if let Some(clip) = settings.clip {
                clip_norm(grad, clip);
            }
            optimizer.step(model.params_mut(), grad);
            epoch_nll += nll;
            seen += chunk.len();
            monitor.advance(chunk.len() as u64);
            if settings
                .max_seconds
                .is_some_and(|budget| started.elapsed().as_secs_f64() > budget)
            {
                budget_ended = true;
                break;
            }
        }
        let validation_nll = (validation.nrows() > 0).then(|| mean_nll(model, validation));
        let record = EpochRecord {
            epoch,
            train_nll: epoch_nll / seen.max(1) as f64,
            validation_nll,
            seconds: started.elapsed().as_secs_f64(),
            learning_rate: lr,
            budget_ended,
        };
        tracing::info!(
            epoch,
            train_nll = record.train_nll,
            validation_nll = validation_nll.unwrap_or(f64::NAN),
            seconds = record.seconds,
            "Epoch done."
        );
        curve.push(record);
        if let Some(v) = validation_nll {
            if best.as_ref().is_none_or(|(b, _)| v < *b) {
                best = Some((v, model.params().to_vec()));
                since_best = 0;
            } else {
                since_best += 1;
                if since_best >= settings.patience {
                    if halvings == settings.anneal {
                        tracing::info!(epoch, "Validation NLL stopped improving; stopping early.");
                        break;
                    }
                    // Back to the best epoch, and on with half the step and fresh moments.
                    halvings += 1;
                    lr *= 0.5;
                    optimizer = new_optimizer(lr);
                    if let Some((_, params)) = &best {
                        model.params_mut().copy_from_slice(params);
                    }
                    since_best = 0;
                    tracing::info!(
                        epoch,
                        learning_rate = lr,
                        "Validation NLL stalled; back to the best epoch with half the learning rate."
                    );
                }
            }
        }
        if budget_ended {
            tracing::warn!(
                epoch,
                seconds = started.elapsed().as_secs_f64(),
                "The training budget (train.max_minutes) ran out; keeping the best epoch."
            );
            break;
        }
    }
    if let Some((_, params)) = best {
        model.params_mut().copy_from_slice(&params);
    }
    curve
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weight_decay_shrinks_parameters_without_a_gradient() {
        let mut p = vec![2.0f32, -4.0];
        let mut adam = Optimizer::adam(2, 0.1).with_weight_decay(0.5);
        for _ in 0..3 {
            adam.step(&mut p, &[0.0, 0.0]);
        }
        let factor = 0.95f32.powi(3);
        assert!(
            (p[0] - 2.0 * factor).abs() < 1e-6 && (p[1] + 4.0 * factor).abs() < 1e-6,
            "{p:?}"
        );
    }

    #[test]
    fn clipping_keeps_the_direction_and_bounds_the_norm() {
        let mut g = vec![3.0f32, -4.0];
        assert_eq!(clip_norm(&mut g, 1.0), 5.0);
        assert!(
            (g[0] - 0.6).abs() < 1e-6 && (g[1] + 0.8).abs() < 1e-6,
            "{g:?}"
        );
        let mut short = vec![0.3f32, 0.4];
        clip_norm(&mut short, 1.0);
        assert_eq!(short, [0.3, 0.4]);
    }

    /// A quadratic bowl as a gradient model: parameter θ, NLL Σ (θ − x)² over the images'
    /// first pixel.
    struct Bowl(Vec<f32>);

    impl GradientModel for Bowl {
        fn params(&self) -> &[f32] {
            &self.0
        }
        fn params_mut(&mut self) -> &mut [f32] {
            &mut self.0
        }
        fn nll_gradient(&self, images: ArrayView2<'_, u8>, grad: &mut [f32]) -> f64 {
            let mut nll = 0.0;
            for row in images.rows() {
                let d = self.0[0] - f32::from(row[0]);
                grad[0] += 2.0 * d;
                nll += f64::from(d * d);
            }
            nll
        }
        fn total_nll(&self, images: ArrayView2<'_, u8>) -> f64 {
            images
                .rows()
                .into_iter()
                .map(|r| f64::from((self.0[0] - f32::from(r[0])).powi(2)))
                .sum()
        }
    }

    /// With a budget that the first step already exceeds, training stops after one step of
    /// epoch 1, says so in its curve, and keeps that epoch.
    #[test]
    fn a_spent_budget_ends_training_after_the_step_that_spent_it() {
        let pixels = ndarray::Array2::<u8>::from_elem((64, 1), 3);
        let data = TrainingSet {
            shape: ImageShape::new(1, 1, 1),
            levels: 256,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..8, ..]),
            redraw: None,
        };
        let settings = TrainSettings {
            epochs: 50,
            batch_size: 8,
            learning_rate: 0.1,
            max_seconds: Some(0.0),
            ..TrainSettings::default()
        };
        let mut model = Bowl(vec![0.0]);
        let curve = train(&mut model, &data, &Training::unmonitored(&settings));
        assert_eq!(curve.len(), 1, "{curve:?}");
        assert!(curve[0].budget_ended);
        // One Adam step of size 0.1 from 0 towards 3.
        assert!((model.0[0] - 0.1).abs() < 1e-4, "{:?}", model.0);
        let json = serde_json::to_value(&curve[0]).unwrap();
        assert_eq!(json["budget_ended"], true);
        let mut unbudgeted = Bowl(vec![0.0]);
        let settings = TrainSettings {
            max_seconds: None,
            epochs: 2,
            ..settings
        };
        let curve = train(&mut unbudgeted, &data, &Training::unmonitored(&settings));
        assert_eq!(curve.len(), 2);
        assert!(
            serde_json::to_value(&curve[0])
                .unwrap()
                .get("budget_ended")
                .is_none()
        );
    }

    /// RMSProp's first step from a zero RMS is lr / √(1 − ρ) along the gradient's sign, and the
    /// rule then settles in a quadratic's minimum (Adam's first step would be lr).
    #[test]
    fn rmsprop_steps_by_the_gradients_rms_and_minimizes_a_quadratic() {
        let mut p = vec![5.0f32, -3.0];
        let mut opt = Optimizer::with_rule(Rule::Rmsprop, 2, 0.01);
        opt.step(&mut p, &[8.0, -0.5]);
        let first = 0.01 / 0.1f32.sqrt();
        assert!(
            (p[0] - (5.0 - first)).abs() < 1e-5 && (p[1] - (-3.0 + first)).abs() < 1e-5,
            "{p:?}"
        );
        for _ in 0..3000 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * (x - 1.0)).collect();
            opt.step(&mut p, &g);
        }
        assert!(p.iter().all(|x| (x - 1.0).abs() < 0.02), "{p:?}");
    }

    #[test]
    fn adam_minimizes_a_quadratic() {
        let mut p = vec![5.0f32, -3.0];
        let mut adam = Optimizer::adam(2, 0.1);
        for _ in 0..2000 {
            let g: Vec<f32> = p.iter().map(|x| 2.0 * (x - 1.0)).collect();
            adam.step(&mut p, &g);
        }
        assert!(p.iter().all(|x| (x - 1.0).abs() < 1e-3), "{p:?}");
    }
}
