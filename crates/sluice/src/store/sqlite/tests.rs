//! The SQLite store's behaviour: round trips, crash recovery, the writer, the journal, the WAL.
#![allow(
    clippy::disallowed_methods,
    reason = "tests spawn and time out raw futures, as outside callers do"
)]

use rusqlite::params;

use crate::store::block;
use crate::store::write::Op;
use crate::store::{Finish, NewStream, Transcript, Watermark};
use crate::stream::{Ending, Reason, Status, StreamId, Tenant};

use super::*;

/// A final record with no timings, usage or chunks.
fn bare_finish(id: &str, ending: Ending) -> Finish {
    Finish {
        id: id.into(),
        ending,
        first_token: None,
        total: Duration::ZERO,
        usage: None,
        chunks: 0,
        attempts: None,
    }
}

/// `local`'s stream `id`, which must exist.
async fn transcript(store: &crate::store::Store, id: &str) -> Transcript {
    store
        .get(Tenant("local"), StreamId(id))
        .await
        .expect("read")
        .expect("exists")
}

/// The number `sql` (a `SELECT COUNT(*)`) counts in the store's database file.
fn count(store: &crate::store::Store, sql: &str) -> i64 {
    let c = Connection::open(store.path().expect("sqlite")).expect("open db");
    c.query_row(sql, [], |r| r.get(0)).expect("count")
}

fn new_stream(id: &str) -> NewStream {
    NewStream {
        id: id.into(),
        tenant: "local".into(),
        model: "sim".into(),
        request: serde_json::json!({"model": "sim", "messages": []}).to_string(),
        key: None,
    }
}

#[tokio::test]
async fn a_stream_round_trips_with_its_chunks_in_order() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, recovered) = crate::store::Store::open(dir.path()).expect("open");
    assert_eq!(recovered, 0);
    store.begin(new_stream("s1")).await.expect("begin");
    let id: Arc<str> = Arc::from("s1");
    let watermark = Watermark::new();
    for (seq, text) in [(1, "Hel"), (2, "lo")] {
        let data = format!(r#"{{"choices":[{{"delta":{{"content":"{text}"}}}}]}}"#);
        store
            .append(
                &id,
                seq,
                Duration::from_millis(seq * 10),
                data.into(),
                text.into(),
                &watermark,
            )
            .await
            .expect("append");
        watermark.reached(seq).await;
    }
    store
        .finish(Finish {
            id: "s1".into(),
            ending: Ending::Completed,
            first_token: Some(Duration::from_millis(10)),
            total: Duration::from_millis(25),
            usage: Some(serde_json::json!({"total_tokens": 2})),
            chunks: 2,
            attempts: None,
        })
        .await
        .expect("finish");
    let t = transcript(&store, "s1").await;
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.content, "Hello");
    assert_eq!(
        t.chunks.iter().map(|c| c.seq).collect::<Vec<_>>(),
        vec![1, 2]
    );
    assert_eq!(t.chunks[1].offset_ms, 20.0);
    assert_eq!(t.timings.total_ms, Some(25.0));
    // Another tenant sees nothing.
    assert!(store
        .get(Tenant("other"), StreamId("s1"))
        .await
        .expect("read")
        .is_none());
}

/// Appends chunk `seq` of stream `id` (its text is `"{id}.{seq} "`).
async fn append_chunk(store: &crate::store::Store, id: &Arc<str>, seq: u64, watermark: &Watermark) {
    append_padded(store, id, seq, watermark, 0).await;
}

/// [`append_chunk`] with `pad` more bytes of JSON.
async fn append_padded(
    store: &crate::store::Store,
    id: &Arc<str>,
    seq: u64,
    watermark: &Watermark,
    pad: usize,
) {
    let text = format!("{id}.{seq} ");
    let data =
        serde_json::json!({"choices": [{"delta": {"content": text}}], "pad": " ".repeat(pad)})
            .to_string();
    store
        .append(
            id,
            seq,
            Duration::from_micros(seq),
            data.into(),
            text,
            watermark,
        )
        .await
        .expect("append");
}

fn expected_text(id: &str, chunks: u64) -> String {
    (1..=chunks).map(|seq| format!("{id}.{seq} ")).collect()
}

/// Every committed chunk is readable, in order and once, whether it is in the stream's run,
/// in a block, or in both at the moment of reading.
#[tokio::test]
async fn interleaved_streams_read_back_whole_at_every_point() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let ids: Vec<Arc<str>> = (0..3).map(|i| Arc::from(format!("s{i}"))).collect();
    let marks: Vec<Watermark> = ids.iter().map(|_| Watermark::new()).collect();
    for id in &ids {
        store.begin(new_stream(id)).await.expect("begin");
    }
    // 100 chunks each: three blocks and a run, interleaved across the streams.
    for seq in 1..=100u64 {
        for (id, mark) in ids.iter().zip(&marks) {
            append_chunk(&store, id, seq, mark).await;
        }
        if seq % 7 == 0 || seq == 32 || seq == 33 {
            marks[0].reached(seq).await;
            let state = store
                .state(Tenant("local"), StreamId("s0"))
                .await
                .expect("state")
                .expect("s0");
            assert!(state.last_seq >= seq);
            let all = store
                .chunks_after("s0", 0, usize::MAX, usize::MAX)
                .await
                .expect("read");
            assert!(all.len() as u64 >= seq);
            assert!(all.iter().map(|c| c.0).eq(1..=all.len() as u64));
            let tail = store
                .chunks_after("s0", seq - 5, 3, usize::MAX)
                .await
                .expect("read");
            assert_eq!(
                tail.iter().map(|c| c.0).collect::<Vec<_>>(),
                vec![seq - 4, seq - 3, seq - 2]
            );
        }
    }
    for (id, mark) in ids.iter().zip(&marks) {
        mark.reached(100).await;
        let t = transcript(&store, id).await;
        assert_eq!(t.content, expected_text(id, 100), "{id} while streaming");
    }
    store
        .finish(bare_finish("s1", Ending::Completed))
        .await
        .expect("finish");
    let t = transcript(&store, "s1").await;
    assert_eq!(t.content, expected_text("s1", 100));
    assert_eq!(t.chunks[99].offset_ms, 0.1);
    assert_eq!(
        store
            .chunks_after("s1", 98, 10, usize::MAX)
            .await
            .expect("read")
            .iter()
            .map(|c| c.0)
            .collect::<Vec<_>>(),
        vec![99, 100]
    );
}

