//! The journal: where a chunk, a stream's record and its final status become durable before
//! anyone is told.
//!
//! Each batch's chunks (and records, see [`rows`](super::rows)) are appended to a file in the data directory (`journal/`) with one
//! `write`, each as a checksummed record; SQLite then only receives chunks in blocks (see
//! [`block`](crate::store::block)). Why not a row per chunk in SQLite, as before? A row costs a
//! B-tree insert, and each commit rewrites whole 4 KiB pages into the WAL and, at the next
//! checkpoint, into the database: a chunk's bytes were written four times (log row in the WAL
//! and in the database, block in the WAL and in the database) and the SQLite work was about 40%
//! of the gateway's CPU on long streams. A journal record costs a copy into the batch's buffer.
//!
//! Durability is the same as SQLite's WAL with `synchronous = NORMAL`, which is what the store
//! used: a `write` that returned is in the page cache, so it survives the process (a crash, a
//! kill), not the machine. Like the WAL, the journal is synced to disk by the checkpoint thread
//! (every 500 ms), not per batch: an OS crash or power loss can lose the last moments (a
//! checksum finds a torn record and replay stops there). At open, [`Journal::recover`] reads
//! every record back; the store folds those no block holds into blocks, then starts an empty
//! journal.
//!
//! The journal is a series of segment files named by their first byte's position; a position is
//! a record's place in the whole series. Once no run needs a segment's chunks (they are all in
//! committed blocks), the segment is deleted, or kept as a spare (up to four) that a later segment is
//! written into. Why reuse a file? Appending to a new file makes the kernel find, zero and
//! account for a fresh page-cache page and reserve a disk block at every 4 KiB, and deleting it
//! frees them all again: at 16 long streams that was two thirds of the journal's `write` and
//! 2% more in `close`, about 7% of the gateway's CPU. Overwriting a file whose pages are in the
//! page cache costs a copy.
//!
//! A segment begins with a header: a mark (`0xFF 'S' 'J' 0x02`, which no record's length can
//! be) and its first position (u64). Then its records: payload length (u32), CRC-32 of the
//! segment's first position and the payload (u32), then the payload, all little-endian. The
//! first position in the checksum is what keeps a reused file's old records (past what this
//! segment has written) from being read back as its own: they were sealed with another. The
//! header goes out with the segment's first records (beginning a segment writes nothing, which
//! a full disk would refuse), so a segment whose header names another position than its file's
//! name is a reused file not yet written to, and holds none of its records. A
//! segment without the header (written before 2026-12-01, evening) has the CRC-32 of the
//! payload alone. A chunk's: the stream id (u16 length and bytes), seq (u64), offset in µs
//! (i64), the chunk JSON and its text (each a u32 length and bytes). A row's (a stream's record
//! or final status): `0xFFFF` where a chunk's id length is (no id is that long), then the row
//! ([`Row::encode`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use crate::store::block::{decode_chunk, encode_chunk, take, take_array, LoggedChunk};
use crate::store::StoreError;

use super::rows::Row;

/// A segment is closed and a new one begun past this many bytes.
pub(crate) const SEGMENT_BYTES: u64 = 4 * 1024 * 1024;
/// The largest record replay accepts (a chunk is bounded far below this by the upstream's
/// `max_event_bytes`); a larger length means a damaged record.
const MAX_RECORD: u32 = 64 * 1024 * 1024;
const HEADER: usize = 8;
/// What a segment with a header begins with; as a record's length it would be over
/// [`MAX_RECORD`], so a segment without one never does.
const SEGMENT_MARK: [u8; 4] = [0xFF, b'S', b'J', 0x02];
/// A segment's header: the mark and the segment's first position.
const SEGMENT_HEADER: usize = 12;
/// Trimmed segment files kept to be written again rather than deleted (each about
/// [`SEGMENT_BYTES`] on disk). A trim can free several segments at once (at 16 long streams of
/// the benchmark, two): with room for one spare, every other segment was a new file.
pub(crate) const SPARES: usize = 4;

/// How a segment's records are sealed: what their checksums cover besides the payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Seal {
    /// The payload alone (a segment written before segments had a header).
    Plain,
    /// The segment's first position, then the payload.
    Salted(u64),
}

