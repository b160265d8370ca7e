//! The commit log's replay: crash images of a store taken between commits
//! (the file and its `-log` directory copied as a crash of the process
//! leaves them), reopened and compared with a model; torn and corrupt log
//! tails; repeated crashes, also right after a replay.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use durus_redb::{
    Durability, Manual, ManualGc, Oid, Options, Record, RedbStorage, Storage, StorageError,
    check_store, repair_store,
};
use proptest::prelude::*;

fn options() -> Options {
    // No background checkpoints (they would race the copies): checkpoints
    // are taken explicitly, between commits.
    Options::new()
        .durability(Durability::Fsync)
        .checkpoint(Manual)
        .gc(ManualGc)
}

fn log_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap().to_os_string();
    name.push("-log");
    path.with_file_name(name)
}

/// Copies the store at `path` and its log into `dir` under `name`, as a
/// crash would leave them, without closing the store.
fn crash_image(path: &Path, dir: &Path, name: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let to = dir.join(name);
    std::fs::copy(path, &to).unwrap();
    let log = log_dir(path);
    if log.exists() {
        let to_log = log_dir(&to);
        std::fs::create_dir_all(&to_log).unwrap();
        for e in std::fs::read_dir(&log).unwrap() {
            let e = e.unwrap();
            std::fs::copy(e.path(), to_log.join(e.file_name())).unwrap();
        }
    }
    to
}

/// The model: every object's data and references; the root references all.
type Model = BTreeMap<u64, (Vec<u8>, Vec<u64>)>;

fn commit(s: &mut RedbStorage, model: &mut Model, writes: &[(u64, Vec<u8>, Vec<u64>)]) {
    s.begin();
    for (oid, data, refs) in writes {
        let refs: Vec<Oid> = refs.iter().map(|&r| Oid(r)).collect();
        s.store(Oid(*oid), Record::new(Oid(*oid), data, &refs).into_bytes())
            .unwrap();
    }
    s.end().unwrap();
    for (oid, data, refs) in writes {
        model.insert(*oid, (data.clone(), refs.clone()));
    }
}

fn assert_matches(path: &Path, model: &Model, what: &str) {
    let mut s = RedbStorage::open(path, options()).unwrap();
    let stats = s.stats().unwrap();
    assert_eq!(stats.objects, model.len() as u64, "{what}: object count");
    for (oid, (data, refs)) in model {
        let r = s
            .load(Oid(*oid))
            .unwrap_or_else(|e| panic!("{what}: {oid}: {e}"));
        assert_eq!(r.data(), &data[..], "{what}: data of {oid}");
        let got: Vec<u64> = r.refs().map(|o| o.0).collect();
        assert_eq!(&got, refs, "{what}: refs of {oid}");
    }
    let check = s.check_references().unwrap();
    assert!(check.is_clean(), "{what}: {check:?}");
    s.close().unwrap();
}