/// The chunks in the journal, read back as opening would.
fn journaled(dir: &std::path::Path) -> Vec<(String, block::LoggedChunk)> {
    journal::Journal::recover(&dir.join("journal"))
        .expect("recover")
        .into_iter()
        .filter_map(|r| match r {
            journal::Recorded::Chunk(id, chunk) => Some((id, chunk)),
            journal::Recorded::Row(_) => None,
        })
        .collect()
}

/// A process that dies leaves chunks only in the journal; opening folds them into blocks.
#[tokio::test]
async fn chunks_only_in_the_journal_survive_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (store, _) = crate::store::Store::open(dir.path()).expect("open");
        store.begin(new_stream("a")).await.expect("begin");
        let id: Arc<str> = Arc::from("a");
        let mark = Watermark::new();
        for seq in 1..=45 {
            append_chunk(&store, &id, seq, &mark).await;
        }
        mark.reached(45).await;
        // Dropped with 13 chunks in a run: like a kill, nothing more is written.
        assert_eq!(journaled(dir.path()).len(), 45);
    }
    // A chunk of a stream whose record never made it (its batch failed) is not folded: a
    // segment after the others holds it.
    {
        let start = 1u64 << 40;
        let mut segment = Vec::new();
        journal::encode_header(&mut segment, start);
        let ghost = block::LoggedChunk {
            seq: 1,
            offset_us: 0,
            data: "{}".into(),
            content: String::new(),
        };
        journal::encode(&mut segment, journal::Seal::Salted(start), "ghost", &ghost);
        std::fs::write(
            dir.path()
                .join("journal")
                .join(format!("{start:020}.journal")),
            &segment,
        )
        .expect("write");
        let replayed = journal::Journal::recover(&dir.path().join("journal")).expect("recover");
        assert!(replayed
            .iter()
            .any(|r| matches!(r, journal::Recorded::Chunk(id, _) if id == "ghost")));
    }
    let (store, recovered) = crate::store::Store::open(dir.path()).expect("reopen");
    assert_eq!(recovered, 1);
    let t = transcript(&store, "a").await;
    assert_eq!(
        (t.status, t.reason),
        (Status::Interrupted, Some(Reason::Crash))
    );
    assert_eq!(t.content, expected_text("a", 45));
    assert!(
        journaled(dir.path()).is_empty(),
        "the journal is emptied once folded"
    );
    let ghosts = count(
        &store,
        "SELECT COUNT(*) FROM chunk_blocks WHERE stream_id = 'ghost'",
    );
    assert_eq!(ghosts, 0);
    // Opening again changes nothing.
    drop(store);
    let (store, _) = crate::store::Store::open(dir.path()).expect("reopen");
    let t = transcript(&store, "a").await;
    assert_eq!(t.content, expected_text("a", 45));
}

/// Under writes that never pause, the WAL still rewinds (a passive checkpoint alone never
/// catches up with such a writer, and the WAL would grow with everything written).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_wal_stays_bounded_under_writes_that_never_pause() {
    let dir = tempfile::tempdir().expect("tempdir");
    let when = Checkpoints {
        every: Duration::from_millis(5),
        rewind_frames: 64,
    };
    let (sqlite, _) = SqliteStore::open_with(dir.path(), when).expect("open");
    let path = sqlite.path().to_path_buf();
    let store = crate::store::Store::from_sqlite(sqlite);
    let ids: Vec<Arc<str>> = (0..8).map(|i| Arc::from(format!("w{i}"))).collect();
    for id in &ids {
        store.begin(new_stream(id)).await.expect("begin");
    }
    let mark = Watermark::new();
    let data: Arc<str> = Arc::from(format!("\"{}\"", "x".repeat(1000)));
    let chunks: u64 = 20_000;
    for seq in 1..=chunks {
        // Never waits for a commit: the writer's queue is never empty.
        for id in &ids {
            store
                .append(id, seq, Duration::ZERO, data.clone(), String::new(), &mark)
                .await
                .expect("append");
        }
    }
    mark.reached(chunks).await;
    let written = chunks * ids.len() as u64 * 1000;
    let wal = std::fs::metadata(path.with_extension("db-wal"))
        .expect("wal")
        .len();
    assert!(
        wal < written / 4,
        "the WAL is {wal} bytes after {written} bytes of chunks"
    );
}

/// A write queued just as the writer stops, by a sender that saw it still running (so started
/// no other), is committed all the same: the writer looks once more before it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_slips_in_as_the_writer_stops_is_committed() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = SqliteStore::open(dir.path()).expect("open");
    let writer = store.writer.clone();
    // A job is running (a sender starts no other) and is about to stop.
    writer
        .running
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (ack, committed) = tokio::sync::oneshot::channel();
    let ack = Mutex::new(Some(ack));
    let job = tokio::task::spawn_blocking(move || {
        writer.drain_from(Vec::new(), || {
            if let Some(ack) = ack.lock().unwrap_or_else(PoisonError::into_inner).take() {
                writer
                    .tx
                    .try_send(Op::Flush(ack))
                    .expect("room in the queue");
            }
        })
    });
    job.await.expect("the job ends");
    let done = tokio::time::timeout(Duration::from_secs(10), committed).await;
    assert!(
        matches!(done, Ok(Ok(Ok(())))),
        "the write was left waiting for a writer"
    );
}

/// The writer stops whenever its queue is empty and the next write starts it again: under
/// many writers starting and stopping it, no write is left waiting.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_write_is_stranded_while_the_writer_starts_and_stops() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let writers: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                for _ in 0..1500 {
                    store.flush().await.expect("flush");
                }
            })
        })
        .collect();
    let all = futures_util::future::join_all(writers);
    // Generous: the work takes well under a second; a stranded write never finishes.
    let done = tokio::time::timeout(Duration::from_secs(60), all).await;
    assert!(done.is_ok(), "a write was left waiting for a writer");
}

