//! The seam's contract, checked by running the same random operations on
//! the redb store and on the in-memory model behind it: every answer must
//! be the same (oids handed out, invalidations, loads, commit results,
//! what a pack removes). A new backend (PostgreSQL) joins this test.

use std::collections::BTreeMap;

use proptest::prelude::*;

use super::memory::MemoryBackend;
use super::{Backend, Entry, Found, Session, Snapshot};
use crate::record::{Oid, Record};
use crate::store::backend::RedbBackend;
use crate::{ManualGc, Options, RedbStorage};

const SESSIONS: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    /// Session `s` asks for `n` new oids.
    NewOids(usize, usize),
    /// Session `s` commits records of the picked oids, each referencing
    /// picked oids (a pick past the known oids names one never handed out);
    /// with `true`, it takes the snapshot of the state after it (snapshot
    /// reads).
    Commit(usize, Vec<(usize, Vec<usize>)>, bool),
    /// A sync in snapshot mode: the invalidations, and the session's
    /// snapshot from then on.
    SnapshotSync(usize),
    /// Loads from the session's snapshot (with the invalid flags the
    /// server answers absent oids by).
    SnapshotLoad(usize, Vec<usize>),
    Sync(usize),
    Load(usize, Vec<usize>),
    Pack,
}

fn op() -> impl Strategy<Value = Op> {
    let pick = 0..12usize;
    prop_oneof![
        2 => (0..SESSIONS, 1..4usize).prop_map(|(s, n)| Op::NewOids(s, n)),
        5 => (
            0..SESSIONS,
            proptest::collection::vec(
                (pick.clone(), proptest::collection::vec(pick.clone(), 0..3)),
                1..4
            ),
            any::<bool>()
        )
            .prop_map(|(s, w, snap)| Op::Commit(s, w, snap)),
        1 => (0..SESSIONS).prop_map(Op::SnapshotSync),
        2 => (0..SESSIONS, proptest::collection::vec(0..12usize, 1..5))
            .prop_map(|(s, p)| Op::SnapshotLoad(s, p)),
        2 => (0..SESSIONS).prop_map(Op::Sync),
        3 => (0..SESSIONS, proptest::collection::vec(pick, 1..5))
            .prop_map(|(s, p)| Op::Load(s, p)),
        2 => Just(Op::Pack),
    ]
}

/// What a call answered, in a form both stores can be compared by.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Oids(Vec<Oid>),
    Loads(Vec<Option<Option<Vec<u8>>>>),
    /// The invalidations sent with `C`, then the commit's outcome.
    Committed(Vec<Oid>, Outcome),
    Packed(u64, u64),
    Failed(String),
}

#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Ok,
    Conflict,
    Refused(String),
}

/// The oid a pick names: one handed out so far, or one never handed out.
fn oid_of(known: &[Oid], pick: usize) -> Oid {
    known.get(pick).copied().unwrap_or(Oid(900 + pick as u64))
}

/// The oids handed out so far: all of them, and each session's; and the
/// oids committed (some may have been packed away since).
#[derive(Default)]
struct Known {
    all: Vec<Oid>,
    mine: [Vec<Oid>; SESSIONS],
    stored: Vec<Oid>,
}

impl Known {
    /// The oid a commit of session `s` writes for `pick`: mostly one the
    /// session was handed (or the root, before it was handed any), so that
    /// commits mostly succeed and the stores fill; else any pick (another
    /// session's, or one never handed out).
    fn write(&self, s: usize, pick: usize) -> Oid {
        let mine = &self.mine[s];
        match (pick < 10, mine.is_empty()) {
            (true, false) => mine[pick % mine.len()],
            (true, true) => Oid::ROOT,
            (false, _) => oid_of(&self.all, pick),
        }
    }

    /// The oid a reference names for `pick`: mostly one committed, else
    /// any pick (perhaps never stored: a dangling reference).
    fn reference(&self, pick: usize) -> Oid {
        if pick < 10 && !self.stored.is_empty() {
            self.stored[pick % self.stored.len()]
        } else {
            oid_of(&self.all, pick)
        }
    }

    /// Session `s` was closed: what it was handed and did not store is
    /// nobody's now.
    #[cfg(feature = "postgres")]
    fn forget(&mut self, s: usize) {
        self.mine[s].clear();
    }

