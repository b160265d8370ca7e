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
        .output_within(LIMIT);
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

/// How long a command of the tests may run before it counts as hung: it is
/// then killed and the test fails with what it printed, instead of the
/// test run waiting for ever.
pub const LIMIT: std::time::Duration = std::time::Duration::from_secs(300);

/// `Command::output` with a time limit (see [`LIMIT`]).
pub trait OutputWithin {
    /// Runs the command with stdin closed and its output captured; past
    /// `limit` it is killed and the caller panics, naming the command and
    /// showing what it printed so far.
    fn output_within(&mut self, limit: std::time::Duration) -> std::process::Output;
}

impl OutputWithin for Command {
    fn output_within(&mut self, limit: std::time::Duration) -> std::process::Output {
        use std::io::Read;
        use std::process::Stdio;
        use std::sync::{Arc, Mutex};
        let mut child = self
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {self:?}: {e}"));
        // Read in chunks into shared buffers: a reader blocked by a
        // grandchild that keeps the pipe open must not hide what came.
        let collect = |mut from: Box<dyn Read + Send>| {
            let buf = Arc::new(Mutex::new(Vec::new()));
            let to = buf.clone();
            let reader = std::thread::spawn(move || {
                let mut chunk = [0u8; 8192];
                while let Ok(n) = from.read(&mut chunk) {
                    if n == 0 {
                        break;
                    }
                    to.lock().unwrap().extend_from_slice(&chunk[..n]);
                }
            });
            (buf, reader)
        };
        let (out, out_reader) = collect(Box::new(child.stdout.take().unwrap()));
        let (err, err_reader) = collect(Box::new(child.stderr.take().unwrap()));
        let status = wait_within_or(&mut child, limit, || {
            format!(
                "{self:?} still running after {limit:?}: killed.\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.lock().unwrap()),
                String::from_utf8_lossy(&err.lock().unwrap())
            )
        });
        let _ = out_reader.join();
        let _ = err_reader.join();
        let stdout = std::mem::take(&mut *out.lock().unwrap());
        let stderr = std::mem::take(&mut *err.lock().unwrap());
        std::process::Output {
            status,
            stdout,
            stderr,
        }
    }
}

/// Waits for `child` at most `limit`; past it, kills it and panics.
pub fn wait_within(
    child: &mut std::process::Child,
    limit: std::time::Duration,
) -> std::process::ExitStatus {
    let id = child.id();
    wait_within_or(child, limit, || {
        format!("process {id} still running after {limit:?}: killed")
    })
}

fn wait_within_or(
    child: &mut std::process::Child,
    limit: std::time::Duration,
    why: impl FnOnce() -> String,
) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for a child process") {
            return status;
        }
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{}", why());
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// The port of `serve`'s `Ready on HOST:PORT` log line, if `line` is it.
pub fn ready_port(line: &str) -> Option<u16> {
    let at = line.find("Ready on ")?;
    Some(
        line[at + 9..]
            .trim()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("a port in {line:?}")),
    )
}
