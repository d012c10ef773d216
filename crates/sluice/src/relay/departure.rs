//! What a stream does when its original client leaves: the `on_disconnect` policy, in one place.
//!
//! - `cancel`: the stream ends at once, `cancelled(client_disconnected)`;
//! - `continue`: it runs on, recorded, for resumers (still under its total deadline);
//! - `grace_ms = N`: it runs on for N ms; if nobody follows it through the hub by then it ends
//!   `cancelled(client_disconnected)`, else it looks again N ms later.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use tokio::time::{Instant, Sleep};

use crate::stream::{Ending, OnDisconnect, Reason};

/// A stream's departure policy, and its grace timer once the client has left.
#[derive(Debug)]
pub(super) struct Departure {
    policy: OnDisconnect,
    /// Under `grace_ms`, from when the client left: when to look for followers. Boxed and made
    /// only then: the relay waits on it in every turn of its loop, and inline it would make every
    /// stream's task larger for a timer most streams never start.
    grace: Option<Pin<Box<Sleep>>>,
}

impl Departure {
    /// The policy, with the client still there.
    pub(super) fn new(policy: OnDisconnect) -> Self {
        Self {
            policy,
            grace: None,
        }
    }

    /// The client has left: the ending, if the stream ends now.
    pub(super) fn client_left(&mut self) -> Option<Ending> {
        match self.policy {
            OnDisconnect::Cancel => Some(Ending::abnormal(
                Reason::ClientDisconnected,
                "the client closed the connection",
            )),
            OnDisconnect::Continue => None,
            OnDisconnect::GraceMs(ms) => {
                self.grace
                    .get_or_insert_with(|| Box::pin(tokio::time::sleep(Duration::from_millis(ms))));
                None
            }
        }
    }

    /// Completes when the grace period is over; never if there is none running.
    pub(super) fn grace_over(&mut self) -> impl Future<Output = ()> + '_ {
        std::future::poll_fn(move |cx| match self.grace.as_mut() {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        })
    }

    /// The grace period is over and `followers` follow the stream: the ending if nobody does;
    /// otherwise the grace starts again.
    pub(super) fn look_for_followers(&mut self, followers: usize) -> Option<Ending> {
        if followers == 0 {
            return Some(Ending::abnormal(
                Reason::ClientDisconnected,
                "the client closed the connection and nobody resumed the stream within grace_ms",
            ));
        }
        if let (Some(sleep), OnDisconnect::GraceMs(ms)) = (self.grace.as_mut(), self.policy) {
            sleep
                .as_mut()
                .reset(Instant::now() + Duration::from_millis(ms));
        }
        None
    }
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;

    /// Whether the grace is over within `within` (on the paused clock: at once either way).
    async fn over_within(d: &mut Departure, within: Duration) -> bool {
        tokio::time::timeout(within, d.grace_over()).await.is_ok()
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_ends_at_once_and_continue_never() {
        let mut cancel = Departure::new(OnDisconnect::Cancel);
        assert_eq!(
            cancel.client_left().and_then(|e| e.reason()),
            Some(Reason::ClientDisconnected)
        );
        let mut keep = Departure::new(OnDisconnect::Continue);
        assert_eq!(keep.client_left(), None);
        assert!(!over_within(&mut keep, Duration::from_secs(3600)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn grace_ends_the_stream_only_if_nobody_follows() {
        let mut d = Departure::new(OnDisconnect::GraceMs(5000));
        assert!(
            !over_within(&mut d, Duration::from_secs(3600)).await,
            "no grace while the client is there"
        );
        let left = Instant::now();
        assert_eq!(d.client_left(), None);
        d.grace_over().await;
        assert_eq!(left.elapsed(), Duration::from_secs(5));
        // Someone follows: another grace period, from now.
        assert_eq!(d.look_for_followers(1), None);
        assert!(!over_within(&mut d, Duration::from_millis(4999)).await);
        d.grace_over().await;
        assert_eq!(left.elapsed(), Duration::from_secs(10));
        let ending = d.look_for_followers(0).expect("ends");
        assert_eq!(ending.reason(), Some(Reason::ClientDisconnected));
        assert!(ending.detail().unwrap_or("").contains("grace_ms"));
    }
}
