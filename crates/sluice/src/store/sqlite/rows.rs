//! A stream's record and its final status as rows to write: made durable in the journal when a
//! stream begins or ends, and written into the `streams` table later, many streams in one
//! transaction (see [`Pending`]).
//!
//! Why not a SQLite commit for each, as before? Each wrote its own copies of the pages it touched
//! into the WAL (the table's page and two index pages for a record, the table's page and a
//! block's two for a final status): about 13 `pwrite`s and 6 checksummed 4 KiB frames per stream,
//! a third of what recording cost a short stream. Written in batches, neighbouring streams share
//! those pages; made durable by the journal's one `write`, they survive a process crash as a
//! commit with `synchronous = NORMAL` did. They are written by the writer's fold, a job of its
//! own, never by a commit a stream waits for (`writer::Writer::fold`). Readers of streams' rows
//! ask the writer to write what is pending first (`SqliteStore::read_rows`: a flush, which the
//! fold does after the rows before it), so no reader ever misses a stream.

// tokio's clock (the OS's outside tests): the age rule can be tested on a paused clock.
use tokio::time::Instant;

use rusqlite::{params, Connection};

use crate::store::block::{take_array, take_text, BlockError};
use crate::store::records::now_unix;
use crate::store::{Finish, NewStream, StoreError};

/// Pending rows are written once this many are waiting...
pub(super) const INGEST_ROWS: usize = 256;
/// ...or they hold this many bytes (requests are up to the request body limit each)...
pub(super) const INGEST_BYTES: usize = 4 * 1024 * 1024;
/// ...or the oldest has waited this long (looked at with each commit; an idle writer leaves them
/// in the journal until its next write, a read, or shutdown's flush).
pub(super) const INGEST_AFTER: std::time::Duration = std::time::Duration::from_millis(200);

/// A row for the `streams` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Row {
    /// A stream's record, status `streaming`.
    Begin(BeginRow),
    /// A stream's final status.
    Finish(FinishRow),
}

/// A stream's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct BeginRow {
    pub id: String,
    pub tenant: String,
    pub model: String,
    pub request: String,
    /// Unix seconds.
    pub created: i64,
}

/// A stream's final status and what it ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FinishRow {
    pub id: String,
    pub status: String,
    pub reason: Option<String>,
    pub detail: Option<String>,
    pub first_token_us: Option<i64>,
    pub total_us: i64,
    pub usage: Option<String>,
    pub chunks: i64,
    pub attempts: Option<String>,
}

impl BeginRow {
    /// The record of `s`, begun now; takes its text (its batch needs only its ack afterwards).
    pub(super) fn take(s: &mut NewStream) -> Self {
        Self {
            id: std::mem::take(&mut s.id),
            tenant: std::mem::take(&mut s.tenant),
            model: std::mem::take(&mut s.model),
            request: std::mem::take(&mut s.request),
            created: now_unix(),
        }
    }
}

impl FinishRow {
    /// The final row of `f`.
    pub(super) fn of(f: &Finish) -> Self {
        Self {
            id: f.id.clone(),
            status: f.ending.status().as_str().to_string(),
            reason: f.ending.reason().map(|r| r.as_str().to_string()),
            detail: f.ending.detail().map(str::to_string),
            first_token_us: f.first_token.map(|d| d.as_micros() as i64),
            total_us: f.total.as_micros() as i64,
            usage: f.usage.as_ref().map(|u| u.to_string()),
            chunks: f.chunks as i64,
            attempts: f.attempts.as_ref().map(|a| a.to_string()),
        }
    }
}

/// A record's kinds in the journal (after the marker that sets them apart from chunks).
const BEGIN: u8 = 1;
const FINISH: u8 = 2;

impl Row {
    /// About how much memory it holds.
    pub(super) fn bytes(&self) -> usize {
        let held = match self {
            Row::Begin(b) => b.id.len() + b.tenant.len() + b.model.len() + b.request.len(),
            Row::Finish(f) => {
                f.id.len()
                    + f.detail.as_ref().map_or(0, String::len)
                    + f.usage.as_ref().map_or(0, String::len)
                    + f.attempts.as_ref().map_or(0, String::len)
            }
        };
        held + std::mem::size_of::<Row>()
    }

