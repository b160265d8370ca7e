//! The PostgreSQL backend's own promises, beside the contract test that it
//! answers as the model does (backend/tests.rs).

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::time::Duration;

use postgres::NoTls;

use super::{PgBackend, testdb};
use crate::backend::{Backend, Entry, Session};
use crate::record::{Oid, Record};

/// Commits `data` as the root through `session`.
fn commit_root(session: &dyn Session, data: &[u8]) -> crate::Result<()> {
    commit_root_after(session, data, Duration::ZERO)
}

/// [`commit_root`], the client taking `pause` to send its commit.
fn commit_root_after(session: &dyn Session, data: &[u8], pause: Duration) -> crate::Result<()> {
    let Entry::Now(order) = session.enter_order(&mut || unreachable!("blocks, never queues"))
    else {
        panic!("enter_order blocks until the order is had");
    };
    session.sync();
    std::thread::sleep(pause);
    let mut records = BTreeMap::new();
    records.insert(Oid::ROOT, Record::new(Oid::ROOT, data, &[]));
    order.commit(records, false).0
}

/// A flush is confirmed only on a connection made before the commit was
/// sent: one made since may reach another server (a standby promoted after
/// the commit's server died, which may lack the commit), whose flush says
/// nothing of it. The connection is made when the front end starts, so
/// that its first commits can be confirmed.
#[test]
fn a_flush_is_confirmed_only_on_a_connection_made_before_the_commit_was_sent() {
    let config = testdb::fresh("barrier_made");
    let fe = PgBackend::open_with(config.clone().into(), 16).unwrap();
    commit_root(fe.open_session().as_ref(), b"r").unwrap();
    let sent = std::time::Instant::now();
    fe.flush_barrier(sent).unwrap();
    // Its connection lost (as when its server dies), and made again after
    // the commit was sent.
    *fe.barrier_conn.lock() = None;
    let e = fe.flush_barrier(sent).unwrap_err();
    assert!(e.to_string().contains("made again"), "{e}");
    // A commit sent since is confirmed on it.
    fe.flush_barrier(std::time::Instant::now()).unwrap();
    // An update that finds no row commits nothing and confirms nothing.
    let mut c = config.connect(NoTls).unwrap();
    c.execute(
        "DELETE FROM durus_front_ends WHERE id = $1",
        &[&fe.front_end],
    )
    .unwrap();
    let e = fe.flush_barrier(std::time::Instant::now()).unwrap_err();
    assert!(e.to_string().contains("is gone"), "{e}");
    fe.close().unwrap();
}

/// A commit that others wait behind is acknowledged only after its flush
/// barrier, and it does not hold the commit order while it waits: with the barrier's row locked by
/// another transaction, a commit through one front end stays unanswered
/// while a commit through another front end goes through; once the row is
/// free, the first is answered.
#[test]
fn a_commit_waits_for_its_flush_barrier_without_holding_the_order() {
    let config = testdb::fresh("barrier");
    let a = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let b = PgBackend::open_with(config.clone().into(), 16).unwrap();
    commit_root(a.open_session().as_ref(), b"first").unwrap();

    // A commit with nobody waiting behind it flushes the WAL itself; with
    // committers waiting (counted here as one) and a batch held too long
    // to take another commit (its client took longer than the batch may
    // hold the order), it releases the order first and waits for the
    // barrier.
    a.order_waiting
        .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    let mut blocker = config.connect(NoTls).unwrap();
    blocker
        .batch_execute(&format!(
            "BEGIN; SELECT flushes FROM durus_front_ends WHERE id = {} FOR UPDATE",
            a.front_end
        ))
        .unwrap();
    std::thread::scope(|scope| {
        let (done, answered) = mpsc::channel();
        let a = &a;
        scope.spawn(move || {
            let on_a = a.open_session();
            let pause = super::batch::MAX_HOLD * 2;
            let r = commit_root_after(on_a.as_ref(), b"second", pause);
            done.send(r.is_ok()).unwrap();
        });
        assert!(
            answered.recv_timeout(Duration::from_millis(700)).is_err(),
            "the commit was answered before its flush barrier"
        );
        // The order is free meanwhile: another front end commits.
        let on_b = b.open_session();
        on_b.sync();
        commit_root(on_b.as_ref(), b"third").unwrap();
        blocker.batch_execute("COMMIT").unwrap();
        assert_eq!(
            answered.recv_timeout(Duration::from_secs(10)),
            Ok(true),
            "the commit is answered once its barrier is through"
        );
    });
}

/// A front end's oids come from durable blocks: a new front end over the
/// same database (a restart, a failover) never hands out one of them, even
/// though the first never stored them.
#[test]
fn oids_are_never_handed_out_twice_across_front_ends_and_restarts() {
    let config = testdb::fresh("oids");
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let fe = PgBackend::open_with(config.clone().into(), 8).unwrap();
        let s = fe.open_session();
        for oid in s.new_oids(5, 1 << 20).unwrap() {
            assert!(seen.insert(oid), "{oid} handed out twice");
        }
        drop(s);
        fe.close().unwrap();
    }
    assert_eq!(seen.first(), Some(&Oid::ROOT));
}

/// A database holding tables of another format is refused, naming both
/// formats; one with a `durus_meta` table but no format row is refused as
/// not a store.
#[test]
fn a_database_of_another_format_is_refused() {
    let config = testdb::fresh("format");
    drop(PgBackend::open_with(config.clone().into(), 8).unwrap());
    let mut c = config.connect(NoTls).unwrap();
    c.batch_execute("UPDATE durus_meta SET value = 99 WHERE name = 'format'")
        .unwrap();
    let err = PgBackend::open_with(config.clone().into(), 8)
        .err()
        .unwrap();
    let text = err.to_string();
    assert!(
        text.contains("format 99") && text.contains(&format!("format {}", super::FORMAT)),
        "{text}"
    );
    c.batch_execute("DELETE FROM durus_meta WHERE name = 'format'")
        .unwrap();
    let text = PgBackend::open_with(config.into(), 8)
        .err()
        .unwrap()
        .to_string();
    assert!(text.contains("not a durus-redb store"), "{text}");
}

/// Records over the chunk size are split over rows and read back whole,
/// and a record that shrinks leaves no stale chunk behind.
#[test]
fn large_records_are_chunked_and_shrink_cleanly() {
    let config = testdb::fresh("chunks");
    let fe = PgBackend::open_with(config.clone().into(), 8).unwrap();
    let s = fe.open_session();
    let big: Vec<u8> = (0..(super::CHUNK * 2 + 123))
        .map(|i| (i % 251) as u8)
        .collect();
    commit_root(s.as_ref(), &big).unwrap();
    let mut loaded = Vec::new();
    s.load(&[Oid::ROOT], &mut |f| {
        if let crate::backend::Found::Record(b) = f {
            loaded = b.to_vec();
        }
        true
    })
    .unwrap();
    assert_eq!(loaded, Record::new(Oid::ROOT, &big, &[]).into_bytes());
    commit_root(s.as_ref(), b"small").unwrap();
    let mut c = config.connect(NoTls).unwrap();
    let rows: i64 = number_of(&mut c, "SELECT count(*) FROM durus_records WHERE oid = 0");
    assert_eq!(rows, 1, "stale chunks of the larger record remain");
}

#[test]
fn database_urls_are_logged_without_their_password() {
    assert_eq!(
        super::redact_database_url("postgresql://app:s3cret@db1:5432/store"),
        "postgresql://app:***@db1:5432/store"
    );
    assert_eq!(
        super::redact_database_url("postgresql://app@db1/store"),
        "postgresql://app@db1/store"
    );
    assert_eq!(
        super::redact_database_url("host=db1 user=app password=s3cret dbname=store"),
        "host=db1 user=app password=*** dbname=store"
    );
    assert_eq!(
        super::redact_database_url(
            "postgresql://app@db1/store?password=s3cret&sslmode=verify-full"
        ),
        "postgresql://app@db1/store?password=***&sslmode=verify-full"
    );
    assert_eq!(
        super::redact_database_url("postgresql://app:s3cret@db1,db2/store?password=x"),
        "postgresql://app:***@db1,db2/store?password=***"
    );
}

/// The database goes back in time under a front end (a failover to a
/// standby that lacked its last commits, made here by removing them): the
/// front end's sessions were told of commits that no longer exist, and the
/// lost tids will be given again. Its open sessions are refused (their
/// clients reconnect), new ones are served, and commits go on from the
/// database's state.
#[test]
fn a_database_that_lost_commits_closes_the_sessions_that_saw_them() {
    let config = testdb::fresh("went_back");
    let fe = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let old = fe.open_session();
    for n in 0..4u8 {
        commit_root(old.as_ref(), &[n]).unwrap();
    }
    let mut c = config.connect(NoTls).unwrap();
    c.batch_execute(
        "DELETE FROM durus_log WHERE tid > 2; UPDATE durus_order SET tid = 2 WHERE id = 1; \
         UPDATE durus_records SET tid = 2, data = 'x' WHERE oid = 0",
    )
    .unwrap();
    // A new session reads the database as it is and commits from there.
    let new = fe.open_session();
    commit_root(new.as_ref(), b"again").unwrap();
    let tid: i64 = number_of(&mut c, "SELECT tid FROM durus_order WHERE id = 1");
    assert_eq!(tid, 3);
    // The session that saw the lost commits is refused, loads and commits.
    let err = old
        .load(&[Oid::ROOT], &mut |_| true)
        .expect_err("a session that saw lost commits must not load");
    assert!(err.to_string().contains("reconnect"), "{err}");
    let err = commit_root(old.as_ref(), b"stale").expect_err("nor commit");
    assert!(err.to_string().contains("reconnect"), "{err}");
    // The front end's order connection (and what it knows is stored) is
    // not dropped for that session's sake.
    assert!(fe.order.lock().conn.is_some());
    assert!(!fe.state.lock().stored.is_empty());
}

/// Committers of one front end that wait for each other share database
/// transactions (batches): with 4 threads committing at once, some commits
/// join a batch; every commit is there with its own tid, each counter
/// reached its count, and every session was told of every commit but its
/// own.
#[test]
fn concurrent_committers_share_transactions_and_lose_nothing() {
    const THREADS: usize = 4;
    const COMMITS: u64 = 60;
    let config = testdb::fresh("batches");
    let fe = PgBackend::open_with(config.clone().into(), 64).unwrap();
    commit_root(fe.open_session().as_ref(), b"root").unwrap();
    let told: Vec<Vec<Oid>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..THREADS)
            .map(|_| {
                let fe = &fe;
                scope.spawn(move || {
                    let s = fe.open_session();
                    let oid = s.new_oids(1, 16).unwrap()[0];
                    let mut told = Vec::new();
                    for n in 1..=COMMITS {
                        let Entry::Now(order) = s.enter_order(&mut || unreachable!()) else {
                            panic!("blocks");
                        };
                        told.extend(s.sync());
                        let mut records = BTreeMap::new();
                        records.insert(oid, Record::new(oid, &n.to_be_bytes(), &[]));
                        order.commit(records, false).0.unwrap();
                    }
                    told.extend(s.sync());
                    (oid, told)
                })
            })
            .collect();
        let results: Vec<(Oid, Vec<Oid>)> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let mine: Vec<Oid> = results.iter().map(|(o, _)| *o).collect();
        results
            .into_iter()
            .map(|(own, told)| {
                // Told of every other thread's object, never of its own.
                for other in &mine {
                    assert_eq!(told.contains(other), *other != own, "{own} told of {other}");
                }
                told
            })
            .collect()
    });
    assert_eq!(told.len(), THREADS);
    assert!(
        fe.batched.load(std::sync::atomic::Ordering::Relaxed) > 0,
        "no commit joined a batch"
    );
    let mut c = config.connect(NoTls).unwrap();
    let tid: i64 = number_of(&mut c, "SELECT tid FROM durus_order WHERE id = 1");
    assert_eq!(
        tid as u64,
        1 + THREADS as u64 * COMMITS,
        "one tid per commit"
    );
    let logged: i64 = number_of(&mut c, "SELECT count(*) FROM durus_log");
    assert_eq!(logged, tid);
    for row in c
        .query("SELECT data FROM durus_records WHERE oid <> 0", &[])
        .unwrap()
    {
        let data: &[u8] = row.get(0);
        let record = Record::from_bytes(data.to_vec()).unwrap();
        assert_eq!(record.data(), COMMITS.to_be_bytes());
    }
}

