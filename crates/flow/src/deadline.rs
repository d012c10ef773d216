//! Deadlines around a block of work.
//!
//! Python 3.11's `async with asyncio.timeout(1):` puts one deadline around a whole block;
//! `asyncio.wait_for(coro, 1)` does the same for one awaitable. Here, [`Deadline::run`] is the block
//! form and [`timeout`] the `wait_for` form. Both return a `#[must_use]` [`Timed`] that says
//! whether the work completed or the deadline fired, never a bare `Option`.
//!
//! Deadlines nest: [`Deadline::nested`] makes a deadline that also fires when its parent does, so
//! the earliest in the chain wins, and [`Expired`] says which one it was. A running deadline can be
//! moved earlier or later with [`Deadline::reschedule`] (Python's `Timeout.reschedule`); work
//! already running under it sees the change at once.
//!
//! ```
//! use std::time::Duration;
//! use sluice_flow::{timeout, Timed};
//! # #[tokio::main(flavor = "current_thread", start_paused = true)] async fn main() {
//! let slow = tokio::time::sleep(Duration::from_secs(5));
//! assert!(matches!(timeout(Duration::from_secs(1), slow).await, Timed::Expired(_)));
//! # }
//! ```

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::select_all;
use tokio::sync::watch;
use tokio::time::Instant;

/// A point in time by which work must finish. Cheap to clone; clones share the instant, so a
/// [`reschedule`](Deadline::reschedule) through any clone moves it for all.
#[derive(Clone, Debug)]
pub struct Deadline {
    node: Arc<Node>,
}

#[derive(Debug)]
struct Node {
    at: watch::Sender<Instant>,
    name: Option<&'static str>,
    parent: Option<Arc<Node>>,
}

impl Deadline {
    /// A deadline at `when`.
    pub fn at(when: Instant) -> Self {
        Self::build(None, when, None)
    }

    /// A deadline `after` from now.
    pub fn after(after: Duration) -> Self {
        Self::at(Instant::now() + after)
    }

    /// A named deadline at `when`; [`Expired::name`] reports the name when it fires.
    pub fn named(name: &'static str, when: Instant) -> Self {
        Self::build(Some(name), when, None)
    }

    /// A deadline inside this one: it fires at `when` or when this one fires, whichever is first.
    pub fn nested(&self, name: Option<&'static str>, when: Instant) -> Self {
        Self::build(name, when, Some(self.node.clone()))
    }

    fn build(name: Option<&'static str>, when: Instant, parent: Option<Arc<Node>>) -> Self {
        Self {
            node: Arc::new(Node {
                at: watch::Sender::new(when),
                name,
                parent,
            }),
        }
    }

    /// Moves this deadline (not its parents) to `when`, earlier or later. Work running under it
    /// sees the new instant at once.
    pub fn reschedule(&self, when: Instant) {
        self.node.at.send_replace(when);
    }

    /// This deadline's own instant, ignoring its parents.
    pub fn own(&self) -> Instant {
        *self.node.at.borrow()
    }

    /// The instant at which this deadline fires: the earliest in its chain.
    pub fn when(&self) -> Instant {
        self.earliest().0
    }

    /// Time left until it fires (zero once it has).
    pub fn remaining(&self) -> Duration {
        self.when().saturating_duration_since(Instant::now())
    }

    /// Whether it has fired.
    pub fn is_expired(&self) -> bool {
        self.when() <= Instant::now()
    }

    fn chain(&self) -> impl Iterator<Item = &Node> {
        std::iter::successors(Some(&*self.node), |n| n.parent.as_deref())
    }

    /// The earliest instant in the chain and its deadline's name; on a tie, the innermost.
    fn earliest(&self) -> (Instant, Option<&'static str>) {
        let mut best = (*self.node.at.borrow(), self.node.name);
        for node in self.chain().skip(1) {
            let at = *node.at.borrow();
            if at < best.0 {
                best = (at, node.name);
            }
        }
        best
    }

    /// Waits until the deadline fires, following every reschedule in its chain.
    pub async fn expired(&self) -> Expired {
        let mut watchers: Vec<watch::Receiver<Instant>> =
            self.chain().map(|n| n.at.subscribe()).collect();
        loop {
            for w in &mut watchers {
                w.borrow_and_update();
            }
            let (at, name) = self.earliest();
            let changed = select_all(watchers.iter_mut().map(|w| Box::pin(w.changed())));
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(at) => return Expired { at, name },
                // Every sender lives in `self`'s chain, which outlives this call, so `changed`
                // only resolves on a real reschedule.
                _ = changed => {}
            }
        }
    }

    /// Runs `fut` under this deadline: Python's `async with asyncio.timeout(...)`. If the deadline
    /// fires first, `fut` is dropped and the result says which deadline fired. Work that is ready
    /// at the same moment the deadline fires counts as completed.
    pub async fn run<F: Future>(&self, fut: F) -> Timed<F::Output> {
        tokio::select! {
            biased;
            value = fut => Timed::Completed(value),
            expired = self.expired() => Timed::Expired(expired),
        }
    }
}

