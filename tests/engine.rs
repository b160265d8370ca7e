//! Behaviour of RedbStorage: commits, validation, oids, open modes, pack.

use durus_redb::{
    Conflict, InvalidInput, ManualGc, MemoryStorage, Oid, Options, Record, RecordError,
    RedbStorage, Storage, StorageError,
};

fn rec(oid: Oid, data: &[u8], refs: &[Oid]) -> Vec<u8> {
    Record::new(oid, data, refs).into_bytes()
}

fn temp_store() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.redb");
    (dir, path)
}

/// Everything stored, as (oid, bytes), in oid order.
fn contents(s: &mut dyn Storage) -> Vec<(Oid, Vec<u8>)> {
    s.iter_records()
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            (r.oid(), r.into_bytes())
        })
        .collect()
}

/// A root referencing a child, committed in one transaction.
fn commit_root_and_child(s: &mut dyn Storage) -> (Oid, Oid) {
    let root = s.new_oid().unwrap();
    let child = s.new_oid().unwrap();
    s.begin();
    s.store(root, rec(root, b"root", &[child])).unwrap();
    s.store(child, rec(child, b"child", &[])).unwrap();
    s.end().unwrap();
    (root, child)
}

#[test]
fn first_oid_of_an_empty_store_is_the_root() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    assert_eq!(s.new_oid().unwrap(), Oid::ROOT);
    assert_eq!(s.new_oid().unwrap(), Oid(1));
}

#[test]
fn committed_graph_survives_reopen() {
    let (_d, path) = temp_store();
    let before = {
        let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
        commit_root_and_child(&mut s);
        let c = contents(&mut s);
        s.close().unwrap();
        c
    };
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    assert_eq!(contents(&mut s), before);
    assert_eq!(s.load(Oid(1)).unwrap().data(), b"child");
    assert!(matches!(
        s.load(Oid(99)),
        Err(StorageError::NotFound(Oid(99)))
    ));
}

#[test]
fn oids_are_never_handed_out_twice_across_reopen() {
    let (_d, path) = temp_store();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
        for o in s.new_oids(10).unwrap() {
            assert!(seen.insert(o), "oid {o} handed out twice");
        }
        drop(s); // without close: drop still closes cleanly
    }
    assert_eq!(seen.len(), 30);
}

/// Each refused commit leaves the store exactly as it was.
fn assert_refused_without_change(
    s: &mut RedbStorage,
    f: impl FnOnce(&mut RedbStorage) -> Result<(), StorageError>,
) -> StorageError {
    let before = contents(s);
    let err = f(s).expect_err("commit should be refused");
    assert_eq!(contents(s), before, "a refused commit changed the store");
    err
}

#[test]
fn commit_with_dangling_ref_is_rejected() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let (root, child) = commit_root_and_child(&mut s);
    let err = assert_refused_without_change(&mut s, |s| {
        s.begin();
        s.store(root, rec(root, b"root2", &[child, Oid(777), Oid(555)]))?;
        s.end()
    });
    match err {
        StorageError::Conflict(Conflict::DanglingRefs { oids }) => {
            assert_eq!(oids, vec![Oid(555), Oid(777)])
        }
        other => panic!("wrong error: {other:?}"),
    }
    assert!(err_is_conflict_display());
}

fn err_is_conflict_display() -> bool {
    let e: StorageError = Conflict::DanglingRefs { oids: vec![Oid(5)] }.into();
    e.is_conflict() && e.to_string().contains('5')
}

#[test]
fn commit_of_surprise_oid_is_rejected() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    commit_root_and_child(&mut s);
    let err = assert_refused_without_change(&mut s, |s| {
        s.begin();
        s.store(Oid(0), rec(Oid(0), b"root changed", &[]))?;
        s.store(Oid(4242), rec(Oid(4242), b"surprise", &[]))?;
        s.end()
    });
    assert!(
        matches!(
            err,
            StorageError::Conflict(Conflict::UnknownOid { oid: Oid(4242) })
        ),
        "{err:?}"
    );
}

