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
use super::scorer::{Scorer, Scores, no_embedding, pixel_nll_map};
use crate::config::{PipelineConfig, SinkFormat, SourceConfig, ThresholdMethod};
use crate::data::preprocess::Preprocessor;
use crate::data::{ImageBatch, ImageShape, Reject};
use crate::decide;
use crate::decide::StoredThreshold;
use crate::error::{Error, Result};
use crate::io::source::{Shard, Source};
use crate::io::storage::Storage;
use crate::io::tables::{
    self, RowScore, ScoredRows, Table, TableWriter, VectorType, WrittenTable, anomalies_schema,
    embeddings_schema, passthrough_fields, rejects_schema, scores_schema,
};
use crate::pipeline::artifact::{LoadedModel, ModelSet};
use crate::pipeline::reference;

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
    check_settings(config, models, shard)?;
    let mut parts = partitions(config, models)?;
    let embedding = config
        .sink
        .embeddings
        .then(|| embedding_width(&parts))
        .transpose()?;
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
    let pass = Pass {
        ctx,
        config,
        source: Source::open(&config.source.uri, &ctx.io)?.with_shard(shard),
        reading,
        per_draw,
        shape: first.meta.shape,
    };
    if config.threshold.method == ThresholdMethod::Conformal {
        pass.decide_conformal(&mut parts)?;
    }
    tracing::info!(
        files = pass.source.files().len(),
        rows = pass.source.total_rows(),
        models = %models.id,
        partitions = parts.len(),
        "Scoring."
    );
    let mut run = RunTables::new(
        &pass,
        sink,
        run_id,
        shard.map_or(0, |s| s.index),
        parts,
        embedding,
    );
    let progress = Progress::new(ctx.progress, pass.source.total_rows(), "scoring");
    let counts = pass.for_each_batch(&progress, |batch, rejects| {
        run.write_batch(&pass.per_draw, batch, rejects)
    })?;
    progress.finish();
    run.finish(&pass, shard, counts)
}

/// What `score` refuses before reading anything: a sharded conformal run, and models fitted
/// per other partitions.
fn check_settings(config: &PipelineConfig, models: &ModelSet, shard: Option<Shard>) -> Result<()> {
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
    Ok(())
}

/// Each partition's model with its threshold for this run's `[threshold]`.
fn partitions<'a>(
    config: &PipelineConfig,
    models: &'a ModelSet,
) -> Result<BTreeMap<&'a str, Partition<'a>>> {
    let mut parts = BTreeMap::new();
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
    Ok(parts)
}

/// One pass over the source, as scoring reads it.
struct Pass<'a> {
    ctx: &'a Context,
    config: &'a PipelineConfig,
    source: Source,
    /// What the reader applies to each batch.
    reading: Preprocessor,
    /// The binarizations the scorer averages over (the identity with one draw).
    per_draw: Preprocessor,
    /// The models' image shape.
    shape: ImageShape,
}

impl Pass<'_> {
    fn for_each_batch(
        &self,
        progress: &Progress,
        each: impl FnMut(ImageBatch, Vec<Reject>) -> Result<()>,
    ) -> Result<ReadCounts> {
        for_each_batch(
            &self.source,
            &self.config.source,
            &self.reading,
            Some(self.shape),
            progress,
            each,
        )
    }

    /// A conformal decision needs every p-value of the run (per partition) before any row is
    /// flagged: this first pass scores the whole source, keeping two f64 per image, sets each
    /// partition's run threshold, and leaves the scores for the pass that writes the tables.
    fn decide_conformal(&self, parts: &mut BTreeMap<&str, Partition<'_>>) -> Result<()> {
        let progress = Progress::new(
            self.ctx.progress,
            self.source.total_rows(),
            "scoring (p-values)",
        );
        let mut all: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
        self.for_each_batch(&progress, |batch, _| {
            if batch.is_empty() {
                return Ok(());
            }
            let keys = partition_keys(&batch, &self.config.source)?;
            for (value, rows) in group_rows(&keys) {
                if let Some(part) = parts.get(value) {
                    let s = part.scorer.mean_scores(
                        &self.per_draw,
                        &ids_of(&batch.ids, &rows),
                        rows_of(&batch.pixels, &rows).view(),
                    )?;
                    all.entry(value.to_string())
                        .or_default()
                        .extend(s.nll.into_iter().zip(s.score));
                }
            }
            Ok(())
        })?;
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
        Ok(())
    }
}

