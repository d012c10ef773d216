//! A bounded producer/consumer queue with explicit completion.
//!
//! The lesson's `asyncio.Queue(maxsize=2)` gives backpressure (`put` waits when full), but ends
//! with a sentinel (`None`), and a producer whose consumer has left keeps producing. Here:
//! - the [`Producer`] waits when the queue is full (backpressure);
//! - completion is explicit: [`Producer::end`] or [`Producer::fail`]. A producer dropped without
//!   either is reported to the consumer as [`QueueError::Abandoned`], so a dead producer never
//!   looks like a finished one;
//! - the consumer's departure is visible to the producer at once: [`Producer::send`] fails and
//!   hands the item back, and [`Producer::consumer_departed`] resolves, so a producer can stop
//!   upstream work the moment its client goes away;
//! - the depth is observable from both ends, for metrics;
//! - a queue may be bounded in bytes too ([`bounded_in_bytes`]): whichever bound is reached
//!   first makes the producer wait, and an item larger than the byte bound goes through alone.
//!
//! A deque under a mutex, not tokio's `mpsc`: a queue per stream lives as long as the stream,
//! and `mpsc` allocates about 0.8 KB for each whatever its use (its channel, padded against
//! false sharing, and a first block of 32 slots), a third of what an idle stream costs beyond
//! its connection's buffers. Here a queue is one allocation of under 200 bytes plus room for
//! the items it holds (grown as they come, never past its capacity). Each end takes the mutex
//! for a few instructions and wakes the other outside it.
//!
//! ```
//! use sluice_flow::queue;
//! # #[tokio::main(flavor = "current_thread")] async fn main() {
//! let (tx, mut rx) = queue::bounded::<&str, std::io::Error>(2);
//! tokio::spawn(async move {
//!     for item in ["a", "b", "c"] {
//!         if tx.send(item).await.is_err() { return; } // the consumer left
//!     }
//!     tx.end();
//! });
//! let mut got = vec![];
//! while let Some(item) = rx.recv().await {
//!     got.push(item.unwrap());
//! }
//! assert_eq!(got, ["a", "b", "c"]);
//! # }
//! ```

use std::collections::VecDeque;
use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll, Waker};

use futures_core::stream::{FusedStream, Stream};
use tokio::sync::Notify;

/// Makes a queue that holds at most `capacity` items (at least 1).
pub fn bounded<T, E>(capacity: usize) -> (Producer<T, E>, Consumer<T, E>) {
    bounded_in_bytes(capacity, usize::MAX, |_| 0)
}

/// Makes a queue that holds at most `capacity` items (at least 1) and at most `max_bytes` of
/// them as `weigh` counts an item's bytes, whichever is reached first; an item is counted from
/// when it is sent until it is received. An item heavier than `max_bytes` is let in when the
/// queue holds no bytes, so it goes through alone rather than never. `weigh` must give the
/// same figure for an item whenever it is asked.
///
/// The count is kept under the queue's own lock, which each end takes anyway: bounding a
/// stream's buffer in bytes this way costs no lock of its own (a semaphore's permits, given
/// back as each item goes, took one more per item).
pub fn bounded_in_bytes<T, E>(
    capacity: usize,
    max_bytes: usize,
    weigh: fn(&T) -> usize,
) -> (Producer<T, E>, Consumer<T, E>) {
    let shared = Arc::new(Shared {
        capacity: capacity.max(1),
        max_bytes,
        weigh,
        state: Mutex::new(State {
            items: VecDeque::new(),
            bytes: 0,
            refused: false,
            ending: None,
            producer_done: false,
            consumer_gone: false,
            receiver: None,
            producer: None,
        }),
        room: Notify::new(),
        departed: Notify::new(),
    });
    (
        Producer {
            shared: shared.clone(),
        },
        Consumer {
            shared,
            finished: false,
        },
    )
}

