//! Carries out each subcommand and prints its summary on stdout (logs go to stderr).

mod bench;
mod evaluate;
mod inspect;
#[cfg(feature = "query")]
mod query;
mod report;
mod sample;

use std::io::Write;

use crate::cli::{Command, ConfigArgs};
use crate::config::{self, LoadOptions, PipelineConfig, reference};
use crate::error::{Error, Result};
use crate::io::source::Source;
use crate::pipeline::artifact;
use crate::pipeline::{self, Context, ModelSource, RunSummary, read};

/// Runs one subcommand.
pub fn dispatch(command: &Command, ctx: &Context) -> Result<()> {
    match command {
        Command::Run(a) => run(a, ctx),
        Command::Fit(a) => fit(a, ctx),
        Command::Score(a) => score(a, ctx),
        Command::Validate(a) => validate(a, ctx),
        Command::Inspect(a) => inspect::inspect(a, ctx),
        Command::Sample(a) => sample::sample(a, ctx),
        Command::Bench(a) => bench::bench(a, ctx),
        Command::Commit(a) => commit(a, ctx),
        Command::Evaluate(a) => evaluate::evaluate(a, ctx),
        Command::Report(a) => report::report(a, ctx),
        #[cfg(feature = "query")]
        Command::Query(a) => query::query(a, ctx),
        #[cfg(not(feature = "query"))]
        Command::Query(_) => Err(Error::Usage(
            "this pipeline was built without `query` (cargo feature `query`, on by default): rebuild with `cargo build --release --features query`, or read the tables with DuckDB or polars".into(),
        )),
        Command::Schema(a) => schema(a),
    }
}

/// `pipeline run`: fit (or load `model.uri`), score, commit.
fn run(a: &crate::cli::RunArgs, ctx: &Context) -> Result<()> {
    let (config, ctx) = load(&a.config, ctx)?;
    let source = if config.model.uri.is_empty() {
        ModelSource::Fit
    } else {
        ModelSource::Load(config.model.uri.clone())
    };
    let summary = pipeline::run(&ctx, &config, source, "run", None)?;
    print_run(&summary);
    Ok(())
}

/// `pipeline fit`: fit and write the model; print where it is.
fn fit(a: &ConfigArgs, ctx: &Context) -> Result<()> {
    let (config, ctx) = load(a, ctx)?;
    let set = pipeline::fit_only(&ctx, &config)?;
    for (value, model) in &set.models {
        let t = &model.meta.training;
        out(format_args!(
            "fitted {}{} on {} images ({} held out): validation NLL {} nats, threshold {:.3} nats\n",
            &model.meta.kind,
            if value.is_empty() {
                String::new()
            } else {
                format!(" for partition {value}")
            },
            t.images,
            t.validation_images,
            t.validation_nll
                .map(|v| format!("{v:.3}"))
                .unwrap_or_else(|| "n/a".into()),
            model.meta.threshold.value,
        ));
    }
    for (value, images) in &set.too_small {
        out(format_args!(
            "no model for partition {value}: {images} images, fewer than train.min_images\n"
        ));
    }
    out(format_args!("model: {}\n", set.uri));
    Ok(())
}

/// `pipeline score`: score with a fitted model, one shard or all.
fn score(a: &crate::cli::ScoreArgs, ctx: &Context) -> Result<()> {
    let (config, ctx) = load(&a.config, ctx)?;
    let uri = a
        .model
        .clone()
        .or_else(|| (!config.model.uri.is_empty()).then(|| config.model.uri.clone()))
        .ok_or_else(|| {
            Error::Usage(
                "score needs a fitted model: pass --model models/<model_id>/ or set model.uri"
                    .into(),
            )
        })?;
    let shard = match (a.shard, a.shards) {
        (Some(s), _) => Some(s),
        (None, Some(n)) => Some(shard_from_env(n)?),
        (None, None) => None,
    };
    let summary = pipeline::run(&ctx, &config, ModelSource::Load(uri), "score", shard)?;
    print_run(&summary);
    Ok(())
}

/// `pipeline commit`: publish a sharded run whose shards have all staged.
fn commit(a: &crate::cli::CommitArgs, ctx: &Context) -> Result<()> {
    let sink = crate::io::storage::Storage::open(&a.sink, &ctx.io)?;
    let missing = pipeline::shards::missing(&sink, &a.run_id, a.shards)?;
    if !missing.is_empty() {
        return Err(Error::InputMissing {
            uri: sink.display(&format!("_staging/{}/shards", a.run_id)),
            hint: format!(
                "shards {missing:?} of {} have not staged their rows; run them first",
                a.shards
            ),
        });
    }
    match pipeline::shards::try_commit(&sink, &ctx.io, &a.run_id, a.shards, None, true, None)? {
        pipeline::shards::CommitOutcome::Published(m, committed) => out(format_args!(
            "committed run {}: {} images scored, {} anomalies; manifest {}\n",
            m.run_id,
            m.rows.scored,
            m.rows.anomalies,
            sink.display(&committed.manifest)
        )),
        _ => {
            return Err(Error::InputMissing {
                uri: sink.display(&format!("_staging/{}/shards", a.run_id)),
                hint: "the shard records vanished while committing: another worker published the run; check runs/<run-id>/_SUCCESS".into(),
            });
        }
    }
    Ok(())
}

