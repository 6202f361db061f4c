//! The run's row of the `history/` table, made just before the commit from the staged scores
//! (so a sharded run's row covers every shard): counts, score quantiles, how many p-values fell
//! below 0.01 and 0.05, and the drift test of the run's scores against each model's calibration
//! scores ([`decide::drift`](crate::decide::drift)). Analysts chart runs from it without
//! scanning `scores/`; `pipeline report` draws the last nights from it.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BooleanArray, Float64Array, Int64Array, StringArray,
    TimestampMicrosecondArray,
};
use arrow::datatypes::Float64Type;
use arrow::record_batch::RecordBatch;

use super::manifest::{Manifest, ModelDrift, ScoreSummary};
use super::staged;
use crate::decide::{self, drift};
use crate::error::{Error, Result};
use crate::io::storage::Storage;
use crate::io::tables::{self, Table, WrittenTable};

/// The quantiles recorded, as fractions.
pub const QUANTILES: [f64; 4] = [0.5, 0.9, 0.99, 0.999];

/// Summarizes the staged `scores` parts of `staged` against the calibration scores of each
/// model (by model id; a model missing from `calibration` is not tested for drift).
pub fn summarize(
    sink: &Storage,
    staged: &[(Table, WrittenTable)],
    calibration: &BTreeMap<String, Vec<f64>>,
) -> Result<ScoreSummary> {
    let mut by_model: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    let (mut p_values, mut below_001, mut below_005) = (0u64, 0u64, 0u64);
    let parts = staged
        .iter()
        .filter(|(t, _)| *t == Table::Scores)
        .flat_map(|(_, w)| &w.staged);
    for rel in parts {
        for batch in staged::read(sink, rel, Some(&["model_id", "score", "p_value"]))? {
            let bad = || Error::data(sink.display(rel), "not a scores part");
            let ids = batch
                .column_by_name("model_id")
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(bad)?;
            let scores = batch
                .column_by_name("score")
                .and_then(|c| c.as_primitive_opt::<Float64Type>())
                .ok_or_else(bad)?;
            let p = batch
                .column_by_name("p_value")
                .and_then(|c| c.as_primitive_opt::<Float64Type>())
                .ok_or_else(bad)?;
            for i in 0..batch.num_rows() {
                if !ids.is_null(i) && !scores.is_null(i) && scores.value(i).is_finite() {
                    by_model
                        .entry(ids.value(i).to_string())
                        .or_default()
                        .push(scores.value(i));
                }
                if !p.is_null(i) {
                    p_values += 1;
                    below_001 += u64::from(p.value(i) < 0.01);
                    below_005 += u64::from(p.value(i) < 0.05);
                }
            }
        }
    }
    let mut all: Vec<f64> = by_model.values().flatten().copied().collect();
    all.sort_by(f64::total_cmp);
    let drift_by_model: Vec<ModelDrift> = by_model
        .iter()
        .filter_map(|(model_id, scores)| {
            let cal = calibration.get(model_id)?;
            Some(ModelDrift {
                model_id: model_id.clone(),
                drift: drift::test(cal, scores)?,
            })
        })
        .collect();
    let share = |k: u64| (p_values > 0).then(|| k as f64 / p_values as f64);
    Ok(ScoreSummary {
        score_quantiles: (!all.is_empty()).then(|| QUANTILES.map(|q| decide::quantile(&all, q))),
        p_below_001: share(below_001),
        p_below_005: share(below_005),
        drift: combined(&drift_by_model),
        drift_by_model,
    })
}

/// One test for the run from its models' tests (see [`ScoreSummary::drift`]).
fn combined(tests: &[ModelDrift]) -> Option<drift::Drift> {
    let first = &tests.first()?.drift;
    let mut out = first.clone();
    for t in &tests[1..] {
        out.statistic = out.statistic.max(t.drift.statistic);
        out.p_value = out.p_value.min(t.drift.p_value);
        out.calibration += t.drift.calibration;
        out.scored += t.drift.scored;
    }
    out.p_value = (out.p_value * tests.len() as f64).min(1.0);
    out.drifted = out.p_value < drift::LEVEL;
    Some(out)
}

/// Logs the run's drift verdict: a warning, with what to do, when it drifted.
pub fn log(summary: &ScoreSummary) {
    let Some(d) = &summary.drift else {
        return;
    };
    if d.drifted {
        tracing::warn!(
            statistic = d.statistic,
            p_value = d.p_value,
            level = drift::LEVEL,
            "Drift: tonight's scores do not look like the model's calibration scores. If the \
             images have changed for good (camera, lighting, season), refit the model on recent \
             normal images (`pipeline fit`); until then flags are less trustworthy (README, \"Drift \
             between nights\")."
        );
    } else {
        tracing::info!(
            statistic = d.statistic,
            p_value = d.p_value,
            "No drift from the calibration scores."
        );
    }
}

/// Stages the run's one-row `history/` part from `manifest` (its counts and summary, and its
/// finish time, which is set here) for the commit to publish with the other tables.
pub fn stage(sink: &Storage, manifest: &mut Manifest) -> Result<(Table, WrittenTable)> {
    manifest.finished_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
    let batch = row(manifest)?;
    let rel = format!(
        "_staging/{}/{}/{}",
        manifest.run_id,
        Table::History.dir(),
        tables::part_name(&manifest.run_id, 0, 0)
    );
    sink.put(&rel, staged::encode(&[batch], &rel)?)?;
    Ok((
        Table::History,
        WrittenTable {
            staged: vec![rel],
            rows: 1,
        },
    ))
}

/// The `history/` row of `manifest`, in [`tables::history_schema`].
fn row(m: &Manifest) -> Result<RecordBatch> {
    let time = |text: &str| -> Result<i64> {
        chrono::DateTime::parse_from_rfc3339(text)
            .map(|t| t.timestamp_micros())
            .map_err(|e| Error::internal(e, "reading the run's times"))
    };
    let s = m.scores_summary.clone().unwrap_or_default();
    let q = |k: usize| Float64Array::from(vec![s.score_quantiles.map(|q| q[k])]);
    let f = |v: Option<f64>| Float64Array::from(vec![v]);
    let d = s.drift.as_ref();
    let count = |n: u64| Int64Array::from(vec![i64::try_from(n).unwrap_or(i64::MAX)]);
    let utc = Some(Arc::from("UTC"));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(vec![m.run_id.as_str()])),
        Arc::new(StringArray::from(vec![m.pipeline.as_str()])),
        Arc::new(StringArray::from(vec![m.model.model_id.as_str()])),
        Arc::new(
            TimestampMicrosecondArray::from(vec![time(&m.started_at)?])
                .with_timezone_opt(utc.clone()),
        ),
        Arc::new(
            TimestampMicrosecondArray::from(vec![time(&m.finished_at)?]).with_timezone_opt(utc),
        ),
        Arc::new(count(m.rows.scored)),
        Arc::new(count(m.rows.anomalies)),
        Arc::new(count(m.rows.rejected)),
        Arc::new(q(0)),
        Arc::new(q(1)),
        Arc::new(q(2)),
        Arc::new(q(3)),
        Arc::new(f(s.p_below_001)),
        Arc::new(f(s.p_below_005)),
        Arc::new(f(d.map(|d| d.statistic))),
        Arc::new(f(d.map(|d| d.p_value))),
        Arc::new(BooleanArray::from(vec![d.map(|d| d.drifted)])),
    ];
    RecordBatch::try_new(tables::history_schema(), columns)
        .map_err(|e| Error::internal(e, "building the history row"))
}
