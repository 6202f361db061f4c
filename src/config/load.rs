//! From pipeline TOML text to a validated [`PipelineConfig`], reporting every problem at once.
//!
//! The phases: parse (a syntax error stops here), apply `--set` overrides, interpolate `${VAR}`
//! in string values, deserialize while collecting unknown keys, then check values. Each problem
//! carries the line of its key, found in the parsed document's spans.

use std::str::FromStr;

use toml_edit::{DocumentMut, Item, Value};

use super::interpolate::{Environment, Lookup, interpolate};
use super::model::{BackgroundConfig, keys_of};
use super::{Binarize, PipelineConfig, ScoreMethod, ThresholdMethod};
use crate::error::{ConfigProblem, ConfigProblems, Error, Result};
use crate::models::Pixels;
use crate::models::families::{self, DEFAULT_KIND, FAMILIES};
use crate::models::{Kind, ModelSpec};

/// What the command line adds to a pipeline file.
#[derive(Debug, Clone, Default)]
pub struct LoadOptions {
    /// `KEY=VALUE` overrides from `--set`, applied in order; VALUE is read as a TOML value when
    /// it parses as one (`5`, `true`, `[1, 2]`, `"x"`) and as a string otherwise.
    pub overrides: Vec<String>,
    /// `--run-id`, which takes precedence over `pipeline.run_id`.
    pub run_id: Option<String>,
}

/// The largest pipeline file accepted: real ones are a few kilobytes, and anything near this is
/// a mistake or an attack (a 10 MB string would end up in every log line and manifest).
pub const MAX_PIPELINE_FILE_BYTES: u64 = 1 << 20;

/// The most binarizations of an image `preprocess.draws` may ask for: the gain has long levelled
/// off by then (8 draws measured), and the cost grows with every one.
pub const MAX_DRAWS: usize = 256;

/// Reads, resolves and validates a pipeline file from disk, with `${VAR}` from the environment.
pub fn load_file(path: &str, opts: &LoadOptions) -> Result<PipelineConfig> {
    if let Ok(meta) = std::fs::metadata(path)
        && meta.len() > MAX_PIPELINE_FILE_BYTES
    {
        return Err(Error::config(
            path,
            format!(
                "the pipeline file is {} bytes; at most {MAX_PIPELINE_FILE_BYTES} are accepted",
                meta.len()
            ),
        ));
    }
    let text = std::fs::read_to_string(path).map_err(|e| {
        Error::config(
            path,
            format!("cannot read the pipeline file: {e}; check the path"),
        )
    })?;
    load_str(path, &text, opts, &Environment)
}

/// Resolves and validates pipeline TOML `text`; `file` names it in messages.
pub fn load_str(
    file: &str,
    text: &str,
    opts: &LoadOptions,
    vars: &dyn Lookup,
) -> Result<PipelineConfig> {
    let mut problems = Vec::new();
    let fail = |problems: Vec<ConfigProblem>| {
        Error::Config(ConfigProblems {
            file: file.to_string(),
            problems,
        })
    };

    let mut doc = DocumentMut::from_str(text).map_err(|e| {
        fail(vec![ConfigProblem {
            line: e.span().map(|s| line_of(text, s.start)),
            message: format!("invalid TOML: {}", e.message().trim()),
        }])
    })?;
    let locate = Locator::new(text);

    for o in &opts.overrides {
        if let Err(e) = apply_override(&mut doc, o) {
            problems.push(ConfigProblem {
                line: None,
                message: e.to_string(),
            });
        }
    }
    if let Some(run_id) = &opts.run_id {
        set_path(
            &mut doc,
            &["pipeline", "run_id"],
            Value::from(run_id.as_str()),
        );
    }

    let mut path = Vec::new();
    interpolate_table(doc.as_table_mut(), &mut path, vars, &locate, &mut problems);
    check_kind_tables(&mut doc, &locate, &mut problems);
    fill_family_train_defaults(&mut doc);

    let resolved = doc.to_string();
    let mut unknown = Vec::new();
    let parsed = toml::Deserializer::parse(&resolved).and_then(|de| {
        serde_ignored::deserialize(de, |p| unknown.push(p.to_string()))
            .map_err(|e: toml::de::Error| e)
    });
    for key in unknown {
        problems.push(ConfigProblem {
            line: locate.line(&key),
            message: format!(
                "unknown key `{key}`: see schemas/pipeline-toml.md for the keys of each table"
            ),
        });
    }
    let mut config: PipelineConfig = match parsed {
        Ok(c) => c,
        Err(e) => {
            let message = e.message().trim().to_string();
            // The model tables' own messages start with the key they are about.
            let line = leading_key(&message)
                .and_then(|key| locate.line(key))
                .or_else(|| e.span().map(|s| line_of(&resolved, s.start)));
            problems.push(ConfigProblem { line, message });
            return Err(fail(problems));
        }
    };

    // Partition columns are read like passthrough columns, and analysts need them per row.
    for column in &config.source.partition_by {
        if !config.source.passthrough.contains(column) {
            config.source.passthrough.push(column.clone());
        }
    }
    for (key, message) in check_values(&config) {
        problems.push(ConfigProblem {
            line: locate.line(&key),
            message,
        });
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(fail(problems))
    }
}

