//! The sessions' unit tests: the change log against a model, snapshots.

use super::alloc::RESERVE_EVERY;
use super::*;
use crate::engine::layout::OID_BLOCK;
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    Register,
    Unregister(usize),
    Publish(Option<usize>, Vec<u8>),
    Drain(usize),
    Flags(usize, Vec<u8>),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Register),
        1 => (0..8usize).prop_map(Op::Unregister),
        6 => (proptest::option::of(0..8usize), proptest::collection::vec(0..40u8, 1..6))
            .prop_map(|(by, oids)| Op::Publish(by, oids)),
        3 => (0..8usize).prop_map(Op::Drain),
        3 => (0..8usize, proptest::collection::vec(0..40u8, 1..6))
            .prop_map(|(s, oids)| Op::Flags(s, oids)),
    ]
}

/// A small log, so that trimming and overflow happen often.
fn small_log() -> ChangeLog {
    let mut log = ChangeLog::new();
    log.cap = 24;
    log.floor = 4;
    log.trim_at = 4;
    log
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    /// The shared log hands every session what a Durus server's own
    /// invalid set per session would, and holds a bounded number of
    /// oids however far a session lags.
    #[test]
    fn shared_log_matches_a_set_per_session(ops in proptest::collection::vec(op(), 1..120)) {
        let sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }> = Mutex::new(HashMap::new());
        let mut log = small_log();
        // The model: each live session's own set, and who changed each
        // oid last.
        let mut model: Vec<(SessionId, HashSet<Oid>)> = Vec::new();
        let mut last_by: HashMap<Oid, Option<SessionId>> = HashMap::new();
        let mut next = 1;
        for op in ops {
            match op {
                Op::Register => {
                    let st = Arc::new(Mutex::new(SessionState { seen: log.last, ..SessionState::default() }));
                    sessions.lock().insert(next, st);
                    model.push((next, HashSet::new()));
                    next += 1;
                }
                Op::Unregister(i) if !model.is_empty() => {
                    let (id, _) = model.remove(i % model.len());
                    sessions.lock().remove(&id);
                }
                Op::Publish(by, oids) => {
                    let by = by.and_then(|i| model.get(i % model.len().max(1)).map(|(id, _)| *id));
                    let oids: Vec<Oid> = oids.into_iter().map(|o| Oid(o as u64)).collect();
                    for (id, set) in model.iter_mut() {
                        if Some(*id) != by {
                            set.extend(oids.iter().copied());
                        }
                    }
                    for o in &oids {
                        last_by.insert(*o, by);
                    }
                    log.publish(by, &oids, &sessions);
                    prop_assert!(log.held <= log.cap + oids.len(), "the log holds {} oids", log.held);
                }
                Op::Drain(i) if !model.is_empty() => {
                    let n = model.len();
                    let (id, set) = &mut model[i % n];
                    let st = sessions.lock()[id].clone();
                    let got = log.drain(*id, &mut st.lock(), None);
                    let mut want: Vec<Oid> = set.drain().collect();
                    want.sort_unstable();
                    prop_assert_eq!(got, want);
                }
                Op::Flags(i, oids) if !model.is_empty() => {
                    let (id, set) = &model[i % model.len()];
                    let oids: Vec<Oid> = oids.into_iter().map(|o| Oid(o as u64)).collect();
                    let st = sessions.lock()[id].clone();
                    let got = log.flags(*id, &st.lock(), &oids);
                    for (oid, flag) in oids.iter().zip(got) {
                        // An oid this session changed last is valid to
                        // it (its own version is the latest); a set per
                        // session still holds the older change.
                        if last_by.get(oid) == Some(&Some(*id)) && !st.lock().overflow.contains(oid) {
                            continue;
                        }
                        prop_assert_eq!(flag, set.contains(oid), "oid {}", oid);
                    }
                }
                _ => {}
            }
        }
    }
}

