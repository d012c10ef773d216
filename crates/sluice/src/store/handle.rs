//! [`Store`]: one interface over the backends. Callers never know which one they talk to; what
//! is the same for every backend (a whole transcript, built from pages) is written once here.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::oneshot;

use super::postgres::{PgOptions, PgStore};
use super::sqlite::SqliteStore;
use super::write::{Arrival, Op};
use super::{
    Change, ChunkRecord, Finish, NewStream, StoreError, StoredChunk, StreamState, StreamSummary,
    Transcript, TranscriptHead, Watermark,
};
use crate::stream::{StreamId, Tenant};

/// A handle to the store; cheap to clone.
#[derive(Debug, Clone)]
pub struct Store(Backend);

#[derive(Debug, Clone)]
enum Backend {
    Sqlite(SqliteStore),
    Postgres(PgStore),
}

/// Runs the same call on whichever backend this is.
macro_rules! on_backend {
    ($store:expr, $b:ident => $call:expr) => {
        match &$store.0 {
            Backend::Sqlite($b) => $call,
            Backend::Postgres($b) => $call,
        }
    };
}

impl Store {
    /// Opens (creating if needed) the SQLite database in `data_dir`, marks streams a crash left
    /// open as `interrupted(crash)`, and starts the writer. Returns the store and how many
    /// streams were recovered.
    pub fn open(data_dir: &Path) -> Result<(Self, u64), StoreError> {
        SqliteStore::open(data_dir).map(|(s, n)| (Store(Backend::Sqlite(s)), n))
    }

    /// Connects to the PostgreSQL database at `url` (`postgres://user@host:port/db`), applies
    /// its migrations, marks the streams of nodes that died `interrupted(crash)`, and starts the
    /// writer. Returns the store and how many streams were recovered.
    pub async fn connect(url: &str, options: PgOptions) -> Result<(Self, u64), StoreError> {
        PgStore::connect(url, options)
            .await
            .map(|(s, n)| (Store(Backend::Postgres(s)), n))
    }

    /// Applies the PostgreSQL store's migrations at `url` and returns how many it applied
    /// (`sluice migrate`).
    pub async fn migrate(url: &str) -> Result<usize, StoreError> {
        PgStore::migrate(url).await
    }

    /// A handle on a SQLite store opened by hand (tests that tune it).
    #[cfg(test)]
    pub(super) fn from_sqlite(store: SqliteStore) -> Self {
        Store(Backend::Sqlite(store))
    }

    /// From now on every journal write of a SQLite store fails as on a full disk (tests of what
    /// that does).
    #[cfg(test)]
    pub(crate) fn fail_journal_writes(&self) {
        if let Backend::Sqlite(s) = &self.0 {
            s.fail_journal_writes();
        }
    }

    /// The SQLite database file (`None` on PostgreSQL).
    pub fn path(&self) -> Option<&Path> {
        match &self.0 {
            Backend::Sqlite(s) => Some(s.path()),
            Backend::Postgres(_) => None,
        }
    }

    /// News from the other nodes sharing this store (`None` when nothing is shared: SQLite).
    pub fn changes(&self) -> Option<tokio::sync::broadcast::Receiver<Change>> {
        match &self.0 {
            Backend::Sqlite(_) => None,
            Backend::Postgres(p) => Some(p.changes()),
        }
    }

