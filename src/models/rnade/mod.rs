//! The `rnade` family: NADE's shared hidden layer with a mixture of Gaussians per conditional,
//! over 8-bit intensities, trained by Adam on the fused kernels of
//! [`kernels::rnade`](crate::kernels::rnade).

mod model;

pub use model::{Hyperparameters, Rnade};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::nade::hidden_problem;
use super::registry::{Family, ParamProblem, Pixels, Stored, checked};
use super::shared::ordering::Order;
use super::{DensityModel, Fitted, ModelError};
use crate::kernels::rnade::MAX_COMPONENTS;
use crate::train::{Training, TrainingSet};

/// RNADE (Uria et al. 2013), NADE's shared layer of `hidden` ReLU units with a
/// mixture of `components` Gaussians per conditional over dequantized 8-bit intensities,
/// trained by Adam (`[train]`). H = 100 with 10 components is the size measured here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RnadeParams {
    /// Hidden units H, 1 to 65,536.
    pub hidden: usize,
    /// Gaussians per conditional, 1 to 64.
    pub components: usize,
    /// Pixel ordering: `"raster"` or `"random"` (seeded by `train.seed`). Colour channels always
    /// come R, G, B within a pixel.
    pub order: Order,
}

impl Default for RnadeParams {
    fn default() -> Self {
        Self {
            hidden: 100,
            components: 10,
            order: Order::Raster,
        }
    }
}

/// The one wording of `components`' range, for the check and for stored models.
fn components_problem(components: usize) -> Option<ParamProblem> {
    ParamProblem::range("components", components, 1, MAX_COMPONENTS)
}

impl Family for Rnade {
    const NAME: &'static str = "rnade";
    type Params = RnadeParams;
    type Valid = RnadeParams;

    fn pixels() -> Pixels {
        Pixels::Intensities
    }

    fn trained_by_gradient(_levels: u16) -> bool {
        true
    }

    fn embeds() -> bool {
        true
    }

    fn check(params: &RnadeParams) -> Result<RnadeParams, Vec<ParamProblem>> {
        checked(
            params.clone(),
            [
                hidden_problem(params.hidden),
                components_problem(params.components),
            ],
        )
    }

    fn fit(
        params: &RnadeParams,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        let hyper = Hyperparameters {
            hidden: params.hidden,
            components: params.components,
            order: params.order,
            seed: training.settings.seed,
        };
        let (model, curve) = Rnade::fit(hyper, data, training);
        Ok(Fitted::trained(model, curve))
    }

    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        Ok(Box::new(Rnade::from_tensors(
            stored.shape,
            stored.levels,
            stored.hyperparameters,
            stored.tensors,
        )?))
    }
}
