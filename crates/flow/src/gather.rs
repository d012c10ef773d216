//! Gather and race labelled tasks under one deadline, and say what happened to each.
//!
//! The lesson's exercise: two `slow_fetch` calls under one `asyncio.timeout(1)` with
//! `asyncio.gather`; on `TimeoutError`, print which input caused it, and check that cleanup ran.
//! Python makes "which one" hard: the timeout is one exception for the whole group. Here
//! [`Gather::all`] returns a [`TaskOutcome`] for every task by its label: completed, failed,
//! timed out or cancelled. Tasks still running at the deadline are cancelled and, before `all`
//! returns, dropped and awaited, so their cleanup has run and no task is left behind.
//! [`Gather::race`] returns at the first success, cancels the rest the same way, and reports the
//! losers too.
//!
//! A task made with [`Gather::spawn_with`] receives a [`CancelToken`] and may clean up
//! cooperatively (async) within the [`grace`](Gather::grace) period before it is dropped.
//!
//! ```
//! use std::time::Duration;
//! use sluice_flow::{Deadline, Gather, TaskOutcome};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let mut g = Gather::<_, _, ()>::new();
//! for (name, delay) in [("a", 500), ("b", 2000)] {
//!     g.spawn(name, async move {
//!         tokio::time::sleep(Duration::from_millis(delay)).await;
//!         Ok(format!("{name}-done"))
//!     });
//! }
//! let report = g.all(&Deadline::after(Duration::from_secs(1))).await;
//! assert_eq!(report.tasks[0].outcome, TaskOutcome::Completed("a-done".to_string()));
//! assert_eq!(report.timed_out().collect::<Vec<_>>(), [&"b"]);
//! # }
//! ```

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::time::Duration;

use futures_util::FutureExt;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cancel::{CancelCause, CancelToken};
use crate::deadline::{Deadline, Expired};
use crate::limits::Limit;

/// What became of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TaskOutcome<T, E> {
    /// It returned `Ok`.
    Completed(T),
    /// It returned `Err`.
    Failed(E),
    /// The deadline fired while it was running.
    TimedOut,
    /// It was cancelled for this cause (the gather's token, or it lost a race).
    Cancelled(CancelCause),
    /// It panicked.
    Panicked,
}

/// One task's label, outcome, and when (from the start of the gather) it had that outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskReport<L, T, E> {
    /// The label it was spawned with.
    pub label: L,
    /// What became of it.
    pub outcome: TaskOutcome<T, E>,
    /// From the start of the gather to its outcome.
    pub elapsed: Duration,
}

/// The result of [`Gather::all`] or [`Gather::race`]: every task's report, in spawn order.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "each task's outcome must be looked at; timeouts hide in here"]
pub struct Gathered<L, T, E> {
    /// One report per task, in the order they were spawned.
    pub tasks: Vec<TaskReport<L, T, E>>,
    /// The deadline that fired, if one did.
    pub expired: Option<Expired>,
    /// For a race: the index (in `tasks`) of the winner.
    pub winner: Option<usize>,
}

impl<L, T, E> Gathered<L, T, E> {
    /// The labels of the tasks that timed out.
    pub fn timed_out(&self) -> impl Iterator<Item = &L> {
        self.tasks
            .iter()
            .filter(|t| matches!(t.outcome, TaskOutcome::TimedOut))
            .map(|t| &t.label)
    }

    /// Whether every task completed.
    pub fn all_completed(&self) -> bool {
        self.tasks
            .iter()
            .all(|t| matches!(t.outcome, TaskOutcome::Completed(_)))
    }

    /// For a race: the winner's label and value.
    pub fn into_winner(self) -> Option<(L, T)> {
        let index = self.winner?;
        let report = self.tasks.into_iter().nth(index)?;
        match report.outcome {
            TaskOutcome::Completed(v) => Some((report.label, v)),
            _ => None,
        }
    }
}

/// A task's index and its result (or `Err(())` if it panicked).
type Joined<T, E> = (usize, Result<Result<T, E>, ()>);

