//! What a model family is: the [`Family`] trait every family implements (and the list of them,
//! [`FAMILIES`](super::families::FAMILIES), hands out as [`Kind`] objects), so that what a family
//! takes (its `[model]` keys, binary or 8-bit pixels, whether it trains by gradient) is answered
//! by the family itself and no caller keeps a list of its own.
//!
//! A family's parameters come in two types, as in linfa: `Params` is the `[model]` table as
//! written (every key with its default and doc comment, from which the TOML reference is
//! generated) and `Valid` is what [`Family::check`] makes of it. Only `Valid` can fit, so a
//! model never sees a value its family has not checked.

use std::fmt::Debug;
use std::marker::PhantomData;
use std::sync::Arc;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{DensityModel, Fitted, ModelError, NamedTensor};
use crate::data::ImageShape;
use crate::train::{TrainDefaults, Training, TrainingSet};

/// Which pixel values a family models.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pixels {
    /// Binary pixels only (`preprocess.binarize = "threshold"` or `"stochastic"`).
    Binary,
    /// 8-bit intensities only (`preprocess.binarize = "none"`).
    Intensities,
    /// Either.
    Any,
}

impl Pixels {
    /// Whether pixels taking `levels` values suit the family.
    pub fn accepts(self, levels: u16) -> bool {
        match self {
            Pixels::Binary => levels == 2,
            Pixels::Intensities => levels > 2,
            Pixels::Any => true,
        }
    }
}

/// One problem with a family's parameters: the key (without its table) and what is wrong.
///
/// Displayed as "`key` message", e.g. "`hidden` must be between 1 and 65536, got 0"; the config
/// loader names the table (`model.hidden`) and the line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{key}` {message}")]
pub struct ParamProblem {
    /// The key, as in the TOML table.
    pub key: &'static str,
    /// What is wrong with its value, starting with "must".
    pub message: String,
}

impl ParamProblem {
    /// `key` must lie in `lo..=hi`; a problem when `value` does not.
    pub fn range(key: &'static str, value: usize, lo: usize, hi: usize) -> Option<Self> {
        (!(lo..=hi).contains(&value)).then(|| Self {
            key,
            message: format!("must be between {lo} and {hi}, got {value}"),
        })
    }

    /// `key` must be a finite number above zero; a problem when `value` is not.
    pub fn positive(key: &'static str, value: f64) -> Option<Self> {
        (!(value.is_finite() && value > 0.0)).then(|| Self {
            key,
            message: format!("must be a positive number, got {value}"),
        })
    }
}

/// `valid` when none of `problems` is a problem, else every one of them.
pub fn checked<T>(
    valid: T,
    problems: impl IntoIterator<Item = Option<ParamProblem>>,
) -> Result<T, Vec<ParamProblem>> {
    let problems: Vec<ParamProblem> = problems.into_iter().flatten().collect();
    if problems.is_empty() {
        Ok(valid)
    } else {
        Err(problems)
    }
}

/// A family's `[model]` table that does not deserialize: an unknown key or a value of the wrong
/// type.
#[derive(Debug, thiserror::Error)]
#[error("{cause}")]
pub struct BadParams {
    /// The key to blame, where one alone is.
    pub key: Option<String>,
    /// serde's error, whose message is this one's.
    pub cause: serde_json::Error,
}

/// What a model is rebuilt from: model.json's description and model.safetensors' tensors.
#[derive(Debug, Clone, Copy)]
pub struct Stored<'a> {
    /// The image shape it was fitted on.
    pub shape: ImageShape,
    /// Values a pixel takes.
    pub levels: u16,
    /// Its `hyperparameters` object, as the model wrote it.
    pub hyperparameters: &'a Value,
    /// Its weights.
    pub tensors: &'a [NamedTensor],
}

