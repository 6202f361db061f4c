//! `[model]` and `[score.background]`: a `kind` and that kind's keys, read through the model
//! registry so that each family's keys, defaults and checks live in its own folder.
//!
//! Both tables are internally tagged by `kind`. A key the chosen kind does not take is caught
//! before deserialization, with its line (see [`load`](super::load)), and so are the old
//! spellings of the background. The deserializers here therefore read only the kind's own keys
//! and pass over any other: that is what lets a run manifest written by an earlier version (whose
//! `[model]` held every kind's keys, and whose background was a kind's name) still be read. A
//! bad value of a kind's own key names the key.

use std::borrow::Cow;

use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::de::{self, Deserializer};
use serde::ser::Serializer;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::models::ar::{Ar, ArParams};
use crate::models::families::{self, DEFAULT_KIND, FAMILIES};
use crate::models::shared::ordering::Context;
use crate::models::{Kind, ModelSpec};

/// The `kind` of `[score.background]` that fits the model's own kind on mutated images.
pub const MUTATED: &str = "mutated";

/// `[model]`: the density model p(x) to fit, a `kind` and that kind's keys (another kind's key is
/// an error); or `uri`, a fitted model to score with.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The family and its parameters, as written.
    pub spec: ModelSpec,
    /// Score with this fitted model (a `models/<model_id>/` directory or its `model.json`)
    /// instead of fitting one. Empty: `pipeline run` fits a model on the source.
    pub uri: String,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            spec: default_family().default_spec(),
            uri: String::new(),
        }
    }
}

fn default_family() -> &'static dyn Kind {
    families::find(DEFAULT_KIND).expect("the default kind is registered")
}

/// The background model of a likelihood-ratio score (`[score.background]`).
#[derive(Debug, Clone, PartialEq)]
pub enum BackgroundConfig {
    /// `kind = "mutated"`: the model's own kind and keys, fitted on the training images with a
    /// fraction `mutation_rate` of their pixels replaced by uniform random values (Ren et al.
    /// 2019).
    Mutated {
        /// The fraction of pixels replaced, in (0, 1].
        mutation_rate: f64,
    },
    /// Any model kind with its own keys, fitted on the same images as the model.
    Model(ModelSpec),
}

/// `mutation_rate`'s default.
pub const DEFAULT_MUTATION_RATE: f64 = 0.2;

impl Default for BackgroundConfig {
    /// A local AR-3 model over the 3 nearest earlier sub-pixels: it explains stroke continuity,
    /// which every digit shares, and leaves the ratio with shape (the best one-class MNIST
    /// background measured; README, "Decisions").
    fn default() -> Self {
        BackgroundConfig::Model(ModelSpec::new::<Ar>(ArParams {
            k: 3,
            context: Context::Neighbourhood,
            ..ArParams::default()
        }))
    }
}

impl BackgroundConfig {
    /// The kind's name as written (`"mutated"` or a family's).
    pub fn kind_name(&self) -> &'static str {
        match self {
            BackgroundConfig::Mutated { .. } => MUTATED,
            BackgroundConfig::Model(spec) => spec.name(),
        }
    }
}

/// The keys a table of `kind` takes besides `kind` itself (and `[model]`'s `uri`), or `None`
/// for a kind that does not exist.
pub fn keys_of(kind: &str) -> Option<Vec<String>> {
    if kind == MUTATED {
        return Some(vec!["mutation_rate".into()]);
    }
    families::find(kind).map(|f| f.keys())
}

/// Reads a family's spec from a table without `uri`; `table` names it in messages.
fn spec_from<E: de::Error>(table: &str, mut map: Map<String, Value>) -> Result<ModelSpec, E> {
    let kind = take_kind(table, &mut map)?.unwrap_or_else(|| DEFAULT_KIND.into());
    let family = families::find(&kind).ok_or_else(|| unknown_kind(table, &kind, false))?;
    parse(table, family, map)
}

