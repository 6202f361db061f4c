//! Model artifacts: `models/<model_id>/model.safetensors` (weights) + `model.json` (everything
//! needed to use them: kind, shape, hyper-parameters, preprocessing, training summary,
//! threshold and calibration scores).
//!
//! The model id is a content hash (`<kind>-<12 hex digits>`), so refitting on the same data with
//! the same settings gives the same id and rewrites identical files. `model.json` is written
//! last: a directory without one is an incomplete artifact and is refused.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{PreprocessConfig, ScoreMethod};
use crate::data::ImageShape;
use crate::decide::StoredThreshold;
use crate::error::{Error, Result};
use crate::io::storage::{Io, Storage};
use crate::models::tensors::{from_safetensors, to_safetensors};
use crate::models::{self, DensityModel, Stored};
use crate::train::EpochRecord;

use super::reference::{self, ReferenceSample};

/// The model.json format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// What was learned from, and how long it took.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Images the parameters were fitted on.
    pub images: u64,
    /// Images held out for the threshold.
    pub validation_images: u64,
    /// Source rows rejected while reading.
    pub rejected_rows: u64,
    /// SHA-256 over the ids and preprocessed pixels of every image read, in order.
    pub fingerprint: String,
    /// Mean negative log-likelihood (nats) on the training images.
    pub train_nll: f64,
    /// Mean negative log-likelihood (nats) on the validation images, where there are some.
    pub validation_nll: Option<f64>,
    /// Per-epoch curve for models trained by gradient (empty for counting models).
    pub curve: Vec<EpochRecord>,
    /// Wall time of the fit itself, in seconds.
    pub seconds: f64,
}

/// How the model's scores (and so its calibration scores) are computed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct StoredScore {
    /// The score method.
    pub method: ScoreMethod,
    /// For `likelihood_ratio`: the background model, whose weights are in
    /// `background.safetensors` beside the model's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub background: Option<StoredBackground>,
}

/// The background model of a likelihood-ratio score.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredBackground {
    /// Its kind.
    pub kind: String,
    /// Its hyper-parameters.
    pub hyperparameters: serde_json::Value,
    /// `"mutated"` (fitted on the training images with a fraction of pixels randomized) or
    /// `"same_images"`.
    pub fitted_on: String,
    /// The fraction of pixels randomized, for `"mutated"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation_rate: Option<f64>,
}

/// The contents of model.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Format version of this file.
    pub format_version: u32,
    /// `<kind>-<hash>`; empty while the hash is being computed.
    pub model_id: String,
    /// The model family (`model.kind`).
    pub kind: String,
    /// Image shape.
    pub shape: ImageShape,
    /// Values a pixel takes after preprocessing.
    pub levels: u16,
    /// Hyper-parameters, model-specific.
    pub hyperparameters: serde_json::Value,
    /// The preprocessing the model expects; scoring applies the same.
    pub preprocess: PreprocessConfig,
    /// How the model was fitted.
    pub training: TrainingSummary,
    /// How scores are computed (older models: `nll`).
    #[serde(default)]
    pub score: StoredScore,
    /// The threshold chosen at fit time.
    pub threshold: StoredThreshold,
    /// The scores of the held-out images, sorted ascending: the calibration set for thresholds
    /// (and p-values) at score time.
    pub calibration_scores: Vec<f64>,
    /// The program that wrote the artifact.
    pub created_by: String,
    /// The partition (values of `source.partition_by`, joined by `/`) the model was fitted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Training images kept with their embeddings in `reference.parquet` (zero: no file; the
    /// family has no embedding).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reference_images: usize,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

/// `models/<set_id>/partitions.json`: the models of a partitioned fit, one per partition value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionIndex {
    /// This build's format version.
    pub format_version: u32,
    /// `partitioned-<12 hex digits>`, a hash of the rest.
    pub set_id: String,
    /// The partition columns.
    pub partition_by: Vec<String>,
    /// Partition value → model id (a sibling directory under `models/`).
    pub models: BTreeMap<String, String>,
    /// Partition values with fewer than `train.min_images` images, and how many they had: their
    /// images are scored by no model and flagged never.
    pub too_small: BTreeMap<String, u64>,
}

/// The models a run scores with: one, or one per partition.
#[derive(Debug)]
pub struct ModelSet {
    /// The partition columns (empty: one model for every image).
    pub partition_by: Vec<String>,
    /// Partition value (`""` without partitions) → its model.
    pub models: BTreeMap<String, LoadedModel>,
    /// Partition values that got no model, with their image counts.
    pub too_small: BTreeMap<String, u64>,
    /// The set's id: the model id, or the partitioned set's id.
    pub id: String,
    /// Where it is: the model's directory, or the set's.
    pub uri: String,
}