/// A model family. Implemented by one type per family (its model type, by convention), and
/// registered with one line in [`FAMILIES`](super::families::FAMILIES).
pub trait Family: 'static {
    /// Its `model.kind`, also written to the tables and artifacts.
    const NAME: &'static str;

    /// The family's `[model]` keys as written, each with its default; the doc comments of the
    /// type and its fields are the TOML reference. Deserialized with unknown keys denied.
    type Params: Serialize + DeserializeOwned + JsonSchema + Default + Clone + Debug + Send + Sync;

    /// Parameters [`check`](Family::check) accepted: the only ones that fit.
    type Valid;

    /// The pixel values the family models.
    fn pixels() -> Pixels;

    /// Whether fitting on pixels of `levels` values trains by gradient over epochs (so uses
    /// `[train]`'s epochs, batch size and learning rate, and shows a progress bar).
    fn trained_by_gradient(levels: u16) -> bool;

    /// Whether its fitted models have an embedding ([`DensityModel::embedder`] is `Some`), so
    /// that `sink.embeddings` can be refused before anything is fitted.
    fn embeds() -> bool {
        false
    }

    /// Checks every value, reporting every problem at once.
    fn check(params: &Self::Params) -> Result<Self::Valid, Vec<ParamProblem>>;

    /// Fits a model on `data` (whose pixels [`pixels`](Family::pixels) accepts, at least one
    /// image); `training.settings.seed` fixes anything random.
    fn fit(
        params: &Self::Valid,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError>;

    /// Rebuilds a fitted model from what it stored, refusing anything that does not fit.
    fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError>;

    /// `[train]` values this family needs in place of the general defaults, used for every
    /// key the pipeline file leaves out (none by default).
    fn train_defaults() -> TrainDefaults {
        TrainDefaults::default()
    }
}

/// A family as the rest of the program sees it: [`Family`] without its types, one object per
/// family in [`FAMILIES`](super::families::FAMILIES).
pub trait Kind: Send + Sync {
    /// Its `model.kind`.
    fn name(&self) -> &'static str;

    /// The pixel values it models.
    fn pixels(&self) -> Pixels;

    /// Whether it trains by gradient on pixels of `levels` values.
    fn trained_by_gradient(&self, levels: u16) -> bool;

    /// Whether its fitted models have an embedding.
    fn embeds(&self) -> bool;

    /// The JSON Schema of its `[model]` keys (without `kind`).
    fn params_schema(&self) -> schemars::Schema;

    /// Its `[model]` keys (without `kind`), in declaration order.
    fn keys(&self) -> Vec<String> {
        self.params_schema()
            .get("properties")
            .and_then(Value::as_object)
            .map(|p| p.keys().cloned().collect())
            .unwrap_or_default()
    }

    /// Reads its parameters from a table of keys (without `kind`); every key missing takes its
    /// default. On a bad key or value: the key to blame, where one is, and serde's error.
    fn parse(&self, table: Map<String, Value>) -> Result<ModelSpec, BadParams>;

    /// Its parameters with every default.
    fn default_spec(&self) -> ModelSpec;

    /// Rebuilds a fitted model of this family.
    fn load(&self, stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError>;

    /// Its `[train]` defaults that differ from the general ones.
    fn train_defaults(&self) -> TrainDefaults;
}

/// The [`Kind`] of a [`Family`]: a zero-sized handle.
pub struct Registered<F>(pub PhantomData<fn() -> F>);

impl<F: Family> Registered<F> {
    /// The handle as a `'static` object (a zero-sized value, so leaking it costs nothing).
    pub fn handle() -> &'static dyn Kind {
        Box::leak(Box::new(Registered::<F>(PhantomData)))
    }
}

