//! The group-commit writer: writes arrive over a bounded channel and are committed in batches to
//! the chunk journal (by the task whose write found the writer idle, or by one blocking job while
//! writes keep coming); what the journal holds is written into SQLite by a job of its own, the
//! fold: streams' rows many at a time, chunks in per-stream blocks as their runs fill, deletions
//! and expiry. A batch's commit never waits for SQLite, except to bound a run's memory (see
//! `RunChange::must_write`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, TryLockError};
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

/// The writer: a queue of writes and, while it holds any, one committer that takes them; and
/// the fold, which writes into SQLite what the committers left in the journal.
///
/// Why not a writer task that hands each batch to `spawn_blocking`? Every commit then costs two
/// extra thread hand-offs (task → blocking thread → task), and on a loaded machine those
/// wake-ups were most of a commit's latency, which a client sees twice before its first token.
/// Here the committer itself takes the writes and acks them, and who commits depends on load:
///
/// - A write that finds the writer idle and is one a stream waits on (`Op::commits_here`: its
///   record, its final status, a chunk after a pause, which the relay says of a first chunk)
///   is committed at once by the task that queued it, if the batch it finds is a light one (a
///   journal `write`, tens of microseconds): no thread is woken and none has to wake the
///   stream's client side from outside the runtime, which is what such a commit cost most of
///   on two busy cores (see `docs/durability.md`).
/// - A relay's later chunks wait in the queue ([`Here::Later`]) until a running committer
///   takes them or their relay, about to wait (for the upstream or for room toward its
///   client), commits them ([`Writer::commit_waiting`]): a burst at once where it was read, a
///   lone chunk there if the writer has been [`QUIET`]. (Another caller's later chunk is
///   committed where it is appended if the writer has been quiet.)
/// - Anything else (a busy writer's chunks among it, to be batched), and whatever arrives while
///   a batch is being written, goes to one blocking job under `spawn_blocking` that commits
///   batches until the queue is empty; while writes keep coming it never stops, so a busy
///   gateway pays no hand-off at all.
///
/// Why a fold of its own? A batch is durable once the journal has it, and SQLite's share of
/// the work (rows, blocks, deletions) is a transaction of its own, with its locks and WAL
/// writes, up to milliseconds for a few hundred streams' rows. Done by the committer, it held
/// the writer while a stream's first chunk waited behind it. The fold takes its work from the
/// committers' state in a moment and writes it holding only the connection (and the
/// checkpoint's gate), while committers go on journaling and acking; deleting or expiring
/// streams (any number of rows) runs there too, never on the runtime's threads.
///
/// Locks are taken in the order `state`, `gate`, `db` (then `runs`, briefly). The fold takes
/// `state` only while it holds neither of the others, or first.
///
/// Either way tokio knows work is in flight (its paused test clock does not jump ahead while a
/// batch is being written), and an idle writer holds no thread.
pub(super) struct Writer {
    pub(super) tx: mpsc::Sender<Op>,
    /// Whether a drain job is running (or about to).
    pub(super) running: AtomicBool,
    /// What the committers work with; only the one committing locks it (and the fold, briefly).
    pub(super) state: Mutex<WriterState>,
    /// The write connection, and rows a failed fold holds: the fold's, and a committer's that
    /// must write a run to bound its memory.
    pub(super) db: Mutex<Db>,
    /// Whether a fold job is running (or about to).
    pub(super) folding: AtomicBool,
    /// Whether the fold holds `state` (for a moment: see [`Writer::fold`]).
    pub(super) fold_in_state: AtomicBool,
    pub(super) runs: Arc<Mutex<Runs>>,
    /// Held for each SQLite transaction (see `checkpointer`).
    pub(super) gate: Arc<Mutex<()>>,
    pub(super) runtime: tokio::runtime::Handle,
    /// `sluice_store_write_seconds`, looked up once rather than per batch (a lookup hashes the
    /// metric's name in the registry).
    pub(super) write_seconds: metrics::Histogram,
    /// How many rows wait to be written into `streams` (see [`Pending`]), the fold's among
    /// them; readers have them written first.
    pub(super) pending_rows: AtomicUsize,
    /// How many rows a failed fold holds ([`Db::held`]); readers count them too.
    pub(super) held_rows: AtomicUsize,
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
/// from the runtime: at most one per `QUIET`, a journal `write` each.
pub(super) const QUIET: Duration = Duration::from_micros(500);

pub(super) struct WriterState {
    pub(super) rx: mpsc::Receiver<Op>,
    pub(super) log: LogState,
}

/// The write connection and what only those holding it touch.
pub(super) struct Db {
    pub(super) conn: Connection,
    /// Rows a fold took from the journal side and could not write (its transaction failed),
    /// oldest first: the next fold writes them before any other.
    pub(super) held: Vec<Row>,
}

/// Clears a job's flag (`running`, `folding`) if the job ends by unwinding, so the next write
/// starts another.
pub(super) struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// state is free, then stops as a drain job does; otherwise hands off.
    fn commit_here(self: &Arc<Self>) {
        let _running = Running(&self.running);
        let mut state = match self.state.try_lock() {
            Ok(state) => state,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            // The fold holds it for a moment (it was woken by this relay's last commit, most
            // likely): worth waiting for, where a hand-off would wake a thread and then this
            // stream's client side from outside the runtime.
            Err(TryLockError::WouldBlock) if self.fold_in_state.load(Ordering::Acquire) => {
                locked(&self.state)
            }
            // A job that is stopping holds it for one last write: a blocking job waits for it.
            Err(TryLockError::WouldBlock) => return self.hand_off(Vec::new()),
        };
        let WriterState { rx, log } = &mut *state;
        let mut batch = Vec::new();
        take(rx, &mut batch);
        if batch.is_empty() {
            // Another committer took the write meanwhile.
            return self.stop(rx, log, &|| {}).map_or((), |b| self.hand_off(b));
        }
        if !batch.iter().all(Op::is_light) {
            drop(state);
            return self.hand_off(batch);
        }
        self.commit(log, &mut batch);
        // What came meanwhile is a busy writer's: a blocking job takes it.
        take(rx, &mut batch);
        if !batch.is_empty() {
            drop(state);
            return self.hand_off(batch);
        }
        if let Some(batch) = self.stop(rx, log, &|| {}) {
            drop(state);
            self.hand_off(batch);
        }
    }

