//! The `ar` family: AR-k, each sub-pixel conditioned on k earlier ones. On binary pixels a
//! logistic regression per conditional, fitted exactly ([`Ar`]); on 8-bit pixels a mixture
//! of discretized logistics linear in the context, trained by Adam ([`ArMixture`]).

mod binary;
mod mixture;

pub use binary::Ar;
pub use mixture::{ArMixture, MAX_COMPONENTS};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::shared::logistic::MAX_FEATURES;
use super::shared::ordering::{Context, Order};
use super::{DensityModel, Fitted, ModelError};
use crate::train::{Training, TrainingSet};

/// AR-k, each sub-pixel conditioned on `k` earlier ones (its `context`). Binary
/// pixels: a logistic regression per conditional, fitted exactly by Newton's method. 8-bit pixels
/// (`binarize = "none"`): a mixture of `components` discretized logistics whose weights, means
/// and scales are linear in the context, trained by Adam. The defaults (k = 12 nearest, 5
/// components) are the best AR settings measured here on MNIST and the texture patches.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ArParams {
    /// How many earlier sub-pixels each conditional sees, 0 to 64.
    pub k: usize,
    /// Which earlier sub-pixels: `"neighbourhood"` (the k nearest already-seen sub-pixels in the
    /// image) or `"previous"` (the k just before in the ordering).
    pub context: Context,
    /// Pixel ordering: `"raster"` or `"random"` (seeded by `train.seed`). Colour channels always
    /// come R, G, B within a pixel.
    pub order: Order,
    /// Binary pixels: the L2 penalty on each conditional's weights and bias (keeps logits
    /// finite). Positive.
    pub l2: f64,
    /// 8-bit pixels: discretized logistics per conditional, 1 to 64.
    pub components: usize,
}

impl Default for ArParams {
    fn default() -> Self {
        Self {
            k: 12,
            context: Context::Neighbourhood,
            order: Order::Raster,
            l2: 1.0,
            components: 5,
        }
    }
}

/// The one wording of `k`'s range, for the check and for stored models.
fn k_problem(k: usize) -> Option<ParamProblem> {
    ParamProblem::range("k", k, 0, MAX_FEATURES)
}

/// The one wording of `components`' range, for the check and for stored models.
fn components_problem(components: usize) -> Option<ParamProblem> {
    ParamProblem::range("components", components, 1, MAX_COMPONENTS)
}

impl Family for Ar {
    const NAME: &'static str = "ar";
    type Params = ArParams;
    type Valid = ArParams;

    fn pixels() -> Pixels {
        Pixels::Any
    }

    fn trained_by_gradient(levels: u16) -> bool {
        levels > 2
    }

    fn check(params: &ArParams) -> Result<ArParams, Vec<ParamProblem>> {
        checked(
            params.clone(),
            [
                k_problem(params.k),
                ParamProblem::positive("l2", params.l2),
                components_problem(params.components),
            ],
        )
    }

    fn fit(
        params: &ArParams,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        let seed = training.settings.seed;
        if data.levels > 2 {
            let hyper = mixture::Hyperparameters {
                k: params.k,
                order: params.order,
                context: params.context,
                components: params.components,
                seed,
            };
            let (model, curve) = ArMixture::fit(hyper, data, training);
            Ok(Fitted::trained(model, curve))
        } else {
            let hyper = binary::Hyperparameters {
                k: params.k,
                order: params.order,
                context: params.context,
                l2: params.l2,
                seed,
            };
            Ok(Fitted::closed(Ar::fit(hyper, data)))
        }
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        let (shape, hyper, tensors) = (stored.shape, stored.hyperparameters, stored.tensors);
        Ok(if stored.levels > 2 {
            Box::new(ArMixture::from_tensors(
                shape,
                stored.levels,
                hyper,
                tensors,
            )?)
        } else {
            Box::new(Ar::from_tensors(shape, hyper, tensors)?)
        })
    }
}
