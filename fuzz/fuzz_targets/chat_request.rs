//! Chat request bodies, as POST /v1/chat/completions reads them.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::chat_request(data));