    /// Stops committing, the queue being empty. A write queued after the last look, whose
    /// sender still saw `running`, would otherwise wait for the next write: this looks once
    /// more, and returns it (with `running` set again) if no other committer has started.
    fn stop(
        self: &Arc<Self>,
        rx: &mut mpsc::Receiver<Op>,
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
                self.commit(log, &mut vec![op]);
                None
            }
            Err(_) => None,
        }
    }

    /// Commits `batch`, then batches until the queue is empty, calling `before_stop` each time
    /// it finds the queue empty, just before it stops: the moment a write can slip in unseen
    /// by it (a test puts one there).
    pub(super) fn drain_from(self: &Arc<Self>, mut batch: Vec<Op>, before_stop: impl Fn()) {
        let _running = Running(&self.running);
        let mut state = locked(&self.state);
        let WriterState { rx, log } = &mut *state;
        loop {
            take(rx, &mut batch);
            if batch.is_empty() {
                match self.stop(rx, log, &before_stop) {
                    Some(op) => batch = op,
                    None => return,
                }
            }
            self.commit(log, &mut batch);
        }
    }

    /// Commits `batch` to the journal, then acks every write in it (and empties it); what it
    /// leaves SQLite to do goes to the fold.
    fn commit(self: &Arc<Self>, log: &mut LogState, batch: &mut Vec<Op>) {
        let result = {
            let started = Instant::now();
            // A panic in a batch must not lose the batch: its acks and watermarks still have to
            // move, or streams would wait for them forever. (The runs are only changed after
            // the journal's write.)
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(&self.db, &self.gate, batch, &self.runs, log)
            }));
            // Before anyone is acked: a reader that learnt of a stream from its ack finds its
            // row pending (and has it written) or written.
            self.pending_rows
                .store(log.pending_rows(), Ordering::Release);
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
        if log.fold_due(tokio::time::Instant::now()) {
            self.start_fold();
        }
    }

    /// Starts the fold unless it is running. Called holding `state`, as the fold is when it
    /// decides to stop: no work is left behind unseen.
    fn start_fold(self: &Arc<Self>) {
        if !self.folding.swap(true, Ordering::SeqCst) {
            let writer = self.clone();
            // If the runtime is shutting down the job never runs: what it would have written is
            // in the journal, and replayed at the next start; the acks of a deletion or expiry
            // are dropped and their callers see `Closed`.
            drop(self.runtime.spawn_blocking(move || writer.fold()));
        }
    }

    /// The fold job: pass after pass while the committers' state says there is work
    /// ([`LogState::fold_due`]), takes it (under `state`, `gate` and `db`), lets `state` go,
    /// and writes it in one transaction; the next look at `state` settles that pass (the
    /// journal's trim) and takes the next one's work, so a pass takes `state` once. A pass that
    /// fails ends the job; the next commit starts another.
    pub(super) fn fold(self: &Arc<Self>) {
        let _folding = Running(&self.folding);
        let mut last: Option<(FoldWork, Result<(), StoreError>)> = None;
        loop {
            let mut state = locked(&self.state);
            // Said while `state` is held (and cleared if this unwinds).
            let in_state = InState::new(&self.fold_in_state);
            let (mut acks, result) = match last.take() {
                Some((work, result)) => {
                    let acks = state.log.after_fold(&self.runs, work, result.is_ok());
                    self.pending_rows
                        .store(state.log.pending_rows(), Ordering::Release);
                    (acks, result)
                }
                None => (Vec::new(), Ok(())),
            };
            let due = result.is_ok() && {
                state.log.refresh_full(&self.runs);
                state.log.fold_due(tokio::time::Instant::now())
            };
            if !due {
                self.folding.store(false, Ordering::SeqCst);
                drop(in_state);
                drop(state);
                settle(&mut acks, &result);
                return;
            }
            // The checkpoint thread may hold the gate for a while: committers are not kept
            // waiting for it behind this job.
            let gate = match self.gate.try_lock() {
                Ok(gate) => gate,
                Err(TryLockError::Poisoned(p)) => p.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    drop(in_state);
                    drop(state);
                    settle(&mut acks, &result);
                    drop(locked(&self.gate));
                    continue;
                }
            };
            // Free: only a committer holding `state` takes it, and this job does.
            let mut db = locked(&self.db);
            let work = state.log.take_fold_work(tokio::time::Instant::now());
            self.pending_rows
                .store(state.log.pending_rows(), Ordering::Release);
            drop(in_state);
            drop(state);
            settle(&mut acks, &result);
            let started = Instant::now();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                fold(&mut db, &self.runs, &work)
            }))
            .unwrap_or_else(|_| {
                Err(StoreError::Internal(
                    "the store's fold panicked on this pass".into(),
                ))
            });
            self.write_seconds.record(started.elapsed().as_secs_f64());
            let work = match &result {
                Ok(()) => work,
                // Its rows stay with the connection for the next pass, and readers count them.
                Err(_) => work.keep_rows(&mut db),
            };
            self.held_rows.store(db.held.len(), Ordering::Release);
            drop(db);
            drop(gate);
            last = Some((work, result));
        }
    }
}

