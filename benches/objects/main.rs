//! The object layer's persistent map (`durus_redb::object::PMap`) against
//! the same work in a raw redb table and in Python Durus 4.3's `BTree`
//! through `durus -s`, in one run: bulk inserts of N entries in commits of
//! 10,000, then lookups from a warm cache. Then the resident memory of a
//! process walking a map of M entries with a 64 MiB object cache.
//!
//! `cargo bench --bench objects` (N = 1,000,000, M = 10,000,000;
//! `DURUS_BENCH_OBJECTS=N`, `DURUS_BENCH_ITERATED=M` for other sizes; needs
//! `scripts/setup-python.sh`, or `DURUS_PYTHON` and `DURUS_BIN`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use durus_redb::object::{Db, PMap, Persistent};
use durus_redb::{Durability, ManualGc, Options, RedbStorage, Storage};
use redb::{ReadableDatabase, TableDefinition};
use serde::{Deserialize, Serialize};

#[path = "../common/mod.rs"]
#[allow(dead_code)]
mod common;

const BATCH: u64 = 10_000;

#[derive(Clone, Serialize, Deserialize)]
struct Root {
    map: PMap<u64, String>,
}

impl Persistent for Root {
    const TAG: &'static str = "bench.Root";
}

/// The keys in insertion order: a permutation of 0..n.
fn key(i: u64, n: u64) -> u64 {
    (i * 7919) % n
}

/// The keys looked up.
fn probe(i: u64, n: u64) -> u64 {
    (i * 104_729) % n
}

/// The object cache of the iteration's process.
const ITERATE_CACHE: usize = 64 << 20;
/// The store's page cache in that process.
const ITERATE_PAGES: usize = 8 << 20;

/// This process's resident memory now and at its peak, in KiB.
fn resident_kib() -> (u64, u64) {
    let field = |name| common::vm_kib(std::process::id(), name).unwrap_or(0);
    (field("VmRSS:"), field("VmHWM:"))
}

/// A new store at `path` (fsync, no collector) whose root is a map of `n`
/// entries, `key(j)` to `"value {key(j)}"` for `j` in `0..n`, inserted in
/// commits of `batch` through a cache of `cache` bytes; and the seconds
/// the inserts took.
fn filled(
    path: &Path,
    cache: usize,
    n: u64,
    batch: u64,
    key: impl Fn(u64) -> u64,
) -> (Db<RedbStorage>, PMap<u64, String>, f64) {
    let store = RedbStorage::open(
        path,
        Options::new().gc(ManualGc).durability(Durability::Fsync),
    )
    .unwrap();
    let mut db = Db::with_cache(store, cache);
    let map = db
        .transact(|tx| {
            let map = PMap::new(tx)?;
            tx.set_root(Root { map })?;
            Ok(map)
        })
        .unwrap();
    let started = Instant::now();
    let mut i = 0;
    while i < n {
        let end = (i + batch).min(n);
        db.transact(|tx| {
            for j in i..end {
                let k = key(j);
                map.insert(tx, k, format!("value {k}"))?;
            }
            Ok(())
        })
        .unwrap();
        i = end;
    }
    (db, map, started.elapsed().as_secs_f64())
}

/// The iteration's own process: opens the store at `path` with an object
/// cache of [`ITERATE_CACHE`], walks its map in key order and prints the
/// entries seen, the seconds taken, the resident memory (KiB) after open,
/// at the end, and at the peak.
fn iterate(path: &str) {
    let store =
        RedbStorage::open(path, Options::new().gc(ManualGc).cache_bytes(ITERATE_PAGES)).unwrap();
    let (opened, _) = resident_kib();
    let mut db = Db::with_cache(store, ITERATE_CACHE);
    let started = Instant::now();
    let (seen, ordered) = db
        .transact(|tx| {
            let map = tx.root::<Root>()?.expect("a root").map;
            let (mut seen, mut ordered, mut last) = (0u64, true, None);
            map.for_each_in(tx, .., |k, v| {
                ordered &= last.is_none_or(|l| l < *k) && v.len() > 6;
                last = Some(*k);
                seen += 1;
                true
            })?;
            Ok((seen, ordered))
        })
        .unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert!(ordered, "the map's entries came out of order");
    assert!(db.cached_bytes() <= ITERATE_CACHE);
    let (now, peak) = resident_kib();
    println!("{seen} {secs} {opened} {now} {peak}");
}

/// Builds a map of `n` entries (keys in order, commits of 100,000) at
/// `path`, then walks it in another process with a 64 MiB cache: that
/// process's resident memory is what iterating costs.
fn iteration_memory(path: &Path, n: u64) -> String {
    let (mut db, _, _) = filled(path, 64 << 20, n, 100_000, |k| k);
    db.storage().close().unwrap();
    drop(db);
    let out = Command::new(std::env::current_exe().unwrap())
        .env("DURUS_BENCH_ITERATE", path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the iteration failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Vec<f64> = text
        .split_whitespace()
        .map(|x| x.parse().unwrap())
        .collect();
    assert_eq!(
        v[0] as u64, n,
        "the iteration saw another number of entries"
    );
    let mib = |kib: f64| kib / 1024.0;
    let file = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) as f64 / (1 << 20) as f64;
    eprintln!(
        "objects: iterating {n} entries: {:.1} s, resident {:.0} MiB after open, {:.0} MiB at the end, {:.0} MiB at the peak (store {file:.0} MiB)",
        v[1],
        mib(v[2]),
        mib(v[3]),
        mib(v[4])
    );
    format!(
        "\n### Iterating a map of {n} entries with a {} MiB object cache ({} MiB page cache)\n\n\
         | entries/s | resident after open | at the end | peak | store file |\n\
         |---:|---:|---:|---:|---:|\n\
         | {:.0} | {:.0} MiB | {:.0} MiB | {:.0} MiB | {file:.0} MiB |",
        ITERATE_CACHE >> 20,
        ITERATE_PAGES >> 20,
        n as f64 / v[1],
        mib(v[2]),
        mib(v[3]),
        mib(v[4]),
    )
}

