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
//!   [`Run`]) and, when a run is full or its stream ends, writes it as one `chunk_blocks` row:
//!   one index entry per block instead of one per chunk. A run is full at [`BLOCK_CHUNKS`]
//!   chunks or [`BLOCK_BYTES`] bytes, and is written by the writer's fold (many streams' blocks
//!   in one transaction, which no commit waits for), which a run at [`LEFT_FULL`] times that
//!   starts; a commit writes one itself only at [`HARD_FULL`] times, so memory per stream stays
//!   bounded.
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
/// A full run is left to the writer's fold, which writes it with other streams' blocks in a
/// transaction no commit waits for, when it runs for other work (rows due, a flush); a run that
/// holds this many times [`BLOCK_CHUNKS`] or [`BLOCK_BYTES`] starts it.
pub(crate) const LEFT_FULL: usize = 2;
/// ...and any commit waits for the connection to write a run that holds this many times
/// [`BLOCK_CHUNKS`] or [`BLOCK_BYTES`]: what bounds a run's memory.
pub(crate) const HARD_FULL: usize = 4;
/// How many chunks are journaled between two looks at the journal's head.
pub(crate) const LOG_CHECK_EVERY: i64 = 4096;
/// A run whose first chunk is this many journal bytes behind the newest is written as a (short)
/// block, so one quiet stream cannot keep the journal from being trimmed.
pub(crate) const LOG_SPAN: i64 = 16 * 1024 * 1024;

/// A block's first byte: its chunks as they are (how blocks were first written; still read).
const PLAIN: u8 = 1;
/// A block's first byte: its chunks LZ4-compressed (a u32 with their plain size, then an LZ4
/// block). How full blocks were written before [`DELTA`]; still read.
const LZ4: u8 = 2;
/// A block's first byte: each chunk written against the one before it (see [`encode`]).
///
/// Chunks of one stream repeat themselves: the id, the model, the field names, all but a token
/// or two, in the same place. Written as what it shares with the chunk before it (the bytes in
/// common at its start and at its end) and the few bytes in between, a block of typical chunks
/// shrinks about tenfold, more than LZ4 took it; and that costs a comparison of each chunk with
/// the one before it (eight bytes at a time), where LZ4 cost about five instructions a byte and
/// cleared a 16 KB table per block: the largest single item of what a transcript cost per chunk
/// (`bash bench/callgrind 20 60 200`, with and without `record_chunks`). Every byte not written
/// is one SQLite does not write to its WAL, checksum and copy into the database.
const DELTA: u8 = 3;
/// A block's first byte: a [`DELTA`] body that is still large (chunks that do not repeat each
/// other), LZ4-compressed as [`LZ4`] is: its size as a u32, then an LZ4 block.
const LZ4_DELTA: u8 = 4;
/// LZ4 cannot expand data more than about 255-fold: a plain size claimed beyond that is damage.
const LZ4_MAX_RATIO: usize = 255;
/// A [`DELTA`] body this large is LZ4-compressed as well ([`LZ4_DELTA`]) if that makes it
/// smaller: its chunks did not repeat each other much, and what repeats within them LZ4 finds.
/// Smaller ones are not worth LZ4's cost (about five instructions a byte, starting by clearing
/// a table).
const COMPRESS_FROM: usize = 8 * 1024;
/// The most bytes a [`DELTA`] block's chunks may take from the chunks before them, in all. A
/// block the writer makes takes less than `HARD_FULL * BLOCK_BYTES` (a run is written once it
/// reaches that at most, and a chunk takes at most the size of the one before it); beyond this bound a
/// block is damaged, and decoding it stops before it makes its reader hold more than its own
/// size and this.
const MAX_SHARED: usize = 64 * BLOCK_BYTES;

