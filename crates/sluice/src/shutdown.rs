//! Shutdown: its phases, the bound on each, and who waits on what.
//!
//! In order (the shape of mini-redis' `shutdown.rs`, with the patterns of `sluice-flow`):
//! 1. **begin**: stop accepting connections; idle keep-alive connections are closed
//!    ([`Shutdown::begin`], which the server's accept loop waits on with [`Shutdown::begun`]);
//! 2. **grace**: in-flight streams get [`Bounds::grace`] to finish on their own;
//! 3. **cancel**: the rest are cancelled with cause `shutdown` through [`Shutdown::streams`]
//!    (every relay's token is a child of it): each ends `interrupted(shutdown)` with an SSE error
//!    event, never `[DONE]`; connections get [`Bounds::last_words`] to deliver that event, then
//!    are dropped, so a client that stopped reading cannot hold the process up;
//! 4. **drain**: every tracked task (relays, shielded final writes) gets [`Bounds::writes`] to
//!    finish, so every transcript's final status has landed.
//!
//! The server then flushes its store. Each phase is bounded, so shutdown always ends: at most
//! `grace + last_words + writes` after it begins.

use std::future::Future;
use std::time::Duration;

use sluice_flow::{CancelCause, CancelToken, Drained, Tasks};

/// How long each phase may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// In-flight streams' time to finish on their own (`shutdown_grace_ms`, default 10 s).
    pub grace: Duration,
    /// Connections' time to deliver their last event once streams are cancelled (2 s).
    pub last_words: Duration,
    /// Tracked tasks' time to finish, shielded writes included (10 s).
    pub writes: Duration,
}

impl Bounds {
    /// The bounds for a configured grace period.
    pub fn with_grace(grace: Duration) -> Self {
        Self {
            grace,
            last_words: Duration::from_secs(2),
            writes: Duration::from_secs(10),
        }
    }
}

/// One server's shutdown, shared by whoever takes part in it; cheap to clone.
#[derive(Debug, Clone)]
pub struct Shutdown {
    begun: CancelToken,
    streams: CancelToken,
    bounds: Bounds,
}

impl Shutdown {
    /// A shutdown that has not begun.
    pub fn new(bounds: Bounds) -> Self {
        Self {
            begun: CancelToken::new(),
            streams: CancelToken::new(),
            bounds,
        }
    }

    /// Begins shutting down (phase 1). Calling it again changes nothing.
    pub fn begin(&self) {
        if !self.begun.is_cancelled() {
            tracing::info!(
                grace = ?self.bounds.grace,
                "shutting down: no new connections; in-flight streams get the grace period"
            );
        }
        self.begun.cancel(CancelCause::Shutdown);
    }

    /// Completes once shutdown has begun.
    pub async fn begun(&self) {
        self.begun.cancelled().await;
    }

    /// Cancelled (cause `shutdown`) when in-flight streams must end: the parent of every
    /// stream's token.
    pub fn streams(&self) -> &CancelToken {
        &self.streams
    }

