//! How chunks are laid out on disk: an arrival-order journal, folded into per-stream blocks.
//!
//! Why not one row per chunk keyed by (stream, seq)? With many streams running at once, every
//! commit then touches one B-tree page per stream, scattered over the file, and SQLite rewrites
//! each whole page into the WAL: at 256 streams that write amplification cost more than half of
//! the gateway's throughput (see `docs/benchmarks/README.md`). Instead:
//!
//! - each chunk is appended to the journal (`store/sqlite/journal`: a file, arrival order, one
//!   `write` per batch). This is what makes a chunk durable before anyone sees it.
//! - the writer keeps each stream's chunks that are in the journal but not yet in a block (its
//!   [`Run`], at most [`BLOCK_CHUNKS`] chunks or [`BLOCK_BYTES`] bytes, so memory per stream stays
//!   bounded) and, when a run is full or its stream ends, writes it as one `chunk_blocks` row:
//!   one index entry per block instead of one per chunk.
//! - the journal's head, once every chunk in it is also in a committed block, is deleted now and
//!   then, a segment at a time.
//!
//! Readers see a chunk either in a block or in its stream's run (runs are shared with readers and
//! only hold committed chunks). At open, what the journal holds beyond the blocks (a crash) is
//! folded into blocks.

use std::collections::HashMap;
use std::sync::Arc;

/// The most chunks in one block.
pub(crate) const BLOCK_CHUNKS: usize = 32;
/// A run this large (chunk JSON and text, in bytes) is written as a block even before it has
/// [`BLOCK_CHUNKS`] chunks.
pub(crate) const BLOCK_BYTES: usize = 16 * 1024;
/// How many chunks are journaled between two looks at the journal's head.
pub(crate) const LOG_CHECK_EVERY: i64 = 4096;
/// A run whose first chunk is this many journal bytes behind the newest is written as a (short)
/// block, so one quiet stream cannot keep the journal from being trimmed.
pub(crate) const LOG_SPAN: i64 = 16 * 1024 * 1024;

/// The format version written as a block's first byte.
const VERSION: u8 = 1;

/// One chunk as the store keeps it.
#[derive(Debug, Clone)]
pub(crate) struct LoggedChunk {
    /// Its event id.
    pub seq: u64,
    /// Arrival offset from the stream's start, µs.
    pub offset_us: i64,
    /// The chunk JSON as relayed.
    pub data: Arc<str>,
    /// The text it added.
    pub content: String,
}

impl LoggedChunk {
    fn bytes(&self) -> usize {
        self.data.len() + self.content.len()
    }
}

/// A stream's chunks that are committed in the journal but not yet in a block.
#[derive(Debug, Default)]
pub(crate) struct Run {
    /// The journal position of its first chunk.
    pub first_log: i64,
    /// The chunks, in order.
    pub chunks: Vec<LoggedChunk>,
    /// Their size in bytes.
    pub bytes: usize,
}

impl Run {
    /// Adds a chunk journaled at `position`.
    pub fn push(&mut self, position: i64, chunk: LoggedChunk) {
        if self.chunks.is_empty() {
            self.first_log = position;
        }
        self.bytes += chunk.bytes();
        self.chunks.push(chunk);
    }

    /// Adds the chunks of `later` (logged after this run's).
    pub fn append(&mut self, later: Run) {
        if self.chunks.is_empty() {
            self.first_log = later.first_log;
        }
        self.bytes += later.bytes;
        self.chunks.extend(later.chunks);
    }

    /// Whether it should be written as a block now.
    pub fn is_full(&self) -> bool {
        self.chunks.len() >= BLOCK_CHUNKS || self.bytes >= BLOCK_BYTES
    }

    /// The last chunk's seq (0 if empty).
    pub fn last_seq(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.seq)
    }
}

/// Every stream's run, by stream id.
pub(crate) type Runs = HashMap<Arc<str>, Run>;

/// A block that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("a stored chunk block is damaged ({0})")]
pub(crate) struct BlockError(&'static str);

/// Encodes chunks as a block body: a version byte, then per chunk its seq and offset (u64 and
/// i64, little-endian), then its JSON and its text, each as a u32 length and the bytes.
pub(crate) fn encode<'a>(chunks: impl IntoIterator<Item = &'a LoggedChunk>) -> Vec<u8> {
    let mut out = vec![VERSION];
    for c in chunks {
        encode_chunk(&mut out, c);
    }
    out
}