/// Writes the `[model]` family's own `[train]` defaults (`Family::train_defaults`) into the
/// document for every key it does not set, so the parsed config, `pipeline validate` and the
/// manifest all show the values training uses.
fn fill_family_train_defaults(doc: &mut DocumentMut) {
    let kind = doc
        .get("model")
        .and_then(|m| m.get("kind"))
        .and_then(Item::as_str)
        .unwrap_or(families::DEFAULT_KIND);
    let Some(family) = families::find(kind) else {
        return;
    };
    let d = family.train_defaults();
    let values: [(&str, Option<Value>); 4] = [
        ("epochs", d.epochs.map(|v| Value::from(i64::from(v)))),
        ("batch_size", d.batch_size.map(|v| Value::from(v as i64))),
        ("learning_rate", d.learning_rate.map(Value::from)),
        ("max_minutes", d.max_minutes.map(Value::from)),
    ];
    for (key, value) in values {
        let Some(value) = value else { continue };
        let present = doc.get("train").and_then(|t| t.get(key)).is_some();
        if !present {
            set_path(doc, &["train", key], value);
        }
    }
}

/// The dotted key a message starts with, as in "`model.hidden`: …".
fn leading_key(message: &str) -> Option<&str> {
    let rest = message.strip_prefix('`')?;
    let key = &rest[..rest.find('`')?];
    key.contains('.').then_some(key)
}

/// Keys of `[model]` and `[score.background]` that their kind does not take, and the old
/// spellings of the background: each reported with its line, and removed so that the rest of
/// the file is still checked (every problem at once).
fn check_kind_tables(doc: &mut DocumentMut, locate: &Locator, problems: &mut Vec<ConfigProblem>) {
    if let Some(score) = doc.get_mut("score").and_then(Item::as_table_like_mut) {
        if let Some(kind) = score.get("background").and_then(Item::as_str) {
            problems.push(ConfigProblem {
                line: locate.line("score.background"),
                message: format!(
                    "`score.background = {kind:?}` is the old spelling: the background is a table now, with its own kind and keys: write `[score.background]` with `kind = {kind:?}` (and, for example, `k = 3` and `context = \"neighbourhood\"` for an `ar` background)"
                ),
            });
            score.remove("background");
        }
        if score.contains_key("mutation_rate") {
            problems.push(ConfigProblem {
                line: locate.line("score.mutation_rate"),
                message: "`score.mutation_rate` has moved: write `mutation_rate` under `[score.background]` with `kind = \"mutated\"`".into(),
            });
            score.remove("mutation_rate");
        }
    }
    for (path, fixed, default_kind) in [
        (&["model"][..], &["kind", "uri"][..], Some(DEFAULT_KIND)),
        (&["score", "background"][..], &["kind"][..], None),
    ] {
        let mut item = Some(doc.as_item_mut());
        for part in path {
            item = item
                .and_then(Item::as_table_like_mut)
                .and_then(|t| t.get_mut(part));
        }
        let Some(table) = item.and_then(Item::as_table_like_mut) else {
            continue;
        };
        let Some(kind) = table
            .get("kind")
            .and_then(Item::as_str)
            .or(default_kind)
            .map(str::to_string)
        else {
            continue;
        };
        // An unknown kind is reported when the table is read.
        let Some(keys) = keys_of(&kind) else {
            continue;
        };
        let prefix = path.join(".");
        let stray: Vec<String> = table
            .iter()
            .map(|(k, _)| k.to_string())
            .filter(|k| !fixed.contains(&k.as_str()) && !keys.contains(k))
            .collect();
        for key in stray {
            let dotted = format!("{prefix}.{key}");
            problems.push(ConfigProblem {
                line: locate.line(&dotted),
                message: stray_key_message(&dotted, &key, &kind, &keys),
            });
            table.remove(&key);
        }
    }
}

