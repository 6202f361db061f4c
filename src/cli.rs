//! The command line (DESIGN.md "CLI"): clap definitions only; `commands` carries them out.

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Learns what normal images look like (an explicit density model p(x)) and flags the ones
/// that are not: per-image log-likelihood scores, anomaly flags and per-pixel maps, written as
/// Parquet tables.
///
/// Exit codes: 0 success (anomalies found is still success), 64 usage, 65 bad input data,
/// 66 no input files, 70 internal error, 74 I/O error, 75 transient storage failure (retry),
/// 77 permission denied, 78 configuration error.
#[derive(Debug, Parser)]
#[command(name = "pipeline", version, max_term_width = 100)]
pub struct Cli {
    /// Log format: `human` on a terminal, `json` (one object per line) otherwise.
    #[arg(long, value_enum, default_value_t = LogFormat::Auto, global = true)]
    pub log_format: LogFormat,

    /// More detail in the logs (-v debug, -vv trace); `PIPELINE_LOG` takes a full filter.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Only warnings and errors in the logs.
    #[arg(short, long, global = true)]
    pub quiet: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// `human` when stderr is a terminal, else `json`.
    Auto,
    /// Readable lines, with progress bars on a terminal.
    Human,
    /// JSON lines, for log collectors.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Fit (or load) the model, score the source, and write the tables: the nightly job.
    Run(RunArgs),
    /// Fit the model on the source and write models/<model_id>/ under the sink.
    Fit(ConfigArgs),
    /// Score the source with a fitted model and write the tables.
    Score(ScoreArgs),
    /// Check a pipeline file (every problem at once) and that its source is readable.
    Validate(ConfigArgs),
    /// Show a Parquet source's schema, row count, image shape and pixel statistics.
    Inspect(InspectArgs),
    /// Draw images from a fitted model into a PNG grid.
    Sample(SampleArgs),
    /// Write the pipeline TOML reference (JSON Schema and Markdown).
    Schema(SchemaArgs),
    /// Measure how well a run's scores and flags match known labels (AUROC, AUPRC, precision,
    /// recall, F1, realised FDR).
    Evaluate(EvaluateArgs),
    /// Write one self-contained HTML report of a run: score histogram with the threshold,
    /// counts per group, and the top anomalies beside their per-pixel heat maps.
    Report(ReportArgs),
    /// Query a sink's tables (`scores`, `anomalies`, `rejects`) with SQL (polars dialect), e.g.
    /// `pipeline query --sink out/demo "SELECT run_id, count(*) FROM scores GROUP BY run_id"`.
    Query(QueryArgs),
    /// Publish a sharded run whose shards have all staged (when no worker could).
    Commit(CommitArgs),
    /// Measure a model's training and scoring speed (`nade`, `rnade` or `pixelrnn`): fast
    /// kernels on every instruction set this CPU has, against the naive reference, the
    /// machine's SGEMM rate and (PixelRNN) PyTorch, all in this run.
    Bench(BenchArgs),
}

/// A pipeline file and its overrides.
#[derive(Debug, Args)]
pub struct ConfigArgs {
    /// The pipeline TOML file.
    pub file: String,

    /// Override a key of the file, e.g. `--set model.alpha=0.5` (repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub overrides: Vec<String>,

    /// The run's id (overrides `pipeline.run_id`); a rerun with the same id replaces its rows.
    #[arg(long, value_name = "ID")]
    pub run_id: Option<String>,
}

/// `pipeline run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The pipeline file and overrides.
    #[command(flatten)]
    pub config: ConfigArgs,
}

/// `pipeline score`.
#[derive(Debug, Args)]
pub struct ScoreArgs {
    /// The pipeline file and overrides.
    #[command(flatten)]
    pub config: ConfigArgs,

    /// The fitted model: a models/<model_id>/ directory (default: `model.uri` in the file).
    #[arg(long, value_name = "URI")]
    pub model: Option<String>,

    /// Score only shard I of N (row groups I, I+N, I+2N, …); the last shard to finish
    /// publishes the run. E.g. `--shard 0/4`.
    #[arg(long, value_name = "I/N", value_parser = crate::io::source::Shard::parse, conflicts_with = "shards")]
    pub shard: Option<crate::io::source::Shard>,

    /// Score one of N shards, the one named by `JOB_COMPLETION_INDEX` (a Kubernetes Indexed
    /// Job's pod index).
    #[arg(long, value_name = "N")]
    pub shards: Option<u32>,
}

/// `pipeline inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// A Parquet file, directory or glob.
    pub uri: String,

    /// The image column.
    #[arg(long, default_value = "image")]
    pub image_column: String,

    /// The id column (default `id`; without one, rows are numbered).
    #[arg(long)]
    pub id_column: Option<String>,

    /// Image shape for list or binary columns, e.g. `28,28` or `32,32,3`.
    #[arg(long, value_delimiter = ',')]
    pub shape: Vec<usize>,

    /// Rows to decode for the pixel statistics.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,

    /// Draw the first `-n` images into this PNG.
    #[arg(long, value_name = "PNG")]
    pub out: Option<String>,

    /// How many images to draw with `--out`.
    #[arg(short = 'n', long, default_value_t = 16)]
    pub count: usize,
}

/// `pipeline sample`.
#[derive(Debug, Args)]
pub struct SampleArgs {
    /// The fitted model: a models/<model_id>/ directory.
    pub model: String,

    /// How many images to draw.
    #[arg(short = 'n', long, default_value_t = 64)]
    pub count: usize,

    /// The PNG file to write.
    #[arg(long, value_name = "PNG")]
    pub out: String,

