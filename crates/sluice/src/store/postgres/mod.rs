//! The PostgreSQL backend: several sluice nodes on one database.
//!
//! - **Schema**: versioned migrations (`migrations`), applied at connect under an advisory lock,
//!   so nodes starting together migrate once. `sluice migrate` runs them alone.
//! - **Writes** (`writer`): one writer task per node owns a connection and commits whatever is
//!   queued in one transaction (group commit); the chunks of every stream in a batch go in with
//!   one multi-row insert. A watermark moves only after the commit: no client is sent a chunk
//!   that is not durable (invariant 1).
//! - **Limits** (`limits`): per-key running streams and requests per minute, counted in the
//!   database so they hold across nodes.
//! - **Reads**: a second connection, shared (tokio-postgres pipelines concurrent queries).
//! - **Nodes**: each node has a row in `nodes` and renews its lease every third of
//!   its lease (`[store] lease_ms`, default [`DEFAULT_LEASE`]); any node marks the running streams of a node whose lease has expired
//!   `interrupted(crash)`, at connect and then periodically, so no stream stays `streaming`
//!   after its process is gone (invariant 2).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{broadcast, mpsc};
use tokio_postgres::{Client, NoTls};

use crate::store::write::{Op, WRITE_QUEUE};
use crate::store::{
    Change, ChunkRecord, StoreError, StreamState, StreamSummary, Timings, TranscriptHead,
};
use crate::stream::{Reason, Status, StreamId, Tenant};

mod limits;
mod migrations;
mod notify;
mod writer;

pub use writer::{DEFAULT_RETRY, MAX_UNWRITTEN_ENDINGS};

/// How long a node's lease lasts without renewal before the others take it for dead, by default.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(10);

/// How a node uses the PostgreSQL store (`[store]` in the configuration).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgOptions {
    /// How long this node's lease lasts without renewal before the other nodes mark its running
    /// streams `interrupted(crash)` (`lease_ms`).
    pub lease: Duration,
    /// How long the writer keeps trying a batch while the database cannot be reached before it
    /// gives the batch up (`retry_ms`).
    pub retry: Duration,
}

impl Default for PgOptions {
    fn default() -> Self {
        Self {
            lease: DEFAULT_LEASE,
            retry: DEFAULT_RETRY,
        }
    }
}

/// A handle to the PostgreSQL store; cheap to clone.
#[derive(Clone)]
pub(crate) struct PgStore {
    writer: mpsc::Sender<Op>,
    reader: Arc<Reconnecting>,
    node: Arc<str>,
    /// News from every node (see `notify`).
    news: broadcast::Sender<Change>,
    /// Stops the listener when the last handle goes.
    _stop_listener: Arc<tokio::sync::oneshot::Sender<()>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore").field("node", &self.node).finish()
    }
}

/// Opens one connection to `url`; its driver runs until the client is dropped.
async fn open_connection(url: &str) -> Result<Client, StoreError> {
    let (client, connection) = tokio_postgres::connect(url, NoTls)
        .await
        .map_err(StoreError::postgres)?;
    #[allow(
        clippy::disallowed_methods,
        reason = "a connection's driver: it ends when its client is dropped, and holds no work of its own"
    )]
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::error!(error = %e, "PostgreSQL connection lost");
        }
    });
    Ok(client)
}

/// A connection that is opened again when it is found closed (PostgreSQL restarted, a network
/// blip): the store reconnects by itself. While the database cannot be reached, each use fails
/// at once with an error that says so (the API answers `503`).
struct Reconnecting {
    url: String,
    client: tokio::sync::Mutex<Arc<Client>>,
}

impl Reconnecting {
    async fn open(url: &str) -> Result<Self, StoreError> {
        Ok(Self {
            url: url.to_string(),
            client: tokio::sync::Mutex::new(Arc::new(open_connection(url).await?)),
        })
    }

    /// The connection, opened again first if it was closed.
    async fn get(&self) -> Result<Arc<Client>, StoreError> {
        let mut client = self.client.lock().await;
        if client.is_closed() {
            *client = Arc::new(open_connection(&self.url).await?);
            tracing::info!("reconnected to PostgreSQL");
        }
        Ok(client.clone())
    }
}

