//! `pipeline evaluate SCORES --label-column COL --normal VALUE`: how well a run's scores rank,
//! and its flags catch, the images whose label says they are anomalies.

use std::collections::BTreeMap;
use std::io::Write;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use serde_json::json;

use crate::cli::EvaluateArgs;
use crate::decide::metrics::{self, Evaluation};
use crate::error::{Error, Result};
use crate::io::source::Source;
use crate::pipeline::Context;

/// Rows read per batch.
const BATCH_ROWS: usize = 65_536;

/// (score, flagged, is anomaly) per image, grouped by the `--by` value ("" without `--by`).
type Groups = BTreeMap<String, Vec<(f64, bool, bool)>>;

/// Reads the scores table and prints the evaluation, overall and per `--by` value.
pub fn evaluate(a: &EvaluateArgs, ctx: &Context) -> Result<()> {
    let (source, wanted) = open_columns(a, ctx)?;
    let runs = read_groups(a, &source, &wanted)?;
    let (run_id, groups) = one_run(a, runs)?;
    let all: Vec<(f64, bool, bool)> = groups.values().flatten().copied().collect();
    let overall = metrics::evaluate(&all);
    let per_group: Vec<(String, Evaluation)> = if a.by.is_some() {
        groups
            .iter()
            .map(|(k, rows)| (k.clone(), metrics::evaluate(rows)))
            .collect()
    } else {
        Vec::new()
    };
    print(a, &run_id, &overall, &per_group)
}

/// Opens the scores table and names the columns to read, checking that it has them.
fn open_columns(a: &EvaluateArgs, ctx: &Context) -> Result<(Source, Vec<String>)> {
    let source = Source::open(&a.scores, &ctx.io)?;
    let schema = source.files()[0].schema().clone();
    let mut wanted = vec![
        "run_id".to_string(),
        "score".to_string(),
        "is_anomaly".to_string(),
        a.label_column.clone(),
    ];
    wanted.extend(a.by.clone());
    for name in &wanted {
        if schema.field_with_name(name).is_err() {
            let have: Vec<&str> = schema.fields().iter().map(|f| f.name().as_str()).collect();
            return Err(Error::Usage(format!(
                "{} has no column `{name}` (it has: {}); pass a label that the run passed through with source.passthrough",
                a.scores,
                have.join(", ")
            )));
        }
    }
    Ok((source, wanted))
}

/// Every labelled row's (score, flagged, is anomaly), by run and by `--by` value.
fn read_groups(
    a: &EvaluateArgs,
    source: &Source,
    wanted: &[String],
) -> Result<BTreeMap<String, Groups>> {
    let mut runs: BTreeMap<String, Groups> = BTreeMap::new();
    let mut unlabelled = 0u64;
    let options = FormatOptions::default();
    for batch in source.stream(wanted, BATCH_ROWS) {
        let batch = batch?.batch;
        let column = |name: &str| batch.column_by_name(name).expect("projected");
        let run_ids = column("run_id").as_string_opt::<i32>().ok_or_else(|| {
            Error::data(
                &a.scores,
                "column `run_id` is not a string: is this a scores table?",
            )
        })?;
        let scores = column("score")
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(|| {
                Error::data(
                    &a.scores,
                    "column `score` is not float64: is this a scores table?",
                )
            })?;
        let flags = column("is_anomaly").as_boolean_opt().ok_or_else(|| {
            Error::data(
                &a.scores,
                "column `is_anomaly` is not boolean: is this a scores table?",
            )
        })?;
        let labels = column(&a.label_column);
        let label_text = ArrayFormatter::try_new(labels.as_ref(), &options)
            .map_err(|e| Error::data_because(&a.scores, "the label column cannot be shown", e))?;
        let by = a.by.as_deref().map(column);
        let by_text = by
            .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
            .transpose()
            .map_err(|e| Error::data_because(&a.scores, "the --by column cannot be shown", e))?;
        for i in 0..batch.num_rows() {
            if a.run_id.as_deref().is_some_and(|r| r != run_ids.value(i)) {
                continue;
            }
            if labels.is_null(i) || scores.is_null(i) {
                unlabelled += 1;
                continue;
            }
            let label = label_text.value(i).to_string();
            let anomaly = !a.normal.contains(&label);
            let group = by_text
                .as_ref()
                .map(|f| f.value(i).to_string())
                .unwrap_or_default();
            runs.entry(run_ids.value(i).to_string())
                .or_default()
                .entry(group)
                .or_default()
                .push((
                    scores.value(i),
                    !flags.is_null(i) && flags.value(i),
                    anomaly,
                ));
        }
    }
    if unlabelled > 0 {
        tracing::warn!(
            rows = unlabelled,
            "Rows without a label or score were left out."
        );
    }
    Ok(runs)
}

