//! The fit stage: read the source, hold out a validation split, fit the model, choose the
//! threshold from the held-out scores, and write the artifact.
//!
//! Fitting holds the preprocessed training images in memory (one byte per value: 50,000 MNIST
//! digits take 39 MB); scoring, by contrast, streams.

use std::collections::BTreeMap;
use std::time::Instant;

use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use sha2::{Digest, Sha256};

use super::Context;
use super::artifact::{
    self, FORMAT_VERSION, LoadedModel, ModelMeta, ModelSet, PartitionIndex, StoredBackground,
    StoredScore, TrainingSummary,
};
use super::progress::Progress;
use super::read::{ReadCounts, for_each_batch, partition_keys};
use super::reference::{self, ReferenceSample, Reservoir};
use super::scorer::{Scorer, nll_scores};
use crate::config::{BackgroundConfig, PipelineConfig, ScoreMethod};
use crate::data::preprocess::Preprocessor;
use crate::data::{ImageShape, id_hash, unit_interval};
use crate::decide;
use crate::error::{Error, Result};
use crate::io::source::Source;
use crate::io::storage::Storage;
use crate::models::{DensityModel, Fitted, ModelSpec};
use crate::train::{Monitor, Redraw, Training, TrainingSet};

/// The training images as 8-bit intensities and the stochastic binarization that draws them
/// anew for every epoch (`train.rebinarize`): epoch e sees draw e − 1 of `preprocess`, so
/// epoch 1 sees the binarization the training set holds.
///
/// Invariant: `raw` has one row per id, in the order of the training set's pixels.
#[derive(Debug, Clone, Copy)]
pub struct Rebinarize<'a> {
    /// The binarization (`preprocess.binarize = "stochastic"`).
    pub preprocess: &'a Preprocessor,
    /// The training images' ids, which seed their coins.
    pub ids: &'a [String],
    /// The training images' 8-bit intensities.
    pub raw: ArrayView2<'a, u8>,
}

impl Redraw for Rebinarize<'_> {
    fn epoch(&self, epoch: u32) -> Array2<u8> {
        let draw = epoch.saturating_sub(1) as usize;
        self.preprocess.draw(draw, self.ids, self.raw).into_owned()
    }
}

/// Images of one partition gathered for fitting, split into training and validation rows.
#[derive(Default)]
struct Gathered {
    train: Vec<u8>,
    validation: Vec<u8>,
    /// With several `preprocess.draws`, the validation images' 8-bit intensities, from which
    /// the calibration scores are computed over as many binarizations, as scoring will; empty
    /// with one draw, where `validation` is what scoring sees.
    validation_raw: Vec<u8>,
    validation_ids: Vec<String>,
    /// With `train.rebinarize`, the training images' 8-bit intensities and ids, from which
    /// each epoch draws a fresh binarization; empty otherwise.
    train_raw: Vec<u8>,
    train_ids: Vec<String>,
    /// For a family with an embedding: a bounded sample of the training images (8-bit), kept
    /// with the model to name a flagged image's nearest normal ones.
    reference: Reservoir,
    hasher: Sha256,
}

impl Gathered {
    fn images(&self, dims: usize) -> u64 {
        ((self.train.len() + self.validation.len()) / dims.max(1)) as u64
    }
}

/// What training reports to: the progress bar, and the stop that SIGTERM asks for (the model is
/// then discarded, and the run fails with exit 75).
struct RunMonitor<'a>(&'a Progress);

impl Monitor for RunMonitor<'_> {
    fn advance(&self, images: u64) {
        self.0.inc(images);
    }

    fn should_stop(&self) -> bool {
        super::cancel::requested()
    }
}

/// Fits the configured model on the source — one per value of `source.partition_by`, in
/// parallel — and writes `models/<model_id>/` (and, for partitions, the set's index) under the
/// sink.
pub fn fit(ctx: &Context, config: &PipelineConfig, sink: &Storage) -> Result<ModelSet> {
    let (shape, mut groups, counts) = gather(ctx, config)?;
    if config.source.partition_by.is_empty() {
        let g = groups.remove("").unwrap_or_default();
        return Ok(ModelSet::single(fit_gathered(
            ctx,
            config,
            sink,
            shape,
            None,
            g,
            counts.rejected,
        )?));
    }
    fit_partitions(ctx, config, sink, shape, groups, &counts)
}

