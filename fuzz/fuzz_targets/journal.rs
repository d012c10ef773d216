//! Journal segments: replay stops cleanly at damage, records round-trip exactly.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::journal(data));
