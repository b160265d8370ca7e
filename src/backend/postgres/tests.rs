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
        text.contains("format 99") && text.contains("format 1"),
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
    let rows: i64 = c
        .query_one("SELECT count(*) FROM durus_records WHERE oid = 0", &[])
        .unwrap()
        .get(0);
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
    let tid: i64 = c
        .query_one("SELECT tid FROM durus_order WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(tid, 3);
    // The session that saw the lost commits is refused, loads and commits.
    let err = old
        .load(&[Oid::ROOT], &mut |_| true)
        .expect_err("a session that saw lost commits must not load");
    assert!(err.to_string().contains("reconnect"), "{err}");
    let err = commit_root(old.as_ref(), b"stale").expect_err("nor commit");
    assert!(err.to_string().contains("reconnect"), "{err}");
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
    let tid: i64 = c
        .query_one("SELECT tid FROM durus_order WHERE id = 1", &[])
        .unwrap()
        .get(0);
    assert_eq!(
        tid as u64,
        1 + THREADS as u64 * COMMITS,
        "one tid per commit"
    );
    let logged: i64 = c
        .query_one("SELECT count(*) FROM durus_log", &[])
        .unwrap()
        .get(0);
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
    let entries = |c: &mut postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM durus_log", &[])
            .unwrap()
            .get(0)
    };
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
