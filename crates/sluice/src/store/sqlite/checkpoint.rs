//! The checkpoint thread: copies the WAL into the database (which syncs it to disk), keeps the
//! WAL bounded under writes that never pause, restarts the WAL once it is copied (so that no
//! commit pays the restart's sync), and syncs the chunk journal to disk.

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
/// is set: a [`Pass`] at a time.
pub(super) fn checkpointer(
    conn: Connection,
    when: Checkpoints,
    stop: &std::sync::atomic::AtomicBool,
    gate: &Mutex<()>,
    journal: &Unsynced,
) {
    let mut pass = Pass::new(conn, when.rewind_frames);
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(when.every);
        match pass.run(gate) {
            Ok(Some(frames)) => metrics::gauge!("sluice_store_wal_frames").set(frames as f64),
            Ok(None) => {}
            Err(e) => tracing::warn!(error = %e, "checkpoint failed"),
        }
        if let Err(e) = journal.sync() {
            tracing::warn!(error = %e, "the journal was not synced to disk");
        }
    }
}

/// One checkpoint, and the WAL's restart after it, on the checkpoint thread's connection.
///
/// A passive checkpoint waits for no one, so commits never stall behind it. But SQLite only
/// rewinds the WAL to its start when a write begins after *every* frame has been copied, and a
/// writer that never pauses always has new frames by the time a passive checkpoint ends: under
/// sustained load the WAL would grow without bound (the benchmark saw 880 MB in 7 s, and the
/// kernel zeroing fresh pages for it was 18% of the gateway's CPU). So when the WAL is past
/// `rewind_frames` after a passive pass, or that pass copied every frame, the pass holds the
/// writer's gate (the writer takes it for each batch) for a second checkpoint, which then
/// copies the few frames written meanwhile (always: the writer may have committed between the
/// two).
///
/// Whoever writes first into a WAL whose every frame has been copied restarts it, and a restart
/// syncs the WAL's new header to disk (`synchronous = NORMAL`): a few hundred microseconds that
/// were paid by the next stream's commit, on a runtime thread when a task commits (see the
/// writer). So once everything is copied, the pass restarts the WAL itself, under the gate, with
/// a one-row write of its own; the writer's next batch is appended after it. A pass finds
/// nothing to do, and does nothing, when no other connection has committed since the last one
/// and that one copied everything: an idle gateway's WAL is left alone.
pub(super) struct Pass {
    conn: Connection,
    rewind_frames: i64,
    /// `PRAGMA data_version` when the last pass began (it changes when another connection
    /// commits).
    seen: Option<i64>,
    /// The last pass copied every frame the writer had written.
    settled: bool,
}

impl Pass {
    pub(super) fn new(conn: Connection, rewind_frames: i64) -> Self {
        Self {
            conn,
            rewind_frames,
            seen: None,
            settled: false,
        }
    }

    /// Checkpoints and, if every frame was copied, restarts the WAL. Returns the WAL's frames
    /// (before a restart), or `None` if there was nothing new to copy.
    pub(super) fn run(&mut self, gate: &Mutex<()>) -> rusqlite::Result<Option<i64>> {
        self.run_with(gate, || {})
    }

    /// [`run`](Self::run), calling `before_gate` between the passive checkpoint and taking the
    /// gate: the moment the writer can still commit (a test writes there).
    pub(super) fn run_with(
        &mut self,
        gate: &Mutex<()>,
        before_gate: impl FnOnce(),
    ) -> rusqlite::Result<Option<i64>> {
        let version = self
            .conn
            .query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))?;
        if self.settled && self.seen == Some(version) {
            return Ok(None);
        }
        self.seen = Some(version);
        self.settled = false;
        let (frames, copied) = self.checkpoint()?;
        if frames == 0 {
            self.settled = true;
            return Ok(Some(frames));
        }
        if frames <= self.rewind_frames && copied < frames {
            return Ok(Some(frames));
        }
        before_gate();
        let _writer_paused = gate.lock().unwrap_or_else(PoisonError::into_inner);
        // Again under the gate, even if the first copied everything: the writer may have
        // committed between it and the gate, and a write into a WAL not wholly copied is
        // appended to it rather than restarting it. (Skipped when the first had copied
        // everything, the WAL never rewound under writes that never pause.)
        let (frames, copied) = self.checkpoint()?;
        if copied == frames {
            self.restart()?;
            self.settled = true;
        }
        Ok(Some(frames))
    }

    /// A passive checkpoint: the WAL's frames, and how many of them are in the database now.
    fn checkpoint(&self) -> rusqlite::Result<(i64, i64)> {
        self.conn
            .query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(1)?, r.get(2)?))
            })
    }

    /// A write that starts the WAL anew (SQLite restarts it, syncing the new header, when this
    /// first frame is written).
    fn restart(&self) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO wal_restarts (id, n) VALUES (1, 1)
             ON CONFLICT (id) DO UPDATE SET n = n + 1",
            [],
        )?;
        Ok(())
    }
}