/// What to say of `key` in a table of `kind`, which takes `keys`.
fn stray_key_message(dotted: &str, key: &str, kind: &str, keys: &[String]) -> String {
    let takes = if keys.is_empty() {
        "no other key".to_string()
    } else {
        keys.iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let owners: Vec<&str> = FAMILIES
        .iter()
        .filter(|f| f.keys().iter().any(|k| k == key))
        .map(|f| f.name())
        .collect();
    if owners.is_empty() {
        format!(
            "unknown key `{dotted}`: `kind = \"{kind}\"` takes {takes}; see schemas/pipeline-toml.md"
        )
    } else {
        format!(
            "`{dotted}` is not a key of `kind = \"{kind}\"` (it is one of {}'s); `{kind}` takes {takes}",
            owners.join(", ")
        )
    }
}

/// The levels pixels take after `binarize`.
fn levels_after(binarize: Binarize) -> u16 {
    if binarize == Binarize::None { 256 } else { 2 }
}

/// What `family` (called `subject` in the message) needs of `preprocess.binarize`, when pixels
/// of `levels` values do not suit it.
fn pixels_problem(family: &dyn Kind, levels: u16, subject: &str) -> Option<String> {
    match family.pixels() {
        _ if family.pixels().accepts(levels) => None,
        Pixels::Binary => Some(format!(
            "{subject} needs binary pixels: set `preprocess.binarize` to \"threshold\" or \"stochastic\", or use `kind = \"categorical\"`"
        )),
        _ => Some(format!(
            "{subject} models 8-bit intensities: set `preprocess.binarize = \"none\"`"
        )),
    }
}

/// The family's own check of `spec`, as problems of the keys under `table`.
fn spec_problems(table: &str, spec: &ModelSpec) -> Vec<(String, String)> {
    spec.problems()
        .into_iter()
        .map(|p| {
            let key = format!("{table}.{}", p.key);
            let message = format!("`{key}` {}", p.message);
            (key, message)
        })
        .collect()
}

/// Checks value ranges and combinations, table by table; each problem is `(key, message)`.
pub fn check_values(c: &PipelineConfig) -> Vec<(String, String)> {
    let mut p = Problems::default();
    check_source(c, &mut p);
    check_preprocess(c, &mut p);
    check_model(c, &mut p);
    check_train(c, &mut p);
    check_score(c, &mut p);
    check_threshold(c, &mut p);
    if c.sink.max_rows_per_file == 0 {
        p.add(
            "sink.max_rows_per_file",
            "`sink.max_rows_per_file` must be at least 1",
        );
    }
    p.0
}

/// Problems found so far, as `(key, message)`.
#[derive(Default)]
struct Problems(Vec<(String, String)>);

impl Problems {
    fn add(&mut self, key: &str, message: impl Into<String>) {
        self.0.push((key.to_string(), message.into()));
    }
}

fn check_source(c: &PipelineConfig, p: &mut Problems) {
    let s = &c.source;
    if s.uri.trim().is_empty() {
        p.add(
            "source.uri",
            "`source.uri` is required: the Parquet file, directory or glob to read",
        );
    }
    if c.sink.uri.trim().is_empty() {
        p.add(
            "sink.uri",
            "`sink.uri` is required: the directory to write the tables under",
        );
    }
    for (key, value) in [
        ("source.image_column", &s.image_column),
        ("source.id_column", &s.id_column),
    ] {
        if value.is_empty() {
            p.add(key, format!("`{key}` must name a column"));
        }
    }
    if let Err(e) = check_run_id(&c.pipeline.run_id) {
        p.add("pipeline.run_id", e.to_string());
    }
    if !(0.0..=1.0).contains(&s.max_reject_fraction) {
        p.add(
            "source.max_reject_fraction",
            format!(
                "`source.max_reject_fraction` must be between 0 and 1, got {}",
                s.max_reject_fraction
            ),
        );
    }
    let shape = &s.shape;
    if !shape.is_empty()
        && (!(2..=3).contains(&shape.len())
            || shape[..2].contains(&0)
            || (shape.len() == 3 && !matches!(shape[2], 1 | 3)))
    {
        p.add(
            "source.shape",
            format!(
                "`source.shape` must be [height, width] or [height, width, channels] with channels 1 or 3, got {shape:?}"
            ),
        );
    }
    if s.batch_size == 0 {
        p.add(
            "source.batch_size",
            "`source.batch_size` must be at least 1",
        );
    }
    if !(s.float_max.is_finite() && s.float_max > 0.0) {
        p.add(
            "source.float_max",
            format!(
                "`source.float_max` must be a positive number, got {}",
                s.float_max
            ),
        );
    }
    let reserved = crate::io::tables::RESERVED_COLUMNS;
    for name in &s.passthrough {
        if reserved.contains(&name.as_str()) {
            p.add(
                "source.passthrough",
                format!(
                    "passthrough column `{name}` clashes with a column the score tables already have; rename it in the source"
                ),
            );
        }
        if name == &s.image_column {
            p.add(
                "source.passthrough",
                format!("`{name}` is the image column and cannot be passed through"),
            );
        }
    }
}

fn check_preprocess(c: &PipelineConfig, p: &mut Problems) {
    let draws = c.preprocess.draws;
    if !(1..=MAX_DRAWS).contains(&draws) {
        p.add(
            "preprocess.draws",
            format!("`preprocess.draws` must be between 1 and {MAX_DRAWS}, got {draws}"),
        );
    } else if draws > 1 && c.preprocess.binarize != Binarize::Stochastic {
        p.add(
            "preprocess.draws",
            "more than one draw needs `preprocess.binarize = \"stochastic\"`: other preprocessing gives the same pixels every time",
        );
    }
}

fn check_model(c: &PipelineConfig, p: &mut Problems) {
    let spec = &c.model.spec;
    for (key, message) in spec_problems("model", spec) {
        p.add(&key, message);
    }
    let subject = format!("`model.kind = \"{}\"`", spec.name());
    if let Some(message) =
        pixels_problem(spec.kind(), levels_after(c.preprocess.binarize), &subject)
    {
        p.add("model.kind", message);
    }
    if c.sink.embeddings && !spec.kind().embeds() {
        p.add(
            "sink.embeddings",
            format!(
                "`sink.embeddings = true` needs a model with a hidden representation, and {subject} has none: use one of {}, or set `sink.embeddings = false`",
                crate::models::families::with_embedding().join(", ")
            ),
        );
    }
}

fn check_train(c: &PipelineConfig, p: &mut Problems) {
    let t = &c.train;
    if t.rebinarize {
        let family = c.model.spec.kind();
        if c.preprocess.binarize != Binarize::Stochastic {
            p.add(
                "train.rebinarize",
                "`train.rebinarize` draws a fresh stochastic binarization each epoch: it needs `preprocess.binarize = \"stochastic\"`",
            );
        } else if !(family.trained_by_gradient(2) && family.pixels().accepts(2)) {
            let kinds: Vec<String> = FAMILIES
                .iter()
                .filter(|f| f.trained_by_gradient(2) && f.pixels().accepts(2))
                .map(|f| format!("`{}`", f.name()))
                .collect();
            p.add(
                "train.rebinarize",
                format!(
                    "`train.rebinarize` applies to models trained by gradient on binary pixels ({}), not `model.kind = \"{}\"`, which has no epochs on them",
                    kinds.join(", "),
                    family.name()
                ),
            );
        }
    }
    if !(t.weight_decay.is_finite()
        && t.weight_decay >= 0.0
        && t.weight_decay * t.learning_rate < 1.0)
    {
        p.add(
            "train.weight_decay",
            format!(
                "`train.weight_decay` must be ≥ 0 and below 1 / learning_rate, got {}",
                t.weight_decay
            ),
        );
    }
    for (key, value) in [("train.max_minutes", t.max_minutes), ("train.clip", t.clip)] {
        if let Some(v) = value
            && !(v.is_finite() && v > 0.0)
        {
            p.add(key, format!("`{key}` must be a positive number, got {v}"));
        }
    }
    if !(0.0..1.0).contains(&t.validation_fraction) {
        p.add(
            "train.validation_fraction",
            format!(
                "`train.validation_fraction` must be in [0, 1), got {}",
                t.validation_fraction
            ),
        );
    } else if t.validation_fraction == 0.0
        && c.threshold.method == ThresholdMethod::Quantile
        && c.model.uri.is_empty()
    {
        p.add(
            "train.validation_fraction",
            "`threshold.method = \"quantile\"` needs held-out images: set `train.validation_fraction` above 0",
        );
    }
}

fn check_score(c: &PipelineConfig, p: &mut Problems) {
    if c.score.method != ScoreMethod::LikelihoodRatio {
        return;
    }
    match &c.score.background {
        BackgroundConfig::Mutated { mutation_rate } => {
            if !(*mutation_rate > 0.0 && *mutation_rate <= 1.0) {
                p.add(
                    "score.background.mutation_rate",
                    format!(
                        "`score.background.mutation_rate` must be in (0, 1], got {mutation_rate}"
                    ),
                );
            }
        }
        BackgroundConfig::Model(spec) => {
            for (key, message) in spec_problems("score.background", spec) {
                p.add(&key, message);
            }
            let subject = format!("the background `{}`", spec.name());
            let levels = levels_after(c.preprocess.binarize);
            if let Some(message) = pixels_problem(spec.kind(), levels, &subject) {
                p.add("score.background.kind", message);
            }
        }
    }
}

fn check_threshold(c: &PipelineConfig, p: &mut Problems) {
    let t = &c.threshold;
    if !(t.fdr > 0.0 && t.fdr < 1.0) {
        p.add(
            "threshold.fdr",
            format!("`threshold.fdr` must be in (0, 1), got {}", t.fdr),
        );
    }
    match t.method {
        ThresholdMethod::Quantile => {
            if !(t.quantile > 0.0 && t.quantile < 1.0) {
                p.add(
                    "threshold.quantile",
                    format!(
                        "`threshold.quantile` must be strictly between 0 and 1, got {}",
                        t.quantile
                    ),
                );
            }
        }
        ThresholdMethod::Fixed => match t.value {
            Some(v) if v.is_finite() => {}
            _ => p.add(
                "threshold.value",
                "`threshold.method = \"fixed\"` needs `threshold.value`, a finite score in nats",
            ),
        },
        ThresholdMethod::Conformal => {}
    }
}

/// A run id is used in file names, so it is restricted to a safe alphabet.
pub fn check_run_id(run_id: &str) -> std::result::Result<(), BadRunId> {
    let ok = run_id.len() <= 128
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !run_id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(BadRunId {
            run_id: run_id.to_string(),
        })
    }
}