#[derive(Debug, Clone)]
enum Op {
    /// Write these objects (indexes into a pool of 12) with these data bytes.
    Commit(Vec<(usize, u8)>),
    Checkpoint,
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => proptest::collection::vec((0usize..12, any::<u8>()), 1..5).prop_map(Op::Commit),
        1 => Just(Op::Checkpoint),
        2 => Just(Op::Crash),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Random commits, checkpoints and crashes (the run goes on from the
    /// replayed copy); after each crash the copy, reopened, equals the model
    /// of every acknowledged commit, and so does a crash image taken right
    /// after the replay.
    #[test]
    fn crash_images_replay_to_the_model(ops in proptest::collection::vec(op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let mut path = dir.path().join("s.redb");
        let mut s = RedbStorage::open(&path, options()).unwrap();
        let pool: Vec<u64> = s.new_oids(13).unwrap().into_iter().map(|o| o.0).collect();
        prop_assert_eq!(pool[0], 0);
        let pool = &pool[1..];
        let mut model = Model::new();
        // Every pool object exists from the start (oids handed out but not
        // stored are forgotten by a crash), each referencing the next.
        let mut first: Vec<(u64, Vec<u8>, Vec<u64>)> = pool
            .iter()
            .enumerate()
            .map(|(i, &o)| (o, vec![0], vec![pool[(i + 1) % pool.len()]]))
            .collect();
        first.insert(0, (0, b"root".to_vec(), pool.to_vec()));
        commit(&mut s, &mut model, &first);
        let mut crashes = 0;
        for op in ops {
            match op {
                Op::Commit(writes) => {
                    let mut w: Vec<(u64, Vec<u8>, Vec<u64>)> = writes
                        .iter()
                        .map(|&(i, b)| (pool[i], vec![b; 1 + b as usize % 7], vec![pool[(i + 1) % pool.len()]]))
                        .collect();
                    w.sort_by_key(|x| x.0);
                    w.dedup_by_key(|x| x.0);
                    commit(&mut s, &mut model, &w);
                }
                Op::Checkpoint => s.checkpoint().unwrap(),
                Op::Crash => {
                    crashes += 1;
                    let image = crash_image(&path, dir.path(), &format!("crash{crashes}.redb"));
                    let spare = crash_image(&image, dir.path(), &format!("spare{crashes}.redb"));
                    drop(s);
                    // Replaying the same image twice gives the same store.
                    assert_matches(&spare, &model, "a second replay of the same image");
                    // Crash right after a replay: the replayed state is durable.
                    {
                        let replayed = RedbStorage::open(&image, options()).unwrap();
                        let again = crash_image(&image, dir.path(), &format!("again{crashes}.redb"));
                        drop(replayed);
                        assert_matches(&again, &model, "a crash right after a replay");
                    }
                    path = image;
                    s = RedbStorage::open(&path, options()).unwrap();
                }
            }
        }
        drop(s);
        assert_matches(&path, &model, "the end of the run");
    }
}

/// Commits `n` single-object commits (object i holds byte i) under a root
/// that references them all, and returns a crash image.
fn image_after(dir: &Path, n: u8) -> (PathBuf, Vec<Oid>) {
    let path = dir.join("s.redb");
    let mut s = RedbStorage::open(&path, options()).unwrap();
    assert_eq!(s.new_oid().unwrap(), Oid::ROOT);
    let oids = s.new_oids(n as usize).unwrap();
    s.begin();
    s.store(
        Oid::ROOT,
        Record::new(Oid::ROOT, b"root", &oids).into_bytes(),
    )
    .unwrap();
    for &o in &oids {
        s.store(o, Record::new(o, b"-", &[]).into_bytes()).unwrap();
    }
    s.end().unwrap();
    s.checkpoint().unwrap();
    for (i, &o) in oids.iter().enumerate() {
        s.begin();
        s.store(o, Record::new(o, &[i as u8], &[]).into_bytes())
            .unwrap();
        s.end().unwrap();
    }
    let image = crash_image(&path, dir, "image.redb");
    drop(s);
    (image, oids)
}

/// Entry offsets (start, end) in a segment, read by the documented layout.
fn entries(segment: &[u8]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    // The header: 32 bytes in version 2 (16 in version 1).
    assert_eq!(&segment[..8], b"DRLOG\0\0\0");
    let mut at = match u32::from_le_bytes(segment[8..12].try_into().unwrap()) {
        1 => 16,
        2 => 32,
        v => panic!("segment version {v}"),
    };
    while at + 20 <= segment.len() {
        let len = u32::from_le_bytes(segment[at..at + 4].try_into().unwrap()) as usize;
        let seq = u64::from_le_bytes(segment[at + 4..at + 12].try_into().unwrap());
        if len == 0 && seq == 0 {
            break;
        }
        out.push((at, at + 20 + len));
        at += 20 + len;
    }
    out
}

fn only_segment(image: &Path) -> PathBuf {
    let mut segs: Vec<PathBuf> = std::fs::read_dir(log_dir(image))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    segs.sort();
    assert_eq!(segs.len(), 1, "{segs:?}");
    segs.pop().unwrap()
}

/// How many of the single-object commits the reopened store holds (object i
/// holds byte i once its commit is in).
fn commits_present(path: &Path, oids: &[Oid]) -> usize {
    let mut s = RedbStorage::open(path, options()).unwrap();
    let n = oids
        .iter()
        .enumerate()
        .take_while(|&(i, &o)| s.load(o).unwrap().data() == [i as u8])
        .count();
    for &o in &oids[n..] {
        assert_eq!(
            s.load(o).unwrap().data(),
            b"-",
            "no commit after the first missing one"
        );
    }
    assert!(s.check_references().unwrap().is_clean());
    s.close().unwrap();
    n
}

#[test]
fn a_clean_log_replays_every_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    assert_eq!(
        entries(&std::fs::read(only_segment(&image)).unwrap()).len(),
        6
    );
    assert_eq!(commits_present(&image, &oids), 6);
    assert!(!log_dir(&image).exists(), "a clean close removes the log");
}

#[test]
fn a_torn_last_entry_is_dropped_and_every_earlier_one_replays() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    let seg = only_segment(&image);
    let data = std::fs::read(&seg).unwrap();
    let e = entries(&data);
    let (start, end) = e[5];
    for cut in [start + 1, start + 4, start + 12, start + 20, end - 1] {
        let case = dir.path().join(format!("cut{cut}.redb"));
        let case = {
            let c = crash_image(
                &image,
                dir.path(),
                case.file_name().unwrap().to_str().unwrap(),
            );
            let s = only_segment(&c);
            let mut torn = data[..cut].to_vec();
            // What a crash leaves after the tear: the file's old zeros, or nothing.
            if cut % 2 == 0 {
                torn.resize(data.len(), 0);
            }
            std::fs::write(&s, torn).unwrap();
            c
        };
        assert_eq!(commits_present(&case, &oids), 5, "cut at {cut}");
    }
}

