//! The transcript store: streams and their chunks, in an embedded SQLite database.
//!
//! One writer owns the write connection. Writes arrive over a bounded channel, so a slow
//! disk slows the relays down instead of growing memory, and the writer commits everything that
//! is waiting in one transaction (a batch), so chunk appends cost one fsync per batch, not per
//! chunk. The writer is a blocking job that runs while there is work: the first write that finds
//! it stopped starts it, and it stops when the channel is empty (`Writer` says why). The database runs in WAL mode, so reads (on their own connection) never wait for the
//! writer. Writes on the channel are applied in order: a stream's final status is always written
//! after every chunk appended before it. `begin`, `finish` and `flush` return once committed;
//! `append` returns once queued, and the stream's [`Watermark`] reaches the chunk when it is
//! committed (so a relay never waits for one chunk's commit before reading the next). With WAL
//! and `synchronous = NORMAL` a committed write survives a crash of the process (not necessarily
//! a power cut: the WAL is synced at checkpoints, which run on their own thread).
//!
//! Chunks are appended to a log in arrival order and folded into per-stream blocks (see
//! `store/block.rs` for why).
//!
//! At open, streams still marked `streaming` belong to a process that died: they are marked
//! `interrupted(crash)`, and the chunks their runs held are folded into blocks.

mod block;

/// The block codec, for the fuzz entry points in [`crate::fuzzing`].
pub(crate) use block::{decode as decode_block, encode as encode_block};

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::stream::{Ending, Reason, Status};
pub(crate) use block::LoggedChunk;
use block::{Decoded, Run, Runs};

/// How many writes may wait for the writer.
const WRITE_QUEUE: usize = 8192;
/// The most writes committed in one transaction.
const MAX_BATCH: usize = 1024;

/// Why a store operation failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// SQLite said no.
    #[error("database error: {0}")]
    Db(String),
    /// The writer has stopped (the store was closed).
    #[error("the store is closed")]
    Closed,
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        StoreError::Db(e.to_string())
    }
}

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

    fn advance(&self, seq: u64) {
        self.0.send_if_modified(|committed| {
            let moved = seq > *committed;
            if moved {
                *committed = seq;
            }
            moved
        });
    }
}

/// A stream as it is first recorded, before the upstream is called.
#[derive(Debug, Clone)]
pub struct NewStream {
    /// The stream's id.
    pub id: String,
    /// The tenant it belongs to.
    pub tenant: String,
    /// The model the client asked for.
    pub model: String,
    /// The client's request body (holds no secrets: keys travel in headers).
    pub request: Value,
}

/// A stream's final record.
#[derive(Debug, Clone)]
pub struct Finish {
    /// The stream's id.
    pub id: String,
    /// How it ended.
    pub ending: Ending,
    /// Time to first token, if there was one.
    pub first_token: Option<Duration>,
    /// Total time.
    pub total: Duration,
    /// Token usage, if the upstream reported it.
    pub usage: Option<Value>,
    /// How many chunks were appended.
    pub chunks: u64,
}

enum Op {
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
}

/// A handle to the store; cheap to clone.
#[derive(Clone)]
pub struct Store {
    writer: Arc<Writer>,
    reader: Arc<Mutex<Connection>>,
    /// Each stream's committed chunks that are not in a block yet (written by the writer,
    /// read by readers).
    runs: Arc<Mutex<Runs>>,
    path: PathBuf,
    /// Stops the checkpoint thread when the last handle goes.
    _checkpoints: Arc<StopOnDrop>,
}

