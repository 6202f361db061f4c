//! The pipeline TOML: one struct per table, deserialized with serde.
//!
//! The doc comment on each field is the user reference: `schemas/pipeline.schema.json` and
//! `schemas/pipeline-toml.md` are generated from these structs (see [`reference`](mod@reference)) and a test
//! checks that the committed copies are current. Unknown keys are rejected by
//! [`load`], which reports every problem at once with its line.

pub mod interpolate;
pub mod load;
pub mod model;
pub mod reference;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

pub use load::{LoadOptions, load_file, load_str};
pub use model::{BackgroundConfig, ModelConfig};

use crate::train::{Rule, TrainSettings};

/// A whole pipeline file, as written by the user (before validation).
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
pub struct PipelineConfig {
    /// What the pipeline is called and which run this is.
    #[serde(default)]
    pub pipeline: PipelineSection,
    /// Where the images come from.
    #[serde(default)]
    pub source: SourceConfig,
    /// How pixels are turned into model inputs.
    #[serde(default)]
    pub preprocess: PreprocessConfig,
    /// Which density model p(x) to fit, and its hyper-parameters.
    #[serde(default)]
    pub model: ModelConfig,
    /// How the model is fitted.
    #[serde(default)]
    pub train: TrainConfig,
    /// How a log-likelihood becomes an anomaly score.
    #[serde(default)]
    pub score: ScoreConfig,
    /// How a score becomes a decision.
    #[serde(default)]
    pub threshold: ThresholdConfig,
    /// Retries and timeouts for object stores.
    #[serde(default)]
    pub storage: StorageConfig,
    /// Where the tables are written.
    #[serde(default)]
    pub sink: SinkConfig,
}

/// `[pipeline]`: names.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct PipelineSection {
    /// A name for logs and the run manifest.
    pub name: String,
    /// The run's identifier, written to every row. Empty means: `--run-id` if given, else the
    /// UTC start time (`20261128T021500Z`). Letters, digits, `.`, `_` and `-` only. A rerun with
    /// the same run_id replaces that run's rows.
    pub run_id: String,
}

impl Default for PipelineSection {
    fn default() -> Self {
        Self {
            name: "pipeline".into(),
            run_id: String::new(),
        }
    }
}

/// `[source]`: Parquet files with one image per row.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct SourceConfig {
    /// A Parquet file, a directory (every `*.parquet` below it), or a glob (`data/*.parquet`).
    /// A path or `file://` URI. Relative paths are relative to the working directory.
    pub uri: String,
    /// The image column: an `arrow.fixed_shape_tensor` (uint8 or float32), a `list<uint8>` or
    /// binary column with `shape` (or height/width/channels columns), or a struct
    /// `{bytes, path}` of PNG-encoded images.
    pub image_column: String,
    /// The column that identifies each image (any type; written as a string).
    pub id_column: String,
    /// Columns copied unchanged into the score tables.
    pub passthrough: Vec<String>,
    /// One model per value of these columns (e.g. `["camera_id"]`), each with its own
    /// threshold, fitted in parallel; the columns are passed through to the tables.
    pub partition_by: Vec<String>,
    /// The largest fraction of rows that may be unusable (null, wrong length, NaN, undecodable)
    /// before the run fails with exit 65 and publishes nothing.
    pub max_reject_fraction: f64,
    /// Image shape `[height, width]` or `[height, width, channels]` for list or binary image
    /// columns without height/width/channels columns. Ignored for tensors and PNG.
    pub shape: Vec<usize>,
    /// Per-row height column for list or binary images (used when present in the file).
    pub height_column: String,
    /// Per-row width column for list or binary images (used when present in the file).
    pub width_column: String,
    /// Per-row channels column for list or binary images (used when present in the file).
    pub channels_column: String,
    /// The value that float32 tensor pixels take at full intensity; values are mapped linearly
    /// to 0..255, and values outside `[0, float_max]` reject the row.
    pub float_max: f64,
    /// Rows decoded per batch; memory use grows with this, never with the file size.
    pub batch_size: usize,
}

impl Default for SourceConfig {
    fn default() -> Self {
        Self {
            uri: String::new(),
            image_column: "image".into(),
            id_column: "id".into(),
            passthrough: Vec::new(),
            partition_by: Vec::new(),
            max_reject_fraction: 0.01,
            shape: Vec::new(),
            height_column: "height".into(),
            width_column: "width".into(),
            channels_column: "channels".into(),
            float_max: 1.0,
            batch_size: 4096,
        }
    }
}