    /// Appends its journal payload (after the record's marker) to `out`.
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Row::Begin(b) => {
                out.push(BEGIN);
                for text in [&b.id, &b.tenant, &b.model, &b.request] {
                    put_text(out, text);
                }
                out.extend_from_slice(&b.created.to_le_bytes());
            }
            Row::Finish(f) => {
                out.push(FINISH);
                put_text(out, &f.id);
                put_text(out, &f.status);
                for text in [&f.reason, &f.detail, &f.usage, &f.attempts] {
                    put_opt_text(out, text.as_deref());
                }
                put_opt_i64(out, f.first_token_us);
                out.extend_from_slice(&f.total_us.to_le_bytes());
                out.extend_from_slice(&f.chunks.to_le_bytes());
            }
        }
    }

    /// Reads back what [`encode`](Self::encode) wrote; the whole of `payload`.
    pub(super) fn decode(mut payload: &[u8]) -> Result<Self, BlockError> {
        let rest = &mut payload;
        let row = match take_array::<1>(rest)?[0] {
            BEGIN => Row::Begin(BeginRow {
                id: take_text(rest)?,
                tenant: take_text(rest)?,
                model: take_text(rest)?,
                request: take_text(rest)?,
                created: i64::from_le_bytes(take_array(rest)?),
            }),
            FINISH => {
                let id = take_text(rest)?;
                let status = take_text(rest)?;
                let reason = take_opt_text(rest)?;
                let detail = take_opt_text(rest)?;
                let usage = take_opt_text(rest)?;
                let attempts = take_opt_text(rest)?;
                Row::Finish(FinishRow {
                    id,
                    status,
                    reason,
                    detail,
                    usage,
                    attempts,
                    first_token_us: take_opt_i64(rest)?,
                    total_us: i64::from_le_bytes(take_array(rest)?),
                    chunks: i64::from_le_bytes(take_array(rest)?),
                })
            }
            _ => return Err(BlockError("an unknown journal record")),
        };
        if rest.is_empty() {
            Ok(row)
        } else {
            Err(BlockError("a journal record with bytes left over"))
        }
    }

    /// Writes it into `streams`: a record is inserted unless it is there already (replay may
    /// meet one twice), a final status is set only on a stream still `streaming` (the first
    /// ending wins). A final status's chunks are the caller's to write first.
    pub(super) fn write(&self, tx: &Connection) -> Result<(), StoreError> {
        match self {
            Row::Begin(b) => {
                tx.prepare_cached(
                    "INSERT OR IGNORE INTO streams (id, tenant, model, request, status, created)
                     VALUES (?1, ?2, ?3, ?4, 'streaming', ?5)",
                )?
                .execute(params![b.id, b.tenant, b.model, b.request, b.created])?;
            }
            Row::Finish(f) => {
                tx.prepare_cached(
                    "UPDATE streams SET status = ?2, reason = ?3, detail = ?4, first_token_us = ?5,
                         total_us = ?6, usage = ?7, chunk_count = ?8, attempts = ?9
                     WHERE id = ?1 AND status = 'streaming'",
                )?
                .execute(params![
                    f.id,
                    f.status,
                    f.reason,
                    f.detail,
                    f.first_token_us,
                    f.total_us,
                    f.usage,
                    f.chunks,
                    f.attempts,
                ])?;
            }
        }
        Ok(())
    }
}

fn put_text(out: &mut Vec<u8>, text: &str) {
    out.extend_from_slice(&(text.len() as u32).to_le_bytes());
    out.extend_from_slice(text.as_bytes());
}

fn put_opt_text(out: &mut Vec<u8>, text: Option<&str>) {
    match text {
        None => out.push(0),
        Some(t) => {
            out.push(1);
            put_text(out, t);
        }
    }
}

fn put_opt_i64(out: &mut Vec<u8>, n: Option<i64>) {
    match n {
        None => out.push(0),
        Some(n) => {
            out.push(1);
            out.extend_from_slice(&n.to_le_bytes());
        }
    }
}

fn take_opt_text(rest: &mut &[u8]) -> Result<Option<String>, BlockError> {
    match take_array::<1>(rest)?[0] {
        0 => Ok(None),
        1 => take_text(rest).map(Some),
        _ => Err(BlockError("a damaged journal record")),
    }
}