/// Databases of earlier versions kept one row per chunk (`chunks`), or chunks in a log table
/// (`chunk_log`); opening moves them into blocks and drops those tables.
#[tokio::test]
async fn chunks_of_the_earlier_layout_are_moved_into_blocks() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let c = Connection::open(dir.path().join("sluice.db")).expect("create");
        c.execute_batch(
                "CREATE TABLE chunks (stream_id TEXT NOT NULL, seq INTEGER NOT NULL, offset_us INTEGER NOT NULL,
                     data TEXT NOT NULL, content TEXT NOT NULL, PRIMARY KEY (stream_id, seq)) WITHOUT ROWID;
                 CREATE TABLE streams (seq INTEGER PRIMARY KEY AUTOINCREMENT, id TEXT NOT NULL UNIQUE,
                     tenant TEXT NOT NULL, model TEXT NOT NULL, request TEXT NOT NULL, status TEXT NOT NULL,
                     reason TEXT, detail TEXT, created INTEGER NOT NULL, first_token_us INTEGER,
                     total_us INTEGER, usage TEXT, chunk_count INTEGER NOT NULL DEFAULT 0);
                 INSERT INTO streams (id, tenant, model, request, status, created, chunk_count)
                     VALUES ('old', 'local', 'sim', '{}', 'completed', 0, 40);
                 CREATE TABLE chunk_log (id INTEGER PRIMARY KEY, stream_id TEXT NOT NULL,
                     seq INTEGER NOT NULL, offset_us INTEGER NOT NULL, data TEXT NOT NULL,
                     content TEXT NOT NULL);
                 INSERT INTO streams (id, tenant, model, request, status, created)
                     VALUES ('logged', 'local', 'sim', '{}', 'streaming', 0);",
            )
            .expect("old schema");
        for seq in (1..=40).rev() {
            c.execute(
                "INSERT INTO chunks VALUES ('old', ?1, ?1, '{}', ?2)",
                params![seq, format!("old.{seq} ")],
            )
            .expect("old chunk");
        }
        for seq in 1..=5 {
            c.execute(
                "INSERT INTO chunk_log (stream_id, seq, offset_us, data, content) VALUES ('logged', ?1, ?1, '{}', ?2)",
                params![seq, format!("logged.{seq} ")],
            )
            .expect("logged chunk");
        }
    }
    let (store, recovered) = crate::store::Store::open(dir.path()).expect("open");
    assert_eq!(recovered, 1);
    let t = transcript(&store, "old").await;
    assert_eq!(t.status, Status::Completed);
    assert_eq!(t.content, expected_text("old", 40));
    let t = transcript(&store, "logged").await;
    assert_eq!(
        (t.status, t.reason),
        (Status::Interrupted, Some(Reason::Crash))
    );
    assert_eq!(t.content, expected_text("logged", 5));
    let tables = count(
        &store,
        "SELECT COUNT(*) FROM sqlite_master WHERE name IN ('chunks', 'chunk_log')",
    );
    assert_eq!(tables, 0);
}

/// The journal is trimmed as runs become blocks, and a quiet stream's run is written as a block
/// before it can hold the journal back for long.
#[tokio::test]
async fn the_journal_stays_short_and_a_quiet_stream_does_not_pin_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let quiet: Arc<str> = Arc::from("quiet");
    let busy: Arc<str> = Arc::from("busy");
    let (quiet_mark, busy_mark) = (Watermark::new(), Watermark::new());
    store.begin(new_stream(&quiet)).await.expect("begin");
    store.begin(new_stream(&busy)).await.expect("begin");
    append_chunk(&store, &quiet, 1, &quiet_mark).await;
    // About 4 KiB per chunk: well past the span and several looks at the journal's head.
    let pad = 4000;
    let total = (block::LOG_SPAN as u64 / pad as u64) + 3 * block::LOG_CHECK_EVERY as u64;
    for seq in 1..=total {
        append_padded(&store, &busy, seq, &busy_mark, pad).await;
    }
    busy_mark.reached(total).await;
    let written = total * (pad as u64 + 100);
    let bound = block::LOG_SPAN as u64
        + journal::SEGMENT_BYTES
        + block::LOG_CHECK_EVERY as u64 * (pad as u64 + 100);
    let quiet_blocks = || {
        count(
            &store,
            "SELECT COUNT(*) FROM chunk_blocks WHERE stream_id = 'quiet'",
        )
    };
    // The fold writes blocks and trims the journal in the background: what it has done by the
    // time it has caught up.
    let mut on_disk = journal_on_disk(dir.path());
    for _ in 0..10_000 {
        if on_disk <= bound && on_disk < written / 2 && quiet_blocks() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        on_disk = journal_on_disk(dir.path());
    }
    assert!(
        on_disk <= bound && on_disk < written / 2,
        "{on_disk} journal bytes on disk after {written} written"
    );
    assert_eq!(quiet_blocks(), 1, "the quiet run was written as a block");
    let t = transcript(&store, "quiet").await;
    assert_eq!(t.content, expected_text("quiet", 1));
    append_chunk(&store, &quiet, 2, &quiet_mark).await;
    quiet_mark.reached(2).await;
    let t = transcript(&store, "quiet").await;
    assert_eq!(t.content, expected_text("quiet", 2));
    let busy_chunks = store
        .chunks_after("busy", 0, usize::MAX, usize::MAX)
        .await
        .expect("read");
    assert!(busy_chunks.iter().map(|c| c.0).eq(1..=total));
}

// On a paused clock: the rows wait however slow the machine (their age rule is tokio's clock).
#[tokio::test(start_paused = true)]
async fn reopening_marks_open_streams_interrupted_by_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let (store, _) = crate::store::Store::open(dir.path()).expect("open");
        store.begin(new_stream("open")).await.expect("begin");
        store.begin(new_stream("done")).await.expect("begin");
        store
            .finish(bare_finish("done", Ending::Completed))
            .await
            .expect("finish");
    }
    // The records and the final status were acked from the journal: the database has none
    // of them yet, and opening folds them in.
    let db = Connection::open(dir.path().join("sluice.db")).expect("open db");
    let rows: i64 = db
        .query_row("SELECT COUNT(*) FROM streams", [], |r| r.get(0))
        .expect("count");
    assert_eq!(rows, 0);
    drop(db);
    let (store, recovered) = crate::store::Store::open(dir.path()).expect("reopen");
    assert_eq!(recovered, 1);
    let t = transcript(&store, "open").await;
    assert_eq!(
        (t.status, t.reason),
        (Status::Interrupted, Some(Reason::Crash))
    );
    let t = transcript(&store, "done").await;
    assert_eq!(t.status, Status::Completed);
}