    /// Asks the node running `tenant`'s stream `id` to cancel it; `false` if no other node can
    /// be running it (SQLite).
    pub async fn request_cancel(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<bool, StoreError> {
        match &self.0 {
            Backend::Sqlite(_) => Ok(false),
            Backend::Postgres(p) => p.request_cancel(tenant.0, id.0).await.map(|()| true),
        }
    }

    /// Which backend this is: `"sqlite"` or `"postgres"`.
    pub fn backend(&self) -> &'static str {
        match &self.0 {
            Backend::Sqlite(_) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// Sends `make(ack)` to the writer and waits for its answer (once committed).
    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), StoreError>>) -> Op,
    ) -> Result<(), StoreError> {
        let (ack, done) = oneshot::channel();
        let op = make(ack);
        on_backend!(self, b => b.send(op).await)?;
        done.await.map_err(|_| StoreError::Closed)?
    }

    /// Records a new stream as `streaming`; returns once it is committed. A stream whose key
    /// limits its running streams takes a place among them, held until its final status is
    /// written; none left: [`StoreError::KeyBusy`] (see `store/limits.rs`).
    pub async fn begin(&self, stream: NewStream) -> Result<(), StoreError> {
        let limited = stream
            .key
            .as_ref()
            .and_then(|k| Some((k.id.clone(), k.max_running?)));
        match (&self.0, limited) {
            (Backend::Postgres(p), Some((key, limit))) => {
                p.begin_limited(&stream, &key, limit).await
            }
            (Backend::Sqlite(s), Some((key, limit))) => {
                let id = stream.id.clone();
                s.limits().take_place(&id, &key, limit)?;
                let begun = self.call(|ack| Op::Begin(stream, ack)).await;
                if begun.is_err() {
                    s.limits().free_place(&id);
                }
                begun
            }
            (_, None) => self.call(|ack| Op::Begin(stream, ack)).await,
        }
    }

    /// Takes one of `key`'s `per_minute` chat requests (a token bucket refilled continuously,
    /// shared by every node): `None` if admitted, else how long until a request would be.
    pub async fn take_request(
        &self,
        key: &str,
        per_minute: u32,
    ) -> Result<Option<Duration>, StoreError> {
        match &self.0 {
            Backend::Sqlite(s) => Ok(s.limits().take_request(key, per_minute)),
            Backend::Postgres(p) => p.take_request(key, per_minute).await,
        }
    }

    /// Queues a chunk for the writer and returns at once (after waiting only for room in the
    /// writer's queue). `watermark` reaches `seq` when the chunk is committed, together with
    /// whatever else the writer batched alongside it. The relay hands a chunk to anyone only
    /// after that, so a chunk a client has seen survives a crash of the process. (If a commit
    /// fails, the error is logged and counted, and the watermark moves on all the same.)
    ///
    /// A chunk that came after a pause (`arrival`; a bare offset is not) is committed before
    /// this returns if the SQLite writer is idle, on the caller's thread: no thread hand-off
    /// between the chunk and its client. A chunk whose caller commits it
    /// ([`Arrival::caller_commits`], what the relay does) waits to be committed with the rest
    /// of its burst: by a commit that is running, or when the caller calls
    /// [`commit_waiting`](Self::commit_waiting), which it must before it waits for anything.
    /// Any other chunk is committed here if the writer has been quiet for a while (no commit in
    /// the last 500 µs), else left to the writer's job with whatever else is waiting.
    pub async fn append(
        &self,
        id: &Arc<str>,
        seq: u64,
        arrival: impl Into<Arrival>,
        data: Arc<str>,
        content: String,
        watermark: &Watermark,
    ) -> Result<(), StoreError> {
        let arrival = arrival.into();
        let op = Op::Append {
            id: id.clone(),
            seq,
            offset: arrival.offset,
            data,
            content,
            watermark: watermark.clone(),
            promptly: arrival.after_pause,
            caller_commits: arrival.caller_commits,
        };
        // Almost always there is room: queue it without a wait. Only a full queue waits, and
        // that wait is boxed, so a relay's task does not carry room for it while the stream
        // is idle (the waiting send, with the chunk in it, is most of a kilobyte).
        let op = match on_backend!(self, b => b.try_send(op)) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Closed(_)) => return Err(StoreError::Closed),
            Err(TrySendError::Full(op)) => op,
        };
        Box::pin(async move { on_backend!(self, b => b.send(op).await) }).await
    }

    /// Commits the chunks a relay appended since it last called this (`appended` of them, none
    /// after a pause), now that it is about to wait for the upstream or for room toward its
    /// client (see [`append`](Self::append)). On SQLite, with the writer idle, a burst (two
    /// chunks or more) is committed on the caller's thread and a lone chunk there only if the
    /// writer has been quiet for a while (no commit in the last 500 µs), else by the writer's
    /// blocking job. Never waits. (PostgreSQL's writer takes every write as it comes.)
    pub fn commit_waiting(&self, appended: usize) {
        if let Backend::Sqlite(s) = &self.0 {
            s.commit_waiting(appended);
        }
    }

    /// Writes a stream's final status; returns once it is committed (with every chunk before
    /// it). Run this under a shield.
    ///
    /// The stream's place among its key's running streams is freed once the status is
    /// written. On PostgreSQL a status the writer had to give up (the database away) is kept and
    /// written when the database returns; the place is freed then.
    pub async fn finish(&self, finish: Finish) -> Result<(), StoreError> {
        match &self.0 {
            Backend::Sqlite(s) => {
                let id = finish.id.clone();
                let written = self.call(|ack| Op::Finish(finish, ack)).await;
                // The stream is over in this process, written or not.
                s.limits().free_place(&id);
                written
            }
            Backend::Postgres(_) => self.call(|ack| Op::Finish(finish, ack)).await,
        }
    }

    /// Forgets `tenant`'s stream `id` and its chunks, if it has ended (a running stream is left
    /// alone: cancel it first); returns once committed.
    pub async fn delete(&self, tenant: Tenant<'_>, id: StreamId<'_>) -> Result<(), StoreError> {
        let (tenant, id) = (tenant.0.to_string(), id.0.to_string());
        self.call(|ack| Op::Delete { tenant, id, ack }).await
    }

    /// Forgets every stream that has ended and started before `before` (Unix seconds), with its
    /// chunks (`[store] retention_hours`).
    pub async fn expire(&self, before: i64) -> Result<(), StoreError> {
        self.call(|ack| Op::Expire { before, ack }).await
    }

    /// Waits until every write sent so far is committed.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.call(Op::Flush).await
    }

    /// A page of `tenant`'s streams, newest first, starting after the stream `after`.
    /// Returns the page and whether there are more.
    pub async fn list(
        &self,
        tenant: Tenant<'_>,
        limit: usize,
        after: Option<String>,
    ) -> Result<(Vec<StreamSummary>, bool), StoreError> {
        on_backend!(self, b => b.list(tenant, limit, after).await)
    }

    /// Where `tenant`'s stream `id` stands.
    pub async fn state(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<StreamState>, StoreError> {
        on_backend!(self, b => b.state(tenant, id).await)
    }

    /// Everything about one of `tenant`'s streams but its chunks, and the id of its last chunk
    /// now: read the chunks page by page (a transcript can be any size).
    pub async fn head(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<TranscriptHead>, StoreError> {
        on_backend!(self, b => b.head(tenant, id).await)
    }

    /// A page of stream `id`'s chunks after event id `after`, in order: up to `limit` chunks and
    /// about `max_bytes` of JSON (at least one chunk, so a page always moves on). The caller
    /// has checked the tenant.
    pub async fn chunk_page(
        &self,
        id: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChunkRecord>, StoreError> {
        on_backend!(self, b => b.chunk_page(id, after, limit, max_bytes).await)
    }

    /// Like [`Store::chunk_page`], as (id, JSON exactly as relayed).
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

    /// One of `tenant`'s streams, whole, in memory. For tools and tests: the API streams a
    /// transcript out page by page instead (see [`Store::head`]).
    pub async fn get(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<Transcript>, StoreError> {
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
            attempts: head.attempts.and_then(|a| serde_json::from_str(&a).ok()),
        }))
    }
}
