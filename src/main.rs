//! `pipeline`: parse the command line, set up logging and the IO runtime, run the command, and
//! map its error to an exit code (DESIGN.md). No error ends in a panic message or backtrace.

use std::process::ExitCode;

use anomaly_pipeline::cli::{Cli, LogFormat};
use anomaly_pipeline::error::Error;
use anomaly_pipeline::kernels::{ISA_VAR, Isa};
use anomaly_pipeline::pipeline::Context;
use anomaly_pipeline::{commands, logging};
use clap::Parser;

/// mimalloc instead of glibc's malloc: with glibc, peak memory crept up with the number of images
/// scored (its mmap threshold rises after large frees, and later batch-sized buffers then
/// fragment the heap arenas): 224 MB after 200,000 images, 311 MB after 2,000,000, and runs took
/// 13–18% longer. With mimalloc the 2M run's peak is 1.11× the 200k run's (scripts/scale.py).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            // --help and --version are successes; anything else is a usage error.
            return ExitCode::from(if e.use_stderr() { 64 } else { 0 });
        }
    };
    let human = logging::init(cli.log_format, cli.verbose, cli.quiet);
    std::panic::set_hook(Box::new(|info| {
        if anomaly_pipeline::caught_panic::is_caught() {
            // Reported by the code that caught it, as the error it stands for.
            tracing::debug!(panic = %info, "A guarded call panicked.");
        } else {
            tracing::error!(panic = %info, "Internal error.");
        }
    }));
    let result = std::panic::catch_unwind(|| {
        // Before any kernel runs: a forced instruction set the CPU lacks is refused here.
        Isa::from_env().map_err(|e| Error::setting(ISA_VAR, e.to_string()))?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pipeline-io")
            .enable_all()
            .build()
            .map_err(|e| Error::internal(e, "starting the IO runtime"))?;
        anomaly_pipeline::pipeline::cancel::install(rt.handle());
        let ctx = Context {
            io: anomaly_pipeline::io::storage::Io::new(rt.handle().clone()),
            progress: human,
        };
        let result = commands::dispatch(&cli.command, &ctx);
        rt.shutdown_background();
        result
    })
    .unwrap_or_else(|panic| {
        let what = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        Err(Error::Internal(what.to_string()))
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let code = e.exit_code();
            let message = e.chain();
            if cli.log_format == LogFormat::Json || !human {
                tracing::error!(exit_code = code, error = %message, "Failed.");
            }
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}
