//! The group-commit writer: writes arrive over a bounded channel and are committed in batches on
//! the one write connection (by the task whose write found the writer idle, or by one blocking
//! job while writes keep coming); chunks go to the journal and are written to the database in
//! per-stream blocks as their runs fill (by the blocking job, many at once, when a commit on a
//! stream's own thread filled them: see `RunChange::must_write`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, TryLockError};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::store::block::{self, ByStream, LoggedChunk, Run, Runs};
use crate::store::write::{settle, Op, MAX_BATCH};
use crate::store::StoreError;

use super::journal::Journal;
use super::lock;
use super::rows::{BeginRow, FinishRow, Pending, Row};
use super::schema::insert_block;

/// The writer: a queue of writes and, while it holds any, one committer that takes them.
///
/// Why not a writer task that hands each batch to `spawn_blocking`? Every commit then costs two
/// extra thread hand-offs (task → blocking thread → task), and on a loaded machine those
/// wake-ups were most of a commit's latency, which a client sees twice before its first token.
/// Here the committer itself takes the writes and acks them, and who commits depends on load:
///
/// - A write that finds the writer idle and is one a stream waits on (`Op::commits_here`: its
///   record, its final status, a chunk after a pause, which the relay says of a first chunk)
///   is committed at once by the task that queued it, if the batch it finds is a light one (a
///   journal `write` and a few rows, tens of microseconds) and the checkpoint thread does not
///   hold the gate: no thread is woken and none has to wake the stream's client side from
///   outside the runtime, which is what such a commit cost most of on two busy cores (see
///   `docs/durability.md`).
/// - A relay's later chunks wait in the queue ([`Here::Later`]) until a running committer
///   takes them or their relay, about to wait (for the upstream or for room toward its
///   client), commits them ([`Writer::commit_waiting`]): a burst at once where it was read, a
///   lone chunk there if the writer has been [`QUIET`]. (Another caller's later chunk is
///   committed where it is appended if the writer has been quiet.)
/// - Anything else (a busy writer's chunks among it, to be batched), and whatever arrives while
///   a batch is being written, goes to one blocking job
///   under `spawn_blocking` that commits batches until the queue is empty; while writes keep
///   coming it never stops, so a busy gateway pays no hand-off at all, and deleting or expiring
///   streams (any number of rows) never runs on the runtime's threads.
///
/// Either way tokio knows work is in flight (its paused test clock does not jump ahead while a
/// batch is being written), and an idle writer holds no thread.
pub(super) struct Writer {
    pub(super) tx: mpsc::Sender<Op>,
    /// Whether a drain job is running (or about to).
    pub(super) running: AtomicBool,
    /// What the drain job works with; only the running job locks it.
    pub(super) state: Mutex<WriterState>,
    pub(super) runs: Arc<Mutex<Runs>>,
    /// Held for each batch (see `checkpointer`).
    pub(super) gate: Arc<Mutex<()>>,
    pub(super) runtime: tokio::runtime::Handle,
    /// `sluice_store_write_seconds`, looked up once rather than per batch (a lookup hashes the
    /// metric's name in the registry).
    pub(super) write_seconds: metrics::Histogram,
    /// How many rows wait to be written into `streams` (see [`Pending`]); readers have them
    /// written first.
    pub(super) pending_rows: AtomicUsize,
    /// When the last commit ended, in nanoseconds since `epoch` (see [`QUIET`]).
    pub(super) last_commit: AtomicU64,
    /// What `last_commit` counts from.
    pub(super) epoch: Instant,
}

/// How long the writer must have been idle for a stream's lone later chunk (one that is not
/// part of a burst) to be committed by its relay, rather than handed to the blocking job.
///
/// A lone slow stream (a model's tokens come tens of milliseconds apart) then pays no thread
/// hand-off per chunk, while a busy writer, whose commits follow each other closely (many slow
/// streams), keeps batching them on the blocking thread. It also bounds what such commits take
/// from the runtime: at most one per `QUIET`, a journal `write` and a few rows each.
pub(super) const QUIET: Duration = Duration::from_micros(500);

