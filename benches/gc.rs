//! The collector's costs.
//!
//! `cargo bench --bench gc` measures:
//! 1. reclaiming k garbage objects (k = 1,000 and 10,000) in stores of
//!    10,000 and 1,000,000 live objects: the time follows k, not the store;
//! 2. a full collection of the same stores (it marks every live object);
//! 3. p50/p99 latency of loads and commits with the collector idle against
//!    the collector busy (incremental and full collections running in a
//!    background thread), target within 1.2x;
//! 4. a grace window under load: a commit every 20 ms dropping a 3-object
//!    chain (steady), then a burst that drops many objects at once while the
//!    commits go on: objects stored against live over time, the reclaim
//!    rate, and the commit p99. The window is 2 s here (10 minutes by
//!    default) so that the run takes seconds.
//!
//! `DURUS_BENCH_QUICK=1` uses 100,000 instead of 1,000,000 live objects and
//! fewer operations. Without `--bench` (under `cargo test`) it runs a small
//! smoke version.

use std::ops::ControlFlow;
use std::path::Path;
use std::time::{Duration, Instant};

use durus_redb::{
    IncrementalGc, Manual, ManualGc, Oid, Options, Periodic, Record, RedbStorage, Storage,
};

const FANOUT: usize = 1000;

fn rec(oid: Oid, data: &[u8], refs: &[Oid]) -> Vec<u8> {
    Record::new(oid, data, refs).into_bytes()
}

/// A store of `live` objects under the root (root -> pages -> leaves).
fn build(path: &Path, live: usize) -> RedbStorage {
    let mut s = RedbStorage::open(path, Options::new().checkpoint(Manual).gc(ManualGc)).unwrap();
    let root = s.new_oid().unwrap();
    let mut pages = Vec::new();
    let mut left = live;
    while left > 0 {
        let n = left.min(FANOUT);
        let leaves = s.new_oids(n).unwrap();
        let page = s.new_oid().unwrap();
        s.begin();
        for o in &leaves {
            s.store(*o, rec(*o, &[7u8; 100], &[])).unwrap();
        }
        s.store(page, rec(page, b"page", &leaves)).unwrap();
        s.end().unwrap();
        pages.push(page);
        left -= n;
        if pages.len() % 100 == 0 {
            s.checkpoint().unwrap();
        }
    }
    s.begin();
    s.store(root, rec(root, b"root", &pages)).unwrap();
    s.end().unwrap();
    s.checkpoint().unwrap();
    s
}

/// Commits a chain of `k` objects under the root, then drops it: k garbage
/// objects queued for the incremental collector.
fn make_garbage(s: &mut RedbStorage, k: usize) {
    let root_refs: Vec<Oid> = s.load(Oid::ROOT).unwrap().refs().collect();
    let chain = s.new_oids(k).unwrap();
    s.begin();
    for (i, o) in chain.iter().enumerate() {
        let next: Vec<Oid> = chain.get(i + 1).copied().into_iter().collect();
        s.store(*o, rec(*o, &[1u8; 100], &next)).unwrap();
    }
    let mut with = root_refs.clone();
    with.push(chain[0]);
    s.store(Oid::ROOT, rec(Oid::ROOT, b"root", &with)).unwrap();
    s.end().unwrap();
    s.begin();
    s.store(Oid::ROOT, rec(Oid::ROOT, b"root", &root_refs))
        .unwrap();
    s.end().unwrap();
    s.checkpoint().unwrap();
}

fn percentile(v: &mut [Duration], q: f64) -> Duration {
    v.sort_unstable();
    v[((v.len() - 1) as f64 * q).round() as usize]
}

struct Latency {
    load_p50: Duration,
    load_p99: Duration,
    commit_p50: Duration,
    commit_p99: Duration,
}

