//! The score and decide stages, streaming: every batch of the source is scored by the model,
//! compared with the threshold, and written to the staged `scores`, `anomalies` and `rejects`
//! tables. Memory is bounded by the batch size.

use rayon::prelude::*;

use super::Context;
use super::progress::Progress;
use super::read::{ReadCounts, for_each_batch};
use super::scorer::{Scorer, Scores};
use crate::config::{PipelineConfig, ThresholdMethod};
use crate::data::preprocess::Preprocessor;
use crate::decide;
use crate::error::{Error, Result};
use crate::io::source::Source;
use crate::io::storage::Storage;
use crate::io::tables::{
    self, ScoredRows, Table, TableWriter, WrittenTable, anomalies_schema, passthrough_fields,
    rejects_schema, scores_schema,
};
use crate::models::artifact::{LoadedModel, StoredThreshold};

/// What scoring staged, ready to commit.
#[derive(Debug)]
pub struct Scored {
    /// Rows read and rejected.
    pub counts: ReadCounts,
    /// Images scored.
    pub scored: u64,
    /// Images flagged.
    pub anomalies: u64,
    /// The threshold in force.
    pub threshold: StoredThreshold,
    /// Each table's staged files.
    pub tables: Vec<(Table, WrittenTable)>,
    /// The source's files.
    pub source_files: Vec<String>,
}