impl ModelSet {
    /// One model for every image.
    pub fn single(model: LoadedModel) -> Self {
        Self {
            partition_by: Vec::new(),
            id: model.meta.model_id.clone(),
            uri: model.uri.clone(),
            models: BTreeMap::from([(String::new(), model)]),
            too_small: BTreeMap::new(),
        }
    }

    /// The model kind's name (all partitions share the configured kind).
    pub fn kind(&self) -> &str {
        &self.first().meta.kind
    }

    /// Any one model (the only one, without partitions).
    pub fn first(&self) -> &LoadedModel {
        self.models.values().next().expect("at least one model")
    }
}

/// Writes the index of a partitioned fit under `models/<set_id>/` and returns its directory.
pub fn save_index(sink: &Storage, mut index: PartitionIndex) -> Result<(PartitionIndex, String)> {
    index.set_id = String::new();
    let digest = Sha256::digest(
        serde_json::to_vec(&index).map_err(|e| Error::internal(e, "hashing the index"))?,
    );
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    index.set_id = format!("partitioned-{hex}");
    let dir = format!("models/{}", index.set_id);
    let mut json =
        serde_json::to_vec_pretty(&index).map_err(|e| Error::internal(e, "writing the index"))?;
    json.push(b'\n');
    sink.put(&format!("{dir}/partitions.json"), Bytes::from(json))?;
    Ok((index, dir))
}

/// Loads a model directory, or a partitioned set's directory (one with `partitions.json`) and
/// every model it lists.
pub fn load_set(uri: &str, io: &Io) -> Result<ModelSet> {
    let dir = uri.trim_end_matches('/');
    let dir = dir
        .strip_suffix("partitions.json")
        .unwrap_or(dir)
        .trim_end_matches('/');
    let dir = if dir.is_empty() { "." } else { dir };
    let storage = Storage::open(dir, io)?;
    if !storage.exists("partitions.json")? {
        return Ok(ModelSet::single(load(uri, io)?));
    }
    let bytes = storage.get("partitions.json")?;
    let index: PartitionIndex = serde_json::from_slice(&bytes).map_err(|e| {
        Error::data_because(
            storage.display("partitions.json"),
            "not a partition index",
            e,
        )
    })?;
    if index.format_version != FORMAT_VERSION || index.models.is_empty() {
        return Err(Error::data(
            storage.display("partitions.json"),
            "an index of another format version, or of no models: refit with this build",
        ));
    }
    let parent = dir.rsplit_once('/').map(|(p, _)| p).unwrap_or(".");
    let mut models = BTreeMap::new();
    for (value, model_id) in &index.models {
        let model = load(&format!("{parent}/{model_id}"), io)?;
        models.insert(value.clone(), model);
    }
    Ok(ModelSet {
        partition_by: index.partition_by,
        models,
        too_small: index.too_small,
        id: index.set_id,
        uri: storage.display(""),
    })
}

/// A model read back from its artifact.
#[derive(Debug)]
pub struct LoadedModel {
    /// model.json.
    pub meta: ModelMeta,
    /// The model.
    pub model: Box<dyn DensityModel>,
    /// The background model of a likelihood-ratio score.
    pub background: Option<Box<dyn DensityModel>>,
    /// Training images with their embeddings, to name the nearest normal images of a flagged
    /// one (families with an embedding).
    pub reference: Option<ReferenceSample>,
    /// Where it was loaded from (its directory).
    pub uri: String,
}