    /// Random seed; the same seed draws the same images.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,

    /// Each pixel is drawn as a scale×scale block.
    #[arg(long, default_value_t = 2)]
    pub scale: usize,
}

/// `pipeline evaluate`.
#[derive(Debug, Args)]
pub struct EvaluateArgs {
    /// The scores table: a sink's `scores/` directory, a Parquet file or a glob.
    pub scores: String,

    /// The column with the true label (pass it through with `source.passthrough`).
    #[arg(long)]
    pub label_column: String,

    /// A label value of normal images (repeatable); every other value is an anomaly.
    #[arg(long = "normal", value_name = "VALUE", required = true)]
    pub normal: Vec<String>,

    /// Only this run's rows (needed when the table holds several runs).
    #[arg(long)]
    pub run_id: Option<String>,

    /// Also evaluate each value of this column on its own, e.g. `camera_id`.
    #[arg(long, value_name = "COLUMN")]
    pub by: Option<String>,

    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pipeline report`.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The sink the run wrote to (`sink.uri`).
    pub sink: String,

    /// The run to report on (default: the most recently finished run in the sink).
    #[arg(long)]
    pub run_id: Option<String>,

    /// The HTML file to write.
    #[arg(long, value_name = "HTML")]
    pub out: String,

    /// How many of the most anomalous images to draw.
    #[arg(long, default_value_t = 24)]
    pub top: usize,

    /// Count images per value of this column of the scores table (default: by `model_id`).
    #[arg(long, value_name = "COLUMN")]
    pub by: Option<String>,
}

/// `pipeline query`.
#[derive(Debug, Args)]
#[command(
    after_help = "Printed results show the first and last rows of a long result; \
    set POLARS_FMT_MAX_ROWS (and POLARS_FMT_MAX_COLS) to show more, or write every row with --out."
)]
pub struct QueryArgs {
    /// The SQL query. Tables: `scores` (one row per image), `anomalies` (flagged images with
    /// per-pixel maps) and `rejects` (rows that could not be used), each over every run the
    /// sink holds (filter on `run_id`).
    pub sql: String,

    /// The sink to query (`sink.uri` of the pipeline): a path or an s3://, gs://, az:// URI.
    #[arg(long, value_name = "URI", env = "PIPELINE_SINK")]
    pub sink: String,

    /// Write the result to this .parquet or .csv file (a path or URI) instead of printing it.
    #[arg(long, value_name = "FILE")]
    pub out: Option<String>,
}

/// `pipeline commit`.
#[derive(Debug, Args)]
pub struct CommitArgs {
    /// The sink the shards wrote to (`sink.uri`).
    pub sink: String,

    /// The run to publish.
    #[arg(long)]
    pub run_id: String,

    /// How many shards the run was split into.
    #[arg(long, value_name = "N")]
    pub shards: u32,
}

/// `pipeline bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Images to measure on: a Parquet file, directory or glob (for NADE binarized
    /// stochastically, seed 0). The bundled MNIST digits by default.
    #[arg(long, default_value = "data/demo/digits.parquet")]
    pub data: String,

    /// The image column of `--data`.
    #[arg(long, default_value = "image")]
    pub image_column: String,

    /// Image shape for list or binary columns, e.g. `28,28`.
    #[arg(long, value_delimiter = ',')]
    pub shape: Vec<usize>,

    /// The model measured: `nade` (binary pixels, binarized stochastically), `rnade` (8-bit
    /// intensities) or `pixelrnn` (binary, both architectures unless `--architecture`).
    #[arg(long, default_value = "nade", value_parser = ["nade", "rnade", "pixelrnn"])]
    pub model: String,

    /// Hidden units of the model measured (default: 500 for NADE and RNADE; 16 LSTM units for
    /// PixelRNN, its default).
    #[arg(long)]
    pub hidden: Option<usize>,

    /// PixelRNN's recurrent layers.
    #[arg(long, default_value_t = 7)]
    pub layers: usize,

    /// PixelRNN's architecture: `row_lstm` or `diagonal_bilstm` (default: both, one after the
    /// other).
    #[arg(long, value_parser = ["row_lstm", "diagonal_bilstm"])]
    pub architecture: Option<String>,

    /// PixelRNN on 8-bit sub-pixels (a 256-way softmax per channel, any number of channels)
    /// instead of binarized pixels; without the PyTorch comparison, which is binary.
    #[arg(long)]
    pub eight_bit: bool,

    /// Images per training step.
    #[arg(long, default_value_t = 100)]
    pub batch: usize,

    /// Python interpreter for the PyTorch comparison of `--model pixelrnn` (skipped, with a
    /// note, when it has no torch).
    #[arg(long, default_value = "python3")]
    pub python: String,

    /// Mixture components of `--model rnade`.
    #[arg(long, default_value_t = 10)]
    pub components: usize,

    /// At most this many images are used for the fast kernels.
    #[arg(long, default_value_t = 2000)]
    pub images: usize,

    /// Images the (slow) naive reference is timed on.
    #[arg(long, default_value_t = 48)]
    pub reference_images: usize,

    /// Timed repetitions of each measurement; the median is reported.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,

    /// Also write the figures as JSON to this file (for `--model pixelrnn`, an array with one
    /// object per architecture).
    #[arg(long, value_name = "FILE")]
    pub json: Option<String>,
}

/// `pipeline schema`.
#[derive(Debug, Args)]
pub struct SchemaArgs {
    /// Write `pipeline.schema.json` and `pipeline-toml.md` here instead of printing the
    /// Markdown.
    #[arg(long, value_name = "DIR")]
    pub out_dir: Option<String>,
}