/// A stream's record and final status wait in the journal to be written into the database with
/// other streams'; a read has them written first, so no reader misses one, and so does a
/// deletion.
// On a paused clock: the rows wait however slow the machine (their age rule is tokio's clock).
#[tokio::test(start_paused = true)]
async fn records_and_final_statuses_reach_the_database_before_any_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let in_db = |id: &str| {
        count(
            &store,
            &format!("SELECT COUNT(*) FROM streams WHERE id = '{id}'"),
        )
    };
    store.begin(new_stream("a")).await.expect("begin");
    let id: Arc<str> = Arc::from("a");
    let mark = Watermark::new();
    append_chunk(&store, &id, 1, &mark).await;
    mark.reached(1).await;
    assert_eq!(in_db("a"), 0, "a lone record is written with others");
    let state = store
        .state(Tenant("local"), StreamId("a"))
        .await
        .expect("state")
        .expect("a stream that was begun");
    assert_eq!(state.status, Status::Streaming);
    assert_eq!(in_db("a"), 1);
    store
        .finish(bare_finish("a", Ending::Completed))
        .await
        .expect("finish");
    let status = || {
        Connection::open(store.path().expect("sqlite"))
            .expect("open db")
            .query_row("SELECT status FROM streams WHERE id = 'a'", [], |r| {
                r.get::<_, String>(0)
            })
            .expect("status")
    };
    assert_eq!(
        status(),
        "streaming",
        "a lone final status is written with others"
    );
    let t = transcript(&store, "a").await;
    assert_eq!(
        (t.status, t.content),
        (Status::Completed, expected_text("a", 1))
    );
    assert_eq!(status(), "completed");
    // Deleting a stream whose record and status wait: written first, then deleted.
    store.begin(new_stream("b")).await.expect("begin");
    store
        .finish(bare_finish("b", Ending::Completed))
        .await
        .expect("finish");
    assert_eq!(in_db("b"), 0);
    store
        .delete(Tenant("local"), StreamId("b"))
        .await
        .expect("delete");
    assert!(store
        .get(Tenant("local"), StreamId("b"))
        .await
        .expect("get")
        .is_none());
}

/// However few, rows that have waited `INGEST_AFTER` are written with the next commit (by a
/// blocking job), without any read asking.
#[tokio::test(start_paused = true)]
async fn waiting_rows_are_written_once_the_first_has_waited_long_enough() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let in_db = || count(&store, "SELECT COUNT(*) FROM streams");
    store.begin(new_stream("old")).await.expect("begin");
    tokio::time::advance(rows::INGEST_AFTER / 2).await;
    store.begin(new_stream("younger")).await.expect("begin");
    assert_eq!(
        in_db(),
        0,
        "not yet: the first has waited half as long as it may"
    );
    tokio::time::advance(rows::INGEST_AFTER / 2).await;
    store.begin(new_stream("new")).await.expect("begin");
    for _ in 0..10_000 {
        if in_db() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(in_db(), 3);
}

/// Without any read, the rows are written once enough of them wait: many streams' in one
/// transaction, by a blocking job rather than by the stream whose write made them due.
#[tokio::test]
async fn rows_are_written_many_streams_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let streams = rows::INGEST_ROWS / 2;
    for i in 0..streams {
        let id = format!("s{i}");
        store.begin(new_stream(&id)).await.expect("begin");
        store
            .finish(bare_finish(&id, Ending::Completed))
            .await
            .expect("finish");
    }
    // The last final status made them due (or the first had waited long enough before): the
    // commit that acked it, on this task, handed them to a blocking job, which writes them
    // without any read asking.
    let written = || {
        count(
            &store,
            "SELECT COUNT(*) FROM streams WHERE status = 'completed'",
        )
    };
    for _ in 0..10_000 {
        if written() == streams as i64 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(written(), streams as i64);
}

/// Bytes in the journal's segments under `data_dir`; its spare files (segments kept to be
/// written again) are counted apart and may be no more than `journal::SPARES`.
fn journal_on_disk(data_dir: &std::path::Path) -> u64 {
    let (mut segments, mut spares) = (0, 0);
    for entry in std::fs::read_dir(data_dir.join("journal")).expect("list") {
        let path = entry.expect("entry").path();
        match path.extension().and_then(|e| e.to_str()) {
            Some("journal") => segments += std::fs::metadata(&path).expect("size").len(),
            Some("spare") => spares += 1,
            other => panic!("{other:?} in the journal"),
        }
    }
    assert!(spares <= journal::SPARES, "{spares} spare segments");
    segments
}

/// Streams with no chunks (transcripts off) put only their records and final statuses in the
/// journal; once those are in the database, the journal is trimmed all the same.
#[tokio::test]
async fn a_journal_of_rows_alone_stays_short() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    let request = "x".repeat(8 * 1024);
    let streams = block::LOG_CHECK_EVERY as usize / 2 + 100;
    for i in 0..streams {
        let id = format!("s{i}");
        let mut stream = new_stream(&id);
        stream.request.clone_from(&request);
        store.begin(stream).await.expect("begin");
        store
            .finish(bare_finish(&id, Ending::Completed))
            .await
            .expect("finish");
    }
    let written = (streams * request.len()) as u64;
    // Trimmed down to what the rows that still wait need (how many wait at the trim depends on
    // when the fold got to them), by the fold, in the background: without the trim, all of it
    // stays.
    let mut on_disk = journal_on_disk(dir.path());
    for _ in 0..10_000 {
        if on_disk < written / 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
        on_disk = journal_on_disk(dir.path());
    }
    assert!(
        on_disk < written / 2,
        "{on_disk} journal bytes on disk after {written} written"
    );
    store.flush().await.expect("flush");
    assert_eq!(
        count(&store, "SELECT COUNT(*) FROM streams"),
        streams as i64
    );
}

#[tokio::test]
async fn a_final_status_is_written_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    store.begin(new_stream("s")).await.expect("begin");
    store
        .finish(bare_finish("s", Ending::abnormal(Reason::Idle, "idle")))
        .await
        .expect("finish");
    store
        .finish(bare_finish("s", Ending::Completed))
        .await
        .expect("finish");
    let t = transcript(&store, "s").await;
    assert_eq!(t.status, Status::TimedOut);
}

#[tokio::test]
async fn list_is_newest_first_and_paged() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    for i in 0..5 {
        store
            .begin(new_stream(&format!("s{i}")))
            .await
            .expect("begin");
    }
    let (page, more) = store.list(Tenant("local"), 2, None).await.expect("list");
    assert_eq!(
        page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec!["s4", "s3"]
    );
    assert!(more);
    let (page, more) = store
        .list(Tenant("local"), 10, Some("s3".into()))
        .await
        .expect("list");
    assert_eq!(
        page.iter().map(|s| s.id.as_str()).collect::<Vec<_>>(),
        vec!["s2", "s1", "s0"]
    );
    assert!(!more);
    assert!(store
        .list(Tenant("other"), 10, None)
        .await
        .expect("list")
        .0
        .is_empty());
}

