//! Shield: work that must finish even if its caller is cancelled.
//!
//! Python's `asyncio.shield(task)` lets the outer task be cancelled while the inner one keeps
//! running. In Rust the caller's future can be dropped at any `.await`, so a write that must land
//! (the gateway's final transcript status) cannot simply be awaited inline. [`Tasks::shield`]
//! spawns the work as a tracked task and returns a [`Shielded`] handle: awaiting it gives the
//! result; dropping it (because the caller was cancelled) leaves the work running; and
//! [`Tasks::shutdown`] waits for it.
//!
//! ```
//! use std::time::Duration;
//! use sluice_flow::{CancelCause, CancelToken, Cancellable, Tasks};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let tasks = Tasks::new();
//! let outer = CancelToken::new();
//! outer.cancel(CancelCause::Requested);
//! let mut save = tasks.shield(async { "checkpoint" });
//! // The caller is cancelled while waiting...
//! assert!(outer.run(&mut save).await.is_cancelled());
//! // ...but the shielded work still finishes, and its result can be had.
//! assert_eq!(save.await.unwrap(), "checkpoint");
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::task::JoinHandle;

use crate::tasks::Tasks;

impl Tasks {
    /// Runs `fut` in a tracked task that the caller's cancellation cannot stop. Await the returned
    /// handle for the result, or drop it: the work goes on, and [`Tasks::shutdown`] waits for it.
    pub fn shield<F>(&self, fut: F) -> Shielded<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        Shielded {
            handle: self.spawn(fut),
        }
    }
}

/// A handle to [shielded](Tasks::shield) work. `Unpin`, so `&mut Shielded` can be awaited (and
/// the wait cancelled) without losing the handle.
#[derive(Debug)]
#[must_use = "dropping the handle leaves the work running; await it to get the result"]
pub struct Shielded<T> {
    handle: JoinHandle<T>,
}

impl<T> Shielded<T> {
    /// Whether the shielded work has finished.
    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }
}

impl<T> Future for Shielded<T> {
    type Output = Result<T, ShieldError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.handle).poll(cx).map(|joined| {
            joined.map_err(|e| {
                if e.is_panic() {
                    ShieldError::Panicked
                } else {
                    ShieldError::RuntimeGone
                }
            })
        })
    }
}

/// Why shielded work gave no result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ShieldError {
    /// The work panicked.
    #[error("shielded work panicked")]
    Panicked,
    /// The runtime shut down before the work finished.
    #[error("the runtime shut down before the shielded work finished")]
    RuntimeGone,
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;
    use crate::{CancelCause, CancelToken, Cancellable, Drained};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn result_is_obtained_after_the_caller_is_cancelled() {
        let tasks = Tasks::new();
        let outer = CancelToken::new();
        let canceller = outer.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            canceller.cancel(CancelCause::Requested);
        });
        let mut job = tasks.shield(async {
            tokio::time::sleep(Duration::from_millis(500)).await;
            "checkpoint"
        });
        let started = tokio::time::Instant::now();
        let first = outer.run(&mut job).await;
        assert_eq!(first, Cancellable::Cancelled(CancelCause::Requested));
        assert_eq!(started.elapsed(), Duration::from_millis(100));
        assert!(!job.is_finished());
        assert_eq!(job.await, Ok("checkpoint"));
        assert_eq!(started.elapsed(), Duration::from_millis(500));
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_handle_leaves_work_running_and_shutdown_waits() {
        let tasks = Tasks::new();
        let saved = Arc::new(AtomicBool::new(false));
        let flag = saved.clone();
        let caller = tokio::spawn({
            let tasks = tasks.clone();
            async move {
                let job = tasks.shield(async move {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                    flag.store(true, Ordering::SeqCst);
                });
                job.await
            }
        });
        tokio::task::yield_now().await;
        caller.abort(); // the caller dies; its handle is dropped
        assert!(caller.await.is_err_and(|e| e.is_cancelled()));
        assert!(!saved.load(Ordering::SeqCst));
        assert_eq!(
            tasks.shutdown(Duration::from_secs(1)).await,
            Drained::Complete
        );
        assert!(saved.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_panic_is_an_error_not_a_value() {
        let tasks = Tasks::new();
        let job = tasks.shield(async {
            if true {
                panic!("boom");
            }
        });
        assert_eq!(job.await, Err(ShieldError::Panicked));
    }
}
