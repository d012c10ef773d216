//! The transcript store: streams and their chunks, in an embedded SQLite database.
//!
//! One writer task owns the write connection. Writes arrive over a bounded channel, so a slow
//! disk slows the relays down instead of growing memory, and the writer commits everything that
//! is waiting in one transaction (a batch), so chunk appends cost one fsync per batch, not per
//! chunk. The database runs in WAL mode, so reads (on their own connection) never wait for the
//! writer. Writes on the channel are applied in order: a stream's final status is always written
//! after every chunk appended before it. `begin`, `finish` and `flush` return once committed;
//! `append` returns once queued, and the stream's [`Watermark`] reaches the chunk when it is
//! committed (so a relay never waits for one chunk's commit before reading the next). With WAL
//! and `synchronous = NORMAL` a committed write survives a crash of the process (not necessarily
//! a power cut: the WAL is synced at checkpoints, which run on their own thread).
//!
//! At open, streams still marked `streaming` belong to a process that died: they are marked
//! `interrupted(crash)`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rusqlite::{params, Connection, OptionalExtension};
use serde::Serialize;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot, watch};

use crate::status::{Ending, Reason, Status};

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
    writer: mpsc::Sender<Op>,
    reader: Arc<Mutex<Connection>>,
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

/// Copies the WAL into the database every half second, without waiting for readers or the
/// writer (a passive checkpoint), until `stop` is set.
fn checkpointer(conn: Connection, stop: &std::sync::atomic::AtomicBool) {
    while !stop.load(std::sync::atomic::Ordering::SeqCst) {
        std::thread::sleep(Duration::from_millis(500));
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::warn!(error = %e, "checkpoint failed");
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
CREATE TABLE IF NOT EXISTS chunks (
    stream_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    offset_us INTEGER NOT NULL,
    data TEXT NOT NULL,
    content TEXT NOT NULL,
    PRIMARY KEY (stream_id, seq)
) WITHOUT ROWID;
";

impl Store {
    /// Opens (creating if needed) the database in `data_dir`, marks streams a crash left open
    /// as `interrupted(crash)`, and starts the writer. Returns the store and how many streams
    /// were recovered.
    pub fn open(data_dir: &Path) -> Result<(Self, u64), StoreError> {
        std::fs::create_dir_all(data_dir)
            .map_err(|e| StoreError::Db(format!("cannot create {}: {e}", data_dir.display())))?;
        let path = data_dir.join("sluice.db");
        let write = Connection::open(&path)?;
        write.pragma_update(None, "journal_mode", "WAL")?;
        write.pragma_update(None, "synchronous", "NORMAL")?;
        // Checkpoints run on their own thread (below), not inside whichever commit crosses
        // the threshold: that commit, and every chunk waiting on it, would stall for the copy.
        write.pragma_update(None, "wal_autocheckpoint", 0)?;
        write.busy_timeout(Duration::from_secs(5))?;
        write.execute_batch(SCHEMA)?;
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
        std::thread::Builder::new()
            .name("sluice-store-checkpoint".into())
            .spawn(move || checkpointer(checkpoints, &stop))
            .map_err(|e| StoreError::Db(format!("cannot start the checkpoint thread: {e}")))?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| StoreError::Db("the store needs a tokio runtime".into()))?;
        runtime.spawn(writer(write, rx));
        Ok((
            Self {
                writer: tx,
                reader: Arc::new(Mutex::new(read)),
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
        self.writer
            .send(make(ack))
            .await
            .map_err(|_| StoreError::Closed)?;
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
            .map_err(|_| StoreError::Closed)
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
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT status, reason, detail,
                        (SELECT COALESCE(MAX(seq), 0) FROM chunks WHERE stream_id = streams.id)
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
                last_seq: last as u64,
            }))
        })
        .await
    }

    /// Up to `limit` of stream `id`'s chunks after event id `after`, in order, as (id, JSON
    /// exactly as relayed). The caller has checked the tenant.
    pub async fn chunks_after(
        &self,
        id: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, String)>, StoreError> {
        let id = id.to_string();
        self.read(move |c| {
            let mut stmt = c.prepare_cached(
                "SELECT seq, data FROM chunks WHERE stream_id = ?1 AND seq > ?2 ORDER BY seq LIMIT ?3",
            )?;
            let rows = stmt
                .query_map(params![id, after as i64, limit as i64], |r| {
                    Ok((r.get::<_, i64>(0)? as u64, r.get::<_, String>(1)?))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            Ok(rows)
        })
        .await
    }

    /// One of `tenant`'s streams, whole.
    pub async fn get(&self, tenant: &str, id: &str) -> Result<Option<Transcript>, StoreError> {
        let (tenant, id) = (tenant.to_string(), id.to_string());
        self.read(move |c| {
            let row = c
                .query_row(
                    "SELECT model, created, status, reason, detail, request, first_token_us, total_us, usage
                     FROM streams WHERE id = ?1 AND tenant = ?2",
                    params![id, tenant],
                    |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            r.get::<_, i64>(1)?,
                            r.get::<_, String>(2)?,
                            r.get::<_, Option<String>>(3)?,
                            r.get::<_, Option<String>>(4)?,
                            r.get::<_, String>(5)?,
                            r.get::<_, Option<i64>>(6)?,
                            r.get::<_, Option<i64>>(7)?,
                            r.get::<_, Option<String>>(8)?,
                        ))
                    },
                )
                .optional()?;
            let Some((model, created, status, reason, detail, request, first_us, total_us, usage)) = row else {
                return Ok(None);
            };
            let mut stmt = c.prepare("SELECT seq, offset_us, data, content FROM chunks WHERE stream_id = ?1 ORDER BY seq")?;
            let mut content = String::new();
            let chunks = stmt
                .query_map(params![id], |r| {
                    Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, String>(2)?, r.get::<_, String>(3)?))
                })?
                .map(|row| {
                    let (seq, offset_us, data, text) = row?;
                    content.push_str(&text);
                    Ok(StoredChunk {
                        seq: seq as u64,
                        offset_ms: offset_us as f64 / 1000.0,
                        data: serde_json::from_str(&data).unwrap_or(Value::String(data)),
                    })
                })
                .collect::<Result<Vec<_>, StoreError>>()?;
            let us = |v: Option<i64>| v.map(|u| ms(Duration::from_micros(u as u64)));
            Ok(Some(Transcript {
                id,
                object: "sluice.stream",
                model,
                created,
                status: Status::parse(&status).unwrap_or(Status::Failed),
                reason: reason.as_deref().and_then(Reason::parse),
                detail,
                request: serde_json::from_str(&request).unwrap_or(Value::Null),
                content,
                chunks,
                timings: Timings {
                    time_to_first_token_ms: us(first_us),
                    total_ms: us(total_us),
                },
                usage: usage.and_then(|u| serde_json::from_str(&u).ok()),
            }))
        })
        .await
    }
}

