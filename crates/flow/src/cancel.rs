//! Cancellation that carries its cause.
//!
//! Python's `task.cancel()` raises `CancelledError` at the task's next `await`; the task may clean
//! up, but must re-raise so the cancellation is never swallowed. In Rust, cancelling a future means
//! *dropping* it, and a dropped future cannot say why it stopped. This module adds the *why*:
//! a [`CancelToken`] (built on tokio-util's [`CancellationToken`]) records a [`CancelCause`] when it
//! is cancelled, child tokens inherit their parent's cause, and [`CancelToken::run`] returns a typed,
//! `#[must_use]` [`Cancellable`] outcome that says whether the work completed or was cancelled, and
//! by what.
//!
//! ```
//! use sluice_flow::{CancelCause, CancelToken, Cancellable};
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let request = CancelToken::new();
//! let upstream = request.child();
//! request.cancel(CancelCause::ClientDisconnected);
//! match upstream.run(std::future::pending::<()>()).await {
//!     Cancellable::Completed(()) => unreachable!(),
//!     Cancellable::Cancelled(cause) => assert_eq!(cause, CancelCause::ClientDisconnected),
//! }
//! # }
//! ```

use std::fmt;
use std::future::Future;
use std::sync::{Arc, OnceLock};

use tokio_util::sync::CancellationToken;

use crate::limits::Limit;

/// Why a piece of work was cancelled. Serializes (via [`CancelCause::as_str`]) to the snake_case
/// names the gateway's API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CancelCause {
    /// The client went away (closed its connection) before the work finished.
    ClientDisconnected,
    /// Somebody asked for it (a cancel API call, a Ctrl-C in a CLI).
    Requested,
    /// A deadline fired; which one.
    Deadline(Limit),
    /// The process is shutting down.
    Shutdown,
    /// The consumer did not keep up and was cut off.
    SlowConsumer,
    /// Another task of a [`race`](crate::gather::Gather::race) won first.
    RaceLost,
}

impl CancelCause {
    /// The cause's snake_case name (`"client_disconnected"`, `"deadline"`, ...). For
    /// [`CancelCause::Deadline`] the limit is in [`CancelCause::deadline`].
    pub fn as_str(&self) -> &'static str {
        match self {
            CancelCause::ClientDisconnected => "client_disconnected",
            CancelCause::Requested => "requested",
            CancelCause::Deadline(_) => "deadline",
            CancelCause::Shutdown => "shutdown",
            CancelCause::SlowConsumer => "slow_consumer",
            CancelCause::RaceLost => "race_lost",
        }
    }

    /// The limit that fired, when the cause is a deadline.
    pub fn deadline(&self) -> Option<Limit> {
        match self {
            CancelCause::Deadline(limit) => Some(*limit),
            _ => None,
        }
    }
}

impl fmt::Display for CancelCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CancelCause::Deadline(limit) => write!(f, "deadline({limit})"),
            other => f.write_str(other.as_str()),
        }
    }
}

/// A cancellation token that remembers why it was cancelled.
///
/// Cloning gives another handle to the *same* token. [`CancelToken::child`] makes a token that is
/// cancelled when its parent is (inheriting the parent's cause) but can also be cancelled on its
/// own without touching the parent. The first cause recorded on a token wins; later `cancel` calls
/// change nothing.
#[derive(Clone, Debug, Default)]
pub struct CancelToken {
    token: CancellationToken,
    /// This token's own cause, linked to each ancestor's.
    causes: Arc<Causes>,
}

/// A token's own cause and its parent's: one allocation per token (a token per stream lives as
/// long as the stream).
#[derive(Debug, Default)]
struct Causes {
    own: OnceLock<CancelCause>,
    parent: Option<Arc<Causes>>,
}

impl Causes {
    /// The nearest cause recorded: this token's own, else its nearest ancestor's.
    fn nearest(&self) -> Option<CancelCause> {
        let mut causes = Some(self);
        while let Some(c) = causes {
            if let Some(cause) = c.own.get() {
                return Some(*cause);
            }
            causes = c.parent.as_deref();
        }
        None
    }
}

impl CancelToken {
    /// A new, uncancelled root token.
    pub fn new() -> Self {
        Self {
            token: CancellationToken::new(),
            causes: Arc::default(),
        }
    }

    /// A child token: cancelled with the parent's cause when the parent is cancelled; cancelling
    /// the child leaves the parent alone.
    pub fn child(&self) -> Self {
        Self {
            token: self.token.child_token(),
            causes: Arc::new(Causes {
                own: OnceLock::new(),
                parent: Some(self.causes.clone()),
            }),
        }
    }

