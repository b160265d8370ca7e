//! The engine beside raw redb doing the same key/value work, in the same run;
//! and the open time of stores of growing size.
//!
//! `cargo bench --bench engine` prints criterion's figures, then a table of
//! ratios (durus-redb time / raw redb time) read from criterion's estimates.
//! `DURUS_BENCH_QUICK=1` shortens every measurement (for a smoke run).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion};
use durus_redb::{
    Durability as DurabilityMode, Manual, Oid, Options, Record, RedbStorage, Storage,
};
use redb::{Durability, ReadableDatabase, TableDefinition};

const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");
const OBJECTS: u64 = 10_000;
const DATA: usize = 100;

fn record(oid: u64, generation: u64) -> Record {
    let mut data = vec![0u8; DATA];
    data[..8].copy_from_slice(&generation.to_be_bytes());
    // Each object references the next two (a graph, so counts are maintained).
    let refs = [Oid((oid + 1) % OBJECTS), Oid((oid + 2) % OBJECTS)];
    Record::new(Oid(oid), &data, &refs)
}

/// The durability modes, each with the checkpoint policy it runs with.
fn modes() -> Vec<(&'static str, Options)> {
    vec![
        ("fsync", Options::new().durability(DurabilityMode::Fsync)),
        ("os", Options::new().durability(DurabilityMode::os())),
        (
            "manual",
            Options::new()
                .durability(DurabilityMode::Manual)
                .checkpoint(Manual),
        ),
    ]
}

/// A durus-redb store of OBJECTS records.
fn durus_store(dir: &Path, options: Options) -> RedbStorage {
    let path = dir.join(format!("durus-{}.redb", rand_suffix()));
    let mut s = RedbStorage::open(&path, options).unwrap();
    let oids = s.new_oids(OBJECTS as usize).unwrap();
    s.begin();
    for o in &oids {
        s.store(*o, record(o.0, 0).into_bytes()).unwrap();
    }
    s.end().unwrap();
    s.checkpoint().unwrap();
    s
}

/// A raw redb database with the same records under the same keys.
fn raw_store(dir: &Path) -> redb::Database {
    let path = dir.join(format!("raw-{}.redb", rand_suffix()));
    let db = redb::Builder::new()
        .set_cache_size(256 << 20)
        .create(path)
        .unwrap();
    let w = db.begin_write().unwrap();
    {
        let mut t = w.open_table(RAW).unwrap();
        for o in 0..OBJECTS {
            t.insert(o, record(o, 0).as_bytes()).unwrap();
        }
    }
    w.commit().unwrap();
    db
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos()
}

/// Raw redb with the durability schedule closest to a mode: every commit
/// durable for `fsync` (the same guarantee), one durable commit a second for
/// `os` (a weaker one: raw redb loses its non-durable commits on a kill -9),
/// none for `manual` (the same).
struct RawPolicy {
    name: &'static str,
    last_durable: Instant,
    since: u64,
}

impl RawPolicy {
    fn durability(&mut self) -> Durability {
        let d = match self.name {
            "fsync" => true,
            "os" => {
                self.since += 1;
                self.last_durable.elapsed() >= Duration::from_secs(1)
            }
            _ => false,
        };
        if d {
            self.last_durable = Instant::now();
            self.since = 0;
            Durability::Immediate
        } else {
            Durability::None
        }
    }
}

fn bench_load(c: &mut Criterion, dir: &Path) {
    let mut g = c.benchmark_group("load");
    let mut s = durus_store(dir, Options::new());
    let db = raw_store(dir);
    let mut i = 0u64;
    g.bench_function("durus-redb", |b| {
        b.iter(|| {
            i = (i * 7919 + 13) % OBJECTS;
            s.load(Oid(i)).unwrap()
        })
    });
    g.bench_function("redb", |b| {
        b.iter(|| {
            i = (i * 7919 + 13) % OBJECTS;
            let txn = db.begin_read().unwrap();
            let t = txn.open_table(RAW).unwrap();
            t.get(i).unwrap().unwrap().value().to_vec()
        })
    });
    g.finish();
}

fn bench_commit(c: &mut Criterion, dir: &Path) {
    for (name, options) in modes() {
        let mut g = c.benchmark_group(format!("commit-{name}"));
        let mut s = durus_store(dir, options);
        let db = raw_store(dir);
        let mut raw_policy = RawPolicy {
            name,
            last_durable: Instant::now(),
            since: 0,
        };
        let mut generation = 1u64;
        for k in [1u64, 10, 100] {
            g.bench_with_input(BenchmarkId::new("durus-redb", k), &k, |b, &k| {
                b.iter(|| {
                    generation += 1;
                    s.begin();
                    for j in 0..k {
                        let oid = (generation * 131 + j * 97) % OBJECTS;
                        s.store(Oid(oid), record(oid, generation).into_bytes())
                            .unwrap();
                    }
                    s.end().unwrap();
                })
            });
            g.bench_with_input(BenchmarkId::new("redb", k), &k, |b, &k| {
                b.iter(|| {
                    generation += 1;
                    let mut w = db.begin_write().unwrap();
                    // The same crash guarantee as the engine: quick repair on.
                    w.set_quick_repair(true);
                    w.set_durability(raw_policy.durability()).unwrap();
                    {
                        let mut t = w.open_table(RAW).unwrap();
                        for j in 0..k {
                            let oid = (generation * 131 + j * 97) % OBJECTS;
                            t.insert(oid, record(oid, generation).as_bytes()).unwrap();
                        }
                    }
                    w.commit().unwrap();
                })
            });
        }
        g.finish();
        s.close().unwrap();
    }
}

