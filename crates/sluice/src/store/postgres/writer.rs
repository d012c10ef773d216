//! The writer task: one per node, on its own connection. It commits whatever is queued in one
//! transaction (group commit), the chunks of every stream in a batch with one multi-row insert,
//! and tells the other nodes which streams moved (`notify::PROGRESS`) inside that transaction.
//!
//! While the database cannot be reached it tries a batch again for up to
//! [`PgOptions::retry`](super::PgOptions) (default [`DEFAULT_RETRY`]); the bounded queue fills meanwhile
//! and the relays wait for room. A batch given up is answered with the error: its chunks are lost
//! (and never sent), and its final statuses are **kept** (up to [`MAX_UNWRITTEN_ENDINGS`]) and
//! written as soon as the database answers again, so a stream does not stay `streaming` (nor hold
//! its key's place) because its ending came while the database was away.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio_postgres::Client;

use super::{notify, Reconnecting};
use crate::store::records::now_unix;
use crate::store::write::{settle, Op, MAX_BATCH};
use crate::store::{Finish, StoreError};

/// How long the writer keeps trying a batch while the database cannot be reached, by default.
pub const DEFAULT_RETRY: Duration = Duration::from_secs(10);

/// The most final statuses kept to be written when the database returns; beyond, the oldest is
/// dropped (logged), and its stream stays `streaming` in the store until this node stops or its
/// lease lapses.
pub const MAX_UNWRITTEN_ENDINGS: usize = 4096;

/// How often kept final statuses are tried again while nothing else is written.
const RETRY_ENDINGS: Duration = Duration::from_secs(1);

/// Commits whatever is queued, batch by batch, until every handle is gone.
pub(super) async fn write_loop(
    conn: Reconnecting,
    mut rx: mpsc::Receiver<Op>,
    node: Arc<str>,
    retry: Duration,
) {
    let mut batch = Vec::new();
    let mut unwritten = Unwritten::default();
    // Looked up once rather than per batch.
    let write_seconds = metrics::histogram!("sluice_store_write_seconds");
    loop {
        let op = if unwritten.endings.is_empty() {
            rx.recv().await
        } else {
            tokio::select! {
                op = rx.recv() => op,
                () = tokio::time::sleep(RETRY_ENDINGS) => {
                    unwritten.try_again(&conn, &node).await;
                    continue;
                }
            }
        };
        let Some(op) = op else { break };
        batch.push(op);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let started = std::time::Instant::now();
        let result = commit(&conn, &batch, &node, retry).await;
        write_seconds.record(started.elapsed().as_secs_f64());
        match &result {
            Err(_) => unwritten.keep(&batch),
            Ok(()) => unwritten.try_again(&conn, &node).await,
        }
        settle(&mut batch, &result);
    }
}

/// Final statuses whose batch was given up, oldest first.
#[derive(Default)]
struct Unwritten {
    endings: VecDeque<Finish>,
}

impl Unwritten {
    fn keep(&mut self, batch: &[Op]) {
        for op in batch {
            if let Op::Finish(f, _) = op {
                if self.endings.len() == MAX_UNWRITTEN_ENDINGS {
                    let Some(dropped) = self.endings.pop_front() else {
                        break;
                    };
                    tracing::error!(stream = %dropped.id, "too many final statuses wait for the database: this one is dropped");
                }
                self.endings.push_back(f.clone());
            }
        }
        metrics::gauge!("sluice_store_unwritten_endings").set(self.endings.len() as f64);
    }

    /// Writes the kept final statuses, oldest first, while the database answers: each in its
    /// own transaction, so one the database refuses (dropped, logged) holds up no other.
    async fn try_again(&mut self, conn: &Reconnecting, node: &str) {
        if self.endings.is_empty() {
            return;
        }
        let client = match conn.get().await {
            Ok(client) => client,
            Err(e) => {
                tracing::debug!(error = %e.report(), "kept final statuses wait for the database");
                return;
            }
        };
        let mut written = 0;
        while let Some(f) = self.endings.front() {
            let op = [Op::Finish(f.clone(), oneshot::channel().0)];
            match apply(&client, &op, node).await {
                Ok(()) => written += 1,
                Err(e) if e.is_unavailable() => break,
                Err(e) => {
                    tracing::error!(stream = %f.id, error = %e.report(), "a kept final status was refused: dropped");
                }
            }
            self.endings.pop_front();
        }
        if written > 0 {
            tracing::info!(
                streams = written,
                "final statuses kept while the database was away are written"
            );
        }
        metrics::gauge!("sluice_store_unwritten_endings").set(self.endings.len() as f64);
    }
}