/// The log at `path` is damaged before its end: an open is refused with
/// an error naming the damage, a check reports it, a read-only open
/// refuses too; `check --repair` gives up the commits after the damage,
/// names them, and keeps the log aside. Returns how many of the commits
/// are then present.
fn refused_then_repaired(path: &Path, oids: &[Oid], what: &str) -> usize {
    let err = RedbStorage::open(path, options()).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::DamagedLog { .. } | StorageError::MissingLog { .. }
        ),
        "{what}: {err:?}"
    );
    assert!(err.to_string().contains("check --repair"), "{what}: {err}");
    assert!(RedbStorage::open_read_only(path).is_err(), "{what}");
    let check = check_store(path).unwrap();
    let damage = check
        .log_damage
        .clone()
        .unwrap_or_else(|| panic!("{what}: check found no damage"));
    assert!(!damage.is_empty());
    // Refusing changed nothing the next open depends on: refused again.
    assert!(
        RedbStorage::open(path, options()).is_err(),
        "{what}: refused once only"
    );
    let repaired = repair_store(path).unwrap();
    assert!(
        repaired.log_damage.is_some(),
        "{what}: the repair did not say what it gave up"
    );
    assert!(repaired.references.is_clean(), "{what}: {repaired:?}");
    if matches!(err, StorageError::DamagedLog { .. }) {
        assert!(
            set_aside(path).is_some(),
            "{what}: the damaged log was not kept"
        );
    }
    commits_present(path, oids)
}

#[test]
fn a_corrupt_entry_followed_by_entries_refuses_the_open_and_repair_keeps_the_commits_before_it() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    let data = std::fs::read(only_segment(&image)).unwrap();
    let e = entries(&data);
    // A flipped byte in the payload, the sequence number, or the checksum of
    // entry 3, with entries 4 and 5 intact after it.
    let (start, end) = e[3];
    for at in [start + 24, start + 5, end - 2] {
        let c = crash_image(&image, &dir.path().join(format!("flip{at}")), "s.redb");
        let s = only_segment(&c);
        let mut bad = data.clone();
        bad[at] ^= 0x40;
        std::fs::write(&s, bad).unwrap();
        assert_eq!(
            refused_then_repaired(&c, &oids, &format!("flip at {at}")),
            3
        );
    }
}

