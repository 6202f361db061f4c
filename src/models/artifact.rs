//! Model artifacts: `models/<model_id>/model.safetensors` (weights) + `model.json` (everything
//! needed to use them: kind, shape, hyper-parameters, preprocessing, training summary,
//! threshold and calibration scores).
//!
//! The model id is a content hash (`<kind>-<12 hex digits>`), so refitting on the same data with
//! the same settings gives the same id and rewrites identical files. `model.json` is written
//! last: a directory without one is an incomplete artifact and is refused.

use std::collections::{BTreeMap, HashMap};

use bytes::Bytes;
use safetensors::tensor::{Dtype, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio::runtime::Handle;

use super::{DensityModel, NamedTensor, from_tensors};
use crate::config::{ModelKind, PreprocessConfig, ScoreMethod, ThresholdMethod};
use crate::data::ImageShape;
use crate::error::{Error, Result};
use crate::io::storage::Storage;
use crate::train::EpochRecord;

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
    pub kind: ModelKind,
    /// Its hyper-parameters.
    pub hyperparameters: serde_json::Value,
    /// `"mutated"` (fitted on the training images with a fraction of pixels randomized) or
    /// `"same_images"`.
    pub fitted_on: String,
    /// The fraction of pixels randomized, for `"mutated"`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mutation_rate: Option<f64>,
}

/// The threshold stored with a model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredThreshold {
    /// How it was chosen.
    pub method: ThresholdMethod,
    /// The quantile, for `quantile`.
    pub quantile: Option<f64>,
    /// The score above which an image is an anomaly. For `conformal` it is decided per run
    /// (Benjamini–Hochberg over the run's p-values); a model stores the threshold that would
    /// hold for a run of one image.
    pub value: f64,
    /// The false discovery rate, for `conformal`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fdr: Option<f64>,
}

/// The contents of model.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelMeta {
    /// Format version of this file.
    pub format_version: u32,
    /// `<kind>-<hash>`; empty while the hash is being computed.
    pub model_id: String,
    /// The model family.
    pub kind: ModelKind,
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
    pub fn kind(&self) -> ModelKind {
        self.models
            .values()
            .next()
            .expect("at least one model")
            .meta
            .kind
    }

    /// Any one model (the only one, without partitions).
    pub fn first(&self) -> &LoadedModel {
        self.models.values().next().expect("at least one model")
    }
}

/// Writes the index of a partitioned fit under `models/<set_id>/` and returns its directory.
pub fn save_index(sink: &Storage, mut index: PartitionIndex) -> Result<(PartitionIndex, String)> {
    index.set_id = String::new();
    let digest =
        Sha256::digest(serde_json::to_vec(&index).map_err(|e| Error::Internal(e.to_string()))?);
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    index.set_id = format!("partitioned-{hex}");
    let dir = format!("models/{}", index.set_id);
    let mut json = serde_json::to_vec_pretty(&index).map_err(|e| Error::Internal(e.to_string()))?;
    json.push(b'\n');
    sink.put(&format!("{dir}/partitions.json"), Bytes::from(json))?;
    Ok((index, dir))
}