impl<F: Family> Kind for Registered<F> {
    fn name(&self) -> &'static str {
        F::NAME
    }

    fn pixels(&self) -> Pixels {
        F::pixels()
    }

    fn trained_by_gradient(&self, levels: u16) -> bool {
        F::trained_by_gradient(levels)
    }

    fn embeds(&self) -> bool {
        F::embeds()
    }

    fn params_schema(&self) -> schemars::Schema {
        schemars::schema_for!(F::Params)
    }

    fn parse(&self, table: Map<String, Value>) -> Result<ModelSpec, BadParams> {
        match serde_json::from_value::<F::Params>(Value::Object(table.clone())) {
            Ok(params) => Ok(ModelSpec::new::<F>(params)),
            Err(e) => {
                // serde names no key for a bad value: the one key that fails alone is to blame.
                let culprit = table.iter().find_map(|(k, v)| {
                    let alone = Map::from_iter([(k.clone(), v.clone())]);
                    serde_json::from_value::<F::Params>(Value::Object(alone))
                        .err()
                        .map(|e| (k.clone(), e))
                });
                Err(match culprit {
                    Some((key, cause)) => BadParams {
                        key: Some(key),
                        cause,
                    },
                    None => BadParams {
                        key: None,
                        cause: e,
                    },
                })
            }
        }
    }

    fn default_spec(&self) -> ModelSpec {
        ModelSpec::new::<F>(F::Params::default())
    }

    fn load(&self, stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
        F::load(stored)
    }

    fn train_defaults(&self) -> TrainDefaults {
        F::train_defaults()
    }
}

/// A family and its parameters as written (unchecked): what `[model]` (or
/// `[score.background]`) says to fit. Cheap to clone.
#[derive(Clone)]
pub struct ModelSpec(Arc<dyn SpecObject>);

/// [`ModelSpec`]'s inside, typed by its family.
trait SpecObject: Send + Sync + Debug {
    fn kind(&self) -> &'static dyn Kind;
    fn problems(&self) -> Vec<ParamProblem>;
    fn fit(&self, data: &TrainingSet<'_>, training: &Training<'_>) -> Result<Fitted, ModelError>;
    fn params_json(&self) -> Value;
}

struct Spec<F: Family>(F::Params);

impl<F: Family> Debug for Spec<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {:?}", F::NAME, self.0)
    }
}

impl<F: Family> SpecObject for Spec<F> {
    fn kind(&self) -> &'static dyn Kind {
        Registered::<F>::handle()
    }

    fn problems(&self) -> Vec<ParamProblem> {
        F::check(&self.0).err().unwrap_or_default()
    }

    fn fit(&self, data: &TrainingSet<'_>, training: &Training<'_>) -> Result<Fitted, ModelError> {
        let valid = F::check(&self.0).map_err(ModelError::Params)?;
        if !F::pixels().accepts(data.levels) {
            return Err(ModelError::Pixels {
                kind: F::NAME,
                pixels: F::pixels(),
                levels: data.levels,
            });
        }
        if data.pixels.nrows() == 0 {
            return Err(ModelError::NoImages);
        }
        F::fit(&valid, data, training)
    }

    fn params_json(&self) -> Value {
        serde_json::to_value(&self.0).expect("parameters serialize to JSON")
    }
}

impl ModelSpec {
    /// Family `F` with `params`.
    pub fn new<F: Family>(params: F::Params) -> Self {
        Self(Arc::new(Spec::<F>(params)))
    }

    /// The family.
    pub fn kind(&self) -> &'static dyn Kind {
        self.0.kind()
    }

    /// The family's name.
    pub fn name(&self) -> &'static str {
        self.kind().name()
    }

    /// Every problem the family's check finds (none: the parameters can fit).
    pub fn problems(&self) -> Vec<ParamProblem> {
        self.0.problems()
    }

    /// Checks the parameters and the pixels, then fits on `data`.
    pub fn fit(
        &self,
        data: &TrainingSet<'_>,
        training: &Training<'_>,
    ) -> Result<Fitted, ModelError> {
        self.0.fit(data, training)
    }

    /// The parameters as a JSON object, `kind` first.
    pub fn to_json(&self) -> Value {
        let mut out = Map::new();
        out.insert("kind".into(), Value::from(self.name()));
        if let Value::Object(params) = self.0.params_json() {
            out.extend(params);
        }
        Value::Object(out)
    }
}

impl Debug for ModelSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

impl PartialEq for ModelSpec {
    fn eq(&self, other: &Self) -> bool {
        self.to_json() == other.to_json()
    }
}

