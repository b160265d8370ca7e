//! Fuzzing on stable Rust: every target of `durus_redb::fuzzing` is run on
//! inputs mutated from seeds (bit flips, interesting integers over length
//! and oid fields, cuts, insertions, repeats, splices of two inputs) for a
//! time budget each: `DURUS_FUZZ_SECONDS` (default 3). An input that panics
//! (or hangs, for the targets that bound their own work) fails the test and
//! is saved under `target/fuzz-failures/`. Each target prints how many
//! inputs it tried:
//!
//!     DURUS_FUZZ_SECONDS=60 cargo test --release --test fuzz -- --nocapture
//!
//! The file readers' seeds are small files written by the real Durus
//! (`tests/python/make_durus_files.py`), so this test needs `DURUS_PYTHON`.

mod common;

use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

use durus_redb::fuzzing;
use durus_redb::{Oid, Record};

/// xorshift64*: small, fast, and reproducible from the seed it prints.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

const INTERESTING: [u64; 12] = [
    0,
    1,
    7,
    8,
    12,
    0x7f,
    0xff,
    0xffff,
    0x7fff_ffff,
    0xffff_ffff,
    1 << 50,
    u64::MAX,
];

fn mutate(rng: &mut Rng, input: &[u8], pool: &[Vec<u8>]) -> Vec<u8> {
    let mut v = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = v.len();
        match rng.below(8) {
            0 if len > 0 => {
                let i = rng.below(len);
                v[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'C', b'B', b'L'][rng.below(7)];
            }
            2 if len >= 4 => {
                // An interesting integer over a 4- or 8-byte field.
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                if len >= w {
                    let i = rng.below(len - w + 1);
                    let bytes = x.to_be_bytes();
                    v[i..i + w].copy_from_slice(&bytes[8 - w..]);
                }
            }
            3 if len > 0 => v.truncate(rng.below(len)),
            4 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                v.splice(i..i, bytes);
            }
            5 if len > 0 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                v.drain(a..b);
            }
            6 if len > 0 => {
                // Repeat a slice.
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                let part = v[a..b].to_vec();
                let at = rng.below(len + 1);
                v.splice(at..at, part);
            }
            _ if !pool.is_empty() => {
                // Splice with another input.
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(v.len() + 1);
                let from = rng.below(other.len() + 1);
                v.truncate(cut);
                v.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    v.truncate(1 << 16);
    v
}