fn take_opt_i64(rest: &mut &[u8]) -> Result<Option<i64>, BlockError> {
    match take_array::<1>(rest)?[0] {
        0 => Ok(None),
        1 => Ok(Some(i64::from_le_bytes(take_array(rest)?))),
        _ => Err(BlockError("a damaged journal record")),
    }
}

/// Rows made durable in the journal and not yet written into `streams`, oldest first.
#[derive(Debug, Default)]
pub(super) struct Pending {
    rows: Vec<Row>,
    /// The journal position of the first (the journal keeps it until the rows are written).
    first_log: Option<i64>,
    bytes: usize,
    /// When the first was added.
    since: Option<Instant>,
}

impl Pending {
    /// Adds `rows` (journaled from position `first_log` on, in order) at `now`.
    pub(super) fn extend(&mut self, first_log: i64, rows: Vec<Row>, now: Instant) {
        if rows.is_empty() {
            return;
        }
        self.first_log.get_or_insert(first_log);
        self.since.get_or_insert(now);
        self.bytes += rows.iter().map(Row::bytes).sum::<usize>();
        self.rows.extend(rows);
    }

    /// How many are waiting.
    pub(super) fn len(&self) -> usize {
        self.rows.len()
    }

    /// The journal position the journal must keep from, if any rows are waiting.
    pub(super) fn first_log(&self) -> Option<i64> {
        self.first_log
    }

    /// Whether they should be written at `now`, `more` rows of `more_bytes` being about to
    /// join them.
    pub(super) fn due(&self, more: usize, more_bytes: usize, now: Instant) -> bool {
        self.rows.len() + more >= INGEST_ROWS
            || self.bytes + more_bytes >= INGEST_BYTES
            || self
                .since
                .is_some_and(|t| now.saturating_duration_since(t) >= INGEST_AFTER)
    }

    /// Takes them all, oldest first, for the writer's fold to write.
    pub(super) fn take(&mut self) -> Vec<Row> {
        let rows = std::mem::take(&mut self.rows);
        self.clear();
        rows
    }

    /// Forgets them (they are written and committed).
    fn clear(&mut self) {
        self.rows.clear();
        self.rows.shrink_to(INGEST_ROWS);
        self.first_log = None;
        self.bytes = 0;
        self.since = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn begin(id: &str, request_bytes: usize) -> Row {
        Row::Begin(BeginRow {
            id: id.into(),
            tenant: "t".into(),
            model: "m".into(),
            request: "x".repeat(request_bytes),
            created: 0,
        })
    }

    /// Rows wait until enough of them, or enough bytes, are waiting, or the first has waited
    /// long enough; cleared, they wait again from nothing.
    #[test]
    fn pending_rows_are_due_by_count_bytes_or_age() {
        let t0 = Instant::now();
        let mut p = Pending::default();
        assert!(!p.due(1, 100, t0));
        p.extend(40, vec![begin("a", 10), begin("b", 10)], t0);
        p.extend(90, vec![begin("c", 10)], t0 + INGEST_AFTER / 2);
        assert_eq!((p.len(), p.first_log()), (3, Some(40)));
        let soon = t0 + INGEST_AFTER - std::time::Duration::from_millis(1);
        assert!(!p.due(0, 0, soon));
        assert!(
            p.due(0, 0, t0 + INGEST_AFTER),
            "the first has waited long enough"
        );
        assert!(p.due(INGEST_ROWS - 3, 0, soon), "enough rows");
        assert!(!p.due(INGEST_ROWS - 4, 0, soon));
        assert!(p.due(1, INGEST_BYTES, soon), "enough bytes");
        p.extend(200, vec![begin("d", INGEST_BYTES)], soon);
        assert!(p.due(0, 0, soon));
        assert_eq!(p.len(), 4);
        let taken = p.take();
        assert_eq!((taken.len(), p.len(), p.first_log()), (4, 0, None));
        assert_eq!(taken[3], begin("d", INGEST_BYTES), "oldest first");
        let later = t0 + 10 * INGEST_AFTER;
        assert!(!p.due(1, 10, later));
        p.extend(300, vec![begin("e", 10)], later);
        assert!(
            !p.due(0, 0, later),
            "the age counts from the first row after a take"
        );
    }
}
