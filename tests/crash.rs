//! Crash tests: a child process commits numbered transactions and prints each
//! acknowledged number; the parent kills it with SIGKILL at a random moment,
//! reopens the store and checks what survived.
//!
//! The child is this test binary run again with `DURUS_REDB_CRASH_CHILD` set.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use durus_redb::{
    Durability, Oid, Options, Periodic, Record, RedbStorage, Storage, check_store, repair_store,
};

const CHILD_ENV: &str = "DURUS_REDB_CRASH_CHILD";
const POLICY_ENV: &str = "DURUS_REDB_CRASH_POLICY";

/// The checkpoint bound of the rounds without a log: their loss window.
const WINDOW_COMMITS: u64 = 25;

fn options(mode: &str) -> Options {
    match mode {
        "manual" => Options::new()
            .durability(Durability::Manual)
            .checkpoint(Periodic::new(
                Duration::from_secs(3600),
                WINDOW_COMMITS,
                u64::MAX,
            )),
        // A long interval: only the log keeps acknowledged commits.
        "os" => Options::new().durability(Durability::Os {
            fsync_interval: Duration::from_secs(3600),
        }),
        _ => Options::new().durability(Durability::Fsync),
    }
}

/// Commits forever: transaction n stores a new object with data n that
/// references the previous one, and points the root at it. Prints n once
/// `end()` has returned.
fn child(path: &Path, policy: &str) {
    let mut s = RedbStorage::open(path, options(policy)).unwrap();
    let mut head = match s.load(Oid::ROOT) {
        Ok(r) => r.refs().next(),
        Err(_) => None,
    };
    let mut n: u64 = match head {
        Some(h) => decode(&s.load(h).unwrap()) + 1,
        None => 0,
    };
    let stdout = std::io::stdout();
    loop {
        // The root is written without being allocated; on a new store the
        // first oid handed out is the root (and a Periodic round killed
        // before its first checkpoint leaves a store without a root but
        // with oids reserved).
        let oid = loop {
            let o = s.new_oid().unwrap();
            if o != Oid::ROOT {
                break o;
            }
        };
        let prev: Vec<Oid> = head.into_iter().collect();
        s.begin();
        s.store(oid, Record::new(oid, &n.to_be_bytes(), &prev).into_bytes())
            .unwrap();
        s.store(
            Oid::ROOT,
            Record::new(Oid::ROOT, b"root", &[oid]).into_bytes(),
        )
        .unwrap();
        s.end().unwrap();
        let mut out = stdout.lock();
        writeln!(out, "{n}").unwrap();
        out.flush().unwrap();
        head = Some(oid);
        n += 1;
    }
}

fn decode(r: &Record) -> u64 {
    u64::from_be_bytes(r.data().try_into().expect("8-byte counter"))
}

/// Every number on the chain from the root.
fn survivors(path: &Path) -> Vec<u64> {
    let mut s = RedbStorage::open(path, Options::default()).unwrap();
    let mut out = Vec::new();
    let mut next = s.load(Oid::ROOT).ok().and_then(|r| r.refs().next());
    while let Some(oid) = next {
        let r = s.load(oid).unwrap();
        out.push(decode(&r));
        next = r.refs().next();
    }
    s.close().unwrap();
    out.reverse();
    out
}

/// Runs the child, kills it after `after`, returns the acknowledged numbers.
/// Held while a child is spawned, and while a test closes a store and
/// opens it again: the tests of this file run in threads of one process,
/// and a child spawned by one of them holds a copy of every open file of
/// the process until it execs, with the locks of those files. A store
/// closed by another thread in that instant stays locked, and opening it
/// again fails with `AlreadyOpen`.
static STORE_HANDOVER: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn run_and_kill(path: &Path, policy: &str, after: Duration) -> Vec<u64> {
    let exe = std::env::current_exe().unwrap();
    let spawning = STORE_HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
    let mut child = Command::new(exe)
        .args([
            "--ignored",
            "--exact",
            "child_entry_point",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, path)
        .env(POLICY_ENV, policy)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    drop(spawning);
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Ok(n) = line.trim().parse::<u64>() {
                let _ = tx.send(n);
            }
        }
    });
    // Wait for the first acknowledgment (bounded), then let it run a while.
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while acked.is_empty() && Instant::now() < deadline {
        if let Ok(n) = rx.recv_timeout(Duration::from_millis(50)) {
            acked.push(n);
        }
    }
    assert!(!acked.is_empty(), "child never acknowledged a commit");
    std::thread::sleep(after);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    acked.extend(rx.try_iter());
    acked
}

