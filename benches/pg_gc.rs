//! The full collection on PostgreSQL while commits flow.
//!
//! `cargo bench --bench pg_gc` (needs a PostgreSQL cluster:
//! `DURUS_TEST_POSTGRES=$(bash scripts/pg.sh start DIR)`, the URL of a
//! database it may create others beside) writes a Durus file of 1,000,000
//! live objects (a binary tree under the root) and 1,000,000 garbage ones
//! (pairs referencing each other: cycles), migrates it into a fresh
//! database (then `VACUUM ANALYZE` and `CHECKPOINT`, so that the database's
//! own maintenance after the bulk load does not run during the
//! measurement), and serves it with `durus-redb serve --database`. Four
//! connections commit 10 records each, as fast as they can, throughout;
//! after 10 s a client asks the server for a pack (Durus's `P`), which
//! the front end runs while the commits go on. It reports the pack's time
//! and what it removed, the front end's resident memory before and at its
//! peak, and commit p50 / p99 before and during the pack.
//!
//! `cargo bench --bench pg_gc -- --background` measures the background
//! collector instead of a pack: the front end serves with `--gc-grace 5
//! --gc-after-commits 20000`, so a collection with a 5 s grace window
//! starts once the four connections have made 20,000 commits (about 10 s
//! here); its start is seen from its lease (`collector_background` in
//! `durus_meta`), and its time runs from there to its end, the window
//! included.
//!
//! `DURUS_BENCH_QUICK=1` uses 100,000 + 100,000 objects. Without `--bench`
//! (under `cargo test`) it runs 5,000 + 5,000 as a check of the machinery.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use durus_redb::{ClientStorage, Oid, Record, ShelfWriter, Storage};
use parking_lot::Mutex;

const COMMITTERS: usize = 4;

#[path = "common/mod.rs"]
#[allow(dead_code)]
mod common;

use common::percentiles;

/// A field of the status of process `pid`, in KiB (0 once it is gone).
fn vm_kib(pid: u32, field: &str) -> u64 {
    common::vm_kib(pid, field).unwrap_or(0)
}

/// A fresh database beside the one of `admin`; its URL.
fn fresh_database(admin: &str, name: &str) -> String {
    let mut c = postgres::Client::connect(admin, postgres::NoTls).expect("reach the cluster");
    c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .unwrap();
    c.batch_execute(&format!("CREATE DATABASE {name}")).unwrap();
    let (base, _) = admin.rsplit_once('/').expect("a URL with a database");
    format!("{base}/{name}")
}