#[test]
fn a_zeroed_entry_or_header_in_the_middle_is_damage_not_an_end() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    let data = std::fs::read(only_segment(&image)).unwrap();
    let e = entries(&data);
    let (start, end) = e[2];
    for (name, from, to) in [("entry", start, end), ("header", start, start + 12)] {
        let c = crash_image(&image, &dir.path().join(name), "s.redb");
        let mut bad = data.clone();
        bad[from..to].fill(0);
        std::fs::write(only_segment(&c), bad).unwrap();
        let err = RedbStorage::open(&c, options()).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("zeros from offset") || msg.contains("cut short"),
            "{name}: {msg}"
        );
        assert!(msg.contains("intact entries"), "{name}: {msg}");
        assert_eq!(refused_then_repaired(&c, &oids, name), 2, "{name}");
    }
}

#[test]
fn a_read_only_open_refuses_an_unapplied_log_check_counts_it_and_repair_applies_it() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 4);
    // redb itself needs a repair after the crash, or the log holds commits
    // the file lacks: either way a read-only open refuses and says to open
    // it for writing once.
    let err = RedbStorage::open_read_only(&image).unwrap_err();
    assert!(
        matches!(
            err,
            StorageError::UnappliedLog { commits: 4, .. } | StorageError::NeedsRepair { .. }
        ),
        "{err:?}"
    );
    assert!(
        err.to_string().contains("open it for writing")
            || err.to_string().contains("open it read-write"),
        "{err}"
    );
    // A check reads only: it counts the waiting commits and leaves them.
    let check = check_store(&image).unwrap();
    assert!(check.integrity_ok && check.references.is_clean());
    assert_eq!(check.unapplied_log_commits, 4);
    assert!(RedbStorage::open_read_only(&image).is_err());
    let check = repair_store(&image).unwrap();
    assert!(check.integrity_ok && check.references.is_clean());
    let mut r = RedbStorage::open_read_only(&image).unwrap();
    for (i, &o) in oids.iter().enumerate() {
        assert_eq!(r.load(o).unwrap().data(), [i as u8]);
    }
}

/// The log directory set aside by a replay that met damage before the log's
/// end, if there is one.
fn set_aside(image: &Path) -> Option<PathBuf> {
    let prefix = format!(
        "{}.damaged-",
        log_dir(image).file_name().unwrap().to_string_lossy()
    );
    std::fs::read_dir(image.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
}

#[test]
fn damage_inside_the_log_refuses_the_open_and_a_torn_tail_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    let data = std::fs::read(only_segment(&image)).unwrap();
    let e = entries(&data);
    // Entry 2 damaged, entries 3..5 intact after it: damage.
    let c = crash_image(&image, &dir.path().join("d1"), "mid.redb");
    let mut bad = data.clone();
    bad[e[2].0 + 24] ^= 0x01;
    std::fs::write(only_segment(&c), bad).unwrap();
    assert_eq!(refused_then_repaired(&c, &oids, "entry 2 damaged"), 2);
    // The last entry torn: a tail, nothing kept, nothing refused.
    let t = crash_image(&image, &dir.path().join("d2"), "tail.redb");
    std::fs::write(only_segment(&t), &data[..e[5].0 + 7]).unwrap();
    assert!(check_store(&t).unwrap().log_damage.is_none());
    assert_eq!(commits_present(&t, &oids), 5);
    assert!(set_aside(&t).is_none());
}