/// Sets its flag when dropped.
struct StopOnDrop(Arc<std::sync::atomic::AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// When the checkpoint thread works.
#[derive(Debug, Clone, Copy)]
struct Checkpoints {
    /// How often it copies the WAL into the database.
    every: Duration,
    /// A WAL with more frames than this after a checkpoint gets a rewind: see [`checkpointer`].
    rewind_frames: i64,
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
const WAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// Copies the WAL into the database every `when.every`, until `stop` is set.
///
/// A passive checkpoint waits for no one, so commits never stall behind it. But SQLite only
/// rewinds the WAL to its start when a write begins after *every* frame has been copied, and a
/// writer that never pauses always has new frames by the time a passive checkpoint ends: under
/// sustained load the WAL would grow without bound (the benchmark saw 880 MB in 7 s, and the
/// kernel zeroing fresh pages for it was 18% of the gateway's CPU). So when the WAL is past
/// `when.rewind_frames` after a passive pass, the thread holds `gate` (the writer takes it for
/// each batch) for a second pass, which then copies the few frames written meanwhile; the next
/// batch rewinds the WAL.
fn checkpointer(
    conn: Connection,
    when: Checkpoints,
    stop: &std::sync::atomic::AtomicBool,
    gate: &Mutex<()>,
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
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("path", &self.path).finish()
    }
}

/// One row of the stream list.
#[derive(Debug, Clone, Serialize)]
pub struct StreamSummary {
    /// The stream's id.
    pub id: String,
    /// Always `"sluice.stream"`.
    pub object: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// How many chunks it has.
    pub chunk_count: u64,
}

/// A stream's whole transcript.
#[derive(Debug, Clone, Serialize)]
pub struct Transcript {
    /// The stream's id.
    pub id: String,
    /// Always `"sluice.stream"`.
    pub object: &'static str,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending (upstream status and message, ...).
    pub detail: Option<String>,
    /// The client's request.
    pub request: Value,
    /// The assembled answer.
    pub content: String,
    /// Every chunk, in order, with its arrival offset.
    pub chunks: Vec<StoredChunk>,
    /// Timings in milliseconds.
    pub timings: Timings,
    /// Token usage, if the upstream reported it.
    pub usage: Option<Value>,
}

/// A stream's transcript without its chunks: what [`Store::head`] reads before the chunks are
/// read page by page.
#[derive(Debug, Clone)]
pub struct TranscriptHead {
    /// The stream's id.
    pub id: String,
    /// The model the client asked for.
    pub model: String,
    /// When it started, Unix seconds.
    pub created: i64,
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending.
    pub detail: Option<String>,
    /// The client's request, as JSON text.
    pub request: String,
    /// Timings in milliseconds.
    pub timings: Timings,
    /// Token usage, as JSON text, if the upstream reported it.
    pub usage: Option<String>,
    /// The id of its last stored chunk when the head was read (0 if none).
    pub last_seq: u64,
}

/// One stored chunk as read back, JSON as text.
#[derive(Debug, Clone, PartialEq)]
pub struct ChunkRecord {
    /// Its event id (1, 2, ...).
    pub seq: u64,
    /// When it arrived, in ms from the stream's start.
    pub offset_ms: f64,
    /// The chunk JSON as relayed.
    pub data: String,
    /// The text it adds to the answer.
    pub content: String,
}

/// Where a stream stands, for replaying it.
#[derive(Debug, Clone, PartialEq)]
pub struct StreamState {
    /// Its status.
    pub status: Status,
    /// Why it ended, if it ended abnormally.
    pub reason: Option<Reason>,
    /// Details of an abnormal ending.
    pub detail: Option<String>,
    /// The id of its last stored chunk (0 if none).
    pub last_seq: u64,
}

impl StreamState {
    /// How it ended, if it has: the ending its terminal event reports.
    pub fn ending(&self) -> Option<Ending> {
        match (self.status, self.reason) {
            (Status::Streaming, _) => None,
            (Status::Completed, _) => Some(Ending::Completed),
            (_, Some(reason)) => Some(Ending::abnormal(
                reason,
                self.detail.clone().unwrap_or_default(),
            )),
            (status, None) => Some(Ending::abnormal(
                if status == Status::Interrupted {
                    Reason::Crash
                } else {
                    Reason::UpstreamError
                },
                self.detail.clone().unwrap_or_default(),
            )),
        }
    }
}

/// One stored chunk.
#[derive(Debug, Clone, Serialize)]
pub struct StoredChunk {
    /// Its event id (1, 2, ...).
    pub seq: u64,
    /// When it arrived, in ms from the stream's start.
    pub offset_ms: f64,
    /// The chunk JSON as relayed.
    pub data: Value,
}

/// A stream's timings.
#[derive(Debug, Clone, Serialize)]
pub struct Timings {
    /// Start to first token, ms.
    pub time_to_first_token_ms: Option<f64>,
    /// Start to end, ms (while streaming: none).
    pub total_ms: Option<f64>,
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS streams (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tenant TEXT NOT NULL,
    model TEXT NOT NULL,
    request TEXT NOT NULL,
    status TEXT NOT NULL,
    reason TEXT,
    detail TEXT,
    created INTEGER NOT NULL,
    first_token_us INTEGER,
    total_us INTEGER,
    usage TEXT,
    chunk_count INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS streams_by_tenant ON streams (tenant, seq);
CREATE TABLE IF NOT EXISTS chunk_log (
    id INTEGER PRIMARY KEY,
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    offset_us INTEGER NOT NULL,
    data TEXT NOT NULL,
    content TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunk_blocks (
    id INTEGER PRIMARY KEY,
    stream_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunk_blocks_by_stream ON chunk_blocks (stream_id, first_seq);
";

/// Locks the runs (a writer that panicked mid-update left them consistent: it only changes
/// them after a commit).
fn lock(runs: &Mutex<Runs>) -> std::sync::MutexGuard<'_, Runs> {
    runs.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, marks streams a crash left open
    /// as `interrupted(crash)`, and starts the writer. Returns the store and how many streams
    /// were recovered.
    pub fn open(data_dir: &Path) -> Result<(Self, u64), StoreError> {
        Self::open_with(data_dir, Checkpoints::default())
    }

    fn open_with(data_dir: &Path, when: Checkpoints) -> Result<(Self, u64), StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", data_dir.display())))?;
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
        fold_log(&mut write)?;
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
        let stop = closed.clone();
        let gate = Arc::new(Mutex::new(()));
        let writer_gate = gate.clone();
        std::thread::Builder::new()
            .name("sluice-store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, when, &stop, &gate))
            .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Db("the store needs a tokio runtime".into()))?;
        let runs = Arc::new(Mutex::new(Runs::new()));
        let writer = Arc::new(Writer {
            tx,
            running: AtomicBool::new(false),
            state: Mutex::new(WriterState {
                rx,
                conn: write,
                log: LogState::default(),
            }),
            runs: runs.clone(),
            gate: writer_gate,
            runtime,
        });
        Ok((
            Self {
                writer,
                reader: Arc::new(Mutex::new(read)),
                runs,
                path,
                _checkpoints: Arc::new(StopOnDrop(closed)),
            },
            recovered,
        ))
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Op,
    ) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        self.writer.send(make(ack)).await?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a new stream as `streaming`; returns once it is committed.
    pub async fn begin(&self, stream: NewStream) -> Result<(), StoreError> {
        self.call(|ack| Op::Begin(stream, ack)).await
    }

    /// Queues a chunk for the writer and returns at once (after waiting only for room in the
    /// writer's queue). `watermark` reaches `seq` when the chunk is committed, together with
    /// whatever else the writer batched alongside it. The relay hands a chunk to anyone only
    /// after that, so a chunk a client has seen survives a crash of the process; not waiting
    /// here lets one stream's chunks share a commit. (If a commit fails, the error is logged and
    /// the watermark moves on all the same: the gateway keeps serving.)
    pub async fn append(
        &self,
        id: &Arc<str>,
        seq: u64,
        offset: Duration,
        data: Arc<str>,
        content: String,
        watermark: &Watermark,
    ) -> Result<(), StoreError> {
        self.writer
            .send(Op::Append {
                id: id.clone(),
                seq,
                offset,
                data,
                content,
                watermark: watermark.clone(),
            })
            .await
    }

    /// Writes a stream's final status; returns once it is committed (with every chunk before
    /// it). Run this under a shield.
    pub async fn finish(&self, finish: Finish) -> Result<(), StoreError> {
        self.call(|ack| Op::Finish(finish, ack)).await
    }

    /// Waits until every write sent so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await
    }

    async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let reader = self.reader.clone();
        tokio::task::spawn_blocking(move || {
            let conn = reader.lock().unwrap_or_else(PoisonError::into_inner);
            f(&conn)
        })
        .await
        .map_err(|e| StoreError::Db(format!("read task failed: {e}")))?
    }

    /// A page of `tenant`'s streams, newest first, starting after the stream `after`.
    /// Returns the page and whether there are more.
    pub async fn list(
        &self,
        tenant: &str,
        limit: usize,
        after: Option<String>,
    ) -> Result<(Vec<StreamSummary>, bool), StoreError> {
        let tenant = tenant.to_string();
        self.read(move |c| {
            let cursor: i64 = match after {
                Some(id) => c
                    .query_row(
                        "SELECT seq FROM streams WHERE id = ?1 AND tenant = ?2",
                        params![id, tenant],
                        |r| r.get(0),
                    )
                    .optional()?
                    .unwrap_or(i64::MAX),
                None => i64::MAX,
            };
            let mut stmt = c.prepare(
                "SELECT id, model, created, status, reason, chunk_count FROM streams
                 WHERE tenant = ?1 AND seq < ?2 ORDER BY seq DESC LIMIT ?3",
            )?;
            let mut rows: Vec<StreamSummary> = stmt
                .query_map(params![tenant, cursor, (limit + 1) as i64], |r| {
                    Ok(StreamSummary {
                        id: r.get(0)?,
                        object: "sluice.stream",
                        model: r.get(1)?,
                        created: r.get(2)?,
                        status: Status::parse(&r.get::<_, String>(3)?).unwrap_or(Status::Failed),
                        reason: r
                            .get::<_, Option<String>>(4)?
                            .as_deref()
                            .and_then(Reason::parse),
                        chunk_count: r.get::<_, i64>(5)? as u64,
                    })
                })?
                .collect::<Result<_, _>>()?;
            let more = rows.len() > limit;
            rows.truncate(limit);
            Ok((rows, more))
        })
        .await
    }

    /// Where `tenant`'s stream `id` stands.
    pub async fn state(&self, tenant: &str, id: &str) -> Result<Option<StreamState>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        let runs = self.runs.clone();
        self.read(move |c| {
            // The run first, then the blocks: a run written as a block in between is then
            // seen in the block (the other order could miss it in both).
            let in_run = lock(&runs).get(id.as_str()).map_or(0, Run::last_seq);
            let row = c
                .query_row(
                    "SELECT status, reason, detail,
                        (SELECT COALESCE(MAX(last_seq), 0) FROM chunk_blocks WHERE stream_id = streams.id)
                     FROM streams WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, Option<String>>(1)?,
                            r.get::<_, Option<String>>(2)?,
                            r.get::<_, i64>(3)?,
                        ))
                    },
                )
                .optional()?;
            Ok(row.map(|(status, reason, detail, last)| StreamState {
                status: Status::parse(&status).unwrap_or(Status::Failed),
                reason: reason.as_deref().and_then(Reason::parse),
                detail,
                last_seq: (last as u64).max(in_run),
            }))
        })
        .await
    }

    /// A page of stream `id`'s chunks after event id `after`, in order, as (id, JSON exactly as
    /// relayed): up to `limit` chunks and about `max_bytes` of JSON (at least one chunk, so a
    /// page always moves on). The caller has checked the tenant.
    pub async fn chunks_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        Ok(self
            .chunk_page(id, after, limit, max_bytes)
            .await?
            .into_iter()
            .map(|c| (c.seq, c.data))
            .collect())
    }

    /// Like [`Store::chunks_after`], with each chunk's offset and text.
    pub async fn chunk_page(
        &self,
        id: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChunkRecord>, StoreError> {
        let id = id.to_string();
        let runs = self.runs.clone();
        self.read(move |c| {
            let chunks = read_chunks(c, &runs, &id, after, limit, max_bytes)?;
            Ok(chunks
                .into_iter()
                .map(|(seq, offset_us, data, content)| ChunkRecord {
                    seq,
                    offset_ms: offset_us as f64 / 1000.0,
                    data,
                    content,
                })
                .collect())
        })
        .await
    }

    /// Everything about one of `tenant`'s streams but its chunks, and the id of its last chunk
    /// now: read the chunks page by page (a transcript can be any size).
    pub async fn head(&self, tenant: &str, id: &str) -> Result<Option<TranscriptHead>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        let runs = self.runs.clone();
        self.read(move |c| {
            // The run first, then the blocks (see `state`).
            let in_run = lock(&runs).get(id.as_str()).map_or(0, Run::last_seq);
            let row = c
                .query_row(
                    "SELECT model, created, status, reason, detail, request, first_token_us, total_us, usage,
                        (SELECT COALESCE(MAX(last_seq), 0) FROM chunk_blocks WHERE stream_id = streams.id)
                     FROM streams WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |r| {
                        Ok((
                            (
                                r.get::<_, String>(0)?,
                                r.get::<_, i64>(1)?,
                                r.get::<_, String>(2)?,
                                r.get::<_, Option<String>>(3)?,
                                r.get::<_, Option<String>>(4)?,
                            ),
                            (
                                r.get::<_, String>(5)?,
                                r.get::<_, Option<i64>>(6)?,
                                r.get::<_, Option<i64>>(7)?,
                                r.get::<_, Option<String>>(8)?,
                                r.get::<_, i64>(9)?,
                            ),
                        ))
                    },
                )
                .optional()?;
            let Some(((model, created, status, reason, detail), (request, first_us, total_us, usage, last))) = row else {
                return Ok(None);
            };
            let us = |v: Option<i64>| v.map(|u| ms(Duration::from_micros(u as u64)));
            Ok(Some(TranscriptHead {
                id,
                model,
                created,
                status: Status::parse(&status).unwrap_or(Status::Failed),
                reason: reason.as_deref().and_then(Reason::parse),
                detail,
                request,
                timings: Timings {
                    time_to_first_token_ms: us(first_us),
                    total_ms: us(total_us),
                },
                usage,
                last_seq: (last as u64).max(in_run),
            }))
        })
        .await
    }

    /// One of `tenant`'s streams, whole, in memory. For tools and tests: the API streams a
    /// transcript out page by page instead (see [`Store::head`]).
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Transcript>, StoreError> {
        let Some(head) = self.head(tenant, id).await? else {
            return Ok(None);
        };
        let mut content = String::new();
        let mut chunks = Vec::new();
        let mut after = 0;
        loop {
            let page = self.chunk_page(&head.id, after, 1024, 1 << 20).await?;
            let Some(last) = page.last() else { break };
            after = last.seq;
            for c in page {
                content.push_str(&c.content);
                chunks.push(StoredChunk {
                    seq: c.seq,
                    offset_ms: c.offset_ms,
                    data: serde_json::from_str(&c.data).unwrap_or(Value::String(c.data)),
                });
            }
        }
        Ok(Some(Transcript {
            id: head.id,
            object: "sluice.stream",
            model: head.model,
            created: head.created,
            status: head.status,
            reason: head.reason,
            detail: head.detail,
            request: serde_json::from_str(&head.request).unwrap_or(Value::Null),
            content,
            chunks,
            timings: head.timings,
            usage: head.usage.and_then(|u| serde_json::from_str(&u).ok()),
        }))
    }
}

