#![no_main]

use std::sync::OnceLock;

use durus_redb::fuzzing::LogReplayTarget;

/// One store image for the whole run, in a scratch directory.
static TARGET: OnceLock<(tempfile::TempDir, LogReplayTarget)> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, target) = TARGET.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let target = LogReplayTarget::new(dir.path());
        (dir, target)
    });
    target.run(data);
});