/// Starts `durus-redb serve --database url EXTRA..`; the child and its
/// port.
fn serve(url: &str, extra: &[&str]) -> (Child, u16) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_durus-redb"))
        .args(["serve", "--database", url, "--port", "0"])
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run durus-redb serve");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let port = loop {
        let line = lines
            .next()
            .expect("serve ended before it was ready")
            .unwrap();
        if let Some(at) = line.find("Ready on ") {
            break line[at + 9..]
                .trim()
                .rsplit(':')
                .next()
                .unwrap()
                .parse()
                .unwrap();
        }
    };
    // Keep reading its log so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    (child, port)
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let background = bench && std::env::args().any(|a| a == "--background");
    let n: u64 = if !bench {
        5_000
    } else if std::env::var_os("DURUS_BENCH_QUICK").is_some() {
        100_000
    } else {
        1_000_000
    };
    let admin = std::env::var("DURUS_TEST_POSTGRES").expect(
        "DURUS_TEST_POSTGRES is not set: this bench needs a PostgreSQL cluster \
         (`bash scripts/pg.sh start DIR` prints its URL)",
    );
    let dir = tempfile::tempdir().unwrap();

    // n live objects: object i references 2i+1 and 2i+2 (below n). Then n
    // garbage ones: pairs referencing each other.
    let source = dir.path().join("source.durus");
    let mut w = ShelfWriter::create(&source).unwrap();
    let data = [7u8; 100];
    for oid in 0..n {
        let refs: Vec<Oid> = [2 * oid + 1, 2 * oid + 2]
            .into_iter()
            .filter(|c| *c < n)
            .map(Oid)
            .collect();
        w.write(Oid(oid), Record::new(Oid(oid), &data, &refs).as_bytes())
            .unwrap();
    }
    for oid in n..2 * n {
        let other = if (oid - n).is_multiple_of(2) {
            oid + 1
        } else {
            oid - 1
        };
        let refs: Vec<Oid> = [other]
            .into_iter()
            .filter(|o| *o < 2 * n)
            .map(Oid)
            .collect();
        w.write(Oid(oid), Record::new(Oid(oid), &data, &refs).as_bytes())
            .unwrap();
    }
    w.finish().unwrap();
    let url = fresh_database(&admin, "durus_bench_pg_gc");
    let started = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_durus-redb"))
        .arg("migrate")
        .arg(&source)
        .arg(&url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "migrate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "pg_gc: {} objects migrated in {:.1} s",
        2 * n,
        started.elapsed().as_secs_f64()
    );
    // Let the database settle after the bulk load, as an operator would
    // (its own vacuum and checkpoint would otherwise run during the
    // measurement).
    let started = Instant::now();
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    c.batch_execute("VACUUM ANALYZE durus_records").unwrap();
    c.batch_execute("CHECKPOINT").unwrap();
    drop(c);
    eprintln!(
        "pg_gc: VACUUM ANALYZE and CHECKPOINT in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let (mut server, port) = serve(
        &url,
        if background {
            &["--gc-grace", "5", "--gc-after-commits", "20000"]
        } else {
            &["--gc", "manual"]
        },
    );
    let served = Instant::now();
    let pid = server.id();
    let stop = Arc::new(AtomicBool::new(false));
    let packing = Arc::new(AtomicBool::new(false));
    // Latencies (us) before the pack and during it.
    let before = Arc::new(Mutex::new(Vec::<u64>::new()));
    let during = Arc::new(Mutex::new(Vec::<u64>::new()));
    let committers: Vec<_> = (0..COMMITTERS as u64)
        .map(|c| {
            let (stop, packing) = (stop.clone(), packing.clone());
            let (before, during) = (before.clone(), during.clone());
            std::thread::spawn(move || {
                let mut s = ClientStorage::connect_tcp("127.0.0.1", port).unwrap();
                let mut i = 0u64;
                let mut conflicts = 0u64;
                // Leaves of the tree (no references): rewritten in place.
                let leaves = n / 2..n;
                let span = leaves.end - leaves.start;
                while !stop.load(Ordering::Acquire) {
                    s.sync().unwrap();
                    s.begin();
                    for j in 0..10 {
                        let oid = Oid(leaves.start + (c * 7_919 + i * 10 + j) * 13 % span);
                        let mut d = data;
                        d[..8].copy_from_slice(&i.to_be_bytes());
                        s.store(oid, Record::new(oid, &d, &[]).into_bytes())
                            .unwrap();
                    }
                    let t = Instant::now();
                    let during_pack = packing.load(Ordering::Acquire);
                    match s.end() {
                        Ok(()) => {
                            let us = t.elapsed().as_micros() as u64;
                            if during_pack {
                                during.lock().push(us);
                            } else {
                                before.lock().push(us);
                            }
                        }
                        Err(e) if e.is_conflict() => conflicts += 1,
                        Err(e) => panic!("commit: {e}"),
                    }
                    i += 1;
                }
                conflicts
            })
        })
        .collect();
    if background {
        // Until the collection takes its lease.
        let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
        while c
            .query(
                "SELECT 1 FROM durus_meta WHERE name = 'collector_background'",
                &[],
            )
            .unwrap()
            .is_empty()
        {
            assert!(
                served.elapsed() < Duration::from_secs(600),
                "no background collection started in 10 minutes"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!(
            "pg_gc: the background collection started {:.1} s after the front end",
            served.elapsed().as_secs_f64()
        );
    } else {
        std::thread::sleep(Duration::from_secs(if bench { 10 } else { 2 }));
    }
    let rss_before = vm_kib(pid, "VmRSS:");
    packing.store(true, Ordering::Release);
    let started = Instant::now();
    let mut admin_client = ClientStorage::connect_tcp("127.0.0.1", port).unwrap();
    // The server answers a pack at once and collects in the background:
    // its live state says when the collection finished.
    if !background {
        admin_client.pack().unwrap();
    }
    let field = |state: &str, name: &str| -> u64 {
        state
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {name} in the live state: {state}"))
    };
    let mut peak = 0;
    let removed = loop {
        peak = peak.max(vm_kib(pid, "VmHWM:"));
        let state = admin_client.server_state().unwrap();
        if field(&state, "gc_full_collections") >= 1 {
            break field(&state, "gc_removed_full");
        }
        assert!(
            started.elapsed() < Duration::from_secs(3600),
            "the pack did not finish within an hour"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let pack_secs = started.elapsed().as_secs_f64();
    peak = peak.max(vm_kib(pid, "VmHWM:"));
    // A moment of commits after it, still counted as during.
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Release);
    let conflicts: u64 = committers.into_iter().map(|t| t.join().unwrap()).sum();
    let _ = server.kill();
    let _ = server.wait();
    assert_eq!(
        removed, n,
        "the collection removed another number of objects than the garbage"
    );
    let what = if background {
        "background collection (grace 5 s)"
    } else {
        "pack"
    };

    let (b50, b99) = percentiles(&mut before.lock());
    let (d50, d99) = percentiles(&mut during.lock());
    let (nb, nd) = (before.lock().len(), during.lock().len());
    eprintln!(
        "pg_gc: {what} of {n} live + {n} garbage: {pack_secs:.1} s; front end RSS {:.0} MiB before, \
         {:.0} MiB peak; commits p50/p99 {b50:.2}/{b99:.2} ms before ({nb}), {d50:.2}/{d99:.2} ms \
         during ({nd}); {conflicts} conflicts",
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
    println!(
        "\n### A {what} on PostgreSQL while {COMMITTERS} connections commit: {n} live + {n} garbage objects\n"
    );
    println!(
        "| {what} | removed | front end RSS before | peak | commits before (p50 / p99) | during (p50 / p99) |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    println!(
        "| {pack_secs:.1} s | {} | {:.0} MiB | {:.0} MiB | {nb} ({b50:.2} / {b99:.2} ms) | {nd} ({d50:.2} / {d99:.2} ms) |",
        removed,
        rss_before as f64 / 1024.0,
        peak as f64 / 1024.0
    );
}
