//! The `pixelrnn` family: PixelRNN (van den Oord, Kalchbrenner & Kavukcuoglu 2016), every
//! conditional read off recurrent convolutional layers over the whole past (Row LSTM: the
//! triangle above a pixel; Diagonal BiLSTM: all of it), trained by Adam on the fast kernels of
//! [`kernels::pixelrnn`](crate::kernels::pixelrnn). Binary pixels get a sigmoid each, 8-bit
//! sub-pixels a 256-way softmax; colour is ordered R, G, B within a pixel by masks.

mod model;

pub use model::PixelRnn;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::{DensityModel, Fitted, ModelError};
use crate::kernels::pixelrnn::{Architecture, Shape};
use crate::train::{TrainDefaults, Training, TrainingSet};

/// The recurrent layer, as `model.architecture` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ArchitectureName {
    /// Row LSTM: row by row, each pixel sees the triangle of rows above it (and its left).
    #[serde(rename = "row_lstm")]
    RowLstm,
    /// Diagonal BiLSTM: along diagonals in both directions, each pixel sees its whole past.
    #[serde(rename = "diagonal_bilstm")]
    DiagonalBiLstm,
}

impl ArchitectureName {
    /// The kernels' architecture.
    pub fn architecture(self) -> Architecture {
        match self {
            Self::RowLstm => Architecture::RowLstm,
            Self::DiagonalBiLstm => Architecture::DiagonalBiLstm,
        }
    }

    /// The name of a kernel architecture.
    pub fn of(architecture: Architecture) -> Self {
        match architecture {
            Architecture::RowLstm => Self::RowLstm,
            Architecture::DiagonalBiLstm => Self::DiagonalBiLstm,
        }
    }
}

/// The largest `model.hidden` (LSTM units per layer) accepted.
pub const MAX_HIDDEN: usize = 256;

/// The most recurrent layers `model.layers` accepts.
pub const MAX_LAYERS: usize = 32;

/// The most regions a side `model.embedding_grid` accepts.
pub const MAX_EMBEDDING_GRID: usize = 32;

/// The embedding grid of a model stored before `embedding_grid` was a key: its reference sample
/// was embedded over quarters of the image.
pub(crate) const STORED_EMBEDDING_GRID: usize = 2;

/// PixelRNN: a 7 × 7 mask-A convolution, `layers` residual recurrent layers of `hidden` LSTM
/// units (2·hidden feature maps between them), two ReLU + 1×1 layers, and per sub-pixel a
/// sigmoid (binary pixels) or a 256-way softmax (8-bit, `preprocess.binarize = "none"`); colour
/// channels are split into R, G, B groups of units so that G sees R and B sees R and G of the
/// same pixel. Trained by Adam or RMSProp (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct PixelRnnParams {
    /// `"diagonal_bilstm"` (the default, the better of the two measured per hour of fitting;
    /// README) or `"row_lstm"` (faster per image, a smaller receptive field).
    pub architecture: ArchitectureName,
    /// Recurrent layers, 1 to 32.
    pub layers: usize,
    /// LSTM units per layer (and direction), 1 to 256 and at least the images' channels; the
    /// feature maps are twice as many.
    pub hidden: usize,
    /// The embedding (`sink.embeddings`, nearest normal images, groups of anomalies) averages
    /// the final 2·`hidden` features over this many regions a side of the image, 1 to 32:
    /// `embedding_grid`² · 2 · `hidden` values. Finer keeps more of where a stroke is.
    pub embedding_grid: usize,
    /// Learned skip connections: every layer's features also reach the output through a 1×1
    /// convolution of their own (mask B), as in the paper, instead of only through the last
    /// layer. Off by default (README, "Quality": what they changed in a measured fit).
    pub skip_connections: bool,
}

impl Default for PixelRnnParams {
    fn default() -> Self {
        Self {
            architecture: ArchitectureName::DiagonalBiLstm,
            layers: 7,
            hidden: 16,
            embedding_grid: 7,
            skip_connections: false,
        }
    }
}

impl PixelRnnParams {
    /// The network's shape for images of `channels` sub-pixels of `levels` values.
    pub fn shape(&self, channels: usize, levels: u16) -> Shape {
        Shape {
            architecture: self.architecture.architecture(),
            hidden: self.hidden,
            layers: self.layers,
            channels,
            levels: usize::from(levels),
            skip: self.skip_connections,
        }
    }
}

/// The wording of the size checks, for the config and for stored models.
pub(crate) fn size_problems(
    layers: usize,
    hidden: usize,
    embedding_grid: usize,
) -> [Option<ParamProblem>; 3] {
    [
        ParamProblem::range("layers", layers, 1, MAX_LAYERS),
        ParamProblem::range("hidden", hidden, 1, MAX_HIDDEN),
        ParamProblem::range("embedding_grid", embedding_grid, 1, MAX_EMBEDDING_GRID),
    ]
}

impl Family for PixelRnn {
    const NAME: &'static str = "pixelrnn";
    type Params = PixelRnnParams;
    type Valid = PixelRnnParams;

    fn pixels() -> Pixels {
        Pixels::Any
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        true
    }

    fn embeds() -> bool {
        true
    }

    fn check(params: &PixelRnnParams) -> Result<PixelRnnParams, Vec<ParamProblem>> {
        checked(
            params.clone(),
            size_problems(params.layers, params.hidden, params.embedding_grid),
        )
    }

    fn fit(
        params: &PixelRnnParams,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        let net = params.shape(data.shape.channels, data.levels);
        let (model, curve) = PixelRnn::fit(net, data, training)?;
        Ok(Fitted::trained(
            model.with_embedding_grid(params.embedding_grid),
            curve,
        ))
    }

    /// Small steps (16 images, as in the paper) make more progress per hour on a CPU than the
    /// general 100, and a fit stops after an hour unless `train.max_minutes` says otherwise: a
    /// nightly job must end, and the best epoch is kept.
    fn train_defaults() -> TrainDefaults {
        TrainDefaults {
            epochs: Some(100),
            batch_size: Some(16),
            learning_rate: None,
            max_minutes: Some(60.0),
        }
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(PixelRnn::from_tensors(
            stored.shape,
            stored.levels,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