pub(super) struct WriterState {
    pub(super) rx: mpsc::Receiver<Op>,
    pub(super) conn: Connection,
    pub(super) log: LogState,
}

/// Clears `running` if a drain job ends by unwinding, so the next write starts another.
pub(super) struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

impl Writer {
    /// Queues a write (waiting for room) and makes sure a drain job will see it.
    pub(super) async fn send(self: &Arc<Self>, op: Op) -> Result<(), StoreError> {
        let here = Here::of(&op);
        if self.tx.capacity() == 0 {
            // A full queue may be full of chunks left for their relays ([`Here::Later`]), and
            // those relays may be waiting here too: a blocking job empties it.
            self.wake(Here::No);
        }
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        self.wake(here);
        Ok(())
    }

    /// Queues a write if there is room now (never waits), and makes sure a drain job will see it.
    #[allow(
        clippy::result_large_err,
        reason = "the write comes back, moved, only when the queue is full"
    )]
    pub(super) fn try_send(self: &Arc<Self>, op: Op) -> Result<(), TrySendError<Op>> {
        let here = Here::of(&op);
        self.tx.try_send(op)?;
        self.wake(here);
        Ok(())
    }

    /// Commits what a stream's relay left waiting (its chunks since it last called this:
    /// `appended` of them; see [`Here::Later`]), the relay being about to wait: a burst of two or
    /// more on the caller's thread, a lone chunk there only if the writer has been [`QUIET`].
    /// Nothing to do if a committer is running: it takes them.
    pub(super) fn commit_waiting(self: &Arc<Self>, appended: usize) {
        match appended {
            0 => {}
            1 => self.wake(Here::IfQuiet),
            _ => self.wake(Here::Yes),
        }
    }

    /// Starts committing unless a committer is running: here, or in a blocking job.
    fn wake(self: &Arc<Self>, here: Here) {
        if matches!(here, Here::Later) {
            return;
        }
        if !self.running.swap(true, Ordering::SeqCst) {
            let here = match here {
                Here::Yes => true,
                Here::IfQuiet => self.quiet(),
                Here::No | Here::Later => false,
            };
            if here {
                self.commit_here();
            } else {
                self.hand_off(Vec::new());
            }
        }
    }

    /// Whether the last commit ended at least [`QUIET`] ago. Asked only of an idle writer, so a
    /// busy one reads no clock for it.
    fn quiet(&self) -> bool {
        let now = nanos_since(self.epoch, Instant::now());
        is_quiet(self.last_commit.load(Ordering::Relaxed), now)
    }

    /// Hands the committing (starting with `batch`, already taken from the queue) to a
    /// blocking job.
    fn hand_off(self: &Arc<Self>, batch: Vec<Op>) {
        let writer = self.clone();
        // If the runtime is shutting down the job never runs; the writes' acks are then
        // dropped with it and their callers see `Closed`.
        drop(
            self.runtime
                .spawn_blocking(move || writer.drain_from(batch, || {})),
        );
    }

    /// Commits what is queued on the caller's thread if it is one light batch and the writer's
    /// state and gate are free, then stops as a drain job does; otherwise hands off.
    fn commit_here(self: &Arc<Self>) {
        let _running = Running(&self.running);
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // A job that is stopping holds it for one last write: the next job waits for it.
            Err(TryLockError::WouldBlock) => return self.hand_off(Vec::new()),
        };
        let WriterState { rx, conn, log } = &mut *state;
        let mut batch = Vec::new();
        take(rx, &mut batch);
        if batch.is_empty() {
            // Another committer took the write meanwhile.
            return self
                .stop(rx, conn, log, &|| {})
                .map_or((), |b| self.hand_off(b));
        }
        if !batch.iter().all(Op::is_light) {
            drop(state);
            return self.hand_off(batch);
        }
        let gate = match self.gate.try_lock() {
            Ok(gate) => gate,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                drop(state);
                return self.hand_off(batch);
            }
        };
        self.commit_gated(conn, log, &mut batch, Rows::Leave);
        drop(gate);
        // What came meanwhile is a busy writer's: a blocking job takes it, and so does writing
        // the rows that wait (many streams' at once: no stream's first token waits for it).
        take(rx, &mut batch);
        if !batch.is_empty() || log.pending.due(0, 0, tokio::time::Instant::now()) {
            drop(state);
            return self.hand_off(batch);
        }
        if let Some(batch) = self.stop(rx, conn, log, &|| {}) {
            drop(state);
            self.hand_off(batch);
        }
    }

    /// Stops committing, the queue being empty. A write queued after the last look, whose
    /// sender still saw `running`, would otherwise wait for the next write: this looks once
    /// more, and returns it (with `running` set again) if no other committer has started.
    fn stop(
        &self,
        rx: &mut mpsc::Receiver<Op>,
        conn: &mut Connection,
        log: &mut LogState,
        before_stop: &dyn Fn(),
    ) -> Option<Vec<Op>> {
        before_stop();
        self.running.store(false, Ordering::SeqCst);
        match rx.try_recv() {
            Ok(op) if !self.running.swap(true, Ordering::SeqCst) => Some(vec![op]),
            // Another committer was started meanwhile: it takes over (it waits for the state's
            // lock), so this op goes first in its order, committed here.
            Ok(op) => {
                self.commit(conn, log, &mut vec![op]);
                None
            }
            Err(_) => None,
        }
    }

    /// Commits `batch`, then batches until the queue is empty, calling `before_stop` each time
    /// it finds the queue empty, just before it stops: the moment a write can slip in unseen
    /// by it (a test puts one there).
    pub(super) fn drain_from(&self, mut batch: Vec<Op>, before_stop: impl Fn()) {
        let _running = Running(&self.running);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let WriterState { rx, conn, log } = &mut *state;
        if log.pending.due(0, 0, tokio::time::Instant::now()) {
            // Handed off by a commit on a stream's thread that left them.
            self.commit(conn, log, &mut Vec::new());
        }
        loop {
            take(rx, &mut batch);
            if batch.is_empty() {
                match self.stop(rx, conn, log, &before_stop) {
                    Some(op) => batch = op,
                    None => return,
                }
            }
            self.commit(conn, log, &mut batch);
        }
    }

    /// Commits `batch` in one transaction, then acks every write in it (and empties it).
    fn commit(&self, conn: &mut Connection, log: &mut LogState, batch: &mut Vec<Op>) {
        // Held while the checkpoint thread rewinds the WAL (see `checkpointer`).
        let _gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
        self.commit_gated(conn, log, batch, Rows::WhenDue);
    }

    /// [`commit`](Self::commit), the gate being held by the caller.
    fn commit_gated(
        &self,
        conn: &mut Connection,
        log: &mut LogState,
        batch: &mut Vec<Op>,
        rows: Rows,
    ) {
        let result = {
            let started = Instant::now();
            // A panic in a batch must not lose the batch: its acks and watermarks still have to
            // move, or streams would wait for them forever. (The open transaction rolls back,
            // and the runs are only changed after a commit.)
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(conn, batch, &self.runs, log, rows)
            }));
            // Before anyone is acked: a reader that learnt of a stream from its ack finds its
            // row pending (and has it written) or written.
            self.pending_rows
                .store(log.pending.len(), Ordering::Release);
            let ended = Instant::now();
            self.write_seconds
                .record(ended.saturating_duration_since(started).as_secs_f64());
            self.last_commit
                .store(nanos_since(self.epoch, ended), Ordering::Relaxed);
            match applied {
                Ok(r) => r,
                Err(_) => Err(StoreError::Internal(
                    "the store writer panicked on this batch".into(),
                )),
            }
        };
        settle(batch, &result);
    }
}

