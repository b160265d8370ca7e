//! The garbage collector: property tests against the model, commits racing a
//! full collection, and SIGKILL during collections.

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::ops::ControlFlow;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use durus_redb::{
    Conflict, GcAction, GcFacts, GcPolicy, IncrementalGc, ManualGc, MemoryStorage, Oid, Options,
    Record, RedbStorage, Storage, StorageError,
};
use proptest::prelude::*;
use proptest::sample::Index;

fn rec(oid: Oid, data: &[u8], refs: &[Oid]) -> Vec<u8> {
    Record::new(oid, data, refs).into_bytes()
}

fn manual(path: &Path) -> RedbStorage {
    RedbStorage::open(path, Options::default().gc(ManualGc)).unwrap()
}

fn stored(s: &mut RedbStorage) -> BTreeSet<Oid> {
    s.iter_records()
        .unwrap()
        .map(|r| r.unwrap().oid())
        .collect()
}

// ---------------------------------------------------------------- model

#[derive(Debug, Clone)]
enum Op {
    /// A new object referencing `refs` (any oid ever made), linked from
    /// `parent` (a reachable object) unless `parent` is None.
    Add {
        parent: Option<Index>,
        refs: Vec<Index>,
    },
    /// A reachable object's refs replaced by `refs` (any oid ever made):
    /// drops objects, re-references dropped ones, makes cycles.
    Rewire { target: Index, refs: Vec<Index> },
    /// One incremental step of at most `batch` objects.
    Step(usize),
    /// The incremental collector until its queue is empty.
    Drain,
    /// A full collection.
    Full,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (prop::option::weighted(0.85, any::<Index>()), prop::collection::vec(any::<Index>(), 0..3))
            .prop_map(|(parent, refs)| Op::Add { parent, refs }),
        4 => (any::<Index>(), prop::collection::vec(any::<Index>(), 0..3))
            .prop_map(|(target, refs)| Op::Rewire { target, refs }),
        3 => (1usize..6).prop_map(Op::Step),
        1 => Just(Op::Drain),
        1 => Just(Op::Full),
    ]
}

/// The refs of `oid` in the model (empty if absent).
fn model_refs(model: &mut MemoryStorage, oid: Oid) -> Vec<Oid> {
    model
        .load(oid)
        .map(|r| r.refs().collect())
        .unwrap_or_default()
}

/// Commits `records` to both; if the store refuses with dangling refs, each
/// missing oid must be garbage in the model and gone from the store, and the
/// model does not commit either.
fn commit_both(
    redb: &mut RedbStorage,
    model: &mut MemoryStorage,
    records: &[(Oid, Vec<u8>)],
) -> Result<bool, TestCaseError> {
    redb.begin();
    model.begin();
    for (o, r) in records {
        redb.store(*o, r.clone()).unwrap();
        model.store(*o, r.clone()).unwrap();
    }
    match redb.end() {
        Ok(()) => {
            model.end().unwrap();
            Ok(true)
        }
        Err(StorageError::Conflict(Conflict::DanglingRefs { oids })) => {
            let reachable = model.reachable();
            for o in oids {
                prop_assert!(
                    !reachable.contains(&o),
                    "a commit was refused for a reachable oid {o}"
                );
                prop_assert!(matches!(redb.load(o), Err(StorageError::NotFound(_))));
            }
            model.abort();
            Ok(false)
        }
        Err(e) => Err(TestCaseError::fail(format!("unexpected refusal: {e}"))),
    }
}

/// The default policy without a grace window: garbage goes at once.
fn no_grace() -> IncrementalGc {
    let mut p = IncrementalGc::default();
    p.grace = Duration::ZERO;
    p
}

/// No collector thread; every commit deletes up to the given number of queued
/// objects in its own transaction (as the default policy has commits do).
#[derive(Debug)]
struct CommitShare(usize);

impl GcPolicy for CommitShare {
    fn background(&self) -> bool {
        false
    }
    fn decide(&self, _: &GcFacts) -> GcAction {
        GcAction::Wait(Duration::from_secs(3600))
    }
    fn in_commit(&self) -> usize {
        self.0
    }
}