/// Sets a flag while it lives (the fold's `fold_in_state`).
struct InState<'a>(&'a AtomicBool);

impl<'a> InState<'a> {
    fn new(flag: &'a AtomicBool) -> Self {
        flag.store(true, Ordering::Release);
        Self(flag)
    }
}

impl Drop for InState<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

/// Where a write may be committed if it finds the writer idle.
#[derive(Debug, Clone, Copy)]
enum Here {
    /// On the caller's thread: a write a stream waits on (`Op::commits_here`).
    Yes,
    /// On the caller's thread if the writer has been quiet.
    IfQuiet,
    /// By the blocking job, which hands it to the fold (deletion, expiry).
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
pub(super) struct LogState {
    /// Where chunks, records and final statuses become durable.
    pub(super) journal: Journal,
    /// Records (chunks and rows) appended since the fold last looked at the journal's head.
    pub(super) appended: i64,
    /// Records and final statuses journaled and not yet written into `streams`.
    pub(super) pending: Pending,
    /// Streams whose runs filled and were left for the fold to write as blocks (see
    /// [`RunChange::must_write`]).
    pub(super) full: ByStream<()>,
    /// Whether a run left full holds twice a block's worth ([`block::LEFT_FULL`]): the fold
    /// starts for it (one full run alone waits for other work, to be written with it).
    pub(super) urgent: bool,
    /// Rows the fold has taken and not yet settled: still pending to readers.
    pub(super) in_fold: usize,
    /// Flushes, deletions and expiry, in order, for the fold to do and then ack.
    pub(super) to_fold: Vec<Op>,
}

impl LogState {
    /// The state of a writer starting on `journal`.
    pub(super) fn new(journal: Journal) -> Self {
        Self {
            journal,
            appended: 0,
            pending: Pending::default(),
            full: ByStream::default(),
            urgent: false,
            in_fold: 0,
            to_fold: Vec::new(),
        }
    }