/// The staged tables of a run being scored, and its counts so far.
struct RunTables<'a> {
    run_id: &'a str,
    source_config: &'a SourceConfig,
    parts: BTreeMap<&'a str, Partition<'a>>,
    scores: TableWriter,
    anomalies: TableWriter,
    rejects: TableWriter,
    /// With `sink.embeddings`.
    embeddings: Option<TableWriter>,
    per_partition: BTreeMap<String, PartitionScored>,
    unmodelled: BTreeMap<String, u64>,
}

impl<'a> RunTables<'a> {
    fn new(
        pass: &Pass<'a>,
        sink: &Storage,
        run_id: &'a str,
        part: u32,
        parts: BTreeMap<&'a str, Partition<'a>>,
        embedding: Option<usize>,
    ) -> Self {
        let config = pass.config;
        let passthrough =
            passthrough_fields(pass.source.files()[0].schema(), &config.source.passthrough);
        let max_rows = config.sink.max_rows_per_file;
        let writer = |table, schema| TableWriter::new(sink, table, run_id, part, schema, max_rows);
        let vectors = match config.sink.format {
            SinkFormat::Parquet => VectorType::FixedSize,
            SinkFormat::Delta => VectorType::List,
        };
        let embeddings = embedding.map(|width| {
            writer(
                Table::Embeddings,
                embeddings_schema(&passthrough, width, vectors),
            )
        });
        Self {
            run_id,
            source_config: &config.source,
            parts,
            scores: writer(Table::Scores, scores_schema(&passthrough)),
            anomalies: writer(Table::Anomalies, anomalies_schema(&passthrough)),
            rejects: writer(Table::Rejects, rejects_schema()),
            embeddings,
            per_partition: BTreeMap::new(),
            unmodelled: BTreeMap::new(),
        }
    }

