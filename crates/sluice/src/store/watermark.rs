//! [`Watermark`]: how far a stream's chunks are committed, for whoever waits on one.

use std::sync::Arc;

use tokio::sync::watch;

/// A stream's commit watermark: the id of its last committed chunk. The writer advances it after
/// each batch; readers wait for it to reach a chunk before handing that chunk to anyone. One per
/// stream, cheap to clone: no allocation per chunk.
#[derive(Debug, Clone)]
pub struct Watermark(Arc<watch::Sender<u64>>);

impl Default for Watermark {
    fn default() -> Self {
        Self(Arc::new(watch::Sender::new(0)))
    }
}

impl Watermark {
    /// A watermark at 0 (nothing committed).
    pub fn new() -> Self {
        Self::default()
    }

    /// The id of the last committed chunk.
    pub fn get(&self) -> u64 {
        *self.0.borrow()
    }

    /// Waits until chunk `seq` is committed.
    pub async fn reached(&self, seq: u64) {
        if self.get() >= seq {
            return;
        }
        let mut rx = self.0.subscribe();
        // The sender lives in `self`, so this only ends when the mark is reached.
        let _ = rx.wait_for(|committed| *committed >= seq).await;
    }

    pub(super) fn advance(&self, seq: u64) {
        self.0.send_if_modified(|committed| {
            let moved = seq > *committed;
            if moved {
                *committed = seq;
            }
            moved
        });
    }
}