    /// Rows not known to be in `streams` (a reader has them written first).
    pub(super) fn pending_rows(&self) -> usize {
        self.pending.len() + self.in_fold
    }

    /// Whether the fold has work at `now`: an op that needs SQLite, rows due (see
    /// [`Pending::due`]), a run left full at twice a block's worth, or the journal's head to
    /// look at. (Runs left full at one block's worth wait for one of those.)
    pub(super) fn fold_due(&self, now: tokio::time::Instant) -> bool {
        !self.to_fold.is_empty()
            || self.urgent
            || self.appended >= block::LOG_CHECK_EVERY
            || self.pending.due(0, 0, now)
    }

    /// Takes what a fold pass does: the rows if they are due (all of them before a flush, a
    /// deletion or expiry, which must see them written), the runs left full, and the
    /// journal's head if enough was appended since the last look.
    pub(super) fn take_fold_work(&mut self, now: tokio::time::Instant) -> FoldWork {
        let rows = if !self.to_fold.is_empty() || self.pending.due(0, 0, now) {
            self.pending.take()
        } else {
            Vec::new()
        };
        self.in_fold = rows.len();
        self.urgent = false;
        let old_before = (self.appended >= block::LOG_CHECK_EVERY).then(|| {
            self.appended = 0;
            self.journal.position() - block::LOG_SPAN
        });
        FoldWork {
            rows,
            full: self.full.drain().map(|(id, ())| id).collect(),
            old_before,
            ops: std::mem::take(&mut self.to_fold),
        }
    }

    /// Keeps in `full` only the runs that are (commits made during a fold pass counted runs
    /// whose chunks it was writing), and whether one holds twice a block's worth.
    pub(super) fn refresh_full(&mut self, runs: &Mutex<Runs>) {
        if self.full.is_empty() {
            return;
        }
        let runs = lock(runs);
        self.full
            .retain(|id, ()| runs.get(id).is_some_and(Run::is_full));
        self.urgent = self
            .full
            .keys()
            .any(|id| runs.get(id).is_some_and(|run| run.holds(block::LEFT_FULL)));
    }