impl Seal {
    fn checksum(self, payload: &[u8]) -> u32 {
        match self {
            Seal::Plain => crc32fast::hash(payload),
            Seal::Salted(start) => {
                let mut hasher = crc32fast::Hasher::new();
                hasher.update(&start.to_le_bytes());
                hasher.update(payload);
                hasher.finalize()
            }
        }
    }
}

/// What a record holds, read back.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Recorded {
    /// A chunk of the stream with this id.
    Chunk(String, LoggedChunk),
    /// A stream's record or final status.
    Row(Row),
}

/// Where a row's record has a chunk's id length.
const ROW_MARK: u16 = u16::MAX;

/// The segments written to since they were last synced to disk (the current one last), for the
/// thread that syncs them; see [`Journal::unsynced`].
#[derive(Debug, Clone, Default)]
pub(crate) struct Unsynced(Arc<Mutex<Vec<File>>>);

impl Unsynced {
    fn push(&self, file: &File) -> Result<(), StoreError> {
        let file = file
            .try_clone()
            .map_err(|e| StoreError::io("cannot share a journal segment", e))?;
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(file);
        Ok(())
    }

    /// Syncs every segment written to (their data, to disk), keeping the current one for next
    /// time.
    pub(crate) fn sync(&self) -> std::io::Result<()> {
        let files = {
            let mut files = self.0.lock().unwrap_or_else(PoisonError::into_inner);
            let keep = files.len().saturating_sub(1);
            let older: Vec<File> = files.drain(..keep).collect();
            let current = files.last().map(File::try_clone).transpose()?;
            older.into_iter().chain(current).collect::<Vec<_>>()
        };
        files.iter().try_for_each(File::sync_data)
    }
}

/// The open journal: the segment being written and the older ones still needed.
#[derive(Debug)]
pub(crate) struct Journal {
    dir: PathBuf,
    /// The segment being appended to, and its first position.
    file: File,
    start: u64,
    /// Bytes in the current segment, its header counted (positions count it) whether or not
    /// it is on disk yet.
    len: u64,
    /// Whether the current segment's header is on disk (it goes with the segment's first
    /// write).
    headed: bool,
    /// First positions of older segments still on disk, oldest first.
    older: VecDeque<u64>,
    /// Trimmed segment files kept for the next segments (see [`SPARES`]).
    spares: Vec<PathBuf>,
    /// The current segment's size on disk when it was taken (a spare's old size; 0 for a new
    /// file): what lies past `len` up to it is the file's earlier records.
    taken_len: u64,
    /// Records staged for the next [`write`](Self::write).
    buf: Vec<u8>,
    /// For the thread that syncs the segments.
    unsynced: Unsynced,
}

fn segment_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.journal"))
}

/// Where a trimmed segment that began at `start` waits to be written again.
fn spare_path(dir: &Path, start: u64) -> PathBuf {
    dir.join(format!("{start:020}.spare"))
}

/// The first positions of the segments in `dir`, in order.
fn segments(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| StoreError::io("cannot list the journal", e))?;
    let mut starts = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| StoreError::io("cannot list the journal", e))?;
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(start) = name
            .strip_suffix(".journal")
            .and_then(|n| n.parse::<u64>().ok())
        {
            starts.push(start);
        }
    }
    starts.sort_unstable();
    Ok(starts)
}