/// Reads the source once, splitting each partition's images into training and validation rows
/// (by a hash of the id, so the split is stable) and fingerprinting what was read.
fn gather(
    ctx: &Context,
    config: &PipelineConfig,
) -> Result<(ImageShape, BTreeMap<String, Gathered>, ReadCounts)> {
    let source = Source::open(&config.source.uri, &ctx.io)?;
    // With several draws, or a fresh binarization each epoch, the images are read as 8-bit
    // intensities and binarized below (draw 0, what the model trains on first), keeping the
    // intensities the other draws need.
    let preprocess = Preprocessor::new(config.preprocess.clone());
    let keep_validation_raw = preprocess.draws() > 1;
    let keep_train_raw = config.train.rebinarize;
    let keep_reference = config.model.spec.kind().embeds();
    let reading = if keep_validation_raw || keep_train_raw || keep_reference {
        Preprocessor::raw()
    } else {
        preprocess.clone()
    };
    let fraction = config.train.validation_fraction;
    let seed = config.train.seed;
    tracing::info!(
        files = source.files().len(),
        rows = source.total_rows(),
        source = %config.source.uri,
        "Reading training images."
    );

    let mut shape = None;
    let mut groups: BTreeMap<String, Gathered> = BTreeMap::new();
    let progress = Progress::new(ctx.progress, source.total_rows(), "reading");
    let counts = for_each_batch(
        &source,
        &config.source,
        &reading,
        None,
        &progress,
        |mut batch, _rejects| {
            if batch.is_empty() {
                return Ok(());
            }
            let raw = (keep_validation_raw || keep_train_raw || keep_reference).then(|| {
                let raw = batch.pixels.clone();
                preprocess.apply(&mut batch);
                raw
            });
            shape = Some(batch.shape);
            let keys = partition_keys(&batch, &config.source)?;
            let dims = batch.shape.dims();
            let pixels = batch.pixels.as_slice().expect("contiguous");
            let raw = raw.as_ref().map(|r| r.as_slice().expect("contiguous"));
            for (i, ((id, image), key)) in batch
                .ids
                .iter()
                .zip(pixels.chunks_exact(dims.max(1)))
                .zip(keys)
                .enumerate()
            {
                let g = groups.entry(key).or_insert_with(|| Gathered {
                    reference: Reservoir::new(reference::MAX_IMAGES, seed),
                    ..Gathered::default()
                });
                g.hasher.update(id.as_bytes());
                g.hasher.update([0u8]);
                g.hasher.update(image);
                let raw = raw.map(|r| &r[i * dims..(i + 1) * dims]);
                if unit_interval(id_hash(seed, id)) < fraction {
                    g.validation.extend_from_slice(image);
                    if let Some(raw) = raw.filter(|_| keep_validation_raw) {
                        g.validation_raw.extend_from_slice(raw);
                    }
                    g.validation_ids.push(id.clone());
                } else {
                    g.train.extend_from_slice(image);
                    if let Some(raw) = raw.filter(|_| keep_reference) {
                        g.reference.offer(id, raw);
                    }
                    if let Some(raw) = raw.filter(|_| keep_train_raw) {
                        g.train_raw.extend_from_slice(raw);
                        g.train_ids.push(id.clone());
                    }
                }
            }
            Ok(())
        },
    )?;
    progress.finish();
    counts.check(&config.source.uri, config.source.max_reject_fraction)?;
    let shape = shape.ok_or_else(|| {
        Error::data(
            &config.source.uri,
            "no usable images: every row was rejected",
        )
    })?;
    Ok((shape, groups, counts))
}

