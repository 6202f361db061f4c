//! The `bernoulli` family: independent binary pixels, fitted by counting.

mod model;

pub use model::Bernoulli;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::{DensityModel, Fitted, ModelError};
use crate::train::{Training, TrainingSet};

/// Independent binary pixels, p(x) = Π Bernoulli(x_d; p_d); D parameters,
/// fitted by counting. The baseline every other model must beat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct BernoulliParams {
    /// Laplace (add-alpha) smoothing: every value is seen `alpha` extra times, so no pixel value
    /// has probability zero. Positive.
    pub alpha: f64,
}

impl Default for BernoulliParams {
    fn default() -> Self {
        Self { alpha: 1.0 }
    }
}

impl Family for Bernoulli {
    const NAME: &'static str = "bernoulli";
    type Params = BernoulliParams;
    type Valid = BernoulliParams;

    fn pixels() -> Pixels {
        Pixels::Binary
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        false
    }

    fn check(params: &BernoulliParams) -> Result<BernoulliParams, Vec<ParamProblem>> {
        checked(
            params.clone(),
            [ParamProblem::positive("alpha", params.alpha)],
        )
    }

    fn fit(
        params: &BernoulliParams,
        data: &TrainingSet<'_>,
        _training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        Ok(Fitted::closed(Bernoulli::fit(params.alpha, data)))
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(Bernoulli::from_tensors(
            stored.shape,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