impl PgStore {
    /// Connects, migrates, registers this node, marks the streams of dead nodes
    /// `interrupted(crash)`, and starts the writer and the lease task. Returns the store and how
    /// many streams were recovered.
    pub(crate) async fn connect(url: &str, options: PgOptions) -> Result<(Self, u64), StoreError> {
        let lease = options.lease;
        let mut writer_conn = open_connection(url).await?;
        migrations::apply(&mut writer_conn).await?;
        let writer = Reconnecting::open(url).await?;
        drop(writer_conn);
        let reader = Arc::new(Reconnecting::open(url).await?);
        let node: Arc<str> = Arc::from(uuid::Uuid::new_v4().to_string());
        renew_lease(&*reader.get().await?, &node, lease).await?;
        let recovered = sweep(&*reader.get().await?, lease).await?;
        let (stop_listener, stop) = tokio::sync::oneshot::channel();
        let news = notify::listen(url, stop).await?;
        let (tx, rx) = mpsc::channel(WRITE_QUEUE);
        #[allow(
            clippy::disallowed_methods,
            reason = "the writer: it ends when the last handle (and so its queue) is dropped, after the server has flushed it"
        )]
        tokio::spawn(writer::write_loop(writer, rx, node.clone(), options.retry));
        let renewer = (Arc::downgrade(&reader), node.clone());
        #[allow(
            clippy::disallowed_methods,
            reason = "the lease: it ends when the store's last handle is dropped"
        )]
        tokio::spawn(async move {
            let (reader, node) = renewer;
            loop {
                tokio::time::sleep(lease / 3).await;
                let Some(reader) = reader.upgrade() else {
                    return;
                };
                let renewed = async {
                    let client = reader.get().await?;
                    renew_lease(&client, &node, lease).await?;
                    sweep(&client, lease).await
                };
                if let Err(e) = renewed.await {
                    tracing::warn!(error = %e.report(), "node lease not renewed");
                }
            }
        });
        Ok((
            Self {
                writer: tx,
                reader,
                node,
                news,
                _stop_listener: Arc::new(stop_listener),
            },
            recovered,
        ))
    }

    /// Applies the migrations the database lacks; returns how many.
    pub(crate) async fn migrate(url: &str) -> Result<usize, StoreError> {
        migrations::apply(&mut open_connection(url).await?).await
    }

    /// News from every node sharing the database.
    pub(crate) fn changes(&self) -> broadcast::Receiver<Change> {
        self.news.subscribe()
    }

    /// Asks whichever node runs `tenant`'s stream `id` to cancel it.
    pub(crate) async fn request_cancel(&self, tenant: &str, id: &str) -> Result<(), StoreError> {
        let payload = serde_json::to_string(&(tenant, id))
            .map_err(|e| StoreError::Internal(format!("cannot encode a cancel request: {e}")))?;
        self.reader
            .get()
            .await?
            .execute("SELECT pg_notify($1, $2)", &[&notify::CANCEL, &payload])
            .await
            .map_err(StoreError::postgres)?;
        Ok(())
    }

    /// Queues a write for the writer task (waiting for room).
    pub(crate) async fn send(&self, op: Op) -> Result<(), StoreError> {
        self.writer.send(op).await.map_err(|_| StoreError::Closed)
    }

    /// Queues a write for the writer task if there is room now; never waits.
    #[allow(
        clippy::result_large_err,
        reason = "the write comes back, moved, only when the queue is full"
    )]
    pub(crate) fn try_send(&self, op: Op) -> Result<(), TrySendError<Op>> {
        self.writer.try_send(op)
    }

    pub(crate) async fn list(
        &self,
        tenant: Tenant<'_>,
        limit: usize,
        after: Option<String>,
    ) -> Result<(Vec<StreamSummary>, bool), StoreError> {
        let cursor: i64 = match after {
            Some(id) => self
                .reader
                .get()
                .await?
                .query_opt(
                    "SELECT seq FROM streams WHERE id = $1 AND tenant = $2",
                    &[&id, &tenant.0],
                )
                .await
                .map_err(StoreError::postgres)?
                .map_or(i64::MAX, |r| r.get(0)),
            None => i64::MAX,
        };
        let rows = self
            .reader
            .get()
            .await?
            .query(
                "SELECT id, model, created, status, reason, chunk_count, first_token_us, total_us
                 FROM streams
                 WHERE tenant = $1 AND seq < $2 ORDER BY seq DESC LIMIT $3",
                &[&tenant.0, &cursor, &((limit + 1) as i64)],
            )
            .await
            .map_err(StoreError::postgres)?;
        let mut out: Vec<StreamSummary> = rows
            .iter()
            .map(|r| StreamSummary {
                id: r.get(0),
                object: "sluice.stream",
                model: r.get(1),
                created: r.get(2),
                status: Status::parse(r.get(3)).unwrap_or(Status::Failed),
                reason: r.get::<_, Option<&str>>(4).and_then(Reason::parse),
                chunk_count: r.get::<_, i64>(5) as u64,
                timings: Timings::from_us(r.get(6), r.get(7)),
            })
            .collect();
        let more = out.len() > limit;
        out.truncate(limit);
        Ok((out, more))
    }

    pub(crate) async fn state(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<StreamState>, StoreError> {
        let row = self
            .reader
            .get()
            .await?
            .query_opt(
                "SELECT status, reason, detail,
                    (SELECT COALESCE(MAX(seq), 0) FROM chunks WHERE stream_id = streams.id)
                 FROM streams WHERE id = $1 AND tenant = $2",
                &[&id.0, &tenant.0],
            )
            .await
            .map_err(StoreError::postgres)?;
        Ok(row.map(|r| StreamState {
            status: Status::parse(r.get(0)).unwrap_or(Status::Failed),
            reason: r.get::<_, Option<&str>>(1).and_then(Reason::parse),
            detail: r.get(2),
            last_seq: r.get::<_, i64>(3) as u64,
        }))
    }

    pub(crate) async fn head(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<TranscriptHead>, StoreError> {
        let row = self
            .reader
            .get()
            .await?
            .query_opt(
                "SELECT model, created, status, reason, detail, request, first_token_us, total_us,
                    usage, (SELECT COALESCE(MAX(seq), 0) FROM chunks WHERE stream_id = streams.id),
                    attempts
                 FROM streams WHERE id = $1 AND tenant = $2",
                &[&id.0, &tenant.0],
            )
            .await
            .map_err(StoreError::postgres)?;
        Ok(row.map(|r| TranscriptHead {
            id: id.0.to_string(),
            model: r.get(0),
            created: r.get(1),
            status: Status::parse(r.get(2)).unwrap_or(Status::Failed),
            reason: r.get::<_, Option<&str>>(3).and_then(Reason::parse),
            detail: r.get(4),
            request: r.get(5),
            timings: Timings::from_us(r.get(6), r.get(7)),
            usage: r.get(8),
            attempts: r.get(10),
            last_seq: r.get::<_, i64>(9) as u64,
        }))
    }

    pub(crate) async fn chunk_page(
        &self,
        id: &str,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<ChunkRecord>, StoreError> {
        // The running total stops the page at about `max_bytes` in the database, so a page of
        // large chunks is never fetched whole (at least one chunk, so a page always moves on).
        let rows = self
            .reader
            .get()
            .await?
            .query(
                "SELECT seq, offset_us, data, content FROM (
                    SELECT seq, offset_us, data, content,
                        SUM(octet_length(data) + octet_length(content)) OVER (ORDER BY seq)
                            - (octet_length(data) + octet_length(content)) AS before
                    FROM chunks WHERE stream_id = $1 AND seq > $2 ORDER BY seq LIMIT $3
                 ) page WHERE before < $4 ORDER BY seq",
                &[&id, &(after as i64), &clamp(limit), &clamp(max_bytes)],
            )
            .await
            .map_err(StoreError::postgres)?;
        Ok(rows
            .iter()
            .map(|r| ChunkRecord {
                seq: r.get::<_, i64>(0) as u64,
                offset_ms: r.get::<_, i64>(1) as f64 / 1000.0,
                data: r.get(2),
                content: r.get(3),
            })
            .collect())
    }
}

/// A count as PostgreSQL's BIGINT (`usize::MAX` means "no bound": the largest BIGINT).
fn clamp(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Renews `node`'s lease (registering it the first time).
async fn renew_lease(client: &Client, node: &str, lease: Duration) -> Result<(), StoreError> {
    client
        .execute(
            "INSERT INTO nodes (id, lease_until) VALUES ($1, now() + make_interval(secs => $2))
             ON CONFLICT (id) DO UPDATE SET lease_until = EXCLUDED.lease_until",
            &[&node, &lease.as_secs_f64()],
        )
        .await
        .map_err(StoreError::postgres)?;
    Ok(())
}

/// Marks the running streams of every node whose lease has expired `interrupted(crash)`, and
/// forgets those nodes. Returns how many streams it marked.
async fn sweep(client: &Client, lease: Duration) -> Result<u64, StoreError> {
    // Followers of those streams hear of their ending like of any other.
    let marked = client
        .query(
            "WITH marked AS (
                UPDATE streams SET status = 'interrupted', reason = 'crash',
                    detail = 'the gateway node running the stream stopped renewing its lease'
                WHERE status = 'streaming'
                  AND (node IS NULL OR node NOT IN (SELECT id FROM nodes WHERE lease_until > now()))
                RETURNING id
             )
             SELECT pg_notify($1, id) FROM marked",
            &[&notify::PROGRESS],
        )
        .await
        .map_err(StoreError::postgres)?
        .len() as u64;
    client
        .execute(
            "DELETE FROM nodes WHERE lease_until < now() - make_interval(secs => $1)",
            &[&lease.as_secs_f64()],
        )
        .await
        .map_err(StoreError::postgres)?;
    Ok(marked)
}
