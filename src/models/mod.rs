//! Density models p(x) behind one trait, one folder per family, and the registry that lists
//! them.
//!
//! A model scores an image by its exact log-likelihood log p(x) = Σ_d log p(x_d | x_<d) (in
//! nats), explains the score pixel by pixel, and can draw new images. Each family lives in its
//! own folder (`nade/`: its parameters and [`registry::Family`] impl in `mod.rs`, the model in
//! `model.rs`) and is listed once in [`families::FAMILIES`]; helpers more than one family uses
//! are in [`shared`]. Nothing here knows where artifacts are stored or how a run is driven:
//! fitting takes its data and a [`Training`](crate::train::Training) context as arguments.

pub mod ar;
pub mod bernoulli;
pub mod categorical;
pub mod families;
pub mod fvsbn;
pub mod nade;
pub mod pixelrnn;
pub mod registry;
pub mod rnade;
pub mod shared;
pub mod tensors;

#[cfg(test)]
pub(crate) mod testing;

use ndarray::ArrayView2;
use rand::RngCore;
use rayon::prelude::*;

use crate::data::ImageShape;
use crate::train::EpochRecord;
pub use registry::{Family, Kind, ModelSpec, ParamProblem, Pixels, Stored};

/// A fitted density model over images of one shape whose pixels take `levels()` values.
///
/// Invariants: `shape().dims()` is D for every image passed in; pixel values are below
/// `levels()`; the per-pixel log-likelihoods sum to the image's log-likelihood; Σ_x p(x) = 1 over
/// all `levels()^D` images.
pub trait DensityModel: Send + Sync + std::fmt::Debug {
    /// The family's name (`model.kind`).
    fn kind(&self) -> &'static str;

    /// The image shape the model was fitted on.
    fn shape(&self) -> ImageShape;

    /// Values a pixel takes: 2 (binary) or 256 (8-bit).
    fn levels(&self) -> u16;

    /// Writes log p(x_d | x_<d) for every value of `image` into `out` (both D long), and returns
    /// their sum, log p(x), accumulated in f64.
    fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64;

    /// log p(x) in nats for one image of D values.
    fn log_likelihood(&self, image: &[u8]) -> f64;

    /// Draws one image from p(x) into `out` (D values).
    fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]);

    /// The hyper-parameters the model was fitted with, for model.json; [`Family::load`] reads
    /// them back.
    fn hyperparameters(&self) -> serde_json::Value;

    /// The learned parameters, by name, for model.safetensors.
    fn tensors(&self) -> Vec<NamedTensor>;

    /// The model's hidden representation of an image, where its family has one (NADE, RNADE,
    /// PixelRNN); `None` for the families without a hidden layer.
    fn embedder(&self) -> Option<&dyn Embed> {
        None
    }

    /// log p(x) for each row of `images` into `out`; parallel over images.
    fn log_likelihood_batch(&self, images: ArrayView2<'_, u8>, out: &mut [f64]) {
        out.par_iter_mut()
            .zip(images.axis_iter(ndarray::Axis(0)).into_par_iter())
            .for_each(|(o, row)| {
                *o = self.log_likelihood(row.as_slice().expect("rows are contiguous"));
            });
    }
}

/// A model's embedding: the hidden representation it computes of an image while scoring it, a
/// learned feature vector (what similar images share), used to find the normal images a flagged
/// one resembles and to group anomalies.
///
/// Invariants: every image's embedding has [`embedding_width`](Embed::embedding_width) finite
/// values; the log-likelihoods written beside it equal [`DensityModel::log_likelihood_batch`]'s.
pub trait Embed: Sync {
    /// Values per image.
    fn embedding_width(&self) -> usize;

    /// log p(x) of each row of `images` into `out` and, from the same pass, each image's
    /// embedding into `embeddings` (rows × width, row-major); parallel over images.
    fn log_likelihood_and_embedding(
        &self,
        images: ArrayView2<'_, u8>,
        out: &mut [f64],
        embeddings: &mut [f32],
    );
}

/// A named f64 tensor of model parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct NamedTensor {
    /// Its name in the safetensors file.
    pub name: String,
    /// Its shape.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub data: Vec<f64>,
}

/// A fitted model and, for models trained by gradient, its training curve.
#[derive(Debug)]
pub struct Fitted {
    /// The model.
    pub model: Box<dyn DensityModel>,
    /// One record per epoch (empty for models fitted in closed form).
    pub curve: Vec<EpochRecord>,
}

impl Fitted {
    /// A model fitted in closed form, with no curve.
    pub fn closed(model: impl DensityModel + 'static) -> Self {
        Self {
            model: Box::new(model),
            curve: Vec::new(),
        }
    }

    /// A model trained by gradient, with its curve.
    pub fn trained(model: impl DensityModel + 'static, curve: Vec<EpochRecord>) -> Self {
        Self {
            model: Box::new(model),
            curve,
        }
    }
}

/// Why a model could not be fitted or rebuilt.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// The parameters failed their family's check.
    #[error("{}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Params(Vec<ParamProblem>),

    /// The pixels are not the kind the family models.
    #[error("`{kind}` models {} pixels, and these take {levels} values: {}", pixels_name(*.pixels), pixels_hint(*.pixels))]
    Pixels {
        /// The family.
        kind: &'static str,
        /// What it models.
        pixels: Pixels,
        /// Values the given pixels take.
        levels: u16,
    },

    /// Nothing to fit on.
    #[error("no images to fit on: every row was rejected or held out")]
    NoImages,

    /// A stored model names a kind no family has.
    #[error("unknown model kind {kind:?}: this build knows {known}")]
    UnknownKind {
        /// The kind it names.
        kind: String,
        /// The kinds this build has.
        known: String,
    },

    /// A tensor the family stores is not in the weights file.
    #[error("tensor `{name}` is missing")]
    MissingTensor {
        /// Its name.
        name: String,
    },

    /// A tensor has the wrong number of values.
    #[error("tensor `{name}` has shape {shape:?} ({values} values), expected {expected} values")]
    TensorSize {
        /// Its name.
        name: String,
        /// Its stored shape.
        shape: Vec<usize>,
        /// Values it holds.
        values: usize,
        /// Values the model needs.
        expected: usize,
    },

    /// The stored hyper-parameters do not read as the family's.
    #[error("the hyper-parameters do not read as the family's")]
    Hyperparameters {
        /// The parse error.
        #[from]
        source: serde_json::Error,
    },

    /// The weights file is not safetensors of f64 tensors.
    #[error("unreadable weights")]
    Weights(#[from] tensors::TensorsError),

    /// Stored values that no fitted model of the family has: out of range, not finite, not a
    /// permutation, a context that looks ahead.
    #[error("{what}")]
    Invalid {
        /// What is wrong.
        what: String,
    },
}

impl ModelError {
    /// Stored values no fitted model has, described by `what`.
    pub fn invalid(what: impl Into<String>) -> Self {
        ModelError::Invalid { what: what.into() }
    }
}

fn pixels_name(p: Pixels) -> &'static str {
    match p {
        Pixels::Binary => "binary",
        Pixels::Intensities => "8-bit",
        Pixels::Any => "any",
    }
}

fn pixels_hint(p: Pixels) -> &'static str {
    match p {
        Pixels::Binary => "set preprocess.binarize to \"threshold\" or \"stochastic\"",
        _ => "set preprocess.binarize = \"none\"",
    }
}
