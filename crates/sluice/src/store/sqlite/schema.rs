//! The tables, and what opening the database does to what an earlier process left: streams'
//! records, chunks and final statuses in the journal (or chunks in the tables of earlier
//! versions) are folded into the database.

use std::sync::Arc;

use rusqlite::{params, Connection};

use crate::store::block::{self, LoggedChunk, Run};
use crate::store::StoreError;

use super::journal::Recorded;
use super::rows::Row;

pub(super) const SCHEMA: &str = "
-- `seq` orders a tenant's list. Not AUTOINCREMENT: that writes `sqlite_sequence`, one more
-- page into the WAL with every stream's record. Without it a deleted newest stream's `seq` may
-- be taken again, which no reader minds: list cursors are stream ids, looked up when used.
-- (Databases created before keep AUTOINCREMENT; both work.)
CREATE TABLE IF NOT EXISTS streams (
    seq INTEGER PRIMARY KEY,
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
    chunk_count INTEGER NOT NULL DEFAULT 0,
    attempts TEXT
);
CREATE INDEX IF NOT EXISTS streams_by_tenant ON streams (tenant, seq);
CREATE TABLE IF NOT EXISTS chunk_blocks (
    id INTEGER PRIMARY KEY,
    stream_id TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS chunk_blocks_by_stream ON chunk_blocks (stream_id, first_seq);
-- The checkpoint thread's one-row write that restarts the WAL (see `checkpoint::Pass`).
CREATE TABLE IF NOT EXISTS wal_restarts (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    n INTEGER NOT NULL
);
";

/// Adds the columns later versions added to a database an earlier version made.
pub(super) fn add_columns(conn: &Connection) -> Result<(), StoreError> {
    let has_attempts: i64 = conn.query_row(
        "SELECT COUNT(*) FROM pragma_table_info('streams') WHERE name = 'attempts'",
        [],
        |r| r.get(0),
    )?;
    if has_attempts == 0 {
        conn.execute_batch("ALTER TABLE streams ADD COLUMN attempts TEXT")?;
    }
    Ok(())
}

/// Folds what the journal holds beyond the database (what a process that ended had not written
/// there yet) into it: streams' records, then their chunks as blocks, then their final
/// statuses. Also moves chunks from the tables of earlier versions (`chunks`: one row per chunk;
/// `chunk_log`: the log the journal replaced) and drops those tables.
pub(super) fn fold_log(conn: &mut Connection, journal: Vec<Recorded>) -> Result<(), StoreError> {
    let tx = conn.transaction()?;
    for (table, order) in [("chunks", "stream_id, seq"), ("chunk_log", "stream_id, id")] {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?1)",
            params![table],
            |r| r.get(0),
        )?;
        if exists {
            let rows = {
                let mut stmt = tx.prepare(&format!(
                    "SELECT stream_id, seq, offset_us, data, content FROM {table} ORDER BY {order}"
                ))?;
                let rows = stmt.query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        LoggedChunk {
                            seq: row.get::<_, i64>(1)? as u64,
                            offset_us: row.get(2)?,
                            data: Arc::from(row.get::<_, String>(3)?),
                            content: row.get(4)?,
                        },
                    ))
                })?;
                rows.collect::<Result<Vec<_>, _>>()?
            };
            fold(&tx, rows)?;
            tx.execute_batch(&format!("DROP TABLE {table}"))?;
        }
    }
    let mut chunks = Vec::new();
    let mut finishes = Vec::new();
    for recorded in journal {
        match recorded {
            Recorded::Chunk(id, chunk) => chunks.push((id, chunk)),
            Recorded::Row(row @ Row::Begin(_)) => row.write(&tx)?,
            Recorded::Row(row @ Row::Finish(_)) => finishes.push(row),
        }
    }
    // Grouped by stream, each stream's chunks in the order they were written.
    chunks.sort_by(|a, b| a.0.cmp(&b.0));
    fold(&tx, chunks)?;
    for row in finishes {
        row.write(&tx)?;
    }
    tx.commit()?;
    Ok(())
}

/// Writes `chunks` (grouped by stream, each stream's in order) as blocks, skipping those a block
/// already holds and those of streams the database does not know (their record was never
/// committed).
pub(super) fn fold(
    tx: &rusqlite::Transaction<'_>,
    chunks: impl IntoIterator<Item = (String, LoggedChunk)>,
) -> Result<(), StoreError> {
    // The stream being folded, whether it is known, the last seq its blocks already hold, and
    // its run so far.
    let mut current = String::new();
    let mut known = false;
    let mut blocked = 0u64;
    let mut run = Run::default();
    for (id, chunk) in chunks {
        if id != current {
            write_block(tx, &current, &run.chunks)?;
            run = Run::default();
            known = tx.query_row(
                "SELECT EXISTS (SELECT 1 FROM streams WHERE id = ?1)",
                params![id],
                |r| r.get(0),
            )?;
            blocked = tx.query_row(
                "SELECT COALESCE(MAX(last_seq), 0) FROM chunk_blocks WHERE stream_id = ?1",
                params![id],
                |r| r.get::<_, i64>(0),
            )? as u64;
            current = id;
        }
        if !known || chunk.seq <= blocked {
            continue;
        }
        blocked = chunk.seq;
        run.push(0, chunk);
        if run.is_full() {
            write_block(tx, &current, &run.chunks)?;
            run = Run::default();
        }
    }
    write_block(tx, &current, &run.chunks)
}

/// Writes `chunks` (consecutive chunks of stream `id`) as one block; nothing if empty.
pub(super) fn write_block(
    tx: &Connection,
    id: &str,
    chunks: &[LoggedChunk],
) -> Result<(), StoreError> {
    if let (Some(first), Some(last)) = (chunks.first(), chunks.last()) {
        insert_block(tx, id, first.seq, last.seq, block::encode(chunks))?;
    }
    Ok(())
}

pub(super) fn insert_block(
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
