//! The `nade` family: every conditional read off one shared hidden layer, trained by Adam on the
//! fused kernels of [`kernels::nade`](crate::kernels::nade).

mod model;

pub use model::{MAX_HIDDEN, Nade, padded_width};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::shared::ordering::Order;
use super::{DensityModel, Fitted, ModelError};
use crate::train::{Training, TrainingSet};

/// NADE (Larochelle & Murray 2011), every conditional of a binary sub-pixel read
/// off one shared layer of `hidden` sigmoid units, trained by Adam (`[train]`). H = 500 is the
/// best size measured here on MNIST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NadeParams {
    /// Hidden units H, 1 to 65,536.
    pub hidden: usize,
    /// Pixel ordering: `"raster"` or `"random"` (seeded by `train.seed`).
    pub order: Order,
}

impl Default for NadeParams {
    fn default() -> Self {
        Self {
            hidden: 500,
            order: Order::Raster,
        }
    }
}

/// The one wording of the hidden layer's range, for the check and for stored models (RNADE's
/// too).
pub(crate) fn hidden_problem(hidden: usize) -> Option<ParamProblem> {
    ParamProblem::range("hidden", hidden, 1, MAX_HIDDEN)
}

impl Family for Nade {
    const NAME: &'static str = "nade";
    type Params = NadeParams;
    type Valid = NadeParams;

    fn pixels() -> Pixels {
        Pixels::Binary
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        true
    }

    fn embeds() -> bool {
        true
    }

    fn check(params: &NadeParams) -> Result<NadeParams, Vec<ParamProblem>> {
        checked(params.clone(), [hidden_problem(params.hidden)])
    }

    fn fit(
        params: &NadeParams,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        let seed = training.settings.seed;
        let (model, curve) = Nade::fit(params.hidden, params.order, seed, data, training);
        Ok(Fitted::trained(model, curve))
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(Nade::from_tensors(
            stored.shape,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