    /// Cancels the token (and its children) with `cause`. Returns `true` if this call recorded the
    /// cause, `false` if the token already had one.
    pub fn cancel(&self, cause: CancelCause) -> bool {
        // The cause is recorded before the token flips, so anyone who sees the token cancelled
        // also sees a cause (its own or an ancestor's).
        let recorded = self.causes.own.set(cause).is_ok();
        self.token.cancel();
        recorded
    }

    /// Whether the token (or an ancestor) has been cancelled.
    pub fn is_cancelled(&self) -> bool {
        self.token.is_cancelled()
    }

    /// The cause, once cancelled: this token's own if it was cancelled directly, otherwise the
    /// nearest cancelled ancestor's.
    pub fn cause(&self) -> Option<CancelCause> {
        if !self.token.is_cancelled() {
            return None;
        }
        let found = self.causes.nearest();
        // `cancel` records a cause before it flips any token, so `found` is always `Some` here;
        // `Requested` is a defensive fallback, never a guess in practice.
        Some(found.unwrap_or(CancelCause::Requested))
    }

    /// Waits until the token is cancelled and returns the cause.
    pub async fn cancelled(&self) -> CancelCause {
        self.token.cancelled().await;
        self.cause().unwrap_or(CancelCause::Requested)
    }

    /// [`cancelled`](Self::cancelled) as a future that owns its token, for a loop that waits on
    /// it at every turn: made once and pinned outside the loop, it joins the token's waiter list
    /// once, where a `cancelled()` made at each turn joins and leaves it each time.
    pub fn cancelled_owned(&self) -> impl Future<Output = CancelCause> + Send + 'static {
        let causes = self.causes.clone();
        let cancelled = self.token.clone().cancelled_owned();
        async move {
            cancelled.await;
            causes.nearest().unwrap_or(CancelCause::Requested)
        }
    }

    /// Runs `fut` until it completes or the token is cancelled, whichever comes first. When the
    /// token wins, `fut` is dropped (Rust's cancellation) and the cause is returned. A token that
    /// is already cancelled does not start `fut` at all.
    pub async fn run<F: Future>(&self, fut: F) -> Cancellable<F::Output> {
        tokio::select! {
            biased;
            cause = self.cancelled() => Cancellable::Cancelled(cause),
            value = fut => Cancellable::Completed(value),
        }
    }

    /// A guard that cancels this token with `cause` when dropped, unless
    /// [`disarmed`](CancelOnDrop::disarm). The usual way to turn "the request's future was
    /// dropped" into "cancelled(client_disconnected)".
    pub fn cancel_on_drop(&self, cause: CancelCause) -> CancelOnDrop {
        CancelOnDrop {
            token: Some(self.clone()),
            cause,
        }
    }

    /// The underlying tokio-util token, for APIs that take one.
    pub fn as_tokio(&self) -> &CancellationToken {
        &self.token
    }
}

/// Cancels a [`CancelToken`] with a fixed cause when dropped. See [`CancelToken::cancel_on_drop`].
#[derive(Debug)]
#[must_use = "the guard cancels as soon as it is dropped"]
pub struct CancelOnDrop {
    token: Option<CancelToken>,
    cause: CancelCause,
}

impl CancelOnDrop {
    /// Drops the guard without cancelling.
    pub fn disarm(mut self) {
        self.token = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(token) = self.token.take() {
            token.cancel(self.cause);
        }
    }
}

/// The outcome of [`CancelToken::run`]: the work's value, or the cause that stopped it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use = "a cancellation must be handled, never silently dropped"]
pub enum Cancellable<T> {
    /// The work finished first.
    Completed(T),
    /// The token was cancelled first, for this cause.
    Cancelled(CancelCause),
}

impl<T> Cancellable<T> {
    /// `Ok(value)` or `Err(Cancelled { cause })`, for use with `?`.
    pub fn into_result(self) -> Result<T, Cancelled> {
        match self {
            Cancellable::Completed(v) => Ok(v),
            Cancellable::Cancelled(cause) => Err(Cancelled { cause }),
        }
    }

    /// Whether the work was cancelled.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, Cancellable::Cancelled(_))
    }
}

/// The error form of a cancellation, carrying its cause.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("cancelled: {cause}")]
pub struct Cancelled {
    /// Why the work was cancelled.
    pub cause: CancelCause,
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn cause_names_are_the_api_strings() {
        assert_eq!(
            CancelCause::ClientDisconnected.as_str(),
            "client_disconnected"
        );
        assert_eq!(CancelCause::SlowConsumer.as_str(), "slow_consumer");
        assert_eq!(
            CancelCause::Deadline(Limit::Idle).to_string(),
            "deadline(idle)"
        );
        assert_eq!(
            CancelCause::Deadline(Limit::Total).deadline(),
            Some(Limit::Total)
        );
        assert_eq!(CancelCause::Shutdown.deadline(), None);
    }

