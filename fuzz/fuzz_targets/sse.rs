//! Upstream server-sent events: split-invariance, the event cap, chunk parsing.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::sse(data));