/// A stream's record writes only its own rows (no `sqlite_sequence`, which AUTOINCREMENT
/// would update with every record); a newest stream deleted leaves its `seq` free for the next
/// one, and the list and its cursors are none the worse.
#[tokio::test]
async fn a_deleted_newest_streams_place_is_taken_again_without_harm() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (store, _) = crate::store::Store::open(dir.path()).expect("open");
    for id in ["a", "b", "c"] {
        store.begin(new_stream(id)).await.expect("begin");
    }
    store
        .finish(bare_finish("c", Ending::Completed))
        .await
        .expect("finish");
    store
        .delete(Tenant("local"), StreamId("c"))
        .await
        .expect("delete");
    store.begin(new_stream("d")).await.expect("begin");
    let ids =
        |page: Vec<crate::store::StreamSummary>| page.into_iter().map(|s| s.id).collect::<Vec<_>>();
    let (page, _) = store.list(Tenant("local"), 10, None).await.expect("list");
    assert_eq!(ids(page), vec!["d", "b", "a"]);
    let (page, more) = store
        .list(Tenant("local"), 10, Some("d".into()))
        .await
        .expect("list");
    assert_eq!(ids(page), vec!["b", "a"]);
    assert!(!more);
    assert_eq!(
        count(
            &store,
            "SELECT COUNT(*) FROM sqlite_master WHERE name = 'sqlite_sequence'"
        ),
        0,
        "a record wrote sqlite_sequence"
    );
}

/// A chunk that came after a pause, queued while the writer is idle, is committed by the
/// caller before `append` returns: no thread is woken for it. A chunk of a burst waits for its
/// relay to commit it with the rest of the burst (`commit_waiting`): a burst of two or more at
/// once, on the caller's thread; a lone chunk, right after a commit, by the writer's job.
#[tokio::test]
async fn a_chunk_after_a_pause_is_committed_where_it_is_appended_and_a_burst_when_its_relay_waits()
{
    let dir = tempfile::tempdir().expect("tempdir");
    let (sqlite, _) = SqliteStore::open(dir.path()).expect("open");
    let store = crate::store::Store::from_sqlite(sqlite);
    store.begin(new_stream("p1")).await.expect("begin");
    let id: Arc<str> = Arc::from("p1");
    let mark = Watermark::new();
    for seq in 1..=3 {
        let arrival = crate::store::Arrival {
            offset: Duration::from_millis(seq),
            after_pause: true,
            caller_commits: true,
        };
        store
            .append(&id, seq, arrival, chunk_json(seq), String::new(), &mark)
            .await
            .expect("append");
        assert!(
            mark.is_stored(seq),
            "chunk {seq} was not committed when append returned"
        );
    }
    append_relayed(&store, &id, &mark, 4).await;
    append_relayed(&store, &id, &mark, 5).await;
    assert_eq!(mark.get(), 3, "a burst's chunks wait for their relay");
    store.commit_waiting(2);
    assert!(
        mark.is_stored(5),
        "a burst was not committed when its relay was about to wait"
    );
    // Right after that commit the writer is not quiet: a lone chunk goes to its job.
    append_relayed(&store, &id, &mark, 6).await;
    store.commit_waiting(1);
    let reached = tokio::time::timeout(Duration::from_secs(10), mark.reached(6)).await;
    assert!(reached.is_ok(), "a lone chunk was never committed");
    // Nothing waiting, nothing to do.
    store.commit_waiting(0);
    // A chunk whose caller does not commit it is committed without its help.
    store
        .append(
            &id,
            7,
            Duration::from_millis(7),
            chunk_json(7),
            String::new(),
            &mark,
        )
        .await
        .expect("append");
    let reached = tokio::time::timeout(Duration::from_secs(10), mark.reached(7)).await;
    assert!(reached.is_ok(), "a chunk of a burst was never committed");
    let t = transcript(&store, "p1").await;
    assert_eq!(t.chunks.len(), 7);
}

/// A relay's last burst is committed with its stream's final status: the status's write takes
/// the chunks left waiting before it, and they are stored once it returns.
#[tokio::test]
async fn a_final_status_takes_the_chunks_left_waiting_before_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sqlite, _) = SqliteStore::open(dir.path()).expect("open");
    let store = crate::store::Store::from_sqlite(sqlite);
    store.begin(new_stream("e1")).await.expect("begin");
    let id: Arc<str> = Arc::from("e1");
    let mark = Watermark::new();
    for seq in 1..=3 {
        append_relayed(&store, &id, &mark, seq).await;
    }
    assert_eq!(mark.get(), 0, "the burst waits for its relay");
    let mut finish = bare_finish("e1", Ending::Completed);
    finish.chunks = 3;
    store.finish(finish).await.expect("finish");
    assert!(
        mark.is_stored(3),
        "the final status was written before the chunks"
    );
    let t = transcript(&store, "e1").await;
    assert_eq!((t.chunks.len(), t.status), (3, Status::Completed));
}

/// Appends chunk `seq` of `id` as a relay appends a later chunk (see [`relayed`]).
async fn append_relayed(store: &crate::store::Store, id: &Arc<str>, mark: &Watermark, seq: u64) {
    store
        .append(id, seq, relayed(seq), chunk_json(seq), String::new(), mark)
        .await
        .expect("append");
}

/// How a relay appends a later chunk: it commits it with the rest of its burst.
fn relayed(seq: u64) -> crate::store::Arrival {
    crate::store::Arrival {
        offset: Duration::from_millis(seq),
        after_pause: false,
        caller_commits: true,
    }
}

/// A stream's lone later chunk (not after a pause, not in a burst) is committed where its relay
/// commits what it left waiting if the writer has been quiet for `QUIET`: a lone slow stream's
/// chunks wake no thread. Right after a commit the writer is busy, and such a chunk goes to the
/// blocking job.
#[tokio::test]
async fn a_lone_later_chunk_is_committed_by_its_relay_when_the_writer_is_quiet() {
    use super::writer::{is_quiet, QUIET};
    let dir = tempfile::tempdir().expect("tempdir");
    let (sqlite, _) = SqliteStore::open(dir.path()).expect("open");
    let store = crate::store::Store::from_sqlite(sqlite);
    store.begin(new_stream("q1")).await.expect("begin");
    let id: Arc<str> = Arc::from("q1");
    let mark = Watermark::new();
    for seq in 1..=3 {
        // Real time, not the test clock: the writer times itself with `Instant`. Sleeping at
        // least `QUIET` makes it quiet whatever the machine's speed.
        std::thread::sleep(QUIET);
        append_relayed(&store, &id, &mark, seq).await;
        assert!(
            !mark.is_stored(seq),
            "chunk {seq} did not wait for its relay"
        );
        store.commit_waiting(1);
        assert!(
            mark.is_stored(seq),
            "chunk {seq} was not committed when its relay was about to wait"
        );
    }
    let quiet = u64::try_from(QUIET.as_nanos()).expect("QUIET fits");
    assert!(!is_quiet(1_000, 1_000), "quiet right after a commit");
    assert!(!is_quiet(1_000, 1_000 + quiet - 1));
    assert!(is_quiet(1_000, 1_000 + quiet));
    assert!(!is_quiet(u64::MAX, 0), "a commit after now is not quiet");
}