/// Runs `fut` with `limit` to finish: Python's `asyncio.wait_for(coro, timeout)`.
pub async fn timeout<F: Future>(limit: Duration, fut: F) -> Timed<F::Output> {
    Deadline::after(limit).run(fut).await
}

/// The outcome of work run under a deadline.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a fired deadline must be handled, never silently dropped"]
pub enum Timed<T> {
    /// The work finished in time.
    Completed(T),
    /// The deadline fired first; the work was dropped.
    Expired(Expired),
}

impl<T> Timed<T> {
    /// `Ok(value)` or `Err(Expired)`, for use with `?`.
    pub fn into_result(self) -> Result<T, Expired> {
        match self {
            Timed::Completed(v) => Ok(v),
            Timed::Expired(e) => Err(e),
        }
    }

    /// Whether the deadline fired.
    pub fn is_expired(&self) -> bool {
        matches!(self, Timed::Expired(_))
    }
}

/// A deadline fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("deadline {} expired", name.unwrap_or("(unnamed)"))]
pub struct Expired {
    /// The instant it fired at.
    pub at: Instant,
    /// The name of the deadline in the chain that fired, if it had one.
    pub name: Option<&'static str>,
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[tokio::test(start_paused = true)]
    async fn completes_in_time() {
        let out = timeout(ms(1000), async {
            tokio::time::sleep(ms(500)).await;
            "done"
        })
        .await;
        assert_eq!(out, Timed::Completed("done"));
    }

    #[tokio::test(start_paused = true)]
    async fn fires_at_the_deadline_and_drops_the_work() {
        let start = Instant::now();
        let out = timeout(ms(1000), tokio::time::sleep(ms(5000))).await;
        assert!(out.is_expired());
        assert_eq!(start.elapsed(), ms(1000));
        assert_eq!(out.into_result().map_err(|e| e.at), Err(start + ms(1000)));
    }

    #[tokio::test(start_paused = true)]
    async fn nested_the_earliest_wins_and_is_named() {
        let start = Instant::now();
        let outer = Deadline::named("outer", start + ms(300));
        let inner = outer.nested(Some("inner"), start + ms(900));
        let out = inner.run(tokio::time::sleep(ms(5000))).await;
        assert_eq!(
            out,
            Timed::Expired(Expired {
                at: start + ms(300),
                name: Some("outer")
            })
        );
        assert_eq!(start.elapsed(), ms(300));

        let inner2 = outer.nested(Some("inner"), start + ms(350));
        outer.reschedule(start + ms(2000));
        let out = inner2.run(tokio::time::sleep(ms(5000))).await;
        assert_eq!(out.into_result().map_err(|e| e.name), Err(Some("inner")));
        assert_eq!(start.elapsed(), ms(350));
    }

    #[tokio::test(start_paused = true)]
    async fn rescheduling_later_while_running_extends_it() {
        let start = Instant::now();
        let d = Deadline::after(ms(100));
        let mover = d.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(50)).await;
            mover.reschedule(start + ms(1000));
        });
        let out = d
            .run(async {
                tokio::time::sleep(ms(700)).await;
                1
            })
            .await;
        assert_eq!(out, Timed::Completed(1));
    }

    #[tokio::test(start_paused = true)]
    async fn rescheduling_earlier_while_running_fires_sooner() {
        let start = Instant::now();
        let d = Deadline::after(ms(10_000));
        let mover = d.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(50)).await;
            mover.reschedule(start + ms(200));
        });
        let out = d.run(tokio::time::sleep(ms(5000))).await;
        assert!(out.is_expired());
        assert_eq!(start.elapsed(), ms(200));
    }

    #[tokio::test(start_paused = true)]
    async fn rescheduling_a_parent_moves_the_child() {
        let start = Instant::now();
        let parent = Deadline::after(ms(10_000));
        let child = parent.nested(None, start + ms(20_000));
        let mover = parent.clone();
        tokio::spawn(async move {
            tokio::time::sleep(ms(10)).await;
            mover.reschedule(start + ms(40));
        });
        let out = child.run(tokio::time::sleep(ms(5000))).await;
        assert!(out.is_expired());
        assert_eq!(start.elapsed(), ms(40));
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_in_the_past_fires_at_once() {
        let d = Deadline::at(Instant::now());
        assert!(d.is_expired());
        assert_eq!(d.remaining(), Duration::ZERO);
        assert!(d.run(std::future::pending::<()>()).await.is_expired());
    }

    #[tokio::test(start_paused = true)]
    async fn ready_work_beats_an_expired_deadline() {
        let d = Deadline::at(Instant::now());
        assert_eq!(d.run(async { 5 }).await, Timed::Completed(5));
    }
}