/// Whether a batch writes the rows that wait to be written into `streams` when they are due
/// (see [`Pending`]). A flush, a deletion or expiry writes them whatever this says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rows {
    /// Yes: a drain job's batch.
    WhenDue,
    /// No: a batch committed on a stream's own thread, which a stream waits for (a record
    /// before its first token); the committer hands them to a drain job instead.
    Leave,
}

/// Where a write may be committed if it finds the writer idle.
#[derive(Debug, Clone, Copy)]
enum Here {
    /// On the caller's thread: a write a stream waits on (`Op::commits_here`).
    Yes,
    /// On the caller's thread if the writer has been quiet.
    IfQuiet,
    /// By the blocking job (deletion, expiry).
    No,
    /// Not yet: a stream's later chunk, left in the queue for a committer that is running to
    /// take, or for its relay to commit with the rest of its burst when it is about to wait
    /// ([`Writer::commit_waiting`]). A fast stream's chunks then share one commit made where
    /// they were read, which wakes its client side once and from the same runtime, instead of
    /// a thread woken for the first of them and the client side woken from there.
    Later,
}

impl Here {
    fn of(op: &Op) -> Self {
        if op.commits_here() {
            Here::Yes
        } else if matches!(
            op,
            Op::Append {
                caller_commits: true,
                ..
            }
        ) {
            Here::Later
        } else if op.is_light() {
            Here::IfQuiet
        } else {
            Here::No
        }
    }
}