/// Fits one model per partition with at least `train.min_images` images, in parallel, and
/// writes the set's index.
fn fit_partitions(
    ctx: &Context,
    config: &PipelineConfig,
    sink: &Storage,
    shape: ImageShape,
    groups: BTreeMap<String, Gathered>,
    counts: &ReadCounts,
) -> Result<ModelSet> {
    let dims = shape.dims();
    let (large, small): (Vec<_>, Vec<_>) = groups
        .into_iter()
        .partition(|(_, g)| g.images(dims) >= config.train.min_images);
    let too_small: BTreeMap<String, u64> = small
        .iter()
        .map(|(k, g)| (k.clone(), g.images(dims)))
        .collect();
    for (value, images) in &too_small {
        tracing::warn!(
            partition = %value,
            images,
            min_images = config.train.min_images,
            "Too few images to fit this partition's model; its images will be scored by none and never flagged."
        );
    }
    if large.is_empty() {
        return Err(Error::data(
            &config.source.uri,
            format!(
                "no partition of {} has train.min_images = {} images",
                config.source.partition_by.join(", "),
                config.train.min_images
            ),
        ));
    }
    tracing::info!(partitions = large.len(), "Fitting one model per partition.");
    // Bars from parallel fits would overwrite each other: the partitions log instead.
    let quiet = Context {
        io: ctx.io.clone(),
        progress: false,
    };
    let fitted: Vec<(String, Result<LoadedModel>)> = large
        .into_par_iter()
        .map(|(value, g)| {
            let model = fit_gathered(
                &quiet,
                config,
                sink,
                shape,
                Some(&value),
                g,
                counts.rejected,
            );
            (value, model)
        })
        .collect();
    let mut models = BTreeMap::new();
    for (value, model) in fitted {
        models.insert(value, model?);
    }
    let index = PartitionIndex {
        format_version: FORMAT_VERSION,
        set_id: String::new(),
        partition_by: config.source.partition_by.clone(),
        models: models
            .iter()
            .map(|(k, m)| (k.clone(), m.meta.model_id.clone()))
            .collect(),
        too_small: too_small.clone(),
    };
    let (index, dir) = artifact::save_index(sink, index)?;
    Ok(ModelSet {
        partition_by: index.partition_by,
        models,
        too_small,
        id: index.set_id,
        uri: sink.display(&dir),
    })
}

/// Fits one model on gathered images (of one partition, or of the whole source), chooses its
/// threshold from the held-out images, and writes its artifact.
fn fit_gathered(
    ctx: &Context,
    config: &PipelineConfig,
    sink: &Storage,
    shape: ImageShape,
    partition: Option<&str>,
    g: Gathered,
    rejected_rows: u64,
) -> Result<LoadedModel> {
    let preprocess = Preprocessor::new(config.preprocess.clone());
    let dims = shape.dims();
    let rows = |v: Vec<u8>| {
        Array2::from_shape_vec((v.len() / dims, dims), v)
            .map_err(|e| Error::internal(e, "gathering images"))
    };
    let train = rows(g.train)?;
    let validation = rows(g.validation)?;
    let train_raw = ArrayView2::from_shape((g.train_ids.len(), dims), &g.train_raw)
        .map_err(|e| Error::internal(e, "gathering images"))?;
    let rebinarize = Rebinarize {
        preprocess: &preprocess,
        ids: &g.train_ids,
        raw: train_raw,
    };
    let data = TrainingSet {
        shape,
        levels: preprocess.levels(),
        pixels: train.view(),
        validation: validation.view(),
        redraw: config
            .train
            .rebinarize
            .then_some(&rebinarize as &dyn Redraw),
    };
    tracing::info!(
        kind = config.model.spec.name(),
        partition = partition.unwrap_or(""),
        train = train.nrows(),
        validation = validation.nrows(),
        shape = %shape,
        "Fitting the model."
    );
    let started = Instant::now();
    let fitted = fit_spec(ctx, config, &config.model.spec, &data, "training")?;
    let seconds = started.elapsed().as_secs_f64();
    let model = fitted.model;
    let (background, stored_score) = fit_background(config, &data, ctx)?;
    let train_nll = mean_nll(model.as_ref(), train.view())?;
    let scorer = Scorer {
        method: config.score.method,
        model: model.as_ref(),
        background: background.as_deref(),
    };
    let calibration = calibrate(
        &scorer,
        &preprocess,
        &validation,
        &g.validation_raw,
        &g.validation_ids,
    )?;
    let threshold = decide::threshold(&config.threshold, &calibration.scores).map_err(|e| match e {
        Error::Setting { .. } if calibration.scores.is_empty() => Error::data(
            &config.source.uri,
            format!(
                "no image was held out for the threshold ({} images, train.validation_fraction = {}); add images or raise the fraction",
                train.nrows(),
                config.train.validation_fraction
            ),
        ),
        e => e,
    })?;

    let meta = ModelMeta {
        format_version: FORMAT_VERSION,
        model_id: String::new(),
        kind: model.kind().to_string(),
        shape,
        levels: model.levels(),
        hyperparameters: model.hyperparameters(),
        preprocess: config.preprocess.clone(),
        training: TrainingSummary {
            images: train.nrows() as u64,
            validation_images: validation.nrows() as u64,
            rejected_rows,
            fingerprint: format!("sha256:{:x}", g.hasher.finalize()),
            train_nll,
            validation_nll: calibration.validation_nll,
            curve: fitted.curve,
            seconds,
        },
        score: stored_score,
        threshold,
        calibration_scores: calibration.scores,
        created_by: format!("anomaly-pipeline {}", env!("CARGO_PKG_VERSION")),
        partition: partition.map(str::to_string),
        reference_images: 0,
    };
    let reference = reference_sample(&scorer, &preprocess, shape, g.reference)?;
    super::cancel::check()?;
    let (meta, dir) = artifact::save(
        sink,
        model.as_ref(),
        background.as_deref(),
        reference.as_ref(),
        meta,
    )?;
    tracing::info!(
        model_id = %meta.model_id,
        partition = partition.unwrap_or(""),
        train_nll,
        validation_nll = meta.training.validation_nll.unwrap_or(f64::NAN),
        threshold = meta.threshold.value,
        seconds,
        "Model fitted."
    );
    Ok(LoadedModel {
        meta,
        model,
        background,
        reference,
        uri: sink.display(&dir),
    })
}

