//! Stage orchestration: `run` (fit or load, then score and commit), `fit`, and `score`.
//!
//! ```text
//! source ─► decode ─► preprocess ─► fit (or load model) ─► score ─► decide ─► sink
//! read.rs   io/decode  data/         fit.rs                score.rs  decide/   commit.rs
//! ```

pub mod artifact;
pub mod cancel;
pub mod commit;
pub mod crash_point;
pub mod fit;
pub mod grouping;
pub mod history;
pub mod manifest;
pub mod progress;
pub mod publish;
pub mod read;
pub mod reference;
pub mod score;
pub mod scorer;
pub mod shards;
pub mod staged;

use std::collections::BTreeMap;

use crate::config::PipelineConfig;
use crate::config::load::check_run_id;
use crate::error::{Error, Result};
use crate::io::source::Shard;
use crate::io::storage::{Io, Storage};
use artifact::ModelSet;
use manifest::{Manifest, ModelRef, PartitionRecord, RowCounts};

/// What every stage needs from the program around it.
#[derive(Debug, Clone)]
pub struct Context {
    /// How stores are reached: the IO runtime (stages call into it from their own threads) and
    /// the `[storage]` settings.
    pub io: Io,
    /// Whether to draw progress bars (a terminal with human-readable logs).
    pub progress: bool,
}

impl Context {
    /// The same context, opening stores with a pipeline's `[storage]` settings.
    pub fn for_config(&self, config: &PipelineConfig) -> Self {
        Self {
            io: self.io.with_settings(&config.storage),
            progress: self.progress,
        }
    }
}

/// Where the model for scoring comes from.
#[derive(Debug, Clone)]
pub enum ModelSource {
    /// Fit one on the source first.
    Fit,
    /// Load a fitted one from this URI.
    Load(String),
}

/// The outcome of a run, for the summary printed at the end.
#[derive(Debug, Clone)]
pub struct RunSummary {
    /// The run's manifest as written.
    pub manifest: Manifest,
    /// The sink root as the user named it.
    pub sink: String,
    /// Where the manifest is, relative to the sink.
    pub manifest_path: String,
    /// The model's directory URI.
    pub model_uri: String,
    /// For a shard whose run is not committed yet: the shards still to stage.
    pub waiting_for: Vec<u32>,
}

/// The run id to use: the config's (which `--run-id` has already overridden), else the UTC
/// start time.
pub fn run_id(config: &PipelineConfig, started: &chrono::DateTime<chrono::Utc>) -> Result<String> {
    let id = if config.pipeline.run_id.is_empty() {
        started.format("%Y%m%dT%H%M%SZ").to_string()
    } else {
        config.pipeline.run_id.clone()
    };
    check_run_id(&id).map_err(|e| Error::Usage(e.to_string()))?;
    Ok(id)
}

/// Fits the configured model and writes its artifact under the sink.
pub fn fit_only(ctx: &Context, config: &PipelineConfig) -> Result<ModelSet> {
    let sink = Storage::open(&config.sink.uri, &ctx.io)?;
    fit::fit(ctx, config, &sink)
}