/// Whether a writer whose last commit ended at `last_commit` is quiet at `now` (both in
/// nanoseconds since its epoch).
pub(super) fn is_quiet(last_commit: u64, now: u64) -> bool {
    now.saturating_sub(last_commit) >= nanos(QUIET)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn nanos_since(epoch: Instant, t: Instant) -> u64 {
    nanos(t.saturating_duration_since(epoch))
}

/// Moves what is queued into `batch`, up to a batch's worth.
fn take(rx: &mut mpsc::Receiver<Op>, batch: &mut Vec<Op>) {
    while batch.len() < MAX_BATCH {
        match rx.try_recv() {
            Ok(op) => batch.push(op),
            Err(_) => break,
        }
    }
}

/// The journal, and what the writer remembers about it between batches.
#[derive(Debug)]
pub(super) struct LogState {
    /// Where chunks, records and final statuses become durable.
    pub(super) journal: Journal,
    /// Records (chunks and rows) appended since the journal's head was last trimmed.
    pub(super) appended: i64,
    /// Records and final statuses journaled and not yet written into `streams`.
    pub(super) pending: Pending,
    /// Streams whose runs filled in a batch committed on a stream's own thread
    /// ([`Rows::Leave`]) and were left for a drain job's batch to write as blocks (see
    /// [`RunChange::must_write`]).
    pub(super) full: ByStream<()>,
}

/// What a batch does to one stream's run; applied to the shared runs once committed.
#[derive(Debug, Default)]
pub(super) struct RunChange {
    /// The run as it was before the batch has been written as a block.
    written: bool,
    /// Chunks this batch logged (after that block, if any).
    staged: Run,
    /// The shared run's chunks and bytes when the batch first touched it (only this writer
    /// changes the runs, and only after a batch): what [`Self::is_full`] counts, so that a
    /// batch's chunks do not each lock and look up the shared runs.
    base: (usize, usize),
}

impl RunChange {
    /// A change to the stream `id`'s run as `runs` holds it now.
    fn based_on(runs: &Runs, id: &str) -> Self {
        Self {
            base: runs
                .get(id)
                .map_or((0, 0), |run| (run.chunks.len(), run.bytes)),
            ..Self::default()
        }
    }

    /// The run's chunks as they now stand: what is left of the shared run, then the staged ones.
    fn chunks<'a>(&'a self, runs: &'a Runs, id: &str) -> impl Iterator<Item = &'a LoggedChunk> {
        let base = if self.written { None } else { runs.get(id) };
        base.into_iter()
            .flat_map(|run| run.chunks.iter())
            .chain(self.staged.chunks.iter())
    }

    /// The run's chunks and bytes as they now stand.
    fn size(&self) -> (usize, usize) {
        let (n, bytes) = if self.written { (0, 0) } else { self.base };
        (n + self.staged.chunks.len(), bytes + self.staged.bytes)
    }

    fn is_full(&self) -> bool {
        let (n, bytes) = self.size();
        n >= block::BLOCK_CHUNKS || bytes >= block::BLOCK_BYTES
    }

    /// Whether a full run is written as a block by this batch: always by a drain job's
    /// ([`Rows::WhenDue`]), which writes many streams' blocks in one transaction; by a batch on
    /// a stream's own thread ([`Rows::Leave`]) only once the run holds twice a block's worth
    /// ([`block::LEFT_FULL`]). Otherwise a stream's chunk would wait for a SQLite transaction
    /// (its locks, its WAL writes) whenever its run filled, every 64th chunk of a lone stream;
    /// the chunks are durable in the journal already and readers find them in the run.
    fn must_write(&self, when: Rows) -> bool {
        let (n, bytes) = self.size();
        match when {
            Rows::WhenDue => self.is_full(),
            Rows::Leave => {
                n >= block::LEFT_FULL * block::BLOCK_CHUNKS
                    || bytes >= block::LEFT_FULL * block::BLOCK_BYTES
            }
        }
    }

    /// Writes the run as it now stands as one block.
    fn write(&mut self, tx: &Connection, runs: &Mutex<Runs>, id: &str) -> Result<(), StoreError> {
        let block = {
            let runs = lock(runs);
            let chunks: Vec<&LoggedChunk> = self.chunks(&runs, id).collect();
            match (chunks.first(), chunks.last()) {
                (Some(first), Some(last)) => {
                    Some((first.seq, last.seq, block::encode(chunks.iter().copied())))
                }
                _ => None,
            }
        };
        if let Some((first, last, body)) = block {
            insert_block(tx, id, first, last, body)?;
        }
        self.written = true;
        self.staged = Run::default();
        Ok(())
    }
}

/// Commits `batch`: its chunks, records and final statuses to the journal with one `write`,
/// blocks that filled into SQLite, and the rows waiting to be written into `streams`
/// ([`Pending`]) when they are due or the batch needs them there (a flush, a deletion, expiry).
/// On an error nothing of the batch counts: its staged journal records are dropped and the
/// transaction rolls back.
pub(super) fn apply(
    conn: &mut Connection,
    batch: &mut [Op],
    runs: &Mutex<Runs>,
    log: &mut LogState,
    when: Rows,
) -> Result<(), StoreError> {
    let applied = apply_staged(conn, batch, runs, log, when);
    if applied.is_err() {
        log.journal.discard();
    }
    applied
}

fn apply_staged(
    conn: &mut Connection,
    batch: &mut [Op],
    runs: &Mutex<Runs>,
    log: &mut LogState,
    when: Rows,
) -> Result<(), StoreError> {
    let mut tx = Batch::new(conn);
    let mut changes: ByStream<RunChange> = ByStream::default();
    // This batch's rows with their journal positions; those before `rows.written` are written
    // into `streams` in this transaction, as are the pending ones if `rows.pending_written`.
    let mut rows = BatchRows::default();
    for op in batch {
        match op {
            Op::Begin(s, _) => rows.stage(log, Row::Begin(BeginRow::take(s))),
            Op::Append {
                id,
                seq,
                offset,
                data,
                content,
                ..
            } => {
                let chunk = LoggedChunk {
                    seq: *seq,
                    offset_us: offset.as_micros() as i64,
                    data: data.clone(),
                    content: std::mem::take(content),
                };
                let position = log.journal.stage(id, &chunk);
                log.appended += 1;
                let change = changes
                    .entry(id.clone())
                    .or_insert_with(|| RunChange::based_on(&lock(runs), id));
                change.staged.push(position, chunk);
                if change.must_write(when) {
                    change.write(tx.sql()?, runs, id)?;
                }
            }
            Op::Finish(f, _) => rows.stage(log, Row::Finish(FinishRow::of(f))),
            Op::Flush(_) => rows.write(tx.sql()?, runs, &mut changes, &log.pending)?,
            Op::Expire { before, .. } => {
                rows.write(tx.sql()?, runs, &mut changes, &log.pending)?;
                tx.sql()?.execute(
                    "DELETE FROM chunk_blocks WHERE stream_id IN
                        (SELECT id FROM streams WHERE created < ?1 AND status != 'streaming')",
                    params![*before],
                )?;
                tx.sql()?.execute(
                    "DELETE FROM streams WHERE created < ?1 AND status != 'streaming'",
                    params![*before],
                )?;
            }
            Op::Delete { tenant, id, .. } => {
                rows.write(tx.sql()?, runs, &mut changes, &log.pending)?;
                let gone = tx.sql()?.execute(
                    "DELETE FROM streams WHERE id = ?1 AND tenant = ?2 AND status != 'streaming'",
                    params![&*id, &*tenant],
                )?;
                if gone > 0 {
                    tx.sql()?.execute(
                        "DELETE FROM chunk_blocks WHERE stream_id = ?1",
                        params![&*id],
                    )?;
                }
            }
        }
    }
    if when == Rows::WhenDue && rows.due(&log.pending) {
        rows.write(tx.sql()?, runs, &mut changes, &log.pending)?;
    }
    if when == Rows::WhenDue {
        // The runs batches on streams' own threads left full, all in this transaction. (A run
        // written since, or gone with its stream, is not written again.)
        for id in log.full.keys() {
            let change = changes
                .entry(id.clone())
                .or_insert_with(|| RunChange::based_on(&lock(runs), id));
            if !change.written && change.is_full() {
                change.write(tx.sql()?, runs, id)?;
            }
        }
    }
    let keep_from = if log.appended >= block::LOG_CHECK_EVERY {
        log.appended = 0;
        let runs_from = trim_log(tx.sql()?, runs, &mut changes, log.journal.position())?;
        // Rows not written into `streams` are kept in the journal too.
        Some(
            [Some(runs_from), rows.unwritten_from(&log.pending)]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or(runs_from),
        )
    } else {
        None
    };
    // The batch is durable before it is acked; if it cannot be, the transaction rolls back and
    // nothing of the batch counts.
    log.journal.write()?;
    tx.commit()?;
    if let Some(keep_from) = keep_from {
        // Every chunk and row before `keep_from` is in the database now. (If the segments
        // cannot be deleted, the next look tries again; replay would skip what they hold.)
        if let Err(e) = log.journal.trim(keep_from) {
            tracing::warn!(error = %e.report(), "journal segments not deleted");
        }
    }
    rows.settle(&mut log.pending);
    if when == Rows::WhenDue {
        log.full.clear();
    }
    let mut runs = lock(runs);
    for (id, change) in changes {
        // What a batch on a stream's own thread left full waits for a drain job (see
        // `RunChange::must_write`); a run written since (twice full, or with its final status)
        // no longer does.
        if change.is_full() {
            log.full.insert(id.clone(), ());
        } else if change.written {
            log.full.remove(&id);
        }
        if change.written {
            runs.remove(&id);
        }
        if !change.staged.chunks.is_empty() {
            runs.entry(id).or_default().append(change.staged);
        }
    }
    Ok(())
}

/// A batch's rows (streams' records and final statuses), and which of them, with the pending
/// ones, it writes into `streams`.
#[derive(Default)]
struct BatchRows {
    /// Each with its journal position.
    rows: Vec<(i64, Row)>,
    /// How many of `rows` are written in this transaction.
    written: usize,
    /// Whether the pending rows are.
    pending_written: bool,
}

impl BatchRows {
    /// Journals `row`.
    fn stage(&mut self, log: &mut LogState, row: Row) {
        let at = log.journal.stage_row(&row);
        // Rows count toward the journal's next trim as chunks do: with transcripts off they
        // are all it holds.
        log.appended += 1;
        self.rows.push((at, row));
    }

    /// Whether the rows should be written into `streams` now: those waiting are due (see
    /// [`Pending::due`]), or the pending ones are being written already.
    fn due(&self, pending: &Pending) -> bool {
        let unwritten = &self.rows[self.written..];
        if unwritten.is_empty() && (self.pending_written || pending.len() == 0) {
            return false;
        }
        self.pending_written
            || pending.due(
                unwritten.len(),
                unwritten.iter().map(|(_, r)| r.bytes()).sum(),
                tokio::time::Instant::now(),
            )
    }

    /// Writes the pending rows (unless written already) and this batch's so far into
    /// `streams`, each final status after its stream's last chunks.
    fn write(
        &mut self,
        tx: &Connection,
        runs: &Mutex<Runs>,
        changes: &mut ByStream<RunChange>,
        pending: &Pending,
    ) -> Result<(), StoreError> {
        let earlier = if self.pending_written {
            &[][..]
        } else {
            pending.rows()
        };
        for row in earlier
            .iter()
            .chain(self.rows[self.written..].iter().map(|(_, r)| r))
        {
            if let Row::Finish(f) = row {
                let id: Arc<str> = Arc::from(f.id.as_str());
                changes
                    .entry(id.clone())
                    .or_default()
                    .write(tx, runs, &id)?;
            }
            row.write(tx)?;
        }
        self.pending_written = true;
        self.written = self.rows.len();
        Ok(())
    }

    /// The first journal position of the rows that stay unwritten.
    fn unwritten_from(&self, pending: &Pending) -> Option<i64> {
        let pending = (!self.pending_written)
            .then(|| pending.first_log())
            .flatten();
        pending.or_else(|| self.rows.get(self.written).map(|(at, _)| *at))
    }

    /// After the commit: what was written is no longer pending, what was not now is.
    fn settle(mut self, pending: &mut Pending) {
        if self.pending_written {
            pending.clear();
        }
        let rest = self.rows.split_off(self.written);
        if let Some((first, _)) = rest.first() {
            let first = *first;
            pending.extend(
                first,
                rest.into_iter().map(|(_, r)| r).collect(),
                tokio::time::Instant::now(),
            );
        }
    }
}

/// A batch's transaction, begun at its first statement (a batch of chunks whose blocks are not
/// full has none: its `write` to the journal is all it needs) and committed with cached
/// statements: rusqlite's `Transaction` prepares `BEGIN` and `COMMIT` anew each time, which cost
/// a short stream's writer a tenth of its work. Dropped before [`commit`](Self::commit), it rolls
/// back.
struct Batch<'c> {
    conn: &'c Connection,
    open: bool,
}