/// Loads and commits of one session, timed one by one.
fn measure(s: &mut RedbStorage, live_leaves: &[Oid], ops: usize) -> Latency {
    let mut loads = Vec::with_capacity(ops);
    let mut commits = Vec::with_capacity(ops / 10);
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for i in 0..ops {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let o = live_leaves[(x % live_leaves.len() as u64) as usize];
        if i % 10 == 0 {
            let t = Instant::now();
            s.begin();
            s.store(o, rec(o, &x.to_be_bytes(), &[])).unwrap();
            s.end().unwrap();
            commits.push(t.elapsed());
        } else {
            let t = Instant::now();
            std::hint::black_box(s.load(o).unwrap());
            loads.push(t.elapsed());
        }
    }
    Latency {
        load_p50: percentile(&mut loads, 0.5),
        load_p99: percentile(&mut loads, 0.99),
        commit_p50: percentile(&mut commits, 0.5),
        commit_p99: percentile(&mut commits, 0.99),
    }
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let quick = !bench || std::env::var_os("DURUS_BENCH_QUICK").is_some();
    let sizes: Vec<usize> = if !bench {
        vec![2_000, 10_000]
    } else if quick {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 1_000_000]
    };
    let ks: Vec<usize> = if bench {
        vec![1_000, 10_000]
    } else {
        vec![500]
    };
    let dir = tempfile::tempdir().unwrap();

    println!("## Reclaiming k garbage objects (incremental collector)\n");
    println!("| live objects | k | time | per object | full collection |");
    println!("|---:|---:|---:|---:|---:|");
    for &live in &sizes {
        let path = dir.path().join(format!("live-{live}.redb"));
        let mut s = build(&path, live);
        for &k in &ks {
            make_garbage(&mut s, k);
            let t = Instant::now();
            let r = s.collect_garbage_now().unwrap();
            let took = t.elapsed();
            assert_eq!(r.removed_objects as usize, k, "all garbage reclaimed");
            let t = Instant::now();
            let full = s
                .full_collection(&mut |_| ControlFlow::Continue(()))
                .unwrap();
            let full_took = t.elapsed();
            assert_eq!(full.removed_objects, 0);
            println!(
                "| {live} | {k} | {:.1} ms | {:.1} us | {:.0} ms |",
                took.as_secs_f64() * 1e3,
                us(took) / k as f64,
                full_took.as_secs_f64() * 1e3
            );
        }
        drop(s);
    }

    // Latency with the collector idle and busy.
    let live = if !bench { 10_000 } else { 100_000 };
    let ops = if !bench {
        2_000
    } else if quick {
        20_000
    } else {
        100_000
    };
    let path = dir.path().join("latency.redb");
    drop(build(&path, live));
    let mut s = RedbStorage::open(
        &path,
        Options::new().checkpoint(Periodic::default()).gc(ManualGc),
    )
    .unwrap();
    let leaves: Vec<Oid> = {
        let pages: Vec<Oid> = s.load(Oid::ROOT).unwrap().refs().collect();
        pages
            .iter()
            .flat_map(|p| s.load(*p).unwrap().refs().collect::<Vec<_>>())
            .collect()
    };
    let idle = measure(&mut s, &leaves, ops);
    // Plenty of garbage, then the real collector at work: the default policy
    // (commits take a share; the thread works when commits pause; full
    // collections triggered by the deletions).
    for _ in 0..if bench { 20 } else { 2 } {
        make_garbage(&mut s, 10_000);
    }
    drop(s);
    let mut s = RedbStorage::open(
        &path,
        Options::new().checkpoint(Periodic::default()).gc({
            let mut p = IncrementalGc::default();
            p.full.after_deletions = Some(1_000);
            p.grace = Duration::ZERO;
            p
        }),
    )
    .unwrap();
    let queued = s.gc_state().unwrap().queue_len;
    let busy = measure(&mut s, &leaves, ops);
    let stats = s.gc_stats();
    let rounds = stats.background_rounds;
    assert!(
        stats.incremental_removed > 0,
        "the collector did not run during the measurement"
    );
    println!(
        "\nDuring the busy measurement the collector (commits' shares and the background thread) removed {} objects incrementally and {} in full collections ({} queued at the start).",
        stats.incremental_removed, stats.full_removed, queued
    );
    println!(
        "\n## Latency, collector idle against busy ({live} live objects, {ops} operations, {rounds} collector rounds meanwhile)\n"
    );
    println!("| operation | idle p50 | idle p99 | busy p50 | busy p99 | p99 ratio |");
    println!("|---|---:|---:|---:|---:|---:|");
    println!(
        "| load | {:.1} us | {:.1} us | {:.1} us | {:.1} us | {:.2}x |",
        us(idle.load_p50),
        us(idle.load_p99),
        us(busy.load_p50),
        us(busy.load_p99),
        us(busy.load_p99) / us(idle.load_p99)
    );
    println!(
        "| commit | {:.1} us | {:.1} us | {:.1} us | {:.1} us | {:.2}x |",
        us(idle.commit_p50),
        us(idle.commit_p99),
        us(busy.commit_p50),
        us(busy.commit_p99),
        us(busy.commit_p99) / us(idle.commit_p99)
    );

    grace_under_load(bench, quick, dir.path());
}

