//! [`Watermark`]: how far a stream's chunks are committed, for whoever waits on one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::watch;

/// A stream's commit watermark: the id of its last committed chunk. The writer advances it after
/// each batch; readers wait for it to reach a chunk before handing that chunk to anyone. One per
/// stream, cheap to clone: no allocation per chunk.
///
/// A chunk whose batch failed moves the watermark too (nobody waits forever), but is marked
/// lost: [`is_stored`](Self::is_stored) says no, and [`lost`](Self::lost) says the stream can no
/// longer keep its transcript whole.
#[derive(Debug, Clone, Default)]
pub struct Watermark {
    committed: Arc<watch::Sender<u64>>,
    /// The first chunk that could not be stored (0: none).
    lost_from: Arc<AtomicU64>,
}

impl Watermark {
    /// A watermark at 0 (nothing committed).
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the last committed chunk.
    pub fn get(&self) -> u64 {
        *self.committed.borrow()
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
        if self.get() >= seq {
            return;
        }
        let mut rx = self.committed.subscribe();
        // The sender lives in `self`, so this only ends when the mark is reached.
        let _ = rx.wait_for(|committed| *committed >= seq).await;
    }

    /// Chunk `seq`'s batch failed: it is lost, and the mark moves past it all the same.
    pub(super) fn lose(&self, seq: u64) {
        // The first loss is the one that counts.
        let _ = self
            .lost_from
            .compare_exchange(0, seq, Ordering::SeqCst, Ordering::SeqCst);
        self.advance(seq);
    }

    pub(super) fn advance(&self, seq: u64) {
        self.committed.send_if_modified(|committed| {
            let moved = seq > *committed;
            if moved {
                *committed = seq;
            }
            moved
        });
    }
}