#[test]
fn segments_swapped_removed_or_copied_are_damage() {
    // One segment of 6 entries, split in two as a checkpoint's switch would
    // have: the second segment's header names its number and first commit.
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 6);
    let seg = only_segment(&image);
    let data = std::fs::read(&seg).unwrap();
    let e = entries(&data);
    let number: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    let first_seq = |at: usize| u64::from_le_bytes(data[at + 4..at + 12].try_into().unwrap());
    let mut one = data[..e[3].0].to_vec();
    one.resize(data.len(), 0);
    let mut two = data[..32].to_vec();
    two[16..24].copy_from_slice(&(number + 1).to_le_bytes());
    two[24..32].copy_from_slice(&first_seq(e[3].0).to_le_bytes());
    two.extend_from_slice(&data[e[3].0..e[5].1]);
    two.resize(data.len(), 0);
    let name = |n: u64| format!("{n:020}.seg");
    let split = |case: &str| {
        let c = crash_image(&image, &dir.path().join(case), "s.redb");
        std::fs::remove_file(only_segment(&c)).unwrap();
        c
    };
    // The split itself is a whole log: every commit replays.
    let whole = split("whole");
    std::fs::write(log_dir(&whole).join(name(number)), &one).unwrap();
    std::fs::write(log_dir(&whole).join(name(number + 1)), &two).unwrap();
    assert_eq!(commits_present(&whole, &oids), 6);
    // Swapped names.
    let swapped = split("swapped");
    std::fs::write(log_dir(&swapped).join(name(number)), &two).unwrap();
    std::fs::write(log_dir(&swapped).join(name(number + 1)), &one).unwrap();
    assert_eq!(refused_then_repaired(&swapped, &oids, "swapped"), 0);
    // The first half missing.
    let missing = split("missing");
    std::fs::write(log_dir(&missing).join(name(number + 1)), &two).unwrap();
    assert_eq!(refused_then_repaired(&missing, &oids, "missing"), 0);
    // The second half copied in as a third segment.
    let copied = split("copied");
    std::fs::write(log_dir(&copied).join(name(number)), &one).unwrap();
    std::fs::write(log_dir(&copied).join(name(number + 1)), &two).unwrap();
    std::fs::write(log_dir(&copied).join(name(number + 2)), &two).unwrap();
    assert_eq!(refused_then_repaired(&copied, &oids, "copied"), 6);
}

#[test]
fn a_missing_log_after_an_unclean_close_is_refused_and_after_a_clean_one_is_not() {
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 4);
    std::fs::remove_dir_all(log_dir(&image)).unwrap();
    let err = RedbStorage::open(&image, options()).unwrap_err();
    assert!(matches!(err, StorageError::MissingLog { .. }), "{err:?}");
    assert!(err.to_string().contains("is missing"), "{err}");
    // The checkpoint before the commits holds them at "-": repair opens
    // without the log and says what it gave up.
    assert_eq!(refused_then_repaired(&image, &oids, "log removed"), 0);
    // After a clean close there is no log, and none is wanted.
    let mut s = RedbStorage::open(&image, options()).unwrap();
    s.close().unwrap();
    assert!(!log_dir(&image).exists());
    assert!(check_store(&image).unwrap().log_damage.is_none());
    RedbStorage::open(&image, options())
        .unwrap()
        .close()
        .unwrap();
}

#[test]
fn a_segment_truncated_replaced_or_removed_under_an_open_store_fails_the_next_commit() {
    for case in ["truncated", "replaced", "removed"] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        let mut s = RedbStorage::open(&path, options()).unwrap();
        assert_eq!(s.new_oid().unwrap(), Oid::ROOT);
        let commit = |s: &mut RedbStorage, data: &[u8]| {
            s.begin();
            s.store(Oid::ROOT, Record::new(Oid::ROOT, data, &[]).into_bytes())?;
            s.end()
        };
        commit(&mut s, b"one").unwrap();
        let log = log_dir(&path);
        let seg = std::fs::read_dir(&log)
            .unwrap()
            .map(|e| e.unwrap().path())
            .max()
            .unwrap();
        match case {
            "truncated" => std::fs::OpenOptions::new()
                .write(true)
                .open(&seg)
                .unwrap()
                .set_len(32)
                .unwrap(),
            "replaced" => {
                let data = std::fs::read(&seg).unwrap();
                std::fs::remove_file(&seg).unwrap();
                std::fs::write(&seg, data).unwrap();
            }
            _ => std::fs::remove_dir_all(&log).unwrap(),
        }
        // A sync finds it within 10 ms: commits go on until one is refused.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let err = loop {
            match commit(&mut s, b"two") {
                Ok(()) => assert!(
                    std::time::Instant::now() < deadline,
                    "{case}: never refused"
                ),
                Err(e) => break e,
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        };
        assert!(
            err.to_string().contains("commit log segment"),
            "{case}: {err}"
        );
        // Poisoned: nothing more is acknowledged.
        assert!(commit(&mut s, b"three").is_err(), "{case}");
        drop(s);
    }
}

