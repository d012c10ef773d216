//! Stored chunk blocks: clean errors, exact round trips.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| sluice::fuzzing::block(data));