    /// Settles a fold pass that succeeded (`ok`) or not, and returns its ops to be acked. After
    /// a look at the journal's head that succeeded, the journal lets go of what is before the
    /// first record SQLite does not hold yet (the runs' and the pending rows').
    pub(super) fn after_fold(&mut self, runs: &Mutex<Runs>, work: FoldWork, ok: bool) -> Vec<Op> {
        self.in_fold = 0;
        if !ok {
            self.full.extend(work.full.into_iter().map(|id| (id, ())));
            return work.ops;
        }
        if work.old_before.is_some() {
            let runs_from = lock(runs).values().map(|run| run.first_log).min();
            let keep_from = [runs_from, self.pending.first_log()]
                .into_iter()
                .flatten()
                .min()
                .unwrap_or_else(|| self.journal.position());
            // Every chunk and row before `keep_from` is in the database now. (If the segments
            // cannot be deleted, the next look tries again; replay would skip what they hold.)
            if let Err(e) = self.journal.trim(keep_from) {
                tracing::warn!(error = %e.report(), "journal segments not deleted");
            }
        }
        work.ops
    }
}

/// What one pass of the fold writes into SQLite (see [`fold`]).
pub(super) struct FoldWork {
    /// Streams' records and final statuses, oldest first.
    rows: Vec<Row>,
    /// Streams whose runs were left full.
    full: Vec<Arc<str>>,
    /// Runs whose first chunk is before this journal position are written whatever their
    /// size, so that one quiet stream does not keep the journal long.
    old_before: Option<i64>,
    /// Flushes, deletions and expiry, done after the rows.
    ops: Vec<Op>,
}

impl FoldWork {
    /// After a failed pass: its rows stay with the connection, for the next pass to write
    /// first.
    pub(super) fn keep_rows(mut self, db: &mut Db) -> Self {
        db.held.append(&mut self.rows);
        self
    }
}

/// What a batch does to one stream's run; applied to the shared runs once committed.
#[derive(Debug, Default)]
pub(super) struct RunChange {
    /// The run as it was before the batch has been written as a block.
    written: bool,
    /// Chunks this batch logged (after that block, if any).
    staged: Run,
    /// The shared run's chunks and bytes when the batch first touched it: what
    /// [`Self::must_write`] counts, so that a batch's chunks do not each lock and look up the
    /// shared runs. (The fold may write part of the run meanwhile: then this counts more than
    /// is left, and a run is written a little early.)
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

    /// Whether it holds `times` blocks' worth.
    fn holds(&self, times: usize) -> bool {
        let (n, bytes) = self.size();
        block::holds(n, bytes, times)
    }

    fn is_full(&self) -> bool {
        self.holds(1)
    }

    /// Whether this commit writes the run as a block itself, waiting for the connection: only
    /// at four times a block's worth ([`block::HARD_FULL`]), what bounds a run's memory when
    /// the fold is behind. A full run is left to the fold, which writes many streams' blocks in
    /// one transaction that no commit waits for; a run at twice a block's worth
    /// ([`block::LEFT_FULL`]) starts it.
    fn must_write(&self) -> bool {
        self.holds(block::HARD_FULL)
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

/// Commits `batch`: its chunks, records and final statuses to the journal with one `write`, and
/// a run at its bound into SQLite (see [`RunChange::must_write`]); flushes, deletions and expiry
/// are moved out of it, to the fold, which acks them. On an error nothing of the batch counts:
/// its staged journal records are dropped and the transaction rolls back.
pub(super) fn apply(
    db: &Mutex<Db>,
    gate: &Mutex<()>,
    batch: &mut Vec<Op>,
    runs: &Mutex<Runs>,
    log: &mut LogState,
) -> Result<(), StoreError> {
    let applied = apply_staged(db, gate, batch, runs, log);
    if applied.is_err() {
        log.journal.discard();
    }
    applied
}

fn apply_staged(
    db: &Mutex<Db>,
    gate: &Mutex<()>,
    batch: &mut Vec<Op>,
    runs: &Mutex<Runs>,
    log: &mut LogState,
) -> Result<(), StoreError> {
    let mut tx = Batch::new(db, gate);
    let mut changes: ByStream<RunChange> = ByStream::default();
    // This batch's rows with the journal position of the first.
    let mut rows: Option<(i64, Vec<Row>)> = None;
    let mut to_fold = false;
    for op in batch.iter_mut() {
        let row = match op {
            Op::Begin(s, _) => Row::Begin(BeginRow::take(s)),
            Op::Finish(f, _) => Row::Finish(FinishRow::of(f)),
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
                if change.must_write() {
                    change.write(tx.sql()?, runs, id)?;
                }
                continue;
            }
            Op::Flush(_) | Op::Delete { .. } | Op::Expire { .. } => {
                to_fold = true;
                continue;
            }
        };
        let at = log.journal.stage_row(&row);
        // Rows count toward the fold's look at the journal's head as chunks do: with
        // transcripts off they are all it holds.
        log.appended += 1;
        rows.get_or_insert_with(|| (at, Vec::new())).1.push(row);
    }
    // The batch is durable before it is acked; if it cannot be, the transaction rolls back and
    // nothing of the batch counts.
    log.journal.write()?;
    tx.commit()?;
    if let Some((first, rows)) = rows {
        log.pending.extend(first, rows, tokio::time::Instant::now());
    }
    if to_fold {
        let (fold, keep): (Vec<Op>, Vec<Op>) = batch
            .drain(..)
            .partition(|op| matches!(op, Op::Flush(_) | Op::Delete { .. } | Op::Expire { .. }));
        *batch = keep;
        log.to_fold.extend(fold);
    }
    let mut runs = lock(runs);
    for (id, change) in changes {
        // A full run waits for the fold (see `RunChange::must_write`); one written here no
        // longer does.
        if change.is_full() {
            log.full.insert(id.clone(), ());
            log.urgent |= change.holds(block::LEFT_FULL);
        } else if change.written {
            log.full.remove(&id);
        }
        if change.written {
            // Its chunks, all in the block now: the connection is still held, so the fold
            // cannot have written any of them meanwhile.
            runs.remove(&id);
        }
        if !change.staged.chunks.is_empty() {
            runs.entry(id).or_default().append(change.staged);
        }
    }
    drop(runs);
    drop(tx);
    Ok(())
}

/// Whether a transaction begun at its first statement is open (most batches, and some fold
/// passes, have no statement: a batch's `write` to the journal is all it needs). Begun and
/// committed with cached statements: rusqlite's `Transaction` prepares `BEGIN` and `COMMIT` anew
/// each time, which cost a short stream's writer a tenth of its work.
#[derive(Default)]
struct Open(bool);

impl Open {
    /// `conn`, inside the transaction (begun now if it was not).
    fn begin<'c>(&mut self, conn: &'c Connection) -> Result<&'c Connection, StoreError> {
        if !self.0 {
            conn.prepare_cached("BEGIN")?.execute([])?;
            self.0 = true;
        }
        Ok(conn)
    }