fn run(ops: Vec<Op>, share: usize) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gc.redb");
    let mut redb = RedbStorage::open(&path, Options::default().gc(CommitShare(share))).unwrap();
    let mut model = MemoryStorage::new();
    let root = redb.new_oid().unwrap();
    assert_eq!(model.new_oid().unwrap(), root);
    commit_both(&mut redb, &mut model, &[(root, rec(root, b"root", &[]))])?;
    let mut made: Vec<Oid> = vec![root];
    for (n, op) in ops.into_iter().enumerate() {
        match op {
            Op::Add { parent, refs } => {
                let o = redb.new_oid().unwrap();
                let m = model.new_oid().unwrap();
                prop_assert_eq!(o, m);
                let refs: Vec<Oid> = refs.iter().map(|i| *i.get(&made)).collect();
                let mut records = vec![(o, rec(o, format!("n{n}").as_bytes(), &refs))];
                if let Some(p) = parent {
                    let reachable: Vec<Oid> = model.reachable().into_iter().collect();
                    let p = *p.get(&reachable);
                    let mut prefs = model_refs(&mut model, p);
                    prefs.push(o);
                    records.push((p, rec(p, format!("p{n}").as_bytes(), &prefs)));
                }
                commit_both(&mut redb, &mut model, &records)?;
                made.push(o);
            }
            Op::Rewire { target, refs } => {
                let reachable: Vec<Oid> = model.reachable().into_iter().collect();
                let t = *target.get(&reachable);
                let refs: Vec<Oid> = refs.iter().map(|i| *i.get(&made)).collect();
                commit_both(
                    &mut redb,
                    &mut model,
                    &[(t, rec(t, format!("w{n}").as_bytes(), &refs))],
                )?;
            }
            Op::Step(batch) => {
                redb.gc_step(batch).unwrap();
            }
            Op::Drain => {
                let r = redb.collect_garbage_now().unwrap();
                prop_assert_eq!(r.queue_left, 0);
            }
            Op::Full => {
                let r = redb
                    .full_collection(&mut |_| ControlFlow::Continue(()))
                    .unwrap();
                prop_assert!(r.completed);
                let want = model.reachable();
                prop_assert_eq!(stored(&mut redb), want, "after a full collection");
            }
        }
        // Nothing reachable is ever deleted or changed.
        for o in model.reachable() {
            let got = redb.load(o);
            prop_assert!(got.is_ok(), "reachable {o} missing after {n} steps");
            prop_assert_eq!(got.unwrap(), model.load(o).unwrap());
        }
        // Whatever the store holds agrees with the model.
        for o in stored(&mut redb) {
            prop_assert_eq!(redb.load(o).unwrap(), model.load(o).unwrap());
        }
    }
    let r = redb
        .full_collection(&mut |_| ControlFlow::Continue(()))
        .unwrap();
    prop_assert!(r.completed);
    prop_assert_eq!(stored(&mut redb), model.reachable());
    let check = redb.check_references().unwrap();
    prop_assert!(check.is_clean(), "{check:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]
    #[test]
    fn collector_never_deletes_reachable_and_full_collection_leaves_exactly_the_reachable(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        run(ops, 0)?;
    }

    /// The same with every commit taking a share of the collector's work.
    #[test]
    fn commits_that_collect_never_delete_reachable_objects(
        ops in prop::collection::vec(op(), 1..60),
        share in 1usize..4,
    ) {
        run(ops, share)?;
    }
}