fn main() {
    if let Ok(path) = std::env::var("DURUS_BENCH_ITERATE") {
        iterate(&path);
        return;
    }
    // `cargo test --all-targets` runs benchmarks without `--bench`: then
    // only check the machinery, on 5,000 entries.
    let bench = std::env::args().any(|a| a == "--bench");
    let n: u64 = std::env::var("DURUS_BENCH_OBJECTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|_| bench)
        .unwrap_or(if bench { 1_000_000 } else { 5_000 });
    let lookups = n;
    let dir = tempfile::tempdir().unwrap();
    let mut rows: Vec<(String, f64, f64)> = Vec::new();

    // The persistent map over a store in this process.
    {
        let (mut db, map, secs) =
            filled(&dir.path().join("objects.redb"), 512 << 20, n, BATCH, |j| {
                key(j, n)
            });
        let inserts = n as f64 / secs;
        // Warm the cache, then look up.
        db.transact(|tx| map.for_each_in(tx, .., |_, _| true))
            .unwrap();
        let started = Instant::now();
        db.transact(|tx| {
            for j in 0..lookups {
                let k = probe(j, n);
                let len = map.get_with(tx, &k, String::len)?;
                assert!(len.is_some_and(|len| len > 6));
            }
            Ok(())
        })
        .unwrap();
        let found = lookups as f64 / started.elapsed().as_secs_f64();
        // The same lookups by `get`, which returns a copy of the value.
        let started = Instant::now();
        db.transact(|tx| {
            for j in 0..lookups {
                let k = probe(j, n);
                let v = map.get(tx, &k)?;
                assert!(v.is_some_and(|v| v.len() > 6));
            }
            Ok(())
        })
        .unwrap();
        let copied = lookups as f64 / started.elapsed().as_secs_f64();
        eprintln!(
            "objects: PMap: {inserts:.0} inserts/s, {found:.0} lookups/s in place, {copied:.0} with a copy"
        );
        rows.push((
            "durus-redb PMap (RedbStorage, fsync), `get_with`".into(),
            inserts,
            found,
        ));
        rows.push((
            "durus-redb PMap, the same lookups by `get` (a copy of each value)".into(),
            f64::NAN,
            copied,
        ));
        db.storage().close().unwrap();
    }

    // A raw redb table: the same keys and values.
    {
        const T: TableDefinition<u64, &str> = TableDefinition::new("map");
        let db = redb::Database::create(dir.path().join("raw.redb")).unwrap();
        let started = Instant::now();
        let mut i = 0;
        while i < n {
            let end = (i + BATCH).min(n);
            let w = db.begin_write().unwrap();
            {
                let mut t = w.open_table(T).unwrap();
                for j in i..end {
                    let k = key(j, n);
                    t.insert(k, format!("value {k}").as_str()).unwrap();
                }
            }
            w.commit().unwrap();
            i = end;
        }
        let inserts = n as f64 / started.elapsed().as_secs_f64();
        let r = db.begin_read().unwrap();
        let t = r.open_table(T).unwrap();
        for k in 0..n {
            let _ = t.get(k).unwrap();
        }
        let started = Instant::now();
        for j in 0..lookups {
            let k = probe(j, n);
            let len = t.get(k).unwrap().map(|v| v.value().len());
            assert!(len.is_some_and(|len| len > 6));
        }
        let found = lookups as f64 / started.elapsed().as_secs_f64();
        eprintln!("objects: raw redb: {inserts:.0} inserts/s, {found:.0} lookups/s");
        rows.push(("raw redb table (fsync)".into(), inserts, found));
    }

    // Python Durus's BTree through `durus -s`.
    let (python, durus) = common::durus_paths();
    if python.exists() && durus.exists() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let mut server = Command::new(&durus)
            .args(["-s", "--port", &port.to_string(), "--file"])
            .arg(dir.path().join("durus.durus"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "durus -s did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = Command::new(&python)
            .arg(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/objects/btree.py"))
            .args([
                port.to_string(),
                n.to_string(),
                BATCH.to_string(),
                lookups.to_string(),
            ])
            .output()
            .unwrap();
        let _ = server.kill();
        let _ = server.wait();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "btree.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: Vec<f64> = text
            .split_whitespace()
            .map(|x| x.parse().unwrap())
            .collect();
        eprintln!(
            "objects: Python Durus BTree: {:.0} inserts/s, {:.0} lookups/s",
            v[0], v[1]
        );
        rows.push(("Python Durus 4.3 BTree through durus -s".into(), v[0], v[1]));
    } else {
        eprintln!("objects: Python Durus not found: its row is left out (scripts/setup-python.sh)");
    }

    // Iterating a map far larger than the cache, in its own process.
    let iterated: u64 = std::env::var("DURUS_BENCH_ITERATED")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|_| bench)
        .unwrap_or(if bench { 10_000_000 } else { 20_000 });
    let memory = iteration_memory(&dir.path().join("iterated.redb"), iterated);

    println!("\n### The persistent map: {n} entries, commits of {BATCH}\n");
    println!("| store | inserts/s | lookups/s (warm cache) |");
    println!("|---|---:|---:|");
    for (label, ins, look) in rows {
        let ins = if ins.is_nan() {
            "".to_string()
        } else {
            format!("{ins:.0}")
        };
        println!("| {label} | {ins} | {look:.0} |");
    }
    println!("{memory}");
}
