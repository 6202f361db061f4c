//! From pipeline TOML text to a validated [`PipelineConfig`], reporting every problem at once.
//!
//! The phases: parse (a syntax error stops here), apply `--set` overrides, interpolate `${VAR}`
//! in string values, deserialize while collecting unknown keys, then check values. Each problem
//! carries the line of its key, found in the parsed document's spans.

use std::str::FromStr;

use toml_edit::{DocumentMut, Item, Value};

use super::interpolate::{Environment, Lookup, interpolate};
use super::{Binarize, ModelKind, PipelineConfig, ScoreMethod, ThresholdMethod};
use crate::error::{ConfigProblem, ConfigProblems, Error, Result};

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
        if let Err(message) = apply_override(&mut doc, o) {
            problems.push(ConfigProblem {
                line: None,
                message,
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
            problems.push(ConfigProblem {
                line: e.span().map(|s| line_of(&resolved, s.start)),
                message: e.message().trim().to_string(),
            });
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
            line: locate.line(key),
            message,
        });
    }
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(fail(problems))
    }
}

/// Checks value ranges and combinations; each problem is `(key, message)`.
pub fn check_values(c: &PipelineConfig) -> Vec<(&'static str, String)> {
    let mut p = Vec::new();
    if c.source.uri.trim().is_empty() {
        p.push((
            "source.uri",
            "`source.uri` is required: the Parquet file, directory or glob to read".to_string(),
        ));
    }
    if c.sink.uri.trim().is_empty() {
        p.push((
            "sink.uri",
            "`sink.uri` is required: the directory to write the tables under".to_string(),
        ));
    }
    for (key, value) in [
        ("source.image_column", &c.source.image_column),
        ("source.id_column", &c.source.id_column),
    ] {
        if value.is_empty() {
            p.push((key, format!("`{key}` must name a column")));
        }
    }
    if let Err(m) = check_run_id(&c.pipeline.run_id) {
        p.push(("pipeline.run_id", m));
    }
    if !(0.0..=1.0).contains(&c.source.max_reject_fraction) {
        p.push((
            "source.max_reject_fraction",
            format!(
                "`source.max_reject_fraction` must be between 0 and 1, got {}",
                c.source.max_reject_fraction
            ),
        ));
    }
    let shape = &c.source.shape;
    if !shape.is_empty()
        && (!(2..=3).contains(&shape.len())
            || shape[..2].contains(&0)
            || (shape.len() == 3 && !matches!(shape[2], 1 | 3)))
    {
        p.push((
            "source.shape",
            format!(
                "`source.shape` must be [height, width] or [height, width, channels] with channels 1 or 3, got {shape:?}"
            ),
        ));
    }
    if c.source.batch_size == 0 {
        p.push((
            "source.batch_size",
            "`source.batch_size` must be at least 1".to_string(),
        ));
    }
    if !(c.source.float_max.is_finite() && c.source.float_max > 0.0) {
        p.push((
            "source.float_max",
            format!(
                "`source.float_max` must be a positive number, got {}",
                c.source.float_max
            ),
        ));
    }
    let reserved = crate::io::tables::RESERVED_COLUMNS;
    for name in &c.source.passthrough {
        if reserved.contains(&name.as_str()) {
            p.push((
                "source.passthrough",
                format!(
                    "passthrough column `{name}` clashes with a column the score tables already have; rename it in the source"
                ),
            ));
        }
        if name == &c.source.image_column {
            p.push((
                "source.passthrough",
                format!("`{name}` is the image column and cannot be passed through"),
            ));
        }
    }
    if c.model.kind.needs_binary_pixels() && c.preprocess.binarize == Binarize::None {
        p.push((
            "model.kind",
            format!(
                "`model.kind = \"{}\"` needs binary pixels: set `preprocess.binarize` to \"threshold\" or \"stochastic\", or use `kind = \"categorical\"`",
                c.model.kind.name()
            ),
        ));
    }
    if !(1..=MAX_DRAWS).contains(&c.preprocess.draws) {
        p.push((
            "preprocess.draws",
            format!(
                "`preprocess.draws` must be between 1 and {MAX_DRAWS}, got {}",
                c.preprocess.draws
            ),
        ));
    } else if c.preprocess.draws > 1 && c.preprocess.binarize != Binarize::Stochastic {
        p.push((
            "preprocess.draws",
            "more than one draw needs `preprocess.binarize = \"stochastic\"`: other preprocessing gives the same pixels every time".into(),
        ));
    }
    if c.train.rebinarize {
        if c.preprocess.binarize != Binarize::Stochastic {
            p.push((
                "train.rebinarize",
                "`train.rebinarize` draws a fresh stochastic binarization each epoch: it needs `preprocess.binarize = \"stochastic\"`".into(),
            ));
        } else if !(c.model.kind.trained_by_gradient() && c.model.kind.needs_binary_pixels()) {
            p.push((
                "train.rebinarize",
                format!(
                    "`train.rebinarize` applies to models trained by gradient on binary pixels (`nade`, `fvsbn`), not `model.kind = \"{}\"`, which has no epochs",
                    c.model.kind.name()
                ),
            ));
        }
    }
    if c.model.kind.needs_intensities() && c.preprocess.binarize != Binarize::None {
        p.push((
            "model.kind",
            format!(
                "`model.kind = \"{}\"` models 8-bit intensities: set `preprocess.binarize = \"none\"`",
                c.model.kind.name()
            ),
        ));
    }
    if !(1..=crate::models::ar_mixture::MAX_COMPONENTS).contains(&c.model.components) {
        p.push((
            "model.components",
            format!(
                "`model.components` must be between 1 and {}, got {}",
                crate::models::ar_mixture::MAX_COMPONENTS,
                c.model.components
            ),
        ));
    }
    if c.model.k > crate::models::logistic::MAX_FEATURES {
        p.push((
            "model.k",
            format!(
                "`model.k` must be at most {}, got {}",
                crate::models::logistic::MAX_FEATURES,
                c.model.k
            ),
        ));
    }
    if !(1..=crate::models::nade::MAX_HIDDEN).contains(&c.model.hidden) {
        p.push((
            "model.hidden",
            format!(
                "`model.hidden` must be between 1 and {}, got {}",
                crate::models::nade::MAX_HIDDEN,
                c.model.hidden
            ),
        ));
    }
    if !(c.train.weight_decay.is_finite()
        && c.train.weight_decay >= 0.0
        && c.train.weight_decay * c.train.learning_rate < 1.0)
    {
        p.push((
            "train.weight_decay",
            format!(
                "`train.weight_decay` must be ≥ 0 and below 1 / learning_rate, got {}",
                c.train.weight_decay
            ),
        ));
    }
    if !(c.threshold.fdr > 0.0 && c.threshold.fdr < 1.0) {
        p.push((
            "threshold.fdr",
            format!("`threshold.fdr` must be in (0, 1), got {}", c.threshold.fdr),
        ));
    }
    if !(c.model.l2.is_finite() && c.model.l2 > 0.0) {
        p.push((
            "model.l2",
            format!("`model.l2` must be a positive number, got {}", c.model.l2),
        ));
    }
    if !(c.model.alpha.is_finite() && c.model.alpha > 0.0) {
        p.push((
            "model.alpha",
            format!(
                "`model.alpha` must be a positive number, got {}",
                c.model.alpha
            ),
        ));
    }
    if !(0.0..1.0).contains(&c.train.validation_fraction) {
        p.push((
            "train.validation_fraction",
            format!(
                "`train.validation_fraction` must be in [0, 1), got {}",
                c.train.validation_fraction
            ),
        ));
    } else if c.train.validation_fraction == 0.0
        && c.threshold.method == ThresholdMethod::Quantile
        && c.model.uri.is_empty()
    {
        p.push((
            "train.validation_fraction",
            "`threshold.method = \"quantile\"` needs held-out images: set `train.validation_fraction` above 0".to_string(),
        ));
    }
    if c.score.method == ScoreMethod::LikelihoodRatio {
        let background = c.score.background.as_str();
        if background != "mutated" {
            match ModelKind::from_name(background) {
                None => p.push((
                    "score.background",
                    format!(
                        "`score.background` must be \"mutated\" or a model kind ({}), got {background:?}",
                        ModelKind::ALL.map(ModelKind::name).join(", ")
                    ),
                )),
                Some(kind)
                    if kind.needs_binary_pixels() && c.preprocess.binarize == Binarize::None =>
                {
                    p.push((
                        "score.background",
                        format!("the background `{background}` needs binary pixels: set `preprocess.binarize`, or use \"categorical\" or \"mutated\""),
                    ))
                }
                Some(_) => {}
            }
        }
        if !(c.score.mutation_rate > 0.0 && c.score.mutation_rate <= 1.0) {
            p.push((
                "score.mutation_rate",
                format!(
                    "`score.mutation_rate` must be in (0, 1], got {}",
                    c.score.mutation_rate
                ),
            ));
        }
    }
    match c.threshold.method {
        ThresholdMethod::Quantile => {
            if !(c.threshold.quantile > 0.0 && c.threshold.quantile < 1.0) {
                p.push((
                    "threshold.quantile",
                    format!(
                        "`threshold.quantile` must be strictly between 0 and 1, got {}",
                        c.threshold.quantile
                    ),
                ));
            }
        }
        ThresholdMethod::Fixed => match c.threshold.value {
            Some(v) if v.is_finite() => {}
            _ => p.push((
                "threshold.value",
                "`threshold.method = \"fixed\"` needs `threshold.value`, a finite score in nats"
                    .to_string(),
            )),
        },
        ThresholdMethod::Conformal => {}
    }
    if c.sink.max_rows_per_file == 0 {
        p.push((
            "sink.max_rows_per_file",
            "`sink.max_rows_per_file` must be at least 1".to_string(),
        ));
    }
    p
}

/// A run id is used in file names, so it is restricted to a safe alphabet.
pub fn check_run_id(run_id: &str) -> std::result::Result<(), String> {
    let ok = run_id.len() <= 128
        && run_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !run_id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "run id {run_id:?} may hold only letters, digits, `.`, `_` and `-` (at most 128, not starting with `.`)"
        ))
    }
}

/// Applies one `KEY=VALUE` override to the document.
fn apply_override(doc: &mut DocumentMut, text: &str) -> std::result::Result<(), String> {
    let (key, raw) = text
        .split_once('=')
        .ok_or_else(|| format!("--set {text:?}: expected KEY=VALUE, e.g. model.alpha=0.5"))?;
    let path: Vec<&str> = key.trim().split('.').collect();
    if path.iter().any(|p| p.is_empty()) {
        return Err(format!(
            "--set {text:?}: the key must be dotted names like model.alpha"
        ));
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
                "Some(12): unknown key `model.hiden`: see schemas/pipeline-toml.md for the keys of each table",
                "Some(15): unknown key `train.epoks`: see schemas/pipeline-toml.md for the keys of each table",
            ]
        );
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
        assert_eq!(c.model.kind, crate::config::ModelKind::Categorical);
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