/// Loads a model directory, or a partitioned set's directory (one with `partitions.json`) and
/// every model it lists.
pub fn load_set(uri: &str, rt: &Handle) -> Result<ModelSet> {
    let dir = uri.trim_end_matches('/');
    let dir = dir
        .strip_suffix("partitions.json")
        .unwrap_or(dir)
        .trim_end_matches('/');
    let dir = if dir.is_empty() { "." } else { dir };
    let storage = Storage::open(dir, rt)?;
    if !storage.exists("partitions.json")? {
        return Ok(ModelSet::single(load(uri, rt)?));
    }
    let bytes = storage.get("partitions.json")?;
    let index: PartitionIndex = serde_json::from_slice(&bytes).map_err(|e| {
        Error::data(
            storage.display("partitions.json"),
            format!("not a partition index: {e}"),
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
        let model = load(&format!("{parent}/{model_id}"), rt)?;
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
    /// Where it was loaded from (its directory).
    pub uri: String,
}

/// Serializes parameters to safetensors bytes (f64, little-endian).
pub fn to_safetensors(tensors: &[NamedTensor]) -> Result<Vec<u8>> {
    let bytes: Vec<(String, Vec<u8>, Vec<usize>)> = tensors
        .iter()
        .map(|t| {
            let raw = t.data.iter().flat_map(|v| v.to_le_bytes()).collect();
            (t.name.clone(), raw, t.shape.clone())
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(name, raw, shape)| {
            TensorView::new(Dtype::F64, shape.clone(), raw)
                .map(|v| (name.clone(), v))
                .map_err(|e| Error::Internal(format!("tensor {name}: {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    safetensors::serialize(views, None::<HashMap<String, String>>)
        .map_err(|e| Error::Internal(format!("serializing weights: {e}")))
}

/// Reads parameters back from safetensors bytes; every tensor must be f64.
pub fn from_safetensors(bytes: &[u8]) -> std::result::Result<Vec<NamedTensor>, String> {
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F64 {
            return Err(format!(
                "tensor `{name}` is {:?}, expected F64",
                view.dtype()
            ));
        }
        let data = view
            .data()
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        out.push(NamedTensor {
            name,
            shape: view.shape().to_vec(),
            data,
        });
    }
    Ok(out)
}

/// Writes a model under `sink` as `models/<model_id>/` and returns its meta (with the id filled
/// in) and the directory relative to the sink.
pub fn save(
    sink: &Storage,
    model: &dyn DensityModel,
    background: Option<&dyn DensityModel>,
    mut meta: ModelMeta,
) -> Result<(ModelMeta, String)> {
    let weights = to_safetensors(&model.tensors())?;
    let background_weights = background
        .map(|b| to_safetensors(&b.tensors()))
        .transpose()?;
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
    hasher.update(serde_json::to_vec(&identity).map_err(|e| Error::Internal(e.to_string()))?);
    hasher.update(&weights);
    if let Some(b) = &background_weights {
        hasher.update(b);
    }
    let digest = hasher.finalize();
    let hex: String = digest.iter().take(6).map(|b| format!("{b:02x}")).collect();
    meta.model_id = format!("{}-{hex}", meta.kind.name());
    let dir = format!("models/{}", meta.model_id);
    sink.put(&format!("{dir}/model.safetensors"), Bytes::from(weights))?;
    if let Some(b) = background_weights {
        sink.put(&format!("{dir}/background.safetensors"), Bytes::from(b))?;
    }
    crate::pipeline::crash_point::reached("model.weights-written");
    let mut json = serde_json::to_vec_pretty(&meta).map_err(|e| Error::Internal(e.to_string()))?;
    json.push(b'\n');
    sink.put(&format!("{dir}/model.json"), Bytes::from(json))?;
    Ok((meta, dir))
}

/// Loads a model from its directory (or its model.json) URI.
pub fn load(uri: &str, rt: &Handle) -> Result<LoadedModel> {
    let dir = uri
        .trim_end_matches('/')
        .strip_suffix("model.json")
        .unwrap_or(uri)
        .trim_end_matches('/');
    let dir = if dir.is_empty() { "." } else { dir };
    let storage = Storage::open(dir, rt)?;
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
        bad(
            "model.json",
            format!("not a model description this build can read: {e}"),
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
    let weights = storage.get("model.safetensors")?;
    let tensors = from_safetensors(&weights)
        .map_err(|e| bad("model.safetensors", format!("unreadable weights: {e}")))?;
    let model = from_tensors(
        meta.kind,
        meta.shape,
        meta.levels,
        &meta.hyperparameters,
        &tensors,
    )
    .map_err(|e| {
        bad(
            "model.safetensors",
            format!("weights do not fit model.json: {e}"),
        )
    })?;
    let background = match &meta.score.background {
        None => None,
        Some(b) => {
            let weights = storage.get("background.safetensors")?;
            let tensors = from_safetensors(&weights)
                .map_err(|e| bad("background.safetensors", format!("unreadable weights: {e}")))?;
            Some(
                from_tensors(
                    b.kind,
                    meta.shape,
                    meta.levels,
                    &b.hyperparameters,
                    &tensors,
                )
                .map_err(|e| {
                    bad(
                        "background.safetensors",
                        format!("weights do not fit model.json: {e}"),
                    )
                })?,
            )
        }
    };
    if meta.score.method == ScoreMethod::LikelihoodRatio && background.is_none() {
        return Err(bad(
            "model.json",
            "the score is a likelihood ratio but no background model is recorded; refit".into(),
        ));
    }
    Ok(LoadedModel {
        meta,
        model,
        background,
        uri: storage.display(""),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_round_trip_through_safetensors() {
        let t = vec![
            NamedTensor {
                name: "p".into(),
                shape: vec![3],
                data: vec![0.1, 0.5, 0.999],
            },
            NamedTensor {
                name: "w".into(),
                shape: vec![2, 2],
                data: vec![-1.0, 2.0, f64::MIN_POSITIVE, 4.0],
            },
        ];
        let bytes = to_safetensors(&t).unwrap();
        let mut back = from_safetensors(&bytes).unwrap();
        back.sort_by(|a, b| a.name.cmp(&b.name));
        assert_eq!(back, t);
        assert!(from_safetensors(&bytes[..bytes.len() - 1]).is_err());
    }
}
