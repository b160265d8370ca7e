//! The typed object layer (`durus_redb::object`): random transactions
//! against a plain in-memory model, with a cache small enough to evict;
//! two writers conflicting through a server; records that are not Rust
//! objects refused with a clear error.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use durus_redb::object::{Db, ObjectError, Persistent, Ref};
use durus_redb::{
    Address, ClientStorage, ManualGc, Oid, Options, Record, RedbStorage, Server, ServerConfig,
    Storage,
};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};

/// The root: named items.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Directory {
    items: BTreeMap<u8, Ref<Item>>,
}

impl Persistent for Directory {
    const TAG: &'static str = "tests.Directory";
}

/// An item: a value, and perhaps a link to another item.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Item {
    value: i64,
    link: Option<Ref<Item>>,
}

impl Persistent for Item {
    const TAG: &'static str = "tests.Item";
}

/// The model: each name's value and the name its link was made to (the
/// link goes to that item object, which stays even if the name is then
/// removed or set anew).
#[derive(Clone, Debug, Default, PartialEq)]
struct Model {
    /// name -> item id
    names: BTreeMap<u8, usize>,
    /// item id -> (value, linked item id)
    items: Vec<(i64, Option<usize>)>,
}

#[derive(Clone, Debug)]
enum Step {
    /// Sets the value of the item named so (a new item if there is none).
    Set(u8, i64),
    /// Links the first named item to the second.
    Link(u8, u8),
    /// Removes the name.
    Remove(u8),
    /// Adds the value of the linked item to the item's own.
    Pull(u8),
}

fn step() -> impl Strategy<Value = Step> {
    let name = 0u8..6;
    prop_oneof![
        (name.clone(), -100i64..100).prop_map(|(n, v)| Step::Set(n, v)),
        (name.clone(), name.clone()).prop_map(|(a, b)| Step::Link(a, b)),
        name.clone().prop_map(Step::Remove),
        name.prop_map(Step::Pull),
    ]
}

impl Model {
    fn apply(&mut self, s: &Step) {
        match *s {
            Step::Set(n, v) => match self.names.get(&n) {
                Some(&i) => self.items[i].0 = v,
                None => {
                    self.items.push((v, None));
                    self.names.insert(n, self.items.len() - 1);
                }
            },
            Step::Link(a, b) => {
                if let (Some(&i), Some(&j)) = (self.names.get(&a), self.names.get(&b)) {
                    self.items[i].1 = Some(j);
                }
            }
            Step::Remove(n) => {
                self.names.remove(&n);
            }
            Step::Pull(n) => {
                if let Some(&i) = self.names.get(&n)
                    && let Some(j) = self.items[i].1
                {
                    self.items[i].0 += self.items[j].0;
                }
            }
        }
    }

    /// What reading every name gives: its value and its link's value.
    fn view(&self) -> BTreeMap<u8, (i64, Option<i64>)> {
        self.names
            .iter()
            .map(|(&n, &i)| {
                let (v, link) = self.items[i];
                (n, (v, link.map(|j| self.items[j].0)))
            })
            .collect()
    }
}

fn apply<S: Storage>(tx: &mut durus_redb::object::Tx<'_, S>, s: &Step) -> Result<(), ObjectError> {
    let mut dir = tx
        .root::<Directory>()?
        .map(|d| (*d).clone())
        .unwrap_or_default();
    match *s {
        Step::Set(n, v) => match dir.items.get(&n) {
            Some(&r) => tx.update(r, |i| i.value = v)?,
            None => {
                let r = tx.insert(Item {
                    value: v,
                    link: None,
                })?;
                dir.items.insert(n, r);
            }
        },
        Step::Link(a, b) => {
            if let (Some(&ra), Some(&rb)) = (dir.items.get(&a), dir.items.get(&b)) {
                tx.update(ra, |i| i.link = Some(rb))?;
            }
        }
        Step::Remove(n) => {
            dir.items.remove(&n);
        }
        Step::Pull(n) => {
            if let Some(&r) = dir.items.get(&n) {
                let item = tx.get(r)?;
                if let Some(l) = item.link {
                    let add = tx.get(l)?.value;
                    tx.update(r, |i| i.value += add)?;
                }
            }
        }
    }
    tx.set_root(dir)
}

