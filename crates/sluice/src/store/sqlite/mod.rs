//! The SQLite backend: one database file in the data directory, in WAL mode, and the chunk
//! journal beside it (`journal/`).
//!
//! | module | owns |
//! |---|---|
//! | `schema` | the tables, and folding what a crash left in the journal (or an earlier layout) into blocks |
//! | `journal` | the journal: checksummed records (chunks, streams' records and final statuses) appended to segment files, read back at open |
//! | `rows` | a stream's record and final status as journal records and `streams` rows, and those waiting to be written there |
//! | `writer` | the group-commit writer: batches, the journal and its runs, and the fold that writes them into SQLite on the one write connection |
//! | `read` | reads on their own connection: lists, states, chunk pages, transcripts |
//! | `checkpoint` | the thread that copies the WAL into the database, keeps it bounded, restarts it so that no commit syncs, and syncs the journal |

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::Connection;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::store::block::Runs;
use crate::store::limits::LocalLimits;
use crate::store::StoreError;

use crate::store::write::{Op, WRITE_QUEUE};
use checkpoint::{checkpointer, Checkpoints, StopOnDrop, WAL_SIZE_LIMIT};
use journal::Journal;
use schema::{add_columns, fold_log, SCHEMA};
use writer::{Db, LogState, Writer, WriterState};

mod checkpoint;
pub(super) mod journal;
mod read;
mod rows;
mod schema;
#[cfg(test)]
mod tests;
mod writer;

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct SqliteStore {
    writer: Arc<Writer>,
    reader: Arc<Mutex<Connection>>,
    /// Each stream's committed chunks that are not in a block yet (written by the writer,
    /// read by readers).
    runs: Arc<Mutex<Runs>>,
    path: PathBuf,
    /// Per-key limits (this process is the only node).
    limits: Arc<LocalLimits>,
    /// Stops the checkpoint thread when the last handle goes.
    _checkpoints: Arc<StopOnDrop>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.path)
            .finish()
    }
}

/// Locks the runs (a writer that panicked mid-update left them consistent: it only changes
/// them after a commit).
fn lock(runs: &Mutex<Runs>) -> std::sync::MutexGuard<'_, Runs> {
    runs.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SqliteStore {
    /// Opens (creating if needed) the database in `data_dir`, marks streams a crash left open
    /// as `interrupted(crash)`, and starts the writer. Returns the store and how many streams
    /// were recovered.
    pub fn open(data_dir: &Path) -> Result<(Self, u64), StoreError> {
        Self::open_with(data_dir, Checkpoints::default())
    }

    fn open_with(data_dir: &Path, when: Checkpoints) -> Result<(Self, u64), StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::data_dir(data_dir.to_path_buf(), e))?;
        let path = data_dir.join("sluice.db");
        let mut write = Connection::open(&path)?;
        write.pragma_update(None, "journal_mode", "WAL")?;
        write.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints run on their own thread (below), not inside whichever commit crosses
        // the threshold: that commit, and every chunk waiting on it, would stall for the copy.
        write.pragma_update(None, "wal_autocheckpoint", 0)?;
        write.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        write.busy_timeout(Duration::from_secs(5))?;
        write.execute_batch(SCHEMA)?;
        add_columns(&write)?;
        let journal_dir = data_dir.join("journal");
        // The fold is synced to disk before the journal it empties is deleted, so that not even
        // an OS crash right after can lose both.
        write.pragma_update(None, "synchronous", "FULL")?;
        fold_log(&mut write, Journal::recover(&journal_dir)?)?;
        write.pragma_update(None, "synchronous", "NORMAL")?;
        // What the journal held is in blocks now (committed): it starts anew.
        let journal = Journal::start(&journal_dir)?;
        let recovered = write.execute(
            "UPDATE streams SET status = 'interrupted', reason = 'crash',
                 detail = 'the gateway process ended while the stream was running'
             WHERE status = 'streaming'",
            [],
        )? as u64;
        let read = Connection::open(&path)?;
        read.busy_timeout(Duration::from_secs(5))?;
        let closed = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let checkpoints = Connection::open(&path)?;
        // It restarts the WAL (see `checkpoint::Pass`), so the writer's settings for that are
        // its own too: the restart syncs only the WAL's new header (not its commit, nor every
        // commit), cuts a WAL grown in a burst back to `WAL_SIZE_LIMIT`, and its write never
        // checkpoints by itself. Its checkpoints sync the WAL and the database either way.
        checkpoints.pragma_update(None, "synchronous", "NORMAL")?;
        checkpoints.pragma_update(None, "wal_autocheckpoint", 0)?;
        checkpoints.pragma_update(None, "journal_size_limit", WAL_SIZE_LIMIT)?;
        let stop = closed.clone();
        let unsynced = journal.unsynced();
        let gate = Arc::new(Mutex::new(()));
        let writer_gate = gate.clone();
        std::thread::Builder::new()
            .name("sluice-store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, when, &stop, &gate, &unsynced))
            .map_err(|e| StoreError::io("cannot start the checkpoint thread", e))?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Internal("the store needs a tokio runtime".into()))?;
        let runs = Arc::new(Mutex::new(Runs::default()));
        let writer = Arc::new(Writer {
            tx,
            running: AtomicBool::new(false),
            state: Mutex::new(WriterState {
                rx,
                log: LogState::new(journal),
            }),
            db: Mutex::new(Db {
                conn: write,
                held: Vec::new(),
            }),
            folding: AtomicBool::new(false),
            fold_in_state: AtomicBool::new(false),
            runs: runs.clone(),
            gate: writer_gate,
            runtime,
            write_seconds: metrics::histogram!("sluice_store_write_seconds"),
            pending_rows: AtomicUsize::new(0),
            held_rows: AtomicUsize::new(0),
            last_commit: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        Ok((
            Self {
                writer,
                reader: Arc::new(Mutex::new(read)),
                runs,
                path,
                limits: Arc::default(),
                _checkpoints: Arc::new(StopOnDrop(closed)),
            },
            recovered,
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The per-key limits.
    pub(crate) fn limits(&self) -> &LocalLimits {
        &self.limits
    }

    /// Queues a write for the writer (waiting for room) and makes sure a writer job will see it.
    pub(crate) async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.writer.send(op).await
    }

    /// Commits the chunks a relay left waiting (see `Writer::commit_waiting`).
    pub(crate) fn commit_waiting(&self, appended: usize) {
        self.writer.commit_waiting(appended);
    }

    /// Has the rows that wait to be written into `streams` written (see `rows`), so that a read
    /// that follows sees every stream whose record or final status was acked.
    pub(crate) async fn write_pending(&self) -> Result<(), StoreError> {
        // In this order: the fold moves rows from the first count to its own, and then (if
        // its pass fails) to the second.
        if self.writer.pending_rows.load(Ordering::Acquire) == 0
            && self.writer.held_rows.load(Ordering::Acquire) == 0
        {
            return Ok(());
        }
        let (ack, done) = tokio::sync::oneshot::channel();
        self.send(Op::Flush(ack)).await?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// From now on every journal write fails as on a full disk (tests of what that does).
    #[cfg(test)]
    pub(crate) fn fail_journal_writes(&self) {
        self.writer
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .log
            .journal
            .fail_writes();
    }

    /// Queues a write for the writer if there is room now; never waits.
    #[allow(
        clippy::result_large_err,
        reason = "the write comes back, moved, only when the queue is full"
    )]
    pub(crate) fn try_send(&self, op: Op) -> Result<(), TrySendError<Op>> {
        self.writer.try_send(op)
    }
}