#[test]
fn malformed_record_is_rejected() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    commit_root_and_child(&mut s);
    let oid = s.new_oid().unwrap();
    let mut bad = rec(oid, b"x", &[Oid(0)]);
    bad.push(1); // refs no longer a multiple of 8
    let err = assert_refused_without_change(&mut s, |s| {
        s.begin();
        s.store(oid, bad)?;
        s.end()
    });
    assert!(matches!(
        err,
        StorageError::Invalid(InvalidInput::Record {
            source: RecordError::RefsNotAligned { len: 9 },
            ..
        })
    ));
    let err = assert_refused_without_change(&mut s, |s| s.store(oid, vec![0; 5]));
    assert!(matches!(
        err,
        StorageError::Invalid(InvalidInput::Record {
            source: RecordError::TooShort { len: 5 },
            ..
        })
    ));
}

#[test]
fn record_stored_under_another_oid_is_rejected() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    commit_root_and_child(&mut s);
    let oid = s.new_oid().unwrap();
    let err = assert_refused_without_change(&mut s, |s| {
        s.begin();
        s.store(oid, rec(Oid(1), b"claims to be 1", &[]))?;
        s.end()
    });
    assert!(matches!(
        err,
        StorageError::Invalid(InvalidInput::Record {
            source: RecordError::OidMismatch { .. },
            ..
        })
    ));
}

#[test]
fn oid_allocated_to_another_session_is_rejected() {
    let (_d, path) = temp_store();
    let mut a = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    commit_root_and_child(&mut a);
    let mut b = a.new_session();
    let theirs = a.new_oid().unwrap();
    let err = assert_refused_without_change(&mut b, |b| {
        b.begin();
        b.store(theirs, rec(theirs, b"not mine", &[]))?;
        b.end()
    });
    assert!(
        matches!(
            err,
            StorageError::Invalid(InvalidInput::OidOfAnotherSession { .. })
        ),
        "{err:?}"
    );
}

#[test]
fn commit_is_all_or_nothing_and_refs_within_the_commit_resolve() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let (root, _) = commit_root_and_child(&mut s);
    let a = s.new_oid().unwrap();
    let b = s.new_oid().unwrap();
    s.begin();
    s.store(a, rec(a, b"a", &[b])).unwrap();
    s.store(b, rec(b, b"b", &[a])).unwrap();
    s.store(root, rec(root, b"root", &[a])).unwrap();
    s.end().unwrap();
    assert_eq!(s.load(b).unwrap().refs().collect::<Vec<_>>(), vec![a]);
    assert!(s.check_references().unwrap().is_clean());
}

#[test]
fn other_sessions_see_commits_in_sync() {
    let (_d, path) = temp_store();
    let mut a = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let mut b = a.new_session();
    let (root, child) = commit_root_and_child(&mut a);
    assert_eq!(b.sync().unwrap(), vec![root, child]);
    assert_eq!(b.sync().unwrap(), vec![]);
    assert_eq!(
        a.sync().unwrap(),
        vec![],
        "a session is not told of its own commits"
    );
}

#[test]
fn second_open_of_the_same_file_is_refused() {
    let (_d, path) = temp_store();
    let _s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let err = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap_err();
    assert!(matches!(err, StorageError::AlreadyOpen { .. }), "{err:?}");
}

#[test]
fn read_only_open_refuses_writes() {
    let (_d, path) = temp_store();
    {
        let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
        commit_root_and_child(&mut s);
        s.close().unwrap();
    }
    let mut r = RedbStorage::open_read_only(&path).unwrap();
    assert_eq!(r.load(Oid(1)).unwrap().data(), b"child");
    assert!(matches!(r.new_oid(), Err(StorageError::ReadOnly)));
    let _r2 = RedbStorage::open_read_only(&path).unwrap();
}

#[test]
fn foreign_file_is_refused_with_a_clear_error() {
    let (dir, _) = temp_store();
    let path = dir.path().join("not-a-store");
    std::fs::write(&path, b"SHELF-1\nthis is a Durus file, not redb").unwrap();
    let err = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap_err();
    assert!(matches!(err, StorageError::NotAStore { .. }), "{err:?}");
    assert!(err.to_string().contains("not a durus-redb store"), "{err}");
    assert_eq!(
        std::fs::read(&path).unwrap(),
        b"SHELF-1\nthis is a Durus file, not redb"
    );
}

