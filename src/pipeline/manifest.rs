//! `runs/<run_id>/manifest.json`: what a run read, which model it used, what it wrote.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::config::PipelineConfig;
use crate::decide::StoredThreshold;
use crate::decide::drift::Drift;

/// The run manifest, written after every table is in place and before `_SUCCESS`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Manifest {
    /// The run's id.
    pub run_id: String,
    /// `[pipeline] name`.
    pub pipeline: String,
    /// The subcommand that ran (`run` or `score`).
    pub command: String,
    /// The program and version.
    pub created_by: String,
    /// UTC start time, RFC 3339.
    pub started_at: String,
    /// UTC time the tables were committed, RFC 3339.
    pub finished_at: String,
    /// The source files read, in order.
    pub source_files: Vec<String>,
    /// Row counts.
    pub rows: RowCounts,
    /// The model used.
    pub model: ModelRef,
    /// The threshold in force, for a run with one model (see `partitions` otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<StoredThreshold>,
    /// Per partition value of a partitioned run: its model, threshold and counts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub partitions: BTreeMap<String, PartitionRecord>,
    /// Partition values that had no model (too few images to fit one), with their image
    /// counts in this run: scored by none and never flagged.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub unmodelled_partitions: BTreeMap<String, u64>,
    /// The groups the run's anomalies fall into (per model with an embedding), largest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub anomaly_groups: Vec<AnomalyGroup>,
    /// What the run's scores looked like: quantiles, p-values, drift (also its `history/` row).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scores_summary: Option<ScoreSummary>,
    /// Final part files per table, relative to the sink.
    pub tables: BTreeMap<String, Vec<String>>,
    /// The resolved configuration (after `${VAR}` and `--set`).
    pub config: PipelineConfig,
}

/// One group of a run's anomalies: images of one model that resemble each other.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnomalyGroup {
    /// The model whose embeddings were grouped.
    pub model_id: String,
    /// The `group` value in the anomalies table.
    pub group: i32,
    /// Flagged images in the group.
    pub images: u64,
}

/// What a run's scores looked like, as recorded in its manifest and its `history/` row.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreSummary {
    /// The 50%, 90%, 99% and 99.9% quantiles of the run's scores (null without scores).
    pub score_quantiles: Option<[f64; 4]>,
    /// The share of the run's p-values below 0.01 (about 0.01 on a night like the calibration
    /// data, more with anomalies); null without p-values.
    pub p_below_001: Option<f64>,
    /// The same below 0.05.
    pub p_below_005: Option<f64>,
    /// The drift test over the run's models: the largest statistic, and the smallest p-value
    /// times the number of models tested (Bonferroni), so that a run drifts at the stated level
    /// however many partitions it has. Null where no model has calibration scores.
    pub drift: Option<Drift>,
    /// Each model's own test.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drift_by_model: Vec<ModelDrift>,
}

/// One model's drift test.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelDrift {
    /// The model (`models/<model_id>/`).
    pub model_id: String,
    /// Its test.
    #[serde(flatten)]
    pub drift: Drift,
}

/// One partition of a partitioned run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PartitionRecord {
    /// Its model.
    pub model_id: String,
    /// Its threshold in this run.
    pub threshold: StoredThreshold,
    /// Images scored.
    pub scored: u64,
    /// Images flagged.
    pub anomalies: u64,
}

/// Row counts of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RowCounts {
    /// Rows read from the source.
    pub read: u64,
    /// Images scored (one `scores` row each).
    pub scored: u64,
    /// Rows rejected (one `rejects` row each).
    pub rejected: u64,
    /// Images flagged (one `anomalies` row each).
    pub anomalies: u64,
    /// Images of partitions without a model (in `scores`, with null scores).
    #[serde(default)]
    pub unmodelled: u64,
}

/// Which fitted model a run used.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelRef {
    /// `models/<model_id>/`.
    pub model_id: String,
    /// The model kind.
    pub kind: String,
    /// Where it was loaded from or written to.
    pub uri: String,
    /// Whether this run fitted it.
    pub fitted_by_this_run: bool,
    /// Whether the training budget (`train.max_minutes`) ended the training of the model (or of
    /// any partition's): it stopped short of converging. Absent when not.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub training_budget_ended: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A manifest written by the previous version (eb27741: `[model]` held every kind's keys,
    /// and the background was a kind's name) still reads, so `pipeline report` works on a sink
    /// whose history predates this version.
    #[test]
    fn a_manifest_of_the_previous_version_still_reads() {
        let text = include_str!("../../tests/data/manifest-v1.json");
        let m: Manifest = serde_json::from_str(text).unwrap();
        assert_eq!(m.config.model.spec.name(), "nade");
        assert_eq!(m.config.model.spec.to_json()["hidden"], 8);
        assert_eq!(m.config.score.background.kind_name(), "ar");
        assert_eq!(m.rows.scored, 2000);
    }
}
