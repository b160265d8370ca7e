//! The commit path's unit tests: the sequencer here, the collector's
//! interplay with commits in `collector`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::Placed;
use super::apply::{Carry, apply};
use crate::engine::{Engine, SessionId, SessionRef};
use crate::record::{Oid, Record};

use crate::engine::open_temp as open;

fn one(oid: Oid, data: &[u8], refs: &[Oid]) -> BTreeMap<Oid, Record> {
    BTreeMap::from([(oid, Record::new(oid, data, refs))])
}

/// Waits up to 10 s for `done`, failing with `never` after that.
fn wait_until(never: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(std::time::Instant::now() < deadline, "{never}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A store, two sessions `a` and `b`, `b`'s state, and `a`'s oids.
type Setup = (
    tempfile::TempDir,
    Arc<Engine>,
    SessionId,
    SessionId,
    SessionRef,
    Vec<Oid>,
);

/// A store with a root and two sessions: `a`, handed `n` oids (the
/// root first), commits; `b` is up to date.
fn two_sessions(n: usize) -> Setup {
    let (dir, engine) = open();
    let (a, _) = engine.register_session();
    let (b, b_state) = engine.register_session();
    let oids = engine.allocate(a, n).unwrap();
    engine.commit(a, &one(oids[0], b"root", &[])).unwrap();
    engine.take_invalid(b, &b_state, None);
    (dir, engine, a, b, b_state, oids)
}

/// A placed commit holds up the turns after it until it is applied;
/// its committer applies it when waiting for it, or when dropping its
/// turn (it was published), and then the later turns go on.
#[test]
fn a_placed_commit_is_applied_in_turn_even_if_its_turn_is_dropped() {
    let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
    let placed = engine.lock_order().place(a, one(oids[1], b"x", &[]));
    let Placed::Turn(turn) = placed else {
        panic!("a valid commit gets a turn")
    };
    // Another committer queues behind it (not in the line: the
    // library applies under the order).
    let (e, third) = (engine.clone(), oids[2]);
    let waits = engine
        .seq
        .turn_waits
        .load(std::sync::atomic::Ordering::Acquire);
    let later = std::thread::spawn(move || e.commit(a, &one(third, b"y", &[])));
    // Until the later committer waits for the placed commit's turn.
    wait_until("the later committer never waited for its turn", || {
        engine
            .seq
            .turn_waits
            .load(std::sync::atomic::Ordering::Acquire)
            > waits
    });
    assert!(!later.is_finished(), "a later turn went first");
    assert!(matches!(
        engine.load(oids[1]),
        Err(crate::StorageError::NotFound(_))
    ));
    drop(turn);
    wait_until("the turn after a dropped one never came", || {
        later.is_finished()
    });
    later.join().unwrap().unwrap();
    assert_eq!(
        engine.take_invalid(b, &b_state, None),
        vec![oids[1], oids[2]]
    );
    assert_eq!(engine.load(oids[1]).unwrap().data(), b"x");
    assert_eq!(engine.load(oids[2]).unwrap().data(), b"y");
}

/// Commits of the line are applied together in one redb transaction,
/// each on the state the ones before it left, with a log entry and a
/// sequence number each; if one of them is refused, the others are
/// applied one by one and only it is refused.
#[test]
fn commits_of_the_line_are_applied_together_and_one_refusal_refuses_only_itself() {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::store::Options::new()
        .durability(crate::checkpoint::Durability::Fsync)
        .engine_config(false);
    let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
    let (a, _) = engine.register_session();
    let oids = engine.allocate(a, 5).unwrap();
    engine.commit(a, &one(oids[0], b"root", &[])).unwrap();
    let together = [
        one(oids[1], b"p", &[]),
        one(oids[2], b"q", &[oids[1]]),
        one(oids[1], b"p2", &[oids[2]]),
    ];
    let (before, redb_before) = {
        let st = engine.lock_state();
        (st.log_seq, st.applied_seq)
    };
    let results = {
        let mut st = engine.lock_state();
        let commits: Vec<_> = together.iter().map(|r| (a, r)).collect();
        engine.apply_line(&mut st, &commits)
    };
    let seqs: Vec<u64> = results.into_iter().map(|r| r.unwrap().seq).collect();
    assert_eq!(seqs, [before + 1, before + 2, before + 3]);
    {
        let st = engine.lock_state();
        assert_eq!(st.log_seq, before + 3);
        assert_eq!(st.applied_seq, redb_before + 1, "one redb transaction");
    }
    assert_eq!(engine.load(oids[1]).unwrap().data(), b"p2");
    assert_eq!(
        engine.load(oids[2]).unwrap().refs().collect::<Vec<_>>(),
        [oids[1]]
    );
    // The middle one names an oid nobody was handed: refused alone.
    let mixed = [
        one(oids[3], b"r", &[]),
        one(Oid(777), b"unknown", &[]),
        one(oids[4], b"s", &[oids[3]]),
    ];
    let results = {
        let mut st = engine.lock_state();
        let commits: Vec<_> = mixed.iter().map(|r| (a, r)).collect();
        engine.apply_line(&mut st, &commits)
    };
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].as_ref().unwrap_err().is_conflict());
    assert_eq!(engine.load(oids[4]).unwrap().data(), b"s");
    assert!(engine.load(Oid(777)).is_err());
    let last = results[2].as_ref().unwrap().seq;
    engine
        .finish(results.into_iter().nth(2).unwrap().unwrap())
        .unwrap();
    assert_eq!(last, before + 5, "the refused one took no sequence number");
    // Everything applied is in the log, in order: a reopen replays or
    // finds it.
    drop(engine);
    let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
    assert_eq!(engine.load(oids[1]).unwrap().data(), b"p2");
    assert_eq!(engine.load(oids[4]).unwrap().data(), b"s");
    engine.close().unwrap();
}

