//! `pipeline report SINK --out report.html`: reads a run's manifest and tables (and, for the
//! top anomalies, the source images themselves) and writes the HTML report.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Float64Type, Int32Type};
use arrow::util::display::{ArrayFormatter, FormatOptions};

use crate::cli::ReportArgs;
use crate::data::ImageShape;
use crate::data::preprocess::Preprocessor;
use crate::error::{Error, Result, from_io};
use crate::io::source::Source;
use crate::io::storage::Storage;
use crate::pipeline::manifest::Manifest;
use crate::pipeline::progress::Progress;
use crate::pipeline::{Context, read};
use crate::report::{self, Flagged, GroupCount, Report};

/// Rows read per batch.
const BATCH_ROWS: usize = 65_536;

/// The most images a report draws.
const MAX_TOP: usize = 1000;

/// Builds and writes the report.
pub fn report(a: &ReportArgs, ctx: &Context) -> Result<()> {
    if a.top > MAX_TOP {
        return Err(Error::Usage(format!("--top must be at most {MAX_TOP}")));
    }
    let sink = Storage::open(&a.sink, &ctx.io)?;
    let manifest = find_manifest(&sink, a.run_id.as_deref())?;
    let run_id = manifest.run_id.clone();
    let by = a.by.clone().unwrap_or_else(|| "model_id".into());
    let (scores, groups) = run_scores(&sink, &run_id, &by, ctx)?;
    let mut flagged = top_anomalies(&sink, &run_id, a.top, ctx)?;
    attach_pixels(&manifest, &mut flagged, ctx);
    let report = Report {
        title: format!("{} — run {run_id}", manifest.pipeline),
        facts: facts(&manifest),
        scores,
        threshold: manifest
            .threshold
            .as_ref()
            .map_or(f64::INFINITY, |t| t.value),
        groups: groups
            .into_iter()
            .map(|(name, (images, flagged))| GroupCount {
                name,
                images,
                flagged,
            })
            .collect(),
        flagged,
    };
    let rows = &manifest.rows;
    let html = report::render(&report)?;
    std::fs::write(&a.out, html).map_err(|e| from_io(&a.out, e))?;
    let _ = writeln!(
        std::io::stdout().lock(),
        "wrote {} (run {run_id}: {} images, {} flagged, top {} drawn)",
        a.out,
        rows.scored,
        rows.anomalies,
        report.flagged.len()
    );
    Ok(())
}

/// (images, flagged) per value of a column.
type GroupCounts = BTreeMap<String, (u64, u64)>;

/// Every score of run `run_id`, and (images, flagged) per value of the column `by`.
fn run_scores(
    sink: &Storage,
    run_id: &str,
    by: &str,
    ctx: &Context,
) -> Result<(Vec<f64>, GroupCounts)> {
    let scores_uri = sink.display("scores/");
    let scores_source = Source::open(&scores_uri, &ctx.io)?;
    if scores_source.files()[0]
        .schema()
        .field_with_name(by)
        .is_err()
    {
        return Err(Error::Usage(format!(
            "the scores table has no column `{by}` to group by"
        )));
    }
    let mut scores = Vec::new();
    let mut groups = GroupCounts::new();
    let columns = [
        "run_id".to_string(),
        "score".into(),
        "is_anomaly".into(),
        by.to_string(),
    ];
    let options = FormatOptions::default().with_null("(null)");
    for batch in scores_source.stream(&columns, BATCH_ROWS) {
        let batch = batch?.batch;
        let not_scores = || {
            Error::data(
                &scores_uri,
                "not a scores table (run_id, score, is_anomaly)",
            )
        };
        let runs = batch
            .column_by_name("run_id")
            .and_then(|c| c.as_string_opt::<i32>())
            .ok_or_else(not_scores)?;
        let score = batch
            .column_by_name("score")
            .and_then(|c| c.as_primitive_opt::<Float64Type>())
            .ok_or_else(not_scores)?;
        let flags = batch
            .column_by_name("is_anomaly")
            .and_then(|c| c.as_boolean_opt())
            .ok_or_else(not_scores)?;
        let group_column = batch.column_by_name(by).expect("checked above");
        let group = ArrayFormatter::try_new(group_column.as_ref(), &options).map_err(|e| {
            Error::data_because(&scores_uri, format!("column `{by}` cannot be shown"), e)
        })?;
        for i in 0..batch.num_rows() {
            if runs.value(i) != run_id {
                continue;
            }
            scores.push(score.value(i));
            let g = groups.entry(group.value(i).to_string()).or_default();
            g.0 += 1;
            g.1 += u64::from(!flags.is_null(i) && flags.value(i));
        }
    }
    if scores.is_empty() {
        return Err(Error::data(
            &scores_uri,
            format!("no rows of run `{run_id}`"),
        ));
    }

    Ok((scores, groups))
}

/// The report's summary lines: model, score, threshold, counts, when and from where.
fn facts(manifest: &Manifest) -> Vec<(String, String)> {
    let t = &manifest.threshold;
    let rows = &manifest.rows;
    vec![
        (
            "model".into(),
            format!("{} ({})", manifest.model.model_id, manifest.model.kind),
        ),
        (
            "score".into(),
            format!("{:?}", manifest.config.score.method).to_lowercase(),
        ),
        (
            "threshold".into(),
            match t {
                Some(t) => format!(
                    "{:?} {:.3} nats{}",
                    t.method,
                    t.value,
                    t.fdr.map(|f| format!(" (FDR {f})")).unwrap_or_default()
                )
                .to_lowercase(),
                None => format!(
                    "one per partition of {} ({} models)",
                    manifest.config.source.partition_by.join(", "),
                    manifest.partitions.len()
                ),
            },
        ),
        ("images scored".into(), rows.scored.to_string()),
        ("flagged".into(), rows.anomalies.to_string()),
        ("rejected rows".into(), rows.rejected.to_string()),
        ("finished".into(), manifest.finished_at.clone()),
        ("source".into(), manifest.config.source.uri.clone()),
    ]
}