/// Up to `limit` of stream `id`'s chunks after `after`, in order: from its blocks, then from its
/// run.
fn read_chunks(
    c: &Connection,
    runs: &Mutex<Runs>,
    id: &str,
    after: u64,
    limit: usize,
    max_bytes: usize,
) -> Result<Vec<Decoded>, StoreError> {
    // The run first, then the blocks: a run written as a block in between is then seen in the
    // block (the other order could miss it in both).
    let in_run: Vec<LoggedChunk> = lock(runs)
        .get(id)
        .map(|run| {
            run.chunks
                .iter()
                .filter(|c| c.seq > after)
                .cloned()
                .collect()
        })
        .unwrap_or_default();
    let mut out: Vec<Decoded> = Vec::new();
    let mut bytes = 0usize;
    let full = |out: &Vec<Decoded>, bytes: usize| out.len() >= limit || bytes >= max_bytes;
    let mut last = after;
    let mut stmt = c.prepare_cached(
        "SELECT body FROM chunk_blocks WHERE stream_id = ?1 AND last_seq > ?2 ORDER BY first_seq",
    )?;
    let mut rows = stmt.query(params![id, after as i64])?;
    'blocks: while let Some(row) = rows.next()? {
        let body: Vec<u8> = row.get(0)?;
        for chunk in block::decode(&body).map_err(|e| StoreError::Db(e.to_string()))? {
            if full(&out, bytes) {
                break 'blocks;
            }
            if chunk.0 > last {
                last = chunk.0;
                bytes += chunk.2.len() + chunk.3.len();
                out.push(chunk);
            }
        }
    }
    for chunk in in_run {
        if full(&out, bytes) {
            break;
        }
        if chunk.seq > last {
            last = chunk.seq;
            bytes += chunk.data.len() + chunk.content.len();
            out.push((
                chunk.seq,
                chunk.offset_us,
                chunk.data.to_string(),
                chunk.content,
            ));
        }
    }
    Ok(out)
}