    fn commit(&mut self, conn: &Connection) -> Result<(), StoreError> {
        if self.0 {
            conn.prepare_cached("COMMIT")?.execute([])?;
            self.0 = false;
        }
        Ok(())
    }

    fn roll_back(&mut self, conn: &Connection) {
        if std::mem::take(&mut self.0) {
            // A failed COMMIT may have ended the transaction already; then this is a no-op error.
            let _ = conn.execute_batch("ROLLBACK");
        }
    }
}

/// A batch's SQLite transaction ([`Open`]), with the checkpoint's gate and the connection taken
/// at its first statement and held until the batch has changed the runs. Dropped before
/// [`commit`](Self::commit), it rolls back.
struct Batch<'c> {
    db: &'c Mutex<Db>,
    gate: &'c Mutex<()>,
    held: Option<Held<'c>>,
    open: Open,
}

/// The gate and the connection, as a batch holds them.
struct Held<'c> {
    _gate: MutexGuard<'c, ()>,
    db: MutexGuard<'c, Db>,
}

impl<'c> Batch<'c> {
    fn new(db: &'c Mutex<Db>, gate: &'c Mutex<()>) -> Self {
        Self {
            db,
            gate,
            held: None,
            open: Open::default(),
        }
    }

    /// The connection, inside the batch's transaction, once the gate and the connection are
    /// free.
    fn sql(&mut self) -> Result<&Connection, StoreError> {
        let held = self.held.get_or_insert_with(|| Held {
            _gate: locked(self.gate),
            db: locked(self.db),
        });
        self.open.begin(&held.db.conn)
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        match &self.held {
            Some(held) => self.open.commit(&held.db.conn),
            None => Ok(()),
        }
    }
}

impl Drop for Batch<'_> {
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            self.open.roll_back(&held.db.conn);
        }
    }
}