/// The reference sample of a model with an embedding: the sampled training images with their
/// embeddings, computed as scoring will (over the same binarizations); `None` for a model
/// without one.
fn reference_sample(
    scorer: &Scorer<'_>,
    preprocess: &Preprocessor,
    shape: ImageShape,
    sampled: Reservoir,
) -> Result<Option<ReferenceSample>> {
    let Some(embedder) = scorer.model.embedder() else {
        return Ok(None);
    };
    let (ids, raw) = sampled.into_images();
    if ids.is_empty() {
        return Ok(None);
    }
    let dims = shape.dims();
    let (reading, per_draw) = preprocess.split_for_draws();
    let mut as_read = raw.clone();
    for (id, image) in ids.iter().zip(as_read.chunks_exact_mut(dims)) {
        reading.apply_one(id, image);
    }
    let images = ArrayView2::from_shape((ids.len(), dims), &as_read)
        .map_err(|e| Error::internal(e, "embedding the reference sample"))?;
    let embeddings = scorer
        .mean_scores_and_embeddings(&per_draw, &ids, images)?
        .embeddings
        .unwrap_or_default();
    ReferenceSample::new(ids, raw, shape, embeddings, embedder.embedding_width()).map(Some)
}

/// Fits `spec` on `data` with the `[train]` settings, showing a bar labelled `what` for a
/// family that trains by gradient; a stop asked for meanwhile fails with exit 75.
fn fit_spec(
    ctx: &Context,
    config: &PipelineConfig,
    spec: &ModelSpec,
    data: &TrainingSet<'_>,
    what: &str,
) -> Result<Fitted> {
    let epochs_rows = u64::from(config.train.epochs) * data.pixels.nrows() as u64;
    let bar = Progress::new(
        ctx.progress && spec.kind().trained_by_gradient(data.levels),
        epochs_rows,
        what,
    );
    let settings = config.train.settings();
    let training = Training {
        settings: &settings,
        monitor: &RunMonitor(&bar),
    };
    let fitted = spec.fit(data, &training).map_err(|source| Error::Model {
        uri: config.source.uri.clone(),
        what: "cannot fit the model on these images",
        source,
    })?;
    super::cancel::check()?;
    bar.finish();
    Ok(fitted)
}