/// Folds what the log holds beyond the blocks (the runs of a process that ended) into blocks,
/// and empties the log. Also moves chunks from the one-row-per-chunk table of earlier versions.
fn fold_log(conn: &mut Connection) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let old_table: bool = tx.query_row(
        "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'chunks')",
        [],
        |r| r.get(0),
    )?;
    if old_table {
        fold(
            &tx,
            "SELECT stream_id, seq, offset_us, data, content FROM chunks ORDER BY stream_id, seq",
        )?;
        tx.execute_batch("DROP TABLE chunks")?;
    }
    fold(
        &tx,
        "SELECT stream_id, seq, offset_us, data, content FROM chunk_log ORDER BY stream_id, id",
    )?;
    tx.execute("DELETE FROM chunk_log", [])?;
    tx.commit()?;
    Ok(())
}

/// Writes the chunks `query` yields (grouped by stream, in order) as blocks, skipping those a
/// block already holds.
fn fold(tx: &rusqlite::Transaction<'_>, query: &str) -> Result<(), StoreError> {
    let mut stmt = tx.prepare(query)?;
    let mut rows = stmt.query([])?;
    // The stream being folded, the last seq its blocks already hold, and its run so far.
    let mut current = String::new();
    let mut blocked = 0u64;
    let mut run = Run::default();
    while let Some(row) = rows.next()? {
        let id: String = row.get(0)?;
        if id != current {
            write_block(tx, &current, &run.chunks)?;
            run = Run::default();
            blocked = tx.query_row(
                "SELECT COALESCE(MAX(last_seq), 0) FROM chunk_blocks WHERE stream_id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )? as u64;
            current = id;
        }
        let seq = row.get::<_, i64>(1)? as u64;
        if seq <= blocked {
            continue;
        }
        run.push(
            0,
            LoggedChunk {
                seq,
                offset_us: row.get(2)?,
                data: Arc::from(row.get::<_, String>(3)?),
                content: row.get(4)?,
            },
        );
        if run.is_full() {
            write_block(tx, &current, &run.chunks)?;
            run = Run::default();
        }
    }
    write_block(tx, &current, &run.chunks)
}

/// Writes `chunks` (consecutive chunks of stream `id`) as one block; nothing if empty.
fn write_block(tx: &Connection, id: &str, chunks: &[LoggedChunk]) -> Result<(), StoreError> {
    if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
        insert_block(tx, id, first.seq, last.seq, block::encode(chunks))?;
    }
    Ok(())
}