/// A fold pass's SQLite work, in one transaction: the rows a failed pass left and `work`'s
/// (each final status with its stream's run, written as a block), the runs left full, the runs
/// that began too far back in the journal, then deletions and expiry. Once it is committed, the
/// chunks it wrote leave the runs (later ones, appended meanwhile, stay) and the held rows are
/// forgotten; if it fails, it rolls back and changes nothing.
pub(super) fn fold(db: &mut Db, runs: &Mutex<Runs>, work: &FoldWork) -> Result<(), StoreError> {
    let Db { conn, held } = db;
    // Each stream's last chunk written by this pass.
    let mut written: ByStream<u64> = ByStream::default();
    let mut tx = Tx {
        conn,
        open: Open::default(),
    };
    fold_in(&mut tx, runs, held, work, &mut written)?;
    tx.commit()?;
    held.clear();
    let mut runs = lock(runs);
    for (id, last) in written {
        if let Some(run) = runs.get_mut(&id) {
            run.drop_through(last);
            if run.chunks.is_empty() {
                runs.remove(&id);
            }
        }
    }
    Ok(())
}

/// A fold pass's transaction ([`Open`]: a pass may find nothing to write, the runs it was
/// started for written by their commits meanwhile). Dropped before
/// [`commit`](Self::commit), it rolls back.
struct Tx<'c> {
    conn: &'c Connection,
    open: Open,
}

impl Tx<'_> {
    fn sql(&mut self) -> Result<&Connection, StoreError> {
        self.open.begin(self.conn)
    }

    fn commit(&mut self) -> Result<(), StoreError> {
        self.open.commit(self.conn)
    }
}

impl Drop for Tx<'_> {
    fn drop(&mut self) {
        self.open.roll_back(self.conn);
    }
}

fn fold_in(
    tx: &mut Tx<'_>,
    runs: &Mutex<Runs>,
    held: &[Row],
    work: &FoldWork,
    written: &mut ByStream<u64>,
) -> Result<(), StoreError> {
    for row in held.iter().chain(&work.rows) {
        if let Row::Finish(f) = row {
            // Its chunks before its final status.
            write_run(tx, runs, &f.id, false, written)?;
        }
        row.write(tx.sql()?)?;
    }
    for id in &work.full {
        write_run(tx, runs, id, true, written)?;
    }
    if let Some(before) = work.old_before {
        let old: Vec<Arc<str>> = lock(runs)
            .iter()
            .filter(|(_, run)| run.first_log < before)
            .map(|(id, _)| id.clone())
            .collect();
        for id in old {
            write_run(tx, runs, &id, false, written)?;
        }
    }
    for op in &work.ops {
        match op {
            Op::Expire { before, .. } => {
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
                let gone = tx.sql()?.execute(
                    "DELETE FROM streams WHERE id = ?1 AND tenant = ?2 AND status != 'streaming'",
                    params![id, tenant],
                )?;
                if gone > 0 {
                    tx.sql()?
                        .execute("DELETE FROM chunk_blocks WHERE stream_id = ?1", params![id])?;
                }
            }
            // A flush needs only the rows written, above.
            _ => {}
        }
    }
    Ok(())
}

/// Writes stream `id`'s run, past what this pass wrote of it already, as a block: whatever its
/// size, or only if it is full (`only_full`).
fn write_run(
    tx: &mut Tx<'_>,
    runs: &Mutex<Runs>,
    id: &str,
    only_full: bool,
    written: &mut ByStream<u64>,
) -> Result<(), StoreError> {
    let after = written.get(id).copied().unwrap_or(0);
    // Copied out (a chunk's JSON is shared, its text is short), to be encoded without the runs'
    // lock: a relay whose commit adds to its run would otherwise wait for the encoding.
    let chunks: Vec<LoggedChunk> = match lock(runs).get(id) {
        Some(run) => run
            .chunks
            .iter()
            .filter(|c| c.seq > after)
            .cloned()
            .collect(),
        None => return Ok(()),
    };
    let bytes: usize = chunks.iter().map(LoggedChunk::bytes).sum();
    if only_full && !block::holds(chunks.len(), bytes, 1) {
        return Ok(());
    }
    if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
        insert_block(
            tx.sql()?,
            id,
            first.seq,
            last.seq,
            block::encode(chunks.iter()),
        )?;
        written.insert(Arc::from(id), last.seq);
    }
    Ok(())
}