/// A group of labelled tasks to run together under one deadline.
pub struct Gather<L, T, E> {
    labels: Vec<L>,
    set: JoinSet<Joined<T, E>>,
    token: CancelToken,
    grace: Duration,
    started: Instant,
}

impl<L, T, E> Default for Gather<L, T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    fn default() -> Self {
        Self::new()
    }
}

impl<L, T, E> Gather<L, T, E>
where
    T: Send + 'static,
    E: Send + 'static,
{
    /// An empty group. Tasks start running as soon as they are spawned.
    pub fn new() -> Self {
        Self::cancelled_by(&CancelToken::new())
    }

    /// An empty group whose tasks are also cancelled (outcome [`TaskOutcome::Cancelled`]) when
    /// `token` is.
    pub fn cancelled_by(token: &CancelToken) -> Self {
        Self {
            labels: Vec::new(),
            set: JoinSet::new(),
            token: token.child(),
            grace: Duration::ZERO,
            started: Instant::now(),
        }
    }

    /// How long cancelled tasks get to finish their own (cooperative) cleanup before they are
    /// dropped. Default zero: dropped at once.
    pub fn grace(mut self, grace: Duration) -> Self {
        self.grace = grace;
        self
    }

    /// Spawns a task.
    pub fn spawn<F>(&mut self, label: L, fut: F)
    where
        F: Future<Output = Result<T, E>> + Send + 'static,
    {
        let index = self.labels.len();
        self.labels.push(label);
        self.set.spawn(async move {
            // A panic becomes an outcome of its own instead of tearing down the gather.
            (
                index,
                AssertUnwindSafe(fut).catch_unwind().await.map_err(|_| ()),
            )
        });
    }

    /// Spawns a task that is handed the group's cancellation token, so it can see why it is being
    /// cancelled and clean up within the [`grace`](Gather::grace) period.
    pub fn spawn_with<F, Fut>(&mut self, label: L, make: F)
    where
        F: FnOnce(CancelToken) -> Fut,
        Fut: Future<Output = Result<T, E>> + Send + 'static,
    {
        let fut = make(self.token.clone());
        self.spawn(label, fut);
    }

    /// Waits for every task, or until `deadline` (or the group's token) stops the rest.
    pub async fn all(self, deadline: &Deadline) -> Gathered<L, T, E> {
        self.run(deadline, false).await
    }

    /// Waits for the first task to complete successfully, then cancels the rest
    /// ([`CancelCause::RaceLost`]). With no success before the deadline, there is no winner.
    pub async fn race(self, deadline: &Deadline) -> Gathered<L, T, E> {
        self.run(deadline, true).await
    }

    async fn run(mut self, deadline: &Deadline, race: bool) -> Gathered<L, T, E> {
        let mut outcomes: Vec<Option<(TaskOutcome<T, E>, Duration)>> =
            self.labels.iter().map(|_| None).collect();
        let mut winner = None;
        let mut expired = None;
        let expiry = deadline.expired();
        tokio::pin!(expiry);

        // Why the tasks still running (if any) are being stopped.
        let stop: Option<(TaskOutcome<T, E>, CancelCause)> = loop {
            let cancelled = self.token.cancelled();
            tokio::select! {
                biased;
                joined = self.set.join_next() => match joined {
                    None => break None,
                    Some(Ok((index, result))) => {
                        let success = matches!(result, Ok(Ok(_)));
                        outcomes[index] = Some((into_outcome(result), self.started.elapsed()));
                        if race && success {
                            winner = Some(index);
                            break Some((
                                TaskOutcome::Cancelled(CancelCause::RaceLost),
                                CancelCause::RaceLost,
                            ));
                        }
                    }
                    // Tasks are only aborted below, after this loop; a join error here means
                    // the runtime is going away. The task's slot stays empty and is reported
                    // as cancelled(shutdown).
                    Some(Err(_)) => {}
                },
                fired = &mut expiry => {
                    expired = Some(fired);
                    break Some((TaskOutcome::TimedOut, CancelCause::Deadline(Limit::Total)));
                }
                cause = cancelled => break Some((TaskOutcome::Cancelled(cause), cause)),
            }
        };

        if let Some((outcome, cause)) = stop {
            // Tell the tasks why; give cooperative ones their grace; then drop the rest and
            // wait until they are gone, so their cleanup has run before we return.
            self.token.cancel(cause);
            let stopped_at = self.started.elapsed();
            if !self.grace.is_zero() {
                // Those still running when the grace ends are aborted just below.
                let _in_time_or_not: crate::Timed<()> = crate::timeout(self.grace, async {
                    while self.set.join_next().await.is_some() {}
                })
                .await;
            }
            self.set.abort_all();
            while self.set.join_next().await.is_some() {}
            for slot in outcomes.iter_mut().filter(|s| s.is_none()) {
                *slot = Some((outcome.clone_empty(), stopped_at));
            }
        }

        let elapsed = self.started.elapsed();
        let tasks = self
            .labels
            .into_iter()
            .zip(outcomes)
            .map(|(label, slot)| {
                let (outcome, elapsed) =
                    slot.unwrap_or((TaskOutcome::Cancelled(CancelCause::Shutdown), elapsed));
                TaskReport {
                    label,
                    outcome,
                    elapsed,
                }
            })
            .collect();
        Gathered {
            tasks,
            expired,
            winner,
        }
    }
}

