//! Property tests: random sequences of operations give the same results on
//! RedbStorage as on MemoryStorage, the model.

use durus_redb::{
    ManualGc, MemoryStorage, Oid, Options, Record, RedbStorage, Storage, StorageError,
};
use proptest::prelude::*;

#[derive(Debug, Clone)]
enum Op {
    NewOid,
    /// Store into the pending commit: the oid is picked from the known oids
    /// (or a fresh one), the refs likewise.
    Store {
        oid: usize,
        data: Vec<u8>,
        refs: Vec<usize>,
        corrupt: bool,
    },
    /// Store the root (oid 0) into the pending commit without `new_oid`,
    /// as the contract allows.
    StoreRoot {
        data: Vec<u8>,
        refs: Vec<usize>,
    },
    Commit,
    Abort,
    Load(usize),
    BulkLoad(Vec<usize>),
    Sync,
    Reopen,
    Pack,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => Just(Op::NewOid),
        6 => (0usize..40, prop::collection::vec(any::<u8>(), 0..24), prop::collection::vec(0usize..40, 0..4), prop::bool::weighted(0.05))
            .prop_map(|(oid, data, refs, corrupt)| Op::Store { oid, data, refs, corrupt }),
        1 => (prop::collection::vec(any::<u8>(), 0..8), prop::collection::vec(0usize..40, 0..3))
            .prop_map(|(data, refs)| Op::StoreRoot { data, refs }),
        3 => Just(Op::Commit),
        1 => Just(Op::Abort),
        3 => (0usize..40).prop_map(Op::Load),
        1 => prop::collection::vec(0usize..40, 0..5).prop_map(Op::BulkLoad),
        1 => Just(Op::Sync),
        1 => Just(Op::Reopen),
        1 => Just(Op::Pack),
    ]
}

/// Oids the test may name: those handed out so far, then a few that never were.
fn pick(known: &[Oid], i: usize) -> Oid {
    if i < known.len() {
        known[i]
    } else {
        Oid(1000 + i as u64)
    }
}

/// Results are compared through their display: both storages share the error
/// types, so the same refusal reads the same.
fn show<T: std::fmt::Debug>(r: &Result<T, StorageError>) -> String {
    match r {
        Ok(v) => format!("ok {v:?}"),
        Err(e) => format!("err {e}"),
    }
}

fn contents(s: &mut dyn Storage) -> Vec<Vec<u8>> {
    s.iter_records()
        .unwrap()
        .map(|r| r.unwrap().into_bytes())
        .collect()
}

fn run(ops: Vec<Op>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.redb");
    let mut redb = Some(RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap());
    let mut model = MemoryStorage::new();
    let mut known: Vec<Oid> = Vec::new();
    for (step, op) in ops.into_iter().enumerate() {
        let r = redb.as_mut().unwrap();
        let (a, b) = match op {
            Op::NewOid => {
                let (a, b) = (r.new_oid(), model.new_oid());
                if let Ok(o) = &b {
                    // Never an oid that is stored, the root included.
                    prop_assert!(
                        model.load(*o).is_err(),
                        "step {}: new_oid gave stored {}",
                        step,
                        o
                    );
                    known.push(*o);
                }
                (show(&a), show(&b))
            }
            Op::StoreRoot { data, refs } => {
                let refs: Vec<Oid> = refs.iter().map(|&i| pick(&known, i)).collect();
                let bytes = Record::new(Oid::ROOT, &data, &refs).into_bytes();
                (
                    show(&r.store(Oid::ROOT, bytes.clone())),
                    show(&model.store(Oid::ROOT, bytes)),
                )
            }
            Op::Store {
                oid,
                data,
                refs,
                corrupt,
            } => {
                let oid = pick(&known, oid);
                let refs: Vec<Oid> = refs.iter().map(|&i| pick(&known, i)).collect();
                let mut bytes = Record::new(oid, &data, &refs).into_bytes();
                if corrupt {
                    bytes.push(0);
                }
                (
                    show(&r.store(oid, bytes.clone())),
                    show(&model.store(oid, bytes)),
                )
            }
            Op::Commit => {
                let (a, b) = (r.end(), model.end());
                (show(&a), show(&b))
            }
            Op::Abort => {
                r.abort();
                model.abort();
                (String::new(), String::new())
            }
            Op::Load(i) => {
                let oid = pick(&known, i);
                (show(&r.load(oid)), show(&model.load(oid)))
            }
            Op::BulkLoad(is) => {
                let oids: Vec<Oid> = is.iter().map(|&i| pick(&known, i)).collect();
                (show(&r.bulk_load(&oids)), show(&model.bulk_load(&oids)))
            }
            Op::Sync => (show(&r.sync()), show(&model.sync())),
            Op::Reopen => {
                redb.take().unwrap().close().unwrap();
                redb = Some(RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap());
                model.reopen();
                (String::new(), String::new())
            }
            Op::Pack => (show(&r.pack()), show(&model.pack())),
        };
        prop_assert_eq!(a, b, "step {} diverged", step);
    }
    let r = redb.as_mut().unwrap();
    prop_assert_eq!(contents(r), contents(&mut model));
    prop_assert!(r.check_references().unwrap().is_clean());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn redb_storage_behaves_as_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run(ops)?;
    }
}

/// The root stored directly (no `new_oid`), then oids allocated: neither
/// the engine nor the model hands out oid 0 again, and the root stays.
#[test]
fn a_root_stored_directly_is_never_handed_out_by_new_oid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("root.redb");
    let mut redb = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let mut model = MemoryStorage::new();
    let stores: [&mut dyn Storage; 2] = [&mut redb, &mut model];
    for s in stores {
        s.begin();
        s.store(Oid::ROOT, Record::new(Oid::ROOT, b"root", &[]).into_bytes())
            .unwrap();
        s.end().unwrap();
        let oids = s.new_oids(3).unwrap();
        assert_eq!(oids, [Oid(1), Oid(2), Oid(3)]);
        s.begin();
        s.store(oids[0], Record::new(oids[0], b"child", &[]).into_bytes())
            .unwrap();
        s.store(
            Oid::ROOT,
            Record::new(Oid::ROOT, b"root", &[oids[0]]).into_bytes(),
        )
        .unwrap();
        s.end().unwrap();
        assert_eq!(s.load(Oid::ROOT).unwrap().data(), b"root");
        assert_eq!(s.load(oids[0]).unwrap().data(), b"child");
    }
    // On an empty store the first oid is the root (Durus's Connection
    // relies on it).
    assert_eq!(MemoryStorage::new().new_oid().unwrap(), Oid::ROOT);
    redb.close().unwrap();
    let mut again = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    assert!(again.new_oid().unwrap() > Oid(3));
}