impl Serialize for ModelSpec {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_json().serialize(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::families::{DEFAULT_KIND, FAMILIES, find, names};
    use crate::models::shared::tensor;
    use ndarray::Array2;
    use rand::RngCore;

    /// A throwaway family, written as a new family's folder would be: its params, its model and
    /// its `Family` impl, and nothing anywhere else. Every image of D binary pixels is equally
    /// likely, each pixel on with probability `p` (checked to lie in (0, 1)).
    #[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize, JsonSchema)]
    #[serde(default, deny_unknown_fields)]
    struct CoinParams {
        /// P(pixel on).
        p: f64,
    }

    impl Default for CoinParams {
        fn default() -> Self {
            Self { p: 0.5 }
        }
    }

    #[derive(Debug)]
    struct Coin {
        shape: ImageShape,
        p: f64,
    }

    impl DensityModel for Coin {
        fn kind(&self) -> &'static str {
            <Self as Family>::NAME
        }
        fn shape(&self) -> ImageShape {
            self.shape
        }
        fn levels(&self) -> u16 {
            2
        }
        fn pixel_log_likelihood(&self, image: &[u8], out: &mut [f32]) -> f64 {
            for (o, &x) in out.iter_mut().zip(image) {
                *o = if x != 0 {
                    self.p.ln()
                } else {
                    (1.0 - self.p).ln()
                } as f32;
            }
            self.log_likelihood(image)
        }
        fn log_likelihood(&self, image: &[u8]) -> f64 {
            let on = image.iter().filter(|&&x| x != 0).count() as f64;
            on * self.p.ln() + (image.len() as f64 - on) * (1.0 - self.p).ln()
        }
        fn sample(&self, rng: &mut dyn RngCore, out: &mut [u8]) {
            out.iter_mut()
                .for_each(|o| *o = u8::from(crate::models::shared::uniform(rng) < self.p));
        }
        fn hyperparameters(&self) -> Value {
            serde_json::json!({})
        }
        fn tensors(&self) -> Vec<NamedTensor> {
            vec![NamedTensor {
                name: "p".into(),
                shape: vec![1],
                data: vec![self.p],
            }]
        }
    }

    impl Family for Coin {
        const NAME: &'static str = "coin";
        type Params = CoinParams;
        type Valid = f64;
        fn pixels() -> Pixels {
            Pixels::Binary
        }
        fn trained_by_gradient(_levels: u16) -> bool {
            false
        }
        fn check(params: &CoinParams) -> Result<f64, Vec<ParamProblem>> {
            let bad = !(params.p > 0.0 && params.p < 1.0);
            checked(
                params.p,
                [bad.then(|| ParamProblem {
                    key: "p",
                    message: format!("must be in (0, 1), got {}", params.p),
                })],
            )
        }
        fn fit(
            p: &f64,
            data: &TrainingSet<'_>,
            _training: &Training<'_>,
        ) -> Result<Fitted, ModelError> {
            Ok(Fitted::closed(Coin {
                shape: data.shape,
                p: *p,
            }))
        }
        fn load(stored: &Stored<'_>) -> Result<Box<dyn DensityModel>, ModelError> {
            let p = tensor(stored.tensors, "p", 1)?[0];
            Ok(Box::new(Coin {
                shape: stored.shape,
                p,
            }))
        }
    }