#[test]
fn redb_file_of_another_program_is_refused() {
    let (_d, path) = temp_store();
    {
        let db = redb::Database::create(&path).unwrap();
        let w = db.begin_write().unwrap();
        w.open_table(redb::TableDefinition::<u64, u64>::new("other"))
            .unwrap();
        w.commit().unwrap();
    }
    let err = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap_err();
    assert!(err.to_string().contains("not a durus-redb store"), "{err}");
}

#[test]
fn store_of_a_newer_format_is_refused_naming_both_versions() {
    let (_d, path) = temp_store();
    RedbStorage::open(&path, Options::default().gc(ManualGc))
        .unwrap()
        .close()
        .unwrap();
    {
        #[derive(serde::Serialize)]
        struct FormatInfo {
            version: u32,
            created_by: String,
        }
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut m = w
                .open_table(redb::TableDefinition::<&str, &[u8]>::new("durus_meta"))
                .unwrap();
            let v = rmp_serde::to_vec(&FormatInfo {
                version: 99,
                created_by: "future".into(),
            })
            .unwrap();
            m.insert("format", v.as_slice()).unwrap();
        }
        w.commit().unwrap();
    }
    let err = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::UnsupportedFormat {
                found: 99,
                newest: 4,
                ..
            }
        ),
        "{err:?}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains("99") && msg.contains("versions 1 to 4"),
        "{msg}"
    );
}

/// A store written by the first release of format 1 (positional metadata,
/// a full collection finished, one object queued for the collector), kept
/// under tests/fixtures. Any change to the format that this build cannot
/// read, or reads differently, fails here.
#[test]
fn format_1_fixture_store_opens_with_its_contents() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("format1.redb");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format1.redb"),
        &path,
    )
    .unwrap();
    // A read-only open reads format 1 as it is and changes nothing.
    {
        let mut r = RedbStorage::open_read_only(&path).unwrap();
        assert_eq!(r.stats().unwrap().format_version, 1);
        assert_eq!(r.load(Oid::ROOT).unwrap().data(), b"root v2");
    }
    // The first writable open upgrades it to format 4 (UPGRADING.md).
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let stats = s.stats().unwrap();
    assert_eq!(stats.format_version, 4);
    assert_eq!(stats.objects, 6);
    assert_eq!(stats.gc_queue, 1, "oid 5 was dropped and queued");
    let gc = s.gc_state().unwrap();
    assert_eq!(gc.full_collections, 1);
    assert!(!gc.full_pending);
    let root = s.load(Oid::ROOT).unwrap();
    assert_eq!(root.data(), b"root v2");
    assert_eq!(root.refs().collect::<Vec<_>>(), vec![Oid(1), Oid(3)]);
    for (oid, data, refs) in [
        (1, &b"a"[..], vec![Oid(2)]),
        (2, b"b", vec![]),
        (3, b"c", vec![Oid(4)]),
        (4, b"d", vec![Oid(3)]),
        (5, b"e", vec![]),
    ] {
        let r = s.load(Oid(oid)).unwrap();
        assert_eq!((r.data(), r.refs().collect::<Vec<_>>()), (data, refs));
    }
    let check = s.check_references().unwrap();
    assert_eq!(
        (
            check.dangling_count,
            check.mismatch_count,
            check.damaged_count
        ),
        (0, 0, 0)
    );
    // Oids go on above what the store holds, and a commit works.
    let next = s.new_oid().unwrap();
    assert!(next.0 >= 6, "{next}");
    s.begin();
    s.store(next, rec(next, b"new", &[])).unwrap();
    s.store(Oid::ROOT, rec(Oid::ROOT, b"root v3", &[Oid(1), next]))
        .unwrap();
    s.end().unwrap();
    assert_eq!(s.collect_garbage_now().unwrap().removed_objects, 1);
    s.close().unwrap();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    assert_eq!(s.load(next).unwrap().data(), b"new");
    assert!(matches!(s.load(Oid(5)), Err(StorageError::NotFound(_))));
}