/// A commit that joins a batch is checked when the batch ends: one refused
/// there (a reference to an oid that is not stored) changes nothing and
/// disturbs no other commit of its batch. Four threads each make a new
/// object and point their counter at it, then try to overwrite the counter
/// with a record referencing a missing oid (80 rounds each, more until one
/// such commit was refused inside a batch): every good commit is there with
/// its own tid, no refused one left a trace, the object count is right.
#[test]
fn a_commit_refused_in_a_batch_changes_nothing_and_disturbs_no_other() {
    const THREADS: usize = 4;
    const ROUNDS: u64 = 80;
    let config = testdb::fresh("batch_refusals");
    let fe = PgBackend::open_with(config.clone().into(), 64).unwrap();
    commit_root(fe.open_session().as_ref(), b"root").unwrap();
    let missing = Oid(1 << 40);
    // One object per thread that only its refused commits write.
    let targets: Vec<Oid> = {
        let s = fe.open_session();
        let targets = s.new_oids(THREADS, 16).unwrap();
        let records: Vec<(Oid, Vec<Oid>)> = targets.iter().map(|t| (*t, vec![])).collect();
        commit_refs(s.as_ref(), &records).unwrap();
        targets
    };
    // Each thread goes on past ROUNDS (up to ten times as many) until a
    // commit was refused inside a batch: on a busy machine the first
    // rounds sometimes met no batch open.
    let rounds_and_told: Vec<(u64, Vec<Oid>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = targets
            .iter()
            .map(|&target| {
                let fe = &fe;
                scope.spawn(move || {
                    let s = fe.open_session();
                    let counter = s.new_oids(1, 1 << 20).unwrap()[0];
                    let mut told = Vec::new();
                    let mut n = 0;
                    while n < ROUNDS
                        || (n < 10 * ROUNDS
                            && fe
                                .refused_in_batch
                                .load(std::sync::atomic::Ordering::Relaxed)
                                == 0)
                    {
                        n += 1;
                        let made = s.new_oids(1, 1 << 20).unwrap()[0];
                        let Entry::Now(order) = s.enter_order(&mut || unreachable!()) else {
                            panic!("blocks");
                        };
                        told.extend(s.sync());
                        let mut records = BTreeMap::new();
                        records.insert(counter, Record::new(counter, &number(n), &[made]));
                        records.insert(made, Record::new(made, &number(n), &[]));
                        order.commit(records, false).0.unwrap();
                        let Entry::Now(order) = s.enter_order(&mut || unreachable!()) else {
                            panic!("blocks");
                        };
                        told.extend(s.sync());
                        let mut records = BTreeMap::new();
                        records.insert(counter, Record::new(counter, &number(999), &[missing]));
                        records.insert(target, Record::new(target, &number(999), &[]));
                        let refused = order.commit(records, false).0.unwrap_err();
                        assert!(
                            matches!(
                                refused,
                                crate::StorageError::Conflict(crate::Conflict::DanglingRefs { .. })
                            ),
                            "{refused}"
                        );
                        assert_eq!(load_number(s.as_ref(), counter).unwrap(), n);
                    }
                    told.extend(s.sync());
                    (n, told)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    // A refused commit is told to no one: no session was ever told of a
    // target, which only refused commits write (the sessions were opened
    // after the targets were made).
    let rounds: u64 = rounds_and_told.iter().map(|(n, _)| n).sum();
    for (_, told) in &rounds_and_told {
        for t in &targets {
            assert!(
                !told.contains(t),
                "told of {t}, which only a refused commit wrote"
            );
        }
    }
    use std::sync::atomic::Ordering::Relaxed;
    assert!(fe.batched.load(Relaxed) > 0, "no commit joined a batch");
    assert!(
        fe.refused_in_batch.load(Relaxed) > 0,
        "no commit was refused inside a batch"
    );
    let mut c = config.connect(NoTls).unwrap();
    let row = c
        .query_one("SELECT tid, objects FROM durus_order WHERE id = 1", &[])
        .unwrap();
    let (tid, objects): (i64, i64) = (row.get(0), row.get(1));
    // The root's commit, the targets', and one per good commit.
    assert_eq!(tid as u64, 2 + rounds, "one tid per good commit");
    let logged: i64 = number_of(&mut c, "SELECT count(*) FROM durus_log");
    assert_eq!(logged, tid);
    let stored: i64 = number_of(&mut c, "SELECT count(*) FROM durus_records WHERE chunk = 0");
    assert_eq!(stored, 1 + 2 * THREADS as i64 + rounds as i64);
    assert_eq!(objects, stored, "the order row counts the objects");
    let records_tids: i64 = number_of(&mut c, "SELECT count(DISTINCT tid) FROM durus_records");
    // Each object made has its commit's tid: every good commit its own.
    assert_eq!(records_tids, tid);
    for row in c.query("SELECT data FROM durus_records", &[]).unwrap() {
        let data: &[u8] = row.get(0);
        let record = Record::from_bytes(data.to_vec()).unwrap();
        assert_ne!(
            record.data(),
            number(999),
            "a refused commit left its record"
        );
        assert!(record.refs().all(|r| r != missing));
    }
}

/// Two commits in one batch, made deterministic: a committer counted as
/// waiting makes `a`'s commit stay kept; `b`'s, with nobody waiting, ends
/// the batch. `a` commits through a new session. Returns both answers.
fn batch_of_two(
    fe: &PgBackend,
    a: BTreeMap<Oid, Record>,
    b: (&dyn Session, BTreeMap<Oid, Record>),
) -> (crate::Result<()>, crate::Result<()>) {
    // However slow the machine, the first is kept if it passes.
    batch_of_two_holding(fe, a, b, 60_000_000, || {})
}

/// [`batch_of_two`] with a batch's hold of `hold_micros`, running
/// `meanwhile` once the first commit has begun to take the order.
fn batch_of_two_holding(
    fe: &PgBackend,
    a: BTreeMap<Oid, Record>,
    b: (&dyn Session, BTreeMap<Oid, Record>),
    hold_micros: u64,
    meanwhile: impl FnOnce(),
) -> (crate::Result<()>, crate::Result<()>) {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed};
    let batched = fe.batched.load(Relaxed);
    let hold = fe.max_hold_micros.swap(hold_micros, Relaxed);
    fe.order_waiting.fetch_add(1, AcqRel);
    std::thread::scope(|scope| {
        let first = scope.spawn(move || {
            let s = fe.open_session();
            let Entry::Now(order) = s.enter_order(&mut || unreachable!()) else {
                panic!("blocks");
            };
            s.sync();
            order.commit(a, false).0
        });
        meanwhile();
        // Until the first is kept, or refused at once (then nothing is
        // kept, and the second commits alone).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fe.order.lock().open.is_none() && !first.is_finished() {
            assert!(
                std::time::Instant::now() < deadline,
                "the first commit hangs"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        let kept = fe.order.lock().open.is_some();
        fe.order_waiting.fetch_sub(1, AcqRel);
        let Entry::Now(order) = b.0.enter_order(&mut || unreachable!()) else {
            panic!("blocks");
        };
        b.0.sync();
        let second = order.commit(b.1, false).0;
        assert_eq!(
            fe.batched.load(Relaxed),
            batched + u64::from(kept),
            "the second joined the first if it was kept"
        );
        fe.max_hold_micros.store(hold, Relaxed);
        (first.join().unwrap(), second)
    })
}

/// The commits kept in a batch are checked and written when it ends, in
/// their order: the same oid written by both (the later one's record, with
/// its tid; a record over several chunks that shrinks, and one that grows
/// past the statement bound), the first refused and the second written, both
/// refused; a session outside the batch is told of exactly what was
/// written.
#[test]
fn a_batch_writes_its_kept_commits_in_their_order() {
    let config = testdb::fresh("batch_kept");
    let fe = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let setup = fe.open_session();
    commit_root(setup.as_ref(), b"root").unwrap();
    let x = setup.new_oids(1, 16).unwrap()[0];
    let big = |n: usize, fill: u8| vec![fill; n];
    commit_refs(setup.as_ref(), &[(Oid::ROOT, vec![x]), (x, vec![])]).unwrap();
    // x over three chunks.
    let (sb, watcher) = (fe.open_session(), fe.open_session());
    let x3 = big(super::CHUNK * 2 + 10, 3);
    let (r1, r2) = batch_of_two(
        &fe,
        one(x, &x3, &[]),
        (sb.as_ref(), one(Oid::ROOT, b"r", &[x])),
    );
    r1.unwrap();
    r2.unwrap();
    let mut c = config.connect(NoTls).unwrap();
    let order = |c: &mut postgres::Client| -> (i64, i64) {
        let row = c
            .query_one("SELECT tid, objects FROM durus_order WHERE id = 1", &[])
            .unwrap();
        (row.get(0), row.get(1))
    };
    let chunks = |c: &mut postgres::Client, oid: Oid| -> Vec<(i32, i64)> {
        c.query(
            "SELECT chunk, tid FROM durus_records WHERE oid = $1 ORDER BY chunk",
            &[&(oid.0 as i64)],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
    };
    let (t0, objects) = order(&mut c);
    assert_eq!((t0, objects), (4, 2));
    assert_eq!(chunks(&mut c, x), vec![(0, 3), (1, 3), (2, 3)]);
    watcher.sync();

    // Both write x: a shrinks it to one chunk, b makes it two and makes y.
    let y = sb.new_oids(1, 16).unwrap()[0];
    let x2 = big(super::CHUNK + 5, 2);
    let mut b_records = one(x, &x2, &[y]);
    b_records.insert(y, Record::new(y, b"y", &[]));
    let (r1, r2) = batch_of_two(&fe, one(x, b"small", &[]), (sb.as_ref(), b_records));
    r1.unwrap();
    r2.unwrap();
    assert_eq!(order(&mut c), (t0 + 2, 3), "two tids, one object more");
    assert_eq!(
        chunks(&mut c, x),
        vec![(0, t0 + 2), (1, t0 + 2)],
        "b's record of x, its tid"
    );
    assert_eq!(chunks(&mut c, y), vec![(0, t0 + 2)]);
    let mut told = watcher.sync();
    told.sort();
    assert_eq!(told, vec![x, y]);
    let mut loaded = Vec::new();
    watcher
        .load(&[x], &mut |f| {
            if let crate::backend::Found::Record(r) = f {
                loaded = r.to_vec();
            }
            true
        })
        .unwrap();
    assert_eq!(Record::from_bytes(loaded).unwrap().data(), &x2[..]);

    // Two records each past the statement bound, the first commit
    // refused (a reference to nothing): the second is written whole, with
    // the next tid.
    let missing = Oid(1 << 40);
    let over = big(super::batch::STATEMENT_BYTES + 1, 7);
    let z = sb.new_oids(1, 16).unwrap()[0];
    let mut b_records = one(z, &over, &[]);
    b_records.insert(x, Record::new(x, &over, &[z]));
    let (r1, r2) = batch_of_two(&fe, one(x, b"lost", &[missing]), (sb.as_ref(), b_records));
    assert_dangling(&r1, "a reference to nothing");
    r2.unwrap();
    assert_eq!(order(&mut c), (t0 + 3, 4));
    let mut told = watcher.sync();
    told.sort();
    assert_eq!(told, vec![x, z]);
    for oid in [x, z] {
        let mut loaded = Vec::new();
        watcher
            .load(&[oid], &mut |f| {
                if let crate::backend::Found::Record(r) = f {
                    loaded = r.to_vec();
                }
                true
            })
            .unwrap();
        assert_eq!(Record::from_bytes(loaded).unwrap().data(), &over[..]);
    }

    // Both refused: nothing changes, nobody outside is told.
    let (r1, r2) = batch_of_two(
        &fe,
        one(x, b"no", &[missing]),
        (sb.as_ref(), one(Oid(1 << 41), b"no", &[])),
    );
    assert!(r1.is_err() && r2.is_err(), "{r1:?} {r2:?}");
    assert_eq!(order(&mut c), (t0 + 3, 4));
    assert!(watcher.sync().is_empty());
    let logged: i64 = number_of(&mut c, "SELECT count(*) FROM durus_log");
    assert_eq!(logged, t0 + 3);

    // A commit past the bytes a batch may keep ends its batch at once,
    // though a committer waits: the next commits alone.
    let batched = fe.batched.load(std::sync::atomic::Ordering::Relaxed);
    let (r1, r2) = batch_of_two(
        &fe,
        one(x, &over, &[]),
        (sb.as_ref(), one(Oid::ROOT, b"alone", &[x])),
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(
        fe.batched.load(std::sync::atomic::Ordering::Relaxed),
        batched,
        "joined a batch past its bytes"
    );
    assert_eq!(order(&mut c), (t0 + 5, 4));
}

/// Asserts that `result` is a commit refused for a reference to an object
/// not stored.
fn assert_dangling(result: &crate::Result<()>, what: &str) {
    assert!(
        matches!(
            result,
            Err(crate::StorageError::Conflict(
                crate::Conflict::DanglingRefs { .. }
            ))
        ),
        "{what}: {result:?}"
    );
}

/// One record of `oid` as a commit's records.
fn one(oid: Oid, data: &[u8], refs: &[Oid]) -> BTreeMap<Oid, Record> {
    BTreeMap::from([(oid, Record::new(oid, data, refs))])
}

/// What a front end's commits learn of what is stored spares the commits
/// that join a batch their read of the database; what another front end
/// changes (a commit, a collection) is forgotten when its log entry is
/// read: a reference to an object collected elsewhere is refused.
#[test]
fn what_a_front_end_knows_is_stored_is_forgotten_when_changed_elsewhere() {
    use std::sync::atomic::Ordering::Relaxed;
    let config = testdb::fresh("stored_facts");
    let a = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let b = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let sa = a.open_session();
    commit_root(sa.as_ref(), b"r1").unwrap();
    let x = sa.new_oids(1, 16).unwrap()[0];
    commit_refs(sa.as_ref(), &[(Oid::ROOT, vec![x]), (x, vec![])]).unwrap();
    assert_eq!(a.state.lock().stored.get(&x), Some(&Some(0)));

    // Both commits of a batch name only oids the front end knows: no read.
    let reads = a.join_reads.load(Relaxed);
    let (r1, r2) = batch_of_two(
        &a,
        one(x, b"x2", &[]),
        (sa.as_ref(), one(Oid::ROOT, b"r2", &[x])),
    );
    r1.unwrap();
    r2.unwrap();
    assert_eq!(a.join_reads.load(Relaxed), reads, "a joining commit read");

    // Another front end drops x from the root and collects it.
    let sb = b.open_session();
    commit_refs(sb.as_ref(), &[(Oid::ROOT, vec![])]).unwrap();
    let report = b.full_collection(&mut || false).unwrap();
    assert_eq!(report.removed_objects, 1);

    // A reference to x, through a batch: refused (its check reads x again).
    let (r1, r2) = batch_of_two(
        &a,
        one(Oid::ROOT, b"r3", &[x]),
        (sa.as_ref(), one(Oid::ROOT, b"r4", &[])),
    );
    assert_dangling(&r1, "a reference to a collected object");
    r2.unwrap();
    assert!(a.join_reads.load(Relaxed) > reads);
    let mut c = config.connect(NoTls).unwrap();
    let stored: i64 = number_of(&mut c, "SELECT count(*) FROM durus_records");
    assert_eq!(stored, 1, "only the root");
}

/// A front end forgets what it knew is stored when its order's connection
/// is made again: the database may have lost the commits it had shown, and
/// others may have committed since up to the same tid, so the log says
/// nothing of the loss.
#[test]
fn a_front_end_forgets_what_it_knew_is_stored_when_its_order_connection_is_made_again() {
    let config = testdb::fresh("stored_lost");
    let a = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let sa = a.open_session();
    commit_root(sa.as_ref(), b"r1").unwrap();
    let mut c = config.connect(NoTls).unwrap();
    let root_before: Vec<u8> = c
        .query_one("SELECT data FROM durus_records WHERE oid = 0", &[])
        .unwrap()
        .get(0);
    let x = sa.new_oids(1, 16).unwrap()[0];
    commit_refs(sa.as_ref(), &[(Oid::ROOT, vec![x]), (x, vec![])]).unwrap();
    assert_eq!(a.state.lock().stored.get(&x), Some(&Some(0)));
    let tid: i64 = number_of(&mut c, "SELECT tid FROM durus_order WHERE id = 1");

    // The last commit is lost (a failover to a standby that lacked it) ...
    c.execute("DELETE FROM durus_log WHERE tid = $1", &[&tid])
        .unwrap();
    c.execute(
        "UPDATE durus_order SET tid = $1, objects = 1 WHERE id = 1",
        &[&(tid - 1)],
    )
    .unwrap();
    c.execute("DELETE FROM durus_records WHERE oid = $1", &[&(x.0 as i64)])
        .unwrap();
    c.execute(
        "UPDATE durus_records SET tid = $1, data = $2 WHERE oid = 0",
        &[&(tid - 1), &root_before],
    )
    .unwrap();
    // ... another front end commits up to the same tid ...
    let b = PgBackend::open_with(config.clone().into(), 16).unwrap();
    commit_root(b.open_session().as_ref(), b"r2").unwrap();
    assert_eq!(
        number_of(&mut c, "SELECT tid FROM durus_order WHERE id = 1"),
        tid
    );
    // ... and the order's connection is made again (by a commit of the
    // root alone, so that the batch below is not slowed by connecting).
    a.order.lock().conn = None;
    commit_root(sa.as_ref(), b"r3").unwrap();
    let (r1, r2) = batch_of_two(
        &a,
        one(Oid::ROOT, b"r3", &[x]),
        (sa.as_ref(), one(Oid::ROOT, b"r4", &[])),
    );
    assert_dangling(&r1, "a reference to a lost object");
    r2.unwrap();
}

/// The root, while a commit of it is kept in an open batch (so not yet
/// visible in the database), is not handed out as a new oid: the
/// allocation waits for the batch and sees the root stored.
#[test]
fn the_root_is_not_handed_out_while_a_batch_writes_it() {
    use std::sync::atomic::Ordering::{AcqRel, Relaxed};
    let config = testdb::fresh("root_in_batch");
    let fe = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let hold = fe.max_hold_micros.swap(60_000_000, Relaxed);
    fe.order_waiting.fetch_add(1, AcqRel);
    std::thread::scope(|scope| {
        let first = scope.spawn(|| commit_root(fe.open_session().as_ref(), b"root"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while fe.order.lock().open.is_none() {
            assert!(!first.is_finished(), "the root's commit was not kept");
            assert!(std::time::Instant::now() < deadline, "the commit hangs");
            std::thread::sleep(Duration::from_millis(1));
        }
        let allocated = scope.spawn(|| fe.open_session().new_oids(1, 16).unwrap()[0]);
        std::thread::sleep(Duration::from_millis(100));
        // A second commit ends the batch (the allocation holds this front
        // end's oid block meanwhile: it allocates nothing).
        fe.order_waiting.fetch_sub(1, AcqRel);
        commit_root(fe.open_session().as_ref(), b"again").unwrap();
        first.join().unwrap().unwrap();
        let oid = allocated.join().unwrap();
        assert_ne!(oid, Oid::ROOT, "the root was handed out while written");
    });
    fe.max_hold_micros.store(hold, Relaxed);
}

/// A commit that waits for the order row while another front end holds it
/// reads, once it has the row, the log entry the holder committed (a
/// statement that took the row and read the log would read it from a
/// snapshot taken before the wait).
#[test]
fn an_order_taken_after_a_wait_reads_what_its_holder_committed() {
    let config = testdb::fresh("order_wait");
    let fe = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let watcher = fe.open_session();
    commit_root(fe.open_session().as_ref(), b"root").unwrap();
    watcher.sync();
    // Another front end's commit, by hand: it holds the row, moves it and
    // logs a change of the root.
    let mut holder = config.connect(NoTls).unwrap();
    holder
        .batch_execute(
            "BEGIN; SELECT tid FROM durus_order WHERE id = 1 FOR UPDATE; \
             UPDATE durus_order SET tid = 2 WHERE id = 1",
        )
        .unwrap();
    holder
        .execute(
            "INSERT INTO durus_log (tid, oids) VALUES (2, $1)",
            &[&Oid::ROOT.to_bytes().to_vec()],
        )
        .unwrap();
    let mut probe = config.connect(NoTls).unwrap();
    std::thread::scope(|scope| {
        let fe = &fe;
        let committer = scope.spawn(move || {
            let s = fe.open_session();
            commit_root(s.as_ref(), b"after the wait")
        });
        // Whether the committer waits for the row (the holder lets go
        // either way, so that a failure here cannot hang the test).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let waited = loop {
            let waiting: i64 = probe
                .query_one(
                    "SELECT count(*) FROM pg_stat_activity \
                     WHERE wait_event_type = 'Lock' AND datname = current_database()",
                    &[],
                )
                .map_or(0, |r| r.get(0));
            if waiting > 0 || std::time::Instant::now() >= deadline {
                break waiting > 0;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        holder.batch_execute("COMMIT").unwrap();
        committer.join().unwrap().unwrap();
        assert!(waited, "the commit never waited for the row");
    });
    assert_eq!(
        fe.state.lock().known,
        3,
        "the holder's entry read, then its own"
    );
    let tid: i64 = number_of(&mut probe, "SELECT tid FROM durus_order WHERE id = 1");
    assert_eq!(tid, 3, "committed after the holder's commit");
    assert_eq!(watcher.sync(), vec![Oid::ROOT]);
}

/// Only a statement the database cannot run (no such prepared statement)
/// turns the prepared take off; a timeout or an error of the data does not.
#[test]
fn only_a_statement_the_database_cannot_run_turns_the_prepared_take_off() {
    let config = testdb::fresh("unsupported");
    let fe = PgBackend::open_with(config.into(), 16).unwrap();
    let mut conn = fe.pool.get().unwrap();
    let missing = conn.batch("EXECUTE durus_no_such_statement").unwrap_err();
    assert!(super::is_unsupported(&missing), "{missing}");
    let timeout = conn
        .batch("SET statement_timeout = 10; SELECT pg_sleep(1)")
        .unwrap_err();
    assert!(!super::is_unsupported(&timeout), "{timeout}");
    conn.batch("RESET statement_timeout").unwrap();
    let zero = conn.batch("SELECT 1/0").unwrap_err();
    assert!(!super::is_unsupported(&zero), "{zero}");
}

/// A database that prepared the order's statement but cannot run it gets
/// the plain statements: the commit goes through.
#[test]
fn the_order_is_taken_with_plain_statements_where_the_prepared_one_fails() {
    let config = testdb::fresh("order_plain");
    let fe = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let s = fe.open_session();
    commit_root(s.as_ref(), b"first").unwrap();
    {
        let mut order = fe.order.lock();
        let conn = order.conn.as_mut().expect("the order's connection");
        assert!(conn.take_prepared, "the statement was not prepared");
        conn.batch("DEALLOCATE durus_take_order").unwrap();
    }
    commit_root(s.as_ref(), b"second").unwrap();
    assert!(!fe.order.lock().conn.as_ref().unwrap().take_prepared);
    commit_root(s.as_ref(), b"third").unwrap();
    assert_eq!(root_data(s.as_ref()), b"third");
}

/// The root's data as `session` loads it.
fn root_data(session: &dyn Session) -> Vec<u8> {
    let mut got = Vec::new();
    session
        .load(&[Oid::ROOT], &mut |f| {
            if let crate::backend::Found::Record(b) = f {
                got = Record::from_bytes(b.to_vec()).unwrap().data().to_vec();
            }
            true
        })
        .unwrap();
    got
}

/// The commit log is trimmed below what every front end alive has read; a
/// front end silent for longer than the alive window holds it back no more,
/// and when it comes back it finds entries gone and closes the sessions
/// that could have missed them (new sessions are served).
#[test]
fn the_log_is_trimmed_below_what_every_live_front_end_has_read() {
    let config = testdb::fresh("trim");
    let a = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let b = PgBackend::open_with(config.clone().into(), 16).unwrap();
    let on_b = b.open_session();
    let on_a = a.open_session();
    for n in 0..10u8 {
        commit_root(on_a.as_ref(), &[n]).unwrap();
    }
    let mut c = config.connect(NoTls).unwrap();
    let entries = |c: &mut postgres::Client| number_of(c, "SELECT count(*) FROM durus_log");
    // b has read nothing since it opened (position 0): nothing goes.
    assert_eq!(a.heartbeat().unwrap(), 0);
    assert_eq!(entries(&mut c), 10);
    // b reads the log and says so: everything below both positions goes.
    b.heartbeat().unwrap();
    a.heartbeat().unwrap();
    assert_eq!(
        entries(&mut c),
        1,
        "only the entry at the lowest position stays"
    );
    // b falls silent past the alive window and behind: the log is trimmed
    // past it.
    for n in 0..5u8 {
        commit_root(on_a.as_ref(), &[n]).unwrap();
    }
    c.batch_execute(&format!(
        "UPDATE durus_front_ends SET alive_at = now() - interval '1 hour' WHERE id = {}",
        b.front_end
    ))
    .unwrap();
    a.heartbeat().unwrap();
    assert_eq!(entries(&mut c), 1);
    // b's session could have missed those entries: refused; a new one works.
    let err = on_b
        .load(&[Oid::ROOT], &mut |_| true)
        .map(|()| on_b.sync())
        .and_then(|_| on_b.load(&[Oid::ROOT], &mut |_| true))
        .expect_err("a session that may have missed commits must not load");
    assert!(err.to_string().contains("reconnect"), "{err}");
    let fresh = b.open_session();
    commit_root(fresh.as_ref(), b"b again").unwrap();
}

/// Commits records of `(oid, references)` through `session`.
fn commit_refs(session: &dyn Session, records: &[(Oid, Vec<Oid>)]) -> crate::Result<()> {
    let Entry::Now(order) = session.enter_order(&mut || unreachable!("blocks, never queues"))
    else {
        panic!("enter_order blocks until the order is had");
    };
    session.sync();
    let records = records
        .iter()
        .map(|(oid, refs)| (*oid, Record::new(*oid, b"x", refs)))
        .collect();
    order.commit(records, false).0
}

/// Which of `oids` a fresh session of `fe` finds stored.
fn stored(fe: &PgBackend, oids: &[Oid]) -> Vec<bool> {
    let s = fe.open_session();
    s.sync();
    let mut out = Vec::new();
    s.load(oids, &mut |f| {
        out.push(matches!(f, crate::backend::Found::Record(_)));
        true
    })
    .unwrap();
    out
}

/// A full collection marks in a snapshot while commits flow: what a commit
/// made during it re-attaches (an object and the cycle it is in) is kept,
/// through the collecting front end or another; what was detached or made
/// during it stays until the next one; the rest goes, and the other front
/// end's sessions are told.
#[test]
fn a_full_collection_keeps_what_commits_during_it_reach() {
    for through_other in [false, true] {
        let config = testdb::fresh(if through_other {
            "collect_b"
        } else {
            "collect_a"
        });
        let a = PgBackend::open_with(config.clone().into(), 64).unwrap();
        let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
        let sa = a.open_session();
        let o = sa.new_oids(5, 1 << 20).unwrap();
        let (live, g, h, z) = (o[1], o[2], o[3], o[4]);
        assert_eq!(o[0], Oid::ROOT);
        commit_refs(
            sa.as_ref(),
            &[
                (Oid::ROOT, vec![live]),
                (live, vec![]),
                (g, vec![h]),
                (h, vec![g]),
                (z, vec![]),
            ],
        )
        .unwrap();
        let watcher = b.open_session();
        watcher.sync();
        let committer = if through_other {
            b.open_session()
        } else {
            a.open_session()
        };
        let n = committer.new_oids(1, 1 << 20).unwrap()[0];
        let mut calls = 0;
        let report = a
            .full_collection(&mut || {
                calls += 1;
                if calls == 1 {
                    // After the snapshot, before the mark: the root now
                    // holds g (and so h) instead of live; n is new.
                    commit_refs(committer.as_ref(), &[(Oid::ROOT, vec![g]), (n, vec![])]).unwrap();
                }
                false
            })
            .unwrap();
        assert!(report.completed);
        assert_eq!(report.removed_objects, 1, "through_other {through_other}");
        assert_eq!(
            stored(&a, &[Oid::ROOT, live, g, h, n, z]),
            [true, true, true, true, true, false],
            "through_other {through_other}"
        );
        assert!(watcher.sync().contains(&z), "the other front end is told");
        // The next one takes what was detached or made during the first.
        let report = a.full_collection(&mut || false).unwrap();
        assert_eq!(report.removed_objects, 2);
        assert_eq!(
            stored(&b, &[Oid::ROOT, live, g, h, n]),
            [true, false, true, true, false]
        );
    }
}

/// Two full collections at once, through two front ends: one holds the
/// collector's lease and the other is refused naming its front end (or
/// runs after it); the garbage goes once and the database checks clean.
/// A lease whose front end fell silent is taken over, and given up at the
/// end.
#[test]
fn one_full_collection_at_a_time_across_front_ends() {
    let config = testdb::fresh("collect_lease");
    let a = PgBackend::open_with(config.clone().into(), 4096).unwrap();
    let b = PgBackend::open_with(config.clone().into(), 4096).unwrap();
    let s = a.open_session();
    let garbage = 5_000;
    let o = s.new_oids(1 + garbage, 1 << 20).unwrap();
    let mut records = vec![(Oid::ROOT, vec![])];
    records.extend(o[1..].iter().map(|g| (*g, vec![])));
    commit_refs(s.as_ref(), &records).unwrap();
    let (ra, rb) = std::thread::scope(|scope| {
        let one = scope.spawn(|| a.full_collection(&mut || false));
        let two = scope.spawn(|| b.full_collection(&mut || false));
        (one.join().unwrap(), two.join().unwrap())
    });
    let mut removed = 0;
    for r in [ra, rb] {
        match r {
            Ok(report) => removed += report.removed_objects,
            Err(e) => assert!(e.to_string().contains("is running on front end"), "{e}"),
        }
    }
    assert_eq!(removed, garbage as u64);
    let url = testdb::url_of(&config);
    let check = super::tools::check_database(&url, &mut |_| {}).unwrap();
    assert!(check.problems.is_empty(), "{:?}", check.problems);
    assert_eq!(check.records, 1);

    // a holds the lease, alive: b's collection is refused, naming a.
    assert_eq!(a.take_lease(false).unwrap(), None);
    let e = b.full_collection(&mut || false).unwrap_err().to_string();
    assert!(e.contains(&format!("front end {}", a.front_end)), "{e}");
    // a falls silent: b takes the lease over, and gives it up at the end.
    let mut c = config.connect(NoTls).unwrap();
    c.execute(
        "UPDATE durus_front_ends SET alive_at = now() - interval '1 hour' WHERE id = $1",
        &[&a.front_end],
    )
    .unwrap();
    assert!(b.full_collection(&mut || false).unwrap().completed);
    let lease = c
        .query("SELECT value FROM durus_meta WHERE name = 'collector'", &[])
        .unwrap();
    assert!(lease.is_empty(), "the lease was not given up");
}

/// The one bigint `sql` answers on `c`.
fn number_of(c: &mut postgres::Client, sql: &str) -> i64 {
    c.query_one(sql, &[]).unwrap().get(0)
}

/// A record's data: one number.
fn number(n: u64) -> Vec<u8> {
    n.to_be_bytes().to_vec()
}

/// The number `session` loads for `oid`.
fn load_number(session: &dyn Session, oid: Oid) -> crate::Result<u64> {
    let mut got = None;
    session.load(&[oid], &mut |f| {
        if let crate::backend::Found::Record(b) = f {
            got = Record::from_bytes(b.to_vec())
                .ok()
                .and_then(|r| r.data().try_into().ok())
                .map(u64::from_be_bytes);
        }
        true
    })?;
    got.ok_or_else(|| crate::StorageError::protocol(format!("no number in {oid}")))
}

mod threads_and_crashes {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;

    use parking_lot::Mutex;
    use postgres::NoTls;
    use proptest::prelude::*;

    use super::super::{PgBackend, testdb};
    use super::{load_number, number};
    use crate::backend::{Backend, Entry};
    use crate::record::{Oid, Record};

    const THREADS: u64 = 4;
    const COMMITS: u64 = 100;
    /// Front ends at once; each thread uses the one of its slot.
    const SLOTS: usize = 2;

    /// A front end with its own application name, so that its connections
    /// can be cut (as when its process is killed).
    fn front_end(config: &postgres::Config, name: &str) -> Arc<PgBackend> {
        let mut config = config.clone();
        config.application_name(name);
        Arc::new(PgBackend::open_with(config.into(), 16).unwrap())
    }

    /// Closes every connection of the front end named `name`, from the
    /// database's side.
    fn cut(config: &postgres::Config, name: &str) {
        let mut c = config.connect(NoTls).unwrap();
        c.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&name],
        )
        .unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(8))]
        /// Threads commit at once, each through its own session on one of
        /// two front ends; at the moments drawn, a front end's connections
        /// are cut mid-flight (as when its process is killed) and a new one
        /// takes its place, its threads moving to it. Each commit of a
        /// thread sets its two objects to the commit's number and adds one
        /// to a shared counter. Afterwards, as the serial model of the
        /// same commits says: each thread's two objects are equal (a commit
        /// is whole), hold its last acknowledged number or that of a commit
        /// whose answer was lost with its front end; the counter is the
        /// acknowledged commits plus at most the lost ones.
        #[test]
        fn threads_committing_through_front_ends_that_are_cut_lose_nothing_acknowledged(
            cuts in proptest::collection::vec((0..SLOTS, 5u64..250), 1..4),
        ) {
            let shown = cuts.clone();
            let config = testdb::fresh("threads_cut");
            let first = front_end(&config, "fe-0");
            // The counter (the root) and two objects a thread.
            let objects = {
                let s = first.open_session();
                let oids = s.new_oids(1 + 2 * THREADS as usize, 1 << 20).unwrap();
                let Entry::Now(order) = s.enter_order(&mut || unreachable!()) else {
                    panic!("blocks until the order is had")
                };
                s.sync();
                let records = oids
                    .iter()
                    .map(|o| (*o, Record::new(*o, &number(0), &[])))
                    .collect();
                order.commit(records, false).0.unwrap();
                oids
            };
            let slots: Vec<Mutex<(Arc<PgBackend>, String)>> = (0..SLOTS)
                .map(|i| {
                    let fe = if i == 0 { first.clone() } else { front_end(&config, "fe-1") };
                    Mutex::new((fe, format!("fe-{i}")))
                })
                .collect();
            let done = AtomicBool::new(false);
            // Per thread: the acknowledged commits, its last acknowledged
            // number, and the numbers whose answer was lost.
            let results: Vec<(u64, u64, Vec<u64>)> = std::thread::scope(|scope| {
                let slots = &slots;
                let objects = &objects;
                let done = &done;
                let config = &config;
                let cutter = scope.spawn(move || {
                    for (n, (slot, after_ms)) in cuts.iter().enumerate() {
                        std::thread::sleep(Duration::from_millis(*after_ms));
                        if done.load(Ordering::Acquire) {
                            return;
                        }
                        let name = format!("fe-{}-{n}", slot);
                        let new = front_end(config, &name);
                        let old = std::mem::replace(&mut *slots[*slot].lock(), (new, name));
                        cut(config, &old.1);
                    }
                });
                let workers: Vec<_> = (0..THREADS)
                    .map(|t| {
                        scope.spawn(move || {
                            let (a, b) = (objects[1 + 2 * t as usize], objects[2 + 2 * t as usize]);
                            let (mut acked, mut last, mut lost) = (0u64, 0u64, Vec::new());
                            let mut k = 1;
                            while k <= COMMITS {
                                let fe = slots[t as usize % SLOTS].lock().0.clone();
                                let s = fe.open_session();
                                while k <= COMMITS {
                                    let Entry::Now(order) = s.enter_order(&mut || unreachable!())
                                    else {
                                        panic!("blocks until the order is had")
                                    };
                                    s.sync();
                                    let counter = match load_number(s.as_ref(), Oid::ROOT) {
                                        Ok(c) => c,
                                        Err(_) => break,
                                    };
                                    let records = [
                                        (Oid::ROOT, counter + 1),
                                        (a, k),
                                        (b, k),
                                    ]
                                    .into_iter()
                                    .map(|(o, v)| (o, Record::new(o, &number(v), &[])))
                                    .collect();
                                    match order.commit(records, false).0 {
                                        Ok(()) => {
                                            acked += 1;
                                            last = k;
                                        }
                                        Err(_) => {
                                            // Its answer is lost with the
                                            // front end: applied or not.
                                            lost.push(k);
                                            k += 1;
                                            break;
                                        }
                                    }
                                    k += 1;
                                }
                            }
                            (acked, last, lost)
                        })
                    })
                    .collect();
                let results = workers.into_iter().map(|w| w.join().unwrap()).collect();
                done.store(true, Ordering::Release);
                cutter.join().unwrap();
                results
            });
            let reader = front_end(&config, "reader");
            let s = reader.open_session();
            s.sync();
            let counter = load_number(s.as_ref(), Oid::ROOT).unwrap();
            let acked: u64 = results.iter().map(|r| r.0).sum();
            let lost: u64 = results.iter().map(|r| r.2.len() as u64).sum();
            prop_assert!(
                counter >= acked && counter <= acked + lost,
                "counter {} with {} acknowledged and {} lost commits", counter, acked, lost
            );
            for (t, (_, last, lost)) in results.iter().enumerate() {
                let a = load_number(s.as_ref(), objects[1 + 2 * t]).unwrap();
                let b = load_number(s.as_ref(), objects[2 + 2 * t]).unwrap();
                prop_assert_eq!(a, b, "thread {}: a commit applied in part", t);
                prop_assert!(
                    a == *last || (a > *last && lost.contains(&a)),
                    "thread {}: holds {}, last acknowledged {}, lost {:?}", t, a, last, lost
                );
            }
            eprintln!("cuts {shown:?}: {acked} acknowledged, {lost} lost, counter {counter}");
        }
    }
}

/// A collection with a grace window removes only what no commit referenced
/// during the window: an object detached before it, attached again during
/// it and detached once more (so that no current record references it)
/// stays, with what it references; garbage nothing touched goes, cycles
/// included, but not before the window has passed; a pack then takes the
/// rest. The commits come through the collecting front end or another,
/// and the log is trimmed meanwhile as far as the front ends allow.
#[test]
fn a_collection_with_a_grace_window_keeps_what_commits_referenced_during_it() {
    for through_other in [false, true] {
        let config = testdb::fresh(if through_other { "grace_b" } else { "grace_a" });
        let a = PgBackend::open_with(config.clone().into(), 64).unwrap();
        let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
        let sa = a.open_session();
        let o = sa.new_oids(7, 1 << 20).unwrap();
        let (live, x, y, y2, c1, c2) = (o[1], o[2], o[3], o[4], o[5], o[6]);
        commit_refs(
            sa.as_ref(),
            &[
                (Oid::ROOT, vec![live, y]),
                (live, vec![]),
                (x, vec![]),
                (y, vec![y2]),
                (y2, vec![]),
                (c1, vec![c2]),
                (c2, vec![c1]),
            ],
        )
        .unwrap();
        // y is detached before the collection.
        commit_refs(sa.as_ref(), &[(Oid::ROOT, vec![live])]).unwrap();
        let committer = if through_other {
            b.open_session()
        } else {
            a.open_session()
        };
        let grace = Duration::from_secs(2);
        let started = std::time::Instant::now();
        let report = std::thread::scope(|scope| {
            let collecting = scope.spawn(|| a.collect(grace, true, &mut || false));
            while a.state.lock().collecting.is_none() {
                std::thread::sleep(Duration::from_millis(5));
            }
            // Within the window: y attached again, then detached again.
            commit_refs(committer.as_ref(), &[(Oid::ROOT, vec![live, y])]).unwrap();
            commit_refs(committer.as_ref(), &[(Oid::ROOT, vec![live])]).unwrap();
            b.heartbeat().unwrap();
            a.heartbeat().unwrap();
            collecting.join().unwrap()
        })
        .unwrap();
        assert!(report.completed);
        assert!(
            started.elapsed() >= grace,
            "removed after {:?}, inside the window",
            started.elapsed()
        );
        assert_eq!(report.removed_objects, 3, "through_other {through_other}");
        assert_eq!(
            stored(&b, &[Oid::ROOT, live, x, y, y2, c1, c2]),
            [true, true, false, true, true, false, false],
            "through_other {through_other}"
        );
        let report = b.full_collection(&mut || false).unwrap();
        assert_eq!(report.removed_objects, 2);
        assert_eq!(stored(&a, &[y, y2]), [false, false]);
    }
}

/// A database of format 1 is upgraded in place when a front end of this
/// build opens it (twice at once: one upgrades); its log entries written
/// before have no references, those after do. An entry without references
/// logged during a collection with a grace window (as a front end of
/// format 1 still running writes) stops that collection, naming why,
/// and removes nothing; a pack is not affected.
#[test]
fn a_database_of_format_1_is_upgraded_and_an_old_front_end_stops_only_a_grace_collection() {
    let config = testdb::fresh("upgrade");
    let fe = PgBackend::open_with(config.clone().into(), 8).unwrap();
    let s = fe.open_session();
    let o = s.new_oids(2, 1 << 20).unwrap();
    commit_refs(s.as_ref(), &[(Oid::ROOT, vec![o[1]]), (o[1], vec![])]).unwrap();
    drop(s);
    drop(fe);
    let mut c = config.connect(NoTls).unwrap();
    // As 0.9 left it.
    c.batch_execute(
        "ALTER TABLE durus_log DROP COLUMN refs; DROP TABLE durus_alone, durus_aware; \
         UPDATE durus_meta SET value = 1 WHERE name = 'format'",
    )
    .unwrap();
    let (one, two) = std::thread::scope(|scope| {
        let one = scope.spawn(|| PgBackend::open_with(config.clone().into(), 8));
        let two = scope.spawn(|| PgBackend::open_with(config.clone().into(), 8));
        (one.join().unwrap().unwrap(), two.join().unwrap().unwrap())
    });
    drop(two);
    assert_eq!(
        number_of(&mut c, "SELECT value FROM durus_meta WHERE name = 'format'"),
        super::FORMAT
    );
    assert_eq!(
        number_of(&mut c, "SELECT count(*) FROM durus_log WHERE refs IS NULL"),
        1
    );
    let s = one.open_session();
    // o[1] detached, then a commit referencing it; its entry has refs.
    commit_refs(s.as_ref(), &[(Oid::ROOT, vec![])]).unwrap();
    commit_refs(s.as_ref(), &[(Oid::ROOT, vec![o[1]])]).unwrap();
    let refs: Vec<u8> = c
        .query_one("SELECT refs FROM durus_log ORDER BY tid DESC LIMIT 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(refs, o[1].to_bytes().to_vec());
    commit_refs(s.as_ref(), &[(Oid::ROOT, vec![])]).unwrap();

    // An entry as a front end of format 1 writes it, during the window.
    let err = std::thread::scope(|scope| {
        let collecting = scope.spawn(|| one.collect(Duration::from_secs(1), true, &mut || false));
        while one.state.lock().collecting.is_none() {
            std::thread::sleep(Duration::from_millis(5));
        }
        c.batch_execute(
            "BEGIN; \
             INSERT INTO durus_log (tid, oids) SELECT tid + 1, '' FROM durus_order; \
             UPDATE durus_order SET tid = tid + 1; COMMIT",
        )
        .unwrap();
        collecting.join().unwrap()
    })
    .unwrap_err()
    .to_string();
    assert!(err.contains("earlier version"), "{err}");
    assert_eq!(stored(&one, &[o[1]]), [true], "nothing was removed");
    let report = one.full_collection(&mut || false).unwrap();
    assert_eq!(report.removed_objects, 1);
    assert_eq!(stored(&one, &[o[1]]), [false]);
}

/// The background collector starts a collection once enough commits came,
/// and removes garbage only after its grace window; a pack, on its front
/// end or another, does not wait for a background collection waiting out
/// its window: it takes the lease over, and the background one stops.
#[test]
fn the_background_collector_waits_out_its_window_and_gives_way_to_a_pack() {
    let config = testdb::fresh("background");
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let mut policy = crate::server::DatabaseGc {
        grace: Duration::from_secs(1),
        after_commits: 1,
        check_every: Duration::from_millis(100),
        ..Default::default()
    };
    PgBackend::start_collector(&a, policy.clone());
    let mut c = config.connect(NoTls).unwrap();
    let s = a.open_session();
    let o = s.new_oids(3, 1 << 20).unwrap();
    commit_refs(
        s.as_ref(),
        &[(Oid::ROOT, vec![o[1]]), (o[1], vec![]), (o[2], vec![])],
    )
    .unwrap();
    let detached = std::time::Instant::now();
    commit_refs(s.as_ref(), &[(Oid::ROOT, vec![])]).unwrap();
    let mut gone = None;
    while detached.elapsed() < Duration::from_secs(60) {
        if stored(&b, &[o[1], o[2]]) == [false, false] {
            gone = Some(detached.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let gone = gone.expect("the background collector removed the garbage within 60 s");
    assert!(
        gone >= policy.grace,
        "removed after {gone:?}, inside the window"
    );
    // Counted when the collection returns, a moment after its removal.
    while a.state.lock().full_collections == 0 {
        assert!(
            detached.elapsed() < Duration::from_secs(90),
            "the collection that removed the garbage never completed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // A long window now: packs do not wait for it.
    let slow = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let slow = std::sync::Arc::new(slow);
    drop(s);
    drop(a);
    policy.grace = Duration::from_secs(600);
    PgBackend::start_collector(&slow, policy);
    let s = slow.open_session();
    let g = s.new_oids(2, 1 << 20).unwrap();
    commit_refs(s.as_ref(), &[(g[0], vec![]), (g[1], vec![])]).unwrap();
    let background = |c: &mut postgres::Client| {
        c.query(
            "SELECT value FROM durus_meta WHERE name = 'collector_background'",
            &[],
        )
        .unwrap()
        .first()
        .map(|row| row.get::<_, i64>(0))
    };
    let waited = std::time::Instant::now();
    let wait_for_background = |c: &mut postgres::Client| {
        while background(c) != Some(slow.front_end) {
            assert!(
                waited.elapsed() < Duration::from_secs(120),
                "no background collection"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    wait_for_background(&mut c);
    // Through another front end: the lease is taken over.
    let report = b.full_collection(&mut || false).unwrap();
    assert!(report.completed);
    assert_eq!(report.removed_objects, 2);
    assert_eq!(background(&mut c), None);
    // Through its own front end: the background collection stops for it.
    let h = s.new_oids(1, 1 << 20).unwrap();
    commit_refs(s.as_ref(), &[(h[0], vec![])]).unwrap();
    wait_for_background(&mut c);
    let report = slow.full_collection(&mut || false).unwrap();
    assert!(report.completed);
    assert_eq!(report.removed_objects, 1);
    assert!(
        waited.elapsed() < Duration::from_secs(300),
        "the packs waited for the background collection's window"
    );
}

/// The upgrade from format 1 does not wait without end for the commit log
/// table while another front end's transaction uses it (a pack's snapshot
/// on a front end of 0.9, during which every commit would queue behind
/// the upgrade): held throughout, the new front end is refused naming why
/// and the database stays format 1; held for a moment, a later try
/// upgrades it.
#[test]
fn the_upgrade_gives_up_rather_than_wait_for_the_log_table_without_end() {
    let config = testdb::fresh("upgrade_wait");
    drop(PgBackend::open_with(config.clone().into(), 8).unwrap());
    let mut c = config.connect(NoTls).unwrap();
    c.batch_execute(
        "ALTER TABLE durus_log DROP COLUMN refs; DROP TABLE durus_alone, durus_aware; \
         UPDATE durus_meta SET value = 1 WHERE name = 'format'",
    )
    .unwrap();
    let format = |c: &mut postgres::Client| {
        number_of(c, "SELECT value FROM durus_meta WHERE name = 'format'")
    };
    let mut pack = config.connect(NoTls).unwrap();
    pack.batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT count(*) FROM durus_log")
        .unwrap();
    let err = PgBackend::open_with(config.clone().into(), 8)
        .err()
        .expect("refused while the log table is in use")
        .to_string();
    assert!(err.contains("could not be upgraded"), "{err}");
    assert_eq!(format(&mut c), 1);
    std::thread::scope(|scope| {
        let opening = scope.spawn(|| PgBackend::open_with(config.clone().into(), 8));
        std::thread::sleep(Duration::from_secs(3));
        pack.batch_execute("COMMIT").unwrap();
        opening
            .join()
            .unwrap()
            .expect("upgraded once the log table is free");
    });
    assert_eq!(format(&mut c), super::FORMAT);
}

/// When a background collection is due: never while fewer commits than
/// `after_commits` came since the last one, unless `interval` has passed
/// with a commit since (a last collection two days ago); with `idle_only`,
/// not while commits keep coming, and soon once they stop.
#[test]
fn a_background_collection_is_due_by_commits_by_time_or_when_idle() {
    let config = testdb::fresh("due");
    let fe = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let mut c = config.connect(NoTls).unwrap();
    let s = fe.open_session();
    let o = s.new_oids(2, 1 << 20).unwrap();
    assert_eq!(o[0], Oid::ROOT);
    // o[1] is garbage from the start.
    commit_refs(s.as_ref(), &[(o[0], vec![]), (o[1], vec![])]).unwrap();
    let policy = crate::server::DatabaseGc {
        grace: Duration::ZERO,
        after_commits: 1_000,
        check_every: Duration::from_millis(50),
        ..Default::default()
    };
    let mut looked = super::collect::Looked::default();
    assert!(!fe.collection_due(&policy, &mut looked).unwrap());
    // The last collection two days ago, at the last commit: nothing due
    // until a commit comes.
    c.batch_execute(
        "INSERT INTO durus_meta (name, value) SELECT 'collected_tid', tid FROM durus_order; \
         INSERT INTO durus_meta (name, value) \
         VALUES ('collected_at', extract(epoch FROM now())::bigint - 2 * 86400)",
    )
    .unwrap();
    assert!(!fe.collection_due(&policy, &mut looked).unwrap());
    commit_refs(s.as_ref(), &[(o[0], vec![])]).unwrap();
    assert!(fe.collection_due(&policy, &mut looked).unwrap());
    // Tried just now: not again until more commits or another day.
    assert!(!fe.collection_due(&policy, &mut looked).unwrap());

    // Idle only: commits every 20 ms for 1.5 s start nothing; once they
    // stop, a collection runs.
    // (Looks 0.5 s apart: each sees commits, however slow the machine.)
    let idle = crate::server::DatabaseGc {
        after_commits: 1,
        idle_only: true,
        check_every: Duration::from_millis(500),
        ..policy
    };
    PgBackend::start_collector(&fe, idle);
    let started = std::time::Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        commit_refs(s.as_ref(), &[(o[0], vec![])]).unwrap();
    }
    assert_eq!(
        fe.state.lock().full_collections,
        0,
        "collected while commits came"
    );
    assert_eq!(stored(&fe, &[o[1]]), [true], "collected while commits came");
    let stopped = std::time::Instant::now();
    while fe.state.lock().full_collections == 0 {
        assert!(
            stopped.elapsed() < Duration::from_secs(30),
            "no collection once idle"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(stored(&fe, &[o[0], o[1]]), [true, false]);
}

/// A batch's hold counts from when its first commit had the order row, not
/// from when it began to wait for it: with the row held elsewhere (as by
/// another front end's batch) for longer than the hold, the first commit
/// after it still opens a batch, and the next commit joins it.
#[test]
fn the_hold_of_a_batch_counts_from_when_the_row_is_had() {
    use std::sync::atomic::Ordering::Relaxed;
    let config = testdb::fresh("hold_from_row");
    let fe = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let setup = fe.open_session();
    commit_root(setup.as_ref(), b"root").unwrap();
    let batched = fe.batched.load(Relaxed);
    let mut other = config.connect(NoTls).unwrap();
    other
        .batch_execute("BEGIN; SELECT tid FROM durus_order WHERE id = 1 FOR UPDATE")
        .unwrap();
    let second = fe.open_session();
    let (first, second) = batch_of_two_holding(
        &fe,
        one(Oid::ROOT, b"first", &[]),
        (second.as_ref(), one(Oid::ROOT, b"second", &[])),
        300_000,
        || {
            // Longer than the hold, the row held elsewhere.
            std::thread::sleep(Duration::from_millis(1500));
            other.batch_execute("COMMIT").unwrap();
        },
    );
    first.unwrap();
    second.unwrap();
    assert_eq!(
        fe.batched.load(Relaxed),
        batched + 1,
        "the first commit after the wait did not open a batch"
    );
    assert_eq!(root_data(fe.open_session().as_ref()), b"second");
}

/// What `session` is answered for `oid`: "record", "invalid" or "missing".
fn answer_for(session: &dyn Session, oid: Oid) -> &'static str {
    let mut got = "none";
    session
        .load(&[oid], &mut |f| {
            got = match f {
                crate::backend::Found::Record(_) => "record",
                crate::backend::Found::Invalid => "invalid",
                crate::backend::Found::Missing => "missing",
            };
            true
        })
        .unwrap();
    got
}

/// Waits until `fe` holds the database alone, or fails after `limit`.
fn wait_alone(fe: &PgBackend, limit: Duration) {
    let started = std::time::Instant::now();
    while !fe.alone() {
        assert!(
            started.elapsed() < limit,
            "the front end did not hold the database alone within {limit:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A front end over a new database `name`, the root committed as `root`,
/// holding the database alone (taken as soon as it may), with its thread.
fn alone_front_end(
    name: &str,
    root: &[u8],
) -> (
    postgres::Config,
    std::sync::Arc<PgBackend>,
    Option<std::thread::JoinHandle<()>>,
) {
    let config = testdb::fresh(name);
    let fe = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    commit_root(fe.open_session().as_ref(), root).unwrap();
    let thread = PgBackend::start_alone(&fe, Duration::ZERO);
    wait_alone(&fe, Duration::from_secs(10));
    (config, fe, thread)
}

/// On a new session of `fe`: enters the order, says so on `entered`,
/// runs `meanwhile` (the client taking its time), and commits `data` as
/// the root.
fn enter_then_commit(
    fe: &PgBackend,
    data: &[u8],
    entered: mpsc::Sender<()>,
    meanwhile: impl FnOnce(),
) -> crate::Result<()> {
    let s = fe.open_session();
    let Entry::Now(order) = s.enter_order(&mut || unreachable!("blocks, never queues")) else {
        panic!("enter_order blocks until the order is had");
    };
    entered.send(()).unwrap();
    meanwhile();
    let mut records = BTreeMap::new();
    records.insert(Oid::ROOT, Record::new(Oid::ROOT, data, &[]));
    order.commit(records, false).0
}

/// Waits until the renewals of the hold of the database of `config` have
/// stopped (for 300 ms): its holder's thread has ended.
fn renewals_stop(config: &postgres::Config) {
    let mut c = config.connect(NoTls).unwrap();
    let mut last = number_of(&mut c, "SELECT renewals FROM durus_alone WHERE id = 1");
    loop {
        std::thread::sleep(Duration::from_millis(300));
        let now = number_of(&mut c, "SELECT renewals FROM durus_alone WHERE id = 1");
        if now == last {
            return;
        }
        last = now;
    }
}

/// A front end that dies holding the database alone is taken over by
/// another's own look, with no commit waiting, once its renewals have
/// stopped for longer than its lease; the other then holds it.
#[test]
fn a_front_end_that_dies_alone_is_taken_over_by_another_front_end_alone() {
    let (config, a, _a_thread) = alone_front_end("alone_taken_over_by_look", b"one");
    a.alone_dies
        .store(true, std::sync::atomic::Ordering::Release);
    renewals_stop(&config);
    let died = std::time::Instant::now();
    let b = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let _b_thread = PgBackend::start_alone(&b, Duration::ZERO);
    wait_alone(&b, Duration::from_secs(10));
    assert!(
        died.elapsed() >= super::alone::TAKEOVER,
        "taken over {:?} after the renewals stopped",
        died.elapsed()
    );
    let mut c = config.connect(NoTls).unwrap();
    assert_eq!(
        number_of(&mut c, "SELECT holder FROM durus_alone WHERE id = 1"),
        b.front_end
    );
    b.close().unwrap();
}

/// A front end alone answers loads from memory, and is told of its own
/// commits as they happen: a session not yet synced is answered `Invalid`
/// for an object another session changed, then the new record. When a
/// second front end commits, it first makes the first give way: once that
/// commit is acknowledged, the first front end's sessions are answered
/// `Invalid` for what it changed, as one server would (the first front
/// end's memory still holds the old record). While the second goes on
/// committing, the first does not hold the database alone again; once it
/// stops, it does.
#[test]
fn a_front_end_alone_answers_loads_from_memory_and_gives_way_to_a_commit_elsewhere() {
    let config = testdb::fresh("alone_gives_way");
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let sa = a.open_session();
    let other = a.open_session();
    commit_root(sa.as_ref(), b"one").unwrap();
    let _thread = PgBackend::start_alone(&a, Duration::from_secs(2));
    wait_alone(&a, Duration::from_secs(15));

    // Read once from the database, then from memory.
    other.sync();
    assert_eq!(root_data(other.as_ref()), b"one");
    wait_alone(&a, Duration::from_secs(5));
    let before = a.loads_from_memory();
    assert_eq!(root_data(other.as_ref()), b"one");
    assert_eq!(
        a.loads_from_memory(),
        before + 1,
        "not answered from memory"
    );

    // A commit of this front end: the record kept is forgotten.
    commit_root(sa.as_ref(), b"two").unwrap();
    assert_eq!(answer_for(other.as_ref(), Oid::ROOT), "invalid");
    assert_eq!(other.sync(), vec![Oid::ROOT]);
    assert_eq!(root_data(other.as_ref()), b"two");
    assert_eq!(root_data(other.as_ref()), b"two");
    wait_alone(&a, Duration::from_secs(5));

    // Another front end commits: it waits for the first to give way.
    let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let sb = b.open_session();
    commit_root(sb.as_ref(), b"three").unwrap();
    assert!(!a.alone(), "still alone after another front end committed");
    assert_eq!(answer_for(other.as_ref(), Oid::ROOT), "invalid");
    assert_eq!(other.sync(), vec![Oid::ROOT]);
    assert_eq!(root_data(other.as_ref()), b"three");

    // Commits elsewhere keep it from holding the database alone again.
    for n in 0..15u32 {
        commit_root(sb.as_ref(), format!("b{n}").as_bytes()).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        assert!(!a.alone(), "alone again while another front end commits");
    }
    wait_alone(&a, Duration::from_secs(15));
    other.sync();
    assert_eq!(root_data(other.as_ref()), b"b14");
    drop(sb);
    a.close().unwrap();
    b.close().unwrap();
}

/// A front end that dies holding the database alone stops answering from
/// memory a lease after its last renewal; another front end's commit
/// waits for longer than that lease, then takes the row over and commits.
/// The first front end (its thread dead, the object still there) answers
/// `Invalid` for what changed, from the database.
#[test]
fn a_front_end_that_dies_alone_is_taken_over_after_its_lease() {
    let config = testdb::fresh("alone_taken_over");
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let sa = a.open_session();
    commit_root(sa.as_ref(), b"one").unwrap();
    let _thread = PgBackend::start_alone(&a, Duration::ZERO);
    wait_alone(&a, Duration::from_secs(10));
    sa.sync();
    assert_eq!(root_data(sa.as_ref()), b"one");
    assert_eq!(root_data(sa.as_ref()), b"one");
    a.alone_dies
        .store(true, std::sync::atomic::Ordering::Release);
    renewals_stop(&config);

    let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let sb = b.open_session();
    let started = std::time::Instant::now();
    commit_root(sb.as_ref(), b"two").unwrap();
    let waited = started.elapsed();
    assert!(
        waited >= super::alone::LEASE,
        "taken over after {waited:?}, within the holder's lease"
    );
    assert!(!a.alone());
    assert_eq!(answer_for(sa.as_ref(), Oid::ROOT), "invalid");
    assert_eq!(sa.sync(), vec![Oid::ROOT]);
    assert_eq!(root_data(sa.as_ref()), b"two");
    let stats = super::tools::database_stats(&testdb::url_of(&config)).unwrap();
    assert_eq!(stats.alone, None);
}

/// A database of format 2 is upgraded to 3; a front end of an earlier
/// build still alive (it would commit without asking) keeps the others
/// from holding the database alone, until it is no longer heard of.
#[test]
fn a_database_of_format_2_is_upgraded_and_no_front_end_is_alone_beside_an_old_one() {
    let config = testdb::fresh("alone_upgrade");
    let mut c = config.connect(NoTls).unwrap();
    drop(PgBackend::open_with(config.clone().into(), 64).unwrap());
    // As 0.10 left it, its front end alive.
    c.batch_execute(
        "DROP TABLE durus_alone, durus_aware; \
         UPDATE durus_meta SET value = 2 WHERE name = 'format'; \
         UPDATE durus_front_ends SET alive_at = now()",
    )
    .unwrap();
    let old = number_of(&mut c, "SELECT max(id) FROM durus_front_ends");
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    assert_eq!(
        number_of(&mut c, "SELECT value FROM durus_meta WHERE name = 'format'"),
        super::FORMAT
    );
    assert_eq!(
        number_of(&mut c, "SELECT count(*) FROM durus_aware"),
        1,
        "only the new front end says it knows of the hold"
    );
    commit_root(a.open_session().as_ref(), b"one").unwrap();
    let _thread = PgBackend::start_alone(&a, Duration::ZERO);
    std::thread::sleep(Duration::from_secs(3));
    assert!(!a.alone(), "alone beside a front end of an earlier build");
    c.execute(
        "UPDATE durus_front_ends SET alive_at = now() - interval '1 hour' WHERE id = $1",
        &[&old],
    )
    .unwrap();
    wait_alone(&a, Duration::from_secs(10));
    a.close().unwrap();
    assert_eq!(
        number_of(&mut c, "SELECT holder FROM durus_alone WHERE id = 1"),
        0,
        "closing gives the database up"
    );
}

/// A front end alone whose database lost commits it had seen (a failover
/// to a standby that lacked them, made here by removing them, and its
/// connections broken) does not go on answering from memory: its hold is
/// taken again on a new connection, from the log, which shows the loss.
/// The sessions that saw the lost commits are refused; a new one reads
/// the database's record, not the one kept in memory.
#[test]
fn a_front_end_alone_whose_database_lost_commits_answers_from_the_database() {
    let config = testdb::fresh("alone_went_back");
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 16).unwrap());
    let old = a.open_session();
    for n in 0..4u8 {
        commit_root(old.as_ref(), &[n]).unwrap();
    }
    let _thread = PgBackend::start_alone(&a, Duration::ZERO);
    wait_alone(&a, Duration::from_secs(10));
    assert_eq!(root_data(old.as_ref()), [3]);
    assert_eq!(root_data(old.as_ref()), [3]);
    let mut c = config.connect(NoTls).unwrap();
    c.batch_execute(
        "DELETE FROM durus_log WHERE tid > 2; UPDATE durus_order SET tid = 2 WHERE id = 1; \
         UPDATE durus_records SET tid = 2, data = 'x' WHERE oid = 0; \
         SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'durus-redb alone' AND datname = current_database()",
    )
    .unwrap();
    let started = std::time::Instant::now();
    while old.load(&[Oid::ROOT], &mut |_| true).is_ok() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the session that saw lost commits is still served"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    wait_alone(&a, Duration::from_secs(10));
    let new = a.open_session();
    for _ in 0..2 {
        let mut got = None;
        new.load(&[Oid::ROOT], &mut |f| {
            if let crate::backend::Found::Record(b) = f {
                got = Some(b.to_vec());
            }
            true
        })
        .unwrap();
        assert_eq!(got.as_deref(), Some(&b"x"[..]));
    }
    a.close().unwrap();
}

/// Alone, a commit with nobody behind it is written in one statement
/// without taking the order, and is stored as any other. The statement
/// writes only if the order is still where the commit's invalidations
/// were taken from: with the database's order moved back under the hold
/// (it lost the last commit, as a failover to a standby without it would),
/// or moved on (a commit of another front end despite the hold), the
/// commit is refused and changes nothing, and the front end stops
/// answering from memory.
#[test]
fn a_commit_alone_is_one_statement_and_is_refused_when_the_order_moved_under_it() {
    let (config, a, _thread) = alone_front_end("alone_commit", b"one");
    let sa = a.open_session();
    let mut c = config.connect(NoTls).unwrap();
    let tid = |c: &mut postgres::Client| number_of(c, "SELECT tid FROM durus_order WHERE id = 1");
    let before = tid(&mut c);
    commit_root(sa.as_ref(), b"two").unwrap();
    assert_eq!(a.alone_commits(), 1, "not written in one statement");
    assert_eq!(tid(&mut c), before + 1);
    assert_eq!(
        number_of(
            &mut c,
            &format!("SELECT count(*) FROM durus_log WHERE tid = {}", before + 1)
        ),
        1
    );
    let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
    assert_eq!(root_data(b.open_session().as_ref()), b"two");

    // The order moved back: the statement finds it short of the commit's
    // tid (its log entry's tid is free).
    c.batch_execute(&format!(
        "DELETE FROM durus_log WHERE tid = {}; UPDATE durus_order SET tid = {before} WHERE id = 1",
        before + 1
    ))
    .unwrap();
    wait_alone(&a, Duration::from_secs(5));
    let refused = commit_root(sa.as_ref(), b"three").unwrap_err();
    assert!(
        matches!(
            refused,
            crate::StorageError::Conflict(crate::Conflict::OrderMoved)
        ),
        "refused with: {refused}"
    );
    // No longer answered from memory: the log is read (by the sync, or by
    // the hold taken again), showing the loss, and the session closed.
    sa.sync();
    let lost = sa.load(&[Oid::ROOT], &mut |_| true).unwrap_err();
    assert!(lost.to_string().contains("reconnect"), "{lost}");
    assert_eq!(tid(&mut c), before);
    assert_eq!(
        number_of(&mut c, "SELECT max(tid) FROM durus_records"),
        before + 1,
        "the refused commit wrote"
    );
    assert_eq!(
        number_of(
            &mut c,
            &format!("SELECT count(*) FROM durus_log WHERE tid > {before}")
        ),
        0,
        "the refused commit logged"
    );
    drop(sa);
    a.close().unwrap();

    // The order moved on: another front end's commit is where this one's
    // would go.
    let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 64).unwrap());
    let sa = a.open_session();
    commit_root(sa.as_ref(), b"four").unwrap();
    let _thread = PgBackend::start_alone(&a, Duration::ZERO);
    wait_alone(&a, Duration::from_secs(10));
    let at = tid(&mut c);
    c.batch_execute(&format!(
        "INSERT INTO durus_log (tid, oids, refs) VALUES ({}, '\\x0000000000000000', ''); \
         UPDATE durus_order SET tid = {} WHERE id = 1",
        at + 1,
        at + 1
    ))
    .unwrap();
    let committed = a.alone_commits();
    let refused = commit_root(sa.as_ref(), b"five").unwrap_err();
    assert!(
        matches!(
            refused,
            crate::StorageError::Conflict(crate::Conflict::OrderMoved)
        ),
        "refused with: {refused}"
    );
    assert_eq!(a.alone_commits(), committed);
    // No longer answered from memory: the session is told of the commit
    // it was not told of.
    assert_eq!(sa.sync(), vec![Oid::ROOT]);
    assert_eq!(tid(&mut c), at + 1);
    assert_eq!(root_data(b.open_session().as_ref()), b"four");
    // The next commit takes the order, and is told of the change.
    let sb = a.open_session();
    commit_root(sb.as_ref(), b"six").unwrap();
    assert_eq!(root_data(b.open_session().as_ref()), b"six");
    a.close().unwrap();
    b.close().unwrap();
}

/// A front end alone gives way only once a commit that entered without
/// taking the order has ended, renewing its hold meanwhile: the commit,
/// whose client takes longer to send it than a takeover waits, is not
/// refused for the other front end, which waits and commits after it.
#[test]
fn a_front_end_alone_gives_way_after_the_commit_that_entered_alone() {
    let (config, a, _thread) = alone_front_end("alone_commit_gives_way", b"one");
    let b = PgBackend::open_with(config.clone().into(), 64).unwrap();
    let pause = super::alone::TAKEOVER + Duration::from_millis(1000);
    std::thread::scope(|scope| {
        let (entered, has_entered) = mpsc::channel();
        let on_a = &*a;
        let first = scope
            .spawn(move || enter_then_commit(on_a, b"a", entered, || std::thread::sleep(pause)));
        has_entered.recv().unwrap();
        let second = scope.spawn(|| commit_root(b.open_session().as_ref(), b"b"));
        first.join().unwrap().unwrap();
        second.join().unwrap().unwrap();
    });
    assert_eq!(a.alone_commits(), 1, "not written in one statement");
    assert_eq!(root_data(b.open_session().as_ref()), b"b");
    a.close().unwrap();
    b.close().unwrap();
}

/// A commit that entered alone and has another waiting behind it takes the
/// order when its client sends it, and opens a batch the other joins; if
/// the order moved on since it entered (another front end's commit behind
/// the hold), it is refused as a conflict, and the other commits.
#[test]
fn a_commit_alone_with_another_behind_it_takes_the_order_late_and_checks_it() {
    use std::sync::atomic::Ordering::{Acquire, Relaxed};
    let (config, a, _thread) = alone_front_end("alone_commit_late", b"one");
    a.max_hold_micros.store(60_000_000, Relaxed);
    let mut c = config.connect(NoTls).unwrap();
    // `behind`: move the order on once the first commit entered.
    let mut round = |first: &[u8], second: &[u8], behind: bool| {
        wait_alone(&a, Duration::from_secs(10));
        let batched = a.batched.load(Relaxed);
        std::thread::scope(|scope| {
            let (entered, has_entered) = mpsc::channel();
            let (go, wait_go) = mpsc::channel::<()>();
            let on_a = &*a;
            let first = scope
                .spawn(move || enter_then_commit(on_a, first, entered, || wait_go.recv().unwrap()));
            has_entered.recv().unwrap();
            if behind {
                let at = number_of(&mut c, "SELECT tid FROM durus_order WHERE id = 1");
                c.batch_execute(&format!(
                    "INSERT INTO durus_log (tid, oids, refs) \
                     VALUES ({}, '\\x0000000000000000', ''); \
                     UPDATE durus_order SET tid = {} WHERE id = 1",
                    at + 1,
                    at + 1
                ))
                .unwrap();
            }
            let second = scope.spawn(|| commit_root(a.open_session().as_ref(), second));
            while a.order_waiting.load(Acquire) == 0 {
                std::thread::sleep(Duration::from_millis(5));
            }
            go.send(()).unwrap();
            let first = first.join().unwrap();
            second.join().unwrap().unwrap();
            (first, a.batched.load(Relaxed) - batched)
        })
    };
    let (first, batched) = round(b"x", b"y", false);
    first.unwrap();
    assert_eq!(
        batched, 1,
        "the second commit did not join the first's batch"
    );
    assert_eq!(a.alone_commits(), 0);
    assert_eq!(root_data(a.open_session().as_ref()), b"y");

    let (first, batched) = round(b"p", b"q", true);
    assert!(
        matches!(
            first,
            Err(crate::StorageError::Conflict(crate::Conflict::OrderMoved))
        ),
        "{first:?}"
    );
    assert_eq!(batched, 0);
    assert_eq!(root_data(a.open_session().as_ref()), b"q");
    a.close().unwrap();
}

/// A database whose default is `synchronous_commit = off` does not make a
/// front end's commits undurable: the order's connection sets it `on`.
#[test]
fn commits_are_flushed_where_the_database_default_is_not_to() {
    let config = testdb::fresh("sync_commit_off");
    let name = config.get_dbname().unwrap().to_string();
    let mut c = config.connect(NoTls).unwrap();
    c.batch_execute(&format!(
        "ALTER DATABASE {name} SET synchronous_commit = off"
    ))
    .unwrap();
    let a = PgBackend::open_with(config.clone().into(), 64).unwrap();
    commit_root(a.open_session().as_ref(), b"one").unwrap();
    let mut order = a.order.lock();
    let conn = order.conn.as_mut().expect("connected by the commit");
    let shown = conn
        .client
        .query_one("SHOW synchronous_commit", &[])
        .unwrap();
    assert_eq!(shown.get::<_, String>(0), "on");
    drop(order);
    a.close().unwrap();
}

/// A batch whose `COMMIT` fails is answered as of unknown outcome, and the
/// front end then answers as the database says, whichever way it went: the
/// order's connection lost before the commit was applied (nothing stored),
/// or just after (both commits stored, their answers lost). Either way both
/// commits of the batch are answered with an error; what the batch wrote is
/// not answered `Invalid` for ever; nothing is served from memory that the
/// database may have changed; a session is told of the commits applied;
/// and the next commit goes through, after them.
#[test]
fn a_batch_whose_commit_fails_leaves_the_front_end_answering_as_the_database_says() {
    let data_of = |session: &dyn Session, oid: Oid| -> Option<Vec<u8>> {
        let mut got = None;
        session
            .load(&[oid], &mut |f| {
                if let crate::backend::Found::Record(bytes) = f {
                    got = Some(Record::from_bytes(bytes.to_vec()).unwrap().data().to_vec());
                }
                true
            })
            .unwrap();
        got
    };
    for applied in [false, true] {
        let name = if applied {
            "commit_answer_lost"
        } else {
            "commit_failed"
        };
        let (config, fe, _thread) = alone_front_end(name, b"r0");
        let setup = fe.open_session();
        let x = setup.new_oids(1, 16).unwrap()[0];
        commit_refs(setup.as_ref(), &[(Oid::ROOT, vec![x]), (x, vec![])]).unwrap();
        let tid = |c: &mut postgres::Client| -> i64 {
            c.query_one("SELECT tid FROM durus_order WHERE id = 1", &[])
                .unwrap()
                .get(0)
        };
        let mut c = config.connect(NoTls).unwrap();
        let before = tid(&mut c);
        // Kept in memory (written through), and read so.
        let observer = fe.open_session();
        observer.sync();
        assert_eq!(data_of(observer.as_ref(), x).as_deref(), Some(&b"x"[..]));
        *fe.before_commit.lock() = Some(Box::new(move |conn: &mut super::Conn| {
            let commit = if applied { "COMMIT; " } else { "" };
            let _ = conn.batch(&format!(
                "{commit}SELECT pg_terminate_backend(pg_backend_pid())"
            ));
        }));
        let b = fe.open_session();
        let (first, second) = batch_of_two(
            &fe,
            one(x, b"x1", &[]),
            (b.as_ref(), one(Oid::ROOT, b"r1", &[x])),
        );
        assert!(
            fe.before_commit.lock().is_none(),
            "the batch reached its COMMIT"
        );
        assert!(
            first.is_err() && second.is_err(),
            "{applied}: {first:?} {second:?}"
        );
        let after = tid(&mut c);
        if applied {
            assert_eq!(after, before + 2);
            // Not the record kept in memory from before the batch.
            assert_ne!(data_of(observer.as_ref(), x).as_deref(), Some(&b"x"[..]));
            let mut told = observer.sync();
            told.sort();
            assert_eq!(told, vec![Oid::ROOT, x], "told of what was applied");
            assert_eq!(data_of(observer.as_ref(), x).as_deref(), Some(&b"x1"[..]));
        } else {
            assert_eq!(after, before);
            observer.sync();
            assert_eq!(
                data_of(observer.as_ref(), x).as_deref(),
                Some(&b"x"[..]),
                "what the batch did not write is served"
            );
        }
        commit_root(fe.open_session().as_ref(), b"r2").unwrap();
        assert_eq!(tid(&mut c), after + 1);
        assert_eq!(root_data(fe.open_session().as_ref()), b"r2");
        fe.close().unwrap();
    }
}

/// A front end alone keeps the records it commits in its record cache
/// (written through), each as the database has it: a session told of a
/// commit loads its records from memory. Through every way a commit is
/// written: alone in one statement, in a batch (a record both of its
/// commits wrote kept as the later wrote it), and at once after taking the
/// order (a record that shrank).
#[test]
fn a_front_end_alone_keeps_what_it_commits_in_memory() {
    let (config, fe, _thread) = alone_front_end("write_through", b"r0");
    let mut db = config.connect(NoTls).unwrap();
    let reader = fe.open_session();
    // `reader`'s load of `oid` after a sync: whether it was answered from
    // memory, and the record's data; the bytes are the database's, and so
    // is the tid kept with them.
    let mut load = |oid: Oid| -> (bool, Vec<u8>) {
        reader.sync();
        let before = fe.loads_from_memory();
        let mut got = None;
        reader
            .load(&[oid], &mut |f| {
                if let crate::backend::Found::Record(b) = f {
                    got = Some(b.to_vec());
                }
                true
            })
            .unwrap();
        let bytes = got.expect("a record");
        let rows = db
            .query(
                "SELECT data, tid FROM durus_records WHERE oid = $1 ORDER BY chunk",
                &[&(oid.0 as i64)],
            )
            .unwrap();
        let stored: Vec<u8> = rows.iter().flat_map(|r| r.get::<_, Vec<u8>>(0)).collect();
        assert!(bytes == stored, "the record answered is the database's");
        if let Some((tid, _)) = fe.state.lock().cache.get(oid) {
            assert_eq!(tid as i64, rows[0].get::<_, i64>(1), "the tid kept");
        }
        let data = Record::from_bytes(bytes).unwrap().data().to_vec();
        (fe.loads_from_memory() > before, data)
    };
    let commit_by = |s: &dyn Session, records: BTreeMap<Oid, Record>| {
        let Entry::Now(order) = s.enter_order(&mut || unreachable!("blocks")) else {
            panic!("blocks until the order is had");
        };
        s.sync();
        order.commit(records, false).0.unwrap();
    };
    let commit = |records| commit_by(fe.open_session().as_ref(), records);
    let alone_before = fe.alone_commits();
    commit(one(Oid::ROOT, b"r1", &[]));
    assert_eq!(load(Oid::ROOT), (true, b"r1".to_vec()));
    let maker = fe.open_session();
    let x = maker.new_oids(1, 16).unwrap()[0];
    let y = maker.new_oids(1, 16).unwrap()[0];
    let mut records = one(Oid::ROOT, b"r2", &[x, y]);
    records.insert(x, Record::new(x, b"x0", &[]));
    records.insert(y, Record::new(y, b"y0", &[]));
    commit_by(maker.as_ref(), records);
    assert_eq!(fe.alone_commits(), alone_before + 2, "both written alone");
    assert_eq!(load(x), (true, b"x0".to_vec()));

    // The first commit of the batch writes x and y, the second x again.
    let sb = fe.open_session();
    let mut first = one(x, b"x1", &[]);
    first.insert(y, Record::new(y, b"y1", &[]));
    let (r1, r2) = batch_of_two(&fe, first, (sb.as_ref(), one(x, b"x2", &[])));
    r1.unwrap();
    r2.unwrap();
    assert_eq!(load(y), (true, b"y1".to_vec()), "the batch's first commit");
    assert_eq!(load(x), (true, b"x2".to_vec()), "the batch's later record");

    let big = vec![7u8; super::CHUNK * 2 + 10];
    commit(one(x, &big, &[]));
    assert_eq!(load(x), (true, big));
    let alone_before = fe.alone_commits();
    commit(one(x, b"small", &[]));
    assert_eq!(
        fe.alone_commits(),
        alone_before,
        "shrunk: written after taking the order"
    );
    assert_eq!(load(x), (true, b"small".to_vec()));
    fe.close().unwrap();
}