/// Writes a model under `sink` as `models/<model_id>/` (with its reference sample, where it has
/// one) and returns its meta (with the id filled in) and the directory relative to the sink.
pub fn save(
    sink: &Storage,
    model: &dyn DensityModel,
    background: Option<&dyn DensityModel>,
    reference: Option<&ReferenceSample>,
    mut meta: ModelMeta,
) -> Result<(ModelMeta, String)> {
    meta.reference_images = reference.map_or(0, ReferenceSample::len);
    let weights =
        to_safetensors(&model.tensors()).map_err(|e| Error::internal(e, "serializing weights"))?;
    let background_weights = background
        .map(|b| to_safetensors(&b.tensors()))
        .transpose()
        .map_err(|e| Error::internal(e, "serializing weights"))?;
    meta.model_id = String::new();
    let mut identity = meta.clone();
    // Wall times differ between identical fits; the id must not.
    identity.training.seconds = 0.0;
    identity
        .training
        .curve
        .iter_mut()
        .for_each(|r| r.seconds = 0.0);
    let mut hasher = Sha256::new();
    hasher.update(
        serde_json::to_vec(&identity).map_err(|e| Error::internal(e, "hashing model.json"))?,
    );
    hasher.update(&weights);
    if let Some(b) = &background_weights {
        hasher.update(b);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    meta.model_id = format!("{}-{hex}", meta.kind);
    let dir = format!("models/{}", meta.model_id);
    sink.put(&format!("{dir}/model.safetensors"), Bytes::from(weights))?;
    if let Some(b) = background_weights {
        sink.put(&format!("{dir}/background.safetensors"), Bytes::from(b))?;
    }
    if let Some(r) = reference.filter(|r| !r.is_empty()) {
        sink.put(&format!("{dir}/{}", reference::FILE), r.to_parquet()?)?;
    }
    crate::pipeline::crash_point::reached("model.weights-written");
    let mut json =
        serde_json::to_vec_pretty(&meta).map_err(|e| Error::internal(e, "writing model.json"))?;
    json.push(b'\n');
    sink.put(&format!("{dir}/model.json"), Bytes::from(json))?;
    Ok((meta, dir))
}

/// Loads a model from its directory (or its model.json) URI.
pub fn load(uri: &str, io: &Io) -> Result<LoadedModel> {
    let dir = uri
        .trim_end_matches('/')
        .strip_suffix("model.json")
        .unwrap_or(uri)
        .trim_end_matches('/');
    let dir = if dir.is_empty() { "." } else { dir };
    let storage = Storage::open(dir, io)?;
    let json = storage.get("model.json").map_err(|e| match e {
        Error::InputMissing { .. } => Error::InputMissing {
            uri: storage.display("model.json"),
            hint:
                "no model.json: give the models/<model_id>/ directory that `pipeline fit` printed"
                    .into(),
        },
        other => other,
    })?;
    let bad = |what: &str, message: String| Error::data(storage.display(what), message);
    let meta: ModelMeta = serde_json::from_slice(&json).map_err(|e| {
        Error::data_because(
            storage.display("model.json"),
            "not a model description this build can read",
            e,
        )
    })?;
    if meta.format_version != FORMAT_VERSION {
        return Err(bad(
            "model.json",
            format!(
                "format_version {} is not {FORMAT_VERSION}; refit the model with this build",
                meta.format_version
            ),
        ));
    }
    let model = load_weights(
        &storage,
        "model.safetensors",
        &meta.kind,
        &meta,
        &meta.hyperparameters,
    )?;
    let background = match &meta.score.background {
        None => None,
        Some(b) => Some(load_weights(
            &storage,
            "background.safetensors",
            &b.kind,
            &meta,
            &b.hyperparameters,
        )?),
    };
    if meta.score.method == ScoreMethod::LikelihoodRatio && background.is_none() {
        return Err(bad(
            "model.json",
            "the score is a likelihood ratio but no background model is recorded; refit".into(),
        ));
    }
    let reference = if meta.reference_images > 0 {
        let uri = storage.display(reference::FILE);
        let sample =
            ReferenceSample::from_parquet(storage.get(reference::FILE)?, meta.shape, &uri)?;
        let width = model.embedder().map(|e| e.embedding_width());
        if sample.len() != meta.reference_images || width != Some(sample.width) {
            return Err(bad(
                reference::FILE,
                format!(
                    "{} images of {} values, where model.json says {} and the model embeds in {}; refit",
                    sample.len(),
                    sample.width,
                    meta.reference_images,
                    width.map_or("none".to_string(), |w| w.to_string())
                ),
            ));
        }
        Some(sample)
    } else {
        None
    };
    Ok(LoadedModel {
        meta,
        model,
        background,
        reference,
        uri: storage.display(""),
    })
}

/// Reads the weights file `file` of a model of `kind` (the model's or its background's) and
/// rebuilds the model its family describes.
fn load_weights(
    storage: &Storage,
    file: &str,
    kind: &str,
    meta: &ModelMeta,
    hyperparameters: &serde_json::Value,
) -> Result<Box<dyn DensityModel>> {
    let bad = |source: models::ModelError| Error::Model {
        uri: storage.display(file),
        what: "the weights do not fit model.json",
        source,
    };
    let weights = storage.get(file)?;
    let tensors = from_safetensors(&weights).map_err(|e| bad(e.into()))?;
    models::families::load(
        kind,
        &Stored {
            shape: meta.shape,
            levels: meta.levels,
            hyperparameters,
            tensors: &tensors,
        },
    )
    .map_err(bad)
}