#[test]
fn pack_removes_unreachable_objects_and_cycles() {
    let (_d, path) = temp_store();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let mut other = s.new_session();
    let (root, child) = commit_root_and_child(&mut s);
    let a = s.new_oid().unwrap();
    let b = s.new_oid().unwrap();
    let lone = s.new_oid().unwrap();
    s.begin();
    s.store(a, rec(a, b"a", &[b])).unwrap();
    s.store(b, rec(b, b"b", &[a])).unwrap();
    s.store(lone, rec(lone, b"never referenced", &[])).unwrap();
    s.store(root, rec(root, b"root", &[child, a])).unwrap();
    s.end().unwrap();
    s.begin();
    s.store(root, rec(root, b"root", &[child])).unwrap();
    s.end().unwrap();
    other.sync().unwrap();
    let report = s.pack().unwrap();
    assert_eq!(report.removed_objects, 3);
    assert_eq!(report.live_objects, 2);
    for gone in [a, b, lone] {
        assert!(matches!(s.load(gone), Err(StorageError::NotFound(_))));
    }
    assert_eq!(other.sync().unwrap(), vec![a, b, lone]);
    assert!(s.check_references().unwrap().is_clean());
    let mut model = MemoryStorage::new();
    assert_eq!(model.pack().unwrap().removed_objects, 0);
}

#[test]
fn a_new_store_is_created_whole_under_a_temporary_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    // The leftover of a creation killed before it finished (no such process).
    let stale = dir.path().join(".s.redb.creating-4000000000");
    std::fs::write(&stale, b"half a redb file").unwrap();
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    assert_eq!(s.new_oid().unwrap(), Oid::ROOT);
    drop(s);
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, vec!["s.redb".to_string()], "leftovers: {names:?}");
    assert!(RedbStorage::open_read_only(&path).is_ok());
}

/// A store written by a format-2 build (the commit log, the queue kept by
/// oid) through the real Durus client: root -> kept -> child, and `dropped`
/// detached and queued (served with `--gc manual`). Kept under
/// tests/fixtures; the upgrade to format 3 moves the queue entry into the
/// time-ordered queue.
#[test]
fn format_2_fixture_store_upgrades_with_its_queue() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("format2.redb");
    std::fs::copy(
        concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/format2.redb"),
        &path,
    )
    .unwrap();
    {
        let r = RedbStorage::open_read_only(&path).unwrap();
        let st = r.stats().unwrap();
        assert_eq!((st.format_version, st.objects, st.gc_queue), (2, 4, 1));
        assert_eq!(st.gc_oldest, None, "format 2 kept no drop times");
    }
    let mut s = RedbStorage::open(&path, Options::default().gc(ManualGc)).unwrap();
    let st = s.stats().unwrap();
    assert_eq!((st.format_version, st.objects, st.gc_queue), (4, 4, 1));
    assert!(st.gc_oldest.is_some());
    let root = s.load(Oid::ROOT).unwrap();
    assert_eq!(root.refs().collect::<Vec<_>>(), vec![Oid(1)]);
    assert_eq!(
        s.load(Oid(1)).unwrap().refs().collect::<Vec<_>>(),
        vec![Oid(3)]
    );
    assert!(
        s.load(Oid(2)).is_ok(),
        "the dropped object waits for a collection"
    );
    // Within its (fresh) window an explicit collection still takes it.
    let r = s.collect_garbage_now().unwrap();
    assert_eq!(r.removed_objects, 1);
    assert!(matches!(s.load(Oid(2)), Err(StorageError::NotFound(_))));
    let check = s.check_references().unwrap();
    assert_eq!(
        (
            check.dangling_count,
            check.mismatch_count,
            check.damaged_count
        ),
        (0, 0, 0)
    );
}