/// The family's spec from its own keys of `map` (see the module docs for why others are passed
/// over).
fn parse<E: de::Error>(
    table: &str,
    family: &dyn Kind,
    mut map: Map<String, Value>,
) -> Result<ModelSpec, E> {
    let keys = family.keys();
    map.retain(|k, _| keys.contains(k));
    family.parse(map).map_err(|e| match &e.key {
        Some(key) => E::custom(format!("`{table}.{key}`: {e}")),
        None => E::custom(format!("`{table}`: {e}")),
    })
}

fn take_kind<E: de::Error>(table: &str, map: &mut Map<String, Value>) -> Result<Option<String>, E> {
    match map.remove("kind") {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(E::custom(format!(
            "`{table}.kind` must be a string naming a model kind, got {other}"
        ))),
    }
}

fn unknown_kind<E: de::Error>(table: &str, kind: &str, mutated: bool) -> E {
    let mut names = families::names();
    if mutated {
        names.insert(0, MUTATED);
    }
    E::custom(format!(
        "`{table}.kind`: unknown model kind {kind:?}; one of {}",
        names.join(", ")
    ))
}

impl<'de> Deserialize<'de> for ModelConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let mut map = Map::deserialize(d)?;
        let uri = match map.remove("uri") {
            None => String::new(),
            Some(Value::String(s)) => s,
            Some(other) => {
                return Err(de::Error::custom(format!(
                    "`model.uri` must be a string, got {other}"
                )));
            }
        };
        Ok(Self {
            spec: spec_from("model", map)?,
            uri,
        })
    }
}

impl Serialize for ModelConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut json = self.spec.to_json();
        if let Value::Object(map) = &mut json {
            map.insert("uri".into(), Value::from(self.uri.as_str()));
        }
        json.serialize(s)
    }
}

impl<'de> Deserialize<'de> for BackgroundConfig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const TABLE: &str = "score.background";
        let mut map = match Value::deserialize(d)? {
            Value::Object(map) => map,
            // An earlier version's manifest: the background's kind alone (a pipeline file that
            // says so is refused, with what to write, before it gets here).
            Value::String(kind) if kind == MUTATED => {
                return Ok(BackgroundConfig::Mutated {
                    mutation_rate: DEFAULT_MUTATION_RATE,
                });
            }
            Value::String(kind) => {
                let family =
                    families::find(&kind).ok_or_else(|| unknown_kind(TABLE, &kind, true))?;
                return Ok(BackgroundConfig::Model(family.default_spec()));
            }
            other => {
                return Err(de::Error::custom(format!(
                    "`{TABLE}` must be a table with a `kind`, got {other}"
                )));
            }
        };
        let kind = take_kind(TABLE, &mut map)?.ok_or_else(|| {
            de::Error::custom(format!(
                "`{TABLE}.kind` is missing: name the background's kind (\"mutated\" or a model kind such as \"ar\")"
            ))
        })?;
        if kind == MUTATED {
            #[derive(Deserialize)]
            struct Mutated {
                #[serde(default = "default_rate")]
                mutation_rate: f64,
            }
            fn default_rate() -> f64 {
                DEFAULT_MUTATION_RATE
            }
            let m: Mutated = serde_json::from_value(Value::Object(map))
                .map_err(|e| de::Error::custom(format!("`{TABLE}.mutation_rate`: {e}")))?;
            return Ok(BackgroundConfig::Mutated {
                mutation_rate: m.mutation_rate,
            });
        }
        let family = families::find(&kind).ok_or_else(|| unknown_kind(TABLE, &kind, true))?;
        Ok(BackgroundConfig::Model(parse(TABLE, family, map)?))
    }
}

impl Serialize for BackgroundConfig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            BackgroundConfig::Mutated { mutation_rate } => {
                json!({ "kind": MUTATED, "mutation_rate": mutation_rate }).serialize(s)
            }
            BackgroundConfig::Model(spec) => spec.serialize(s),
        }
    }
}