/// A session that lags past the cap keeps, in its own set, only oids
/// that existed when it last synced: a million oids made (and
/// collected) since cost it nothing, and the shared log stays within
/// its cap.
#[test]
fn a_lagging_session_pins_only_oids_it_could_hold() {
    let sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }> =
        Mutex::new(HashMap::new());
    let mut log = small_log();
    let idle: SessionRef = Arc::new(Mutex::new(SessionState {
        oid_mark: 200,
        ..SessionState::default()
    }));
    sessions.lock().insert(1, idle.clone());
    for batch in 0..100_000u64 {
        // Ten new oids a commit, and one of the old ones now and then.
        let mut oids: Vec<Oid> = (0..10).map(|i| Oid(1000 + batch * 10 + i)).collect();
        if batch % 1000 == 0 {
            oids.push(Oid(batch / 1000));
        }
        log.publish(Some(2), &oids, &sessions);
        assert!(log.held <= log.cap + oids.len());
    }
    let st = idle.lock();
    assert_eq!(
        st.overflow.len(),
        100,
        "only the old oids: {:?}",
        st.overflow.len()
    );
    // A new oid the log has forgotten is still invalid to it; an old
    // one it was never told of is not.
    assert_eq!(
        log.flags(1, &st, &[Oid(1000), Oid(150), Oid(5)]),
        vec![true, false, true]
    );
    drop(st);
    let got = log.drain(1, &mut idle.lock(), None);
    // Every old oid is handed out; new ones only if still in the log.
    assert!((0..100).all(|o| got.contains(&Oid(o))));
    assert!(got.len() <= 100 + log.cap + 10);
    // Synced: no longer overflowed; what remains invalid is only what
    // the log still holds after its last drain (nothing).
    assert_eq!(
        log.flags(1, &idle.lock(), &[Oid(1000), Oid(5)]),
        vec![false, false]
    );
}

/// What a session made or loaded after its last sync it holds a copy of:
/// when another session changes it and the log drops that change before
/// the session read it, the session is still told at its next sync. Once
/// the log dropped entries the session had not read, a load of an oid
/// made since is invalid, and what it commits is told back to it.
#[test]
fn a_lagging_session_is_told_of_changes_to_what_it_made_or_loaded_since_its_sync() {
    let sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }> =
        Mutex::new(HashMap::new());
    let mut log = small_log();
    let a: SessionRef = Arc::new(Mutex::new(SessionState {
        oid_mark: 200,
        ..SessionState::default()
    }));
    sessions.lock().insert(1, a.clone());
    sessions
        .lock()
        .insert(2, Arc::new(Mutex::new(SessionState::default())));
    // a commits 500 (made after its sync) and loads 600 (made by another).
    log.publish(Some(1), &[Oid(500)], &sessions);
    assert_eq!(log.flags_holding(1, &mut a.lock(), &[Oid(600)]), [false]);
    // The other session changes both, then commits enough new oids that
    // the log drops those changes before a read them.
    log.publish(Some(2), &[Oid(500), Oid(600)], &sessions);
    for batch in 0..100u64 {
        let oids: Vec<Oid> = (0..10).map(|i| Oid(1000 + batch * 10 + i)).collect();
        log.publish(Some(2), &oids, &sessions);
    }
    assert!(a.lock().overflowed);
    // Now a load of an oid made since a's sync is invalid, and what a
    // commits is told back to it.
    assert_eq!(log.flags_holding(1, &mut a.lock(), &[Oid(900)]), [true]);
    log.publish(Some(1), &[Oid(700)], &sessions);
    let got = log.drain(1, &mut a.lock(), None);
    for oid in [500, 600, 700] {
        assert!(got.contains(&Oid(oid)), "{oid} not told: {got:?}");
    }
}