/// `pipeline schema`: the TOML reference, printed or written with the JSON Schema and the
/// tables' reference.
fn schema(a: &crate::cli::SchemaArgs) -> Result<()> {
    match &a.out_dir {
        Some(dir) => {
            std::fs::create_dir_all(dir).map_err(|e| crate::error::from_io(dir, e))?;
            for (name, text) in [
                ("pipeline.schema.json", reference::json_schema_text()),
                ("pipeline-toml.md", reference::markdown()),
                ("tables.json", reference::tables_json_text()),
            ] {
                let path = format!("{}/{name}", dir.trim_end_matches('/'));
                std::fs::write(&path, text).map_err(|e| crate::error::from_io(&path, e))?;
                out(format_args!("wrote {path}\n"));
            }
        }
        None => out(format_args!("{}", reference::markdown())),
    }
    Ok(())
}

/// Loads the pipeline file, and the context whose stores use its `[storage]` settings.
fn load(a: &ConfigArgs, ctx: &Context) -> Result<(PipelineConfig, Context)> {
    let config = config::load_file(
        &a.file,
        &LoadOptions {
            overrides: a.overrides.clone(),
            run_id: a.run_id.clone(),
        },
    )?;
    let ctx = ctx.for_config(&config);
    Ok((config, ctx))
}

fn validate(a: &ConfigArgs, ctx: &Context) -> Result<()> {
    let (config, ctx) = load(a, ctx)?;
    let source = Source::open(&config.source.uri, &ctx.io)?;
    let decoders = read::decoders(&source, &config.source, None)?;
    let shape = decoders
        .iter()
        .find_map(|d| d.fixed_shape())
        .map(|s| s.to_string())
        .unwrap_or_else(|| "per row".into());
    if !config.model.uri.is_empty() {
        artifact::load_set(&config.model.uri, &ctx.io)?;
    }
    out(format_args!(
        "{} is valid: source {} ({} files, {} rows, images {shape}), model {}, sink {}\n",
        a.file,
        config.source.uri,
        source.files().len(),
        source.total_rows(),
        if config.model.uri.is_empty() {
            config.model.spec.name().to_string()
        } else {
            config.model.uri.clone()
        },
        config.sink.uri
    ));
    Ok(())
}

/// Shard `JOB_COMPLETION_INDEX` of `count`, as a Kubernetes Indexed Job names it.
fn shard_from_env(count: u32) -> Result<crate::io::source::Shard> {
    let index = std::env::var("JOB_COMPLETION_INDEX").map_err(|_| {
        Error::Usage(
            "--shards N needs JOB_COMPLETION_INDEX (set by an Indexed Job), or use --shard I/N"
                .into(),
        )
    })?;
    crate::io::source::Shard::parse(&format!("{index}/{count}"))
        .map_err(|e| Error::Usage(e.to_string()))
}

fn print_run(s: &RunSummary) {
    let m = &s.manifest;
    if !s.waiting_for.is_empty() {
        out(format_args!(
            "run {}: this shard staged {} images ({} anomalies); waiting for shards {:?}, the last of which publishes the run\n",
            m.run_id, m.rows.scored, m.rows.anomalies, s.waiting_for
        ));
        return;
    }
    if s.manifest_path.is_empty() {
        out(format_args!(
            "run {}: every shard has staged and another worker is publishing the run (or has published it); if none is running and runs/{}/_SUCCESS is absent, publish with `pipeline commit {} --run-id {} --shards N`\n",
            m.run_id, m.run_id, s.sink, m.run_id
        ));
        return;
    }
    let sink = s.sink.trim_end_matches('/');
    let tables = |name: &str| m.tables.get(name).map(|f| f.len()).unwrap_or_default();
    out(format_args!(
        "run {} of pipeline {:?}: {} images scored, {} anomalies ({}), {} rows rejected\n\
         results under {sink}/:\n  \
         scores     {sink}/scores/      ({} file(s), one row per image)\n  \
         anomalies  {sink}/anomalies/   ({} file(s), flagged images with per-pixel maps)\n  \
         rejects    {sink}/rejects/     ({} file(s))\n  \
         model      {}\n  \
         history    {sink}/history/     (one row per run: quantiles, drift)\n  \
         manifest   {sink}/{}\n\
         read them: {}\n",
        m.run_id,
        m.pipeline,
        m.rows.scored,
        m.rows.anomalies,
        match &m.threshold {
            Some(t) => format!("threshold {:.3} nats", t.value),
            None => format!(
                "{} partitions, each with its own threshold",
                m.partitions.len()
            ),
        },
        m.rows.rejected,
        tables("scores"),
        tables("anomalies"),
        tables("rejects"),
        s.model_uri,
        s.manifest_path,
        match m.config.sink.format {
            crate::config::SinkFormat::Parquet => format!(
                "duckdb -c \"SELECT id, score, is_anomaly FROM read_parquet('{sink}/scores/*.parquet') WHERE run_id = '{}' ORDER BY score DESC LIMIT 10\"",
                m.run_id
            ),
            crate::config::SinkFormat::Delta => format!(
                "python3 -c \"from deltalake import DeltaTable; print(DeltaTable('{sink}/scores').to_pyarrow_table().num_rows)\"  (Delta tables: read with a Delta reader, not a glob)"
            ),
        },
    ));
}

/// Prints to stdout; a closed pipe (`pipeline … | head`) is not an error.
fn out(args: std::fmt::Arguments<'_>) {
    let _ = std::io::stdout().lock().write_fmt(args);
}