    /// Everything the program asks of a family is answered by its folder alone: keys and
    /// defaults from its params, parsing with unknown keys refused, the check before a fit,
    /// the pixel check, and loading back what it stored.
    #[test]
    fn a_new_family_needs_nothing_outside_its_own_code() {
        let kind = Registered::<Coin>::handle();
        assert_eq!((kind.name(), kind.keys()), ("coin", vec!["p".to_string()]));
        assert!(!kind.trained_by_gradient(2));
        let spec = kind
            .parse(Map::from_iter([("p".into(), Value::from(0.25))]))
            .unwrap();
        assert_eq!(
            spec.to_json(),
            serde_json::json!({"kind": "coin", "p": 0.25})
        );
        let bad_key = kind
            .parse(Map::from_iter([("q".into(), Value::from(1))]))
            .unwrap_err();
        assert_eq!(bad_key.key.as_deref(), Some("q"), "{bad_key}");
        let bad = ModelSpec::new::<Coin>(CoinParams { p: 1.5 });
        assert_eq!(
            bad.problems()[0].to_string(),
            "`p` must be in (0, 1), got 1.5"
        );

        let pixels = Array2::<u8>::zeros((3, 4));
        let mut data = TrainingSet {
            shape: ImageShape::new(2, 2, 1),
            levels: 2,
            pixels: pixels.view(),
            validation: pixels.slice(ndarray::s![..0, ..]),
            redraw: None,
        };
        let settings = crate::train::TrainSettings::default();
        let training = Training::unmonitored(&settings);
        assert!(matches!(
            bad.fit(&data, &training),
            Err(ModelError::Params(_))
        ));
        let fitted = spec.fit(&data, &training).unwrap();
        let tensors = fitted.model.tensors();
        let hyperparameters = fitted.model.hyperparameters();
        let back = kind
            .load(&Stored {
                shape: data.shape,
                levels: 2,
                hyperparameters: &hyperparameters,
                tensors: &tensors,
            })
            .unwrap();
        let x = [1u8, 0, 0, 1];
        assert_eq!(back.log_likelihood(&x), fitted.model.log_likelihood(&x));
        assert!((crate::models::testing::total_probability(back.as_ref()) - 1.0).abs() < 1e-12);

        data.levels = 256;
        assert!(matches!(
            spec.fit(&data, &training),
            Err(ModelError::Pixels { kind: "coin", .. })
        ));
    }

    /// Every registered family refuses pixels it does not model, before fitting anything; the
    /// models it fits have an embedding exactly when it says so, scoring as without one.
    #[test]
    fn families_refuse_pixels_they_do_not_model() {
        for levels in [2u16, 256] {
            let pixels = Array2::<u8>::zeros((2, 4));
            let data = TrainingSet {
                shape: ImageShape::new(2, 2, 1),
                levels,
                pixels: pixels.view(),
                validation: pixels.slice(ndarray::s![..0, ..]),
                redraw: None,
            };
            let settings = crate::train::TrainSettings {
                epochs: 1,
                ..Default::default()
            };
            for family in FAMILIES {
                let result = family
                    .default_spec()
                    .fit(&data, &Training::unmonitored(&settings));
                let refused = matches!(result, Err(ModelError::Pixels { .. }));
                assert_eq!(
                    refused,
                    !family.pixels().accepts(levels),
                    "{} on {levels} levels: {result:?}",
                    family.name()
                );
                if let Ok(fitted) = result {
                    let embedder = fitted.model.embedder();
                    assert_eq!(embedder.is_some(), family.embeds(), "{}", family.name());
                    if let Some(e) = embedder {
                        let (mut ll, mut plain) = (vec![0.0; 2], vec![0.0; 2]);
                        let mut emb = vec![f32::NAN; 2 * e.embedding_width()];
                        e.log_likelihood_and_embedding(pixels.view(), &mut ll, &mut emb);
                        fitted.model.log_likelihood_batch(pixels.view(), &mut plain);
                        assert_eq!(ll, plain, "{}", family.name());
                        assert!(emb.iter().all(|v| v.is_finite()), "{}", family.name());
                    }
                }
            }
        }
    }

    #[test]
    fn every_family_is_listed_once_and_found_by_name() {
        let names = names();
        for name in &names {
            assert_eq!(find(name).unwrap().name(), *name);
            assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name}");
        }
        assert!(find(DEFAULT_KIND).is_some());
        assert!(find("pixelcnn").is_none());
    }

    /// A spec knows its family, and its JSON names the kind first.
    #[test]
    fn a_spec_round_trips_through_its_family() {
        for family in FAMILIES {
            let spec = family.default_spec();
            assert_eq!(spec.name(), family.name());
            assert!(
                spec.problems().is_empty(),
                "{}: defaults must be valid",
                spec.name()
            );
            let json = spec.to_json();
            assert_eq!(json["kind"], family.name());
            let Value::Object(mut table) = json else {
                panic!("an object")
            };
            table.remove("kind");
            assert_eq!(family.parse(table).unwrap(), spec);
        }
    }
}
