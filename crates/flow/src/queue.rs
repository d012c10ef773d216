//! A bounded producer/consumer queue with explicit completion.
//!
//! The lesson's `asyncio.Queue(maxsize=2)` gives backpressure (`put` waits when full), but ends
//! with a sentinel (`None`), and a producer whose consumer has left keeps producing. Here:
//! - the [`Producer`] waits when the queue is full (backpressure, built on tokio's `mpsc`);
//! - completion is explicit: [`Producer::end`] or [`Producer::fail`]. A producer dropped without
//!   either is reported to the consumer as [`QueueError::Abandoned`], so a dead producer never
//!   looks like a finished one;
//! - the consumer's departure is visible to the producer at once: [`Producer::send`] fails and
//!   hands the item back, and [`Producer::consumer_departed`] resolves, so a producer can stop
//!   upstream work the moment its client goes away;
//! - the depth is observable from both ends, for metrics.
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

use std::fmt;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_core::stream::{FusedStream, Stream};
use tokio::sync::mpsc;

/// How the producer said it was done; `None` until it says so.
type Ending<E> = Arc<Mutex<Option<Result<(), E>>>>;

/// Makes a queue that holds at most `capacity` items (at least 1).
pub fn bounded<T, E>(capacity: usize) -> (Producer<T, E>, Consumer<T, E>) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let ending: Ending<E> = Arc::new(Mutex::new(None));
    (
        Producer {
            tx,
            ending: ending.clone(),
        },
        Consumer {
            rx,
            ending,
            finished: false,
        },
    )
}

/// The sending end. Not `Clone`: one producer owns the queue's completion.
pub struct Producer<T, E> {
    tx: mpsc::Sender<T>,
    ending: Ending<E>,
}

impl<T, E> Producer<T, E> {
    /// Sends `item`, waiting while the queue is full. If the consumer has departed, returns the
    /// item in the error at once.
    pub async fn send(&self, item: T) -> Result<(), Departed<T>> {
        self.tx.send(item).await.map_err(|e| Departed(e.0))
    }

    /// Sends `item` only if there is room now; never waits. For items that are worth nothing
    /// later (a keep-alive when the consumer already has items to read).
    pub fn try_send(&self, item: T) -> Result<(), TrySendError<T>> {
        self.tx.try_send(item).map_err(|e| match e {
            mpsc::error::TrySendError::Full(item) => TrySendError::Full(item),
            mpsc::error::TrySendError::Closed(item) => TrySendError::Departed(item),
        })
    }

    /// Ends the queue successfully: the consumer gets every item sent, then the end.
    pub fn end(self) {
        self.finish(Ok(()));
    }

    /// Ends the queue with an error: the consumer gets every item sent, then `error`.
    pub fn fail(self, error: E) {
        self.finish(Err(error));
    }

    fn finish(self, ending: Result<(), E>) {
        *self.ending.lock().unwrap_or_else(PoisonError::into_inner) = Some(ending);
        // Dropping `self.tx` now closes the channel behind the items already sent.
    }

    /// Resolves as soon as the consumer has departed (dropped or closed its end).
    pub async fn consumer_departed(&self) {
        self.tx.closed().await;
    }

    /// Whether the consumer has departed.
    pub fn is_departed(&self) -> bool {
        self.tx.is_closed()
    }

    /// How many items are queued now.
    pub fn depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    /// The queue's capacity.
    pub fn capacity(&self) -> usize {
        self.tx.max_capacity()
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
    rx: mpsc::Receiver<T>,
    ending: Ending<E>,
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
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(item)) => Poll::Ready(Some(Ok(item))),
            Poll::Ready(None) => {
                self.finished = true;
                let ending = self
                    .ending
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                Poll::Ready(match ending {
                    Some(Ok(())) => None,
                    Some(Err(e)) => Some(Err(QueueError::Failed(e))),
                    None => Some(Err(QueueError::Abandoned)),
                })
            }
            Poll::Pending => Poll::Pending,
        }
    }

    /// Departs: the producer sees it at once. Items already queued can still be received.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// How many items are queued now.
    pub fn depth(&self) -> usize {
        self.rx.len()
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