impl Journal {
    /// Reads back what the journal in `dir` holds, in order (nothing if there is none). A
    /// record that is cut short or fails its checksum ends what is read of its segment (a write
    /// torn by an OS crash). Nothing is changed on disk: once what it held is safely elsewhere,
    /// [`start`](Self::start) begins anew.
    pub(crate) fn recover(dir: &Path) -> Result<Vec<Recorded>, StoreError> {
        let mut recorded = Vec::new();
        if !dir.exists() {
            return Ok(recorded);
        }
        let starts = segments(dir)?;
        for (i, &start) in starts.iter().enumerate() {
            let mut bytes = Vec::new();
            // Only what the file held when looked at (no more, whatever it is).
            File::open(segment_path(dir, start))
                .and_then(|f| {
                    let len = f.metadata()?.len();
                    f.take(len).read_to_end(&mut bytes)
                })
                .map_err(|e| StoreError::io("cannot read the journal", e))?;
            let (seal, records, whole) = decode_all(&bytes);
            if matches!(seal, Seal::Salted(s) if s != start) {
                // A reused file whose first write never came: its header and records are
                // those of the segment it was before.
                tracing::info!(
                    segment = start,
                    "a journal segment holds none of its own records yet"
                );
                continue;
            }
            let last = i + 1 == starts.len();
            if !whole && last && seal != Seal::Plain {
                // Normal: past its last record a reused file holds its earlier records.
                tracing::info!(
                    segment = start,
                    kept = records.len(),
                    "the journal's last segment is replayed up to its last whole record"
                );
            } else if !whole {
                tracing::warn!(
                    segment = start,
                    kept = records.len(),
                    "a journal segment ends in a damaged record (a write torn by a crash); its replay stops there"
                );
            }
            recorded.extend(records);
        }
        Ok(recorded)
    }

    /// Empties the journal in `dir` (deleting its segments and spares; the first segment is
    /// emptied in place) and starts anew there.
    pub(crate) fn start(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::data_dir(dir.to_path_buf(), e))?;
        for start in segments(dir)?.into_iter().filter(|&s| s > 0) {
            std::fs::remove_file(segment_path(dir, start))
                .map_err(|e| StoreError::io("cannot delete a journal segment", e))?;
        }
        remove_spares(dir)?;
        let file = create_segment(dir, 0)?;
        let unsynced = Unsynced::default();
        unsynced.push(&file)?;
        Ok(Self {
            dir: dir.to_path_buf(),
            file,
            start: 0,
            len: SEGMENT_HEADER as u64,
            headed: false,
            older: VecDeque::new(),
            spares: Vec::new(),
            taken_len: 0,
            buf: Vec::new(),
            unsynced,
        })
    }

    /// The segments to sync, shared with the thread that syncs them.
    pub(crate) fn unsynced(&self) -> Unsynced {
        self.unsynced.clone()
    }

    /// Stages one chunk of stream `id` for the next [`write`](Self::write); returns its
    /// position.
    pub(crate) fn stage(&mut self, id: &str, chunk: &LoggedChunk) -> i64 {
        let position = self.position();
        encode(&mut self.buf, Seal::Salted(self.start), id, chunk);
        position
    }

    /// Stages `row` for the next [`write`](Self::write); returns its position.
    pub(crate) fn stage_row(&mut self, row: &Row) -> i64 {
        let position = self.position();
        encode_row(&mut self.buf, Seal::Salted(self.start), row);
        position
    }

    /// The position the next staged record gets.
    pub(crate) fn position(&self) -> i64 {
        (self.start + self.len + self.buf.len() as u64) as i64
    }

    /// Appends the staged records with one `write`. When it returns `Ok`, they survive the
    /// process. On an error none of them count: what part of them reached the file is cut off
    /// again (or, if that fails too, the segment is closed and a new one begun), so a later
    /// record is never behind a torn one.
    pub(crate) fn write(&mut self) -> Result<(), StoreError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let staged = self.buf.len() as u64;
        let on_disk = self.on_disk();
        if !self.headed {
            // The segment's header goes out with its first records (a segment is begun
            // without a write, which a full disk would fail).
            let mut headed = Vec::with_capacity(SEGMENT_HEADER + self.buf.len());
            encode_header(&mut headed, self.start);
            headed.extend_from_slice(&self.buf);
            self.buf = headed;
        }
        let written = self.file.write_all(&self.buf);
        self.buf.clear();
        // A burst's buffer is not kept for good.
        self.buf.shrink_to(1024 * 1024);
        if let Err(e) = written {
            let cut = self.file.set_len(on_disk);
            let back = cut.and_then(|()| self.file.seek(SeekFrom::Start(on_disk)));
            if back.is_err() {
                // Past whatever part of them got in: the next segment's name is new.
                self.rotate(self.start + self.len + staged)?;
            }
            return Err(StoreError::io("cannot append to the journal", e));
        }
        self.headed = true;
        self.len += staged;
        if self.len >= SEGMENT_BYTES {
            self.rotate(self.start + self.len)?;
        }
        Ok(())
    }

    /// From now on every write fails as on a full disk (tests of what a failed write does).
    #[cfg(test)]
    pub(crate) fn fail_writes(&mut self) {
        if let Ok(full) = OpenOptions::new().write(true).open("/dev/full") {
            self.file = full;
        }
    }

    /// Drops the records staged since the last [`write`](Self::write) (their batch failed).
    pub(crate) fn discard(&mut self) {
        self.buf.clear();
    }

    /// Bytes of the current segment on disk (none before its first write, which carries its
    /// header).
    fn on_disk(&self) -> u64 {
        if self.headed {
            self.len
        } else {
            0
        }
    }

    /// Closes the current segment and begins the next at position `next`, in a spare file if
    /// there is one.
    fn rotate(&mut self, next: u64) -> Result<(), StoreError> {
        let end = self.on_disk();
        if self.taken_len > end {
            // A reused file's earlier records past this segment's end, cut so that only the
            // last segment ends in bytes not its own. Were they left, replay would stop at them
            // all the same (their checksums fail), after every record of this segment.
            if let Err(e) = self.file.set_len(end) {
                tracing::debug!(error = %e, "a reused journal segment was not cut to its end");
            }
        }
        let path = segment_path(&self.dir, next);
        let (file, taken_len) = match self.spares.pop().map(|spare| reuse(&spare, &path)) {
            Some(Ok(reused)) => reused,
            // A spare that cannot be taken (gone, say): a new file, as without one.
            Some(Err(_)) | None => (create_segment(&self.dir, next)?, 0),
        };
        self.unsynced.push(&file)?;
        self.file = file;
        self.taken_len = taken_len;
        self.older.push_back(self.start);
        self.start = next;
        self.len = SEGMENT_HEADER as u64;
        self.headed = false;
        Ok(())
    }

    /// Deletes the older segments that hold nothing at or after position `keep_from` (keeping
    /// up to [`SPARES`] of them as spares).
    pub(crate) fn trim(&mut self, keep_from: i64) -> Result<(), StoreError> {
        while let Some(&first) = self.older.front() {
            let end = self.older.get(1).copied().unwrap_or(self.start);
            if end as i64 > keep_from {
                break;
            }
            let path = segment_path(&self.dir, first);
            if self.spares.len() < SPARES {
                let spare = spare_path(&self.dir, first);
                std::fs::rename(&path, &spare)
                    .map_err(|e| StoreError::io("cannot keep a journal segment", e))?;
                self.spares.push(spare);
            } else {
                std::fs::remove_file(path)
                    .map_err(|e| StoreError::io("cannot delete a journal segment", e))?;
            }
            self.older.pop_front();
        }
        Ok(())
    }

    /// Bytes in the segments on disk (spares not counted).
    #[cfg(test)]
    pub(crate) fn bytes_on_disk(&self) -> u64 {
        self.start + self.len - self.older.front().copied().unwrap_or(self.start)
    }
}

