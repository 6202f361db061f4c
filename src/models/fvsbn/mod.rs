//! The `fvsbn` family: the full chain rule with a logistic conditional on every earlier
//! sub-pixel, trained by Adam.

mod model;

pub use model::Fvsbn;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored};
use super::shared::ordering::Order;
use super::{DensityModel, Fitted, ModelError};
use crate::train::{Training, TrainingSet};

/// The fully visible sigmoid belief network, a logistic regression of every
/// binary sub-pixel on all earlier ones (D(D+1)/2 parameters), trained by Adam (`[train]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema, Default)]
#[serde(default, deny_unknown_fields)]
pub struct FvsbnParams {
    /// Pixel ordering: `"raster"` or `"random"` (seeded by `train.seed`).
    pub order: Order,
}

impl Family for Fvsbn {
    const NAME: &'static str = "fvsbn";
    type Params = FvsbnParams;
    type Valid = FvsbnParams;

    fn pixels() -> Pixels {
        Pixels::Binary
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        true
    }

    fn check(params: &FvsbnParams) -> Result<FvsbnParams, Vec<ParamProblem>> {
        Ok(params.clone())
    }

    fn fit(
        params: &FvsbnParams,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        let (model, curve) = Fvsbn::fit(params.order, training.settings.seed, data, training);
        Ok(Fitted::trained(model, curve))
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(Fvsbn::from_tensors(
            stored.shape,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