    /// Phases 2 to 4, once shutdown begins. `connections` is the server's connections: it stops
    /// accepting once [`begun`](Self::begun) and ends when its in-flight responses have. An
    /// error from it ends the shutdown early with that error; tracked tasks are still drained
    /// first, since their final writes matter most.
    pub async fn drive<E>(
        &self,
        connections: impl Future<Output = Result<(), E>>,
        tasks: &Tasks,
    ) -> Result<Drained, E> {
        let cancel_after_grace = async {
            self.begun().await;
            tokio::time::sleep(self.bounds.grace).await;
            tracing::info!("grace period over: ending in-flight streams as interrupted(shutdown)");
            self.streams.cancel(CancelCause::Shutdown);
            tokio::time::sleep(self.bounds.last_words).await;
        };
        let served = tokio::select! {
            served = connections => served,
            () = cancel_after_grace => {
                tracing::warn!("connections still open after shutdown; dropping them");
                Ok(())
            }
        };
        // Whatever still runs (a stream whose client already left, say) ends now.
        self.streams.cancel(CancelCause::Shutdown);
        let drained = tasks.shutdown(self.bounds.writes).await;
        if let Drained::TimedOut { still_running } = drained {
            tracing::error!(still_running, "tasks still running at exit");
        }
        served.map(|()| drained)
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use std::sync::{Arc, Mutex};

    use tokio::time::Instant;

    use super::*;

    fn bounds() -> Bounds {
        Bounds::with_grace(Duration::from_secs(10))
    }

    type Ended = Arc<Mutex<Option<(Duration, bool)>>>;

    /// A stream that takes `takes` unless cancelled; records when (since it started) and whether
    /// cancelled it ended. Its connection ends when it does, once shutdown has begun.
    fn stream(
        tasks: &Tasks,
        shutdown: &Shutdown,
        takes: Duration,
    ) -> (Ended, impl Future<Output = Result<(), std::io::Error>>) {
        let ended = Ended::default();
        let (token, record, start) = (shutdown.streams().child(), ended.clone(), Instant::now());
        let (done, response_ends) = tokio::sync::oneshot::channel::<()>();
        tasks.spawn(async move {
            let cancelled = tokio::select! {
                () = tokio::time::sleep(takes) => false,
                _ = token.cancelled() => true,
            };
            *record.lock().unwrap_or_else(|e| e.into_inner()) = Some((start.elapsed(), cancelled));
            drop(done);
        });
        let shutdown = shutdown.clone();
        let connection = async move {
            shutdown.begun().await;
            let _ = response_ends.await;
            Ok(())
        };
        (ended, connection)
    }

    fn ended(record: &Mutex<Option<(Duration, bool)>>) -> Option<(Duration, bool)> {
        *record.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_that_ends_within_the_grace_is_not_cancelled() {
        let (tasks, shutdown) = (Tasks::new(), Shutdown::new(bounds()));
        let (s, connection) = stream(&tasks, &shutdown, Duration::from_secs(3));
        let start = Instant::now();
        shutdown.begin();
        let drained = shutdown.drive(connection, &tasks).await.expect("served");
        assert_eq!(drained, Drained::Complete);
        assert_eq!(ended(&s), Some((Duration::from_secs(3), false)));
        assert_eq!(start.elapsed(), Duration::from_secs(3));
    }

    #[tokio::test(start_paused = true)]
    async fn a_long_stream_is_cancelled_when_the_grace_ends() {
        let (tasks, shutdown) = (Tasks::new(), Shutdown::new(bounds()));
        let (s, connection) = stream(&tasks, &shutdown, Duration::from_secs(600));
        tokio::time::sleep(Duration::from_secs(1)).await;
        let begin = Instant::now();
        shutdown.begin();
        let drained = shutdown.drive(connection, &tasks).await.expect("served");
        assert_eq!(drained, Drained::Complete);
        // Began 1 s after the stream; cancelled 10 s (the grace) later.
        assert_eq!(ended(&s), Some((Duration::from_secs(11), true)));
        assert_eq!(begin.elapsed(), Duration::from_secs(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_that_never_ends_is_dropped_after_its_last_words() {
        let (tasks, shutdown) = (Tasks::new(), Shutdown::new(bounds()));
        let (s, _connection) = stream(&tasks, &shutdown, Duration::from_secs(600));
        let begin = Instant::now();
        shutdown.begin();
        let stuck = std::future::pending::<Result<(), std::io::Error>>();
        let drained = shutdown.drive(stuck, &tasks).await.expect("served");
        assert_eq!(drained, Drained::Complete);
        assert_eq!(ended(&s).map(|(_, cancelled)| cancelled), Some(true));
        assert_eq!(
            begin.elapsed(),
            Duration::from_secs(12),
            "grace + last words"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_outlives_every_bound_is_reported_not_waited_for() {
        let (tasks, shutdown) = (Tasks::new(), Shutdown::new(bounds()));
        // A write that ignores cancellation and takes a minute.
        tasks.spawn(tokio::time::sleep(Duration::from_secs(60)));
        let begin = Instant::now();
        shutdown.begin();
        let drained = shutdown
            .drive(std::future::pending::<Result<(), std::io::Error>>(), &tasks)
            .await
            .expect("served");
        assert_eq!(drained, Drained::TimedOut { still_running: 1 });
        assert_eq!(
            begin.elapsed(),
            Duration::from_secs(22),
            "grace + last words + writes"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn nothing_happens_before_it_begins_and_beginning_twice_is_once() {
        let (tasks, shutdown) = (Tasks::new(), Shutdown::new(bounds()));
        let (s, connection) = stream(&tasks, &shutdown, Duration::from_secs(25));
        let drive = shutdown.drive(connection, &tasks);
        tokio::pin!(drive);
        assert!(
            tokio::time::timeout(Duration::from_secs(20), &mut drive)
                .await
                .is_err(),
            "not begun: nothing ends"
        );
        assert_eq!(ended(&s), None);
        shutdown.begin();
        shutdown.begin();
        assert_eq!(drive.await.expect("served"), Drained::Complete);
        // Began at 20 s: the stream ends on its own at 25 s, within the grace.
        assert_eq!(ended(&s), Some((Duration::from_secs(25), false)));
    }
}