/// The writer: takes every waiting write, commits them in one transaction, then acks.
///
/// The SQLite work of each batch runs under `spawn_blocking`, so it never blocks the runtime's
/// threads, and tokio knows work is in flight (its paused test clock does not jump ahead while
/// a batch is being written).
async fn writer(conn: Connection, mut rx: mpsc::Receiver<Op>) {
    let mut conn = Some(conn);
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let Some(mut c) = conn.take() else { break };
        let written = tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            // A panic in a batch must not lose the batch: its acks and watermarks still have to
            // move, or streams would wait for them forever. (The open transaction rolls back.)
            let applied =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| apply(&mut c, &batch)));
            let result = match applied {
                Ok(r) => r.map_err(StoreError::from),
                Err(_) => Err(StoreError::Db(
                    "the store writer panicked on this batch".into(),
                )),
            };
            (c, batch, result, started.elapsed())
        })
        .await;
        let Ok((c, batch, result, took)) = written else {
            // Unreachable in practice (the panic is caught above); the runtime is shutting down.
            tracing::error!("the store writer stopped; writes will fail from now on");
            break;
        };
        conn = Some(c);
        metrics::histogram!("sluice_store_write_seconds").record(took.as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(error = %e, writes = batch.len(), "store batch failed");
        }
        for op in batch {
            match op {
                Op::Begin(_, ack) | Op::Finish(_, ack) | Op::Flush(ack) => {
                    let _ = ack.send(result.clone());
                }
                Op::Append { seq, watermark, .. } => watermark.advance(seq),
            }
        }
    }
}

fn apply(conn: &mut Connection, batch: &[Op]) -> Result<(), rusqlite::Error> {
    let tx = conn.transaction()?;
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
                tx.prepare_cached("INSERT OR IGNORE INTO chunks (stream_id, seq, offset_us, data, content) VALUES (?1, ?2, ?3, ?4, ?5)")?
                    .execute(params![&**id, *seq as i64, offset.as_micros() as i64, &**data, content])?;
            }
            Op::Finish(f, _) => {
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
    tx.commit()
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
        let t = store
            .get("local", "s1")
            .await
            .expect("read")
            .expect("exists");
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
        let t = store
            .get("local", "open")
            .await
            .expect("read")
            .expect("exists");
        assert_eq!(
            (t.status, t.reason),
            (Status::Interrupted, Some(Reason::Crash))
        );
        let t = store
            .get("local", "done")
            .await
            .expect("read")
            .expect("exists");
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
        let t = store
            .get("local", "s")
            .await
            .expect("read")
            .expect("exists");
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