/// A run id outside the alphabet file names allow.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "run id {run_id:?} may hold only letters, digits, `.`, `_` and `-` (at most 128, not starting with `.`)"
)]
pub struct BadRunId {
    /// The id as given.
    pub run_id: String,
}

/// A `--set` that is not `KEY=VALUE` with a dotted key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadOverride {
    /// No `=`.
    #[error("--set {0:?}: expected KEY=VALUE, e.g. threshold.quantile=0.99")]
    NoValue(String),
    /// An empty part in the dotted key.
    #[error("--set {0:?}: the key must be dotted names like threshold.quantile")]
    BadKey(String),
}

/// Applies one `KEY=VALUE` override to the document.
fn apply_override(doc: &mut DocumentMut, text: &str) -> std::result::Result<(), BadOverride> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| BadOverride::NoValue(text.into()))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(BadOverride::BadKey(text.into()));
    }
    let value = Value::from_str(raw.trim()).unwrap_or_else(|_| Value::from(raw));
    set_path(doc, &path, value);
    Ok(())
}

/// Sets `path` to `value`, creating tables on the way.
fn set_path(doc: &mut DocumentMut, path: &[&str], value: Value) {
    let (last, parents) = path.split_last().expect("a non-empty path");
    let mut table = doc.as_table_mut() as &mut dyn toml_edit::TableLike;
    for p in parents {
        let entry = table
            .entry(p)
            .or_insert_with(|| Item::Table(toml_edit::Table::new()));
        if entry.as_table_like().is_none() {
            *entry = Item::Table(toml_edit::Table::new());
        }
        table = entry.as_table_like_mut().expect("just made a table");
    }
    table.insert(last, Item::Value(value));
}

