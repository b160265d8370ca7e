//! The collector's deletions beside commits: pins, doomed oids, and a
//! deletion parked for the next commit.

use super::*;

/// A store where `x` (oids[1]) was referenced by the root and then let
/// go: queued for the collector, past any grace with a cutoff of
/// `u64::MAX`.
fn garbage_x() -> Setup {
    let (dir, engine, a, b, b_state, oids) = two_sessions(2);
    let (root, x) = (oids[0], oids[1]);
    let mut both = one(root, b"root", &[x]);
    both.extend(one(x, b"x", &[]));
    engine.commit(a, &both).unwrap();
    engine.commit(a, &one(root, b"root", &[])).unwrap();
    engine.take_invalid(b, &b_state, None);
    (dir, engine, a, b, b_state, oids)
}

/// The collector's deletion inside a write transaction, undoomed after
/// it as the collector does.
fn collect_all(engine: &Engine) -> Vec<Oid> {
    let deleted = engine
        .write_txn(redb::Durability::None, |w, _| {
            crate::engine::delete_queued(w, &engine.pins, 100, false, u64::MAX, || false)
        })
        .unwrap();
    engine.pins.undoom(deleted.oids.iter().map(|o| o.0));
    deleted.oids
}

/// A deletion cut short because a committer waits for the writer
/// stops after one deletion, not at the end of its round, and queues
/// what the round did not reach again as it was: nothing of it stays
/// doomed, and a later deletion takes it.
#[test]
fn a_deletion_cut_short_queues_the_rest_of_its_round_again() {
    let (_dir, engine, a, _b, _b_state, oids) = two_sessions(6);
    let (root, xs) = (oids[0], &oids[1..]);
    let mut all = one(root, b"root", xs);
    for &x in xs {
        all.extend(one(x, b"x", &[]));
    }
    engine.commit(a, &all).unwrap();
    engine.commit(a, &one(root, b"root", &[])).unwrap();
    // A committer waits throughout.
    let first = engine
        .write_txn(redb::Durability::None, |w, _| {
            crate::engine::delete_queued(w, &engine.pins, 100, true, u64::MAX, || true)
        })
        .unwrap();
    engine.pins.undoom(first.oids.iter().map(|o| o.0));
    assert_eq!(first.oids.len(), 1, "the round went on past one deletion");
    assert_eq!(first.queue_left, Some(xs.len() as u64 - 1));
    let rest: Vec<u64> = xs
        .iter()
        .map(|o| o.0)
        .filter(|o| *o != first.oids[0].0)
        .collect();
    assert!(engine.pins.pin(&rest), "an oid put back is still doomed");
    engine.pins.unpin(&rest);
    let mut deleted = collect_all(&engine);
    deleted.extend(first.oids);
    deleted.sort();
    assert_eq!(deleted, xs);
}

/// A commit placed in line that takes back an object the collector
/// could delete keeps it: the collector spares it (and queues it again)
/// until the commit is applied, so the commit is not refused in its
/// turn after its oids were published.
#[test]
fn the_collector_spares_what_a_placed_commit_needs() {
    let (_dir, engine, a, _b, _b_state, oids) = garbage_x();
    let (root, x) = (oids[0], oids[1]);
    let Placed::Turn(turn) = engine.lock_order().place(a, one(root, b"again", &[x])) else {
        panic!("a valid commit gets a turn")
    };
    assert_eq!(
        collect_all(&engine),
        Vec::<Oid>::new(),
        "a pinned oid was deleted"
    );
    engine.finish(turn.apply().unwrap()).unwrap();
    assert_eq!(engine.load(x).unwrap().data(), b"x");
    // Referenced again, it is no garbage for the next step either.
    assert_eq!(collect_all(&engine), Vec::<Oid>::new());
    assert_eq!(engine.load(x).unwrap().data(), b"x");
    // Let go again, it goes.
    engine.commit(a, &one(root, b"root", &[])).unwrap();
    assert_eq!(collect_all(&engine), vec![x]);
}