    /// Scores one batch with each image's partition model and writes its rows: every image to
    /// `scores` (and its embedding to `embeddings`, when written), the flagged ones with their per-pixel maps to `anomalies`, the unusable rows
    /// to `rejects`.
    fn write_batch(
        &mut self,
        per_draw: &Preprocessor,
        batch: ImageBatch,
        batch_rejects: Vec<Reject>,
    ) -> Result<()> {
        if !batch_rejects.is_empty() {
            self.rejects
                .write(&tables::rejects_batch(self.run_id, &batch_rejects)?)?;
        }
        if batch.is_empty() {
            return Ok(());
        }
        let keys = partition_keys(&batch, self.source_config)?;
        let mut results: Vec<Option<RowScore<'_>>> = vec![None; batch.len()];
        let mut owner: Vec<Option<&str>> = vec![None; batch.len()];
        let embed = self.embeddings.is_some();
        let mut embedded: Vec<(Vec<usize>, Vec<f32>)> = Vec::new();
        for (value, rows) in group_rows(&keys) {
            let Some(part) = self.parts.get_mut(value) else {
                *self.unmodelled.entry(value.to_string()).or_default() += rows.len() as u64;
                continue;
            };
            let Scores {
                nll,
                score,
                embeddings,
            } = part.scores(per_draw, &batch, &rows, embed)?;
            if let Some(e) = embeddings {
                embedded.push((rows.clone(), e));
            }
            let meta = &part.model.meta;
            let calibration = &meta.calibration_scores;
            let stats = self.per_partition.entry(value.to_string()).or_default();
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
            run_id: self.run_id,
            source: &batch.source,
            ids: &batch.ids,
            passthrough: &batch.passthrough,
            dims: batch.shape.dims(),
            results: &results,
        };
        let scores_batch = tables::scores_batch(self.scores.schema(), &rows)?;
        self.scores.write(&scores_batch)?;
        let mut per_row: Vec<Option<&[f32]>> = vec![None; batch.len()];
        for (rows, e) in &embedded {
            let width = e.len() / rows.len().max(1);
            for (k, &row) in rows.iter().enumerate() {
                per_row[row] = Some(&e[k * width..(k + 1) * width]);
            }
        }
        if let Some(writer) = self.embeddings.as_mut() {
            writer.write(&tables::embeddings_batch(
                writer.schema(),
                &scores_batch,
                &per_row,
            )?)?;
        }

        let flags: Vec<bool> = results
            .iter()
            .map(|r| r.is_some_and(|r| r.is_anomaly))
            .collect();
        let flagged_rows: Vec<usize> = (0..batch.len()).filter(|&i| flags[i]).collect();
        if flagged_rows.is_empty() {
            return Ok(());
        }
        let parts = &self.parts;
        let maps: Vec<Vec<f32>> = flagged_rows
            .par_iter()
            .map(|&i| {
                let model = parts[owner[i].expect("flagged rows have a model")].model;
                let image = batch.pixels.row(i);
                pixel_nll_map(
                    model.model.as_ref(),
                    per_draw,
                    &batch.ids[i],
                    image.as_slice().expect("contiguous"),
                )
            })
            .collect();
        let embeddings =
            flagged_embeddings(parts, per_draw, &batch, &flagged_rows, &owner, &per_row)?;
        let nearest: Vec<Option<Vec<String>>> = flagged_rows
            .iter()
            .zip(&embeddings)
            .map(|(&row, e)| {
                let sample = parts[owner[row].expect("flagged rows have a model")]
                    .model
                    .reference
                    .as_ref()?;
                // A training image flagged in its own run is not its own nearest normal image.
                let near = sample.nearest(e.as_deref()?, reference::NEAREST + 1);
                let own = &batch.ids[row];
                Some(
                    near.into_iter()
                        .map(|i| sample.ids[i].clone())
                        .filter(|id| id != own)
                        .take(reference::NEAREST)
                        .collect(),
                )
            })
            .collect();
        let a = tables::anomalies_batch(
            self.anomalies.schema(),
            &scores_batch,
            &flags,
            &maps,
            &nearest,
            &embeddings,
            batch.shape,
        )?;
        self.anomalies.write(&a)
    }

