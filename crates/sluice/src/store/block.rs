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
pub(crate) const BLOCK_CHUNKS: usize = 64;
/// A run this large (chunk JSON and text, in bytes) is written as a block even before it has
/// [`BLOCK_CHUNKS`] chunks.
pub(crate) const BLOCK_BYTES: usize = 16 * 1024;
/// How many chunks are journaled between two looks at the journal's head.
pub(crate) const LOG_CHECK_EVERY: i64 = 4096;
/// A run whose first chunk is this many journal bytes behind the newest is written as a (short)
/// block, so one quiet stream cannot keep the journal from being trimmed.
pub(crate) const LOG_SPAN: i64 = 16 * 1024 * 1024;

/// A block's first byte: its chunks as they are (what blocks were before compression, and
/// what a block is when compressing would not make it smaller).
const PLAIN: u8 = 1;
/// A block's first byte: its chunks LZ4-compressed (a u32 with their plain size, then an LZ4
/// block). Chunks of one stream repeat themselves (id, model, field names), so a block shrinks
/// four- to eightfold, and every byte not written is a byte SQLite does not write to its WAL,
/// checksum, copy into the database and sync (most of the store's CPU on long streams: see
/// `docs/benchmarks/README.md`).
const LZ4: u8 = 2;
/// LZ4 cannot expand data more than about 255-fold: a plain size claimed beyond that is damage.
const LZ4_MAX_RATIO: usize = 255;
/// Smaller blocks are stored plain. Compressing costs about five instructions a byte (and starts
/// by clearing a table): for a long stream's full blocks that is paid back in pages SQLite does
/// not write, check and copy, but a short stream's only block cost more to compress than it saved
/// (`sluice-bench --only-short`, docs/benchmarks/README.md).
const COMPRESS_FROM: usize = 8 * 1024;

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

/// Every stream's run, by stream id. Hashed with foldhash rather than the standard library's
/// SipHash: the writer looks a stream up several times for every chunk, and the keys are
/// sluice's own stream ids (time-ordered, with 74 random bits), which no client chooses, so a
/// hash built to resist chosen keys buys nothing here.
pub(crate) type Runs = ByStream<Run>;

/// A map keyed by sluice's own stream ids (see [`Runs`]).
pub(crate) type ByStream<V> = HashMap<Arc<str>, V, foldhash::fast::RandomState>;