/// Snapshot reads in the library: a session loads the state of its last
/// sync or commit; `sync` moves it to the latest and names what changed;
/// an object the collector removed after the snapshot stays loadable from
/// it; releasing the snapshot goes back to the latest state.
#[test]
fn snapshot_reads_keep_a_session_on_the_state_of_its_last_sync() {
    let (_d, path) = temp_store();
    let mut a =
        RedbStorage::open(&path, Options::default().gc(ManualGc).snapshot_reads(true)).unwrap();
    let mut b = a.new_session();
    let (root, x) = commit_root_and_child(&mut a);
    assert!(a.holds_snapshot(), "a commit takes a snapshot");
    b.sync().unwrap();
    let x_before = b.load(x).unwrap();

    // a changes x, then drops it from the root and packs it away.
    a.begin();
    a.store(x, rec(x, b"changed", &[])).unwrap();
    a.end().unwrap();
    assert_eq!(b.load(x).unwrap(), x_before, "b reads its snapshot");
    assert_eq!(
        a.load(x).unwrap().data(),
        b"changed",
        "a reads its own commit"
    );
    a.begin();
    a.store(root, rec(root, b"root", &[])).unwrap();
    a.end().unwrap();
    let packed = a.pack().unwrap();
    assert_eq!(packed.removed_objects, 1);
    // a's own snapshot (from its last commit) still has x too, until a syncs.
    assert!(a.load(x).is_ok());
    a.sync().unwrap();
    assert!(matches!(a.load(x), Err(StorageError::NotFound(_))));
    assert_eq!(b.load(x).unwrap(), x_before, "still in b's snapshot");
    assert_eq!(b.bulk_load(&[root, x]).unwrap()[1], x_before);

    // b syncs: told of x and the root, and reads the latest state.
    assert_eq!(b.sync().unwrap(), vec![root, x]);
    assert!(matches!(b.load(x), Err(StorageError::NotFound(_))));
    assert_eq!(b.load(root).unwrap().refs().count(), 0);

    // Without a snapshot, loads read the latest state again.
    let y = a.new_oid().unwrap();
    a.begin();
    a.store(y, rec(y, b"y", &[])).unwrap();
    a.store(root, rec(root, b"root", &[y])).unwrap();
    a.end().unwrap();
    assert!(matches!(b.load(y), Err(StorageError::NotFound(_))));
    b.release_snapshot();
    assert!(!b.holds_snapshot());
    assert_eq!(b.load(y).unwrap().data(), b"y");
    b.set_snapshot_reads(false);
    b.sync().unwrap();
    assert!(!b.holds_snapshot(), "snapshot reads are off for b");
}

/// `Storage::close` ends one session: the others go on, and the store
/// closes (and can be opened again) when the last session ends.
/// `close_store` closes it at once for every session.
#[test]
fn close_ends_one_session_and_the_last_one_closes_the_store() {
    let (_dir, path) = temp_store();
    let mut a = RedbStorage::open(&path, Options::new()).unwrap();
    let (_, child) = commit_root_and_child(&mut a);
    let mut b = a.new_session();
    let held = a.new_oid().unwrap();
    a.close().unwrap();
    // The closed session refuses every call; closing again is harmless.
    assert!(matches!(a.load(child), Err(StorageError::Closed)));
    assert!(matches!(a.new_oid(), Err(StorageError::Closed)));
    a.begin();
    assert!(matches!(
        a.store(held, rec(held, b"late", &[])),
        Err(StorageError::Closed)
    ));
    a.close().unwrap();
    // The other session goes on: reads, and commits.
    assert_eq!(b.load(child).unwrap().data(), b"child");
    b.begin();
    b.store(child, rec(child, b"child 2", &[])).unwrap();
    b.end().unwrap();
    // The store is still open: a second open is refused.
    assert!(matches!(
        RedbStorage::open(&path, Options::new()),
        Err(StorageError::AlreadyOpen { .. })
    ));
    // The last session's close closes it.
    b.close().unwrap();
    drop((a, b));
    let mut again = RedbStorage::open(&path, Options::new()).unwrap();
    assert_eq!(again.load(child).unwrap().data(), b"child 2");
    // close_store closes the store for every session at once.
    let mut other = again.new_session();
    again.close_store().unwrap();
    assert!(matches!(other.load(child), Err(StorageError::Closed)));
    drop((again, other));
    let mut last = RedbStorage::open(&path, Options::new()).unwrap();
    assert_eq!(last.load(child).unwrap().data(), b"child 2");
}