/// Interpolates every string value in `table`, recording problems with their key and line.
fn interpolate_table(
    table: &mut dyn toml_edit::TableLike,
    path: &mut Vec<String>,
    vars: &dyn Lookup,
    locate: &Locator,
    problems: &mut Vec<ConfigProblem>,
) {
    for (key, item) in table.iter_mut() {
        path.push(key.get().to_string());
        match item {
            Item::Value(v) => interpolate_value(v, path, vars, locate, problems),
            Item::Table(t) => interpolate_table(t, path, vars, locate, problems),
            Item::ArrayOfTables(a) => {
                for t in a.iter_mut() {
                    interpolate_table(t, path, vars, locate, problems);
                }
            }
            Item::None => {}
        }
        path.pop();
    }
}

fn interpolate_value(
    value: &mut Value,
    path: &mut Vec<String>,
    vars: &dyn Lookup,
    locate: &Locator,
    problems: &mut Vec<ConfigProblem>,
) {
    match value {
        Value::String(s) => match interpolate(s.value(), vars) {
            Ok(new) => {
                if new != *s.value() {
                    let decor = s.decor().clone();
                    let mut f = toml_edit::Formatted::new(new);
                    *f.decor_mut() = decor;
                    *s = f;
                }
            }
            Err(message) => {
                let key = path.join(".");
                problems.push(ConfigProblem {
                    line: locate.line(&key),
                    message: format!("`{key}`: {message}"),
                });
            }
        },
        Value::Array(a) => {
            for v in a.iter_mut() {
                interpolate_value(v, path, vars, locate, problems);
            }
        }
        Value::InlineTable(t) => interpolate_table(t, path, vars, locate, problems),
        _ => {}
    }
}

/// Finds the line of a dotted key in the original text.
struct Locator {
    doc: Option<toml_edit::Document<String>>,
}

impl Locator {
    fn new(text: &str) -> Self {
        Self {
            doc: toml_edit::Document::parse(text.to_string()).ok(),
        }
    }

    /// The 1-based line where `key` (dotted; array indices allowed) is defined, if it is.
    fn line(&self, key: &str) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut table: &dyn toml_edit::TableLike = doc.as_table();
        let mut best = None;
        for part in key.split('.') {
            let (k, item) = table.get_key_value(part)?;
            best = k.span().or(best);
            match item.as_table_like() {
                Some(t) => table = t,
                None => break,
            }
        }
        best.map(|s| line_of(doc.raw(), s.start))
    }
}

fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::train::Rule;

    const GOOD: &str = r#"
[pipeline]
name = "t"

[source]
uri = "data/${WHERE:-demo}/x.parquet"

[sink]
uri = "out/"
"#;

    fn no_vars(_: &str) -> Option<String> {
        None
    }

    fn problems(text: &str, opts: &LoadOptions) -> Vec<String> {
        match load_str("p.toml", text, opts, &no_vars) {
            Ok(_) => vec![],
            Err(Error::Config(c)) => c
                .problems
                .iter()
                .map(|p| format!("{:?}: {}", p.line, p.message))
                .collect(),
            Err(e) => panic!("unexpected error kind {e}"),
        }
    }

    /// The minimal good file followed by `text`, loaded with default options.
    fn load_after_good(text: &str) -> PipelineConfig {
        load_str(
            "p.toml",
            &format!("{GOOD}{text}"),
            &LoadOptions::default(),
            &no_vars,
        )
        .unwrap()
    }

    /// A family's own `[train]` defaults apply to the keys the file leaves out, and only for
    /// that family.
    #[test]
    fn a_family_brings_its_own_train_defaults() {
        let load = load_after_good;
        let c = load("[model]\nkind = \"pixelrnn\"\n");
        assert_eq!((c.train.batch_size, c.train.max_minutes), (16, Some(60.0)));
        let c = load("[model]\nkind = \"pixelrnn\"\n[train]\nbatch_size = 50\nmax_minutes = 5\n");
        assert_eq!((c.train.batch_size, c.train.max_minutes), (50, Some(5.0)));
        let c = load("[model]\nkind = \"nade\"\n");
        assert_eq!((c.train.batch_size, c.train.max_minutes), (100, None));
    }

    /// `train.optimizer` reaches the training settings; Adam without it; a rule that does not
    /// exist is refused on its line with the rules that do.
    #[test]
    fn the_optimizer_is_read_and_checked() {
        let settings = |text: &str| load_after_good(text).train.settings();
        assert_eq!(settings("").optimizer, Rule::Adam);
        let rms = settings("[train]\noptimizer = \"rmsprop\"\n");
        assert_eq!(rms.optimizer, Rule::Rmsprop);
        let p = problems(
            &format!("{GOOD}[train]\noptimizer = \"sgd\"\n"),
            &LoadOptions::default(),
        );
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].starts_with("Some(") && p[0].contains("adam") && p[0].contains("rmsprop"),
            "{p:?}"
        );
    }

    #[test]
    fn defaults_fill_what_the_file_leaves_out() {
        let c = load_str("p.toml", GOOD, &LoadOptions::default(), &no_vars).unwrap();
        assert_eq!(c.source.uri, "data/demo/x.parquet");
        assert_eq!(c.source.image_column, "image");
        assert_eq!(c.threshold.quantile, 0.99);
        assert_eq!(c.preprocess.binarize, Binarize::Threshold);
    }

    #[test]
    fn every_unknown_key_is_reported_with_its_line() {
        let text = format!("{GOOD}\n[model]\nhiden = 5\n\n[train]\nepoks = 3\n");
        let p = problems(&text, &LoadOptions::default());
        assert_eq!(
            p,
            vec![
                "Some(12): unknown key `model.hiden`: `kind = \"bernoulli\"` takes `alpha`; see schemas/pipeline-toml.md",
                "Some(15): unknown key `train.epoks`: see schemas/pipeline-toml.md for the keys of each table",
            ]
        );
    }

    /// Under every kind, a key that only other kinds take is a problem naming the key, its
    /// line, the kinds it belongs to and the keys this kind takes; and the rest of the file is
    /// still checked.
    #[test]
    fn a_key_of_another_kind_is_refused_with_its_line() {
        for (kind, stray, owners, takes) in [
            (
                "bernoulli",
                "hidden = 5",
                "nade, rnade, pixelrnn",
                "`alpha`",
            ),
            ("categorical", "k = 3", "ar", "`alpha`"),
            (
                "ar",
                "hidden = 5",
                "nade, rnade, pixelrnn",
                "`k`, `context`, `order`, `l2`, `components`",
            ),
            ("fvsbn", "alpha = 1.0", "bernoulli, categorical", "`order`"),
            ("nade", "components = 3", "ar, rnade", "`hidden`, `order`"),
            ("rnade", "l2 = 1.0", "ar", "`hidden`, `components`, `order`"),
        ] {
            let key = stray.split(' ').next().unwrap();
            let pixels = if kind == "rnade" { "none" } else { "threshold" };
            let text = format!(
                "{GOOD}\n[model]\nkind = \"{kind}\"\n{stray}\n[threshold]\nquantile = 2.0\n[preprocess]\nbinarize = \"{pixels}\"\n"
            );
            let p = problems(&text, &LoadOptions::default());
            assert_eq!(p.len(), 2, "{kind}: {p:?}");
            assert_eq!(
                p[0],
                format!(
                    "Some(13): `model.{key}` is not a key of `kind = \"{kind}\"` (it is one of {owners}'s); `{kind}` takes {takes}"
                ),
                "{kind}"
            );
            assert!(
                p[1].contains("`threshold.quantile` must be"),
                "{kind}: {p:?}"
            );
        }
    }

    /// `[score.background]` is a table of its own kind: its keys are checked against that
    /// kind, its values by that kind's check, and the old spellings say what to write.
    #[test]
    fn the_background_table_is_checked_against_its_own_kind() {
        let lr = "[score]\nmethod = \"likelihood_ratio\"\n";
        for (table, wanted) in [
            (
                format!("{lr}[score.background]\nkind = \"ar\"\nkk = 3\n"),
                "Some(15): unknown key `score.background.kk`: `kind = \"ar\"` takes `k`, `context`, `order`, `l2`, `components`; see schemas/pipeline-toml.md",
            ),
            (
                format!("{lr}[score.background]\nkind = \"mutated\"\nk = 3\n"),
                "Some(15): `score.background.k` is not a key of `kind = \"mutated\"` (it is one of ar's); `mutated` takes `mutation_rate`",
            ),
            (
                format!("{lr}[score.background]\nkind = \"ar\"\nk = 99\n"),
                "Some(15): `score.background.k` must be between 0 and 64, got 99",
            ),
            (
                format!("{lr}[score.background]\nkind = \"mutated\"\nmutation_rate = 0.0\n"),
                "Some(15): `score.background.mutation_rate` must be in (0, 1], got 0",
            ),
            (
                format!("{lr}background = \"ar\"\n"),
                "Some(13): `score.background = \"ar\"` is the old spelling: the background is a table now",
            ),
            (
                format!("{lr}mutation_rate = 0.3\n"),
                "Some(13): `score.mutation_rate` has moved: write `mutation_rate` under `[score.background]` with `kind = \"mutated\"`",
            ),
            (
                format!("{lr}[score.background]\nkind = \"pixelcnn\"\n"),
                "`score.background.kind`: unknown model kind \"pixelcnn\"; one of mutated, bernoulli",
            ),
            (
                format!(
                    "[preprocess]\nbinarize = \"none\"\n[model]\nkind = \"categorical\"\n{lr}[score.background]\nkind = \"nade\"\n"
                ),
                "the background `nade` needs binary pixels",
            ),
        ] {
            let p = problems(&format!("{GOOD}\n{table}"), &LoadOptions::default());
            assert_eq!(p.len(), 1, "{table}: {p:?}");
            assert!(
                p[0].starts_with(wanted) || p[0].contains(wanted),
                "{table}: {p:?}"
            );
        }
    }

    /// `sink.embeddings` needs a family with a hidden representation, and says which have one.
    #[test]
    fn embeddings_are_refused_for_a_model_without_a_hidden_layer() {
        let with = |model: &str| {
            format!(
                "{GOOD}embeddings = true
{model}"
            )
        };
        let p = problems(&with(""), &LoadOptions::default());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(
            p[0].contains("`sink.embeddings = true` needs a model with a hidden representation, and `model.kind = \"bernoulli\"` has none: use one of nade, rnade, pixelrnn"),
            "{p:?}"
        );
        for kind in ["nade", "pixelrnn"] {
            let p = problems(
                &with(&format!("[model]\nkind = \"{kind}\"\n")),
                &LoadOptions::default(),
            );
            assert!(p.is_empty(), "{kind}: {p:?}");
        }
    }

    /// Without `[score.background]`, a likelihood ratio is against the background measured
    /// best: an `ar` model over the 3 nearest earlier sub-pixels.
    #[test]
    fn the_default_background_is_a_local_ar3() {
        let text = format!("{GOOD}\n[score]\nmethod = \"likelihood_ratio\"\n");
        let c = load_str("p.toml", &text, &LoadOptions::default(), &no_vars).unwrap();
        let BackgroundConfig::Model(spec) = &c.score.background else {
            panic!("{:?}", c.score.background)
        };
        assert_eq!(
            spec.to_json(),
            serde_json::json!({"kind": "ar", "k": 3, "context": "neighbourhood", "order": "raster", "l2": 1.0, "components": 5})
        );
    }

    /// A bad value under a kind names its key and line; an out-of-range one gets the family's
    /// own wording; an unknown kind lists the kinds.
    #[test]
    fn model_values_are_checked_by_their_family() {
        for (model, wanted) in [
            (
                "kind = \"nade\"\nhidden = \"many\"",
                "Some(13): `model.hidden`: invalid type: string \"many\", expected usize",
            ),
            (
                "kind = \"nade\"\nhidden = 0",
                "Some(13): `model.hidden` must be between 1 and 65536, got 0",
            ),
            (
                "kind = \"bernoulli\"\nalpha = -1.0",
                "Some(13): `model.alpha` must be a positive number, got -1",
            ),
            (
                "kind = \"pixelcnn\"",
                "Some(12): `model.kind`: unknown model kind \"pixelcnn\"; one of bernoulli, categorical, ar, fvsbn, nade, rnade, pixelrnn",
            ),
        ] {
            let p = problems(
                &format!("{GOOD}\n[model]\n{model}\n"),
                &LoadOptions::default(),
            );
            assert_eq!(p.len(), 1, "{model}: {p:?}");
            assert!(p[0].starts_with(wanted), "{model}: {p:?}");
        }
    }

    #[test]
    fn value_problems_are_all_reported() {
        let text = format!("{GOOD}\n[threshold]\nquantile = 1.5\n\n[model]\nalpha = -1.0\n");
        let p = problems(&text, &LoadOptions::default());
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].starts_with("Some(15): `model.alpha` must be a positive number"));
        assert!(p[1].starts_with("Some(12): `threshold.quantile` must be strictly between"));
    }

    /// `preprocess.draws` and `train.rebinarize`: each is checked against the binarization
    /// and model kind it needs.
    #[test]
    fn sampling_keys_need_stochastic_binarization() {
        let draws = |binarize: &str, draws: u32| {
            format!("[preprocess]\nbinarize = \"{binarize}\"\ndraws = {draws}\n")
        };
        let rebinarize = |binarize: &str, kind: &str| {
            format!(
                "[preprocess]\nbinarize = \"{binarize}\"\n[model]\nkind = \"{kind}\"\n[train]\nrebinarize = true\n"
            )
        };
        for (table, wanted) in [
            (
                draws("stochastic", 0),
                Some("`preprocess.draws` must be between 1 and 256, got 0"),
            ),
            (
                draws("threshold", 4),
                Some("more than one draw needs `preprocess.binarize = \"stochastic\"`"),
            ),
            (draws("stochastic", 4), None),
            (
                rebinarize("threshold", "nade"),
                Some("each epoch: it needs `preprocess.binarize = \"stochastic\"`"),
            ),
            (
                rebinarize("stochastic", "bernoulli"),
                Some("not `model.kind = \"bernoulli\"`, which has no epochs"),
            ),
            (rebinarize("stochastic", "nade"), None),
            (rebinarize("stochastic", "fvsbn"), None),
        ] {
            let p = problems(&format!("{GOOD}\n{table}"), &LoadOptions::default());
            match wanted {
                Some(message) => {
                    assert_eq!(p.len(), 1, "{table}: {p:?}");
                    assert!(p[0].contains(message), "{table}: {p:?}");
                }
                None => assert_eq!(p, Vec::<String>::new(), "{table}"),
            }
        }
    }

    #[test]
    fn overrides_take_precedence_and_are_typed() {
        let opts = LoadOptions {
            overrides: vec![
                "threshold.quantile=0.9".into(),
                "model.kind=categorical".into(),
                "sink.uri=elsewhere/".into(),
            ],
            run_id: Some("r1".into()),
        };
        let c = load_str("p.toml", GOOD, &opts, &no_vars).unwrap();
        assert_eq!(c.threshold.quantile, 0.9);
        assert_eq!(c.model.spec.name(), "categorical");
        assert_eq!(c.sink.uri, "elsewhere/");
        assert_eq!(c.pipeline.run_id, "r1");
    }

    #[test]
    fn a_wrong_type_names_the_line() {
        let text = format!("{GOOD}\n[train]\nepochs = \"many\"\n");
        let p = problems(&text, &LoadOptions::default());
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("Some(12): "), "{p:?}");
    }

    #[test]
    fn missing_uris_and_syntax_errors_are_reported() {
        let p = problems("[pipeline]\nname = 'x'\n", &LoadOptions::default());
        assert_eq!(p.len(), 2, "{p:?}");
        let p = problems("[pipeline\nname = 'x'\n", &LoadOptions::default());
        assert!(p[0].starts_with("Some(1): invalid TOML"), "{p:?}");
    }

    #[test]
    fn run_ids_cannot_escape_a_directory() {
        assert!(check_run_id("2026-11-28.nightly_1").is_ok());
        assert!(check_run_id("../etc").is_err());
        assert!(check_run_id("a/b").is_err());
        assert!(check_run_id("").is_ok(), "empty means: generate one");
    }
}
