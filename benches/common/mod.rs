//! What several benchmarks share (each includes it with `#[path]`; not a
//! benchmark of its own).

use std::path::PathBuf;

/// Latencies in microseconds -> (p50, p99) in milliseconds.
pub fn percentiles(lat: &mut [u64]) -> (f64, f64) {
    if lat.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    lat.sort_unstable();
    let at = |q: f64| lat[((lat.len() - 1) as f64 * q).round() as usize] as f64 / 1000.0;
    (at(0.50), at(0.99))
}

/// A field of process `pid`'s `/proc/PID/status` in KiB (`"VmRSS:"`,
/// `"VmHWM:"`); `None` once the process is gone.
pub fn vm_kib(pid: u32, field: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// The Python interpreter with durus 4.3 and Durus's `durus` command:
/// `DURUS_PYTHON` and `DURUS_BIN`, else those of the project's `.venv`
/// (`scripts/setup-python.sh`). They may not exist.
pub fn durus_paths() -> (PathBuf, PathBuf) {
    let venv = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".venv/bin");
    let python = std::env::var_os("DURUS_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| venv.join("python"));
    let durus = std::env::var_os("DURUS_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| venv.join("durus"));
    (python, durus)
}
