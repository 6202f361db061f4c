//! `pipeline report SINK --out report.html`: reads a run's manifest and tables (and, for the
//! top anomalies, the source images themselves) and writes the HTML report.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;

use arrow::array::{Array, AsArray};
use arrow::datatypes::{Float32Type, Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
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
use crate::report::{self, AnomalyGroupView, Flagged, GroupCount, Night, Report};

/// Rows read per batch.
const BATCH_ROWS: usize = 65_536;

/// The most images a report draws.
const MAX_TOP: usize = 1000;

/// Examples drawn per group of anomalies.
const EXAMPLES_PER_GROUP: usize = 4;

/// What the report draws of the anomalies table.
struct FoundAnomalies {
    /// The most anomalous, most anomalous first.
    top: Vec<Flagged>,
    /// The most anomalous few of each group (by `group`, largest group first as numbered).
    examples: BTreeMap<i32, Vec<Flagged>>,
    /// Images per group.
    group_sizes: BTreeMap<i32, u64>,
    /// The nearest normal images of the drawn ones, by id.
    nearest_ids: HashMap<String, Vec<String>>,
}

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
    let found = top_anomalies(&sink, &run_id, a.top, ctx)?;
    let mut flagged = found.top;
    let mut anomaly_groups: Vec<AnomalyGroupView> = found
        .examples
        .into_iter()
        .map(|(group, examples)| AnomalyGroupView {
            group,
            images: found.group_sizes.get(&group).copied().unwrap_or(0),
            examples,
        })
        .collect();
    // Every card drawn, top anomalies and groups' examples (an image may be both), filled in
    // by one read of the source and one of the model.
    let mut drawn: Vec<&mut Flagged> = flagged
        .iter_mut()
        .chain(
            anomaly_groups
                .iter_mut()
                .flat_map(|g| g.examples.iter_mut()),
        )
        .collect();
    attach_pixels(&manifest, &mut drawn, ctx);
    attach_nearest(&manifest, &sink, &mut drawn, &found.nearest_ids, ctx);
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
        anomaly_groups,
        nights: nights(&sink, NIGHTS, ctx)?,
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

/// How many of the last runs the report lists.
const NIGHTS: usize = 14;

/// The last `n` runs of the sink's `history/` table, oldest first (none for a sink without one).
fn nights(sink: &Storage, n: usize, ctx: &Context) -> Result<Vec<Night>> {
    let uri = sink.display("history/");
    let source = match Source::open(&uri, &ctx.io) {
        Ok(s) if !s.files().is_empty() => s,
        Ok(_) | Err(Error::InputMissing { .. }) => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    let not_history = || Error::data(&uri, "not a history table");
    let columns: Vec<String> = crate::io::tables::history_schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    for batch in source.stream(&columns, BATCH_ROWS) {
        let b = batch?.batch;
        let text = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_string_opt::<i32>().cloned())
        };
        let float = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Float64Type>().cloned())
        };
        let long = |name: &str| {
            b.column_by_name(name)
                .and_then(|c| c.as_primitive_opt::<Int64Type>().cloned())
        };
        let (Some(run), Some(scored), Some(flagged)) =
            (text("run_id"), long("scored"), long("flagged"))
        else {
            return Err(not_history());
        };
        let finished = b
            .column_by_name("finished_at")
            .and_then(|c| c.as_primitive_opt::<TimestampMicrosecondType>().cloned())
            .ok_or_else(not_history)?;
        let quantiles = ["score_p50", "score_p90", "score_p99", "score_p999"].map(float);
        let (p001, stat, p, drifted) = (
            float("p_below_001"),
            float("drift_statistic"),
            float("drift_p_value"),
            b.column_by_name("drifted")
                .and_then(|c| c.as_boolean_opt().cloned()),
        );
        let get = |a: &Option<arrow::array::Float64Array>, i: usize| {
            a.as_ref().filter(|a| !a.is_null(i)).map(|a| a.value(i))
        };
        for i in 0..b.num_rows() {
            let q: Vec<Option<f64>> = quantiles.iter().map(|a| get(a, i)).collect();
            out.push(Night {
                run_id: run.value(i).to_string(),
                finished_at: chrono::DateTime::from_timestamp_micros(finished.value(i))
                    .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
                    .unwrap_or_default(),
                scored: scored.value(i),
                flagged: flagged.value(i),
                quantiles: q
                    .iter()
                    .all(Option::is_some)
                    .then(|| [0, 1, 2, 3].map(|k| q[k].unwrap_or_default())),
                p_below_001: get(&p001, i),
                drift: match (get(&stat, i), get(&p, i), drifted.as_ref()) {
                    (Some(s), Some(p), Some(d)) if !d.is_null(i) => Some((s, p, d.value(i))),
                    _ => None,
                },
            });
        }
    }
    // Timestamps sort as their text does ("%Y-%m-%d %H:%M").
    out.sort_by(|a, b| {
        a.finished_at
            .cmp(&b.finished_at)
            .then(a.run_id.cmp(&b.run_id))
    });
    let skip = out.len().saturating_sub(n);
    Ok(out.split_off(skip))
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
fn top_anomalies(
    sink: &Storage,
    run_id: &str,
    top: usize,
    ctx: &Context,
) -> Result<FoundAnomalies> {
    let uri = sink.display("anomalies/");
    let mut found = FoundAnomalies {
        top: Vec::new(),
        examples: BTreeMap::new(),
        group_sizes: BTreeMap::new(),
        nearest_ids: HashMap::new(),
    };
    if sink.list("anomalies")?.is_empty() || top == 0 {
        return Ok(found);
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
    // Tables written before the nearest normal images and groups were recorded lack them.
    let schema = source.files()[0].schema();
    let has_nearest = schema.field_with_name("nearest_ids").is_ok();
    let has_group = schema.field_with_name("group").is_ok();
    let mut columns = columns;
    if has_nearest {
        columns.push("nearest_ids".into());
    }
    if has_group {
        columns.push("group".into());
    }
    let mut best: Vec<Flagged> = Vec::new();
    let mut nearest_ids: HashMap<String, Vec<String>> = HashMap::new();
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
        let near = match has_nearest {
            true => Some(col("nearest_ids")?.as_list_opt::<i32>().ok_or_else(bad)?),
            false => None,
        };
        let groups = match has_group {
            true => Some(
                col("group")?
                    .as_primitive_opt::<Int32Type>()
                    .ok_or_else(bad)?,
            ),
            false => None,
        };
        for i in 0..batch.num_rows() {
            if runs.value(i) != run_id {
                continue;
            }
            let group = groups.filter(|g| !g.is_null(i)).map(|g| g.value(i));
            if let Some(g) = group {
                *found.group_sizes.entry(g).or_default() += 1;
            }
            let worst_kept = best.last().map(|f| f.score);
            let among_top = best.len() < top || worst_kept.is_some_and(|w| score.value(i) > w);
            let examples = group.map(|g| found.examples.entry(g).or_default());
            let example = examples.as_ref().is_some_and(|e| {
                e.len() < EXAMPLES_PER_GROUP || e.last().is_some_and(|f| score.value(i) > f.score)
            });
            if !among_top && !example {
                continue;
            }
            if let Some(near) = near.filter(|n| !n.is_null(i) && !ids.is_null(i)) {
                let list = near.value(i);
                let list = list.as_string_opt::<i32>().ok_or_else(bad)?;
                nearest_ids.insert(
                    ids.value(i).to_string(),
                    list.iter().flatten().map(str::to_string).collect(),
                );
            }
            let map = maps.value(i);
            let map = map.as_primitive_opt::<Float32Type>().ok_or_else(bad)?;
            let flagged = Flagged {
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
                nearest: Vec::new(),
            };
            if let Some(e) = examples.filter(|_| example) {
                e.push(flagged.clone());
                e.sort_by(|a, b| b.score.total_cmp(&a.score));
                e.truncate(EXAMPLES_PER_GROUP);
            }
            if among_top {
                best.push(flagged);
                best.sort_by(|a, b| b.score.total_cmp(&a.score));
                best.truncate(top);
            }
        }
    }
    let drawn = |id: &String| {
        best.iter()
            .chain(found.examples.values().flatten())
            .any(|f| &f.id == id)
    };
    nearest_ids.retain(|id, _| drawn(id));
    found.top = best;
    found.nearest_ids = nearest_ids;
    Ok(found)
}