/// Appends a segment's header: it begins at position `start`.
pub(crate) fn encode_header(buf: &mut Vec<u8>, start: u64) {
    buf.extend_from_slice(&SEGMENT_MARK);
    buf.extend_from_slice(&start.to_le_bytes());
}

/// Deletes the spare segment files in `dir`.
fn remove_spares(dir: &Path) -> Result<(), StoreError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| StoreError::io("cannot list the journal", e))?;
    for entry in entries {
        let path = entry
            .map_err(|e| StoreError::io("cannot list the journal", e))?
            .path();
        if path.extension().is_some_and(|e| e == "spare") {
            std::fs::remove_file(&path)
                .map_err(|e| StoreError::io("cannot delete a journal spare", e))?;
        }
    }
    Ok(())
}

/// Appends one record: chunk `chunk` of stream `id`, sealed with `seal`.
pub(crate) fn encode(buf: &mut Vec<u8>, seal: Seal, id: &str, chunk: &LoggedChunk) {
    let at = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    // A stream id is ours (a UUID-like string), far below ROW_MARK bytes.
    let id = &id.as_bytes()[..id.len().min(usize::from(ROW_MARK - 1))];
    buf.extend_from_slice(&(id.len() as u16).to_le_bytes());
    buf.extend_from_slice(id);
    encode_chunk(buf, chunk);
    close(buf, at, seal);
}