/// The manifest of `run_id`, or of the most recently finished run in the sink.
fn find_manifest(sink: &Storage, run_id: Option<&str>) -> Result<Manifest> {
    let parse = |rel: &str| -> Result<Manifest> {
        let bytes = sink.get(rel)?;
        serde_json::from_slice(&bytes)
            .map_err(|e| Error::data_because(sink.display(rel), "not a run manifest", e))
    };
    if let Some(id) = run_id {
        return parse(&format!("runs/{id}/manifest.json")).map_err(|e| match e {
            Error::InputMissing { uri, .. } => Error::InputMissing {
                uri,
                hint: "no such run in this sink: check --run-id".into(),
            },
            other => other,
        });
    }
    let mut newest: Option<Manifest> = None;
    for object in sink.list("runs")? {
        let rel = sink.relative(&object.location);
        if !rel.ends_with("/manifest.json") {
            continue;
        }
        let m = parse(&rel)?;
        if newest
            .as_ref()
            .is_none_or(|n| m.finished_at > n.finished_at)
        {
            newest = Some(m);
        }
    }
    newest.ok_or_else(|| Error::InputMissing {
        uri: sink.display("runs/"),
        hint: "no finished run in this sink: give the sink.uri a run wrote to".into(),
    })
}

/// The `top` highest-scoring rows of the run's anomalies table.
fn top_anomalies(sink: &Storage, run_id: &str, top: usize, ctx: &Context) -> Result<Vec<Flagged>> {
    let uri = sink.display("anomalies/");
    if sink.list("anomalies")?.is_empty() || top == 0 {
        return Ok(Vec::new());
    }
    let source = Source::open(&uri, &ctx.io)?;
    let columns: Vec<String> = [
        "run_id",
        "id",
        "score",
        "pixel_nll",
        "height",
        "width",
        "channels",
    ]
    .map(String::from)
    .to_vec();
    let mut best: Vec<Flagged> = Vec::new();
    for batch in source.stream(&columns, 4096) {
        let batch = batch?.batch;
        let bad = || Error::data(&uri, "not an anomalies table");
        let col = |n: &str| batch.column_by_name(n).ok_or_else(bad);
        let runs = col("run_id")?.as_string_opt::<i32>().ok_or_else(bad)?;
        let ids = col("id")?.as_string_opt::<i32>().ok_or_else(bad)?;
        let score = col("score")?
            .as_primitive_opt::<Float64Type>()
            .ok_or_else(bad)?;
        let maps = col("pixel_nll")?.as_list_opt::<i32>().ok_or_else(bad)?;
        let dims: Vec<_> = ["height", "width", "channels"]
            .iter()
            .map(|n| {
                col(n).and_then(|c| c.as_primitive_opt::<Int32Type>().cloned().ok_or_else(bad))
            })
            .collect::<Result<_>>()?;
        for i in 0..batch.num_rows() {
            if runs.value(i) != run_id {
                continue;
            }
            let worst_kept = best.last().map(|f| f.score);
            if best.len() == top && worst_kept.is_some_and(|w| score.value(i) <= w) {
                continue;
            }
            let map = maps.value(i);
            let map = map.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
            best.push(Flagged {
                id: if ids.is_null(i) {
                    "(null)".into()
                } else {
                    ids.value(i).into()
                },
                score: score.value(i),
                pixel_nll: map.values().to_vec(),
                shape: ImageShape::new(
                    dims[0].value(i) as usize,
                    dims[1].value(i) as usize,
                    dims[2].value(i) as usize,
                ),
                pixels: None,
            });
            best.sort_by(|a, b| b.score.total_cmp(&a.score));
            best.truncate(top);
        }
    }
    Ok(best)
}

/// Reads the drawn images back from the run's source (8-bit, as stored); where the source is
/// not readable from here the report says so instead of failing.
fn attach_pixels(manifest: &Manifest, flagged: &mut [Flagged], ctx: &Context) {
    if flagged.is_empty() {
        return;
    }
    let wanted: HashMap<String, usize> = flagged
        .iter()
        .enumerate()
        .map(|(i, f)| (f.id.clone(), i))
        .collect();
    let result = (|| -> Result<()> {
        let source = Source::open(&manifest.config.source.uri, &ctx.io)?;
        let raw = Preprocessor::raw();
        read::for_each_batch(
            &source,
            &manifest.config.source,
            &raw,
            None,
            &Progress::hidden(),
            |batch, _| {
                let dims = batch.shape.dims();
                let pixels = batch.pixels.as_slice().expect("contiguous");
                for (id, image) in batch.ids.iter().zip(pixels.chunks_exact(dims.max(1))) {
                    if let Some(&i) = wanted.get(id)
                        && flagged[i].shape == batch.shape
                    {
                        flagged[i].pixels = Some(image.to_vec());
                    }
                }
                Ok(())
            },
        )?;
        Ok(())
    })();
    if let Err(e) = result {
        tracing::warn!(error = %e.chain(), "The source images could not be read back; the report shows heat maps only.");
    }
}
