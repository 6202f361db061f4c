//! The score and decide stages, streaming: every batch of the source is scored by the model of
//! each image's partition (or the one model), compared with that model's threshold, and written
//! to the staged `scores`, `anomalies` and `rejects` tables. Memory is bounded by the batch size
//! (plus one score per image when a conformal decision needs the whole run first).

use std::collections::BTreeMap;

use ndarray::{Array2, Axis, CowArray, Ix2};
use rayon::prelude::*;

use super::Context;
use super::progress::Progress;
use super::read::{ReadCounts, for_each_batch, partition_keys};
use super::scorer::{Scorer, Scores, pixel_nll_map};
use crate::config::{PipelineConfig, ThresholdMethod};
use crate::data::preprocess::Preprocessor;
use crate::decide;
use crate::decide::StoredThreshold;
use crate::error::{Error, Result};
use crate::io::source::{Shard, Source};
use crate::io::storage::Storage;
use crate::io::tables::{
    self, RowScore, ScoredRows, Table, TableWriter, WrittenTable, anomalies_schema,
    passthrough_fields, rejects_schema, scores_schema,
};
use crate::pipeline::artifact::{LoadedModel, ModelSet};

/// What one partition's model did in a run.
#[derive(Debug, Clone, Default)]
pub struct PartitionScored {
    /// Images scored.
    pub scored: u64,
    /// Images flagged.
    pub anomalies: u64,
}

/// What scoring staged, ready to commit.
#[derive(Debug)]
pub struct Scored {
    /// Rows read and rejected.
    pub counts: ReadCounts,
    /// Images scored by a model.
    pub scored: u64,
    /// Images flagged.
    pub anomalies: u64,
    /// Images of partitions without a model (scored by none, never flagged).
    pub unmodelled: u64,
    /// Those images' counts per partition value.
    pub unmodelled_partitions: BTreeMap<String, u64>,
    /// The threshold in force per partition value (`""` without partitions).
    pub thresholds: BTreeMap<String, StoredThreshold>,
    /// Counts per partition value.
    pub partitions: BTreeMap<String, PartitionScored>,
    /// Each table's staged files.
    pub tables: Vec<(Table, WrittenTable)>,
    /// The source's files.
    pub source_files: Vec<String>,
}

/// A partition's model, ready to score.
struct Partition<'a> {
    model: &'a LoadedModel,
    scorer: Scorer<'a>,
    threshold: StoredThreshold,
    /// (nll, score) of every image of the partition, in source order, from the first pass of a
    /// conformal run; and how many of them the second pass has used.
    precomputed: Option<(Vec<(f64, f64)>, usize)>,
}

fn scorer_of(model: &LoadedModel) -> Scorer<'_> {
    Scorer {
        method: model.meta.score.method,
        model: model.model.as_ref(),
        background: model.background.as_deref(),
    }
}