fn insert_block(
    tx: &Connection,
    id: &str,
    first_seq: u64,
    last_seq: u64,
    body: Vec<u8>,
) -> Result<(), StoreError> {
    tx.prepare_cached(
        "INSERT INTO chunk_blocks (stream_id, first_seq, last_seq, body) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![id, first_seq as i64, last_seq as i64, body])?;
    Ok(())
}

/// The writer: a queue of writes and, while it holds any, one blocking job that commits them.
///
/// Why not a writer task that hands each batch to `spawn_blocking`? Every commit then costs two
/// extra thread hand-offs (task → blocking thread → task), and on a loaded machine those
/// wake-ups were most of a commit's latency, which a client sees twice before its first token.
/// Here the job itself takes the writes and acks them; while writes keep coming it never stops,
/// so a busy gateway pays no hand-off at all. It still runs under `spawn_blocking`, so it never
/// blocks the runtime's threads, and tokio knows work is in flight (its paused test clock does
/// not jump ahead while a batch is being written; an idle writer holds no thread).
struct Writer {
    tx: mpsc::Sender<Op>,
    /// Whether a drain job is running (or about to).
    running: AtomicBool,
    /// What the drain job works with; only the running job locks it.
    state: Mutex<WriterState>,
    runs: Arc<Mutex<Runs>>,
    /// Held for each batch (see `checkpointer`).
    gate: Arc<Mutex<()>>,
    runtime: tokio::runtime::Handle,
}

struct WriterState {
    rx: mpsc::Receiver<Op>,
    conn: Connection,
    log: LogState,
}

/// Clears `running` if a drain job ends by unwinding, so the next write starts another.
struct Running<'a>(&'a AtomicBool);

impl Drop for Running<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.store(false, Ordering::SeqCst);
        }
    }
}

impl Writer {
    /// Queues a write (waiting for room) and makes sure a drain job will see it.
    async fn send(self: &Arc<Self>, op: Op) -> Result<(), StoreError> {
        self.tx.send(op).await.map_err(|_| StoreError::Closed)?;
        if !self.running.swap(true, Ordering::SeqCst) {
            let writer = self.clone();
            // If the runtime is shutting down the job never runs; the write's ack is then
            // dropped with the queue and its caller sees `Closed`.
            drop(self.runtime.spawn_blocking(move || writer.drain()));
        }
        Ok(())
    }

    /// Commits batches until the queue is empty.
    fn drain(&self) {
        let _running = Running(&self.running);
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let WriterState { rx, conn, log } = &mut *state;
        let mut batch = Vec::new();
        loop {
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(op) => batch.push(op),
                    Err(_) => break,
                }
            }
            if batch.is_empty() {
                // Unit tests widen the window in which a write can slip past a stopping writer,
                // so a lost wake-up would show (see `no_write_is_stranded...`).
                #[cfg(test)]
                std::thread::sleep(Duration::from_micros(100));
                self.running.store(false, Ordering::SeqCst);
                // A write queued after the last look, whose sender still saw `running`, would
                // otherwise wait for the next write: look once more before stopping.
                match rx.try_recv() {
                    Ok(op) if !self.running.swap(true, Ordering::SeqCst) => {
                        batch.push(op);
                        continue;
                    }
                    // Another job was started meanwhile: it takes over (it waits for the
                    // lock), so this op goes first in its order.
                    Ok(op) => {
                        batch.push(op);
                        self.commit(conn, log, &mut batch);
                        return;
                    }
                    Err(_) => return,
                }
            }
            self.commit(conn, log, &mut batch);
        }
    }

    /// Commits `batch` in one transaction, then acks every write in it (and empties it).
    fn commit(&self, conn: &mut Connection, log: &mut LogState, batch: &mut Vec<Op>) {
        let result = {
            // Held while the checkpoint thread rewinds the WAL (see `checkpointer`).
            let _gate = self.gate.lock().unwrap_or_else(PoisonError::into_inner);
            let started = Instant::now();
            // A panic in a batch must not lose the batch: its acks and watermarks still have to
            // move, or streams would wait for them forever. (The open transaction rolls back,
            // and the runs are only changed after a commit.)
            let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                apply(conn, batch, &self.runs, log)
            }));
            metrics::histogram!("sluice_store_write_seconds")
                .record(started.elapsed().as_secs_f64());
            match applied {
                Ok(r) => r,
                Err(_) => Err(StoreError::Db(
                    "the store writer panicked on this batch".into(),
                )),
            }
        };
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "store batch failed");
        }
        for op in batch.drain(..) {
            match op {
                Op::Begin(_, ack) | Op::Finish(_, ack) | Op::Flush(ack) => {
                    let _ = ack.send(result.clone());
                }
                Op::Append { seq, watermark, .. } => watermark.advance(seq),
            }
        }
    }
}

/// What the writer remembers about the log between batches.
#[derive(Debug, Default)]
struct LogState {
    /// Rows appended since the log's head was last trimmed.
    appended: i64,
}

/// What a batch does to one stream's run; applied to the shared runs once committed.
#[derive(Debug, Default)]
struct RunChange {
    /// The run as it was before the batch has been written as a block.
    written: bool,
    /// Chunks this batch logged (after that block, if any).
    staged: Run,
}

impl RunChange {
    /// The run's chunks as they now stand: what is left of the shared run, then the staged ones.
    fn chunks<'a>(&'a self, runs: &'a Runs, id: &str) -> impl Iterator<Item = &'a LoggedChunk> {
        let base = if self.written { None } else { runs.get(id) };
        base.into_iter()
            .flat_map(|run| run.chunks.iter())
            .chain(self.staged.chunks.iter())
    }

