//! Reads, on their own connection (WAL: they never wait for the writer): stream lists and
//! states, pages of chunks (from blocks, then from the stream's run), transcripts.

use std::sync::{Mutex, PoisonError};

use rusqlite::{params, Connection, OptionalExtension};

use crate::store::block::{self, Decoded, LoggedChunk, Run, Runs};
use crate::store::{ChunkRecord, StoreError, StreamState, StreamSummary, Timings, TranscriptHead};
use crate::stream::{Reason, Status, StreamId, Tenant};

use super::{lock, SqliteStore};

impl SqliteStore {
    /// Reads streams' rows: those waiting to be written into `streams` are written first (see
    /// `rows`).
    async fn read_rows<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        self.write_pending().await?;
        self.read(f).await
    }

    /// Reads what needs no waiting rows written: chunks, from blocks and then the stream's run
    /// (a follower's pages would otherwise have the rows written at every page).
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
        .map_err(|e| StoreError::Internal(format!("read task failed: {e}")))?
    }

    /// A page of `tenant`'s streams, newest first, starting after the stream `after`.
    /// Returns the page and whether there are more.
    pub async fn list(
        &self,
        tenant: Tenant<'_>,
        limit: usize,
        after: Option<String>,
    ) -> Result<(Vec<StreamSummary>, bool), StoreError> {
        let tenant = tenant.0.to_string();
        self.read_rows(move |c| {
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
                "SELECT id, model, created, status, reason, chunk_count, first_token_us, total_us FROM streams
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
                        timings: Timings::from_us(r.get(6)?, r.get(7)?),
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
    pub async fn state(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<StreamState>, StoreError> {
        let (tenant, id) = (tenant.0.to_string(), id.0.to_string());
        let runs = self.runs.clone();
        self.read_rows(move |c| {
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
    pub async fn head(
        &self,
        tenant: Tenant<'_>,
        id: StreamId<'_>,
    ) -> Result<Option<TranscriptHead>, StoreError> {
        let (tenant, id) = (tenant.0.to_string(), id.0.to_string());
        let runs = self.runs.clone();
        self.read_rows(move |c| {
            // The run first, then the blocks (see `state`).
            let in_run = lock(&runs).get(id.as_str()).map_or(0, Run::last_seq);
            let row = c
                .query_row(
                    "SELECT model, created, status, reason, detail, request, first_token_us, total_us, usage,
                        (SELECT COALESCE(MAX(last_seq), 0) FROM chunk_blocks WHERE stream_id = streams.id),
                        attempts
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
                                r.get::<_, Option<String>>(10)?,
                            ),
                        ))
                    },
                )
                .optional()?;
            let Some(((model, created, status, reason, detail), (request, first_us, total_us, usage, last, attempts))) = row else {
                return Ok(None);
            };
            Ok(Some(TranscriptHead {
                id,
                model,
                created,
                status: Status::parse(&status).unwrap_or(Status::Failed),
                reason: reason.as_deref().and_then(Reason::parse),
                detail,
                request,
                timings: Timings::from_us(first_us, total_us),
                usage,
                attempts,
                last_seq: (last as u64).max(in_run),
            }))
        })
        .await
    }
}

/// Up to `limit` of stream `id`'s chunks after `after`, in order: from its blocks, then from its
/// run.
pub(super) fn read_chunks(
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
        for chunk in block::decode(&body).map_err(|e| StoreError::Damaged {
            stream: id.to_string(),
            source: std::sync::Arc::new(e),
        })? {
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