/// One chunk as the store keeps it.
#[derive(Debug, Clone, PartialEq)]
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
    pub(crate) fn bytes(&self) -> usize {
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

    /// Forgets its chunks up to `seq` (written in a block meanwhile); later ones stay. Its
    /// `first_log` stays as it was: the journal then keeps a little more than it must, never
    /// less, until the run is written whole.
    pub fn drop_through(&mut self, seq: u64) {
        let written = self.chunks.iter().take_while(|c| c.seq <= seq).count();
        let bytes: usize = self.chunks[..written].iter().map(LoggedChunk::bytes).sum();
        self.bytes = self.bytes.saturating_sub(bytes);
        self.chunks.drain(..written);
    }

    /// Whether it should be written as a block now.
    pub fn is_full(&self) -> bool {
        self.holds(1)
    }

    /// Whether it holds `times` blocks' worth.
    pub fn holds(&self, times: usize) -> bool {
        holds(self.chunks.len(), self.bytes, times)
    }

    /// The last chunk's seq (0 if empty).
    pub fn last_seq(&self) -> u64 {
        self.chunks.last().map_or(0, |c| c.seq)
    }
}

/// Whether `chunks` chunks of `bytes` bytes make `times` blocks' worth ([`BLOCK_CHUNKS`] or
/// [`BLOCK_BYTES`] each).
pub(crate) fn holds(chunks: usize, bytes: usize, times: usize) -> bool {
    chunks >= times * BLOCK_CHUNKS || bytes >= times * BLOCK_BYTES
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
pub(crate) struct BlockError(pub(crate) &'static str);

/// Encodes consecutive chunks of one stream as a block body: the format byte [`DELTA`], then per
/// chunk, against the chunk before it (the first against an empty one), each number an unsigned
/// LEB128 varint:
///
/// - its seq less the one before (wrapping), and its offset less the one before (zigzag);
/// - its JSON: how many bytes it shares with the JSON before at its start and at its end, then
///   the length of the bytes in between and those bytes;
/// - its text: its length and its bytes.
///
/// A body of [`COMPRESS_FROM`] bytes or more is LZ4-compressed as well if that makes it smaller
/// ([`LZ4_DELTA`]).
pub(crate) fn encode<'a, I>(chunks: I) -> Vec<u8>
where
    I: IntoIterator<Item = &'a LoggedChunk>,
{
    SCRATCH.with_borrow_mut(|scratch| {
        let body = &mut scratch.body;
        body.clear();
        body.push(DELTA);
        let mut before: Option<&LoggedChunk> = None;
        for c in chunks {
            encode_against(body, before, c);
            before = Some(c);
        }
        let out = if body.len() < COMPRESS_FROM {
            None
        } else {
            u32::try_from(body.len() - 1)
                .ok()
                .and_then(|size| lz4_block(&body[1..], size, &mut scratch.lz4))
        };
        let out = out.unwrap_or_else(|| body.clone());
        scratch.shrink();
        out
    })
}

/// Appends `c` as a [`DELTA`] block holds it, written against `before` (see [`encode`]).
fn encode_against(out: &mut Vec<u8>, before: Option<&LoggedChunk>, c: &LoggedChunk) {
    let (seq, offset, data) = before.map_or((0, 0, &b""[..]), |b| {
        (b.seq, b.offset_us, b.data.as_bytes())
    });
    put_varint(out, c.seq.wrapping_sub(seq));
    put_varint(out, zigzag(c.offset_us.wrapping_sub(offset)));
    let new = c.data.as_bytes();
    let start = common_start(data, new);
    let end = common_end(&data[start..], &new[start..]);
    let between = &new[start..new.len() - end];
    put_varint(out, start as u64);
    put_varint(out, end as u64);
    put_varint(out, between.len() as u64);
    out.extend_from_slice(between);
    put_varint(out, c.content.len() as u64);
    out.extend_from_slice(c.content.as_bytes());
}

/// How many bytes `a` and `b` share at their start: compared sixteen at a time (one load and
/// one comparison each), then one by one.
fn common_start(a: &[u8], b: &[u8]) -> usize {
    let mut n = 0;
    for (x, y) in a.chunks_exact(16).zip(b.chunks_exact(16)) {
        let (Ok(x), Ok(y)) = (<[u8; 16]>::try_from(x), <[u8; 16]>::try_from(y)) else {
            break;
        };
        let differ = u128::from_le_bytes(x) ^ u128::from_le_bytes(y);
        if differ != 0 {
            return n + (differ.trailing_zeros() / 8) as usize;
        }
        n += 16;
    }
    n + a[n..]
        .iter()
        .zip(&b[n..])
        .take_while(|(x, y)| x == y)
        .count()
}

/// How many bytes `a` and `b` share at their end: compared sixteen at a time, then one by one.
fn common_end(a: &[u8], b: &[u8]) -> usize {
    let mut n = 0;
    for (x, y) in a.rchunks_exact(16).zip(b.rchunks_exact(16)) {
        let (Ok(x), Ok(y)) = (<[u8; 16]>::try_from(x), <[u8; 16]>::try_from(y)) else {
            break;
        };
        let differ = u128::from_be_bytes(x) ^ u128::from_be_bytes(y);
        if differ != 0 {
            return n + (differ.trailing_zeros() / 8) as usize;
        }
        n += 16;
    }
    n + a[..a.len() - n]
        .iter()
        .rev()
        .zip(b[..b.len() - n].iter().rev())
        .take_while(|(x, y)| x == y)
        .count()
}

fn put_varint(out: &mut Vec<u8>, mut n: u64) {
    while n >= 0x80 {
        out.push((n as u8) | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

fn take_varint(rest: &mut &[u8]) -> Result<u64, BlockError> {
    let mut n = 0u64;
    for shift in (0..64).step_by(7) {
        let [byte] = take_array(rest)?;
        let bits = u64::from(byte & 0x7f);
        if shift == 63 && bits > 1 {
            return Err(BlockError("varint too large"));
        }
        n |= bits << shift;
        if byte & 0x80 == 0 {
            return Ok(n);
        }
    }
    Err(BlockError("varint too long"))
}

fn take_len(rest: &mut &[u8]) -> Result<usize, BlockError> {
    usize::try_from(take_varint(rest)?).map_err(|_| BlockError("length too large"))
}

fn zigzag(n: i64) -> u64 {
    ((n << 1) ^ (n >> 63)) as u64
}

fn unzigzag(n: u64) -> i64 {
    ((n >> 1) as i64) ^ -((n & 1) as i64)
}

/// The most a thread keeps of its encoding buffers between blocks; a larger block (one holding
/// a chunk near the event cap) gets its buffers back to the allocator, so that the thread does
/// not keep that much for good.
const SCRATCH_MAX: usize = 4 * BLOCK_BYTES;

/// Where a thread encodes blocks: reused, so a block costs one allocation (its body, of its
/// size), not a buffer grown as it is written; and lz4_flex's safe encoder clears a fresh
/// buffer of the largest possible output for every block it compresses, this one once.
#[derive(Default)]
struct Scratch {
    body: Vec<u8>,
    lz4: Vec<u8>,
}

impl Scratch {
    fn shrink(&mut self) {
        for buf in [&mut self.body, &mut self.lz4] {
            if buf.capacity() > SCRATCH_MAX {
                *buf = Vec::new();
            }
        }
    }
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// A block body of `input` LZ4-compressed (the [`LZ4_DELTA`] byte, `size` and the LZ4 block),
/// compressed in `buf`, or `None` if that would be no smaller than `input`.
fn lz4_block(input: &[u8], size: u32, buf: &mut Vec<u8>) -> Option<Vec<u8>> {
    let need = lz4_flex::block::get_maximum_output_size(input.len());
    if buf.len() < need {
        buf.resize(need, 0);
    }
    let n = lz4_flex::block::compress_into(input, buf).ok()?;
    if n + 5 > input.len() {
        return None;
    }
    let mut out = Vec::with_capacity(n + 5);
    out.push(LZ4_DELTA);
    out.extend_from_slice(&size.to_le_bytes());
    out.extend_from_slice(buf.get(..n)?);
    Some(out)
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

/// Decodes a block body written by [`encode`] (or by an earlier version: [`PLAIN`], [`LZ4`]).
pub(crate) fn decode(body: &[u8]) -> Result<Vec<Decoded>, BlockError> {
    let (&format, mut rest) = body.split_first().ok_or(BlockError("empty"))?;
    let plain;
    if matches!(format, LZ4 | LZ4_DELTA) {
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
    let mut out = Vec::new();
    match format {
        PLAIN | LZ4 => {
            while !rest.is_empty() {
                out.push(decode_chunk(&mut rest)?);
            }
        }
        DELTA | LZ4_DELTA => {
            let mut shared = 0usize;
            while !rest.is_empty() {
                let chunk = decode_against(&mut rest, out.last(), &mut shared)?;
                out.push(chunk);
            }
        }
        _ => return Err(BlockError("unknown format")),
    }
    Ok(out)
}

/// Reads one chunk written by [`encode_against`] from the front of `rest`, `before` being the
/// chunk decoded before it; `shared` counts the bytes taken from earlier chunks (see
/// [`MAX_SHARED`]).
fn decode_against(
    rest: &mut &[u8],
    before: Option<&Decoded>,
    shared: &mut usize,
) -> Result<Decoded, BlockError> {
    let (seq, offset, data) = before.map_or((0, 0, ""), |(s, o, d, _)| (*s, *o, d.as_str()));
    let seq = seq.wrapping_add(take_varint(rest)?);
    let offset = offset.wrapping_add(unzigzag(take_varint(rest)?));
    let (start, end) = (take_len(rest)?, take_len(rest)?);
    let kept = start
        .checked_add(end)
        .filter(|&kept| kept <= data.len())
        .ok_or(BlockError("shares more than the chunk before has"))?;
    *shared = shared.saturating_add(kept);
    if *shared > MAX_SHARED {
        return Err(BlockError("shares implausibly much"));
    }
    let between = take_counted(rest)?;
    let old = data.as_bytes();
    let mut new = Vec::with_capacity(kept + between.len());
    new.extend_from_slice(&old[..start]);
    new.extend_from_slice(between);
    new.extend_from_slice(&old[old.len() - end..]);
    let data = String::from_utf8(new).map_err(|_| NOT_UTF8)?;
    let content = utf8(take_counted(rest)?)?;
    Ok((seq, offset, data, content))
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

/// Text preceded by its length (u32), taken off `rest`.
pub(crate) fn take_text(rest: &mut &[u8]) -> Result<String, BlockError> {
    let len = u32::from_le_bytes(take_array(rest)?) as usize;
    utf8(take(rest, len)?)
}

/// Bytes preceded by their count as a varint (a [`DELTA`] block's), taken off `rest`.
fn take_counted<'a>(rest: &mut &'a [u8]) -> Result<&'a [u8], BlockError> {
    let len = take_len(rest)?;
    take(rest, len)
}

const NOT_UTF8: BlockError = BlockError("not UTF-8");

fn utf8(bytes: &[u8]) -> Result<String, BlockError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| NOT_UTF8)
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

    fn decoded(chunks: &[LoggedChunk]) -> Vec<Decoded> {
        chunks
            .iter()
            .map(|c| (c.seq, c.offset_us, c.data.to_string(), c.content.clone()))
            .collect()
    }

    /// A stream's chunks as an OpenAI-shaped upstream sends them.
    fn typical(n: u64) -> Vec<LoggedChunk> {
        (1..=n)
            .map(|seq| {
                let word = format!("word{seq} ");
                let data = format!(
                    r#"{{"id":"chatcmpl-1","object":"chat.completion.chunk","model":"m","choices":[{{"index":0,"delta":{{"content":"{word}"}}}}]}}"#
                );
                chunk(seq, &data, &word)
            })
            .collect()
    }

    /// Every cut of `body` is an error or a block of the first chunks (a cut between two
    /// chunks is a shorter block), never a panic and never anything else.
    fn cuts_are_errors_or_prefixes(body: &[u8], chunks: &[Decoded]) {
        for cut in 0..body.len() {
            match decode(&body[..cut]) {
                Err(_) => {}
                Ok(got) => assert!(
                    got.len() < chunks.len() && got[..] == chunks[..got.len()],
                    "cut at {cut} decodes to something else"
                ),
            }
        }
    }

    #[test]
    fn blocks_round_trip() {
        let chunks = [
            chunk(1, r#"{"a":"é"}"#, "é"),
            chunk(2, "", ""),
            chunk(9, "{}", "日本"),
            // Shares "{\"a\":\"" and the first byte of "é" with the one before.
            chunk(3, r#"{"a":"è"}"#, "è"),
            chunk(4, r#"{"a":"è"}"#, ""),
            chunk(u64::MAX, "x", "y"),
            chunk(0, r#"{"a":"è","b":1}"#, "z"),
        ];
        let mut chunks = chunks.to_vec();
        chunks[3].offset_us = i64::MIN;
        chunks[4].offset_us = i64::MAX;
        let body = encode(&chunks);
        assert_eq!(body[0], DELTA);
        assert_eq!(decode(&body).expect("decodes"), decoded(&chunks));
        cuts_are_errors_or_prefixes(&body, &decoded(&chunks));
        assert_eq!(decode(&encode(&[])).expect("decodes"), vec![]);
    }

    #[test]
    fn shared_starts_and_ends_are_counted_exactly() {
        let text = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ";
        for len in 0..text.len() {
            for at in 0..len {
                let a = &text[..len];
                let mut b = a.to_vec();
                b[at] = b'#';
                assert_eq!(common_start(a, &b), at, "{len} {at}");
                assert_eq!(common_end(a, &b), len - at - 1, "{len} {at}");
            }
            assert_eq!(common_start(&text[..len], text), len);
            assert_eq!(common_end(&text[text.len() - len..], text), len);
            assert_eq!(common_end(&text[..len], &text[1..=len]), 0);
        }
    }

    #[test]
    fn chunks_that_repeat_each_other_are_stored_as_what_changes() {
        let chunks = typical(BLOCK_CHUNKS as u64);
        let plain: usize = chunks.iter().map(|c| 24 + c.bytes()).sum();
        let body = encode(&chunks);
        assert_eq!(body[0], DELTA);
        // What changes is the word (twice: in the JSON and as the text) and the numbers.
        assert!(body.len() * 8 < plain, "{} of {plain} bytes", body.len());
        assert_eq!(decode(&body).expect("decodes"), decoded(&chunks));
        cuts_are_errors_or_prefixes(&body, &decoded(&chunks));
    }

    #[test]
    fn chunks_that_do_not_repeat_each_other_are_compressed_if_that_helps() {
        // Each chunk unlike the one before, but each repetitive within.
        let chunks: Vec<LoggedChunk> = (1..=BLOCK_CHUNKS as u64)
            .map(|seq| {
                let letter = char::from(b'a' + (seq % 26) as u8);
                let text = letter.to_string().repeat(250);
                chunk(seq, &format!("{{\"{letter}\":\"{text}\"}}"), &text)
            })
            .collect();
        let plain: usize = chunks.iter().map(|c| 24 + c.bytes()).sum();
        let body = encode(&chunks);
        assert_eq!(body[0], LZ4_DELTA);
        assert!(body.len() * 4 < plain, "{} of {plain} bytes", body.len());
        assert_eq!(decode(&body).expect("decodes"), decoded(&chunks));
        for cut in 0..body.len() {
            assert!(decode(&body[..cut]).is_err(), "cut at {cut}");
        }
        // A claimed size beyond what LZ4 can expand to, or short of it, is an error.
        let mut huge = body.clone();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(decode(&huge).is_err());
        let mut short = body.clone();
        short[1..5].copy_from_slice(&((plain as u32) / 2).to_le_bytes());
        assert!(decode(&short).is_err());
        // Chunks with next to nothing to compress.
        let mut state = 0x9e37_79b9_7f4a_7c15_u64;
        let mut noise = || {
            // xorshift64: characters (two bytes each) with no pattern for LZ4 to find.
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from_u32(0x100 + (state % 0x400) as u32).unwrap_or('?')
        };
        let noise: Vec<LoggedChunk> = (1..=BLOCK_CHUNKS as u64)
            .map(|seq| chunk(seq, &(0..200).map(|_| noise()).collect::<String>(), ""))
            .collect();
        let body = encode(&noise);
        let raw: String = noise.iter().map(|c| &*c.data).collect();
        // A few bytes per chunk besides its text, compressed or not.
        assert!(
            body.len() <= raw.len() + 8 * noise.len(),
            "{} bytes",
            body.len()
        );
        assert_eq!(decode(&body).expect("decodes"), decoded(&noise));
        // What LZ4 cannot make smaller is not compressed.
        assert!(lz4_block(raw.as_bytes(), raw.len() as u32, &mut Vec::new()).is_none());
    }

    #[test]
    fn a_block_too_large_for_the_reused_buffers_is_encoded_all_the_same() {
        let text = "the same words again and again ".repeat(SCRATCH_MAX / 16);
        let chunks = [
            chunk(1, &format!("{{\"t\":\"{text}\"}}"), &text),
            chunk(2, "{}", ""),
        ];
        let body = encode(&chunks);
        assert_eq!(body[0], LZ4_DELTA);
        assert!(body.len() * 4 < 2 * text.len(), "{} bytes", body.len());
        assert_eq!(decode(&body).expect("decodes"), decoded(&chunks));
        // The buffers were given back; the next block is encoded whole.
        SCRATCH.with_borrow(|s| assert!(s.body.capacity() <= SCRATCH_MAX));
        let chunks = typical(3);
        assert_eq!(decode(&encode(&chunks)).expect("decodes"), decoded(&chunks));
    }

    #[test]
    fn blocks_written_by_earlier_versions_are_still_read() {
        let chunks = typical(BLOCK_CHUNKS as u64);
        let mut plain = vec![PLAIN];
        for c in &chunks {
            encode_chunk(&mut plain, c);
        }
        assert_eq!(decode(&plain).expect("decodes"), decoded(&chunks));
        let mut lz4 = vec![LZ4];
        lz4.extend_from_slice(&(plain.len() as u32 - 1).to_le_bytes());
        lz4.extend_from_slice(&lz4_flex::block::compress(&plain[1..]));
        assert_eq!(decode(&lz4).expect("decodes"), decoded(&chunks));
    }

    #[test]
    fn damaged_blocks_are_errors_not_panics_or_huge_allocations() {
        let mut wrong = encode(&typical(2));
        wrong[0] = 99;
        assert!(decode(&wrong).is_err());
        assert!(decode(&[]).is_err());
        // Sharing more than the chunk before has.
        let mut body = vec![DELTA];
        for n in [1, 0, 0, 0, 2] {
            put_varint(&mut body, n);
        }
        body.extend_from_slice(b"{}");
        put_varint(&mut body, 0);
        let good = body.clone();
        assert_eq!(decode(&good).expect("decodes")[0].2, "{}");
        for (start, end) in [(3, 0), (0, 3), (2, 1), (u64::MAX, 1)] {
            let mut bad = good.clone();
            for n in [1, 0, start, end, 0, 0] {
                put_varint(&mut bad, n);
            }
            assert!(decode(&bad).is_err(), "shares {start} + {end}");
        }
        // A varint of more than 64 bits.
        let mut bad = good.clone();
        bad.extend_from_slice(&[0xff; 10]);
        bad.push(0x01);
        assert!(decode(&bad).is_err());
        let mut bad = good.clone();
        bad.extend_from_slice(&[0xff; 9]);
        bad.push(0x02);
        assert!(decode(&bad).is_err());
        // Many chunks each taking a large chunk before them whole: the block is damaged past
        // MAX_SHARED, before it makes its reader hold more than that.
        let big = "x".repeat(BLOCK_BYTES);
        let mut body = vec![DELTA];
        for n in [1, 0, 0, 0, big.len() as u64] {
            put_varint(&mut body, n);
        }
        body.extend_from_slice(big.as_bytes());
        put_varint(&mut body, 0);
        let mut copies = body.clone();
        let fit = MAX_SHARED / big.len();
        for _ in 0..fit {
            for n in [1, 0, big.len() as u64, 0, 0, 0] {
                put_varint(&mut copies, n);
            }
        }
        assert_eq!(decode(&copies).expect("at the bound").len(), fit + 1);
        for n in [1, 0, big.len() as u64, 0, 0, 0] {
            put_varint(&mut copies, n);
        }
        assert!(decode(&copies).is_err(), "past the bound");
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