fn view<S: Storage>(db: &mut Db<S>) -> BTreeMap<u8, (i64, Option<i64>)> {
    db.transact(|tx| {
        let Some(dir) = tx.root::<Directory>()? else {
            return Ok(BTreeMap::new());
        };
        let mut out = BTreeMap::new();
        for (&n, &r) in &dir.items {
            let item = tx.get(r)?;
            let link = match item.link {
                Some(l) => Some(tx.get(l)?.value),
                None => None,
            };
            out.insert(n, (item.value, link));
        }
        Ok(out)
    })
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Transactions of random steps, some failing part way (nothing of
    /// them committed), on a redb store through a cache of `cache` bytes
    /// (0 and 200 force evictions all the time); after each, the same
    /// session and a fresh one read what the model holds.
    #[test]
    fn random_transactions_read_back_as_the_model(
        txs in proptest::collection::vec(
            (proptest::collection::vec(step(), 1..5), any::<bool>()), 1..25),
        cache in prop_oneof![Just(0usize), Just(200), Just(1 << 20)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
        let reader = store.new_session();
        let mut db = Db::with_cache(store, cache);
        let mut model = Model::default();
        for (steps, fail) in &txs {
            let result = db.transact(|tx| {
                for s in steps {
                    apply(tx, s)?;
                }
                if *fail {
                    return Err(ObjectError::Codec { oid: Oid(0), why: "the test's failure".into() });
                }
                Ok(())
            });
            if *fail {
                prop_assert!(result.is_err());
            } else {
                result.unwrap();
                for s in steps {
                    model.apply(s);
                }
            }
            prop_assert!(db.cached_bytes() <= cache.max(1 << 20));
            prop_assert_eq!(view(&mut db), model.view());
        }
        let mut fresh = Db::with_cache(reader, 1 << 20);
        prop_assert_eq!(view(&mut fresh), model.view());
        drop(fresh);
        db.storage().close().unwrap();
    }
}

/// A counter everyone increments, and one per writer.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Counters {
    shared: u64,
    per_writer: Vec<u64>,
}

impl Persistent for Counters {
    const TAG: &'static str = "tests.Counters";
}

/// Sets a zeroed counter as the root through `db`; then each of
/// `sessions`, on a thread of its own (a transaction run at most `tries`
/// times), increments it `times` times, counting its own increments too.
/// Returns the counter as `db` reads it afterwards, and how often the
/// transactions' closures ran in all.
fn increments<S: Storage + Send + 'static>(
    db: &mut Db<S>,
    sessions: Vec<S>,
    times: u64,
    tries: u32,
) -> (Counters, u64) {
    db.transact(|tx| {
        tx.set_root(Counters {
            shared: 0,
            per_writer: vec![0; sessions.len()],
        })
    })
    .unwrap();
    let runs = Arc::new(AtomicU64::new(0));
    let writers: Vec<_> = sessions
        .into_iter()
        .enumerate()
        .map(|(w, session)| {
            let runs = runs.clone();
            let mut db = Db::new(session);
            db.set_tries(tries);
            std::thread::spawn(move || {
                for _ in 0..times {
                    db.transact(|tx| {
                        runs.fetch_add(1, Ordering::Relaxed);
                        let mut c = (*tx.root::<Counters>()?.unwrap()).clone();
                        c.shared += 1;
                        c.per_writer[w] += 1;
                        tx.set_root(c)
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let c = db
        .transact(|tx| Ok((*tx.root::<Counters>()?.unwrap()).clone()))
        .unwrap();
    (c, runs.load(Ordering::Relaxed))
}

/// Two writers, each its own session through a server, increment one
/// counter 100 times each: their transactions conflict, are run again,
/// and no increment is lost.
#[test]
fn two_writers_through_a_server_lose_no_increment() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(dir.path().join("s.redb"), Options::new()).unwrap();
    let server = Server::bind(&store, ServerConfig::new(Address::tcp("127.0.0.1", 0))).unwrap();
    let Address::Tcp { port, .. } = server.address().clone() else {
        unreachable!()
    };
    let stop = server.shutdown_handle();
    let serving = std::thread::spawn(move || server.run());
    let client = || ClientStorage::connect_tcp("127.0.0.1", port).unwrap();
    let (c, runs) = increments(&mut Db::new(client()), vec![client(), client()], 100, 1000);
    assert_eq!(c.shared, 200, "an increment was lost");
    assert_eq!(c.per_writer, vec![100, 100]);
    eprintln!("{runs} runs of the closure for 200 transactions");
    stop.shutdown();
    serving.join().unwrap().unwrap();
}

#[derive(Clone, Serialize, Deserialize)]
struct Account {
    balance: i64,
}

impl Persistent for Account {
    const TAG: &'static str = "tests.Account";
}

#[derive(Clone, Serialize, Deserialize)]
struct Bank {
    a: Ref<Account>,
    b: Ref<Account>,
}

impl Persistent for Bank {
    const TAG: &'static str = "tests.Bank";
}

/// A read-only transaction that reads one account, meets a transfer
/// committed by another session, then reads the other account: how often
/// it runs, and the total it saw.
fn read_across_a_transfer(snapshot_reads: bool) -> (u32, i64) {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(
        dir.path().join("s.redb"),
        Options::new().gc(ManualGc).snapshot_reads(snapshot_reads),
    )
    .unwrap();
    let mut reader = Db::new(store.new_session());
    let mut writer = Db::new(store);
    let bank = writer
        .transact(|tx| {
            let a = tx.insert(Account { balance: 50 })?;
            let b = tx.insert(Account { balance: 50 })?;
            tx.set_root(Bank { a, b })?;
            Ok(Bank { a, b })
        })
        .unwrap();
    let mut runs = 0;
    let total = reader
        .transact(|tx| {
            runs += 1;
            let a = tx.get(bank.a)?.balance;
            if runs == 1 {
                writer
                    .transact(|w| {
                        w.update(bank.a, |x| x.balance -= 10)?;
                        w.update(bank.b, |x| x.balance += 10)
                    })
                    .unwrap();
            }
            Ok(a + tx.get(bank.b)?.balance)
        })
        .unwrap();
    (runs, total)
}

/// With snapshot reads, a read-only transaction never conflicts: it sees
/// the state of its start throughout, once. Without, it meets the conflict
/// and runs again; both see a consistent total (never the 110 of one
/// account before the transfer and the other after).
#[test]
fn read_only_transactions_over_snapshot_reads_never_conflict() {
    assert_eq!(read_across_a_transfer(true), (1, 100));
    assert_eq!(read_across_a_transfer(false), (2, 100));
}

/// A transaction that writes one account from what it read of the other
/// commits only onto the state it read: when the account it read changes
/// before its commit, it runs again (no write skew), over a store in the
/// process and through a server.
#[test]
fn a_commit_is_refused_when_what_it_read_changed() {
    fn run<S: Storage>(mut db: Db<S>, mut other: Db<S>) -> (u32, i64) {
        let bank = db
            .transact(|tx| {
                let a = tx.insert(Account { balance: 50 })?;
                let b = tx.insert(Account { balance: 50 })?;
                tx.set_root(Bank { a, b })?;
                Ok(Bank { a, b })
            })
            .unwrap();
        let mut runs = 0;
        db.transact(|tx| {
            runs += 1;
            // b := a (read a, write b).
            let a = tx.get(bank.a)?.balance;
            if runs == 1 {
                other
                    .transact(|o| o.update(bank.a, |x| x.balance = 7))
                    .unwrap();
            }
            tx.update(bank.b, |x| x.balance = a)
        })
        .unwrap();
        let b = other.transact(|tx| Ok(tx.get(bank.b)?.balance)).unwrap();
        (runs, b)
    }
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
    let other = Db::new(store.new_session());
    assert_eq!(run(Db::new(store.new_session()), other), (2, 7));

    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(dir.path().join("s.redb"), Options::new()).unwrap();
    let server = Server::bind(&store, ServerConfig::new(Address::tcp("127.0.0.1", 0))).unwrap();
    let Address::Tcp { port, .. } = server.address().clone() else {
        unreachable!()
    };
    let stop = server.shutdown_handle();
    let serving = std::thread::spawn(move || server.run());
    let client = || Db::new(ClientStorage::connect_tcp("127.0.0.1", port).unwrap());
    assert_eq!(run(client(), client()), (2, 7));
    stop.shutdown();
    serving.join().unwrap().unwrap();
}

/// Two threads, each with its own session of one store in the process,
/// increment one counter: no increment is lost.
#[test]
fn two_writers_in_the_process_lose_no_increment() {
    let dir = tempfile::tempdir().unwrap();
    let store = RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
    let sessions = vec![store.new_session(), store.new_session()];
    let (c, _) = increments(&mut Db::new(store.new_session()), sessions, 200, 10_000);
    assert_eq!(c.per_writer, vec![200, 200]);
    assert_eq!(c.shared, 400, "an increment was lost");
}

/// A record that is not a Rust object (a pickle), and one of another
/// type, are refused naming the oid and what was found.
#[test]
fn records_of_another_kind_are_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let mut store = RedbStorage::open(dir.path().join("s.redb"), Options::new()).unwrap();
    // A Python-style root record.
    assert_eq!(store.new_oid().unwrap(), Oid::ROOT);
    store.begin();
    store
        .store(
            Oid::ROOT,
            Record::new(
                Oid::ROOT,
                b"\x80\x02cdurus.persistent_dict\nPersistentDict\n",
                &[],
            )
            .into_bytes(),
        )
        .unwrap();
    store.end().unwrap();
    let mut db = Db::new(store);
    let e = db
        .transact(|tx| tx.root::<Directory>().map(|_| ()))
        .unwrap_err();
    assert!(matches!(e, ObjectError::NotAnObject { .. }), "{e}");
    assert!(e.to_string().contains("pickle"), "{e}");
    db.transact(|tx| tx.set_root(Counters::default())).unwrap();
    let e = db
        .transact(|tx| tx.root::<Directory>().map(|_| ()))
        .unwrap_err();
    assert!(
        e.to_string().contains("tests.Counters") && e.to_string().contains("tests.Directory"),
        "{e}"
    );
}

/// The root of the map tests: one persistent map.
#[derive(Clone, Copy, Serialize, Deserialize)]
struct MapRoot {
    map: durus_redb::object::PMap<u32, String>,
    set: durus_redb::object::PSet<u32>,
}

impl Persistent for MapRoot {
    const TAG: &'static str = "tests.MapRoot";
}

#[derive(Clone, Debug)]
enum MapStep {
    Insert(u32, u16),
    Remove(u32),
    Get(u32),
    Range(u32, u32, usize),
}

fn map_step() -> impl Strategy<Value = MapStep> {
    let key = 0u32..300;
    prop_oneof![
        4 => (key.clone(), any::<u16>()).prop_map(|(k, v)| MapStep::Insert(k, v)),
        1 => key.clone().prop_map(MapStep::Remove),
        1 => key.clone().prop_map(MapStep::Get),
        1 => (key.clone(), key, 0usize..40).prop_map(|(a, b, n)| MapStep::Range(a.min(b), a.max(b), n)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    /// A persistent map with nodes of at most 4 entries (so that it splits
    /// often, three levels and more), through a cache of 0 bytes, 300 or 1 MiB,
    /// answers every step as std's BTreeMap does, across transactions; a
    /// fresh session reads the same entries in order at the end.
    #[test]
    fn a_persistent_map_answers_as_btreemap(
        txs in proptest::collection::vec(proptest::collection::vec(map_step(), 1..30), 1..12),
        cache in prop_oneof![Just(0usize), Just(300), Just(1 << 20)],
    ) {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStorage::open(dir.path().join("s.redb"), Options::new().gc(ManualGc)).unwrap();
        let reader = store.new_session();
        let mut db = Db::with_cache(store, cache);
        db.transact(|tx| {
            let map = durus_redb::object::PMap::with_fanout(tx, 4)?;
            let set = durus_redb::object::PSet::with_fanout(tx, 4)?;
            tx.set_root(MapRoot { map, set })
        }).unwrap();
        let mut model: BTreeMap<u32, String> = BTreeMap::new();
        let mut set_model: BTreeSet<u32> = BTreeSet::new();
        for steps in &txs {
            let (answers, expected) = {
                let mut expected = Vec::new();
                let mut m = model.clone();
                let mut ms = set_model.clone();
                for s in steps {
                    expected.push(match *s {
                        MapStep::Insert(k, v) => format!("{:?}", m.insert(k, v.to_string())),
                        MapStep::Remove(k) => format!("{:?}", m.remove(&k)),
                        MapStep::Get(k) => format!("{:?}", m.get(&k).cloned()),
                        MapStep::Range(a, b, n) => format!("{:?}", m.range(a..b).take(n)
                            .map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>()),
                    });
                    // The set takes the same steps (keys with an odd
                    // value are inserted, so that the two differ).
                    expected.push(match *s {
                        MapStep::Insert(k, v) if v % 2 == 1 => format!("{}", ms.insert(k)),
                        MapStep::Insert(_, _) => "skip".to_string(),
                        MapStep::Remove(k) => format!("{}", ms.remove(&k)),
                        MapStep::Get(k) => format!("{}", ms.contains(&k)),
                        MapStep::Range(a, b, n) => format!("{:?}", ms.range(a..b).take(n)
                            .copied().collect::<Vec<_>>()),
                    });
                }
                expected.push(format!("len {} {}", m.len(), ms.len()));
                let answers = db.transact(|tx| {
                    let MapRoot { map, set } = *tx.root::<MapRoot>()?.unwrap().as_ref();
                    let mut out = Vec::new();
                    for s in steps {
                        out.push(match *s {
                            MapStep::Insert(k, v) => format!("{:?}", map.insert(tx, k, v.to_string())?),
                            MapStep::Remove(k) => format!("{:?}", map.remove(tx, &k)?),
                            MapStep::Get(k) => format!("{:?}", map.get(tx, &k)?),
                            MapStep::Range(a, b, n) => format!("{:?}", map.range(tx, a..b, n)?),
                        });
                        out.push(match *s {
                            MapStep::Insert(k, v) if v % 2 == 1 => format!("{}", set.insert(tx, k)?),
                            MapStep::Insert(_, _) => "skip".to_string(),
                            MapStep::Remove(k) => format!("{}", set.remove(tx, &k)?),
                            MapStep::Get(k) => format!("{}", set.contains(tx, &k)?),
                            MapStep::Range(a, b, n) => format!("{:?}", set.range(tx, a..b, n)?),
                        });
                    }
                    out.push(format!("len {} {}", map.len(tx)?, set.len(tx)?));
                    Ok(out)
                }).unwrap();
                model = m;
                set_model = ms;
                (answers, expected)
            };
            prop_assert_eq!(answers, expected);
        }
        let mut fresh = Db::with_cache(reader, 1 << 20);
        let all = fresh.transact(|tx| {
            let MapRoot { map, set } = *tx.root::<MapRoot>()?.unwrap().as_ref();
            Ok((map.range(tx, .., usize::MAX)?, set.range(tx, .., usize::MAX)?))
        }).unwrap();
        let want: Vec<(u32, String)> = model.into_iter().collect();
        prop_assert_eq!(all.0, want);
        let want: Vec<u32> = set_model.into_iter().collect();
        prop_assert_eq!(all.1, want);
    }
}

#[path = "../examples/inverted_index.rs"]
#[allow(dead_code)]
mod inverted_index;

/// The inverted-index example's work, smaller: two indexers through one
/// server at once, on disjoint documents, lose no posting; every count is
/// exact; the store checks clean; a pack removes nothing the index needs.
#[test]
fn two_indexers_through_a_server_lose_no_posting() {
    const DOCS: u64 = 2000;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("index.redb");
    let store = RedbStorage::open(&path, Options::new()).unwrap();
    let server = Server::bind(&store, ServerConfig::new(Address::tcp("127.0.0.1", 0))).unwrap();
    drop(store);
    let Address::Tcp { port, .. } = server.address().clone() else {
        unreachable!()
    };
    let stop = server.shutdown_handle();
    let serving = std::thread::spawn(move || server.run());
    let connect = || Db::new(ClientStorage::connect_tcp("127.0.0.1", port).unwrap());
    // Both start on the empty store: one makes the root, the other runs
    // its transaction again and finds it.
    let indexers: Vec<_> = [0..DOCS / 2, DOCS / 2..DOCS]
        .into_iter()
        .map(|docs| {
            std::thread::spawn(move || {
                let mut db = Db::new(ClientStorage::connect_tcp("127.0.0.1", port).unwrap());
                db.set_tries(10_000);
                inverted_index::index(&mut db, docs).unwrap()
            })
        })
        .collect();
    let postings: u64 = indexers.into_iter().map(|t| t.join().unwrap()).sum();
    let want = |k: u64| DOCS.div_ceil(k);
    assert_eq!(postings, (1..=inverted_index::WORDS).map(want).sum::<u64>());
    let mut db = connect();
    for k in [1, 2, 3, 7, 10, 97, 500, 999, 1000] {
        assert_eq!(
            inverted_index::count(&mut db, &format!("w{k}")).unwrap(),
            want(k),
            "w{k}"
        );
    }
    assert_eq!(inverted_index::count(&mut db, "w1001").unwrap(), 0);
    drop(db);
    stop.shutdown();
    serving.join().unwrap().unwrap();

    // A pack keeps every posting; the store checks clean.
    let mut store = RedbStorage::open(&path, Options::new().gc(ManualGc)).unwrap();
    store.pack().unwrap();
    let mut db = Db::new(store);
    for k in [1, 7, 1000] {
        assert_eq!(
            inverted_index::count(&mut db, &format!("w{k}")).unwrap(),
            want(k)
        );
    }
    db.storage().close().unwrap();
    drop(db);
    let report = durus_redb::check_store(&path).unwrap();
    assert!(
        report.integrity_ok && report.log_damage.is_none() && report.references.is_clean(),
        "{report:?}"
    );
}