/// A block that cannot be read back.
#[derive(Debug, thiserror::Error)]
#[error("a stored chunk block is damaged ({0})")]
pub(crate) struct BlockError(&'static str);

/// Encodes chunks as a block body: a format byte, then per chunk its seq and offset (u64 and
/// i64, little-endian), then its JSON and its text, each as a u32 length and the bytes;
/// compressed (see [`LZ4`]) if it is large enough to be worth it and that makes it smaller.
pub(crate) fn encode<'a, I>(chunks: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a LoggedChunk>,
    I::IntoIter: Clone,
{
    let chunks = chunks.into_iter();
    // Sized once: grown a chunk at a time, a full block's buffer was reallocated six times.
    let size = chunks
        .clone()
        .map(|c| CHUNK_HEAD + c.data.len() + c.content.len())
        .sum::<usize>();
    let mut plain = Vec::with_capacity(1 + size);
    plain.push(PLAIN);
    for c in chunks {
        encode_chunk(&mut plain, c);
    }
    let Ok(size) = u32::try_from(plain.len() - 1) else {
        return plain;
    };
    if plain.len() < COMPRESS_FROM {
        return plain;
    }
    lz4_block(&plain[1..], size).unwrap_or(plain)
}

/// The bytes [`encode_chunk`] writes besides a chunk's JSON and text.
const CHUNK_HEAD: usize = 8 + 8 + 4 + 4;

/// The largest block compressed in the writer's reused buffer; a larger one (a block holding
/// a chunk near the event cap) gets a buffer of its own, so that the thread does not keep
/// that much for good.
const SCRATCH_MAX: usize = 4 * BLOCK_BYTES;

thread_local! {
    /// Where blocks are compressed. lz4_flex's safe encoder clears a fresh buffer of the
    /// largest possible output for every block it compresses; this one is cleared once.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A block body of `input` LZ4-compressed (its format byte, `size` and the LZ4 block), or
/// `None` if that would be no smaller than the plain body.
fn lz4_block(input: &[u8], size: u32) -> Option<Vec<u8>> {
    let need = lz4_flex::block::get_maximum_output_size(input.len());
    let pack = |buf: &mut Vec<u8>| {
        if buf.len() < need {
            buf.resize(need, 0);
        }
        let n = lz4_flex::block::compress_into(input, buf).ok()?;
        if n + 5 > input.len() {
            return None;
        }
        let mut out = Vec::with_capacity(n + 5);
        out.push(LZ4);
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(buf.get(..n)?);
        Some(out)
    };
    if need > SCRATCH_MAX {
        return pack(&mut Vec::new());
    }
    SCRATCH.with_borrow_mut(pack)
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
    let (&format, mut rest) = body.split_first().ok_or(BlockError("empty"))?;
    let plain;
    match format {
        PLAIN => {}
        LZ4 => {
            let size = u32::from_le_bytes(take_array(&mut rest)?) as usize;
            if size > rest.len().saturating_mul(LZ4_MAX_RATIO) {
                return Err(BlockError("implausible size"));
            }
            plain = lz4_flex::block::decompress(rest, size).map_err(|_| BlockError("not LZ4"))?;
            if plain.len() != size {
                return Err(BlockError("wrong size"));
            }
            rest = &plain;
        }
        _ => return Err(BlockError("unknown format")),
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
        let body = encode(&chunks);
        assert_eq!(body[0], PLAIN, "too small to be worth compressing");
        let decoded = decode(&body).expect("decodes");
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
    fn blocks_that_repeat_themselves_are_stored_compressed_and_read_back_whole() {
        let chunks: Vec<LoggedChunk> = (1..=BLOCK_CHUNKS as u64)
            .map(|seq| {
                let word = format!("word{seq} ");
                let data = format!(
                    r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{{"content":"{word}"}}}}]}}"#
                );
                chunk(seq, &data, &word)
            })
            .collect();
        let plain: usize = chunks.iter().map(|c| 24 + c.bytes()).sum();
        let body = encode(&chunks);
        assert_eq!(body[0], LZ4);
        assert!(body.len() * 4 < plain, "{} of {plain} bytes", body.len());
        let expected: Vec<Decoded> = chunks
            .iter()
            .map(|c| (c.seq, c.offset_us, c.data.to_string(), c.content.clone()))
            .collect();
        assert_eq!(decode(&body).expect("decodes"), expected);
        // Damage is an error, never a panic or a huge allocation.
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        let mut huge = body.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
        let mut short = body.clone();
        short[1..5].copy_from_slice(&((plain as u32) / 2).to_le_bytes());
        assert!(decode(&short).is_err());
    }

    #[test]
    fn a_block_too_large_for_the_reused_buffer_is_compressed_all_the_same() {
        let text = "the same words again and again ".repeat(SCRATCH_MAX / 16);
        let chunks = [
            chunk(1, &format!("{{\"t\":\"{text}\"}}"), &text),
            chunk(2, "{}", ""),
        ];
        let body = encode(&chunks);
        assert_eq!(body[0], LZ4);
        assert!(body.len() * 4 < 2 * text.len(), "{} bytes", body.len());
        let decoded = decode(&body).expect("decodes");
        assert_eq!(decoded.len(), 2);
        assert_eq!(decoded[0].3, text);
        // And the next, small one still uses the reused buffer, whole.
        let small: Vec<LoggedChunk> = (1..=BLOCK_CHUNKS as u64)
            .map(|seq| {
                chunk(
                    seq,
                    &format!("{{\"n\":{seq},\"pad\":\"{}\"}}", "p".repeat(200)),
                    "p",
                )
            })
            .collect();
        let body = encode(&small);
        assert_eq!(body[0], LZ4);
        assert_eq!(decode(&body).expect("decodes").len(), BLOCK_CHUNKS);
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