#[test]
fn incremental_collection_releases_chains_transitively_but_not_cycles() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = manual(&dir.path().join("g.redb"));
    let root = s.new_oid().unwrap();
    let chain = s.new_oids(50).unwrap();
    let cycle = s.new_oids(2).unwrap();
    let lone = s.new_oid().unwrap();
    s.begin();
    for (i, o) in chain.iter().enumerate() {
        let next: Vec<Oid> = chain.get(i + 1).copied().into_iter().collect();
        s.store(*o, rec(*o, b"c", &next)).unwrap();
    }
    s.store(cycle[0], rec(cycle[0], b"a", &[cycle[1]])).unwrap();
    s.store(cycle[1], rec(cycle[1], b"b", &[cycle[0]])).unwrap();
    s.store(lone, rec(lone, b"never referenced", &[])).unwrap();
    s.store(root, rec(root, b"root", &[chain[0], cycle[0]]))
        .unwrap();
    s.end().unwrap();
    s.begin();
    s.store(root, rec(root, b"root", &[])).unwrap();
    s.end().unwrap();
    let mut watcher = s.new_session();
    let r = s.collect_garbage_now().unwrap();
    // The whole chain goes: each deletion releases the next.
    assert_eq!(r.removed_objects, 50);
    for o in &chain {
        assert!(matches!(s.load(*o), Err(StorageError::NotFound(_))));
    }
    // Removed oids reach every other session's sync.
    let synced: BTreeSet<Oid> = watcher.sync().unwrap().into_iter().collect();
    assert!(chain.iter().all(|o| synced.contains(o)));
    // A cycle and a never-referenced object wait for a full collection.
    assert!(s.load(cycle[0]).is_ok() && s.load(lone).is_ok());
    let r = s
        .full_collection(&mut |_| ControlFlow::Continue(()))
        .unwrap();
    assert_eq!(r.removed_objects, 3);
    assert_eq!(stored(&mut s), [root].into_iter().collect());
    assert!(s.check_references().unwrap().is_clean());
}

#[test]
fn the_background_collector_reclaims_by_itself() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = RedbStorage::open(
        dir.path().join("bg.redb"),
        Options::default().gc(no_grace()),
    )
    .unwrap();
    let root = s.new_oid().unwrap();
    let objs = s.new_oids(300).unwrap();
    s.begin();
    for o in &objs {
        s.store(*o, rec(*o, b"x", &[])).unwrap();
    }
    s.store(root, rec(root, b"root", &objs)).unwrap();
    s.end().unwrap();
    s.begin();
    s.store(root, rec(root, b"root", &objs[..100])).unwrap();
    s.end().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while stored(&mut s).len() != 101 {
        assert!(
            Instant::now() < deadline,
            "the background collector did nothing"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    for o in &objs[..100] {
        assert!(s.load(*o).is_ok());
    }
}

// ---------------------------------------------------------------- concurrency

/// While a full collection runs (slowed down between chunks), another session
/// keeps linking objects that were garbage when the collection started back
/// under the root. Every link that committed keeps its object.
///
/// Two defences keep them: the sweep marks from every oid committed since
/// the collection began, and it deletes only sets that nothing outside them
/// references (checked against the reference counts in its own
/// transaction). Either one suffices; this test fails when both are gone.
#[test]
fn commits_that_rescue_garbage_during_a_full_collection_lose_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut s = manual(&dir.path().join("c.redb"));
    let root = s.new_oid().unwrap();
    // 200 garbage cycles of 50 objects each, and a live list.
    let live = s.new_oids(100).unwrap();
    s.begin();
    for o in &live {
        s.store(*o, rec(*o, b"live", &[])).unwrap();
    }
    s.store(root, rec(root, b"root", &live)).unwrap();
    s.end().unwrap();
    let mut cycles: Vec<Vec<Oid>> = Vec::new();
    for _ in 0..200 {
        let c = s.new_oids(50).unwrap();
        s.begin();
        for (i, o) in c.iter().enumerate() {
            s.store(*o, rec(*o, b"cyc", &[c[(i + 1) % c.len()]]))
                .unwrap();
        }
        s.end().unwrap();
        cycles.push(c);
    }
    let collecting = Arc::new(AtomicBool::new(true));
    let collector = {
        let s = s.new_session();
        let flag = collecting.clone();
        std::thread::spawn(move || {
            let r = s
                .full_collection(&mut |_| {
                    std::thread::sleep(Duration::from_millis(2));
                    ControlFlow::Continue(())
                })
                .unwrap();
            flag.store(false, Ordering::Release);
            r
        })
    };
    // Rescue cycles one by one while the collection runs.
    let mut rescued = Vec::new();
    let mut refused = 0;
    let mut refs = live.clone();
    for c in &cycles {
        if !collecting.load(Ordering::Acquire) {
            break;
        }
        s.sync().unwrap();
        s.begin();
        let mut with = refs.clone();
        with.push(c[0]);
        s.store(root, rec(root, b"root", &with)).unwrap();
        match s.end() {
            Ok(()) => {
                refs = with;
                rescued.push(c.clone());
            }
            Err(e) if e.is_conflict() => refused += 1,
            Err(e) => panic!("{e}"),
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let report = collector.join().unwrap();
    assert!(report.completed);
    assert!(
        !rescued.is_empty(),
        "no rescue happened during the collection (refused {refused})"
    );
    for c in &rescued {
        for o in c {
            assert!(s.load(*o).is_ok(), "rescued object {o} was collected");
        }
    }
    assert!(s.check_references().unwrap().is_clean());
    // A second collection removes exactly what is still garbage.
    s.full_collection(&mut |_| ControlFlow::Continue(()))
        .unwrap();
    let want = 1 + live.len() + rescued.len() * 50;
    assert_eq!(stored(&mut s).len(), want);
}

/// Sessions commit without pause, on threads of their own, while the
/// background collector reclaims a backlog and the checkpoint thread runs:
/// the collector's steps are cut short by waiting committers and handed to
/// them, some of those commits are refused (a dangling reference) and undo
/// the deletion they carried. Nothing reachable is lost, nothing hangs, and
/// once the commits stop every piece of garbage goes.
#[test]
fn commits_flowing_through_a_busy_collector_lose_nothing_and_leave_no_garbage() {
    // On a thread of its own, so that a hang (a writer waiting for redb's
    // writer for ever) fails the test instead of stalling the run.
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let r = std::panic::catch_unwind(busy_collector_body);
        let _ = tx.send(r.is_ok());
    });
    match rx.recv_timeout(Duration::from_secs(120)) {
        Ok(passed) => assert!(passed, "the test failed (see its panic above)"),
        Err(_) => panic!("hung for 2 minutes"),
    }
}

