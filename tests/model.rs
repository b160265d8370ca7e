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
                    known.push(*o);
                }
                (show(&a), show(&b))
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