/// The child process of the crash tests, run by them with `--ignored` and
/// the store's path in the environment; never a test on its own.
#[test]
#[ignore = "the child process of the crash tests"]
fn child_entry_point() {
    let path =
        std::env::var(CHILD_ENV).expect("run by the crash tests, which set the store's path");
    child(
        Path::new(&path),
        &std::env::var(POLICY_ENV).unwrap_or_default(),
    );
}

/// A cheap deterministic pseudo-random sequence for kill times.
fn kill_times(seed: u64, n: usize) -> Vec<Duration> {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Duration::from_millis(5 + x % 120)
        })
        .collect()
}

fn seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
        | 1
}

#[test]
fn acknowledged_commits_survive_sigkill_with_fsync_durability() {
    no_acknowledged_commit_lost("fsync");
}

#[test]
fn acknowledged_commits_survive_sigkill_with_os_durability() {
    no_acknowledged_commit_lost("os");
}

fn no_acknowledged_commit_lost(mode: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let seed = seed();
    let mut last_acked = None;
    for (round, after) in kill_times(seed, 20).into_iter().enumerate() {
        let acked = run_and_kill(&path, mode, after);
        let _handover = STORE_HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
        // A check after the crash reads only: the file and the log are
        // exactly as the crash left them.
        let before = common::store_files(&path);
        let read_only = check_store(&path).unwrap();
        assert!(read_only.integrity_ok && read_only.references.is_clean());
        assert!(
            before == common::store_files(&path),
            "round {round}: check wrote"
        );
        // The repair applies the log.
        let check = repair_store(&path).unwrap();
        assert!(
            check.integrity_ok,
            "round {round} (seed {seed}): redb integrity"
        );
        assert!(
            check.references.is_clean(),
            "round {round} (seed {seed}): {:?}",
            check.references
        );
        let present = survivors(&path);
        // The chain is 0..=k without holes, and covers every acknowledged number.
        assert!(
            present.iter().copied().eq(0..present.len() as u64),
            "round {round}: chain has holes"
        );
        let max_acked = *acked.iter().max().unwrap();
        assert!(
            present.len() as u64 > max_acked,
            "round {round} (seed {seed}): acknowledged {max_acked} but only 0..{} survived",
            present.len()
        );
        if let Some(prev) = last_acked {
            assert!(max_acked > prev, "round {round}: no progress");
        }
        last_acked = Some(max_acked);
    }
}

#[test]
fn manual_durability_loses_at_most_its_checkpoint_window_on_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let seed = seed();
    let mut lost_any = false;
    for (round, after) in kill_times(seed, 10).into_iter().enumerate() {
        let acked = run_and_kill(&path, "manual", after);
        let _handover = STORE_HANDOVER.lock().unwrap_or_else(|e| e.into_inner());
        let check = repair_store(&path).unwrap();
        assert!(
            check.integrity_ok && check.references.is_clean(),
            "round {round}"
        );
        let present = survivors(&path);
        assert!(
            present.iter().copied().eq(0..present.len() as u64),
            "round {round}: chain has holes"
        );
        let max_acked = *acked.iter().max().unwrap();
        let kept = present.len() as u64;
        let lost = (max_acked + 1).saturating_sub(kept);
        lost_any |= lost > 0;
        assert!(
            lost < WINDOW_COMMITS,
            "round {round} (seed {seed}): lost {lost} acknowledged commits, window is {WINDOW_COMMITS}"
        );
    }
    // Not required for correctness, but shows the window is real: with
    // checkpoints only every 25 commits a kill almost always lands inside one.
    assert!(
        lost_any,
        "Durability::Manual never lost a commit: is it really deferring durability?"
    );
}