/// What both ends share: one allocation per queue.
struct Shared<T, E> {
    capacity: usize,
    /// The bound in bytes (`usize::MAX`: none).
    max_bytes: usize,
    /// An item's bytes, for `max_bytes`.
    weigh: fn(&T) -> usize,
    state: Mutex<State<T, E>>,
    /// Wakes a producer waiting for room (notified when an item is taken from a queue that
    /// refused one, and when the consumer departs).
    room: Notify,
    /// Wakes whoever waits for the consumer to depart.
    departed: Notify,
}

struct State<T, E> {
    /// The items sent and not yet received; grows as needed up to the capacity, so a queue that
    /// is never full takes only the room its items need.
    items: VecDeque<T>,
    /// The queued items' bytes, as the queue's `weigh` counts them.
    bytes: usize,
    /// An item was refused for want of room since the last one was taken: the next one taken
    /// wakes the producer.
    refused: bool,
    /// How the producer said it was done; `None` until it says so (and if it never does).
    ending: Option<Result<(), E>>,
    /// The producer has ended the queue or gone away.
    producer_done: bool,
    /// The consumer has closed its end or gone away.
    consumer_gone: bool,
    /// The consumer waiting for an item or the end (there is one consumer, so one waker).
    receiver: Option<Waker>,
    /// The producer's own task waiting in [`Producer::poll_departed`].
    producer: Option<Waker>,
}

impl<T, E> Shared<T, E> {
    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        // The state is consistent at every point a panic could leave it: no half-done updates.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Keeps `cx`'s waker in `slot` (cloned only if it is not the one already there).
fn park(slot: &mut Option<Waker>, cx: &Context<'_>) {
    if !slot.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
        *slot = Some(cx.waker().clone());
    }
}

/// The sending end. Not `Clone`: one producer owns the queue's completion.
pub struct Producer<T, E> {
    shared: Arc<Shared<T, E>>,
}

impl<T, E> Producer<T, E> {
    /// Sends `item`, waiting while the queue is full. If the consumer has departed, returns the
    /// item in the error at once.
    pub async fn send(&self, item: T) -> Result<(), Departed<T>> {
        let mut item = item;
        loop {
            // Made before the queue is looked at: `notify_waiters` reaches a `Notified` from
            // the moment it is made, so room freed after the look below is not missed.
            let room = self.shared.room.notified();
            match self.try_send(item) {
                Ok(()) => return Ok(()),
                Err(TrySendError::Departed(back)) => return Err(Departed(back)),
                Err(TrySendError::Full(back)) => item = back,
            }
            room.await;
        }
    }

    /// Sends `item` only if there is room now; never waits. For items that are worth nothing
    /// later (a keep-alive when the consumer already has items to read).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        let mut state = self.shared.lock();
        if state.consumer_gone {
            return Err(TrySendError::Departed(item));
        }
        let bytes = (self.shared.weigh)(&item);
        if state.items.len() >= self.shared.capacity
            || (state.bytes > 0 && state.bytes.saturating_add(bytes) > self.shared.max_bytes)
        {
            state.refused = true;
            return Err(TrySendError::Full(item));
        }
        state.bytes = state.bytes.saturating_add(bytes);
        state.items.push_back(item);
        let receiver = state.receiver.take();
        drop(state);
        if let Some(receiver) = receiver {
            receiver.wake();
        }
        Ok(())
    }

    /// Ends the queue successfully: the consumer gets every item sent, then the end.
    pub fn end(self) {
        self.finish(Some(Ok(())));
    }

    /// Ends the queue with an error: the consumer gets every item sent, then `error`.
    pub fn fail(self, error: E) {
        self.finish(Some(Err(error)));
    }

    /// Marks the producer done (`None`: gone without saying how) and wakes the consumer.
    fn finish(&self, ending: Option<Result<(), E>>) {
        let mut state = self.shared.lock();
        if state.producer_done {
            return;
        }
        state.producer_done = true;
        state.ending = ending;
        let receiver = state.receiver.take();
        drop(state);
        if let Some(receiver) = receiver {
            receiver.wake();
        }
    }

    /// Resolves as soon as the consumer has departed (dropped or closed its end).
    pub async fn consumer_departed(&self) {
        loop {
            // Made before the look, as in `send`.
            let departed = self.shared.departed.notified();
            if self.is_departed() {
                return;
            }
            departed.await;
        }
    }

    /// Ready once the consumer has departed: [`consumer_departed`](Self::consumer_departed)
    /// for a loop that waits on it at every turn. The queue keeps one waker for it, so this is
    /// for the producer's own task (a second task polling here would take that place); a
    /// `consumer_departed` future joins and leaves a waiter list each time it is made and
    /// dropped, this only compares wakers.
    pub fn poll_departed(&self, cx: &mut Context<'_>) -> Poll<()> {
        let mut state = self.shared.lock();
        if state.consumer_gone {
            return Poll::Ready(());
        }
        park(&mut state.producer, cx);
        Poll::Pending
    }

    /// Whether the consumer has departed.
    pub fn is_departed(&self) -> bool {
        self.shared.lock().consumer_gone
    }

    /// How many items are queued now.
    pub fn depth(&self) -> usize {
        self.shared.lock().items.len()
    }

    /// How many bytes of items are queued now (as the queue weighs them; 0 for a queue made
    /// by [`bounded`]).
    pub fn bytes(&self) -> usize {
        self.shared.lock().bytes
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.shared.capacity
    }
}