/// A segment the last checkpoint made redundant is still there (a crash
/// came between the checkpoint and its deletion) and has a damaged entry:
/// the next segment goes on from where it stops, so nothing is lost.
#[test]
fn a_damaged_segment_that_was_already_applied_does_not_stop_the_replay() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let mut s = RedbStorage::open(&path, options()).unwrap();
    assert_eq!(s.new_oid().unwrap(), Oid::ROOT);
    let oids = s.new_oids(6).unwrap();
    s.begin();
    s.store(
        Oid::ROOT,
        Record::new(Oid::ROOT, b"root", &oids).into_bytes(),
    )
    .unwrap();
    for &o in &oids {
        s.store(o, Record::new(o, b"-", &[]).into_bytes()).unwrap();
    }
    s.end().unwrap();
    let commit = |s: &mut RedbStorage, i: usize| {
        s.begin();
        s.store(oids[i], Record::new(oids[i], &[i as u8], &[]).into_bytes())
            .unwrap();
        s.end().unwrap();
    };
    for i in 0..3 {
        commit(&mut s, i);
    }
    // The first segment, as it was before the checkpoint deleted it.
    let early = crash_image(&path, &dir.path().join("early"), "s.redb");
    s.checkpoint().unwrap();
    for i in 3..6 {
        commit(&mut s, i);
    }
    let late = crash_image(&path, &dir.path().join("late"), "s.redb");
    drop(s);
    let old_segment = only_segment(&early);
    let mut old = std::fs::read(&old_segment).unwrap();
    let e = entries(&old);
    old[e[1].0 + 24] ^= 0x01;
    std::fs::write(log_dir(&late).join(old_segment.file_name().unwrap()), old).unwrap();
    assert_eq!(commits_present(&late, &oids), 6);
    assert!(set_aside(&late).is_none());
}

/// A crash under durus-redb 0.5 leaves a version 1 log (a 16-byte segment
/// header without the segment's number and first commit): the next open
/// replays it, and the log it starts is version 2.
#[test]
fn a_version_1_log_left_by_an_older_build_replays() {
    // The segment of `image`, rewritten with a version 1 header.
    let as_version_1 = |image: &Path| -> (PathBuf, Vec<u8>) {
        let seg = only_segment(image);
        let data = std::fs::read(&seg).unwrap();
        let mut v1 = b"DRLOG\0\0\0".to_vec();
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&0u32.to_le_bytes());
        v1.extend_from_slice(&data[32..]);
        (seg, v1)
    };
    let dir = tempfile::tempdir().unwrap();
    let (image, oids) = image_after(dir.path(), 5);
    let (seg, v1) = as_version_1(&image);
    std::fs::write(&seg, &v1).unwrap();
    assert_eq!(entries(&v1).len(), 5);
    let s = RedbStorage::open(&image, options()).unwrap();
    let now = std::fs::read(only_segment(&image)).unwrap();
    assert_eq!(u32::from_le_bytes(now[8..12].try_into().unwrap()), 2);
    drop(s);
    assert_eq!(commits_present(&image, &oids), 5);
    // Damage in a version 1 log is found as in version 2.
    let damaged = dir.path().join("damaged");
    std::fs::create_dir(&damaged).unwrap();
    let (image, oids) = image_after(&damaged, 5);
    let (seg, mut v1) = as_version_1(&image);
    let e = entries(&v1);
    v1[e[1].0..e[1].1].fill(0);
    std::fs::write(&seg, &v1).unwrap();
    assert_eq!(refused_then_repaired(&image, &oids, "version 1, zeroed"), 1);
}