/// Commits `batch`, reconnecting and trying again while the database cannot be reached, for up
/// to `retry`. Meanwhile the writer's queue (bounded) fills and appends wait: the relays slow
/// down instead of buffering. Trying a batch again is safe: every statement of it is
/// idempotent.
async fn commit(
    conn: &Reconnecting,
    batch: &[Op],
    node: &str,
    retry: Duration,
) -> Result<(), StoreError> {
    let give_up = std::time::Instant::now() + retry;
    loop {
        let result = match conn.get().await {
            Ok(client) => apply(&client, batch, node).await,
            Err(e) => Err(e),
        };
        match result {
            Err(e) if e.is_unavailable() && std::time::Instant::now() < give_up => {
                tracing::warn!(error = %e.report(), "PostgreSQL unavailable: retrying the batch");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            done => return done,
        }
    }
}

/// One batch in one transaction: new streams, then every chunk (one insert), then endings.
async fn apply(client: &Client, batch: &[Op], node: &str) -> Result<(), StoreError> {
    client
        .batch_execute("BEGIN")
        .await
        .map_err(StoreError::postgres)?;
    let applied = apply_in_transaction(client, batch, node).await;
    let end = if applied.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    let ended = client
        .batch_execute(end)
        .await
        .map_err(StoreError::postgres);
    applied.and(ended)
}

async fn apply_in_transaction(tx: &Client, batch: &[Op], node: &str) -> Result<(), StoreError> {
    let (mut ids, mut seqs, mut offsets, mut datas, mut contents) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for op in batch {
        match op {
            Op::Begin(s, _) => {
                tx.execute(
                    "INSERT INTO streams (id, tenant, model, request, status, created, node, key_id)
                     VALUES ($1, $2, $3, $4, 'streaming', $5, $6, $7) ON CONFLICT (id) DO NOTHING",
                    &[
                        &s.id,
                        &s.tenant,
                        &s.model,
                        &s.request,
                        &now_unix(),
                        &node,
                        &s.key.as_ref().map(|k| k.id.as_str()),
                    ],
                )
                .await
                .map_err(StoreError::postgres)?;
            }
            Op::Append {
                id,
                seq,
                offset,
                data,
                content,
                ..
            } => {
                ids.push(id.as_ref());
                seqs.push(*seq as i64);
                offsets.push(offset.as_micros() as i64);
                datas.push(data.as_ref());
                contents.push(content.as_str());
            }
            Op::Delete { tenant, id, .. } => {
                tx.execute(
                    "WITH gone AS (
                        DELETE FROM streams WHERE id = $1 AND tenant = $2 AND status != 'streaming'
                        RETURNING id
                     )
                     DELETE FROM chunks WHERE stream_id IN (SELECT id FROM gone)",
                    &[id, tenant],
                )
                .await
                .map_err(StoreError::postgres)?;
            }
            Op::Expire { before, .. } => {
                tx.execute(
                    "WITH gone AS (
                        DELETE FROM streams WHERE created < $1 AND status != 'streaming' RETURNING id
                     )
                     DELETE FROM chunks WHERE stream_id IN (SELECT id FROM gone)",
                    &[before],
                )
                .await
                .map_err(StoreError::postgres)?;
            }
            Op::Finish(..) | Op::Flush(_) => {}
        }
    }
    if !ids.is_empty() {
        tx.execute(
            "INSERT INTO chunks (stream_id, seq, offset_us, data, content)
             SELECT * FROM UNNEST($1::text[], $2::int8[], $3::int8[], $4::text[], $5::text[])
             ON CONFLICT DO NOTHING",
            &[&ids, &seqs, &offsets, &datas, &contents],
        )
        .await
        .map_err(StoreError::postgres)?;
    }
    let mut touched: Vec<&str> = ids.clone();
    for op in batch {
        if let Op::Finish(f, _) = op {
            touched.push(&f.id);
            tx.execute(
                "UPDATE streams SET status = $2, reason = $3, detail = $4, first_token_us = $5,
                     total_us = $6, usage = $7, chunk_count = $8, attempts = $9
                 WHERE id = $1 AND status = 'streaming'",
                &[
                    &f.id,
                    &f.ending.status().as_str(),
                    &f.ending.reason().map(|r| r.as_str()),
                    &f.ending.detail(),
                    &f.first_token.map(|d| d.as_micros() as i64),
                    &(f.total.as_micros() as i64),
                    &f.usage.as_ref().map(serde_json::Value::to_string),
                    &(f.chunks as i64),
                    &f.attempts.as_ref().map(serde_json::Value::to_string),
                ],
            )
            .await
            .map_err(StoreError::postgres)?;
        }
    }
    // Followers on other nodes hear of it when the batch commits: once per stream per batch.
    touched.sort_unstable();
    touched.dedup();
    if !touched.is_empty() {
        tx.execute(
            "SELECT pg_notify($1, id) FROM UNNEST($2::text[]) AS id",
            &[&notify::PROGRESS, &touched],
        )
        .await
        .map_err(StoreError::postgres)?;
    }
    Ok(())
}