/// Section 4: steady and burst loads with a 2 s grace window.
fn grace_under_load(bench: bool, quick: bool, dir: &Path) {
    const LIVE: usize = 300;
    let grace = Duration::from_secs(2);
    let (steady_for, burst) = if !bench {
        (Duration::from_secs(3), 3_000)
    } else if quick {
        (Duration::from_secs(8), 100_000)
    } else {
        (Duration::from_secs(12), 1_000_000)
    };
    let path = dir.join("grace.redb");
    let mut policy = IncrementalGc::default();
    policy.grace = grace;
    let mut s = RedbStorage::open(&path, Options::new().gc(policy)).unwrap();
    let root = s.new_oid().unwrap();
    let live = s.new_oids(LIVE).unwrap();
    s.begin();
    for o in &live {
        s.store(*o, rec(*o, &[1u8; 100], &[])).unwrap();
    }
    s.store(root, rec(root, b"root", &live)).unwrap();
    s.end().unwrap();
    let mut chain: Vec<Oid> = Vec::new();
    let mut lat: Vec<Duration> = Vec::new();
    let mut samples: Vec<(f64, u64, u64)> = Vec::new();
    let started = Instant::now();
    let mut next_sample = Duration::ZERO;
    let mut burst_at: Option<Instant> = None;
    let mut burst_gone: Option<Duration> = None;
    let removed_before = s.gc_stats().incremental_removed;
    // The steady load, then the burst, then the steady load until the
    // burst is reclaimed (bounded).
    let total = steady_for * 2 + grace + Duration::from_secs(if bench { 60 } else { 10 });
    while started.elapsed() < total {
        let t = Instant::now();
        let new = s.new_oids(3).unwrap();
        s.begin();
        s.store(new[2], rec(new[2], &[3u8; 100], &[])).unwrap();
        s.store(new[1], rec(new[1], &[3u8; 100], &[new[2]]))
            .unwrap();
        s.store(new[0], rec(new[0], &[3u8; 100], &[new[1]]))
            .unwrap();
        let mut refs = live.clone();
        refs.push(new[0]);
        s.store(root, rec(root, b"root", &refs)).unwrap();
        s.end().unwrap();
        lat.push(t.elapsed());
        chain = new;
        if burst_at.is_none() && started.elapsed() >= steady_for {
            // The burst: `burst` objects in chains of 1,000, committed and
            // dropped in the same breath.
            let mut left = burst;
            while left > 0 {
                make_garbage(&mut s, left.min(1_000));
                left = left.saturating_sub(1_000);
            }
            burst_at = Some(Instant::now());
        }
        if started.elapsed() >= next_sample {
            let st = s.stats().unwrap();
            samples.push((started.elapsed().as_secs_f64(), st.objects, st.gc_queue));
            next_sample += Duration::from_millis(500);
            if let Some(at) = burst_at
                && burst_gone.is_none()
                && st.objects <= (LIVE + 1 + 3 * 200) as u64
            {
                burst_gone = Some(at.elapsed());
            }
        }
        if burst_gone.is_some() && started.elapsed() > steady_for * 2 + grace {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = chain;
    let elapsed = started.elapsed();
    let removed = s.gc_stats().incremental_removed - removed_before;
    let commits = lat.len();
    let p50 = percentile(&mut lat, 0.50);
    let p99 = percentile(&mut lat, 0.99);
    println!(
        "\n## A {}-s grace window under load ({LIVE} live objects, a commit every 20 ms dropping a 3-object chain; a burst of {burst} objects at {:.0} s)\n",
        grace.as_secs(),
        steady_for.as_secs_f64()
    );
    println!("| time s | objects stored | queued (waiting or due) |");
    println!("|---:|---:|---:|");
    for (t, stored, queued) in &samples {
        println!("| {t:.1} | {stored} | {queued} |");
    }
    println!(
        "\n{commits} commits in {:.1} s; commit p50 {:.2} ms, p99 {:.2} ms; {removed} objects reclaimed ({:.0}/s over the run); the burst was reclaimed {} after it was dropped (window {} s).",
        elapsed.as_secs_f64(),
        p50.as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        removed as f64 / elapsed.as_secs_f64(),
        match burst_gone {
            Some(d) => format!("{:.1} s", d.as_secs_f64()),
            None => "not within the run".into(),
        },
        grace.as_secs()
    );
    // Bounded: after the window the steady garbage never piles up.
    let steady_max = samples
        .iter()
        .filter(|(t, _, _)| *t > grace.as_secs_f64() + 1.0 && *t < steady_for.as_secs_f64())
        .map(|(_, stored, _)| *stored)
        .max()
        .unwrap_or(0);
    println!("Largest store during the steady load after the first window: {steady_max} objects.");
    assert!(
        burst_gone.is_some(),
        "the burst was not reclaimed within the run"
    );
}