    #[test]
    fn uncancelled_token_has_no_cause() {
        let t = CancelToken::new();
        assert!(!t.is_cancelled());
        assert_eq!(t.cause(), None);
    }

    #[test]
    fn first_cause_wins() {
        let t = CancelToken::new();
        assert!(t.cancel(CancelCause::Shutdown));
        assert!(!t.cancel(CancelCause::Requested));
        assert_eq!(t.cause(), Some(CancelCause::Shutdown));
        // Clones share the token and its cause.
        assert_eq!(t.clone().cause(), Some(CancelCause::Shutdown));
    }

    #[test]
    fn children_inherit_the_parent_cause_and_grandchildren_too() {
        let root = CancelToken::new();
        let child = root.child();
        let grandchild = child.child();
        root.cancel(CancelCause::ClientDisconnected);
        assert_eq!(child.cause(), Some(CancelCause::ClientDisconnected));
        assert_eq!(grandchild.cause(), Some(CancelCause::ClientDisconnected));
    }

    #[test]
    fn cancelling_a_child_leaves_the_parent_alone() {
        let root = CancelToken::new();
        let child = root.child();
        child.cancel(CancelCause::Deadline(Limit::FirstItem));
        assert!(!root.is_cancelled());
        assert_eq!(child.cause(), Some(CancelCause::Deadline(Limit::FirstItem)));
        // The parent's later cancel does not rewrite the child's own cause.
        root.cancel(CancelCause::Shutdown);
        assert_eq!(child.cause(), Some(CancelCause::Deadline(Limit::FirstItem)));
        assert_eq!(root.cause(), Some(CancelCause::Shutdown));
    }

    #[tokio::test(start_paused = true)]
    async fn an_owned_wait_polled_at_every_turn_gets_the_parents_cause() {
        let root = CancelToken::new();
        let child = root.child();
        let mut cancelled = std::pin::pin!(child.cancelled_owned());
        // A loop's turns: the wait is polled again and again before the token is cancelled.
        for _ in 0..3 {
            let turn = tokio::time::timeout(Duration::from_millis(10), cancelled.as_mut()).await;
            assert!(turn.is_err(), "not cancelled yet");
        }
        root.cancel(CancelCause::Shutdown);
        assert_eq!(cancelled.await, CancelCause::Shutdown);
    }

    #[tokio::test(start_paused = true)]
    async fn run_returns_the_cause_and_drops_the_work() {
        struct Dropped(Arc<std::sync::atomic::AtomicUsize>);
        impl Drop for Dropped {
            fn drop(&mut self) {
                self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let drops = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let token = CancelToken::new();
        let canceller = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            canceller.cancel(CancelCause::Requested);
        });
        let guard = Dropped(drops.clone());
        let out = token
            .run(async move {
                let _guard = guard;
                tokio::time::sleep(Duration::from_secs(10)).await;
            })
            .await;
        assert_eq!(out, Cancellable::Cancelled(CancelCause::Requested));
        assert_eq!(drops.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(
            out.into_result(),
            Err(Cancelled {
                cause: CancelCause::Requested
            })
        );
    }

    #[tokio::test(start_paused = true)]
    async fn run_completes_when_not_cancelled() {
        let token = CancelToken::new();
        let out = token
            .run(async {
                tokio::time::sleep(Duration::from_millis(5)).await;
                7
            })
            .await;
        assert_eq!(out.into_result(), Ok(7));
    }

    #[tokio::test]
    async fn an_already_cancelled_token_never_starts_the_work() {
        let token = CancelToken::new();
        token.cancel(CancelCause::Shutdown);
        let started = std::sync::atomic::AtomicBool::new(false);
        let out = token
            .run(async { started.store(true, std::sync::atomic::Ordering::SeqCst) })
            .await;
        assert!(out.is_cancelled());
        assert!(!started.load(std::sync::atomic::Ordering::SeqCst));
    }

    #[test]
    fn cancel_on_drop_cancels_unless_disarmed() {
        let t = CancelToken::new();
        drop(t.cancel_on_drop(CancelCause::ClientDisconnected));
        assert_eq!(t.cause(), Some(CancelCause::ClientDisconnected));

        let t = CancelToken::new();
        t.cancel_on_drop(CancelCause::ClientDisconnected).disarm();
        assert!(!t.is_cancelled());
    }
}