/// Chunks left waiting for their relays never hold the queue up: a relay whose append finds the
/// queue full starts the writer's job before it waits for room, even if every write in it is
/// a chunk whose relay has not yet had it committed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_full_of_waiting_chunks_is_emptied_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sqlite, _) = SqliteStore::open(dir.path()).expect("open");
    let store = crate::store::Store::from_sqlite(sqlite);
    store.begin(new_stream("f1")).await.expect("begin");
    let id: Arc<str> = Arc::from("f1");
    let mark = Watermark::new();
    let last = crate::store::write::WRITE_QUEUE as u64 + 10;
    let appended = tokio::time::timeout(Duration::from_secs(30), async {
        for seq in 1..=last {
            append_relayed(&store, &id, &mark, seq).await;
        }
    })
    .await;
    assert!(appended.is_ok(), "an append waited for room forever");
    let full = crate::store::write::WRITE_QUEUE as u64;
    let emptied = tokio::time::timeout(Duration::from_secs(30), mark.reached(full)).await;
    assert!(emptied.is_ok(), "the full queue was not emptied");
    store.commit_waiting(10);
    mark.reached(last).await;
    assert_eq!(transcript(&store, "f1").await.chunks.len(), last as usize);
}

/// A store whose checkpoint thread makes no pass of its own during a test, with a pass the test
/// runs on a connection of its own, the writer's gate and the WAL's path.
struct Passes {
    store: crate::store::Store,
    pass: super::checkpoint::Pass,
    gate: Arc<Mutex<()>>,
    wal: std::path::PathBuf,
}

impl Passes {
    fn open(dir: &std::path::Path) -> Self {
        let when = Checkpoints {
            every: Duration::from_secs(3600),
            rewind_frames: 4096,
        };
        let (sqlite, _) = SqliteStore::open_with(dir, when).expect("open");
        let connection = Connection::open(sqlite.path()).expect("open");
        Self {
            pass: super::checkpoint::Pass::new(connection, 4096),
            gate: sqlite.writer.gate.clone(),
            wal: sqlite.path().with_extension("db-wal"),
            store: crate::store::Store::from_sqlite(sqlite),
        }
    }

    /// Records stream `id`: its record reaches the database (and the WAL) with the rows
    /// written at a flush.
    async fn record(&self, id: &str) {
        self.store.begin(new_stream(id)).await.expect("begin");
        self.store.flush().await.expect("flush");
    }

    /// How often the WAL has restarted: its header's checkpoint sequence number (bytes 12..16).
    fn restarts(&self) -> u32 {
        let header = std::fs::read(&self.wal).expect("read the WAL");
        u32::from_be_bytes(header[12..16].try_into().expect("a WAL header"))
    }
}

/// The checkpoint thread restarts the WAL itself once every frame is copied, so the writer's
/// next batch is appended to it instead of restarting it (a restart syncs the WAL's new header
/// to disk: a few hundred microseconds a stream's commit would pay, on a runtime thread); and a
/// pass with nothing new to copy does nothing.
#[tokio::test]
async fn the_checkpoint_restarts_the_wal_so_that_a_commit_does_not() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Passes::open(dir.path());
    p.record("r1").await;
    let before = p.restarts();
    assert!(p.pass.run(&p.gate).expect("pass").is_some());
    assert_eq!(p.restarts(), before + 1, "the pass did not restart the WAL");
    p.record("r2").await;
    assert_eq!(
        p.restarts(),
        before + 1,
        "the writer's commit restarted the WAL"
    );
    assert!(p.pass.run(&p.gate).expect("pass").is_some());
    assert_eq!(p.restarts(), before + 2, "the pass did not restart the WAL");
    assert_eq!(
        p.pass.run(&p.gate).expect("pass"),
        None,
        "nothing new, yet a pass"
    );
    assert_eq!(p.restarts(), before + 2);
    for id in ["r1", "r2"] {
        assert!(p
            .store
            .get(Tenant("local"), StreamId(id))
            .await
            .expect("get")
            .is_some());
    }
}

/// A commit that the pass's first checkpoint did not see, though that checkpoint copied every
/// frame it saw, does not keep the WAL from restarting: the pass checkpoints again under the
/// gate before its restart. (It did not: the restart's row was then appended to a WAL not wholly
/// copied, which does not restart it; under writes that never pause, the writer commits during
/// every pass's first checkpoint, and the WAL grew with everything written.)
#[tokio::test]
async fn a_commit_the_first_checkpoint_missed_does_not_keep_the_wal_from_restarting() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut p = Passes::open(dir.path());
    let other = Connection::open(p.wal.with_extension("db")).expect("open");
    p.record("c1").await;
    // A writer whose transaction began before the checkpoint (as one running during it did):
    // its commit is appended to the WAL, which it cannot restart.
    other.execute_batch("BEGIN").expect("begin");
    let _: i64 = other
        .query_row("SELECT COUNT(*) FROM streams", [], |r| r.get(0))
        .expect("read");
    let before = p.restarts();
    let frames = p
        .pass
        .run_with(&p.gate, || {
            other
                .execute(
                    "INSERT INTO wal_restarts (id, n) VALUES (1, 1)
                     ON CONFLICT (id) DO UPDATE SET n = n + 1",
                    [],
                )
                .expect("a write the first checkpoint missed");
            other.execute_batch("COMMIT").expect("commit");
        })
        .expect("pass");
    assert!(frames.is_some());
    assert_eq!(p.restarts(), before + 1, "the pass did not restart the WAL");
}