/// Appends one record: `row`, sealed with `seal`.
pub(crate) fn encode_row(buf: &mut Vec<u8>, seal: Seal, row: &Row) {
    let at = buf.len();
    buf.extend_from_slice(&[0; HEADER]);
    buf.extend_from_slice(&ROW_MARK.to_le_bytes());
    row.encode(buf);
    close(buf, at, seal);
}

/// Appends one record: what `recorded` holds, sealed with `seal`.
pub(crate) fn encode_recorded(buf: &mut Vec<u8>, seal: Seal, recorded: &Recorded) {
    match recorded {
        Recorded::Chunk(id, chunk) => encode(buf, seal, id, chunk),
        Recorded::Row(row) => encode_row(buf, seal, row),
    }
}

/// Fills in the header of the record that starts at `at` and runs to the end of `buf`.
fn close(buf: &mut [u8], at: usize, seal: Seal) {
    let payload = &buf[at + HEADER..];
    let (len, crc) = (payload.len() as u32, seal.checksum(payload));
    buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
    buf[at + 4..at + HEADER].copy_from_slice(&crc.to_le_bytes());
}

/// Renames the spare file at `spare` to `path` and opens it to be written from its start; with
/// its size.
fn reuse(spare: &Path, path: &Path) -> std::io::Result<(File, u64)> {
    std::fs::rename(spare, path)?;
    let file = OpenOptions::new().write(true).open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

fn create_segment(dir: &Path, start: u64) -> Result<File, StoreError> {
    OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(segment_path(dir, start))
        .map_err(|e| StoreError::io("cannot create a journal segment", e))
}

/// How one segment's records are sealed, its records, and whether it ended cleanly (no damaged
/// record, nor another segment's, at its end).
pub(crate) fn decode_all(mut bytes: &[u8]) -> (Seal, Vec<Recorded>, bool) {
    let seal = match bytes.strip_prefix(&SEGMENT_MARK) {
        None => Seal::Plain,
        Some(mut rest) => match take_array(&mut rest) {
            Ok(start) => {
                bytes = rest;
                Seal::Salted(u64::from_le_bytes(start))
            }
            Err(_) => return (Seal::Plain, Vec::new(), false),
        },
    };
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let Some(record) = decode_one(&mut bytes, seal) else {
            return (seal, out, false);
        };
        out.push(record);
    }
    (seal, out, true)
}