/// Appends one chunk as blocks hold it (and the journal's records, after their stream id): seq
/// and offset, then its JSON and its text.
pub(crate) fn encode_chunk(out: &mut Vec<u8>, c: &LoggedChunk) {
    out.extend_from_slice(&c.seq.to_le_bytes());
    out.extend_from_slice(&c.offset_us.to_le_bytes());
    for text in [c.data.as_bytes(), c.content.as_bytes()] {
        out.extend_from_slice(&(text.len() as u32).to_le_bytes());
        out.extend_from_slice(text);
    }
}

/// Reads one chunk written by [`encode_chunk`] from the front of `rest`.
pub(crate) fn decode_chunk(rest: &mut &[u8]) -> Result<Decoded, BlockError> {
    let seq = u64::from_le_bytes(take_array(rest)?);
    let offset = i64::from_le_bytes(take_array(rest)?);
    let data = take_text(rest)?;
    let content = take_text(rest)?;
    Ok((seq, offset, data, content))
}

/// A decoded chunk: (seq, offset µs, JSON, text).
pub(crate) type Decoded = (u64, i64, String, String);

/// Decodes a block body written by [`encode`].
pub(crate) fn decode(body: &[u8]) -> Result<Vec<Decoded>, BlockError> {
    let (&version, mut rest) = body.split_first().ok_or(BlockError("empty"))?;
    if version != VERSION {
        return Err(BlockError("unknown version"));
    }
    let mut out = Vec::new();
    while !rest.is_empty() {
        out.push(decode_chunk(&mut rest)?);
    }
    Ok(out)
}

/// The first `n` bytes of `rest`, taken off it.
pub(crate) fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], BlockError> {
    if rest.len() < n {
        return Err(BlockError("truncated"));
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

/// The first `N` bytes of `rest`, taken off it.
pub(crate) fn take_array<const N: usize>(rest: &mut &[u8]) -> Result<[u8; N], BlockError> {
    take(rest, N)?
        .try_into()
        .map_err(|_| BlockError("truncated"))
}

fn take_text(rest: &mut &[u8]) -> Result<String, BlockError> {
    let len = u32::from_le_bytes(take_array(rest)?) as usize;
    String::from_utf8(take(rest, len)?.to_vec()).map_err(|_| BlockError("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, data: &str, content: &str) -> LoggedChunk {
        LoggedChunk {
            seq,
            offset_us: seq as i64 * 1000 - 7,
            data: data.into(),
            content: content.into(),
        }
    }

    #[test]
    fn blocks_round_trip() {
        let chunks = [
            chunk(1, r#"{"a":"é"}"#, "é"),
            chunk(2, "", ""),
            chunk(9, "{}", "日本"),
        ];
        let decoded = decode(&encode(&chunks)).expect("decodes");
        let expected: Vec<Decoded> = chunks
            .iter()
            .map(|c| (c.seq, c.offset_us, c.data.to_string(), c.content.clone()))
            .collect();
        assert_eq!(decoded, expected);
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics() {
        let body = encode(&[chunk(1, "{\"x\":1}", "x")]);
        // (One byte is a valid, empty block.)
        for cut in (0..body.len()).filter(|&cut| cut != 1) {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut wrong = body.clone();
        wrong[0] = 99;
        assert!(decode(&wrong).is_err());
    }

    #[test]
    fn a_run_is_full_by_count_or_by_size() {
        let mut run = Run::default();
        run.push(10, chunk(1, "{}", ""));
        assert_eq!((run.first_log, run.last_seq()), (10, 1));
        assert!(!run.is_full());
        for seq in 2..=BLOCK_CHUNKS as u64 {
            run.push(10 + seq as i64, chunk(seq, "{}", ""));
        }
        assert!(run.is_full());
        let mut big = Run::default();
        big.push(1, chunk(1, &"x".repeat(BLOCK_BYTES), ""));
        assert!(big.is_full());
    }
}
