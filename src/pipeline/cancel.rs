//! Stopping cleanly on SIGTERM (a pod being evicted or a job's deadline) and SIGINT (Ctrl-C).
//!
//! The signal only sets a flag; the stages look at it between batches and training steps and
//! end with [`Error::Interrupted`] (exit 75, retriable), which takes the ordinary failure path:
//! staged files are removed and nothing is published. A commit that has begun is finished
//! rather than abandoned half-way, since it takes milliseconds and a rerun would repeat it anyway.

use std::sync::atomic::{AtomicU8, Ordering};

use tokio::runtime::Handle;

use crate::error::{Error, Result};

/// 0: no signal; otherwise the signal's number.
static RECEIVED: AtomicU8 = AtomicU8::new(0);

/// Starts listening for SIGTERM and SIGINT on the IO runtime. Call once, early.
pub fn install(rt: &Handle) {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        for (kind, number) in [
            (SignalKind::terminate(), 15u8),
            (SignalKind::interrupt(), 2u8),
        ] {
            let _guard = rt.enter();
            let Ok(mut stream) = signal(kind) else {
                tracing::warn!(signal = number, "Could not listen for a signal.");
                continue;
            };
            rt.spawn(async move {
                if stream.recv().await.is_some() {
                    RECEIVED.store(number, Ordering::SeqCst);
                    tracing::warn!(
                        signal = name(number),
                        "Stopping at the next batch; nothing of this run will be published."
                    );
                }
            });
        }
    }
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    RECEIVED.load(Ordering::Relaxed) != 0
}

/// `Err(Error::Interrupted)` once a stop was asked for.
pub fn check() -> Result<()> {
    match RECEIVED.load(Ordering::Relaxed) {
        0 => Ok(()),
        n => Err(Error::Interrupted {
            signal: name(n).to_string(),
        }),
    }
}

fn name(number: u8) -> &'static str {
    match number {
        15 => "SIGTERM",
        2 => "SIGINT",
        _ => "a signal",
    }
}