/// One `oneOf` branch per kind: its `kind` constant and its keys, their `$defs` merged into the
/// generator's so that references resolve from the root.
fn kind_branches(generator: &mut SchemaGenerator, with_uri: Option<&Value>) -> Vec<Value> {
    FAMILIES
        .iter()
        .map(|family| {
            let mut schema = family.params_schema().to_value();
            if let Some(Value::Object(defs)) =
                schema.as_object_mut().and_then(|o| o.remove("$defs"))
            {
                generator.definitions_mut().extend(defs);
            }
            let object = schema
                .as_object_mut()
                .expect("a params schema is an object");
            object.remove("$schema");
            object.remove("title");
            let properties = object
                .entry("properties")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("properties");
            let mut keyed = Map::new();
            keyed.insert("kind".into(), json!({ "const": family.name() }));
            keyed.extend(std::mem::take(properties));
            if let Some(uri) = with_uri {
                keyed.insert("uri".into(), uri.clone());
            }
            *properties = keyed;
            object.insert("required".into(), json!(["kind"]));
            schema
        })
        .collect()
}

/// The `kind` property: one constant per kind, described by the kind's parameters' doc.
fn kind_property(branches: &[Value], default: Option<&str>) -> Value {
    let values: Vec<Value> = branches
        .iter()
        .map(|b| json!({ "const": b["properties"]["kind"]["const"] }))
        .collect();
    let mut kind = json!({
        "description": "The model family. Each kind takes its own keys (its table below); a key of another kind is an error.",
        "type": "string",
        "oneOf": values,
    });
    if let Some(default) = default {
        kind["default"] = json!(default);
    }
    kind
}

impl JsonSchema for ModelConfig {
    fn schema_name() -> Cow<'static, str> {
        "ModelConfig".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let uri = json!({
            "description": "Score with this fitted model (a `models/<model_id>/` directory or its `model.json`) instead of fitting one. Empty: `pipeline run` fits a model on the source. Any kind.",
            "type": "string",
            "default": "",
        });
        let branches = kind_branches(generator, Some(&uri));
        let schema = json!({
            "description": "`[model]`: the density model p(x) to fit: a `kind` and that kind's keys; or `uri`, a fitted model to score with.",
            "type": "object",
            "properties": {
                "kind": kind_property(&branches, Some(DEFAULT_KIND)),
                "uri": uri,
            },
            "oneOf": branches,
        });
        Schema::try_from(schema).expect("an object schema")
    }
}

impl JsonSchema for BackgroundConfig {
    fn schema_name() -> Cow<'static, str> {
        "BackgroundConfig".into()
    }

    fn json_schema(generator: &mut SchemaGenerator) -> Schema {
        let mut branches = vec![json!({
            "description": "The model's own kind and keys, fitted on the training images with a fraction `mutation_rate` of their pixels replaced by uniform random values (Ren et al. 2019).",
            "type": "object",
            "properties": {
                "kind": { "const": MUTATED },
                "mutation_rate": {
                    "description": "The fraction of pixels replaced, in (0, 1].",
                    "type": "number",
                    "default": DEFAULT_MUTATION_RATE,
                },
            },
            "required": ["kind"],
            "additionalProperties": false,
        })];
        branches.extend(kind_branches(generator, None));
        let default = serde_json::to_value(BackgroundConfig::default()).expect("JSON");
        let schema = json!({
            "description": "`[score.background]`, for `likelihood_ratio` only: the background model, a `kind` (\"mutated\" or a model kind) and that kind's keys. Without the table: an `ar` model with `k = 3` and `context = \"neighbourhood\"`, a local model that explains what every image shares (the best one-class MNIST background measured; README, \"Decisions\").",
            "type": "object",
            "properties": {
                "kind": kind_property(&branches, None),
            },
            "oneOf": branches,
            "default": default,
        });
        Schema::try_from(schema).expect("an object schema")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_each_kind_come_from_its_family() {
        assert_eq!(keys_of("bernoulli").unwrap(), ["alpha"]);
        assert_eq!(keys_of("nade").unwrap(), ["hidden", "order"]);
        assert_eq!(keys_of(MUTATED).unwrap(), ["mutation_rate"]);
        assert!(keys_of("pixelcnn").is_none());
    }
}
