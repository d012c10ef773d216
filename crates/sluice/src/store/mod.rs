//! The transcript store: streams and their chunks, in an embedded SQLite database (one node) or
//! in PostgreSQL (several nodes as one gateway).
//!
//! One writer owns the write connection. Writes arrive over a bounded channel, so a slow
//! disk slows the relays down instead of growing memory, and the writer commits everything that
//! is waiting in one transaction (a batch), so chunk appends cost one fsync per batch, not per
//! chunk. The writer is a blocking job that runs while there is work: the first write that finds
//! it stopped starts it, and it stops when the channel is empty (`Writer` says why). The database runs in WAL mode, so reads (on their own connection) never wait for the
//! writer. Writes on the channel are applied in order: a stream's final status is always written
//! after every chunk appended before it. `begin`, `finish` and `flush` return once committed;
//! `append` returns once queued, and the stream's [`Watermark`] reaches the chunk when it is
//! committed (so a relay never waits for one chunk's commit before reading the next).
//!
//! On SQLite, chunks, streams' records and final statuses are made durable by appending them to
//! a checksummed journal file (one `write` per batch); chunks reach the database in per-stream
//! blocks, records and statuses as rows written many streams at a time (see `store/block.rs`,
//! `store/sqlite/journal.rs` and `store/sqlite/rows.rs` for why). Like SQLite's WAL with
//! `synchronous = NORMAL`, a committed write survives a crash of the process (not necessarily a
//! power cut: the journal and the WAL are synced at checkpoints, which run on their own thread).
//! `docs/durability.md` says what survives what, per backend.
//!
//! | module | owns |
//! |---|---|
//! | `records` | what goes in and comes out ([`NewStream`], [`Finish`], [`Transcript`], ...) |
//! | `error` | [`StoreError`] |
//! | `watermark` | [`Watermark`]: a stream's last committed chunk, for those who wait on it |
//! | `limits` | per-key limits (running streams, requests per minute), held by the store so every node counts the same |
//! | `block` | the codec of a block of chunks |
//! | `sqlite` | the backend: [`Store`] over one SQLite file (schema, writer, reads, checkpoints) |
//!
//! | `postgres` | the backend for several nodes: migrations, writer task, reads, leases, limits, news between nodes |
//!
//! Everything but the two backends is what they share, behind the same [`Store`] methods. (The
//! description of writes above is SQLite's; PostgreSQL's is in `postgres`.)
//!
//! At open, streams still marked `streaming` belong to a process that died: they are marked
//! `interrupted(crash)`, and the chunks their runs held are folded into blocks.

mod block;
mod error;
mod handle;
mod limits;
mod postgres;
mod records;
mod sqlite;
mod watermark;
mod write;

/// The block and journal codecs, for the fuzz entry points in [`crate::fuzzing`].
pub(crate) use block::{decode as decode_block, encode as encode_block, LoggedChunk};
pub use error::StoreError;
pub use handle::Store;
pub use postgres::{PgOptions, DEFAULT_LEASE, DEFAULT_RETRY, MAX_UNWRITTEN_ENDINGS};
pub use records::{
    ChunkRecord, Finish, NewStream, StoredChunk, StreamKey, StreamState, StreamSummary, Timings,
    Transcript, TranscriptHead,
};
pub(crate) use sqlite::journal::{
    decode_all as decode_journal, encode_header as encode_journal_header,
    encode_recorded as encode_journal, Seal as JournalSeal,
};
pub use watermark::Watermark;
pub use write::Arrival;

/// News from another node sharing the store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Stream `id` has new committed chunks, or its ending.
    Progress(std::sync::Arc<str>),
    /// Someone asked for `tenant`'s stream `id` to be cancelled.
    Cancel {
        /// The tenant whose stream it is.
        tenant: String,
        /// The stream.
        id: String,
    },
}

/// How many stored chunks a reader (a transcript read, a replay) takes at a time, at most.
pub const PAGE_CHUNKS: usize = 256;
/// About how many bytes of chunks a reader takes at a time (at least one chunk): what a read
/// holds in memory, whatever the transcript's size.
pub const PAGE_BYTES: usize = 256 * 1024;
