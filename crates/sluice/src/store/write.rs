//! What a backend's writer is asked to do, in order: the same for every backend.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;

use super::{Finish, NewStream, StoreError, Watermark};

/// After a batch: a failure is logged and counted, every waiting write gets the batch's result,
/// and every appended chunk's watermark moves on (a failed chunk is lost, said so, and never
/// holds its stream up).
pub(super) fn settle(batch: &mut Vec<Op>, result: &Result<(), StoreError>) {
    if let Err(e) = result {
        tracing::error!(error = %e.report(), writes = batch.len(), "store batch failed");
        metrics::counter!("sluice_store_write_errors_total").increment(batch.len() as u64);
    }
    for op in batch.drain(..) {
        match op {
            Op::Begin(_, ack)
            | Op::Finish(_, ack)
            | Op::Flush(ack)
            | Op::Delete { ack, .. }
            | Op::Expire { ack, .. } => {
                // A caller that stopped waiting needs no answer.
                let _ = ack.send(result.clone());
            }
            Op::Append { seq, watermark, .. } => match result {
                Ok(()) => watermark.advance(seq),
                Err(_) => watermark.lose(seq),
            },
        }
    }
}

/// How many writes may wait for the writer.
pub(super) const WRITE_QUEUE: usize = 8192;
/// The most writes committed in one transaction.
pub(super) const MAX_BATCH: usize = 1024;

/// One write. `Begin`, `Finish` and `Flush` are answered once committed; an `Append` moves its
/// stream's watermark instead.
pub(super) enum Op {
    Begin(NewStream, oneshot::Sender<Result<(), StoreError>>),
    Append {
        id: Arc<str>,
        seq: u64,
        offset: Duration,
        data: Arc<str>,
        content: String,
        watermark: Watermark,
    },
    Finish(Finish, oneshot::Sender<Result<(), StoreError>>),
    Flush(oneshot::Sender<Result<(), StoreError>>),
    /// Forget `tenant`'s stream `id` (one that has ended) and its chunks.
    Delete {
        tenant: String,
        id: String,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
    /// Forget every stream that ended and started before `before` (Unix seconds).
    Expire {
        before: i64,
        ack: oneshot::Sender<Result<(), StoreError>>,
    },
}