    fn is_full(&self, runs: &Runs, id: &str) -> bool {
        let base = if self.written { None } else { runs.get(id) };
        let (n, bytes) = base.map_or((0, 0), |run| (run.chunks.len(), run.bytes));
        n + self.staged.chunks.len() >= block::BLOCK_CHUNKS
            || bytes + self.staged.bytes >= block::BLOCK_BYTES
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

fn apply(
    conn: &mut Connection,
    batch: &[Op],
    runs: &Mutex<Runs>,
    log: &mut LogState,
) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    let mut changes: HashMap<Arc<str>, RunChange> = HashMap::new();
    for op in batch {
        match op {
            Op::Begin(s, _) => {
                tx.execute(
                    "INSERT INTO streams (id, tenant, model, request, status, created) VALUES (?1, ?2, ?3, ?4, 'streaming', ?5)",
                    params![s.id, s.tenant, s.model, s.request.to_string(), now_unix()],
                )?;
            }
            Op::Append {
                id,
                seq,
                offset,
                data,
                content,
                ..
            } => {
                let offset_us = offset.as_micros() as i64;
                tx.prepare_cached("INSERT INTO chunk_log (stream_id, seq, offset_us, data, content) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![&**id, *seq as i64, offset_us, &**data, content])?;
                log.appended += 1;
                let change = changes.entry(id.clone()).or_default();
                change.staged.push(
                    tx.last_insert_rowid(),
                    LoggedChunk {
                        seq: *seq,
                        offset_us,
                        data: data.clone(),
                        content: content.clone(),
                    },
                );
                if change.is_full(&lock(runs), id) {
                    change.write(&tx, runs, id)?;
                }
            }
            Op::Finish(f, _) => {
                let id: Arc<str> = Arc::from(f.id.as_str());
                changes
                    .entry(id.clone())
                    .or_default()
                    .write(&tx, runs, &id)?;
                tx.execute(
                    "UPDATE streams SET status = ?2, reason = ?3, detail = ?4, first_token_us = ?5, total_us = ?6,
                         usage = ?7, chunk_count = ?8
                     WHERE id = ?1 AND status = 'streaming'",
                    params![
                        f.id,
                        f.ending.status().as_str(),
                        f.ending.reason().map(|r| r.as_str()),
                        f.ending.detail(),
                        f.first_token.map(|d| d.as_micros() as i64),
                        f.total.as_micros() as i64,
                        f.usage.as_ref().map(Value::to_string),
                        f.chunks as i64,
                    ],
                )?;
            }
            Op::Flush(_) => {}
        }
    }
    if log.appended >= block::LOG_CHECK_EVERY {
        trim_log(&tx, runs, &mut changes)?;
        log.appended = 0;
    }
    tx.commit()?;
    let mut runs = lock(runs);
    for (id, change) in changes {
        if change.written {
            runs.remove(&id);
        }
        if !change.staged.chunks.is_empty() {
            runs.entry(id).or_default().append(change.staged);
        }
    }
    Ok(())
}

/// Writes runs that started too far back in the log as blocks, then deletes the log rows that
/// no run needs any more.
fn trim_log(
    tx: &Connection,
    runs: &Mutex<Runs>,
    changes: &mut HashMap<Arc<str>, RunChange>,
) -> Result<(), StoreError> {
    let newest: i64 = tx.query_row("SELECT COALESCE(MAX(id), 0) FROM chunk_log", [], |r| {
        r.get(0)
    })?;
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
    let keep_from = [still_shared, staged]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(newest + 1);
    tx.execute("DELETE FROM chunk_log WHERE id < ?1", params![keep_from])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A final record with no timings, usage or chunks.
    fn bare_finish(id: &str, ending: Ending) -> Finish {
        Finish {
            id: id.into(),
            ending,
            first_token: None,
            total: Duration::ZERO,
            usage: None,
            chunks: 0,
        }
    }

    /// `local`'s stream `id`, which must exist.
    async fn transcript(store: &Store, id: &str) -> Transcript {
        store.get("local", id).await.expect("read").expect("exists")
    }

    fn new_stream(id: &str) -> NewStream {
        NewStream {
            id: id.into(),
            tenant: "local".into(),
            model: "sim".into(),
            request: serde_json::json!({"model": "sim", "messages": []}),
        }
    }

    #[tokio::test]
    async fn a_stream_round_trips_with_its_chunks_in_order() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, recovered) = Store::open(dir.path()).expect("open");
        assert_eq!(recovered, 0);
        store.begin(new_stream("s1")).await.expect("begin");
        let id: Arc<str> = Arc::from("s1");
        let watermark = Watermark::new();
        for (seq, text) in [(1, "Hel"), (2, "lo")] {
            let data = format!(r#"{{"choices":[{{"delta":{{"content":"{text}"}}}}]}}"#);
            store
                .append(
                    &id,
                    seq,
                    Duration::from_millis(seq * 10),
                    data.into(),
                    text.into(),
                    &watermark,
                )
                .await
                .expect("append");
            watermark.reached(seq).await;
        }
        store
            .finish(Finish {
                id: "s1".into(),
                ending: Ending::Completed,
                first_token: Some(Duration::from_millis(10)),
                total: Duration::from_millis(25),
                usage: Some(serde_json::json!({"total_tokens": 2})),
                chunks: 2,
            })
            .await
            .expect("finish");
        let t = transcript(&store, "s1").await;
        assert_eq!(t.status, Status::Completed);
        assert_eq!(t.content, "Hello");
        assert_eq!(
            t.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(t.chunks[1].offset_ms, 20.0);
        assert_eq!(t.timings.total_ms, Some(25.0));
        // Another tenant sees nothing.
        assert!(store.get("other", "s1").await.expect("read").is_none());
    }

    /// Appends chunk `seq` of stream `id` (its text is `"{id}.{seq} "`).
    async fn append_chunk(store: &Store, id: &Arc<str>, seq: u64, watermark: &Watermark) {
        let text = format!("{id}.{seq} ");
        let data = serde_json::json!({"choices": [{"delta": {"content": text}}]}).to_string();
        store
            .append(
                id,
                seq,
                Duration::from_micros(seq),
                data.into(),
                text,
                watermark,
            )
            .await
            .expect("append");
    }

    fn expected_text(id: &str, chunks: u64) -> String {
        (1..=chunks).map(|seq| format!("{id}.{seq} ")).collect()
    }

    /// Every committed chunk is readable, in order and once, whether it is in the stream's run,
    /// in a block, or in both at the moment of reading.
    #[tokio::test]
    async fn interleaved_streams_read_back_whole_at_every_point() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let ids: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("s{i}"))).collect();
        let marks: Vec<Watermark> = ids.iter().map(|_| Watermark::new()).collect();
        for id in &ids {
            store.begin(new_stream(id)).await.expect("begin");
        }
        // 100 chunks each: three blocks and a run, interleaved across the streams.
        for seq in 1..=100u64 {
            for (id, mark) in ids.iter().zip(&marks) {
                append_chunk(&store, id, seq, mark).await;
            }
            if seq % 7 == 0 || seq == 32 || seq == 33 {
                marks[0].reached(seq).await;
                let state = store
                    .state("local", "s0")
                    .await
                    .expect("state")
                    .expect("s0");
                assert!(state.last_seq >= seq);
                let all = store
                    .chunks_after("s0", 0, usize::MAX, usize::MAX)
                    .await
                    .expect("read");
                assert!(all.len() as u64 >= seq);
                assert!(all.iter().map(|c| c.0).eq(1..=all.len() as u64));
                let tail = store
                    .chunks_after("s0", seq - 5, 3, usize::MAX)
                    .await
                    .expect("read");
                assert_eq!(
                    tail.iter().map(|c| c.0).collect::<Vec<_>>(),
                    vec![seq - 4, seq - 3, seq - 2]
                );
            }
        }
        for (id, mark) in ids.iter().zip(&marks) {
            mark.reached(100).await;
            let t = transcript(&store, id).await;
            assert_eq!(t.content, expected_text(id, 100), "{id} while streaming");
        }
        store
            .finish(bare_finish("s1", Ending::Completed))
            .await
            .expect("finish");
        let t = transcript(&store, "s1").await;
        assert_eq!(t.content, expected_text("s1", 100));
        assert_eq!(t.chunks[99].offset_ms, 0.1);
        assert_eq!(
            store
                .chunks_after("s1", 98, 10, usize::MAX)
                .await
                .expect("read")
                .iter()
                .map(|c| c.0)
                .collect::<Vec<_>>(),
            vec![99, 100]
        );
    }

    /// A process that dies leaves chunks only in the log; opening folds them into blocks.
    #[tokio::test]
    async fn chunks_only_in_the_log_survive_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store.begin(new_stream("a")).await.expect("begin");
            let id: Arc<str> = Arc::from("a");
            let mark = Watermark::new();
            for seq in 1..=45 {
                append_chunk(&store, &id, seq, &mark).await;
            }
            mark.reached(45).await;
            // Dropped with 13 chunks in a run: like a kill, nothing more is written.
        }
        let (store, recovered) = Store::open(dir.path()).expect("reopen");
        assert_eq!(recovered, 1);
        let t = transcript(&store, "a").await;
        assert_eq!(
            (t.status, t.reason),
            (Status::Interrupted, Some(Reason::Crash))
        );
        assert_eq!(t.content, expected_text("a", 45));
        let c = Connection::open(store.path()).expect("open db");
        let logged: i64 = c
            .query_row("SELECT COUNT(*) FROM chunk_log", [], |r| r.get(0))
            .expect("count");
        assert_eq!(logged, 0, "the log is emptied once folded");
        // Opening again changes nothing.
        drop(store);
        let (store, _) = Store::open(dir.path()).expect("reopen");
        let t = transcript(&store, "a").await;
        assert_eq!(t.content, expected_text("a", 45));
    }

    /// Under writes that never pause, the WAL still rewinds (a passive checkpoint alone never
    /// catches up with such a writer, and the WAL would grow with everything written).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_wal_stays_bounded_under_writes_that_never_pause() {
        let dir = tempfile::tempdir().expect("tempdir");
        let when = Checkpoints {
            every: Duration::from_millis(5),
            rewind_frames: 64,
        };
        let (store, _) = Store::open_with(dir.path(), when).expect("open");
        let ids: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("w{i}"))).collect();
        for id in &ids {
            store.begin(new_stream(id)).await.expect("begin");
        }
        let mark = Watermark::new();
        let data: Arc<str> = Arc::from(format!("\"{}\"", "x".repeat(1000)));
        let chunks: u64 = 20_000;
        for seq in 1..=chunks {
            // Never waits for a commit: the writer's queue is never empty.
            for id in &ids {
                store
                    .append(id, seq, Duration::ZERO, data.clone(), String::new(), &mark)
                    .await
                    .expect("append");
            }
        }
        mark.reached(chunks).await;
        let written = chunks * ids.len() as u64 * 1000;
        let wal = std::fs::metadata(store.path().with_extension("db-wal"))
            .expect("wal")
            .len();
        assert!(
            wal < written / 4,
            "the WAL is {wal} bytes after {written} bytes of chunks"
        );
    }

    /// The writer stops whenever its queue is empty and the next write starts it again; no
    /// write may slip between a stopping writer and its sender (it would wait forever).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn no_write_is_stranded_while_the_writer_starts_and_stops() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let writers: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    for _ in 0..1500 {
                        store.flush().await.expect("flush");
                    }
                })
            })
            .collect();
        let all = futures_util::future::join_all(writers);
        // Generous: the work takes well under a second; a stranded write never finishes.
        let done = tokio::time::timeout(Duration::from_secs(60), all).await;
        assert!(done.is_ok(), "a write was left waiting for a writer");
    }

    /// Databases of earlier versions kept one row per chunk; opening moves them into blocks.
    #[tokio::test]
    async fn chunks_of_the_earlier_layout_are_moved_into_blocks() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let c = Connection::open(dir.path().join("sluice.db")).expect("create");
            c.execute_batch(
                "CREATE TABLE chunks (stream_id TEXT NOT NULL, seq INTEGER NOT NULL, offset_us INTEGER NOT NULL,
                     data TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (stream_id, seq)) WITHOUT ROWID;
                 CREATE TABLE streams (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                     tenant TEXT NOT NULL, model TEXT NOT NULL, request TEXT NOT NULL, status TEXT NOT NULL,
                     reason TEXT, detail TEXT, created INTEGER NOT NULL, first_token_us INTEGER,
                     total_us INTEGER, usage TEXT, chunk_count INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO streams (id, tenant, model, request, status, created, chunk_count)
                     VALUES ('old', 'local', 'sim', '{}', 'completed', 0, 40);",
            )
            .expect("old schema");
            for seq in (1..=40).rev() {
                c.execute(
                    "INSERT INTO chunks VALUES ('old', ?1, ?1, '{}', ?2)",
                    params![seq, format!("old.{seq} ")],
                )
                .expect("old chunk");
            }
        }
        let (store, recovered) = Store::open(dir.path()).expect("open");
        assert_eq!(recovered, 0);
        let t = transcript(&store, "old").await;
        assert_eq!(t.status, Status::Completed);
        assert_eq!(t.content, expected_text("old", 40));
    }

    /// The log is trimmed as runs become blocks, and a quiet stream's run is written as a block
    /// before it can hold the log back for long.
    #[tokio::test]
    async fn the_log_stays_short_and_a_quiet_stream_does_not_pin_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        let quiet: Arc<str> = Arc::from("quiet");
        let busy: Arc<str> = Arc::from("busy");
        let (quiet_mark, busy_mark) = (Watermark::new(), Watermark::new());
        store.begin(new_stream(&quiet)).await.expect("begin");
        store.begin(new_stream(&busy)).await.expect("begin");
        append_chunk(&store, &quiet, 1, &quiet_mark).await;
        let total = (block::LOG_SPAN + 3 * block::LOG_CHECK_EVERY) as u64;
        for seq in 1..=total {
            append_chunk(&store, &busy, seq, &busy_mark).await;
        }
        busy_mark.reached(total).await;
        let c = Connection::open(store.path()).expect("open db");
        let logged: i64 = c
            .query_row("SELECT COUNT(*) FROM chunk_log", [], |r| r.get(0))
            .expect("count");
        assert!(
            logged <= 2 * block::LOG_CHECK_EVERY,
            "{logged} rows left in the log"
        );
        let quiet_blocks: i64 = c
            .query_row(
                "SELECT COUNT(*) FROM chunk_blocks WHERE stream_id = 'quiet'",
                [],
                |r| r.get(0),
            )
            .expect("count");
        assert_eq!(quiet_blocks, 1, "the quiet run was written as a block");
        let t = transcript(&store, "quiet").await;
        assert_eq!(t.content, expected_text("quiet", 1));
        append_chunk(&store, &quiet, 2, &quiet_mark).await;
        quiet_mark.reached(2).await;
        let t = transcript(&store, "quiet").await;
        assert_eq!(t.content, expected_text("quiet", 2));
        let busy_chunks = store
            .chunks_after("busy", 0, usize::MAX, usize::MAX)
            .await
            .expect("read");
        assert!(busy_chunks.iter().map(|c| c.0).eq(1..=total));
    }

    #[tokio::test]
    async fn reopening_marks_open_streams_interrupted_by_a_crash() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let (store, _) = Store::open(dir.path()).expect("open");
            store.begin(new_stream("open")).await.expect("begin");
            store.begin(new_stream("done")).await.expect("begin");
            store
                .finish(bare_finish("done", Ending::Completed))
                .await
                .expect("finish");
        }
        let (store, recovered) = Store::open(dir.path()).expect("reopen");
        assert_eq!(recovered, 1);
        let t = transcript(&store, "open").await;
        assert_eq!(
            (t.status, t.reason),
            (Status::Interrupted, Some(Reason::Crash))
        );
        let t = transcript(&store, "done").await;
        assert_eq!(t.status, Status::Completed);
    }

    #[tokio::test]
    async fn a_final_status_is_written_once() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        store.begin(new_stream("s")).await.expect("begin");
        store
            .finish(bare_finish("s", Ending::abnormal(Reason::Idle, "idle")))
            .await
            .expect("finish");
        store
            .finish(bare_finish("s", Ending::Completed))
            .await
            .expect("finish");
        let t = transcript(&store, "s").await;
        assert_eq!(t.status, Status::TimedOut);
    }

    #[tokio::test]
    async fn list_is_newest_first_and_paged() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (store, _) = Store::open(dir.path()).expect("open");
        for i in 0..5 {
            store
                .begin(new_stream(&format!("s{i}")))
                .await
                .expect("begin");
        }
        let (page, more) = store.list("local", 2, None).await.expect("list");
        assert_eq!(
            page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            vec!["s4", "s3"]
        );
        assert!(more);
        let (page, more) = store
            .list("local", 10, Some("s3".into()))
            .await
            .expect("list");
        assert_eq!(
            page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
            vec!["s2", "s1", "s0"]
        );
        assert!(!more);
        assert!(store
            .list("other", 10, None)
            .await
            .expect("list")
            .0
            .is_empty());
    }
}