/// A change nobody else needs to hear of is not kept: a lone session's
/// commits (an embedded store) cost the log nothing.
#[test]
fn a_lone_session_publishes_nothing() {
    let sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }> =
        Mutex::new(HashMap::new());
    let mut log = ChangeLog::new();
    log.publish(None, &[Oid(1)], &sessions);
    sessions
        .lock()
        .insert(1, Arc::new(Mutex::new(SessionState::default())));
    log.publish(Some(1), &[Oid(2), Oid(3)], &sessions);
    assert_eq!((log.held, log.last), (0, 0));
    let other: SessionRef = Arc::new(Mutex::new(SessionState::default()));
    sessions.lock().insert(2, other.clone());
    log.publish(Some(1), &[Oid(4)], &sessions);
    assert_eq!(log.drain(2, &mut other.lock(), None), vec![Oid(4)]);
}

/// A drain up to a publication hands out exactly the changes up to it
/// and keeps the later ones for the next drain (a snapshot's sync).
#[test]
fn drain_up_to_a_publication_keeps_the_later_ones() {
    let sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }> =
        Mutex::new(HashMap::new());
    let mut log = ChangeLog::new();
    let st: SessionRef = Arc::new(Mutex::new(SessionState::default()));
    sessions.lock().insert(1, st.clone());
    log.publish(Some(2), &[Oid(5), Oid(6)], &sessions);
    let upto = log.last;
    log.publish(Some(2), &[Oid(6), Oid(7)], &sessions);
    log.publish(Some(1), &[Oid(8)], &sessions);
    assert_eq!(
        log.drain(1, &mut st.lock(), Some(upto)),
        vec![Oid(5), Oid(6)]
    );
    assert_eq!(
        log.flags(1, &st.lock(), &[Oid(5), Oid(6), Oid(7), Oid(8)]),
        vec![false, true, true, false]
    );
    assert_eq!(log.drain(1, &mut st.lock(), None), vec![Oid(6), Oid(7)]);
    assert_eq!(log.drain(1, &mut st.lock(), None), Vec::<Oid>::new());
}

/// Reserving oids is a durable commit under the commit lock: a store that
/// hands out oids fast reserves further ahead each time (so about once a
/// second), one that does it rarely goes back to the smallest block, and
/// a reopen never hands out an oid below what was reserved.
#[test]
fn oid_reservations_close_together_reach_further_ahead() {
    let (dir, engine) = crate::engine::open_temp();
    let (s, _) = engine.register_session();
    let mut blocks = Vec::new();
    let mut highest = 0;
    for _ in 0..4 {
        let asked = {
            let st = engine.commit.lock();
            (st.reserved - st.next_oid + 1) as usize
        };
        let oids = engine.allocate(s, asked).unwrap();
        highest = highest.max(oids.last().unwrap().0);
        let st = engine.commit.lock();
        assert!(st.reserved > highest);
        blocks.push(st.oid_block);
    }
    assert_eq!(
        blocks,
        [OID_BLOCK, OID_BLOCK * 2, OID_BLOCK * 4, OID_BLOCK * 8],
        "each reservation within a second of the last doubles the block"
    );
    // The last reservation long ago: back to the smallest block.
    {
        let mut st = engine.commit.lock();
        st.reserved_at = Some(std::time::Instant::now() - RESERVE_EVERY * 2);
        st.next_oid = st.reserved;
    }
    highest = highest.max(engine.allocate(s, 1).unwrap()[0].0);
    assert_eq!(engine.commit.lock().oid_block, OID_BLOCK);
    let path = engine.path().to_path_buf();
    engine.unregister_session(s);
    engine.close().unwrap();
    drop(engine);
    let config = crate::store::Options::new().engine_config(false);
    let engine = crate::engine::Engine::open(&path, &config).unwrap();
    let (s, _) = engine.register_session();
    let next = engine.allocate(s, 1).unwrap()[0].0;
    assert!(
        next > highest,
        "after a reopen {next} is not above {highest}"
    );
    drop(dir);
}
