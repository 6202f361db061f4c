//! Groups of a run's anomalies, assigned once every image is scored (by every shard): the
//! staged anomalies' embeddings are read back, grouped per model
//! ([`decide::groups`](crate::decide::groups)), and each staged part is rewritten with its
//! `group` column before the commit moves it into place. Rewriting happens in staging only, so a
//! crash leaves nothing half-published, and repeating it (a retried `pipeline commit`) gives the
//! same groups.

use std::collections::BTreeMap;

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float32Type;

use super::manifest::{AnomalyGroup, Manifest};
use super::staged;
use crate::decide::groups;
use crate::error::{Error, Result};
use crate::io::storage::Storage;
use crate::io::tables::{self, Table, WrittenTable};

/// One model's flagged embeddings, and where each came from (part, row within the part).
#[derive(Default)]
struct ModelRows {
    values: Vec<f32>,
    width: usize,
    at: Vec<(usize, usize)>,
}

/// Groups the staged anomalies of a run (`staged`, as the commit will publish them), rewrites
/// their parts with the `group` column, and records the groups in `manifest`.
pub fn assign(
    sink: &Storage,
    staged: &[(Table, WrittenTable)],
    manifest: &mut Manifest,
) -> Result<()> {
    let Some((_, written)) = staged.iter().find(|(t, _)| *t == Table::Anomalies) else {
        return Ok(());
    };
    let mut by_model: BTreeMap<String, ModelRows> = BTreeMap::new();
    let mut rows_per_part = Vec::with_capacity(written.staged.len());
    for (part, rel) in written.staged.iter().enumerate() {
        let mut row = 0;
        for batch in staged::read(sink, rel, Some(&["model_id", "embedding"]))? {
            let bad = || Error::data(sink.display(rel), "not an anomalies part");
            let ids = batch
                .column_by_name("model_id")
                .and_then(|c| c.as_string_opt::<i32>())
                .ok_or_else(bad)?;
            let vectors = batch
                .column_by_name("embedding")
                .and_then(|c| c.as_list_opt::<i32>())
                .ok_or_else(bad)?;
            for i in 0..batch.num_rows() {
                if !vectors.is_null(i) && !ids.is_null(i) {
                    let v = vectors.value(i);
                    let v = v.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
                    let m = by_model.entry(ids.value(i).to_string()).or_default();
                    m.width = v.len();
                    m.values.extend_from_slice(v.values());
                    m.at.push((part, row + i));
                }
            }
            row += batch.num_rows();
        }
        rows_per_part.push(row);
    }
    if by_model.is_empty() {
        return Ok(());
    }
    let mut labels: Vec<Vec<Option<i32>>> = rows_per_part.iter().map(|&n| vec![None; n]).collect();
    manifest.anomaly_groups.clear();
    for (model_id, m) in by_model {
        let g = groups::group(&m.values, m.width);
        for (&(part, row), &label) in m.at.iter().zip(&g.labels) {
            labels[part][row] = Some(label as i32);
        }
        tracing::info!(model = %model_id, groups = g.sizes.len(), sizes = ?g.sizes, silhouette = g.silhouette.unwrap_or(f64::NAN), "Anomalies grouped.");
        manifest
            .anomaly_groups
            .extend(g.sizes.iter().enumerate().map(|(k, &images)| AnomalyGroup {
                model_id: model_id.clone(),
                group: k as i32,
                images,
            }));
    }
    for (rel, part_labels) in written.staged.iter().zip(labels) {
        if part_labels.iter().all(Option::is_none) {
            continue;
        }
        let batches = staged::read(sink, rel, None)?;
        let mut offset = 0;
        let mut rewritten = Vec::with_capacity(batches.len());
        for batch in &batches {
            let n = batch.num_rows();
            rewritten.push(tables::with_groups(
                batch,
                part_labels[offset..offset + n].to_vec(),
            )?);
            offset += n;
        }
        sink.put(rel, staged::encode(&rewritten, rel)?)?;
    }
    Ok(())
}