/// A commit that names what a collector transaction not yet committed
/// is deleting gets no turn: it waits for the deletion and is refused
/// in its turn, publishing nothing.
#[test]
fn a_commit_naming_what_is_being_deleted_is_checked_after_the_deletion() {
    let (_dir, engine, a, b, b_state, oids) = garbage_x();
    let (root, x) = (oids[0], oids[1]);
    let mut placer = None;
    let deleted = engine
        .write_txn(redb::Durability::None, |w, _| {
            let d = crate::engine::delete_queued(w, &engine.pins, 100, false, u64::MAX, || false)?;
            assert_eq!(d.oids, vec![x]);
            let e = engine.clone();
            placer = Some(std::thread::spawn(move || {
                match e.lock_order().place(a, one(root, b"again", &[x])) {
                    Placed::Applied(r) => Some(r.map(|_| ()).map_err(|e| e.is_conflict())),
                    Placed::Turn(t) => {
                        let _ = t.apply();
                        None
                    }
                }
            }));
            // Until it waits for this transaction's commit lock.
            wait_until(
                "the commit took a turn instead of waiting for the deletion",
                || engine.committers_waiting(),
            );
            Ok(d)
        })
        .unwrap();
    engine.pins.undoom(deleted.oids.iter().map(|o| o.0));
    let outcome = placer.unwrap().join().unwrap();
    assert_eq!(
        outcome,
        Some(Err(true)),
        "refused as a conflict, without a turn"
    );
    // The refused commit published nothing (the test's deletion is not
    // published either: the collector does that itself).
    assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
    assert!(matches!(
        engine.load(x),
        Err(crate::StorageError::NotFound(_))
    ));
}

/// Parks a deletion of everything queued, cut short as if a committer
/// waited: the transaction is left open for the next commit.
fn park(engine: &Engine) -> Vec<Oid> {
    let (deleted, parked) = engine
        .deletion_txn(
            |w| crate::engine::delete_queued(w, &engine.pins, 100, true, u64::MAX, || true),
            true,
        )
        .unwrap();
    assert!(
        parked,
        "a deletion cut short was committed, not handed over"
    );
    deleted.oids
}

/// A deletion cut short for a waiting committer is left to it: nothing
/// of it is visible or published until the next commit, which commits
/// it with its own records; its oids stay doomed until then.
#[test]
fn a_deletion_handed_over_is_committed_with_the_next_commit() {
    let (_dir, engine, a, b, b_state, oids) = garbage_x();
    let (root, x) = (oids[0], oids[1]);
    assert_eq!(park(&engine), vec![x]);
    assert_eq!(
        engine.load(x).unwrap().data(),
        b"x",
        "visible before its commit"
    );
    assert!(
        !engine.pins.pin(&[x.0]),
        "a parked deletion's oid is not doomed"
    );
    engine.pins.unpin(&[x.0]);
    assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
    engine.commit(a, &one(root, b"root2", &[])).unwrap();
    assert!(matches!(
        engine.load(x),
        Err(crate::StorageError::NotFound(_))
    ));
    assert_eq!(engine.load(root).unwrap().data(), b"root2");
    let mut told = engine.take_invalid(b, &b_state, None);
    told.sort();
    assert_eq!(told, vec![root, x]);
    assert!(engine.pins.pin(&[x.0]), "still doomed after its commit");
}

/// A commit that carries a deletion and is refused in its turn undoes
/// both: the garbage stays, queued and not doomed, for a later deletion.
/// (Only a commit expected to pass carries one, see the next tests; a
/// placed commit can still be refused in its turn in a store imported
/// with `--allow-dangling`. This applies one as the line does.)
#[test]
fn a_carried_deletion_is_undone_with_a_commit_refused_in_its_turn() {
    let (_dir, engine, a, b, b_state, oids) = garbage_x();
    let x = oids[1];
    assert_eq!(park(&engine), vec![x]);
    let refused = {
        let mut st = engine.lock_state();
        let bad = one(Oid(777), b"unknown", &[]);
        let r = apply(&engine, &mut st, a, &bad, false, Carry::Yes);
        assert!(st.parked.is_none(), "the deletion was not carried");
        r
    };
    assert!(refused.unwrap_err().is_conflict());
    assert_eq!(engine.load(x).unwrap().data(), b"x");
    assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
    assert!(
        engine.pins.pin(&[x.0]),
        "still doomed after its commit was refused"
    );
    engine.pins.unpin(&[x.0]);
    assert_eq!(collect_all(&engine), vec![x], "no longer queued");
}

