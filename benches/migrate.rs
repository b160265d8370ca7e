//! Migration throughput and memory.
//!
//! `cargo bench --bench migrate` writes a Durus FileStorage (SHELF-1) source
//! of 1,000,000 records (about 150 bytes each, a few refs) and runs the real
//! `durus-redb migrate` on it as a child process; it reports records per
//! second, MB per second and the child's peak resident memory (VmHWM,
//! sampled from /proc while it runs; target under 200 MB whatever the
//! source size). Then the same for `durus-redb export` back to SHELF-1.
//!
//! `DURUS_BENCH_QUICK=1` uses 200,000 records. Without `--bench` (under
//! `cargo test`) it runs 20,000 as a smoke test.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use durus_redb::{Oid, Record, ShelfWriter};

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

/// Runs `durus-redb ARGS`, sampling its peak RSS; returns (seconds, peak MiB).
fn run_sampled(args: &[&Path], sub: &str) -> (f64, f64) {
    let started = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_durus-redb"))
        .arg(sub)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run durus-redb");
    let pid = child.id();
    let mut peak = 0u64;
    loop {
        if let Some(kib) = common::vm_kib(pid, "VmHWM:") {
            peak = peak.max(kib);
        }
        if child.try_wait().unwrap().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "durus-redb {sub} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (started.elapsed().as_secs_f64(), peak as f64 / 1024.0)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = if !bench {
        20_000
    } else if std::env::var_os("DURUS_BENCH_QUICK").is_some() {
        200_000
    } else {
        1_000_000
    };
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.durus");
    let mut w = ShelfWriter::create(&source).unwrap();
    let mut data = vec![0u8; 120];
    for oid in 0..n {
        data[..8].copy_from_slice(&oid.to_be_bytes());
        // A tree: each object references two children (where they exist).
        let refs: Vec<Oid> = [2 * oid + 1, 2 * oid + 2]
            .into_iter()
            .filter(|c| *c < n)
            .map(Oid)
            .collect();
        w.write(Oid(oid), Record::new(Oid(oid), &data, &refs).as_bytes())
            .unwrap();
    }
    let source_bytes = w.finish().unwrap();
    let dest = dir.path().join("dest.redb");
    let (secs, peak) = run_sampled(&[&source, &dest], "migrate");
    let mb = source_bytes as f64 / 1e6;
    println!("## Migration of a SHELF-1 file ({n} records, {mb:.0} MB)\n");
    println!("| step | seconds | records/s | MB/s | peak RSS |");
    println!("|---|---:|---:|---:|---:|");
    println!(
        "| durus-redb migrate (import, verify, check) | {secs:.1} | {:.0} | {:.1} | {peak:.0} MiB |",
        n as f64 / secs,
        mb / secs
    );
    let back = dir.path().join("back.durus");
    let (secs, peak) = run_sampled(&[&dest, &back], "export");
    println!(
        "| durus-redb export (to SHELF-1) | {secs:.1} | {:.0} | {:.1} | {peak:.0} MiB |",
        n as f64 / secs,
        std::fs::metadata(&back).unwrap().len() as f64 / 1e6 / secs
    );
}