/// Scores the source with `model`, staging the tables of run `run_id` under `sink`.
pub fn score(
    ctx: &Context,
    config: &PipelineConfig,
    model: &LoadedModel,
    sink: &Storage,
    run_id: &str,
) -> Result<Scored> {
    let meta = &model.meta;
    let calibration = &meta.calibration_scores;
    if meta.score.method != config.score.method {
        tracing::warn!(
            model = %meta.model_id,
            "The model was fitted for another score.method; scoring uses the model's, the one its threshold is in."
        );
    }
    let scorer = Scorer {
        method: meta.score.method,
        model: model.model.as_ref(),
        background: model.background.as_deref(),
    };
    let stored = decide::threshold(&config.threshold, calibration)?;
    if meta.preprocess != config.preprocess {
        tracing::warn!(
            model = %meta.model_id,
            "The model was fitted with other [preprocess] settings; scoring uses the model's, so that scores mean the same."
        );
    }
    let preprocess = Preprocessor::new(meta.preprocess.clone());
    let source = Source::open(&config.source.uri, &ctx.rt)?;
    // A conformal decision needs every p-value of the run before any row is flagged: a first
    // pass scores the whole source (keeping one f64 per image), the second writes the tables
    // with those scores.
    let precomputed = if stored.method == ThresholdMethod::Conformal {
        let progress = Progress::new(ctx.progress, source.total_rows(), "scoring (p-values)");
        let mut all = Vec::new();
        for_each_batch(
            &source,
            &config.source,
            &preprocess,
            Some(meta.shape),
            &progress,
            |batch, _| {
                if !batch.is_empty() {
                    let s = scorer.scores(batch.pixels.view())?;
                    all.extend(s.nll.into_iter().zip(s.score));
                }
                Ok(())
            },
        )?;
        progress.finish();
        Some(all)
    } else {
        None
    };
    let threshold = match &precomputed {
        Some(all) => {
            let scores: Vec<f64> = all.iter().map(|p| p.1).collect();
            decide::run_threshold(&stored, calibration, &scores)
        }
        None => stored,
    };
    let mut next_precomputed = 0usize;
    tracing::info!(
        files = source.files().len(),
        rows = source.total_rows(),
        model = %meta.model_id,
        threshold = threshold.value,
        "Scoring."
    );

    let passthrough = passthrough_fields(source.files()[0].schema(), &config.source.passthrough);
    let max_rows = config.sink.max_rows_per_file;
    let mut scores = TableWriter::new(
        sink,
        Table::Scores,
        run_id,
        0,
        scores_schema(&passthrough),
        max_rows,
    );
    let mut anomalies = TableWriter::new(
        sink,
        Table::Anomalies,
        run_id,
        0,
        anomalies_schema(&passthrough),
        max_rows,
    );
    let mut rejects = TableWriter::new(sink, Table::Rejects, run_id, 0, rejects_schema(), max_rows);
    let (mut scored, mut flagged) = (0u64, 0u64);
    let kind = meta.kind.name();

    let progress = Progress::new(ctx.progress, source.total_rows(), "scoring");
    let counts = for_each_batch(
        &source,
        &config.source,
        &preprocess,
        Some(meta.shape),
        &progress,
        |batch, batch_rejects| {
            if !batch_rejects.is_empty() {
                rejects.write(&tables::rejects_batch(run_id, &batch_rejects)?)?;
            }
            if batch.is_empty() {
                return Ok(());
            }
            let Scores { nll, score } = match &precomputed {
                Some(all) => {
                    let range = next_precomputed..next_precomputed + batch.len();
                    next_precomputed = range.end;
                    let rows = all.get(range).ok_or_else(|| {
                        Error::data(
                            &*batch.source,
                            "the source changed while it was being scored (more images on the second pass); run again",
                        )
                    })?;
                    Scores {
                        nll: rows.iter().map(|p| p.0).collect(),
                        score: rows.iter().map(|p| p.1).collect(),
                    }
                }
                None => scorer.scores(batch.pixels.view())?,
            };
            let ll: Vec<f64> = nll.iter().map(|s| -s).collect();
            let p_value: Option<Vec<f64>> = (!calibration.is_empty()).then(|| {
                score
                    .iter()
                    .map(|&s| decide::conformal::p_value(calibration, s))
                    .collect()
            });
            let is_anomaly: Vec<bool> = score
                .iter()
                .map(|&s| decide::is_anomaly(s, threshold.value))
                .collect();
            let rows = ScoredRows {
                run_id,
                source: &batch.source,
                model: kind,
                model_id: &meta.model_id,
                ids: &batch.ids,
                passthrough: &batch.passthrough,
                log_likelihood: &ll,
                dims: batch.shape.dims(),
                score: &score,
                threshold: threshold.value,
                is_anomaly: &is_anomaly,
                p_value: p_value.as_deref(),
            };
            let scores_batch = tables::scores_batch(scores.schema(), &rows)?;
            scores.write(&scores_batch)?;
            scored += batch.len() as u64;

            let flagged_rows: Vec<usize> = (0..batch.len()).filter(|&i| is_anomaly[i]).collect();
            if !flagged_rows.is_empty() {
                let maps: Vec<Vec<f32>> = flagged_rows
                    .par_iter()
                    .map(|&i| {
                        let image = batch.pixels.row(i);
                        let mut map = vec![0f32; image.len()];
                        model
                            .model
                            .pixel_log_likelihood(image.as_slice().expect("contiguous"), &mut map);
                        map.iter_mut().for_each(|v| *v = -*v);
                        map
                    })
                    .collect();
                let a = tables::anomalies_batch(
                    anomalies.schema(),
                    &scores_batch,
                    &is_anomaly,
                    &maps,
                    batch.shape,
                )?;
                anomalies.write(&a)?;
                flagged += flagged_rows.len() as u64;
            }
            Ok(())
        },
    )?;
    progress.finish();
    if precomputed
        .as_ref()
        .is_some_and(|all| all.len() != next_precomputed)
    {
        return Err(Error::data(
            &config.source.uri,
            "the source changed while it was being scored (fewer images on the second pass); run again",
        ));
    }
    counts.check(&config.source.uri, config.source.max_reject_fraction)?;
    if scored == 0 {
        return Err(Error::data(
            &config.source.uri,
            "no image could be scored: every row was rejected",
        ));
    }
    Ok(Scored {
        counts,
        scored,
        anomalies: flagged,
        threshold,
        tables: vec![
            (Table::Scores, scores.finish()?),
            (Table::Anomalies, anomalies.finish()?),
            (Table::Rejects, rejects.finish()?),
        ],
        source_files: source.files().iter().map(|f| f.uri.to_string()).collect(),
    })
}