impl<L, T, E> std::fmt::Debug for Gather<L, T, E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gather")
            .field("tasks", &self.labels.len())
            .field("running", &self.set.len())
            .finish()
    }
}

fn into_outcome<T, E>(result: Result<Result<T, E>, ()>) -> TaskOutcome<T, E> {
    match result {
        Ok(Ok(v)) => TaskOutcome::Completed(v),
        Ok(Err(e)) => TaskOutcome::Failed(e),
        Err(()) => TaskOutcome::Panicked,
    }
}

impl<T, E> TaskOutcome<T, E> {
    /// A copy of an outcome that carries no value (timed out, cancelled, panicked).
    fn clone_empty(&self) -> Self {
        match self {
            TaskOutcome::Cancelled(c) => TaskOutcome::Cancelled(*c),
            TaskOutcome::Panicked => TaskOutcome::Panicked,
            _ => TaskOutcome::TimedOut,
        }
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

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    struct OnDrop(Arc<AtomicUsize>);
    impl Drop for OnDrop {
        fn drop(&mut self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn fetch(
        name: &'static str,
        delay: u64,
        cleanups: &Arc<AtomicUsize>,
    ) -> impl Future<Output = Result<String, String>> + Send + 'static {
        let guard = OnDrop(cleanups.clone());
        async move {
            let _guard = guard;
            tokio::time::sleep(ms(delay)).await;
            Ok(format!("{name}-done"))
        }
    }

    #[tokio::test(start_paused = true)]
    async fn all_complete_in_time() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new();
        g.spawn("a", fetch("a", 500, &cleanups));
        g.spawn("b", fetch("b", 500, &cleanups));
        let r = g.all(&Deadline::after(ms(1000))).await;
        assert!(r.all_completed());
        assert_eq!(r.expired, None);
        assert_eq!(r.tasks[1].outcome, TaskOutcome::Completed("b-done".into()));
        assert_eq!(r.tasks[1].elapsed, ms(500));
        assert_eq!(cleanups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn says_who_timed_out_and_their_cleanup_has_run_on_return() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new();
        g.spawn("fast", fetch("fast", 500, &cleanups));
        g.spawn("slow", fetch("slow", 2000, &cleanups));
        let start = Instant::now();
        let r = g.all(&Deadline::after(ms(1000))).await;
        assert_eq!(start.elapsed(), ms(1000));
        assert_eq!(r.timed_out().collect::<Vec<_>>(), vec![&"slow"]);
        assert_eq!(
            r.tasks[0].outcome,
            TaskOutcome::Completed("fast-done".into())
        );
        assert_eq!(r.tasks[1].elapsed, ms(1000));
        assert!(r.expired.is_some());
        // Both futures were dropped (the slow one by the timeout) before `all` returned.
        assert_eq!(cleanups.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn failures_and_panics_are_outcomes() {
        let mut g = Gather::<_, u32, String>::new();
        g.spawn("err", async { Err("nope".to_string()) });
        g.spawn("panic", async {
            if true {
                panic!("boom");
            }
            Ok(1)
        });
        g.spawn("ok", async { Ok(2) });
        let r = g.all(&Deadline::after(ms(1000))).await;
        assert_eq!(r.tasks[0].outcome, TaskOutcome::Failed("nope".into()));
        assert_eq!(r.tasks[1].outcome, TaskOutcome::Panicked);
        assert_eq!(r.tasks[2].outcome, TaskOutcome::Completed(2));
    }

    #[tokio::test(start_paused = true)]
    async fn cancelling_the_group_says_why() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let token = CancelToken::new();
        let mut g = Gather::cancelled_by(&token);
        g.spawn("a", fetch("a", 5000, &cleanups));
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(100)).await;
            canceller.cancel(CancelCause::ClientDisconnected);
        });
        let r = g.all(&Deadline::after(ms(1000))).await;
        assert_eq!(
            r.tasks[0].outcome,
            TaskOutcome::Cancelled(CancelCause::ClientDisconnected)
        );
        assert_eq!(cleanups.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn cooperative_tasks_get_their_grace_for_async_cleanup() {
        let cleaned = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::<_, (), ()>::new().grace(ms(200));
        let c = cleaned.clone();
        g.spawn_with("coop", move |token| async move {
            let cause = token.cancelled().await;
            assert_eq!(cause, CancelCause::Deadline(Limit::Total));
            tokio::time::sleep(ms(50)).await; // async cleanup
            c.fetch_add(1, Ordering::SeqCst);
            Err(())
        });
        let start = Instant::now();
        let r = g.all(&Deadline::after(ms(100))).await;
        assert_eq!(cleaned.load(Ordering::SeqCst), 1);
        assert_eq!(start.elapsed(), ms(150));
        assert_eq!(r.tasks[0].outcome, TaskOutcome::TimedOut);
    }

    #[tokio::test(start_paused = true)]
    async fn race_first_success_wins_losers_are_reported() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new();
        g.spawn("broken", async { Err("500".to_string()) });
        g.spawn("slow", fetch("slow", 900, &cleanups));
        g.spawn("fast", fetch("fast", 300, &cleanups));
        let r = g.race(&Deadline::after(ms(1000))).await;
        assert_eq!(r.winner, Some(2));
        assert_eq!(r.tasks[0].outcome, TaskOutcome::Failed("500".into()));
        assert_eq!(
            r.tasks[1].outcome,
            TaskOutcome::Cancelled(CancelCause::RaceLost)
        );
        assert_eq!(
            cleanups.load(Ordering::SeqCst),
            2,
            "loser dropped before return"
        );
        assert_eq!(r.into_winner(), Some(("fast", "fast-done".to_string())));
    }

    #[tokio::test(start_paused = true)]
    async fn race_with_no_success_in_time_has_no_winner() {
        let cleanups = Arc::new(AtomicUsize::new(0));
        let mut g = Gather::new();
        g.spawn("a", fetch("a", 5000, &cleanups));
        g.spawn("b", async { Err("down".to_string()) });
        let r = g.race(&Deadline::after(ms(1000))).await;
        assert_eq!(r.winner, None);
        assert_eq!(r.timed_out().collect::<Vec<_>>(), vec![&"a"]);
        assert_eq!(r.tasks[1].outcome, TaskOutcome::Failed("down".into()));
        assert_eq!(r.into_winner(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn empty_gather_returns_at_once() {
        let g = Gather::<&str, (), ()>::new();
        let r = g.all(&Deadline::after(ms(1000))).await;
        assert!(r.tasks.is_empty());
        assert!(r.all_completed());
    }
}