/// A stream's writes are committed (journaled and acked) while the checkpoint thread holds the
/// gate, and while the fold holds the connection for a transaction: no commit waits for SQLite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(
    clippy::await_holding_lock,
    reason = "the test is the checkpoint thread and the fold holding their locks while writes come"
)]
async fn a_stream_is_committed_while_sqlite_is_busy() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (sqlite, _) = SqliteStore::open(dir.path()).expect("open");
    let writer = sqlite.writer.clone();
    let store = crate::store::Store::from_sqlite(sqlite);
    let gate = writer.gate.lock().unwrap_or_else(PoisonError::into_inner);
    let db = writer.db.lock().unwrap_or_else(PoisonError::into_inner);
    let arrival = crate::store::Arrival {
        offset: Duration::ZERO,
        after_pause: true,
        caller_commits: false,
    };
    // In a task of its own: a write that waited for either lock would hold up a runtime
    // thread, not this test.
    let mark = Watermark::new();
    let stream = {
        let (store, mark) = (store.clone(), mark.clone());
        tokio::spawn(async move {
            store.begin(new_stream("g1")).await?;
            let id: Arc<str> = Arc::from("g1");
            store
                .append(&id, 1, arrival, chunk_json(1), String::new(), &mark)
                .await?;
            store.finish(bare_finish("g1", Ending::Completed)).await
        })
    };
    let done = tokio::time::timeout(Duration::from_secs(10), stream).await;
    assert!(matches!(done, Ok(Ok(Ok(())))), "a write waited for SQLite");
    assert!(mark.is_stored(1), "the chunk is not committed");
    drop(db);
    drop(gate);
    // And SQLite gets it all once it is free.
    let t = tokio::time::timeout(Duration::from_secs(10), transcript(&store, "g1"))
        .await
        .expect("the transcript is read");
    assert_eq!((t.status, t.chunks.len()), (Status::Completed, 1));
}

/// The writes a stream makes as it runs may be committed on a runtime thread; deleting and
/// expiring streams (any number of rows) never are.
#[test]
fn only_a_streams_own_writes_are_committed_on_the_callers_thread() {
    let (ack, _) = tokio::sync::oneshot::channel();
    assert!(!Op::Expire { before: 0, ack }.commits_here());
    let (ack, _) = tokio::sync::oneshot::channel();
    let delete = Op::Delete {
        tenant: "local".into(),
        id: "s1".into(),
        ack,
    };
    assert!(!delete.commits_here());
    let (ack, _) = tokio::sync::oneshot::channel();
    assert!(Op::Begin(new_stream("s1"), ack).commits_here());
    let (ack, _) = tokio::sync::oneshot::channel();
    assert!(Op::Finish(bare_finish("s1", Ending::Completed), ack).commits_here());
    let append = |promptly| Op::Append {
        id: Arc::from("s1"),
        seq: 2,
        offset: Duration::ZERO,
        data: chunk_json(2),
        content: String::new(),
        watermark: Watermark::new(),
        promptly,
        caller_commits: false,
    };
    assert!(append(true).commits_here());
    assert!(!append(false).commits_here());
}

/// A chunk's JSON.
fn chunk_json(seq: u64) -> Arc<str> {
    Arc::from(serde_json::json!({"choices": [{"delta": {"content": seq.to_string()}}]}).to_string())
}

/// What the writer's batches are applied with, for tests that apply them and the fold's passes
/// one at a time: a database under `dir` with the schema, the checkpoint's gate, the streams'
/// runs, and the journal with its state.
struct BatchWriter {
    db: Mutex<super::writer::Db>,
    gate: Mutex<()>,
    runs: Mutex<block::Runs>,
    log: LogState,
}

fn batch_writer(dir: &std::path::Path) -> BatchWriter {
    let conn = Connection::open(dir.join("sluice.db")).expect("open db");
    conn.execute_batch(SCHEMA).expect("schema");
    BatchWriter {
        db: Mutex::new(super::writer::Db {
            conn,
            held: Vec::new(),
        }),
        gate: Mutex::new(()),
        runs: Mutex::new(block::Runs::default()),
        log: LogState::new(Journal::start(&dir.join("journal")).expect("journal")),
    }
}

impl BatchWriter {
    /// Commits `batch` as a committer does.
    fn apply(&mut self, mut batch: Vec<Op>) {
        super::writer::apply(&self.db, &self.gate, &mut batch, &self.runs, &mut self.log)
            .expect("apply");
        crate::store::write::settle(&mut batch, &Ok(()));
    }

    /// One pass of the fold, as its job makes it; acks the ops it did.
    fn fold(&mut self) -> Result<(), StoreError> {
        let work = self.log.take_fold_work(tokio::time::Instant::now());
        let mut db = self.db.lock().expect("db");
        let result = super::writer::fold(&mut db, &self.runs, &work);
        let work = match result {
            Ok(()) => work,
            Err(_) => work.keep_rows(&mut db),
        };
        drop(db);
        let mut acks = self.log.after_fold(&self.runs, work, result.is_ok());
        crate::store::write::settle(&mut acks, &result);
        result
    }

    fn count(&self, sql: &str) -> i64 {
        let db = self.db.lock().expect("db");
        db.conn.query_row(sql, [], |r| r.get(0)).expect("count")
    }

    /// The blocks written: each one's stream and first and last chunk.
    fn blocks(&self) -> Vec<(String, i64, i64)> {
        let db = self.db.lock().expect("db");
        let mut q = db
            .conn
            .prepare("SELECT stream_id, first_seq, last_seq FROM chunk_blocks ORDER BY stream_id, first_seq")
            .expect("prepare");
        q.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    }

    fn in_run(&self, id: &str) -> usize {
        lock(&self.runs).get(id).map_or(0, |r| r.chunks.len())
    }
}

/// `n` chunks of stream `id` after those `next` counted.
fn appends(
    next: &mut std::collections::HashMap<&'static str, u64>,
    id: &'static str,
    n: u64,
) -> Vec<Op> {
    (0..n)
        .map(|_| {
            let seq = next.entry(id).or_insert(0);
            *seq += 1;
            Op::Append {
                id: Arc::from(id),
                seq: *seq,
                offset: Duration::ZERO,
                data: chunk_json(*seq),
                content: String::new(),
                watermark: Watermark::new(),
                promptly: false,
                caller_commits: true,
            }
        })
        .collect()
}