fn busy_collector_body() {
    const WRITERS: usize = 3;
    const CHAIN: usize = 5;
    let dir = tempfile::tempdir().unwrap();
    let mut s = RedbStorage::open(
        dir.path().join("flow.redb"),
        Options::default().gc({
            let mut p = no_grace();
            // No full collection: it would take what the steps leave.
            p.full = durus_redb::FullTriggers::never();
            p
        }),
    )
    .unwrap();
    let root = s.new_oid().unwrap();
    let shared = s.new_oid().unwrap();
    let slots = s.new_oids(WRITERS).unwrap();
    s.begin();
    for o in &slots {
        s.store(*o, rec(*o, b"slot", &[])).unwrap();
    }
    s.store(shared, rec(shared, b"shared", &[])).unwrap();
    let mut top = slots.clone();
    top.push(shared);
    s.store(root, rec(root, b"root", &top)).unwrap();
    s.end().unwrap();
    // A backlog: 20 chains of 1,000 objects, linked and let go.
    for _ in 0..20 {
        let chain = s.new_oids(1_000).unwrap();
        s.begin();
        for (i, o) in chain.iter().enumerate() {
            let next: Vec<Oid> = chain.get(i + 1).copied().into_iter().collect();
            s.store(*o, rec(*o, b"old", &next)).unwrap();
        }
        s.store(shared, rec(shared, b"shared", &chain[..1]))
            .unwrap();
        s.end().unwrap();
        s.begin();
        s.store(shared, rec(shared, b"shared", &[])).unwrap();
        s.end().unwrap();
    }
    let stop = Arc::new(AtomicBool::new(false));
    let writers: Vec<_> = slots
        .iter()
        .enumerate()
        .map(|(w, &slot)| {
            let mut s = s.new_session();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let (mut committed, mut refused) = (0u32, 0u32);
                let mut last = Vec::new();
                for i in 0u32.. {
                    if stop.load(Ordering::Acquire) {
                        break;
                    }
                    // Every 7th commit names an oid that does not exist:
                    // refused inside its transaction, with whatever deletion
                    // it carried.
                    let dangling = i % 7 == 0;
                    s.sync().unwrap();
                    let chain = s.new_oids(CHAIN).unwrap();
                    s.begin();
                    for (k, o) in chain.iter().enumerate() {
                        let next: Vec<Oid> = chain.get(k + 1).copied().into_iter().collect();
                        let data = format!("w{w} i{i}");
                        s.store(*o, rec(*o, data.as_bytes(), &next)).unwrap();
                    }
                    let mut refs = vec![chain[0]];
                    if dangling {
                        refs.push(Oid(1 << 40));
                    }
                    s.store(slot, rec(slot, b"slot", &refs)).unwrap();
                    match s.end() {
                        Ok(()) => {
                            committed += 1;
                            last = chain.iter().map(|o| (*o, format!("w{w} i{i}"))).collect();
                        }
                        Err(e) if dangling && e.is_conflict() => refused += 1,
                        Err(e) => panic!("writer {w}: {e}"),
                    }
                }
                (committed, refused, last)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Release);
    let mut live: BTreeSet<Oid> = [root, shared]
        .into_iter()
        .chain(slots.iter().copied())
        .collect();
    for w in writers {
        let (committed, refused, last) = w.join().unwrap();
        assert!(committed > 0, "a writer committed nothing");
        assert!(refused > 0, "no commit was refused");
        for (o, data) in last {
            assert_eq!(s.load(o).unwrap().data(), data.as_bytes(), "{o} lost");
            live.insert(o);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        s.sync().unwrap();
        if stored(&mut s) == live {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "garbage left after the commits stopped: {} stored, {} live, {} queued",
            stored(&mut s).len(),
            live.len(),
            s.gc_state().unwrap().queue_len
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(s.check_references().unwrap().is_clean());
}

// ---------------------------------------------------------------- crash

const CHILD_ENV: &str = "DURUS_REDB_GC_CRASH_CHILD";
const LIVE: usize = 500;

/// The child: builds the live set once, then forever makes garbage (chains
/// and cycles, in commits) and collects it, incrementally, in the
/// background and with full collections. Run only as the crash test's
/// child process (`--ignored`, with the store's path in the environment).
#[test]
#[ignore = "the child process of sigkill_during_collections_loses_nothing_live_and_leaves_a_clean_store"]
fn gc_crash_child_entry_point() {
    let path = std::env::var_os(CHILD_ENV)
        .expect("run by the crash test, which sets DURUS_REDB_GC_CRASH_CHILD");
    let mut s = RedbStorage::open(&path, Options::default().gc(no_grace())).unwrap();
    if s.load(Oid::ROOT).is_err() {
        let root = s.new_oid().unwrap();
        let live = s.new_oids(LIVE).unwrap();
        s.begin();
        for (i, o) in live.iter().enumerate() {
            let refs: Vec<Oid> = live.get(i + 1).copied().into_iter().collect();
            s.store(*o, rec(*o, b"live", &refs)).unwrap();
        }
        s.store(root, rec(root, b"root", &live[..1])).unwrap();
        s.end().unwrap();
    }
    let root_rec = s.load(Oid::ROOT).unwrap();
    let root_refs: Vec<Oid> = root_rec.refs().collect();
    let out = std::io::stdout();
    writeln!(out.lock(), "ready").unwrap();
    out.lock().flush().unwrap();
    loop {
        for batch in 0..6 {
            let cyclic = batch % 2 == 0;
            let g = s.new_oids(80).unwrap();
            s.begin();
            for (i, o) in g.iter().enumerate() {
                // Chains (reclaimed incrementally) and cycles (only by a
                // full collection).
                let next = if i + 1 < g.len() {
                    vec![g[i + 1]]
                } else if cyclic {
                    vec![g[0]]
                } else {
                    vec![]
                };
                s.store(*o, rec(*o, b"garbage", &next)).unwrap();
            }
            let mut with = root_refs.clone();
            with.push(g[0]);
            s.store(Oid::ROOT, rec(Oid::ROOT, b"root", &with)).unwrap();
            s.end().unwrap();
            s.begin();
            s.store(Oid::ROOT, rec(Oid::ROOT, b"root", &root_refs))
                .unwrap();
            s.end().unwrap();
        }
        s.collect_garbage_now().unwrap();
        s.full_collection(&mut |_| ControlFlow::Continue(()))
            .unwrap();
    }
}

#[test]
fn sigkill_during_collections_loses_nothing_live_and_leaves_a_clean_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.redb");
    let mut seed = 0x1234_5678_9abc_def1u64;
    for round in 0..10 {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "gc_crash_child_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, &path)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if line.contains("ready") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the child got ready");
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        std::thread::sleep(Duration::from_millis(50 + seed % 400));
        child.kill().unwrap();
        child.wait().unwrap();

        let mut s = manual(&path);
        let check = s.check_references().unwrap();
        assert!(check.is_clean(), "round {round}: {check:?}");
        // The live chain is all there (the root may also hold one batch of
        // garbage-to-be, if the kill came between its two commits).
        let mut next = s.load(Oid::ROOT).unwrap().refs().next();
        let mut live = 0;
        while let Some(o) = next {
            let r = s
                .load(o)
                .unwrap_or_else(|e| panic!("round {round}: live object {o} lost: {e}"));
            assert_eq!(r.data(), b"live");
            live += 1;
            next = r.refs().next();
        }
        assert_eq!(live, LIVE, "round {round}: the live chain is cut");
        let reachable: BTreeSet<Oid> = s.traverse(Oid::ROOT).map(|r| r.unwrap().oid()).collect();
        // A collection completes and leaves exactly what is reachable.
        let r = s
            .full_collection(&mut |_| ControlFlow::Continue(()))
            .unwrap();
        assert!(r.completed);
        assert_eq!(stored(&mut s), reachable, "round {round}");
        drop(s);
    }
}

// ---------------------------------------------------------------- grace window

/// Commits take a share of the collector's work (no thread), with a grace
/// window the test sets: long (nothing dropped may go) or zero (the window
/// has passed).
#[derive(Debug)]
struct Windowed {
    grace_ms: Arc<std::sync::atomic::AtomicU64>,
}

impl GcPolicy for Windowed {
    fn background(&self) -> bool {
        false
    }
    fn decide(&self, _: &GcFacts) -> GcAction {
        GcAction::Wait(Duration::from_secs(3600))
    }
    fn in_commit(&self) -> usize {
        4
    }
    fn grace(&self) -> Duration {
        Duration::from_millis(self.grace_ms.load(Ordering::Acquire))
    }
}

fn run_windowed(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grace.redb");
    let grace_ms = Arc::new(std::sync::atomic::AtomicU64::new(3_600_000));
    let policy = Windowed {
        grace_ms: grace_ms.clone(),
    };
    let mut redb = RedbStorage::open(&path, Options::default().gc(policy)).unwrap();
    let mut model = MemoryStorage::new();
    let root = redb.new_oid().unwrap();
    assert_eq!(model.new_oid().unwrap(), root);
    commit_both(&mut redb, &mut model, &[(root, rec(root, b"root", &[]))])?;
    let mut made: Vec<Oid> = vec![root];
    // Within the window: every commit, also one that references an object
    // a commit before it dropped (with what that object references), is
    // accepted, and nothing ever made is deleted.
    for (n, op) in ops.into_iter().enumerate() {
        let records = match op {
            Op::Add { parent, refs } => {
                let o = redb.new_oid().unwrap();
                prop_assert_eq!(o, model.new_oid().unwrap());
                let refs: Vec<Oid> = refs.iter().map(|i| *i.get(&made)).collect();
                let mut records = vec![(o, rec(o, format!("n{n}").as_bytes(), &refs))];
                if let Some(p) = parent {
                    let reachable: Vec<Oid> = model.reachable().into_iter().collect();
                    let p = *p.get(&reachable);
                    let mut prefs = model_refs(&mut model, p);
                    prefs.push(o);
                    records.push((p, rec(p, format!("p{n}").as_bytes(), &prefs)));
                }
                made.push(o);
                records
            }
            Op::Rewire { target, refs } => {
                let reachable: Vec<Oid> = model.reachable().into_iter().collect();
                let t = *target.get(&reachable);
                let refs: Vec<Oid> = refs.iter().map(|i| *i.get(&made)).collect();
                vec![(t, rec(t, format!("w{n}").as_bytes(), &refs))]
            }
            // Explicit collections ignore the window: not part of this test.
            Op::Step(_) | Op::Drain | Op::Full => continue,
        };
        prop_assert!(
            commit_both(&mut redb, &mut model, &records)?,
            "a commit inside the grace window was refused"
        );
        let all: BTreeSet<Oid> = made.iter().copied().collect();
        prop_assert_eq!(stored(&mut redb), all, "an object went inside its window");
        for o in model.reachable() {
            prop_assert_eq!(redb.load(o).unwrap(), model.load(o).unwrap());
        }
    }
    // The window passes: commits' shares reclaim the dropped objects that
    // are not in cycles, and nothing reachable.
    grace_ms.store(0, Ordering::Release);
    for _ in 0..10_000 {
        if redb.gc_state().unwrap().queue_len == 0 {
            break;
        }
        let refs = model_refs(&mut model, root);
        commit_both(&mut redb, &mut model, &[(root, rec(root, b"root", &refs))])?;
    }
    prop_assert_eq!(redb.gc_state().unwrap().queue_len, 0);
    let reachable = model.reachable();
    let left = stored(&mut redb);
    prop_assert!(left.is_superset(&reachable));
    // What is left beyond the reachable set is cyclic garbage (or objects
    // never referenced): a full collection takes it, and then the store
    // equals the reachable set.
    let r = redb
        .full_collection(&mut |_| ControlFlow::Continue(()))
        .unwrap();
    prop_assert!(r.completed);
    prop_assert_eq!(stored(&mut redb), reachable);
    let check = redb.check_references().unwrap();
    prop_assert!(check.is_clean(), "{check:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]
    /// The grace window against the model: inside it no dropped object is
    /// deleted and referencing one again is accepted; once it has passed
    /// the commits' shares and a full collection leave exactly the
    /// reachable set.
    #[test]
    fn no_object_goes_inside_its_grace_window_and_all_garbage_goes_after(
        ops in prop::collection::vec(op(), 1..60)
    ) {
        run_windowed(ops)?;
    }
}

#[test]
fn gc_state_tells_how_much_garbage_waits_out_its_window() {
    let dir = tempfile::tempdir().unwrap();
    let grace_ms = Arc::new(std::sync::atomic::AtomicU64::new(3_600_000));
    let mut s = RedbStorage::open(
        dir.path().join("w.redb"),
        Options::default().gc(Windowed {
            grace_ms: grace_ms.clone(),
        }),
    )
    .unwrap();
    let root = s.new_oid().unwrap();
    let objs = s.new_oids(10).unwrap();
    s.begin();
    for o in &objs {
        s.store(*o, rec(*o, b"x", &[])).unwrap();
    }
    s.store(root, rec(root, b"root", &objs)).unwrap();
    s.end().unwrap();
    s.begin();
    s.store(root, rec(root, b"root", &objs[..4])).unwrap();
    s.end().unwrap();
    let st = s.gc_state().unwrap();
    assert_eq!((st.queue_len, st.waiting), (6, 6));
    assert!(st.oldest_queued.is_some());
    assert_eq!(s.gc_waiting(Duration::ZERO).unwrap(), 0);
    // The window passes: nothing waits; the next commit's share reclaims.
    grace_ms.store(0, Ordering::Release);
    assert_eq!(s.gc_state().unwrap().waiting, 0);
    s.begin();
    s.store(root, rec(root, b"root", &objs[..4])).unwrap();
    s.end().unwrap();
    assert!(s.gc_state().unwrap().queue_len < 6);
}

/// A policy whose decision panics (a bug in it, or in the collector).
#[derive(Debug)]
struct PanickingPolicy;

impl GcPolicy for PanickingPolicy {
    fn decide(&self, _: &GcFacts) -> GcAction {
        panic!("a policy that panics")
    }
}

/// A panic in the background collector is not swallowed: the store refuses
/// writes from then on and says why, as after a collector error, instead of
/// going on without a collector and without a word.
#[test]
fn a_panic_in_the_collector_poisons_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("panics.redb");
    let mut s = RedbStorage::open(&path, Options::default().gc(PanickingPolicy)).unwrap();
    let root = s.new_oid().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let err = loop {
        s.begin();
        s.store(root, rec(root, b"root", &[])).unwrap();
        match s.end() {
            Err(e) => break e,
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "commits still accepted 30 s after the collector panicked"
                );
                std::thread::sleep(Duration::from_millis(10));
            }
        }
    };
    assert!(
        matches!(err, StorageError::Poisoned { .. }) && err.to_string().contains("panicked"),
        "{err}"
    );
}
