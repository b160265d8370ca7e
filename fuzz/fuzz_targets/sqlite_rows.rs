#![no_main]

use std::sync::OnceLock;

static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let dir = SCRATCH.get_or_init(|| tempfile::tempdir().expect("a scratch directory"));
    durus_redb::fuzzing::sqlite_rows(data, dir.path());
});