/// No commit writes rows into `streams`: they are the fold's, many streams' at once once due,
/// in a transaction no stream waits for.
#[test]
fn due_rows_are_left_to_the_fold() {
    use super::rows::INGEST_ROWS;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = batch_writer(dir.path());
    let now = tokio::time::Instant::now();
    for i in 0..INGEST_ROWS {
        let (ack, _answer) = tokio::sync::oneshot::channel();
        w.apply(vec![Op::Begin(new_stream(&format!("s{i}")), ack)]);
    }
    let streams = "SELECT COUNT(*) FROM streams";
    assert_eq!((w.log.pending.len(), w.count(streams)), (INGEST_ROWS, 0));
    assert!(w.log.fold_due(now));
    w.fold().expect("fold");
    assert_eq!(
        (w.log.pending.len(), w.count(streams)),
        (0, INGEST_ROWS as i64)
    );
    assert!(!w.log.fold_due(now));
}

/// A full run is left to the fold, which writes it with other streams' blocks; a run at twice
/// a block's worth starts the fold. A commit writes a run itself only at four times, waiting
/// for the connection (here for the checkpoint's gate, held by another thread for a moment).
#[test]
fn a_full_run_is_left_to_the_fold() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = batch_writer(dir.path());
    let mut next = std::collections::HashMap::new();
    let now = tokio::time::Instant::now();
    let full = block::BLOCK_CHUNKS as u64;
    // "a" fills its run in two batches: nothing is written, and nothing starts the fold yet.
    w.apply(appends(&mut next, "a", full - 1));
    w.apply(appends(&mut next, "a", 2));
    assert_eq!(w.blocks(), vec![]);
    assert_eq!(w.in_run("a"), block::BLOCK_CHUNKS + 1);
    assert!(!w.log.fold_due(now), "a full run waits for other work");
    // "b" goes on to twice a block's worth: still not written by the commit, but due.
    w.apply(appends(&mut next, "b", 2 * full));
    assert_eq!(w.blocks(), vec![]);
    assert_eq!(w.in_run("b"), 2 * block::BLOCK_CHUNKS);
    assert!(w.log.fold_due(now));
    // The fold writes every run left full, and forgets them.
    w.fold().expect("fold");
    assert_eq!(
        w.blocks(),
        vec![
            ("a".into(), 1, full as i64 + 1),
            ("b".into(), 1, 2 * full as i64)
        ]
    );
    assert_eq!(w.in_run("a") + w.in_run("b"), 0);
    assert!(w.log.full.is_empty() && !w.log.fold_due(now));
    // At four times a block's worth, the commit waits for the connection rather than let the
    // run grow further.
    let (held, holding) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        let BatchWriter {
            db,
            gate,
            runs,
            log,
            ..
        } = &mut w;
        let gate_ref = &*gate;
        scope.spawn(move || {
            let _gate = gate_ref.lock().expect("gate");
            held.send(()).expect("send");
            std::thread::sleep(Duration::from_millis(50));
        });
        holding.recv().expect("the gate is held");
        let mut batch = appends(&mut next, "e", 4 * full);
        super::writer::apply(db, gate, &mut batch, runs, log).expect("apply");
    });
    assert_eq!(w.blocks().last(), Some(&("e".into(), 1, 4 * full as i64)));
    assert_eq!(w.in_run("e"), 0);
}

/// A pass of the fold that fails (here SQLite refuses a row) changes nothing and acks its flush
/// with the error; its rows stay with the connection, and the next pass writes them first.
#[test]
fn a_failed_fold_keeps_its_rows_for_the_next() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = batch_writer(dir.path());
    let refuse =
        "CREATE TRIGGER refuse BEFORE INSERT ON streams BEGIN SELECT RAISE(ABORT, 'refused'); END";
    w.db.lock()
        .expect("db")
        .conn
        .execute_batch(refuse)
        .expect("trigger");
    let flush = |w: &mut BatchWriter, id: &str| {
        let (ack, _answer) = tokio::sync::oneshot::channel();
        let (flush, answer) = tokio::sync::oneshot::channel();
        w.apply(vec![Op::Begin(new_stream(id), ack), Op::Flush(flush)]);
        answer
    };
    let mut answer = flush(&mut w, "x");
    assert!(w.fold().is_err());
    assert!(matches!(answer.try_recv(), Ok(Err(_))), "the flush is told");
    assert_eq!(w.db.lock().expect("db").held.len(), 1);
    assert_eq!(w.log.pending.len() + w.log.in_fold, 0);
    w.db.lock()
        .expect("db")
        .conn
        .execute_batch("DROP TRIGGER refuse")
        .expect("drop");
    let mut answer = flush(&mut w, "y");
    w.fold().expect("fold");
    assert!(matches!(answer.try_recv(), Ok(Ok(()))));
    assert_eq!(w.count("SELECT COUNT(*) FROM streams"), 2);
    assert!(w.db.lock().expect("db").held.is_empty());
}

/// A relay's bursts, committed on its own thread, leave full runs to the writer's job (up to
/// twice a block): a reader sees every chunk in order at every point all the same, and so does
/// the store opened again after the process is gone with such a run in memory.
#[tokio::test]
async fn a_run_left_full_by_a_relay_is_read_whole_and_survives_a_crash() {
    let dir = tempfile::tempdir().expect("tempdir");
    let chunks = 3 * block::BLOCK_CHUNKS as u64 + 7;
    {
        let (store, _) = crate::store::Store::open(dir.path()).expect("open");
        store.begin(new_stream("r")).await.expect("begin");
        let id: Arc<str> = Arc::from("r");
        let mark = Watermark::new();
        for seq in 1..=chunks {
            append_relayed(&store, &id, &mark, seq).await;
            if seq % 5 == 0 || seq == chunks {
                store.commit_waiting(if seq % 5 == 0 { 5 } else { (seq % 5) as usize });
                let reached =
                    tokio::time::timeout(Duration::from_secs(10), mark.reached(seq)).await;
                assert!(reached.is_ok(), "chunk {seq} was never committed");
                let t = transcript(&store, "r").await;
                let seqs: Vec<u64> = t.chunks.iter().map(|c| c.seq).collect();
                assert_eq!(
                    seqs,
                    (1..=seq).collect::<Vec<_>>(),
                    "read after chunk {seq}"
                );
            }
        }
        // Dropped with the stream open: like a kill, nothing more is written.
    }
    let (store, recovered) = crate::store::Store::open(dir.path()).expect("reopen");
    assert_eq!(recovered, 1);
    let t = transcript(&store, "r").await;
    let seqs: Vec<u64> = t.chunks.iter().map(|c| c.seq).collect();
    assert_eq!(seqs, (1..=chunks).collect::<Vec<_>>());
}
