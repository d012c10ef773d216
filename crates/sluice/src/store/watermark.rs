//! [`Watermark`]: how far a stream's chunks are committed, for whoever waits on one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
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
pub struct Watermark(Arc<Mark>);

/// What a watermark's clones share: one allocation per stream.
#[derive(Debug, Default)]
struct Mark {
    seq: AtomicU64,
    /// The first chunk that could not be stored (0: none).
    lost_from: AtomicU64,
    /// Wakes whoever waits in [`Watermark::reached`].
    moved: Notify,
    /// Wakes the stream's own client side, waiting in [`Watermark::poll_reached`]: it waits
    /// for nearly every chunk, and a waker slot costs it no list to join and leave each time.
    client: AtomicWaker,
}

impl Watermark {
    /// A watermark at 0 (nothing committed).
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the last committed chunk.
    pub fn get(&self) -> u64 {
        self.0.seq.load(Ordering::SeqCst)
    }

    /// Whether chunk `seq` is in the store (committed, and not in a batch that failed).
    pub fn is_stored(&self, seq: u64) -> bool {
        let lost = self.0.lost_from.load(Ordering::SeqCst);
        seq <= self.get() && (lost == 0 || seq < lost)
    }

    /// The first chunk of the stream that could not be stored, if one could not.
    pub fn lost(&self) -> Option<u64> {
        Some(self.0.lost_from.load(Ordering::SeqCst)).filter(|&seq| seq > 0)
    }

    /// Ready once chunk `seq` is committed. For one waiter only, the stream's own client side
    /// (the watermark keeps one waker for it; a second waiter polling here would take that
    /// place): everyone else waits in [`reached`](Self::reached).
    pub fn poll_reached(&self, seq: u64, cx: &mut Context<'_>) -> Poll<()> {
        if self.get() >= seq {
            return Poll::Ready(());
        }
        self.0.client.register(cx.waker());
        // Looked at again after registering, so a move between the two is not missed.
        if self.get() >= seq {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until chunk `seq` is committed.
    pub async fn reached(&self, seq: u64) {
        loop {
            if self.get() >= seq {
                return;
            }
            // Registered before the second look, so a move between the two is not missed.
            let moved = self.0.moved.notified();
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
            .0
            .lost_from
            .compare_exchange(0, seq, Ordering::SeqCst, Ordering::SeqCst);
        self.advance(seq);
    }

    /// Moves the mark as a writer would (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn advance_for_test(&self, seq: u64) {
        self.advance(seq);
    }

    /// Marks `seq` lost as a writer would (for tests elsewhere in the crate).
    #[cfg(test)]
    pub(crate) fn lose_for_test(&self, seq: u64) {
        self.lose(seq);
    }

    /// Whether `other` is a clone of this watermark (the same stream's).
    pub(super) fn same(&self, other: &Watermark) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }

    pub(super) fn advance(&self, seq: u64) {
        if self.0.seq.fetch_max(seq, Ordering::SeqCst) < seq {
            self.0.client.wake();
            self.0.moved.notify_waiters();
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

    #[test]
    fn the_client_side_is_woken_when_the_mark_reaches_its_chunk() {
        struct Count(std::sync::atomic::AtomicUsize);
        impl std::task::Wake for Count {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
            }
        }
        let woken = Arc::new(Count(Default::default()));
        let waker = std::task::Waker::from(woken.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let mark = Watermark::new();
        assert!(mark.poll_reached(2, &mut cx).is_pending());
        mark.advance(1);
        assert_eq!(woken.0.load(Ordering::SeqCst), 1, "woken by every move");
        assert!(mark.poll_reached(2, &mut cx).is_pending());
        mark.lose(2);
        assert_eq!(woken.0.load(Ordering::SeqCst), 2);
        // Reached, though not stored: the waiter learns that from `is_stored`.
        assert_eq!(mark.poll_reached(2, &mut cx), Poll::Ready(()));
        assert!(mark.is_stored(1) && !mark.is_stored(2));
        assert_eq!(mark.lost(), Some(2));
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
