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