fn decode_one(bytes: &mut &[u8], seal: Seal) -> Option<Recorded> {
    let len = u32::from_le_bytes(take_array(bytes).ok()?);
    let crc = u32::from_le_bytes(take_array(bytes).ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let mut payload = take(bytes, len as usize).ok()?;
    if seal.checksum(payload) != crc {
        return None;
    }
    let id_len = u16::from_le_bytes(take_array(&mut payload).ok()?);
    if id_len == ROW_MARK {
        return Row::decode(payload).ok().map(Recorded::Row);
    }
    let id = std::str::from_utf8(take(&mut payload, usize::from(id_len)).ok()?).ok()?;
    let (seq, offset_us, data, content) = decode_chunk(&mut payload).ok()?;
    payload.is_empty().then(|| {
        Recorded::Chunk(
            id.to_string(),
            LoggedChunk {
                seq,
                offset_us,
                data: Arc::from(data),
                content,
            },
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, data: &str) -> LoggedChunk {
        LoggedChunk {
            seq,
            offset_us: seq as i64 * 10,
            data: data.into(),
            content: format!("{seq} "),
        }
    }

    /// The chunks among `recorded`, with their streams' ids.
    fn chunks(recorded: &[Recorded]) -> Vec<(String, LoggedChunk)> {
        recorded
            .iter()
            .filter_map(|r| match r {
                Recorded::Chunk(id, c) => Some((id.clone(), c.clone())),
                Recorded::Row(_) => None,
            })
            .collect()
    }

    fn seqs(recorded: &[Recorded]) -> Vec<(String, u64)> {
        chunks(recorded)
            .into_iter()
            .map(|(id, c)| (id, c.seq))
            .collect()
    }

    #[test]
    fn records_come_back_in_order_and_a_torn_tail_is_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path()).expect("start");
        // Past the segment's header.
        assert_eq!(
            j.stage("a", &chunk(1, "{\"x\":\"é\"}")),
            SEGMENT_HEADER as i64
        );
        let second = j.stage("b", &chunk(1, "{}"));
        assert!(second > 0);
        j.write().expect("write");
        j.stage("a", &chunk(2, "{}"));
        j.write().expect("write");
        drop(j);
        let back = Journal::recover(dir.path()).expect("recover");
        assert_eq!(
            seqs(&back),
            [("a".into(), 1), ("b".into(), 1), ("a".into(), 2)]
        );
        let first = &chunks(&back)[0].1;
        assert_eq!(first.data.as_ref(), "{\"x\":\"é\"}");
        assert_eq!(first.content, "1 ");
        assert_eq!(first.offset_us, 10);

        // A torn last record, and a flipped byte: replay keeps what comes before either.
        let path = segment_path(dir.path(), 0);
        let bytes = std::fs::read(&path).expect("read");
        std::fs::write(&path, &bytes[..bytes.len() - 3]).expect("cut");
        assert_eq!(
            seqs(&Journal::recover(dir.path()).expect("recover")).len(),
            2
        );
        let mut flipped = bytes.clone();
        flipped[second as usize + HEADER + 4] ^= 1;
        std::fs::write(&path, &flipped).expect("flip");
        assert_eq!(
            seqs(&Journal::recover(dir.path()).expect("recover")),
            [("a".into(), 1)]
        );
        // Garbage claiming a huge length is not believed (nor allocated).
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 12]);
        std::fs::write(&path, &huge).expect("huge");
        assert!(Journal::recover(dir.path()).expect("recover").is_empty());

        // Starting anew forgets it all.
        drop(Journal::start(dir.path()).expect("start"));
        assert!(Journal::recover(dir.path()).expect("recover").is_empty());
    }

    /// Streams' records and final statuses come back as written, in order among the chunks,
    /// and one torn or damaged is dropped with what follows it, as a chunk's would be.
    #[test]
    fn rows_come_back_among_the_chunks() {
        use crate::store::sqlite::rows::{BeginRow, FinishRow};
        let dir = tempfile::tempdir().expect("tempdir");
        let begin = Row::Begin(BeginRow {
            id: "a".into(),
            tenant: "t".into(),
            model: "m".into(),
            request: "{\"messages\":[\"é\"]}".into(),
            created: 1_700_000_000,
        });
        let finish = Row::Finish(FinishRow {
            id: "a".into(),
            status: "timed_out".into(),
            reason: Some("idle".into()),
            detail: None,
            first_token_us: Some(12),
            total_us: 345,
            usage: Some("{\"total_tokens\":3}".into()),
            chunks: 1,
            attempts: None,
        });
        let bare = Row::Finish(FinishRow {
            id: "b".into(),
            status: "completed".into(),
            reason: None,
            detail: Some("x".repeat(70_000)),
            first_token_us: None,
            total_us: 0,
            usage: None,
            chunks: 0,
            attempts: Some("[]".into()),
        });
        let mut j = Journal::start(dir.path()).expect("start");
        assert_eq!(j.stage_row(&begin), SEGMENT_HEADER as i64);
        j.stage("a", &chunk(1, "{}"));
        let third = j.stage_row(&finish);
        j.stage_row(&bare);
        j.write().expect("write");
        drop(j);
        let back = Journal::recover(dir.path()).expect("recover");
        assert_eq!(
            back,
            [
                Recorded::Row(begin.clone()),
                Recorded::Chunk("a".into(), chunk(1, "{}")),
                Recorded::Row(finish),
                Recorded::Row(bare),
            ]
        );
        let path = segment_path(dir.path(), 0);
        let mut bytes = std::fs::read(&path).expect("read");
        bytes[third as usize + HEADER + 5] ^= 1;
        std::fs::write(&path, &bytes).expect("flip");
        assert_eq!(
            Journal::recover(dir.path()).expect("recover"),
            [
                Recorded::Row(begin),
                Recorded::Chunk("a".into(), chunk(1, "{}"))
            ]
        );
    }

    #[test]
    fn segments_rotate_and_are_trimmed_once_nothing_in_them_is_needed() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path()).expect("start");
        let big = "x".repeat(1024 * 1024);
        let mut positions = Vec::new();
        for seq in 1..=9 {
            positions.push(j.stage("s", &chunk(seq, &big)));
            j.write().expect("write");
        }
        // About 1 MiB each, 4 MiB segments: the 9 records fill two segments and start a third.
        assert_eq!(segments(dir.path()).expect("list").len(), 3);
        // Each segment is synced once more after it was written to; the current one stays listed.
        let unsynced = j.unsynced();
        let listed = || unsynced.0.lock().expect("lock").len();
        assert_eq!(listed(), 3);
        unsynced.sync().expect("sync");
        assert_eq!(listed(), 1);
        let before = j.bytes_on_disk();
        // Keeping record 4 keeps the first segment; keeping record 5 frees it.
        j.trim(positions[3]).expect("trim");
        assert_eq!(segments(dir.path()).expect("list").len(), 3);
        j.trim(positions[4]).expect("trim");
        assert_eq!(segments(dir.path()).expect("list").len(), 2);
        assert!(j.bytes_on_disk() < before);
        let back = Journal::recover(dir.path()).expect("recover");
        assert_eq!(
            chunks(&back).iter().map(|(_, c)| c.seq).collect::<Vec<_>>(),
            (5..=9).collect::<Vec<_>>()
        );
    }

    /// A trimmed segment's file is written again as a later segment, and replay gives back only
    /// what that segment wrote, not the file's earlier records past it.
    #[test]
    fn a_reused_segment_gives_back_only_its_own_records() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let mut j = Journal::start(dir.path()).expect("start");
        let big = "x".repeat(1024 * 1024);
        let write = |j: &mut Journal, seq| {
            let position = j.stage("s", &chunk(seq, &big));
            j.write().expect("write");
            position
        };
        // About 1 MiB each: records 1-4 fill the first segment, 5 begins the second.
        let positions: Vec<i64> = (1..=5).map(|seq| write(&mut j, seq)).collect();
        let inode = |start| {
            std::fs::metadata(segment_path(dir.path(), start))
                .expect("segment")
                .ino()
        };
        let first = inode(0);
        j.trim(positions[4]).expect("trim");
        assert_eq!(segments(dir.path()).expect("list").len(), 1);
        // Records 5-8 fill the second segment, and the third begins in the first one's file.
        for seq in 6..=8 {
            write(&mut j, seq);
        }
        let starts = segments(dir.path()).expect("list");
        assert_eq!(starts.len(), 2);
        assert_eq!(inode(starts[1]), first, "the spare was not reused");
        let replayed = |dir: &Path| {
            let back = Journal::recover(dir).expect("recover");
            chunks(&back).iter().map(|(_, c)| c.seq).collect::<Vec<_>>()
        };
        // A crash before its first write: the file holds the first segment's header and records,
        // none of them the third's.
        assert_eq!(replayed(dir.path()), (5..=8).collect::<Vec<_>>());
        write(&mut j, 9);
        drop(j);
        // The file still holds records 2-4 past record 9; they are not the segment's.
        assert!(
            std::fs::metadata(segment_path(dir.path(), starts[1]))
                .expect("size")
                .len()
                > 3 << 20
        );
        assert_eq!(replayed(dir.path()), (5..=9).collect::<Vec<_>>());
    }

    /// A segment written before segments had a header (records sealed over their payload alone)
    /// replays as it did.
    #[test]
    fn a_segment_without_a_header_still_replays() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut bytes = Vec::new();
        encode(&mut bytes, Seal::Plain, "a", &chunk(1, "{}"));
        encode(&mut bytes, Seal::Plain, "b", &chunk(1, "{}"));
        std::fs::write(segment_path(dir.path(), 0), &bytes).expect("write");
        assert_eq!(
            seqs(&Journal::recover(dir.path()).expect("recover")),
            [("a".into(), 1), ("b".into(), 1)]
        );
    }
}