/// A store of `n` small records, built once and kept under target/ for later runs.
fn sized_store(n: u64) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-stores");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("open-{n}.redb"));
    let done = dir.join(format!("open-{n}.done"));
    if done.exists() {
        return path;
    }
    let _ = std::fs::remove_file(&path);
    let started = Instant::now();
    let mut s = RedbStorage::open(&path, Options::new().checkpoint(Manual)).unwrap();
    let batch = 50_000u64;
    let mut made = 0;
    while made < n {
        let k = batch.min(n - made);
        let oids = s.new_oids(k as usize).unwrap();
        s.begin();
        for o in &oids {
            // A chain: each object references the previous one.
            let refs: Vec<Oid> = if o.0 == 0 { vec![] } else { vec![Oid(o.0 - 1)] };
            s.store(*o, Record::new(*o, &[7u8; 60], &refs).into_bytes())
                .unwrap();
        }
        s.end().unwrap();
        s.checkpoint().unwrap();
        made += k;
    }
    s.close().unwrap();
    std::fs::write(&done, b"").unwrap();
    eprintln!("built a store of {n} records in {:.1?}", started.elapsed());
    path
}

fn bench_open(c: &mut Criterion) {
    let mut g = c.benchmark_group("open");
    g.sample_size(10);
    for n in [10_000u64, 100_000, 1_000_000] {
        let path = sized_store(n);
        g.bench_with_input(BenchmarkId::from_parameter(n), &path, |b, path| {
            // Time the open and a first read; the close is outside the timing.
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let started = Instant::now();
                    let s = RedbStorage::open(path, Options::default()).unwrap();
                    s.load_root_check();
                    total += started.elapsed();
                    drop(s);
                }
                total
            })
        });
    }
    g.finish();
}

trait LoadRoot {
    fn load_root_check(&self);
}

impl LoadRoot for RedbStorage {
    /// Opening counts only if the store answers: read the first record.
    fn load_root_check(&self) {
        self.new_session().load(Oid::ROOT).unwrap();
    }
}

/// criterion's mean estimate for one benchmark id, in nanoseconds.
fn mean_ns(id: &str) -> Option<f64> {
    let path = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .parent()?
        .join("criterion")
        .join(id)
        .join("new/estimates.json");
    let text = std::fs::read_to_string(path).ok()?;
    // {"mean":{"confidence_interval":{...},"point_estimate":123.4,...
    let mean = &text[text.find("\"mean\"")?..];
    let pe = &mean[mean.find("\"point_estimate\":")? + 17..];
    pe[..pe.find([',', '}'])?].parse().ok()
}

fn print_ratios() {
    println!(
        "\n{:<28} {:>14} {:>14} {:>8}",
        "work", "durus-redb", "raw redb", "ratio"
    );
    let row = |label: &str, ours: &str, raw: &str| {
        if let (Some(a), Some(b)) = (mean_ns(ours), mean_ns(raw)) {
            println!(
                "{label:<28} {:>12.1}us {:>12.1}us {:>7.2}x",
                a / 1e3,
                b / 1e3,
                a / b
            );
        }
    };
    row("load", "load/durus-redb", "load/redb");
    for (name, _) in modes() {
        for k in [1, 10, 100] {
            row(
                &format!("commit {k:>3} records, {name}"),
                &format!("commit-{name}/durus-redb/{k}"),
                &format!("commit-{name}/redb/{k}"),
            );
        }
    }
    for n in [10_000u64, 100_000, 1_000_000] {
        if let Some(t) = mean_ns(&format!("open/{n}")) {
            println!("{:<28} {:>12.2}ms", format!("open, {n} records"), t / 1e6);
        }
    }
}

fn main() {
    let quick = std::env::var_os("DURUS_BENCH_QUICK").is_some();
    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .warm_up_time(Duration::from_millis(200))
            .measurement_time(Duration::from_millis(500));
    } else {
        c = c
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
    }
    let dir = tempfile::tempdir().unwrap();
    bench_load(&mut c, dir.path());
    bench_commit(&mut c, dir.path());
    bench_open(&mut c);
    c.final_summary();
    // Under `cargo test` (no `--bench`) criterion runs each routine once and
    // records nothing, so there are no fresh estimates to compare.
    if std::env::args().any(|a| a == "--bench") {
        print_ratios();
    }
}