impl<T, E> Drop for Producer<T, E> {
    /// A producer that goes without [`end`](Self::end) or [`fail`](Self::fail) abandons the
    /// queue (a no-op after either).
    fn drop(&mut self) {
        self.finish(None);
    }
}

impl<T, E> fmt::Debug for Producer<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Producer")
            .field("depth", &self.depth())
            .field("capacity", &self.capacity())
            .finish()
    }
}

/// The receiving end. Also a [`Stream`] of `Result<T, QueueError<E>>`.
pub struct Consumer<T, E> {
    shared: Arc<Shared<T, E>>,
    finished: bool,
}

impl<T, E> Consumer<T, E> {
    /// The next item; then, once the producer is done and every item was received: nothing if it
    /// ended successfully, or one error (its failure, or [`QueueError::Abandoned`]) and then
    /// nothing.
    pub async fn recv(&mut self) -> Option<Result<T, QueueError<E>>> {
        std::future::poll_fn(|cx| self.poll_recv(cx)).await
    }

    fn poll_recv(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<T, QueueError<E>>>> {
        if self.finished {
            return Poll::Ready(None);
        }
        let mut state = self.shared.lock();
        if let Some(item) = state.items.pop_front() {
            state.bytes = state.bytes.saturating_sub((self.shared.weigh)(&item));
            // Only a queue that refused an item can have a producer waiting for room.
            let refused = std::mem::take(&mut state.refused);
            drop(state);
            if refused {
                self.shared.room.notify_waiters();
            }
            return Poll::Ready(Some(Ok(item)));
        }
        if state.producer_done {
            self.finished = true;
            return Poll::Ready(match state.ending.take() {
                Some(Ok(())) => None,
                Some(Err(e)) => Some(Err(QueueError::Failed(e))),
                None => Some(Err(QueueError::Abandoned)),
            });
        }
        park(&mut state.receiver, cx);
        Poll::Pending
    }

    /// Departs: the producer sees it at once. Items already queued can still be received.
    pub fn close(&mut self) {
        self.depart();
    }

    fn depart(&self) {
        let mut state = self.shared.lock();
        if state.consumer_gone {
            return;
        }
        state.consumer_gone = true;
        let producer = state.producer.take();
        drop(state);
        if let Some(producer) = producer {
            producer.wake();
        }
        self.shared.room.notify_waiters();
        self.shared.departed.notify_waiters();
    }

    /// How many items are queued now.
    pub fn depth(&self) -> usize {
        self.shared.lock().items.len()
    }
}

impl<T, E> Drop for Consumer<T, E> {
    /// Departs, and drops what is still queued now rather than when the producer goes too (an
    /// item may hold room the producer is waiting for).
    fn drop(&mut self) {
        self.depart();
        let items = {
            let mut state = self.shared.lock();
            state.bytes = 0;
            std::mem::take(&mut state.items)
        };
        drop(items);
    }
}

impl<T, E> Stream for Consumer<T, E> {
    type Item = Result<T, QueueError<E>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.get_mut().poll_recv(cx)
    }
}

