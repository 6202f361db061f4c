//! From the last scored image to the published run: group the anomalies, summarize the scores
//! into the run's `history/` row (with the drift test), then commit every table at once
//! ([`commit`](super::commit)). A single process and the worker that commits a sharded run both
//! come through here, so both publish the same tables.

use std::collections::BTreeMap;

use super::artifact::{self, ModelSet};
use super::commit::{self, Committed};
use super::manifest::Manifest;
use super::{grouping, history};
use crate::error::Result;
use crate::io::storage::{Io, Storage};
use crate::io::tables::{Table, WrittenTable};

/// Publishes run `run_id` from its `staged` tables. `models` are the run's models; without
/// them (`pipeline commit`) they are loaded from the manifest's model URI, for their
/// calibration scores (the drift test), and if they cannot be, the run is published untested.
pub fn publish(
    sink: &Storage,
    io: &Io,
    run_id: &str,
    staged: &[(Table, WrittenTable)],
    manifest: &mut Manifest,
    models: Option<&ModelSet>,
) -> Result<Committed> {
    grouping::assign(sink, staged, manifest)?;
    let calibration = match models {
        Some(set) => calibration_of(set),
        None => match artifact::load_set(&manifest.model.uri, io) {
            Ok(set) => calibration_of(&set),
            Err(e) => {
                tracing::warn!(model = %manifest.model.uri, error = %e.chain(), "Cannot load the run's model: its scores are not tested for drift.");
                BTreeMap::new()
            }
        },
    };
    let summary = history::summarize(sink, staged, &calibration)?;
    history::log(&summary);
    manifest.scores_summary = Some(summary);
    let mut tables = staged.to_vec();
    tables.push(history::stage(sink, manifest)?);
    commit::commit(sink, run_id, &tables, manifest)
}

/// Each model's calibration scores, by model id.
fn calibration_of(set: &ModelSet) -> BTreeMap<String, Vec<f64>> {
    set.models
        .values()
        .map(|m| (m.meta.model_id.clone(), m.meta.calibration_scores.clone()))
        .collect()
}