/// Fits (or loads) a model, scores the source, and commits run tables and manifest.
pub fn run(
    ctx: &Context,
    config: &PipelineConfig,
    model_source: ModelSource,
    command: &str,
    shard: Option<Shard>,
) -> Result<RunSummary> {
    if shard.is_some() && matches!(model_source, ModelSource::Fit) {
        return Err(Error::Usage(
            "sharded runs score with a model fitted once: `pipeline fit`, then `pipeline score --model URI --shard I/N`".into(),
        ));
    }
    let started = chrono::Utc::now();
    let run_id = run_id(config, &started)?;
    let sink = Storage::open(&config.sink.uri, &ctx.io)?;
    let span = tracing::info_span!("run", run_id = %run_id, pipeline = %config.pipeline.name);
    let _enter = span.enter();

    let fitted = matches!(model_source, ModelSource::Fit);
    let model = match model_source {
        ModelSource::Fit => fit::fit(ctx, config, &sink)?,
        ModelSource::Load(uri) => artifact::load_set(&uri, &ctx.io)?,
    };
    let scored = score_staged(ctx, config, &model, &sink, &run_id, shard)?;
    let mut manifest = manifest_of(config, &model, &scored, &run_id, &started, command, fitted);
    let summary = |manifest: Manifest, manifest_path: String, waiting_for: Vec<u32>| RunSummary {
        manifest,
        sink: config.sink.uri.clone(),
        manifest_path,
        model_uri: model.uri.clone(),
        waiting_for,
    };
    let Some(shard) = shard else {
        let committed = publish::publish(
            &sink,
            &ctx.io,
            &run_id,
            &scored.tables,
            &mut manifest,
            Some(&model),
        )?;
        tracing::info!(
            scored = scored.scored,
            anomalies = scored.anomalies,
            rejected = scored.counts.rejected,
            "Run committed."
        );
        return Ok(summary(manifest, committed.manifest, Vec::new()));
    };
    shards::stage(&sink, shard, &manifest, &scored.tables)?;
    crash_point::reached("shard.staged");
    tracing::info!(
        shard = shard.index,
        shards = shard.count,
        scored = scored.scored,
        "Shard staged."
    );
    Ok(
        match shards::try_commit(
            &sink,
            &ctx.io,
            &run_id,
            shard.count,
            Some(shard.index),
            false,
            Some(&model),
        )? {
            shards::CommitOutcome::Published(whole, committed) => {
                tracing::info!(
                    scored = whole.rows.scored,
                    anomalies = whole.rows.anomalies,
                    "Run committed."
                );
                summary(*whole, committed.manifest, Vec::new())
            }
            shards::CommitOutcome::Waiting(waiting) => summary(manifest, String::new(), waiting),
            shards::CommitOutcome::PublishedElsewhere => {
                summary(manifest, String::new(), Vec::new())
            }
        },
    )
}

/// Scores the source into the run's staging area, having cleared what an earlier attempt left
/// there; on failure the staged files are removed again (a shard touches only its own).
fn score_staged(
    ctx: &Context,
    config: &PipelineConfig,
    model: &ModelSet,
    sink: &Storage,
    run_id: &str,
    shard: Option<Shard>,
) -> Result<score::Scored> {
    let discard = |sink: &Storage| match shard {
        Some(s) => shards::discard_own(sink, run_id, s),
        None => commit::discard_staging(sink, run_id),
    };
    discard(sink)?;
    score::score(ctx, config, model, sink, run_id, shard)
        .and_then(|s| cancel::check().map(|()| s))
        .inspect_err(|_| {
            if let Err(cleanup) = discard(sink) {
                tracing::warn!(error = %cleanup.chain(), "Could not remove the failed run's staged files.");
            }
        })
}

/// The run's manifest as scoring left it (its tables are filled in by the commit).
fn manifest_of(
    config: &PipelineConfig,
    model: &ModelSet,
    scored: &score::Scored,
    run_id: &str,
    started: &chrono::DateTime<chrono::Utc>,
    command: &str,
    fitted: bool,
) -> Manifest {
    let partitioned = !model.partition_by.is_empty();
    Manifest {
        run_id: run_id.to_string(),
        pipeline: config.pipeline.name.clone(),
        command: command.to_string(),
        created_by: format!("anomaly-pipeline {}", env!("CARGO_PKG_VERSION")),
        started_at: started.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        finished_at: String::new(),
        source_files: scored.source_files.clone(),
        rows: RowCounts {
            read: scored.counts.rows,
            scored: scored.scored,
            rejected: scored.counts.rejected,
            anomalies: scored.anomalies,
            unmodelled: scored.unmodelled,
        },
        model: ModelRef {
            model_id: model.id.clone(),
            kind: model.kind().to_string(),
            uri: model.uri.clone(),
            fitted_by_this_run: fitted,
            training_budget_ended: model
                .models
                .values()
                .any(|m| m.meta.training.curve.last().is_some_and(|r| r.budget_ended)),
        },
        threshold: if partitioned {
            None
        } else {
            scored.thresholds.values().next().cloned()
        },
        partitions: if partitioned {
            scored
                .thresholds
                .iter()
                .map(|(value, threshold)| {
                    let counts = scored.partitions.get(value).cloned().unwrap_or_default();
                    let record = PartitionRecord {
                        model_id: model.models[value].meta.model_id.clone(),
                        threshold: threshold.clone(),
                        scored: counts.scored,
                        anomalies: counts.anomalies,
                    };
                    (value.clone(), record)
                })
                .collect()
        } else {
            BTreeMap::new()
        },
        unmodelled_partitions: scored.unmodelled_partitions.clone(),
        anomaly_groups: Vec::new(),
        scores_summary: None,
        tables: Default::default(),
        config: config.clone(),
    }
}
