//! Panics that the program catches and reports as errors, told apart from the ones it does not.
//!
//! The process's panic hook logs "Internal error." for a bug. A few third-party calls are
//! guarded instead (the parquet crate panics on some corrupt pages): their panic becomes a data
//! error with exit 65, and logging it as an internal error first would tell the operator the
//! wrong story. Work run under [`catching`] marks its thread while it runs, and the hook asks
//! [`is_caught`].

use std::cell::Cell;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

use futures::FutureExt;

thread_local! {
    static CAUGHT: Cell<bool> = const { Cell::new(false) };
}

/// Whether a panic raised on this thread now will be caught and reported as an error.
pub fn is_caught() -> bool {
    CAUGHT.with(Cell::get)
}

/// Restores the thread's mark when a poll ends, however it ends.
struct Mark(bool);

impl Mark {
    fn set() -> Self {
        Mark(CAUGHT.with(|c| c.replace(true)))
    }
}

impl Drop for Mark {
    fn drop(&mut self) {
        CAUGHT.with(|c| c.set(self.0));
    }
}

/// A future that runs `inner` with its panics caught; see [`catching`].
pub struct Catching<F: Future> {
    inner: Pin<Box<futures::future::CatchUnwind<AssertUnwindSafe<F>>>>,
}

impl<F: Future> Future for Catching<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let _mark = Mark::set();
        self.inner.as_mut().poll(cx)
    }
}

/// Runs `future` catching its panics (as `FutureExt::catch_unwind`), with the threads that poll
/// it marked so the panic hook knows the panic is handled. The caller must turn the panic into
/// an error; `future` must leave no shared state half-changed when it panics.
pub fn catching<F: Future>(future: F) -> Catching<F> {
    Catching {
        inner: Box::pin(AssertUnwindSafe(future).catch_unwind()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marks_the_thread_only_while_the_guarded_work_runs() {
        assert!(!is_caught());
        let seen = futures::executor::block_on(catching(async { is_caught() })).unwrap();
        assert!(seen, "marked inside");
        assert!(!is_caught(), "unmarked after");
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let result = futures::executor::block_on(catching(async {
            if is_caught() {
                panic!("caught");
            }
        }));
        std::panic::set_hook(previous);
        assert!(result.is_err(), "the panic comes back as an error");
        assert!(!is_caught(), "unmarked after a panic");
    }
}