/// How 8-bit intensities become model inputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Binarize {
    /// Pixel = 1 where intensity ≥ `threshold`, else 0.
    Threshold,
    /// Pixel ~ Bernoulli(intensity / 255), seeded per image id so that every run agrees.
    Stochastic,
    /// Keep the 8-bit values (256 levels).
    None,
}

/// `[preprocess]`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct PreprocessConfig {
    /// `"threshold"`, `"stochastic"` or `"none"`.
    pub binarize: Binarize,
    /// Intensity at or above which a pixel is 1 (`binarize = "threshold"`).
    pub threshold: u8,
    /// Seed for stochastic binarization (combined with each image's id).
    pub seed: u64,
    /// How many stochastic binarizations of each image are scored (`binarize = "stochastic"`
    /// only): an image's score, log-likelihood and per-pixel map are their means, which steadies
    /// scores that one coin flip per pixel makes noisy (one-class MNIST, README "Decisions":
    /// mean AUROC 0.975 with 1, 0.983 with 8). Scoring evaluates the model this many times per
    /// image (8 draws measured 6.7× slower). Fixed when the model is fitted, since its
    /// calibration scores are means over as many draws.
    pub draws: usize,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            binarize: Binarize::Threshold,
            threshold: 128,
            seed: 0,
            draws: 1,
        }
    }
}

/// `[train]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct TrainConfig {
    /// Passes over the training data (models trained by gradient).
    pub epochs: u32,
    /// Images per gradient step (models trained by gradient).
    pub batch_size: usize,
    /// Step size (models trained by gradient).
    pub learning_rate: f64,
    /// The update rule of models trained by gradient.
    pub optimizer: Rule,
    /// Epochs without a better validation NLL before training stops (models trained by
    /// gradient); the best epoch's parameters are kept.
    pub patience: u32,
    /// Times the learning rate is halved when the validation NLL stops improving (models
    /// trained by gradient): training goes back to the best epoch and continues with half the
    /// step, and stops only when it stalls with no halvings left.
    pub anneal: u32,
    /// Decoupled weight decay (AdamW) of models trained by gradient: every step also shrinks
    /// each parameter by `learning_rate × weight_decay` of itself. 0 turns it off.
    pub weight_decay: f64,
    /// Fraction of the source's images held out from fitting; their scores set the quantile
    /// threshold. Chosen by a hash of the image id and `seed`, so the split is stable.
    pub validation_fraction: f64,
    /// With `source.partition_by`: a partition value with fewer images than this gets no
    /// model; its images are scored by none and never flagged (and the run reports it).
    pub min_images: u64,
    /// Train on a fresh stochastic binarization of the training images every epoch (epoch e
    /// sees draw e − 1, so epoch 1 sees what `preprocess.draws` calls draw 0), instead of on one
    /// binarization throughout: the model learns the intensities' coin flips rather than one
    /// outcome of them. Needs `preprocess.binarize = "stochastic"` and a kind trained by
    /// gradient on binary pixels (`nade`, `fvsbn`); a background model is still fitted on draw
    /// 0, and the validation images keep draw 0 so that early stopping compares like with like.
    pub rebinarize: bool,
    /// Seed for the validation split and for training.
    pub seed: u64,
    /// A wall-clock budget for models trained by gradient, in minutes: when it runs out,
    /// training stops at the end of the step, keeps its best epoch, and the model's curve and
    /// the run's manifest say the budget ended it (a nightly job must finish by morning).
    /// Unset: no budget. A likelihood ratio's background model gets the same budget again.
    pub max_minutes: Option<f64>,
    /// Clip each step's mean gradient to this L2 norm (models trained by gradient); unset: no
    /// clipping.
    pub clip: Option<f64>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        let s = TrainSettings::default();
        Self {
            epochs: s.epochs,
            batch_size: s.batch_size,
            learning_rate: s.learning_rate,
            optimizer: s.optimizer,
            patience: s.patience,
            anneal: s.anneal,
            weight_decay: s.weight_decay,
            validation_fraction: 0.1,
            min_images: 100,
            rebinarize: false,
            seed: s.seed,
            max_minutes: None,
            clip: None,
        }
    }
}

