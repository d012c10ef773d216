//! The checkpoint thread: copies the WAL into the database (which syncs it to disk), keeps the
//! WAL bounded under writes that never pause, and syncs the chunk journal to disk.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use rusqlite::Connection;

use super::journal::Unsynced;

/// Sets its flag when dropped.
pub(super) struct StopOnDrop(pub(super) Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// When the checkpoint thread works.
#[derive(Debug, Clone, Copy)]
pub(super) struct Checkpoints {
    /// How often it copies the WAL into the database.
    pub(super) every: Duration,
    /// A WAL with more frames than this after a checkpoint gets a rewind: see [`checkpointer`].
    pub(super) rewind_frames: i64,
}

impl Default for Checkpoints {
    fn default() -> Self {
        Self {
            every: Duration::from_millis(500),
            // About 16 MB.
            rewind_frames: 4096,
        }
    }
}
/// What a WAL is cut back to (bytes) when it rewinds after a burst.
pub(super) const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Copies the WAL into the database and syncs the `journal` every `when.every`, until `stop`
/// is set.
///
/// A passive checkpoint waits for no one, so commits never stall behind it. But SQLite only
/// rewinds the WAL to its start when a write begins after *every* frame has been copied, and a
/// writer that never pauses always has new frames by the time a passive checkpoint ends: under
/// sustained load the WAL would grow without bound (the benchmark saw 880 MB in 7 s, and the
/// kernel zeroing fresh pages for it was 18% of the gateway's CPU). So when the WAL is past
/// `when.rewind_frames` after a passive pass, the thread holds `gate` (the writer takes it for
/// each batch) for a second pass, which then copies the few frames written meanwhile; the next
/// batch rewinds the WAL.
pub(super) fn checkpointer(
    conn: Connection,
    when: Checkpoints,
    stop: &std::sync::atomic::AtomicBool,
    gate: &Mutex<()>,
    journal: &Unsynced,
) {
    let checkpoint = |conn: &Connection| {
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| r.get::<_, i64>(1))
    };
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(when.every);
        let frames = match checkpoint(&conn) {
            Ok(frames) if frames > when.rewind_frames => {
                let _writer_paused = gate.lock().unwrap_or_else(PoisonError::into_inner);
                checkpoint(&conn)
            }
            other => other,
        };
        match frames {
            Ok(frames) => metrics::gauge!("sluice_store_wal_frames").set(frames as f64),
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
        if let Err(e) = journal.sync() {
            tracing::warn!(error = %e, "the journal was not synced to disk");
        }
    }
}