    /// Checks what the pass read and returns what was staged.
    fn finish(self, pass: &Pass<'_>, shard: Option<Shard>, counts: ReadCounts) -> Result<Scored> {
        let config = pass.config;
        if self.parts.values().any(|p| {
            p.precomputed
                .as_ref()
                .is_some_and(|(all, used)| all.len() != *used)
        }) {
            return Err(Error::data(
                &config.source.uri,
                "the source changed while it was being scored (fewer images on the second pass); run again",
            ));
        }
        let scored: u64 = self.per_partition.values().map(|p| p.scored).sum();
        let unmodelled: u64 = self.unmodelled.values().sum();
        if shard.is_some() && counts.rows == 0 && pass.source.total_rows() > 0 {
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
        for (value, images) in &self.unmodelled {
            tracing::warn!(partition = %value, images, "No model for this partition: its images were scored by none and not flagged.");
        }
        Ok(Scored {
            counts,
            scored,
            anomalies: self.per_partition.values().map(|p| p.anomalies).sum(),
            unmodelled,
            unmodelled_partitions: self.unmodelled,
            thresholds: self
                .parts
                .iter()
                .map(|(k, p)| (k.to_string(), p.threshold.clone()))
                .collect(),
            partitions: self.per_partition,
            tables: {
                let mut tables = vec![
                    (Table::Scores, self.scores.finish()?),
                    (Table::Anomalies, self.anomalies.finish()?),
                    (Table::Rejects, self.rejects.finish()?),
                ];
                if let Some(writer) = self.embeddings {
                    tables.push((Table::Embeddings, writer.finish()?));
                }
                tables
            },
            source_files: pass
                .source
                .files()
                .iter()
                .map(|f| f.uri.to_string())
                .collect(),
        })
    }
}

impl Partition<'_> {
    /// The (NLL, score) of the images `rows` of `batch`: from the conformal first pass when
    /// there was one, else scored now; with `embed`, their embeddings too (computed now).
    fn scores(
        &mut self,
        per_draw: &Preprocessor,
        batch: &ImageBatch,
        rows: &[usize],
        embed: bool,
    ) -> Result<Scores> {
        let ids = ids_of(&batch.ids, rows);
        let images = rows_of(&batch.pixels, rows);
        if embed && self.precomputed.is_none() {
            return self
                .scorer
                .mean_scores_and_embeddings(per_draw, &ids, images.view());
        }
        let embeddings = if embed {
            self.scorer
                .mean_scores_and_embeddings(per_draw, &ids, images.view())?
                .embeddings
        } else {
            None
        };
        match &mut self.precomputed {
            Some((all, used)) => {
                let range = *used..*used + rows.len();
                *used = range.end;
                let got = all.get(range).ok_or_else(|| {
                    Error::data(
                        &*batch.source,
                        "the source changed while it was being scored (more images on the second pass); run again",
                    )
                })?;
                Ok(Scores {
                    nll: got.iter().map(|p| p.0).collect(),
                    score: got.iter().map(|p| p.1).collect(),
                    embeddings,
                })
            }
            None => self.scorer.mean_scores(per_draw, &ids, images.view()),
        }
    }
}

/// The embedding of each of `flagged` (rows of `batch`, owned by the partitions `owner`) under
/// its model: from `embedded`, where the batch computed them, else computed now; `None` for a
/// model without an embedding.
fn flagged_embeddings(
    parts: &BTreeMap<&str, Partition<'_>>,
    per_draw: &Preprocessor,
    batch: &ImageBatch,
    flagged: &[usize],
    owner: &[Option<&str>],
    embedded: &[Option<&[f32]>],
) -> Result<Vec<Option<Vec<f32>>>> {
    let mut out: Vec<Option<Vec<f32>>> = flagged
        .iter()
        .map(|&row| embedded[row].map(<[f32]>::to_vec))
        .collect();
    let mut missing: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (k, &row) in flagged.iter().enumerate() {
        let value = owner[row].expect("flagged rows have a model");
        if out[k].is_none() && parts[value].model.model.embedder().is_some() {
            missing.entry(value).or_default().push(k);
        }
    }
    for (value, ks) in missing {
        let scorer = &parts[value].scorer;
        let width = scorer.model.embedder().map_or(1, |e| e.embedding_width());
        let rows: Vec<usize> = ks.iter().map(|&k| flagged[k]).collect();
        let computed = scorer
            .mean_scores_and_embeddings(
                per_draw,
                &ids_of(&batch.ids, &rows),
                rows_of(&batch.pixels, &rows).view(),
            )?
            .embeddings
            .unwrap_or_default();
        for (k, e) in ks.into_iter().zip(computed.chunks_exact(width.max(1))) {
            out[k] = Some(e.to_vec());
        }
    }
    Ok(out)
}

/// The embedding width every partition's model shares (a config error when one has no
/// embedding; an internal one if their widths differ, as they are fitted alike).
fn embedding_width(parts: &BTreeMap<&str, Partition<'_>>) -> Result<usize> {
    let mut width = None;
    for part in parts.values() {
        let model = part.model.model.as_ref();
        let w = model
            .embedder()
            .ok_or_else(|| no_embedding(model, &format!("model {}", part.model.meta.model_id)))?
            .embedding_width();
        if width.is_some_and(|v| v != w) {
            return Err(Error::Internal(
                "partition models have embeddings of different widths".into(),
            ));
        }
        width = Some(w);
    }
    width.ok_or_else(|| Error::Internal("no model to embed with".into()))
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