/// Commits placed by many threads at once are applied exactly once
/// each, in turn order, whoever applies them: with `Fsync` and with
/// `Os` (where a commit waiting in line spins before it sleeps).
#[test]
fn commits_in_line_are_applied_once_each_in_turn_order() {
    for durability in [
        crate::checkpoint::Durability::Fsync,
        crate::checkpoint::Durability::os(),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::store::Options::new()
            .durability(durability)
            .engine_config(false);
        let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
        // On its own thread: a lost wake-up fails the test instead of
        // hanging the run.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            commits_in_line(engine);
            let _ = tx.send(());
        });
        match rx.recv_timeout(Duration::from_secs(120)) {
            Ok(()) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                panic!("commits in line hung for 2 minutes ({durability:?})")
            }
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                panic!("commits in line failed ({durability:?}): see the panic above")
            }
        }
    }
}

fn commits_in_line(engine: Arc<Engine>) {
    let (a, _) = engine.register_session();
    let root = engine.allocate(a, 1).unwrap()[0];
    engine.commit(a, &one(root, b"root", &[])).unwrap();
    let obj = engine.allocate(a, 1).unwrap()[0];
    engine
        .commit(a, &one(obj, &0u64.to_be_bytes(), &[]))
        .unwrap();
    const THREADS: u64 = 8;
    const EACH: u64 = 200;
    let threads: Vec<_> = (0..THREADS)
        .map(|_| {
            let e = engine.clone();
            std::thread::spawn(move || {
                let (s, _) = e.register_session();
                for _ in 0..EACH {
                    // Each commit writes the turn it got: applied in
                    // turn order, the last one written is the last turn.
                    let mut order = e.lock_order();
                    let n = e.turns_ordered() + 1;
                    let placed = order.place(s, one(obj, &n.to_be_bytes(), &[]));
                    drop(order);
                    match placed {
                        Placed::Turn(t) => {
                            assert_eq!(t.n, n);
                            e.finish(t.apply().unwrap()).unwrap();
                        }
                        Placed::Applied(r) => panic!("not placed: {:?}", r.map(|_| ())),
                    }
                }
                e.unregister_session(s);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let last = engine.turns_ordered();
    engine.await_turns(last);
    assert_eq!(engine.load(obj).unwrap().data(), &last.to_be_bytes());
    let st = engine.commit.lock();
    assert_eq!(st.turns_done, last);
    // Every placed commit was logged once: two setup commits and one
    // per placement.
    assert_eq!(st.log_seq, 2 + THREADS * EACH);
    drop(st);
    let line = engine.seq.line.lock();
    assert!(line.queue.is_empty() && line.results.is_empty() && !line.combining);
}

/// A hook that panics in the commit it is told to.
struct PanicAt(std::sync::atomic::AtomicBool);

impl crate::engine::CommitHook for PanicAt {
    fn in_commit(
        &self,
        _: &redb::WriteTransaction,
        _: &crate::engine::Pins,
    ) -> crate::Result<Vec<Oid>> {
        if self.0.swap(false, std::sync::atomic::Ordering::AcqRel) {
            panic!("a bug in an apply");
        }
        Ok(Vec::new())
    }
    fn after_commit(&self, _: &BTreeMap<Oid, Record>, _: &[Oid], _: u64, _: u64) {}
    fn deletion_committed(&self, _: &crate::engine::Deleted) {}
    fn on_close(&self) {}
}

/// A panic while a commit is applied poisons the store and ends its
/// turn: the committer's thread sees the panic, later turns are
/// refused with the poisoning instead of waiting for ever, and a
/// session told of the commit does not wait for ever either.
#[test]
fn a_panic_in_an_apply_poisons_the_store_and_holds_up_no_one() {
    let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
    let hook = Arc::new(PanicAt(std::sync::atomic::AtomicBool::new(false)));
    engine.set_hook(hook.clone());
    hook.0.store(true, std::sync::atomic::Ordering::Release);
    let placed = engine.lock_order().place(a, one(oids[1], b"x", &[]));
    let Placed::Turn(turn) = placed else {
        panic!("a valid commit gets a turn")
    };
    let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| turn.apply()));
    assert!(caught.is_err(), "the committer's thread sees the panic");
    engine.take_invalid(b, &b_state, None);
    engine.await_turns(engine.turns_ordered());
    let later = engine.commit(a, &one(oids[2], b"y", &[]));
    assert!(
        matches!(later, Err(crate::StorageError::Poisoned { .. })),
        "{later:?}"
    );
}

/// A session's load reads without the `publish` lock, so a change must
/// be published before it becomes visible: a load that sees it then
/// finds it flagged for a session not yet told of it (never the new
/// record as if the session were up to date, which a sync naming the
/// oid afterwards would contradict). Every way a commit is applied: in
/// its turn under the order (the library), placed in line and applied
/// by its committer, and applied by another committer the moment it
/// joins the line.
#[test]
fn a_load_that_sees_a_commit_finds_it_flagged_for_a_session_not_told_of_it() {
    let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
    let seen: Arc<parking_lot::Mutex<Vec<&'static str>>> = Arc::default();
    let (log, watched, state) = (seen.clone(), oids[1], b_state.clone());
    // The load runs on a thread of its own, as a reader beside the writer
    // does (the writer holds `publish` here, which a load never takes).
    let hook: crate::engine::TestHook = Box::new(move |e: &Engine| {
        std::thread::scope(|scope| {
            scope.spawn(|| {
                let mut log = log.lock();
                e.load_for(b, &state, &[watched], |found| -> crate::Result<()> {
                    log.push(match found {
                        crate::engine::Found::Invalid => "invalid",
                        crate::engine::Found::Record(_) => "record",
                        crate::engine::Found::Missing => "missing",
                    });
                    Ok(())
                })
                .unwrap();
            });
        });
    });
    assert!(engine.on_visible.set(hook).is_ok());
    // Applied in its turn, under the order.
    engine.commit(a, &one(oids[1], b"x", &[])).unwrap();
    // Placed in line, then applied.
    let Placed::Turn(turn) = engine.lock_order().place(a, one(oids[1], b"y", &[])) else {
        panic!("a valid commit gets a turn")
    };
    engine.finish(turn.apply().unwrap()).unwrap();
    // Applied by the committer ahead of it in line as soon as it joins.
    engine.take_invalid(b, &b_state, None);
    let Placed::Turn(first) = engine.lock_order().place(a, one(oids[2], b"z", &[])) else {
        panic!("a valid commit gets a turn")
    };
    let ahead = first.n;
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let on_lined: crate::engine::TestHook = Box::new(move |e: &Engine| {
        if armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            e.seq.line.lock().combining = true;
            e.combine(ahead);
        }
    });
    assert!(engine.on_lined.set(on_lined).is_ok());
    let Placed::Turn(second) = engine.lock_order().place(a, one(oids[1], b"w", &[])) else {
        panic!("a valid commit gets a turn")
    };
    engine.finish(first.apply().unwrap()).unwrap();
    engine.finish(second.apply().unwrap()).unwrap();
    // (`w` is published, though not yet applied, when `z` is applied.)
    assert_eq!(*seen.lock(), ["invalid"; 4]);
}

/// The collector passes by a queued oid referenced again since without
/// dooming it: a commit naming it while the collector's round runs is
/// placed, not held back to be checked in its turn.
#[test]
fn the_collector_does_not_doom_a_queued_oid_that_is_live_again() {
    let (_dir, engine, a, _, _, oids) = two_sessions(4);
    let (root, d, x, e) = (oids[0], oids[1], oids[2], oids[3]);
    let mut all = one(root, b"root", &[d, x, e]);
    for o in [d, x, e] {
        all.extend(one(o, b"o", &[]));
    }
    engine.commit(a, &all).unwrap();
    // All three queued, then `x` referenced again.
    engine.commit(a, &one(root, b"root", &[])).unwrap();
    engine.commit(a, &one(root, b"root", &[x])).unwrap();
    let seen = parking_lot::Mutex::new(Vec::new());
    let (deleted, _) = engine
        .deletion_txn(
            |w| {
                crate::engine::refcount::delete_queued(w, &engine.pins, 10, true, u64::MAX, || {
                    seen.lock().push(engine.pins.lock().doomed.contains(&x.0));
                    false
                })
            },
            false,
        )
        .unwrap();
    assert_eq!(deleted.oids, [d, e]);
    let seen = seen.into_inner();
    assert!(!seen.is_empty(), "looked at after `d` was deleted");
    assert!(seen.iter().all(|&doomed| !doomed), "{seen:?}");
}

/// A commit that would be refused is applied (refused) under the order
/// and publishes nothing: no other session is told of it.
#[test]
fn a_commit_that_would_be_refused_publishes_nothing() {
    let (_dir, engine, a, b, b_state, oids) = two_sessions(2);
    let mut both = one(oids[0], b"root", &[]);
    both.extend(one(oids[1], b"x", &[oids[0]]));
    engine.commit(a, &both).unwrap();
    engine.take_invalid(b, &b_state, None);
    // A dangling reference added, one in place of a reference held
    // (as many references as before), then an oid nobody was handed.
    for records in [
        one(oids[1], b"dangling", &[oids[0], Oid(999)]),
        one(oids[1], b"dangling", &[Oid(999)]),
        one(Oid(777), b"unknown", &[]),
    ] {
        match engine.lock_order().place(a, records) {
            Placed::Applied(r) => assert!(r.unwrap_err().is_conflict()),
            Placed::Turn(_) => panic!("a commit that fails its checks got a turn"),
        }
    }
    assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
    assert_eq!(engine.load(oids[1]).unwrap().data(), b"x");
}

mod collector;

/// A panic while a commit is placed, after it took its turn and before it
/// joined the line, ends that turn: the commits after it go on (the turn
/// is not left open for ever).
#[test]
fn a_panic_while_placing_ends_the_turn_and_later_commits_go_on() {
    let (_dir, engine, a, _b, _b_state, oids) = two_sessions(3);
    let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let hook: crate::engine::TestHook = Box::new(move |_: &Engine| {
        if armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
            panic!("a panic while placing");
        }
    });
    assert!(engine.on_placing.set(hook).is_ok());
    let (e, first) = (engine.clone(), oids[1]);
    let placing = std::thread::spawn(move || {
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = e.lock_order().place(a, one(first, b"x", &[]));
        }))
        .is_err()
    });
    wait_until("the panicking placer never returned", || {
        placing.is_finished()
    });
    assert!(placing.join().unwrap(), "the hook panics");
    // The next commit, in a thread of its own: it must not wait for ever.
    let (e, third) = (engine.clone(), oids[2]);
    let later = std::thread::spawn(move || e.commit(a, &one(third, b"y", &[])));
    wait_until("a commit after the panic never finished", || {
        later.is_finished()
    });
    later.join().unwrap().unwrap();
    assert_eq!(engine.load(oids[2]).unwrap().data(), b"y");
    // The panicked commit was not applied.
    assert!(matches!(
        engine.load(oids[1]),
        Err(crate::StorageError::NotFound(_))
    ));
}
