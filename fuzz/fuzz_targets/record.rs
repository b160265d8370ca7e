#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| durus_redb::fuzzing::record(data));