/// Draws each top anomaly's nearest normal images (`nearest_ids`, by the anomaly's id) from the
/// reference sample of the run's model(s); where the model cannot be read from here, the report
/// says so and shows none.
fn attach_nearest(
    manifest: &Manifest,
    sink: &Storage,
    flagged: &mut [&mut Flagged],
    nearest_ids: &HashMap<String, Vec<String>>,
    ctx: &Context,
) {
    if nearest_ids.is_empty() {
        return;
    }
    let uri = &manifest.model.uri;
    // A model the run fitted is under the sink; one given with --model is where it was.
    let set = crate::pipeline::artifact::load_set(uri, &ctx.io).or_else(|_| {
        crate::pipeline::artifact::load_set(
            &sink.display(&format!("models/{}", manifest.model.model_id)),
            &ctx.io,
        )
    });
    let set = match set {
        Ok(set) => set,
        Err(e) => {
            tracing::warn!(error = %e.chain(), "The run's model could not be read back; the report shows no nearest normal images.");
            return;
        }
    };
    let mut pixels: HashMap<&str, &[u8]> = HashMap::new();
    for model in set.models.values() {
        if let Some(sample) = &model.reference {
            for (i, id) in sample.ids.iter().enumerate() {
                pixels.insert(id, sample.image(i));
            }
        }
    }
    for f in flagged.iter_mut() {
        if let Some(ids) = nearest_ids.get(&f.id) {
            f.nearest = ids
                .iter()
                .filter_map(|id| pixels.get(id.as_str()).map(|p| (id.clone(), p.to_vec())))
                .filter(|(_, p)| p.len() == f.shape.dims())
                .collect();
        }
    }
}

/// Reads the drawn images back from the run's source (8-bit, as stored); where the source is
/// not readable from here the report says so instead of failing.
fn attach_pixels(manifest: &Manifest, flagged: &mut [&mut Flagged], ctx: &Context) {
    if flagged.is_empty() {
        return;
    }
    let mut wanted: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, f) in flagged.iter().enumerate() {
        wanted.entry(f.id.clone()).or_default().push(i);
    }
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
                    for &i in wanted.get(id).into_iter().flatten() {
                        if flagged[i].shape == batch.shape {
                            flagged[i].pixels = Some(image.to_vec());
                        }
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