    /// Takes in what `op` answered.
    fn learn(&mut self, op: &Op, answer: &Answer) {
        match (op, answer) {
            (Op::NewOids(s, _), Answer::Oids(oids)) => {
                self.all.extend(oids);
                self.mine[*s].extend(oids);
            }
            (Op::Commit(s, writes, _), Answer::Committed(_, Outcome::Ok)) => {
                for (pick, _) in writes {
                    let oid = self.write(*s, *pick);
                    if !self.stored.contains(&oid) {
                        self.stored.push(oid);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Each session's snapshot, if it took one.
type Snapshots = Vec<Option<Box<dyn Snapshot>>>;

/// The sessions of `boxes`, borrowed.
fn refs<'a>(boxes: &'a [Box<dyn Session + 'a>]) -> Vec<&'a dyn Session> {
    boxes.iter().map(|b| &**b).collect()
}

fn apply(
    sessions: &[&dyn Session],
    snapshots: &mut Snapshots,
    backend: &dyn Backend,
    known: &Known,
    op: &Op,
    n: u64,
) -> Answer {
    match op {
        Op::SnapshotSync(s) => match sessions[*s].sync_to_snapshot() {
            Ok((oids, snapshot)) => {
                snapshots[*s] = Some(snapshot);
                Answer::Oids(oids)
            }
            Err(e) => Answer::Failed(e.to_string()),
        },
        Op::SnapshotLoad(s, picks) => {
            let Some(snapshot) = &snapshots[*s] else {
                return Answer::Failed("no snapshot".into());
            };
            let oids: Vec<Oid> = picks.iter().map(|p| oid_of(&known.all, *p)).collect();
            let mut flags = sessions[*s].invalid_flags(&oids).into_iter();
            let mut out = Vec::new();
            let r = snapshot.load_each(&oids, &mut |_, bytes| {
                let changed = flags.next().unwrap_or(false);
                out.push(match bytes {
                    Some(b) => Some(Some(b.to_vec())),
                    None if changed => None,
                    None => Some(None),
                });
                true
            });
            match r {
                Ok(()) => Answer::Loads(out),
                Err(e) => Answer::Failed(e.to_string()),
            }
        }
        Op::NewOids(s, k) => match sessions[*s].new_oids(*k, 1 << 20) {
            Ok(oids) => Answer::Oids(oids),
            Err(e) => Answer::Failed(e.to_string()),
        },
        Op::Sync(s) => Answer::Oids(sessions[*s].sync()),
        Op::Load(s, picks) => {
            let oids: Vec<Oid> = picks.iter().map(|p| oid_of(&known.all, *p)).collect();
            let mut out = Vec::new();
            let r = sessions[*s].load(&oids, &mut |found| {
                out.push(match found {
                    Found::Invalid => None,
                    Found::Record(b) => Some(Some(b.to_vec())),
                    Found::Missing => Some(None),
                });
                true
            });
            match r {
                Ok(()) => Answer::Loads(out),
                Err(e) => Answer::Failed(e.to_string()),
            }
        }
        Op::Commit(s, writes, snap) => {
            let session = &sessions[*s];
            let Entry::Now(order) = session.enter_order(&mut || unreachable!("no other committer"))
            else {
                panic!("the order is free: one thread");
            };
            let invalid = session.sync();
            let mut records = BTreeMap::new();
            for (pick, refs) in writes {
                let oid = known.write(*s, *pick);
                let refs: Vec<Oid> = refs.iter().map(|p| known.reference(*p)).collect();
                records.insert(oid, Record::new(oid, &n.to_be_bytes(), &refs));
            }
            let (r, snapshot) = order.commit(records, *snap);
            match snapshot {
                Some(Ok(taken)) => snapshots[*s] = Some(taken),
                Some(Err(e)) => return Answer::Failed(e.to_string()),
                None if *snap => snapshots[*s] = None,
                None => {}
            }
            let outcome = match r {
                Ok(()) => Outcome::Ok,
                Err(e) if e.is_conflict() => Outcome::Conflict,
                Err(e) => Outcome::Refused(e.to_string()),
            };
            Answer::Committed(invalid, outcome)
        }
        Op::Pack => match backend.full_collection(&mut || false) {
            Ok(r) => Answer::Packed(r.removed_objects, r.live_objects),
            Err(e) => Answer::Failed(e.to_string()),
        },
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]
    #[test]
    fn the_redb_store_and_the_memory_model_answer_alike_through_the_seam(
        ops in proptest::collection::vec(op(), 1..60)
    ) {
        let dir = tempfile::tempdir().unwrap();
        // No background collector and no grace window: a pack removes at
        // once, as the model's.
        let store =
            RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
        let redb = RedbBackend::new(&store);
        drop(store);
        let memory = MemoryBackend::new();
        let on_redb: Vec<_> = (0..SESSIONS).map(|_| redb.open_session()).collect();
        let on_memory: Vec<_> = (0..SESSIONS).map(|_| memory.open_session()).collect();
        let mut redb_snaps: Snapshots = (0..SESSIONS).map(|_| None).collect();
        let mut memory_snaps: Snapshots = (0..SESSIONS).map(|_| None).collect();
        let mut known = Known::default();
        for (n, op) in ops.iter().enumerate() {
            let a = apply(&refs(&on_redb), &mut redb_snaps, &redb, &known, op, n as u64);
            let b = apply(&refs(&on_memory), &mut memory_snaps, &memory, &known, op, n as u64);
            prop_assert_eq!(&a, &b, "step {}: {:?}", n, op);
            known.learn(op, &a);
        }
        drop((redb_snaps, memory_snaps, on_redb, on_memory));
        redb.close().unwrap();
    }
}

/// The plain case the random runs must also meet: a root and one object
/// it does not reference; a pack removes that one, on both stores alike,
/// and tells every session.
#[test]
fn a_pack_removes_what_the_root_does_not_reach_on_both_stores() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
    let redb = RedbBackend::new(&store);
    drop(store);
    let memory = MemoryBackend::new();
    let script = [
        Op::NewOids(0, 2),
        Op::Commit(0, vec![(0, vec![]), (1, vec![])], false),
        Op::Sync(1),
        Op::Pack,
        Op::Sync(1),
        Op::Load(1, vec![0, 1]),
    ];
    for backend in [&redb as &dyn Backend, &memory] {
        let sessions: Vec<_> = (0..SESSIONS).map(|_| backend.open_session()).collect();
        let mut snapshots: Snapshots = (0..SESSIONS).map(|_| None).collect();
        let mut known = Known::default();
        let answers: Vec<Answer> = script
            .iter()
            .enumerate()
            .map(|(n, op)| {
                let a = apply(
                    &refs(&sessions),
                    &mut snapshots,
                    backend,
                    &known,
                    op,
                    n as u64,
                );
                known.learn(op, &a);
                a
            })
            .collect();
        assert_eq!(answers[1], Answer::Committed(vec![], Outcome::Ok));
        assert_eq!(answers[2], Answer::Oids(vec![Oid(0), Oid(1)]));
        assert_eq!(answers[3], Answer::Packed(1, 1));
        assert_eq!(answers[4], Answer::Oids(vec![Oid(1)]));
        assert_eq!(
            answers[5],
            Answer::Loads(vec![
                Some(Some(
                    Record::new(Oid(0), &1u64.to_be_bytes(), &[]).into_bytes()
                )),
                Some(None)
            ])
        );
    }
    redb.close().unwrap();
}

/// The same random operations on PostgreSQL: sessions 0 and 1 on one
/// front end, session 2 on another over the same database, against the
/// model with all three sessions on one store. A client of either front
/// end must see what it would with one server, snapshot reads included.
#[cfg(feature = "postgres")]
mod on_postgres {
    use super::*;
    use crate::backend::postgres::{PgBackend, testdb};

    /// Storing an oid that another session was handed: one server refuses
    /// it as invalid input (it knows who holds what); a front end does not
    /// know what another front end handed out and refuses it as an oid
    /// never handed out (a conflict). Either way nothing is written; the
    /// comparison takes the two as one.
    fn across_front_ends(a: Answer) -> Answer {
        match a {
            Answer::Committed(inv, Outcome::Refused(m)) if m.contains("another session") => {
                Answer::Committed(inv, Outcome::Conflict)
            }
            a => a,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(160))]
        /// At the steps of `replaced`, the second front end goes away (its
        /// connections closed, no goodbye, as when its process is killed)
        /// and a new one takes its place; its session, and that session's
        /// snapshot and unstored oids, go with it, as when a client's
        /// server dies and the client connects again. The model closes
        /// that session and opens a new one.
        #[test]
        fn two_postgres_front_ends_and_the_memory_model_answer_alike(
            ops in proptest::collection::vec(op(), 1..50),
            replaced in proptest::collection::btree_set(1..50usize, 0..=2),
        ) {
            two_front_ends_against_the_model(&ops, &replaced, false)?;
        }
    }

    /// The same, without snapshot reads, each front end taking the database
    /// alone whenever the other has not committed since its last look
    /// (`--alone-after 0`): they hand the hold to each other as the steps
    /// go, and answer loads and syncs from memory, and write commits in one
    /// statement, while they hold it. (A front end replaced gives the hold
    /// up as it goes.) Fails too if no commit at all was written alone.
    #[test]
    fn two_postgres_front_ends_alone_by_turns_and_the_memory_model_answer_alike() {
        // As `proptest!` does: failing cases are kept beside this file.
        let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
            source_file: Some(file!()),
            ..ProptestConfig::with_cases(64)
        });
        let cases = (
            proptest::collection::vec(op(), 1..50),
            proptest::collection::btree_set(1..50usize, 0..=2),
        );
        if let Err(e) = runner.run(&cases, |(ops, replaced)| {
            two_front_ends_against_the_model(&ops, &replaced, true)
        }) {
            panic!("{e}");
        }
        assert!(
            ALONE_COMMITS.load(std::sync::atomic::Ordering::Relaxed) > 0,
            "no commit was written alone in any case"
        );
    }

    /// Commits written alone (without taking the order) in the cases of
    /// the test above.
    static ALONE_COMMITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

    /// Two front ends against the model (see the tests above); `alone`:
    /// no snapshot reads, each front end may hold the database alone.
    fn two_front_ends_against_the_model(
        ops: &[Op],
        replaced: &std::collections::BTreeSet<usize>,
        alone: bool,
    ) -> Result<(), TestCaseError> {
        // The threads of the last case's front ends (ended with them, also
        // when that case failed) are joined before the tables are made
        // again: front end ids start at 1 in each case.
        static THREADS: std::sync::Mutex<Vec<std::thread::JoinHandle<()>>> =
            std::sync::Mutex::new(Vec::new());
        let join_all = || {
            let threads: Vec<_> = THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .drain(..)
                .collect();
            for thread in threads {
                let _ = thread.join();
            }
        };
        join_all();
        let config = database(alone);
        testdb::drop_tables(&config);
        // One oid at a time from the database, so that the two front
        // ends hand out the model's sequence between them.
        let a = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 1).unwrap());
        a.serve_snapshot_reads(!alone);
        let started = |thread: Option<std::thread::JoinHandle<()>>| {
            THREADS
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .extend(thread);
        };
        if alone {
            a.alone_quickly();
            started(PgBackend::start_alone(&a, std::time::Duration::ZERO));
        }
        let memory = MemoryBackend::new();
        let on_a: Vec<Box<dyn Session + '_>> = vec![a.open_session(), a.open_session()];
        let mut on_memory: Vec<_> = (0..SESSIONS).map(|_| memory.open_session()).collect();
        let mut pg_snaps: Snapshots = (0..SESSIONS).map(|_| None).collect();
        let mut memory_snaps: Snapshots = (0..SESSIONS).map(|_| None).collect();
        let mut known = Known::default();
        // Who was handed the root while none is stored.
        let mut root_holder: Option<usize> = None;
        let mut root_stored = false;
        let mut n = 0;
        let mut last_replaced = None;
        while n < ops.len() {
            // The second front end, until the next replacement.
            let b = std::sync::Arc::new(PgBackend::open_with(config.clone().into(), 1).unwrap());
            b.serve_snapshot_reads(!alone);
            if alone {
                b.alone_quickly();
                started(PgBackend::start_alone(&b, std::time::Duration::ZERO));
            }
            let on_b = b.open_session();
            while n < ops.len() {
                if replaced.contains(&n) && last_replaced != Some(n) {
                    break;
                }
                let on_pg: Vec<&dyn Session> = vec![&*on_a[0], &*on_a[1], &*on_b];
                // The one thing a front end cannot know of another:
                // that it handed out the root (oid 0) to a session that
                // has not stored it yet. One server refuses the root
                // stored by another session then; a front end takes
                // it. Such a commit is left out (a sync instead).
                let front_end = |s: usize| s >= 2;
                let op = &match &ops[n] {
                    Op::Commit(s, writes, _)
                        if !root_stored
                            && root_holder.is_some_and(|h| front_end(h) != front_end(*s))
                            && writes.iter().any(|(p, _)| known.write(*s, *p) == Oid::ROOT) =>
                    {
                        Op::Sync(*s)
                    }
                    op => op.clone(),
                };
                // A pack through either front end.
                let packer: &dyn Backend = if n % 2 == 0 { &*a } else { &*b };
                // The step through the front ends, and through the model.
                let on_front_ends =
                    |snaps: &mut Snapshots| apply(&on_pg, snaps, packer, &known, op, n as u64);
                let on_model = |snaps: &mut Snapshots| {
                    apply(&refs(&on_memory), snaps, &memory, &known, op, n as u64)
                };
                let x = across_front_ends(on_front_ends(&mut pg_snaps));
                let y = on_model(&mut memory_snaps);
                // Refused as invalid input, the commit leaves the
                // session without a snapshot; as a conflict, with the
                // state before it: taken as one (see
                // `across_front_ends`), they leave the same.
                if let (Op::Commit(s, _, true), Answer::Committed(_, Outcome::Refused(m))) =
                    (op, &y)
                    && m.contains("another session")
                {
                    pg_snaps[*s] = None;
                }
                let y = across_front_ends(y);
                prop_assert_eq!(
                    &x,
                    &y,
                    "step {}: {:?} (second front end replaced at {:?})",
                    n,
                    op,
                    replaced
                );
                // Loaded again at once: from memory, if the front end holds
                // the database alone.
                if alone && matches!(op, Op::Load(..)) {
                    let x = on_front_ends(&mut pg_snaps);
                    let y = on_model(&mut memory_snaps);
                    prop_assert_eq!(&x, &y, "step {} again: {:?}", n, op);
                }
                match (op, &x) {
                    (Op::NewOids(s, _), Answer::Oids(oids)) if oids.contains(&Oid::ROOT) => {
                        root_holder = Some(*s);
                    }
                    (Op::Commit(s, writes, _), Answer::Committed(_, Outcome::Ok)) => {
                        root_stored |= writes.iter().any(|(p, _)| known.write(*s, *p) == Oid::ROOT);
                    }
                    _ => {}
                }
                known.learn(op, &x);
                n += 1;
            }
            ALONE_COMMITS.fetch_add(b.alone_commits(), std::sync::atomic::Ordering::Relaxed);
            if n >= ops.len() {
                break;
            }
            // Replaced: the second front end and its session go; the
            // model's session 2 is closed and opened anew.
            drop(on_b);
            drop(b);
            pg_snaps[2] = None;
            memory_snaps[2] = None;
            on_memory[2] = memory.open_session();
            known.forget(2);
            if root_holder == Some(2) {
                root_holder = None;
            }
            // The step at the replacement is taken by the new one.
            last_replaced = Some(n);
        }
        ALONE_COMMITS.fetch_add(a.alone_commits(), std::sync::atomic::Ordering::Relaxed);
        drop(on_a);
        drop(a);
        join_all();
        Ok(())
    }

    /// The test's database (one for each of the two tests), made once per
    /// test process.
    fn database(alone: bool) -> postgres::Config {
        static DB: std::sync::OnceLock<postgres::Config> = std::sync::OnceLock::new();
        static ALONE: std::sync::OnceLock<postgres::Config> = std::sync::OnceLock::new();
        if alone {
            ALONE
                .get_or_init(|| testdb::fresh("contract_alone"))
                .clone()
        } else {
            DB.get_or_init(|| testdb::fresh("contract")).clone()
        }
    }
}
