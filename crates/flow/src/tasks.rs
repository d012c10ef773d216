//! Tracked tasks: where async cleanup runs, and what shutdown waits for.
//!
//! Rust has no async drop. When a future is cancelled (dropped), its `Drop` impls run, but they
//! cannot `.await`: they cannot write a final record to a database or close a connection
//! gracefully. Python's `except CancelledError: await cleanup(); raise` has no direct Rust form.
//!
//! The form this project uses: work that needs async cleanup holds a [`CleanupGuard`], made by
//! [`Tasks::on_drop`]. If the work ends normally it runs the cleanup itself
//! ([`CleanupGuard::run`]) or waives it ([`CleanupGuard::disarm`]); if the work is dropped
//! instead, the guard's `Drop` hands the cleanup future to a tracked task. Either way it runs
//! exactly once, and because every task is tracked by one [`Tasks`], shutdown can wait for all
//! cleanup (and all [shielded](crate::shield) work) with a bound: [`Tasks::shutdown`].
//!
//! ```
//! use std::time::Duration;
//! use sluice_flow::{Drained, Tasks};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let tasks = Tasks::new();
//! let work = {
//!     let guard = tasks.on_drop(|| async { /* e.g. write the final status */ });
//!     async move {
//!         let _guard = guard; // dropped with the work if the work is cancelled
//!         std::future::pending::<()>().await
//!     }
//! };
//! drop(work); // cancelled: the guard's cleanup is handed to a tracked task
//! assert_eq!(tasks.shutdown(Duration::from_secs(1)).await, Drained::Complete);
//! # }
//! ```

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::task::JoinHandle;
use tokio_util::task::TaskTracker;

/// A boxed cleanup future.
type Job = Pin<Box<dyn Future<Output = ()> + Send + 'static>>;

/// What a guard holds until its cleanup is needed: the maker of the cleanup future.
type MakeJob = Box<dyn FnOnce() -> Job + Send + 'static>;

/// A set of tracked tasks, cheap to clone (clones share the set).
///
/// Everything this project spawns that must finish before the process exits goes through a
/// `Tasks`: cleanup handed over by [`CleanupGuard`]s, [shielded](Tasks::shield) jobs, and any
/// other work spawned with [`Tasks::spawn`].
#[derive(Clone, Debug)]
pub struct Tasks {
    tracker: TaskTracker,
    handle: Handle,
}

impl Tasks {
    /// A new, empty set on the current tokio runtime.
    ///
    /// # Panics
    /// Outside a tokio runtime (a programming error, not an input error); use
    /// [`Tasks::with_handle`] there.
    pub fn new() -> Self {
        Self::with_handle(Handle::current())
    }

    /// A new, empty set whose tasks run on `handle`'s runtime. Guards dropped outside any runtime
    /// still spawn their cleanup there.
    pub fn with_handle(handle: Handle) -> Self {
        Self {
            tracker: TaskTracker::new(),
            handle,
        }
    }

    /// Spawns a tracked task.
    pub fn spawn<F>(&self, fut: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn_on(fut, &self.handle)
    }

    /// A guard that runs the future `cleanup` makes exactly once: when
    /// [`run`](CleanupGuard::run), or, if the guard is dropped un-run and un-disarmed, in a
    /// tracked task. `cleanup` is called only then (a disarmed guard never calls it).
    pub fn on_drop<C, F>(&self, cleanup: C) -> CleanupGuard
    where
        C: FnOnce() -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        CleanupGuard {
            job: Some(Box::new(move || -> Job { Box::pin(cleanup()) })),
            tasks: self.clone(),
        }
    }

    /// How many tracked tasks are still running.
    pub fn len(&self) -> usize {
        self.tracker.len()
    }

    /// Whether no tracked task is running.
    pub fn is_empty(&self) -> bool {
        self.tracker.is_empty()
    }

    /// Waits for every tracked task to finish, for at most `bound`. Tasks spawned while waiting
    /// (cleanup handed over late) are waited for too. Tasks still running at the bound are left
    /// running and counted in the result.
    pub async fn shutdown(&self, bound: Duration) -> Drained {
        self.tracker.close();
        match crate::timeout(bound, self.tracker.wait()).await {
            crate::Timed::Completed(()) => Drained::Complete,
            crate::Timed::Expired(_) => Drained::TimedOut {
                still_running: self.tracker.len(),
            },
        }
    }
}

impl Default for Tasks {
    /// The same as [`Tasks::new`] (and, like it, only inside a tokio runtime).
    fn default() -> Self {
        Self::new()
    }
}

/// The result of [`Tasks::shutdown`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "a shutdown that left work unfinished must be reported"]
pub enum Drained {
    /// Every tracked task finished.
    Complete,
    /// The bound passed with tasks still running.
    TimedOut {
        /// How many were still running.
        still_running: usize,
    },
}