impl<T, E> FusedStream for Consumer<T, E> {
    fn is_terminated(&self) -> bool {
        self.finished
    }
}

impl<T, E> fmt::Debug for Consumer<T, E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Consumer")
            .field("depth", &self.depth())
            .field("finished", &self.finished)
            .finish()
    }
}

/// The consumer departed; the item that could not be sent is handed back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the consumer departed")]
pub struct Departed<T>(pub T);

/// Why [`Producer::try_send`] did not send; the item is handed back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TrySendError<T> {
    /// The queue is full.
    #[error("the queue is full")]
    Full(T),
    /// The consumer departed.
    #[error("the consumer departed")]
    Departed(T),
}

/// How a queue ended, when not successfully.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError<E> {
    /// The producer ended the queue with this error.
    #[error("producer failed: {0}")]
    Failed(E),
    /// The producer went away without saying it was done.
    #[error("producer went away without ending the queue")]
    Abandoned,
}

#[cfg(test)]
#[allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn producer_waits_when_full() {
        let (tx, mut rx) = bounded::<u32, ()>(2);
        tx.send(1).await.expect("room");
        tx.send(2).await.expect("room");
        assert_eq!(tx.depth(), 2);
        assert_eq!(rx.depth(), 2);
        // Full: the third send does not complete until the consumer takes one.
        let third = tokio::time::timeout(Duration::from_secs(1), tx.send(3)).await;
        assert!(third.is_err(), "send must wait while the queue is full");
        assert_eq!(rx.recv().await, Some(Ok(1)));
        tx.send(3).await.expect("room now");
        tx.end();
        assert_eq!(rx.recv().await, Some(Ok(2)));
        assert_eq!(rx.recv().await, Some(Ok(3)));
        assert_eq!(rx.recv().await, None);
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test]
    async fn try_send_never_waits() {
        let (tx, mut rx) = bounded::<u32, ()>(1);
        assert_eq!(tx.try_send(1), Ok(()));
        assert_eq!(tx.try_send(2), Err(TrySendError::Full(2)));
        assert_eq!(rx.recv().await, Some(Ok(1)));
        rx.close();
        assert_eq!(tx.try_send(3), Err(TrySendError::Departed(3)));
    }

    #[tokio::test]
    async fn failure_comes_after_every_item() {
        let (tx, rx) = bounded::<u32, &str>(4);
        tx.send(1).await.expect("room");
        tx.send(2).await.expect("room");
        tx.fail("upstream broke");
        let got: Vec<_> = rx.collect().await;
        assert_eq!(
            got,
            vec![Ok(1), Ok(2), Err(QueueError::Failed("upstream broke"))]
        );
    }

    #[tokio::test]
    async fn a_dropped_producer_is_abandoned_not_finished() {
        let (tx, rx) = bounded::<u32, ()>(4);
        tx.send(1).await.expect("room");
        drop(tx);
        let got: Vec<_> = rx.collect().await;
        assert_eq!(got, vec![Ok(1), Err(QueueError::Abandoned)]);
    }

    #[tokio::test(start_paused = true)]
    async fn consumer_departure_is_seen_at_once() {
        let (tx, mut rx) = bounded::<u32, ()>(1);
        tx.send(1).await.expect("room");
        let waiting = tokio::spawn(async move {
            // Blocked on a full queue when the consumer leaves.
            let r = tx.send(2).await;
            (r, tx.is_departed())
        });
        tokio::task::yield_now().await;
        rx.close();
        let (r, departed) = waiting.await.expect("joined");
        assert_eq!(r, Err(Departed(2)));
        assert!(departed);
        // What was queued before the close is still there.
        assert_eq!(rx.recv().await, Some(Ok(1)));
    }

    #[tokio::test]
    async fn a_dropped_consumer_drops_what_was_queued() {
        let (tx, rx) = bounded::<Arc<()>, ()>(4);
        let item = Arc::new(());
        tx.send(item.clone()).await.expect("room");
        tx.send(item.clone()).await.expect("room");
        assert_eq!(Arc::strong_count(&item), 3);
        drop(rx);
        // Gone with the consumer, not kept until the producer goes too.
        assert_eq!(Arc::strong_count(&item), 1);
        assert!(tx.is_departed());
        assert!(matches!(
            tx.try_send(item.clone()),
            Err(TrySendError::Departed(_))
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_queue_wakes_its_producer_once_an_item_is_taken() {
        let (tx, mut rx) = bounded::<u32, ()>(1);
        tx.send(1).await.expect("room");
        let waiting = tokio::spawn(async move {
            tx.send(2).await.expect("room once taken");
            tx.end();
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "the queue is full");
        assert_eq!(rx.recv().await, Some(Ok(1)));
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by the room")
            .expect("joined");
        assert_eq!(rx.recv().await, Some(Ok(2)));
        assert_eq!(rx.recv().await, None);
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_bounded_in_bytes_waits_for_bytes_and_lets_a_heavy_item_through_alone() {
        let (tx, mut rx) = bounded_in_bytes::<String, ()>(10, 10, String::len);
        tx.try_send("abcd".into()).expect("4 of 10 bytes");
        tx.try_send("efgh".into()).expect("8 of 10 bytes");
        assert_eq!(tx.bytes(), 8);
        // Places are left, bytes are not.
        assert!(matches!(
            tx.try_send("ijk".into()),
            Err(TrySendError::Full(back)) if back == "ijk"
        ));
        let waiting = tokio::spawn(async move {
            tx.send("ijk".into()).await.expect("room once 4 bytes go");
            // Heavier than the whole bound: waits until the queue holds no bytes, then goes.
            tx.send("0123456789abcdef".into()).await.expect("alone");
            assert_eq!(tx.bytes(), 16);
            tx.end();
        });
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "8 + 3 bytes would pass the bound");
        assert_eq!(rx.recv().await, Some(Ok("abcd".to_string())));
        assert_eq!(rx.recv().await, Some(Ok("efgh".to_string())));
        assert_eq!(rx.recv().await, Some(Ok("ijk".to_string())));
        assert_eq!(rx.recv().await, Some(Ok("0123456789abcdef".to_string())));
        assert_eq!(rx.recv().await, None);
        tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("done")
            .expect("joined");
    }

    #[tokio::test(start_paused = true)]
    async fn a_queue_full_in_bytes_wakes_its_producer_once_bytes_are_taken() {
        let (tx, mut rx) = bounded_in_bytes::<String, ()>(10, 4, String::len);
        tx.send("abcd".into()).await.expect("room");
        let waiting = tokio::spawn(async move {
            tx.send("e".into()).await.expect("room once taken");
            tx.bytes()
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "the queue is full in bytes, not in places"
        );
        assert_eq!(rx.recv().await, Some(Ok("abcd".to_string())));
        let bytes = tokio::time::timeout(Duration::from_secs(1), waiting)
            .await
            .expect("woken by the bytes taken")
            .expect("joined");
        assert_eq!(bytes, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn poll_departed_wakes_the_producer_when_the_consumer_leaves() {
        let (tx, rx) = bounded::<u32, ()>(1);
        let watcher = tokio::spawn(async move {
            std::future::poll_fn(|cx| tx.poll_departed(cx)).await;
            tx.is_departed()
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!watcher.is_finished());
        drop(rx);
        let departed = tokio::time::timeout(Duration::from_secs(1), watcher)
            .await
            .expect("woken by the departure")
            .expect("joined");
        assert!(departed);
    }

    #[tokio::test(start_paused = true)]
    async fn consumer_departed_resolves_when_dropped() {
        let (tx, rx) = bounded::<u32, ()>(1);
        let watcher = tokio::spawn(async move {
            tx.consumer_departed().await;
            tx.send(9).await
        });
        tokio::time::sleep(Duration::from_millis(10)).await;
        assert!(!watcher.is_finished());
        drop(rx);
        assert_eq!(watcher.await.expect("joined"), Err(Departed(9)));
    }
}
