//! Helpers shared by the integration tests: Python Durus, its files, and a
//! store's own files.

// Each test binary uses some of these helpers, not all.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

/// The Python interpreter with Durus 4.3 (`DURUS_PYTHON`); without it the
/// calling test fails, it never skips.
pub fn python() -> PathBuf {
    match std::env::var_os("DURUS_PYTHON") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => panic!(
            "DURUS_PYTHON is not set: set it to the path of a Python interpreter that has \
             Durus 4.3 installed (these tests work on files the real Durus writes)"
        ),
    }
}

/// A script of tests/python.
pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Has Python Durus write its stores (FileStorage, FileStorage2,
/// SqliteStorage, with their dumps; see make_durus_files.py) into a fresh
/// directory `name` under the test's temporary directory, and returns it.
pub fn make_durus_files(tmp: &Path, name: &str) -> PathBuf {
    make_durus_files_of(tmp, name, 3000)
}

/// [`make_durus_files`] with graphs of `size` objects.
pub fn make_durus_files_of(tmp: &Path, name: &str, size: usize) -> PathBuf {
    let dir = tmp.join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(python())
        .arg(script("make_durus_files.py"))
        .arg(&dir)
        .arg(size.to_string())
        .output()
        .expect("run DURUS_PYTHON");
    assert!(
        out.status.success(),
        "make_durus_files.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Every file of a durus-redb store (the file and its commit log), with its
/// bytes, in path order: to see that something left them as they were.
pub fn store_files(path: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![(path.to_path_buf(), std::fs::read(path).unwrap())];
    let mut log = path.as_os_str().to_owned();
    log.push("-log");
    if let Ok(dir) = std::fs::read_dir(PathBuf::from(log)) {
        for e in dir.flatten() {
            out.push((e.path(), std::fs::read(e.path()).unwrap()));
        }
    }
    out.sort();
    out
}

/// A new empty PostgreSQL database named after `tag` (dropped first if a
/// run before left it) in the cluster of `DURUS_TEST_POSTGRES`, and its
/// URL. Without that variable the calling test fails, it never skips:
/// `scripts/pg.sh start DIR` starts a cluster and prints its URL, and
/// scripts/test.sh does so.
pub fn fresh_database(tag: &str) -> String {
    let admin = std::env::var("DURUS_TEST_POSTGRES").unwrap_or_else(|_| {
        panic!(
            "DURUS_TEST_POSTGRES is not set: the PostgreSQL tests need a cluster. \
             `scripts/pg.sh start DIR` starts one and prints its URL; scripts/test.sh does this"
        )
    });
    let name: String = tag
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("durus_{name}_{}", std::process::id());
    let mut client =
        postgres::Client::connect(&admin, postgres::NoTls).expect("connect to DURUS_TEST_POSTGRES");
    client
        .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    client
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .unwrap();
    let (base, _) = admin
        .rsplit_once('/')
        .expect("DURUS_TEST_POSTGRES is a URL ending in /DBNAME");
    format!("{base}/{name}")
}
