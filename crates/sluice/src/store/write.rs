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
    let mut burst = Burst::default();
    for op in batch.drain(..) {
        match op {
            Op::Begin(_, ack)
            | Op::Finish(_, ack)
            | Op::Flush(ack)
            | Op::Delete { ack, .. }
            | Op::Expire { ack, .. } => {
                // The chunks before a write are settled before it is answered.
                burst.end();
                // A caller that stopped waiting needs no answer.
                let _ = ack.send(result.clone());
            }
            Op::Append { seq, watermark, .. } => match result {
                Ok(()) => burst.add(watermark, seq),
                Err(_) => watermark.lose(seq),
            },
        }
    }
    burst.end();
}

/// One stream's chunks in a row in a batch (a relay's burst): its watermark moves once, to the
/// last of them, so its client side is woken and its waiters looked at once per burst rather
/// than once per chunk.
#[derive(Default)]
struct Burst(Option<(Watermark, u64)>);

impl Burst {
    /// Chunk `seq` of the stream that `mark` is the watermark of, committed.
    fn add(&mut self, mark: Watermark, seq: u64) {
        match &mut self.0 {
            Some((same, last)) if same.same(&mark) => *last = seq.max(*last),
            _ => {
                self.end();
                self.0 = Some((mark, seq));
            }
        }
    }

    /// Moves the burst's watermark.
    fn end(&mut self) {
        if let Some((mark, last)) = self.0.take() {
            mark.advance(last);
        }
    }
}

impl Op {
    /// Whether a writer that is idle commits this write on the caller's thread whatever its
    /// recent load: a stream's record, its final status, and a chunk that came after a pause
    /// (the relay says so of a stream's first: what a first token waits for). A relay's later
    /// chunks wait for it to commit them with the rest of their burst (the SQLite writer's
    /// `Here::Later`); other chunks are committed there only if the writer has also been quiet
    /// for a while (the SQLite writer's `QUIET`), else by the blocking job with whatever else is
    /// waiting. Committed one by one, a fast stream's chunks would each wake its client side
    /// and take a write of their own (one stream's throughput halved, `sluice-bench
    /// --only-throughput 1`).
    pub(super) fn commits_here(&self) -> bool {
        match self {
            Op::Append { promptly, .. } => *promptly,
            other => other.is_light(),
        }
    }

    /// Whether the write is one a stream makes as it runs (its record, a chunk, its final
    /// status, a flush): a few rows at most, light enough to commit on a runtime thread.
    /// Deleting and expiring can touch any number of rows.
    pub(super) fn is_light(&self) -> bool {
        matches!(
            self,
            Op::Begin(..) | Op::Append { .. } | Op::Finish(..) | Op::Flush(_)
        )
    }
}

/// When a chunk arrived in its stream, for the store: its offset from the stream's start (kept
/// in the transcript), whether it came after a pause, and who has it committed if it did not
/// (see [`Store::append`]).
///
/// [`Store::append`]: super::Store::append
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arrival {
    /// Since the stream's request arrived.
    pub offset: Duration,
    /// The stream had been quiet before it: no other chunk of it is about to be batched with
    /// it, so it is worth committing at once.
    pub after_pause: bool,
    /// The caller (a stream's relay) has the chunk committed with the rest of its burst: it
    /// calls [`Store::commit_waiting`] before it waits for anything. Otherwise the store sees
    /// to it by itself.
    ///
    /// [`Store::commit_waiting`]: super::Store::commit_waiting
    pub caller_commits: bool,
}

/// A chunk that came in a burst (no pause before it), committed without the caller's help.
impl From<Duration> for Arrival {
    fn from(offset: Duration) -> Self {
        Self {
            offset,
            after_pause: false,
            caller_commits: false,
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
        /// Commit it on the caller's thread if the writer is idle (see [`Arrival`]).
        promptly: bool,
        /// Its caller has it committed (see [`Arrival::caller_commits`]).
        caller_commits: bool,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn append(mark: &Watermark, seq: u64) -> Op {
        Op::Append {
            id: Arc::from("s"),
            seq,
            offset: Duration::ZERO,
            data: Arc::from("{}"),
            content: String::new(),
            watermark: mark.clone(),
            promptly: false,
            caller_commits: true,
        }
    }

    #[test]
    fn every_stream_in_a_batch_reaches_its_last_chunk() {
        let (a, b) = (Watermark::new(), Watermark::new());
        let (ack, mut answered) = oneshot::channel();
        let mut batch = vec![
            append(&a, 1),
            append(&a, 2),
            append(&b, 1),
            append(&a, 3),
            Op::Flush(ack),
            append(&b, 2),
            append(&b, 3),
        ];
        settle(&mut batch, &Ok(()));
        assert!(batch.is_empty());
        assert_eq!((a.get(), b.get()), (3, 3));
        assert!(a.is_stored(3) && b.is_stored(3) && a.lost().is_none());
        assert!(matches!(answered.try_recv(), Ok(Ok(()))));
    }

    #[test]
    fn a_failed_batch_loses_each_streams_first_chunk_in_it() {
        let (a, b) = (Watermark::new(), Watermark::new());
        a.advance_for_test(1);
        let mut batch = vec![append(&a, 2), append(&a, 3), append(&b, 1)];
        settle(&mut batch, &Err(StoreError::Closed));
        assert_eq!((a.lost(), b.lost()), (Some(2), Some(1)));
        assert_eq!((a.get(), b.get()), (3, 1));
        assert!(a.is_stored(1) && !a.is_stored(2));
    }
}
