#![no_main]

use std::sync::OnceLock;

use durus_redb::fuzzing::ServerTarget;

/// One server for the whole run, on a store in a scratch directory.
static SERVER: OnceLock<(tempfile::TempDir, ServerTarget)> = OnceLock::new();

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let (_, server) = SERVER.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a scratch directory");
        let server = ServerTarget::start(dir.path());
        (dir, server)
    });
    server.run(data);
});
