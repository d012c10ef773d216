//! [`Watermark`]: how far a stream's chunks are committed, for whoever waits on one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// A stream's commit watermark: the id of its last committed chunk. The writer advances it after
/// each batch; readers wait for it to reach a chunk before handing that chunk to anyone. One per
/// stream, cheap to clone: no allocation per chunk. (A number and one `Notify`, rather than a
/// `watch` channel: a `watch` send wakes eight notifier shards, one lock each, for every batch
/// of every stream.)
///
/// A chunk whose batch failed moves the watermark too (nobody waits forever), but is marked
/// lost: [`is_stored`](Self::is_stored) says no, and [`lost`](Self::lost) says the stream can no
/// longer keep its transcript whole.
#[derive(Debug, Clone, Default)]
pub struct Watermark {
    committed: Arc<Mark>,
    /// The first chunk that could not be stored (0: none).
    lost_from: Arc<AtomicU64>,
}

#[derive(Debug, Default)]
struct Mark {
    seq: AtomicU64,
    moved: Notify,
}

impl Watermark {
    /// A watermark at 0 (nothing committed).
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the last committed chunk.
    pub fn get(&self) -> u64 {
        self.committed.seq.load(Ordering::SeqCst)
    }

    /// Whether chunk `seq` is in the store (committed, and not in a batch that failed).
    pub fn is_stored(&self, seq: u64) -> bool {
        let lost = self.lost_from.load(Ordering::SeqCst);
        seq <= self.get() && (lost == 0 || seq < lost)
    }

    /// The first chunk of the stream that could not be stored, if one could not.
    pub fn lost(&self) -> Option<u64> {
        Some(self.lost_from.load(Ordering::SeqCst)).filter(|&seq| seq > 0)
    }

    /// Waits until chunk `seq` is committed.
    pub async fn reached(&self, seq: u64) {
        loop {
            if self.get() >= seq {
                return;
            }
            // Registered before the second look, so a move between the two is not missed.
            let moved = self.committed.moved.notified();
            let mut moved = std::pin::pin!(moved);
            moved.as_mut().enable();
            if self.get() >= seq {
                return;
            }
            moved.await;
        }
    }

    /// Chunk `seq`'s batch failed: it is lost, and the mark moves past it all the same.
    pub(super) fn lose(&self, seq: u64) {
        // The first loss is the one that counts.
        let _ = self
            .lost_from
            .compare_exchange(0, seq, Ordering::SeqCst, Ordering::SeqCst);
        self.advance(seq);
    }

    /// Moves the mark as a writer would (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn advance_for_test(&self, seq: u64) {
        self.advance(seq);
    }

    pub(super) fn advance(&self, seq: u64) {
        if self.committed.seq.fetch_max(seq, Ordering::SeqCst) < seq {
            self.committed.moved.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Poll;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_mark_reaches_its_chunk_and_not_before() {
        let mark = Watermark::new();
        let waiter = mark.clone();
        let mut wait = Box::pin(async move { waiter.reached(5).await });
        let mut poll = || {
            futures_util::FutureExt::poll_unpin(
                &mut wait,
                &mut std::task::Context::from_waker(std::task::Waker::noop()),
            )
        };
        assert!(poll().is_pending());
        mark.advance(3);
        assert!(poll().is_pending());
        // A mark never moves back.
        mark.advance(2);
        assert_eq!(mark.get(), 3);
        mark.advance(7);
        assert_eq!(poll(), Poll::Ready(()));
        // Already reached: at once.
        mark.reached(7).await;
        assert!(mark.is_stored(7) && mark.lost().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn waiters_on_other_threads_see_every_move() {
        let mark = Watermark::new();
        let waiters: Vec<_> = (1..=200)
            .map(|seq| {
                let mark = mark.clone();
                #[allow(clippy::disallowed_methods, reason = "a test's own tasks")]
                tokio::spawn(async move { mark.reached(seq).await })
            })
            .collect();
        for seq in 1..=200 {
            mark.advance(seq);
            tokio::task::yield_now().await;
        }
        for w in waiters {
            w.await.expect("waiter");
        }
    }

    #[tokio::test]
    async fn a_lost_chunk_moves_the_mark_and_is_not_stored() {
        let mark = Watermark::new();
        mark.advance(2);
        mark.lose(4);
        mark.reached(4).await;
        assert_eq!(mark.lost(), Some(4));
        assert!(mark.is_stored(3) && !mark.is_stored(4) && !mark.is_stored(5));
    }
}
