//! Entry points for the fuzz targets in `fuzz/` (and their smoke test): one per parser that
//! reads bytes from outside. Each takes arbitrary bytes, must never panic, and checks the
//! parser's own promises where it has any (splitting never changes SSE events; a block reads
//! back what was written). Not an API: hidden from the docs, and may change with the parsers.

use std::sync::Arc;

use crate::upstream::sim::{checked_params, SimDefaults};
use crate::upstream::sse::SseParser;
use crate::upstream::Payload;

/// Upstream SSE: parsed whole and in two pieces (cut where the first byte says), the events are
/// the same; the event cap holds; each event's data is read as a chunk.
pub fn sse(data: &[u8]) {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let max_event = 256;
    let whole = SseParser::with_max_event(max_event).push_in_pieces(bytes, &[]);
    let cut = usize::from(cut) * bytes.len() / 256;
    let pieces = SseParser::with_max_event(max_event).push_in_pieces(bytes, &[cut]);
    match (&whole, &pieces) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "a split changed the events"),
        // An error may come at a different byte, but it comes either way.
        (Err(_), Err(_)) => {}
        (a, b) => panic!("whole: {a:?}, in pieces: {b:?}"),
    }
    if let Ok(events) = whole {
        for e in events {
            assert!(e.data.len() <= max_event, "an event past the cap");
            let _ = Payload::parse(&e.data);
        }
    }
}

/// A chat request body, as `POST /v1/chat/completions` reads it (and its `sim` field).
pub fn chat_request(data: &[u8]) {
    if let Ok(request) = crate::api::parse_chat(data) {
        let _ = checked_params(&SimDefaults::default(), &request.body);
    }
}

/// A configuration file.
pub fn config(data: &[u8]) {
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::config::Config::parse(
            text,
            std::path::Path::new("fuzz.toml"),
            &crate::config::Overrides::default(),
        );
    }
}

/// A stored chunk block: arbitrary bytes decode or fail cleanly (never a panic, never more
/// memory than the block's size and a fixed bound), and what decodes re-encodes to the same
/// chunks (not always the same bytes: blocks of earlier formats are read too, a chunk can be
/// written against the one before it in more than one way, and LZ4 has many encodings of one
/// input).
pub fn block(data: &[u8]) {
    if let Ok(chunks) = crate::store::decode_block(data) {
        let logged: Vec<crate::store::LoggedChunk> = chunks
            .iter()
            .cloned()
            .map(
                |(seq, offset_us, data, content)| crate::store::LoggedChunk {
                    seq,
                    offset_us,
                    data: Arc::from(data),
                    content,
                },
            )
            .collect();
        let again = crate::store::decode_block(&crate::store::encode_block(&logged));
        assert!(
            again.is_ok_and(|again| again == chunks),
            "a block does not round-trip"
        );
    }
}

/// A journal segment: arbitrary bytes give the records before the first damaged one, never a
/// panic, and the segment's header (if it has one) and those records re-encode to exactly the
/// bytes they were read from.
pub fn journal(data: &[u8]) {
    let (seal, records, whole) = crate::store::decode_journal(data);
    let mut again = Vec::new();
    if let crate::store::JournalSeal::Salted(start) = seal {
        crate::store::encode_journal_header(&mut again, start);
    }
    for record in &records {
        crate::store::encode_journal(&mut again, seal, record);
    }
    assert!(
        data.starts_with(&again),
        "a journal record does not round-trip"
    );
    assert_eq!(whole, again.len() == data.len());
}

#[cfg(test)]
mod tests {
    //! The fuzz targets' smoke test: every seed of `fuzz/seeds/` through its entry point, and a
    //! few thousand mutations of each, in every test run. `scripts/fuzz` runs the real fuzzer.

    use super::*;
    use proptest::prelude::*;

    fn seeds(target: &str) -> Vec<Vec<u8>> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/seeds")
            .join(target);
        let mut out: Vec<Vec<u8>> = std::fs::read_dir(&dir)
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| std::fs::read(e.path()).ok())
                    .collect()
            })
            .unwrap_or_default();
        assert!(!out.is_empty(), "no seeds in {}", dir.display());
        out.sort();
        out
    }

    #[test]
    fn every_seed_passes_its_target() {
        for seed in seeds("sse") {
            sse(&seed);
        }
        for seed in seeds("chat_request") {
            chat_request(&seed);
        }
        for seed in seeds("config") {
            config(&seed);
        }
        for seed in seeds("block") {
            block(&seed);
        }
        for seed in seeds("journal") {
            journal(&seed);
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]
        #[test]
        fn mutated_seeds_never_panic(
            target in 0usize..5,
            pick in any::<usize>(),
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..8),
            cut in any::<usize>(),
        ) {
            let name = ["sse", "chat_request", "config", "block", "journal"][target];
            let all = seeds(name);
            let mut input = all[pick % all.len()].clone();
            for (at, byte) in flips {
                if !input.is_empty() {
                    let i = at % input.len();
                    input[i] = byte;
                }
            }
            input.truncate(cut % (input.len() + 1));
            match target {
                0 => sse(&input),
                1 => chat_request(&input),
                2 => config(&input),
                3 => block(&input),
                _ => journal(&input),
            }
        }
    }
}
