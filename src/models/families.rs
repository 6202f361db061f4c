//! The registry: the one list of model families. Adding a family is adding its folder under
//! `src/models/` and one line in [`FAMILIES`]; everything else asks this list.

use std::marker::PhantomData;

use super::registry::{Kind, Registered, Stored};
use super::{DensityModel, ModelError};

/// Every model family, in the order the reference lists them. Adding a family is adding its
/// folder under `src/models/` and one line here.
pub static FAMILIES: &[&dyn Kind] = &[
    &Registered::<super::bernoulli::Bernoulli>(PhantomData),
    &Registered::<super::categorical::Categorical>(PhantomData),
    &Registered::<super::ar::Ar>(PhantomData),
    &Registered::<super::fvsbn::Fvsbn>(PhantomData),
    &Registered::<super::nade::Nade>(PhantomData),
    &Registered::<super::rnade::Rnade>(PhantomData),
    &Registered::<super::pixelrnn::PixelRnn>(PhantomData),
];

/// The kind `[model]` gets when it names none.
pub const DEFAULT_KIND: &str = "bernoulli";

/// The family named `name` (as in TOML, tables and artifacts).
pub fn find(name: &str) -> Option<&'static dyn Kind> {
    FAMILIES.iter().copied().find(|f| f.name() == name)
}

/// The names of every family, for messages.
pub fn names() -> Vec<&'static str> {
    FAMILIES.iter().map(|f| f.name()).collect()
}

/// The names of the families whose models have an embedding, for messages.
pub fn with_embedding() -> Vec<&'static str> {
    FAMILIES
        .iter()
        .filter(|f| f.embeds())
        .map(|f| f.name())
        .collect()
}

/// Rebuilds a stored model of family `kind`.
pub fn load(kind: &str, stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
    find(kind)
        .ok_or_else(|| ModelError::UnknownKind {
            kind: kind.into(),
            known: names().join(", "),
        })?
        .load(stored)
}
