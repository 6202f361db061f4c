//! Progress bars on a terminal; nothing at all otherwise (logs carry progress in JSON mode).

use indicatif::{ProgressBar, ProgressStyle};

/// A progress bar over rows, or nothing when progress is not shown.
#[derive(Debug)]
pub struct Progress {
    bar: Option<ProgressBar>,
}

impl Progress {
    /// A bar for `total` rows labelled `what`, shown only when `enabled`.
    pub fn new(enabled: bool, total: u64, what: &str) -> Self {
        let bar = enabled.then(|| {
            let bar = ProgressBar::new(total);
            bar.set_style(
                ProgressStyle::with_template(
                    "{msg:>9} [{bar:40}] {human_pos}/{human_len} rows ({percent}%), {elapsed} elapsed, eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            bar.set_message(what.to_string());
            bar
        });
        Self { bar }
    }

    /// A progress that shows nothing.
    pub fn hidden() -> Self {
        Self { bar: None }
    }

    /// Advances by `n` rows.
    pub fn inc(&self, n: u64) {
        if let Some(b) = &self.bar {
            b.inc(n);
        }
    }

    /// Removes the bar from the terminal.
    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