/// Scores the source with `models`, staging the tables of run `run_id` under `sink`.
pub fn score(
    ctx: &Context,
    config: &PipelineConfig,
    models: &ModelSet,
    sink: &Storage,
    run_id: &str,
    shard: Option<Shard>,
) -> Result<Scored> {
    if shard.is_some() && config.threshold.method == ThresholdMethod::Conformal {
        return Err(Error::setting(
            "threshold.method",
            "a conformal decision needs every image of the run at once, so it cannot be sharded: score in one process, or use \"quantile\"",
        ));
    }
    if models.partition_by != config.source.partition_by {
        return Err(Error::setting(
            "source.partition_by",
            format!(
                "the models were fitted per {:?} but the pipeline partitions by {:?}: make them agree",
                models.partition_by, config.source.partition_by
            ),
        ));
    }
    let mut parts: BTreeMap<&str, Partition<'_>> = BTreeMap::new();
    for (value, model) in &models.models {
        let meta = &model.meta;
        if meta.preprocess != models.first().meta.preprocess
            || meta.shape != models.first().meta.shape
        {
            return Err(Error::Internal(
                "partition models disagree on preprocessing or shape".into(),
            ));
        }
        if meta.score.method != config.score.method {
            tracing::warn!(
                model = %meta.model_id,
                "The model was fitted for another score.method; scoring uses the model's, the one its threshold is in."
            );
        }
        parts.insert(
            value.as_str(),
            Partition {
                model,
                scorer: scorer_of(model),
                threshold: decide::threshold(&config.threshold, &meta.calibration_scores)?,
                precomputed: None,
            },
        );
    }
    let first = models.first();
    if first.meta.preprocess != config.preprocess {
        tracing::warn!(
            model = %models.id,
            "The model was fitted with other [preprocess] settings; scoring uses the model's, so that scores mean the same."
        );
    }
    // With several draws the reader keeps the 8-bit intensities and the scorer binarizes them
    // once per draw, averaging as the model's calibration scores did; with one, the reader
    // preprocesses ahead of scoring and `per_draw` is the identity.
    let (reading, per_draw) = Preprocessor::new(first.meta.preprocess.clone()).split_for_draws();
    let shape = first.meta.shape;
    let source = Source::open(&config.source.uri, &ctx.io)?.with_shard(shard);
    let part = shard.map_or(0, |s| s.index);

    // A conformal decision needs every p-value of the run (per partition) before any row is
    // flagged: a first pass scores the whole source, keeping two f64 per image, and the second
    // writes the tables with those scores.
    if config.threshold.method == ThresholdMethod::Conformal {
        let progress = Progress::new(ctx.progress, source.total_rows(), "scoring (p-values)");
        let mut all: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        for_each_batch(
            &source,
            &config.source,
            &reading,
            Some(shape),
            &progress,
            |batch, _| {
                if batch.is_empty() {
                    return Ok(());
                }
                let keys = partition_keys(&batch, &config.source)?;
                for (value, rows) in group_rows(&keys) {
                    if let Some(part) = parts.get(value) {
                        let s = part.scorer.mean_scores(
                            &per_draw,
                            &ids_of(&batch.ids, &rows),
                            rows_of(&batch.pixels, &rows).view(),
                        )?;
                        all.entry(value.to_string())
                            .or_default()
                            .extend(s.nll.into_iter().zip(s.score));
                    }
                }
                Ok(())
            },
        )?;
        progress.finish();
        for (value, part) in parts.iter_mut() {
            let scores = all.remove(*value).unwrap_or_default();
            let just_scores: Vec<f64> = scores.iter().map(|p| p.1).collect();
            part.threshold = decide::run_threshold(
                &part.threshold,
                &part.model.meta.calibration_scores,
                &just_scores,
            );
            part.precomputed = Some((scores, 0));
        }
    }
    tracing::info!(
        files = source.files().len(),
        rows = source.total_rows(),
        models = %models.id,
        partitions = parts.len(),
        "Scoring."
    );

    let passthrough = passthrough_fields(source.files()[0].schema(), &config.source.passthrough);
    let max_rows = config.sink.max_rows_per_file;
    let mut scores = TableWriter::new(
        sink,
        Table::Scores,
        run_id,
        part,
        scores_schema(&passthrough),
        max_rows,
    );
    let mut anomalies = TableWriter::new(
        sink,
        Table::Anomalies,
        run_id,
        part,
        anomalies_schema(&passthrough),
        max_rows,
    );
    let mut rejects = TableWriter::new(
        sink,
        Table::Rejects,
        run_id,
        part,
        rejects_schema(),
        max_rows,
    );
    let mut per_partition: BTreeMap<String, PartitionScored> = BTreeMap::new();
    let mut unmodelled_values: BTreeMap<String, u64> = BTreeMap::new();

    let progress = Progress::new(ctx.progress, source.total_rows(), "scoring");
    let counts = for_each_batch(
        &source,
        &config.source,
        &reading,
        Some(shape),
        &progress,
        |batch, batch_rejects| {
            if !batch_rejects.is_empty() {
                rejects.write(&tables::rejects_batch(run_id, &batch_rejects)?)?;
            }
            if batch.is_empty() {
                return Ok(());
            }
            let keys = partition_keys(&batch, &config.source)?;
            let mut results: Vec<Option<RowScore<'_>>> = vec![None; batch.len()];
            let mut owner: Vec<Option<&str>> = vec![None; batch.len()];
            for (value, rows) in group_rows(&keys) {
                let Some(part) = parts.get_mut(value) else {
                    *unmodelled_values.entry(value.to_string()).or_default() += rows.len() as u64;
                    continue;
                };
                let Scores { nll, score } = match &mut part.precomputed {
                    Some((all, used)) => {
                        let range = *used..*used + rows.len();
                        *used = range.end;
                        let got = all.get(range).ok_or_else(|| {
                            Error::data(
                                &*batch.source,
                                "the source changed while it was being scored (more images on the second pass); run again",
                            )
                        })?;
                        Scores {
                            nll: got.iter().map(|p| p.0).collect(),
                            score: got.iter().map(|p| p.1).collect(),
                        }
                    }
                    None => part.scorer.mean_scores(
                        &per_draw,
                        &ids_of(&batch.ids, &rows),
                        rows_of(&batch.pixels, &rows).view(),
                    )?,
                };
                let meta = &part.model.meta;
                let calibration = &meta.calibration_scores;
                let stats = per_partition.entry(value.to_string()).or_default();
                for (k, &row) in rows.iter().enumerate() {
                    let flagged = decide::is_anomaly(score[k], part.threshold.value);
                    stats.scored += 1;
                    stats.anomalies += u64::from(flagged);
                    owner[row] = Some(value);
                    results[row] = Some(RowScore {
                        model: &meta.kind,
                        model_id: &meta.model_id,
                        log_likelihood: -nll[k],
                        score: score[k],
                        threshold: part.threshold.value,
                        is_anomaly: flagged,
                        p_value: (!calibration.is_empty())
                            .then(|| decide::conformal::p_value(calibration, score[k])),
                    });
                }
            }
            let rows = ScoredRows {
                run_id,
                source: &batch.source,
                ids: &batch.ids,
                passthrough: &batch.passthrough,
                dims: batch.shape.dims(),
                results: &results,
            };
            let scores_batch = tables::scores_batch(scores.schema(), &rows)?;
            scores.write(&scores_batch)?;

            let flags: Vec<bool> = results
                .iter()
                .map(|r| r.is_some_and(|r| r.is_anomaly))
                .collect();
            let flagged_rows: Vec<usize> = (0..batch.len()).filter(|&i| flags[i]).collect();
            if !flagged_rows.is_empty() {
                let maps: Vec<Vec<f32>> = flagged_rows
                    .par_iter()
                    .map(|&i| {
                        let model = parts[owner[i].expect("flagged rows have a model")].model;
                        let image = batch.pixels.row(i);
                        pixel_nll_map(
                            model.model.as_ref(),
                            &per_draw,
                            &batch.ids[i],
                            image.as_slice().expect("contiguous"),
                        )
                    })
                    .collect();
                let a = tables::anomalies_batch(
                    anomalies.schema(),
                    &scores_batch,
                    &flags,
                    &maps,
                    batch.shape,
                )?;
                anomalies.write(&a)?;
            }
            Ok(())
        },
    )?;
    progress.finish();
    if parts.values().any(|p| {
        p.precomputed
            .as_ref()
            .is_some_and(|(all, used)| all.len() != *used)
    }) {
        return Err(Error::data(
            &config.source.uri,
            "the source changed while it was being scored (fewer images on the second pass); run again",
        ));
    }
    let scored: u64 = per_partition.values().map(|p| p.scored).sum();
    let unmodelled: u64 = unmodelled_values.values().sum();
    if shard.is_some() && counts.rows == 0 && source.total_rows() > 0 {
        // More shards than row groups: this worker's share is empty, and it must still stage
        // it, or the run would wait for it forever.
        tracing::info!("This shard owns no row group of the source; it stages an empty share.");
    } else {
        counts.check(&config.source.uri, config.source.max_reject_fraction)?;
        if scored == 0 && unmodelled == 0 {
            return Err(Error::data(
                &config.source.uri,
                "no image could be scored: every row was rejected",
            ));
        }
    }
    for (value, images) in &unmodelled_values {
        tracing::warn!(partition = %value, images, "No model for this partition: its images were scored by none and not flagged.");
    }
    Ok(Scored {
        counts,
        scored,
        anomalies: per_partition.values().map(|p| p.anomalies).sum(),
        unmodelled,
        unmodelled_partitions: unmodelled_values,
        thresholds: parts
            .iter()
            .map(|(k, p)| (k.to_string(), p.threshold.clone()))
            .collect(),
        partitions: per_partition,
        tables: vec![
            (Table::Scores, scores.finish()?),
            (Table::Anomalies, anomalies.finish()?),
            (Table::Rejects, rejects.finish()?),
        ],
        source_files: source.files().iter().map(|f| f.uri.to_string()).collect(),
    })
}

/// The rows `rows` (ascending) of `pixels`: borrowed when they are all of them (an unpartitioned
/// source, the common case), copied otherwise.
fn rows_of<'a>(pixels: &'a Array2<u8>, rows: &[usize]) -> CowArray<'a, u8, Ix2> {
    if rows.len() == pixels.nrows() {
        CowArray::from(pixels.view())
    } else {
        CowArray::from(pixels.select(Axis(0), rows))
    }
}

/// The ids of the rows `rows` of a batch whose ids are `ids`.
fn ids_of<'a>(ids: &'a [String], rows: &[usize]) -> Vec<&'a str> {
    rows.iter().map(|&r| ids[r].as_str()).collect()
}

/// Row indices per partition value, in first-seen order within each value.
fn group_rows(keys: &[String]) -> BTreeMap<&str, Vec<usize>> {
    let mut groups: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, k) in keys.iter().enumerate() {
        groups.entry(k.as_str()).or_default().push(i);
    }
    groups
}
