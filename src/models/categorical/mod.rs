//! The `categorical` family: independent pixels over 2 or 256 levels, fitted by counting.

mod model;

pub use model::Categorical;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::{DensityModel, Fitted, ModelError};
use crate::train::{Training, TrainingSet};

/// Independent discrete pixels, p(x) = Π Categorical(x_d; π_d) over 2 or
/// 256 levels, fitted by counting. The 8-bit baseline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct CategoricalParams {
    /// Laplace (add-alpha) smoothing: every value is seen `alpha` extra times, so no pixel value
    /// has probability zero. Positive.
    pub alpha: f64,
}

impl Default for CategoricalParams {
    fn default() -> Self {
        Self { alpha: 1.0 }
    }
}

impl Family for Categorical {
    const NAME: &'static str = "categorical";
    type Params = CategoricalParams;
    type Valid = CategoricalParams;

    fn pixels() -> Pixels {
        Pixels::Any
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        false
    }

    fn check(params: &CategoricalParams) -> Result<CategoricalParams, Vec<ParamProblem>> {
        checked(
            params.clone(),
            [ParamProblem::positive("alpha", params.alpha)],
        )
    }

    fn fit(
        params: &CategoricalParams,
        data: &TrainingSet<'_>,
        _training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        Ok(Fitted::closed(Categorical::fit(params.alpha, data)))
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(Categorical::from_tensors(
            stored.shape,
            stored.levels,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