/// The held-out images' scores, sorted (the calibration set), and their mean NLL.
struct Calibration {
    scores: Vec<f64>,
    validation_nll: Option<f64>,
}

/// Scores the held-out images as scoring will: over as many binarizations as
/// `preprocess.draws` (from their intensities, `raw`, when there are several).
fn calibrate(
    scorer: &Scorer<'_>,
    preprocess: &Preprocessor,
    validation: &Array2<u8>,
    raw: &[u8],
    ids: &[String],
) -> Result<Calibration> {
    let (_, per_draw) = preprocess.split_for_draws();
    let as_read = if per_draw.draws() > 1 {
        ArrayView2::from_shape(validation.dim(), raw)
            .map_err(|e| Error::internal(e, "calibrating"))?
    } else {
        validation.view()
    };
    let held_out = scorer.mean_scores(&per_draw, ids, as_read)?;
    let mut scores = held_out.score;
    scores.sort_by(f64::total_cmp);
    let validation_nll = (!held_out.nll.is_empty())
        .then(|| held_out.nll.iter().sum::<f64>() / held_out.nll.len() as f64);
    Ok(Calibration {
        scores,
        validation_nll,
    })
}

/// For a likelihood-ratio score, fits the background model (`[score.background]`): the model's
/// own kind on the training images with a fraction of their pixels replaced by uniform random
/// values (seeded by `train.seed`), or a kind of its own on the images as they are.
fn fit_background(
    config: &PipelineConfig,
    data: &TrainingSet<'_>,
    ctx: &Context,
) -> Result<(Option<Box<dyn DensityModel>>, StoredScore)> {
    let method = config.score.method;
    if method != ScoreMethod::LikelihoodRatio {
        return Ok((
            None,
            StoredScore {
                method,
                background: None,
            },
        ));
    }
    // The background learns what is simple about the images from one binarization of them,
    // whatever `train.rebinarize` asks of the model.
    let data = TrainingSet {
        redraw: None,
        ..data.clone()
    };
    let background = &config.score.background;
    tracing::info!(
        kind = background.kind_name(),
        "Fitting the background model of the likelihood ratio."
    );
    let (fitted, mutation_rate) = match background {
        BackgroundConfig::Mutated { mutation_rate } => {
            let seed = config.train.seed ^ 0x6d75_7461_7465;
            let pixels = mutate(data.pixels, data.levels, *mutation_rate, seed);
            let validation = mutate(
                data.validation,
                data.levels,
                *mutation_rate,
                seed.rotate_left(1),
            );
            let mutated = TrainingSet {
                pixels: pixels.view(),
                validation: validation.view(),
                ..data.clone()
            };
            let spec = &config.model.spec;
            (
                fit_spec(ctx, config, spec, &mutated, "background")?,
                Some(*mutation_rate),
            )
        }
        BackgroundConfig::Model(spec) => (fit_spec(ctx, config, spec, &data, "background")?, None),
    };
    let stored = StoredScore {
        method,
        background: Some(StoredBackground {
            kind: fitted.model.kind().to_string(),
            hyperparameters: fitted.model.hyperparameters(),
            fitted_on: if mutation_rate.is_some() {
                "mutated"
            } else {
                "same_images"
            }
            .into(),
            mutation_rate,
        }),
    };
    Ok((Some(fitted.model), stored))
}

/// A copy of `pixels` with each value replaced, with probability `rate`, by one drawn
/// uniformly from `0..levels` (Ren et al. 2019's perturbation).
pub fn mutate(pixels: ArrayView2<'_, u8>, levels: u16, rate: f64, seed: u64) -> Array2<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut out = pixels.to_owned();
    for v in out.iter_mut() {
        if rng.random_bool(rate) {
            *v = rng.random_range(0..levels) as u8;
        }
    }
    out
}

fn mean_nll(model: &dyn DensityModel, images: ArrayView2<'_, u8>) -> Result<f64> {
    let s = nll_scores(model, images)?;
    Ok(s.iter().sum::<f64>() / s.len().max(1) as f64)
}