fn budget() -> Duration {
    let secs = std::env::var("DURUS_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse::<f64>().ok())
        .unwrap_or(3.0);
    Duration::from_secs_f64(secs)
}

/// Runs `target` on the seeds and on mutations of them for the budget.
/// Returns how many inputs were tried.
fn fuzz(name: &str, seeds: Vec<Vec<u8>>, mut target: impl FnMut(&[u8])) -> u64 {
    assert!(!seeds.is_empty());
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1;
    let mut rng = Rng(seed);
    let mut pool = seeds.clone();
    let started = Instant::now();
    let mut tried = 0u64;
    let mut queue = seeds.into_iter();
    loop {
        let input = match queue.next() {
            Some(s) => s,
            None => {
                if started.elapsed() >= budget() {
                    break;
                }
                let base = pool[rng.below(pool.len())].clone();
                mutate(&mut rng, &base, &pool)
            }
        };
        let outcome = std::panic::catch_unwind(AssertUnwindSafe(|| target(&input)));
        tried += 1;
        if outcome.is_err() {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/fuzz-failures");
            std::fs::create_dir_all(&dir).unwrap();
            let file = dir.join(format!("{name}-{seed:x}-{tried}.bin"));
            std::fs::write(&file, &input).unwrap();
            panic!(
                "fuzz target {name} panicked on input {} (seed {seed:#x}, input {tried})",
                file.display()
            );
        }
        // Keep some inputs to mutate further (no coverage guidance: a
        // bounded, slowly changing pool).
        if rng.below(16) == 0 {
            if pool.len() < 256 {
                pool.push(input);
            } else {
                let i = rng.below(pool.len());
                pool[i] = input;
            }
        }
    }
    eprintln!(
        "fuzz {name}: {tried} inputs in {:.1} s, no panic (seed {seed:#x})",
        started.elapsed().as_secs_f64()
    );
    tried
}

fn records() -> Vec<Record> {
    vec![
        Record::new(Oid(0), b"root", &[Oid(1), Oid(2)]),
        Record::new(Oid(1), b"", &[]),
        Record::new(Oid(2), &[0x80; 40], &[Oid(0), Oid(1 << 40)]),
        Record::new(Oid(u64::MAX), b"top", &[Oid(u64::MAX)]),
    ]
}

#[test]
fn fuzz_the_record_parser() {
    let seeds = records().into_iter().map(Record::into_bytes).collect();
    assert!(fuzz("record", seeds, fuzzing::record) > 0);
}

#[test]
fn fuzz_the_commit_data_parser() {
    let rs = records();
    let whole = fuzzing::commit_frame(&rs);
    let seeds = vec![
        whole[4..].to_vec(),
        fuzzing::commit_frame(&rs[..1])[4..].to_vec(),
        whole,
        Vec::new(),
    ];
    assert!(fuzz("commit_data", seeds, fuzzing::commit_data) > 0);
}

#[test]
fn fuzz_the_request_parser() {
    assert!(fuzz("requests", fuzzing::server_seeds(), fuzzing::requests) > 0);
}

#[test]
fn fuzz_the_durus_file_readers() {
    let tmp = tempfile::tempdir().unwrap();
    // Small SHELF-1 and DFS20 files written by the real Durus.
    let dir = common::make_durus_files_of(tmp.path(), "seeds", 4);
    let files = [dir.join("shelf.durus"), dir.join("dfs20.durus")];
    let seeds: Vec<Vec<u8>> = files.iter().map(|p| std::fs::read(p).unwrap()).collect();
    for (p, s) in files.iter().zip(&seeds) {
        assert!(s.len() < 64 << 10, "{} is a large seed", p.display());
    }
    let scratch = tmp.path().join("scratch");
    std::fs::create_dir_all(&scratch).unwrap();
    assert!(fuzz("durus_file", seeds, |d| fuzzing::durus_file(d, &scratch)) > 0);
}

#[test]
fn fuzz_the_sqlite_row_reader() {
    // Rows: a 2-byte id, a 2-byte length, the record.
    let mut rows = Vec::new();
    for (i, r) in records().iter().take(3).enumerate() {
        rows.extend_from_slice(&(i as i16).to_be_bytes());
        rows.extend_from_slice(&(r.len() as u16).to_be_bytes());
        rows.extend_from_slice(r.as_bytes());
    }
    let tmp = tempfile::tempdir().unwrap();
    let seeds = vec![rows.clone(), rows[..rows.len() / 2].to_vec()];
    assert!(
        fuzz("sqlite_rows", seeds, |d| fuzzing::sqlite_rows(
            d,
            tmp.path()
        )) > 0
    );
}

#[test]
fn fuzz_the_commit_log_replay() {
    let tmp = tempfile::tempdir().unwrap();
    let target = fuzzing::LogReplayTarget::new(tmp.path());
    let seed = target.seed();
    let seeds = vec![seed.clone(), seed[..seed.len() / 2].to_vec(), Vec::new()];
    assert!(fuzz("log_replay", seeds, |d| target.run(d)) > 0);
}

#[test]
fn fuzz_the_server_with_whole_connections() {
    let tmp = tempfile::tempdir().unwrap();
    let server = fuzzing::ServerTarget::start(tmp.path());
    let tried = fuzz("server", fuzzing::server_seeds(), |d| server.run(d));
    assert!(tried > 0);
    let commits = server
        .finish()
        .expect("the server and its store after fuzzing");
    eprintln!("fuzz server: {commits} commits accepted");
    assert!(commits > 0, "no input reached a commit");
}
