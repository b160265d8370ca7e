//! The Rust load generator: many connections speaking the protocol directly,
//! so the server, not a Python client, is the limit.

use std::io;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use crate::wire::{Client, Loaded, make_record};

/// What each connection does.
#[derive(Debug, Clone, Copy)]
pub struct Mix {
    pub connections: usize,
    /// Fraction of operations that are commits (the rest are loads).
    pub commit_fraction: f64,
    /// Records per commit.
    pub records_per_commit: usize,
    /// Objects each connection owns (and loads from).
    pub objects_per_connection: usize,
    pub duration: Duration,
}

/// Throughput and latency of one run.
#[derive(Debug, Default)]
pub struct LoadReport {
    pub loads: usize,
    pub commits: usize,
    pub conflicts: usize,
    pub seconds: f64,
    pub load_lat_us: Vec<u64>,
    pub commit_lat_us: Vec<u64>,
}

/// A small deterministic generator (xorshift), so runs are repeatable.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn chance(&mut self, p: f64) -> bool {
        (self.next() % 1_000_000) as f64 / 1_000_000.0 < p
    }
}

/// Runs `mix` against the server on `port`.
pub fn run(port: u16, mix: Mix) -> io::Result<LoadReport> {
    run_on(&[port], mix)
}

/// Runs `mix` against the servers on `ports` (front ends of one store):
/// connection `i` goes to `ports[i % ports.len()]`.
pub fn run_on(ports: &[u16], mix: Mix) -> io::Result<LoadReport> {
    let barrier = Arc::new(Barrier::new(mix.connections));
    let handles: Vec<_> = (0..mix.connections)
        .map(|i| {
            let barrier = barrier.clone();
            let port = ports[i % ports.len()];
            std::thread::spawn(move || connection(port, mix, i, &barrier))
        })
        .collect();
    let mut total = LoadReport {
        seconds: mix.duration.as_secs_f64(),
        ..LoadReport::default()
    };
    let mut first_err = None;
    for h in handles {
        match h.join().expect("load generator thread") {
            Ok(r) => {
                total.loads += r.loads;
                total.commits += r.commits;
                total.conflicts += r.conflicts;
                total.load_lat_us.extend(r.load_lat_us);
                total.commit_lat_us.extend(r.commit_lat_us);
            }
            Err(e) => first_err = first_err.or(Some(e)),
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => Ok(total),
    }
}

fn connection(port: u16, mix: Mix, index: usize, barrier: &Barrier) -> io::Result<LoadReport> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15 ^ ((index as u64 + 1) * 0x1234_5678_9ABC));
    let connected = Client::connect(port);
    // Everyone reaches the barrier, even a connection that failed.
    let mut c = match connected {
        Ok(c) => c,
        Err(e) => {
            barrier.wait();
            return Err(e);
        }
    };
    let mut oids = Vec::with_capacity(mix.objects_per_connection);
    while oids.len() < mix.objects_per_connection {
        let n = (mix.objects_per_connection - oids.len()).min(255) as u8;
        oids.extend(c.new_oids(n)?);
    }
    let mut generation = 0u64;
    let data = |g: u64, oid: u64| {
        let mut d = vec![b'r'; 100];
        d[..8].copy_from_slice(&g.to_be_bytes());
        d[8..16].copy_from_slice(&oid.to_be_bytes());
        d
    };
    for chunk in oids.chunks(500) {
        let records: Vec<Vec<u8>> = chunk.iter().map(|&o| make_record(o, &data(0, o))).collect();
        if !c.commit(&records)? {
            return Err(io::Error::other("conflict while writing own objects"));
        }
    }
    barrier.wait();
    let mut report = LoadReport::default();
    let deadline = Instant::now() + mix.duration;
    loop {
        let start = Instant::now();
        if start >= deadline {
            break;
        }
        if rng.chance(mix.commit_fraction) {
            generation += 1;
            let records: Vec<Vec<u8>> = (0..mix.records_per_commit)
                .map(|_| {
                    let o = oids[rng.below(oids.len())];
                    (o, make_record(o, &data(generation, o)))
                })
                .collect::<std::collections::BTreeMap<_, _>>()
                .into_values()
                .collect();
            if c.commit(&records)? {
                report.commits += 1;
                report
                    .commit_lat_us
                    .push(start.elapsed().as_micros() as u64);
            } else {
                report.conflicts += 1;
            }
        } else {
            match c.load(oids[rng.below(oids.len())])? {
                Loaded::Record(_) => {
                    report.loads += 1;
                    report.load_lat_us.push(start.elapsed().as_micros() as u64);
                }
                Loaded::Invalid => {
                    c.sync()?;
                }
                Loaded::Missing => return Err(io::Error::other("own object missing")),
            }
        }
    }
    Ok(report)
}