/// A commit refused by validation does not carry a parked deletion: the
/// deletion is committed on its own first, so bad input cannot undo the
/// collector's work (a client sending only refused commits would
/// otherwise stop the collector for good). Through the library (not
/// validated before its apply) and through the line (refused when
/// placed).
#[test]
fn a_refused_commit_leaves_a_parked_deletion_to_be_committed() {
    for placed in [false, true] {
        let (_dir, engine, a, b, b_state, oids) = garbage_x();
        let x = oids[1];
        assert_eq!(park(&engine), vec![x]);
        let bad = one(Oid(777), b"unknown", &[]);
        let refused = if placed {
            match engine.lock_order().place(a, bad) {
                Placed::Applied(r) => r.map(|_| ()),
                Placed::Turn(_) => panic!("a commit of an unknown oid was placed"),
            }
        } else {
            engine.commit(a, &bad)
        };
        assert!(refused.unwrap_err().is_conflict());
        assert!(
            matches!(engine.load(x), Err(crate::StorageError::NotFound(_))),
            "a refused commit undid the deletion (placed: {placed})"
        );
        assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);
        assert!(engine.pins.pin(&[x.0]), "still doomed");
        engine.pins.unpin(&[x.0]);
    }
}

/// A library commit that references what a parked deletion removes
/// does not carry it: the deletion is committed first, and the commit
/// is refused for a reference to a deleted object, as it would be had
/// the collector committed the deletion itself (not refused by a
/// deletion that is then undone).
#[test]
fn a_commit_referencing_a_parked_deletion_does_not_carry_it() {
    let (_dir, engine, a, b, b_state, oids) = garbage_x();
    let (root, x) = (oids[0], oids[1]);
    assert_eq!(park(&engine), vec![x]);
    let refused = engine.commit(a, &one(root, b"root", &[x]));
    assert!(refused.unwrap_err().is_conflict());
    assert!(
        matches!(engine.load(x), Err(crate::StorageError::NotFound(_))),
        "the deletion was undone"
    );
    assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);
    assert_eq!(engine.load(root).unwrap().data(), b"root");
}

/// Whatever else needs redb's single writer commits a parked deletion
/// first instead of waiting for it: a checkpoint, another collector
/// transaction, the close (the deletion is in the file after a reopen).
#[test]
fn a_parked_deletion_is_committed_before_any_other_writer() {
    let (_dir, engine, _a, b, b_state, oids) = garbage_x();
    let x = oids[1];
    park(&engine);
    let (tx, rx) = std::sync::mpsc::channel();
    let e = engine.clone();
    std::thread::spawn(move || tx.send(e.checkpoint().map_err(|e| e.to_string())));
    let done = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(
        done,
        Ok(Ok(())),
        "the checkpoint waited for the parked deletion"
    );
    assert!(matches!(
        engine.load(x),
        Err(crate::StorageError::NotFound(_))
    ));
    assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);

    // Another collector transaction.
    let (_dir, engine, ..) = garbage_x();
    let x = park(&engine)[0];
    engine
        .write_txn(redb::Durability::None, |_, _| Ok(()))
        .unwrap();
    assert!(matches!(
        engine.load(x),
        Err(crate::StorageError::NotFound(_))
    ));

    // The close.
    let (dir, engine, ..) = garbage_x();
    let x = park(&engine)[0];
    engine.close().unwrap();
    let config = crate::store::Options::new().engine_config(false);
    let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
    assert!(matches!(
        engine.load(x),
        Err(crate::StorageError::NotFound(_))
    ));
}