/// Runs an async cleanup exactly once, even if the work holding it is dropped.
/// Made by [`Tasks::on_drop`].
#[must_use = "dropping the guard at once runs the cleanup at once"]
pub struct CleanupGuard {
    job: Option<MakeJob>,
    tasks: Tasks,
}

impl CleanupGuard {
    /// Runs the cleanup now and waits for it. The cleanup runs in a tracked task, so if this call
    /// is itself cancelled the cleanup still finishes.
    pub async fn run(mut self) {
        if let Some(job) = self.job.take() {
            // A JoinError here means the cleanup panicked or the runtime is shutting down; the
            // guard has done what it can either way, and the panic is tokio's to report.
            let _ = self.tasks.spawn(job()).await;
        }
    }

    /// Gives up the cleanup: it will not run.
    pub fn disarm(mut self) {
        self.job = None;
    }
}

impl Drop for CleanupGuard {
    fn drop(&mut self) {
        if let Some(job) = self.job.take() {
            self.tasks.spawn(job());
        }
    }
}

impl std::fmt::Debug for CleanupGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CleanupGuard")
            .field("armed", &self.job.is_some())
            .finish()
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    fn counting(count: &Arc<AtomicUsize>, delay: Duration) -> impl Future<Output = ()> + Send {
        let count = count.clone();
        async move {
            tokio::time::sleep(delay).await;
            count.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// A guard's cleanup: `counting`, made only when the guard needs it.
    fn cleanup(
        count: &Arc<AtomicUsize>,
        delay: Duration,
    ) -> impl FnOnce() -> Pin<Box<dyn Future<Output = ()> + Send>> + Send + 'static {
        let count = count.clone();
        move || Box::pin(counting(&count, delay))
    }

    #[tokio::test(start_paused = true)]
    async fn dropped_guard_runs_cleanup_once_and_shutdown_waits_for_it() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let guard = tasks.on_drop(cleanup(&ran, Duration::from_millis(200)));
        let work = tokio::spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
        });
        tokio::task::yield_now().await;
        work.abort();
        let _ = work.await;
        assert_eq!(
            ran.load(Ordering::SeqCst),
            0,
            "cleanup is async, not yet done"
        );
        assert_eq!(tasks.len(), 1);
        assert_eq!(
            tasks.shutdown(Duration::from_secs(1)).await,
            Drained::Complete
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn run_runs_once_and_drop_after_run_does_nothing() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        tasks
            .on_drop(cleanup(&ran, Duration::from_millis(10)))
            .run()
            .await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
        assert_eq!(
            tasks.shutdown(Duration::from_secs(1)).await,
            Drained::Complete
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cleanup_survives_cancelling_its_runner() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        let guard = tasks.on_drop(cleanup(&ran, Duration::from_millis(100)));
        // Cancel the caller of run() halfway through the cleanup.
        let _ = tokio::time::timeout(Duration::from_millis(10), guard.run()).await;
        assert_eq!(
            tasks.shutdown(Duration::from_secs(1)).await,
            Drained::Complete
        );
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn disarmed_guard_never_runs() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        tasks.on_drop(cleanup(&ran, Duration::ZERO)).disarm();
        // The cleanup is not even made until it is needed.
        let made = Arc::new(AtomicUsize::new(0));
        let guard = tasks.on_drop({
            let made = made.clone();
            move || {
                made.fetch_add(1, Ordering::SeqCst);
                async {}
            }
        });
        assert_eq!(made.load(Ordering::SeqCst), 0);
        guard.disarm();
        assert_eq!(
            tasks.shutdown(Duration::from_secs(1)).await,
            Drained::Complete
        );
        assert_eq!(ran.load(Ordering::SeqCst), 0);
        assert_eq!(made.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_is_bounded_and_counts_what_is_left() {
        let tasks = Tasks::new();
        let ran = Arc::new(AtomicUsize::new(0));
        tasks.spawn(counting(&ran, Duration::from_secs(60)));
        tasks.spawn(counting(&ran, Duration::from_millis(10)));
        let drained = tasks.shutdown(Duration::from_secs(1)).await;
        assert_eq!(drained, Drained::TimedOut { still_running: 1 });
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn guard_dropped_outside_the_runtime_still_cleans_up() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime");
        let tasks = Tasks::with_handle(rt.handle().clone());
        let ran = Arc::new(AtomicUsize::new(0));
        drop(tasks.on_drop(cleanup(&ran, Duration::ZERO)));
        let drained = rt.block_on(tasks.shutdown(Duration::from_secs(5)));
        assert_eq!(drained, Drained::Complete);
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