impl<'c> Batch<'c> {
    fn new(conn: &'c Connection) -> Self {
        Self { conn, open: false }
    }

    /// The connection, inside the batch's transaction (begun now if it was not).
    fn sql(&mut self) -> Result<&'c Connection, StoreError> {
        if !self.open {
            self.conn.prepare_cached("BEGIN")?.execute([])?;
            self.open = true;
        }
        Ok(self.conn)
    }

    fn commit(mut self) -> Result<(), StoreError> {
        if self.open {
            self.conn.prepare_cached("COMMIT")?.execute([])?;
            self.open = false;
        }
        Ok(())
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if self.open {
            // A failed COMMIT may have ended the transaction already; then this is a no-op error.
            let _ = self.conn.execute_batch("ROLLBACK");
        }
    }
}

/// Writes runs that started too far back in the journal (`newest` being its end) as blocks,
/// and returns the position before which the journal holds nothing a run needs.
pub(super) fn trim_log(
    tx: &Connection,
    runs: &Mutex<Runs>,
    changes: &mut ByStream<RunChange>,
    newest: i64,
) -> Result<i64, StoreError> {
    let old: Vec<Arc<str>> = lock(runs)
        .iter()
        .filter(|(id, run)| {
            run.first_log < newest - block::LOG_SPAN && !changes.get(*id).is_some_and(|c| c.written)
        })
        .map(|(id, _)| id.clone())
        .collect();
    for id in old {
        changes
            .entry(id.clone())
            .or_default()
            .write(tx, runs, &id)?;
    }
    let still_shared = lock(runs)
        .iter()
        .filter(|(id, _)| !changes.get(*id).is_some_and(|c| c.written))
        .map(|(_, run)| run.first_log)
        .min();
    let staged = changes
        .values()
        .filter(|c| !c.staged.chunks.is_empty())
        .map(|c| c.staged.first_log)
        .min();
    Ok([still_shared, staged]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(newest))
}