/// The one run to evaluate: `--run-id`'s, or the only one the table holds.
fn one_run(a: &EvaluateArgs, runs: BTreeMap<String, Groups>) -> Result<(String, Groups)> {
    Ok(match runs.len() {
        0 => {
            return Err(Error::data(
                &a.scores,
                match &a.run_id {
                    Some(r) => format!("no labelled rows of run `{r}`"),
                    None => "no labelled rows".to_string(),
                },
            ));
        }
        1 => runs.into_iter().next().expect("one run"),
        _ => {
            let ids: Vec<&String> = runs.keys().collect();
            return Err(Error::Usage(format!(
                "{} holds {} runs; choose one with --run-id (runs: {})",
                a.scores,
                ids.len(),
                ids.iter()
                    .take(10)
                    .map(|s| s.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    })
}

/// Prints the evaluation as a table, or as JSON with `--json`.
fn print(
    a: &EvaluateArgs,
    run_id: &str,
    overall: &Evaluation,
    per_group: &[(String, Evaluation)],
) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let written = if a.json {
        let report = json!({
            "scores": a.scores,
            "run_id": run_id,
            "label_column": a.label_column,
            "normal": a.normal,
            "overall": overall,
            "by": a.by,
            "groups": per_group.iter().map(|(k, e)| json!({ "value": k, "evaluation": e })).collect::<Vec<_>>(),
        });
        writeln!(
            out,
            "{}",
            serde_json::to_string_pretty(&report).expect("plain JSON")
        )
    } else {
        let mut text = format!(
            "run {run_id} of {}: {} images, {} labelled anomalous ({} not in {:?})\n",
            a.scores, overall.images, overall.anomalies, a.label_column, a.normal
        );
        text.push_str(&format!(
            "{:<16} {:>8} {:>9} {:>8} {:>7} {:>7} {:>9} {:>7} {:>6} {:>6}\n",
            a.by.as_deref().unwrap_or("group"),
            "images",
            "anomalies",
            "flagged",
            "AUROC",
            "AUPRC",
            "precision",
            "recall",
            "F1",
            "FDR"
        ));
        for (name, e) in std::iter::once(("all".to_string(), overall))
            .chain(per_group.iter().map(|(k, e)| (k.clone(), e)))
        {
            text.push_str(&row(&name, e));
        }
        write!(out, "{text}")
    };
    written.map_err(|e| crate::error::from_io("stdout", e))
}

fn row(name: &str, e: &Evaluation) -> String {
    let opt = |v: Option<f64>| v.map(|v| format!("{v:.4}")).unwrap_or_else(|| "–".into());
    format!(
        "{:<16} {:>8} {:>9} {:>8} {:>7} {:>7} {:>9} {:>7} {:>6} {:>6.3}\n",
        name,
        e.images,
        e.anomalies,
        e.flagged,
        opt(e.auroc),
        opt(e.auprc),
        opt(e.precision),
        opt(e.recall),
        opt(e.f1),
        e.fdr
    )
}