impl TrainConfig {
    /// The settings the training loop takes.
    pub fn settings(&self) -> TrainSettings {
        TrainSettings {
            epochs: self.epochs,
            batch_size: self.batch_size,
            learning_rate: self.learning_rate,
            optimizer: self.optimizer,
            patience: self.patience,
            anneal: self.anneal,
            weight_decay: self.weight_decay,
            seed: self.seed,
            max_seconds: self.max_minutes.map(|m| m * 60.0),
            clip: self.clip,
        }
    }
}

/// How a score is computed from the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScoreMethod {
    /// score = −log p(x) in nats.
    #[default]
    Nll,
    /// score = −log p(x) + log p_background(x): minus the log-likelihood ratio against a
    /// background model that captures what is merely *simple* about images (Ren et al. 2019).
    LikelihoodRatio,
    /// score = −log p(x) − L(x), with L(x) the image's PNG-compressed length in nats: the
    /// likelihood corrected for the image's complexity (Serrà et al. 2020).
    Complexity,
}

/// `[score]`.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct ScoreConfig {
    /// `"nll"`, `"likelihood_ratio"` or `"complexity"`. Fixed when the model is fitted: a
    /// model's calibration scores are in its method's units.
    pub method: ScoreMethod,
    /// For `likelihood_ratio`: the background model, the table `[score.background]`.
    pub background: BackgroundConfig,
}

impl Default for ScoreConfig {
    fn default() -> Self {
        Self {
            method: ScoreMethod::Nll,
            background: BackgroundConfig::default(),
        }
    }
}

/// How the anomaly threshold is chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum ThresholdMethod {
    /// The `quantile` of the held-out validation scores.
    Quantile,
    /// Conformal p-values against the held-out calibration scores, flagged by
    /// Benjamini–Hochberg at `fdr` over each run's images.
    Conformal,
    /// A fixed score `value`.
    Fixed,
}

/// `[threshold]`: an image is an anomaly when its score is above the threshold.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct ThresholdConfig {
    /// `"quantile"`, `"conformal"` or `"fixed"`.
    pub method: ThresholdMethod,
    /// For `quantile`: the fraction of normal images expected below the threshold, in (0, 1).
    pub quantile: f64,
    /// For `fixed`: the score (nats) above which an image is an anomaly.
    pub value: Option<f64>,
    /// For `conformal`: the false discovery rate, in (0, 1): the expected share of normal
    /// images among those flagged in a run stays at or below it.
    pub fdr: f64,
}

impl Default for ThresholdConfig {
    fn default() -> Self {
        Self {
            method: ThresholdMethod::Quantile,
            quantile: 0.99,
            value: None,
            fdr: 0.01,
        }
    }
}

/// `[storage]`: object-store behaviour.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct StorageConfig {
    /// Retries of a failed object-store request before the run fails with exit 75.
    pub max_retries: usize,
    /// Seconds after which a single request is abandoned (and retried).
    pub request_timeout_seconds: u64,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            max_retries: 10,
            request_timeout_seconds: 30,
        }
    }
}

/// `[sink]`: where the tables go.
#[derive(Debug, Clone, Deserialize, Serialize, JsonSchema)]
#[serde(default)]
pub struct SinkConfig {
    /// A directory (path or URI: `file://`, `s3://`, `gs://`, `az://`, `abfss://`) under which
    /// `scores/`, `anomalies/`, `rejects/`, `history/`, `models/` and `runs/` are written.
    pub uri: String,
    /// How the tables are laid out: `parquet` (directories of Parquet files, a run visible once
    /// `runs/<run_id>/_SUCCESS` exists) or `delta` (Delta Lake tables: each run one atomic
    /// commit per table, earlier versions readable; read them with a Delta reader, not a glob).
    pub format: SinkFormat,
    /// Rows per Parquet file before a new part file is started.
    pub max_rows_per_file: usize,
    /// Also write the `embeddings/` table: each scored image's hidden representation under the
    /// model (`nade`, `rnade` and `pixelrnn` have one), a vector of float32 that similar images
    /// share.
    pub embeddings: bool,
}

/// `sink.format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum SinkFormat {
    /// Directories of Parquet part files, published by moving them into place; readers glob.
    #[default]
    Parquet,
    /// Delta Lake tables: a transaction log beside the files, one commit per run and table.
    Delta,
}

impl Default for SinkConfig {
    fn default() -> Self {
        Self {
            uri: String::new(),
            format: SinkFormat::Parquet,
            max_rows_per_file: 1_000_000,
            embeddings: false,
        }
    }
}
