//! Logs on stderr: readable lines on a terminal, JSON lines for collectors.

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

use crate::cli::LogFormat;

/// Installs the global subscriber and says whether the output is for a person (so progress
/// bars may be drawn). `PIPELINE_LOG` (an `EnvFilter` directive) overrides the level flags.
pub fn init(format: LogFormat, verbose: u8, quiet: bool) -> bool {
    let terminal = std::io::stderr().is_terminal();
    let human = match format {
        LogFormat::Auto => terminal,
        LogFormat::Human => true,
        LogFormat::Json => false,
    };
    let level = match (quiet, verbose) {
        (true, _) => "warn",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_env("PIPELINE_LOG")
        .unwrap_or_else(|_| EnvFilter::new(format!(
            "{level},parquet=warn,object_store=warn,delta_kernel=warn,delta_kernel_default_engine=warn"
        )));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if human {
        builder.with_ansi(terminal).with_target(false).init();
    } else {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    }
    human && terminal
}
