//! The hub: who else is following a running stream, and how to stop it from elsewhere.
//!
//! Each running stream has an entry: a broadcast of its live events (chunks as they are
//! committed, from when someone first follows it, then its terminal event) and its cancellation
//! token. Readers other than the original
//! client (resumers, a second tab) subscribe here; the cancel API cancels through here. An entry
//! exists from just after the stream is recorded until just after its final status is written,
//! so a stream that is not in the hub is finished (or was running in a process that died).
//!
//! Lookups take the tenant: another tenant's stream is simply not found.
//!
//! The broadcast is bounded. A reader that falls behind loses live events (tokio's `Lagged`) and
//! refills them from the store, which always has them: a chunk is committed before it is
//! published. So a slow reader costs the relay nothing and never sees a gap.
//!
//! The broadcast keeps its last [`LIVE_BUFFER`] events until they are overwritten, read or not.
//! So that this costs at most `LIVE_BUFFER × LIVE_INLINE_BYTES` per followed stream, whatever the
//! upstream sends, a chunk larger than [`LIVE_INLINE_BYTES`] is published as [`Live::Large`]:
//! just its id, and readers take it from the store.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use sluice_flow::{CancelCause, CancelToken};
use tokio::sync::broadcast;

use crate::stream::{StreamId, Tenant, Terminal};

/// How many live events a reader may fall behind before it refills from the store.
pub const LIVE_BUFFER: usize = 256;

/// The largest chunk carried in the live feed itself; larger ones are read from the store.
pub const LIVE_INLINE_BYTES: usize = 16 * 1024;

/// A live event of a running stream.
#[derive(Debug, Clone, PartialEq)]
pub enum Live {
    /// A committed chunk.
    Chunk {
        /// Its event id.
        seq: u64,
        /// Its JSON, exactly as the original client got it.
        data: Arc<str>,
    },
    /// A committed chunk too large to carry in the feed: read it from the store.
    Large {
        /// Its event id.
        seq: u64,
    },
    /// The stream ended (its final status is written); `None` seq/ending means `[DONE]` at `seq`.
    End(Terminal),
}

/// A stream's live feed, made when its first reader subscribes: most streams never have one,
/// and a feed's buffer is allocated whole.
type Feed = Arc<OnceLock<broadcast::Sender<Live>>>;

#[derive(Debug)]
struct Entry {
    tenant: Arc<str>,
    live: Feed,
    cancel: CancelToken,
}

/// The running streams of this process.
#[derive(Debug, Default)]
pub struct Hub {
    streams: Mutex<HashMap<Arc<str>, Entry>>,
}

/// A running stream's hold on its hub entry: publishes its events, and removes the entry when
/// dropped.
#[derive(Debug)]
pub struct Publisher {
    hub: Arc<Hub>,
    id: Arc<str>,
    live: Feed,
}

impl Publisher {
    /// Sends `event` to every current reader (none is fine).
    pub fn publish(&self, event: Live) {
        if let Some(live) = self.live.get() {
            let event = match event {
                Live::Chunk { seq, data } if data.len() > LIVE_INLINE_BYTES => Live::Large { seq },
                other => other,
            };
            // No reader left is fine: the stream goes on without followers.
            let _ = live.send(event);
        }
    }

    /// Whether anyone has subscribed to the stream's live feed (it is made by the first
    /// subscriber, before that subscriber reads the store).
    pub fn is_followed(&self) -> bool {
        self.live.get().is_some()
    }

    /// How many readers follow the stream through the hub (not counting the original client).
    pub fn readers(&self) -> usize {
        self.live.get().map_or(0, broadcast::Sender::receiver_count)
    }
}

impl Drop for Publisher {
    fn drop(&mut self) {
        self.hub.lock().remove(&self.id);
    }
}

/// What the cancel API found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelResult {
    /// The stream was running here and has been told to stop.
    Cancelling,
    /// No running stream of this tenant has that id (it may be finished, or not exist).
    NotRunning,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Entry>> {
        self.streams.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a running stream.
    pub fn register(
        self: &Arc<Self>,
        id: Arc<str>,
        tenant: Arc<str>,
        cancel: CancelToken,
    ) -> Publisher {
        let live: Feed = Arc::default();
        self.lock().insert(
            id.clone(),
            Entry {
                tenant,
                live: live.clone(),
                cancel,
            },
        );
        Publisher {
            hub: self.clone(),
            id,
            live,
        }
    }

    /// Follows `tenant`'s running stream `id`, if there is one.
    pub fn subscribe(&self, tenant: Tenant, id: StreamId) -> Option<broadcast::Receiver<Live>> {
        self.lock()
            .get(id.0)
            .filter(|e| &*e.tenant == tenant.0)
            .map(|e| {
                e.live
                    .get_or_init(|| broadcast::channel(LIVE_BUFFER).0)
                    .subscribe()
            })
    }

    /// Asks `tenant`'s running stream `id` to stop (cause: `requested`).
    pub fn cancel(&self, tenant: Tenant, id: StreamId) -> CancelResult {
        match self.lock().get(id.0).filter(|e| &*e.tenant == tenant.0) {
            Some(e) => {
                e.cancel.cancel(CancelCause::Requested);
                CancelResult::Cancelling
            }
            None => CancelResult::NotRunning,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::Ending;

    #[test]
    fn entries_live_as_long_as_their_publisher_and_only_for_their_tenant() {
        let hub = Arc::new(Hub::default());
        let token = CancelToken::new();
        let publisher = hub.register("s1".into(), "acme".into(), token.clone());
        assert!(hub.subscribe(Tenant("other"), StreamId("s1")).is_none());
        let mut rx = hub
            .subscribe(Tenant("acme"), StreamId("s1"))
            .expect("running");
        assert_eq!(publisher.readers(), 1);
        publisher.publish(Live::Chunk {
            seq: 1,
            data: "{}".into(),
        });
        publisher.publish(Live::End(Terminal {
            seq: 2,
            ending: Ending::Completed,
        }));
        assert!(matches!(rx.try_recv(), Ok(Live::Chunk { seq: 1, .. })));
        assert!(matches!(rx.try_recv(), Ok(Live::End(_))));
        // A large chunk is not kept in the feed: only its id is.
        publisher.publish(Live::Chunk {
            seq: 3,
            data: "x".repeat(LIVE_INLINE_BYTES + 1).into(),
        });
        assert_eq!(rx.try_recv(), Ok(Live::Large { seq: 3 }));

        assert_eq!(
            hub.cancel(Tenant("other"), StreamId("s1")),
            CancelResult::NotRunning
        );
        assert!(!token.is_cancelled());
        assert_eq!(
            hub.cancel(Tenant("acme"), StreamId("s1")),
            CancelResult::Cancelling
        );
        assert_eq!(token.cause(), Some(CancelCause::Requested));

        drop(publisher);
        assert!(hub.lock().is_empty());
        assert!(hub.subscribe(Tenant("acme"), StreamId("s1")).is_none());
        assert_eq!(
            hub.cancel(Tenant("acme"), StreamId("s1")),
            CancelResult::NotRunning
        );
    }
}
