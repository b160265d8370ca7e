//! The command line against real files: stats, check, exclusive access.

use std::process::Command;

use durus_redb::{Oid, Options, Record, RedbStorage, Storage};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_durus-redb"))
}

fn small_store(path: &std::path::Path) {
    let mut s = RedbStorage::open(path, Options::default()).unwrap();
    let root = s.new_oid().unwrap();
    let oids = s.new_oids(200).unwrap();
    s.begin();
    for &o in &oids {
        s.store(o, Record::new(o, &[b'x'; 300], &[]).into_bytes())
            .unwrap();
    }
    s.store(root, Record::new(root, b"root", &oids).into_bytes())
        .unwrap();
    s.end().unwrap();
    s.close().unwrap();
}

#[test]
fn stats_and_check_report_a_healthy_store() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    small_store(&path);
    let out = bin().arg("stats").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("objects:          201"), "{text}");
    assert!(text.contains("format version:   3"), "{text}");
    let out = bin().arg("check").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("result:     clean"), "{text}");
}

#[test]
fn a_second_process_gets_a_clear_error_while_the_store_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    small_store(&path);
    let held = RedbStorage::open(&path, Options::default()).unwrap();
    for cmd in ["stats", "check"] {
        let out = bin().arg(cmd).arg(&path).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("already open"), "{cmd}: {err}");
    }
    drop(held);
    assert!(
        bin()
            .arg("check")
            .arg(&path)
            .output()
            .unwrap()
            .status
            .success()
    );
}

#[test]
fn check_and_stats_refuse_foreign_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let foreign = dir.path().join("data.durus");
    std::fs::write(&foreign, b"SHELF-1\n\0\0\0\0\0\0\0\0").unwrap();
    for cmd in ["stats", "check"] {
        let out = bin().arg(cmd).arg(&foreign).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("not a durus-redb store"), "{cmd}: {err}");
        let out = bin()
            .arg(cmd)
            .arg(dir.path().join("missing.redb"))
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2));
        assert!(String::from_utf8_lossy(&out.stderr).contains("does not exist"));
    }
    assert!(
        !dir.path().join("missing.redb").exists(),
        "check must not create a store"
    );
}

#[test]
fn check_finds_a_damaged_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    small_store(&path);
    // Overwrite record bytes in the middle of the file: redb's checksums or
    // our record validation must notice.
    let mut bytes = std::fs::read(&path).unwrap();
    let needle = [b'x'; 64];
    let at = bytes
        .windows(64)
        .position(|w| w == needle)
        .expect("record data in the file");
    for b in &mut bytes[at..at + 64] {
        *b = b'y';
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = bin().arg("check").arg(&path).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "check passed a damaged file: {text}");
    // The check only read: the damaged file is exactly as it was, so the
    // other tools see it as before, and the advice names what helps.
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "check wrote to the file"
    );
    assert!(
        text.contains("backup") || text.contains("--repair"),
        "no advice: {text}"
    );
    println!("{text}");
}

/// A damaged page header makes redb panic when it opens the file: every
/// command says the file is probably damaged and exits 2, never with a
/// Rust panic's exit code 101.
#[test]
fn a_damaged_page_header_gives_a_clear_error_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    small_store(&path);
    let mut bytes = std::fs::read(&path).unwrap();
    let at = bytes
        .windows(64)
        .position(|w| w == [b'x'; 64])
        .expect("record data in the file");
    let page = at & !4095;
    for b in &mut bytes[page..page + 64] {
        *b = 0xFF;
    }
    std::fs::write(&path, &bytes).unwrap();
    let out = bin().arg("check").arg(&path).output().unwrap();
    assert!(!out.status.success());
    assert!(
        std::fs::read(&path).unwrap() == bytes,
        "check wrote to the file"
    );
    for cmd in ["stats", "check", "export"] {
        let mut c = bin();
        c.arg(cmd).arg(&path);
        if cmd == "export" {
            c.arg(dir.path().join("out.durus"));
        }
        let out = c.output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{cmd} passed a damaged file");
        assert_ne!(out.status.code(), Some(101), "{cmd} panicked: {err}");
        if !err.contains("durus-redb: internal error") {
            // Refused without a panic: a clear message of its own.
            assert!(err.contains("durus-redb:"), "{cmd}: {err}");
        } else {
            assert!(err.contains("probably damaged"), "{cmd}: {err}");
        }
    }
}

#[test]
fn many_threads_commit_at_once_and_nothing_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let mut main = RedbStorage::open(&path, Options::default()).unwrap();
    let root = main.new_oid().unwrap();
    main.begin();
    main.store(root, Record::new(root, b"root", &[]).into_bytes())
        .unwrap();
    main.end().unwrap();
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let mut s = main.new_session();
            std::thread::spawn(move || {
                let mut mine = Vec::new();
                for i in 0..50u32 {
                    let o = s.new_oid().unwrap();
                    let prev: Vec<Oid> = mine.last().copied().into_iter().collect();
                    s.begin();
                    s.store(o, Record::new(o, &[t as u8, i as u8], &prev).into_bytes())
                        .unwrap();
                    s.end().unwrap();
                    mine.push(o);
                }
                mine
            })
        })
        .collect();
    let all: Vec<Oid> = threads
        .into_iter()
        .flat_map(|h| h.join().unwrap())
        .collect();
    assert_eq!(all.len(), 400);
    main.close().unwrap();
    let mut s = RedbStorage::open(&path, Options::default()).unwrap();
    for o in &all {
        s.load(*o).unwrap();
    }
    let unique: std::collections::HashSet<_> = all.iter().collect();
    assert_eq!(unique.len(), 400, "an oid was handed out twice");
    assert!(s.check_references().unwrap().is_clean());
}

/// Wrong reference counts, including one for an oid far above every record
/// (a later pass of the recount), and a dangling reference, are all found.
#[test]
fn check_recounts_every_reference_and_finds_wrong_counts() {
    use redb::{ReadableTable, TableDefinition};
    const COUNTS: TableDefinition<u64, u64> = TableDefinition::new("durus_refcounts");
    const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("durus_records");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    small_store(&path);
    let out = bin().arg("check").arg(&path).output().unwrap();
    assert!(out.status.success());
    {
        let db = redb::Database::open(&path).unwrap();
        let w = db.begin_write().unwrap();
        {
            let mut counts = w.open_table(COUNTS).unwrap();
            let first = counts.first().unwrap().unwrap().0.value();
            counts.insert(first, 7).unwrap();
            counts.insert(50_000_000, 1).unwrap();
            let mut records = w.open_table(RECORDS).unwrap();
            let old = records.get(0).unwrap().unwrap().value().to_vec();
            let mut refs: Vec<Oid> = Record::from_bytes(old).unwrap().refs().collect();
            refs.push(Oid(9_000_000));
            let root = Record::new(Oid(0), b"root", &refs);
            records.insert(0, root.as_bytes()).unwrap();
        }
        w.commit().unwrap();
    }
    let out = bin().arg("check").arg(&path).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("has count 7"), "{text}");
    assert!(
        text.contains("oid 50000000 has count 1, recount says 0"),
        "{text}"
    );
    assert!(text.contains("references missing oid 9000000"), "{text}");
    assert!(
        text.contains("oid 9000000 has count 0, recount says 1"),
        "{text}"
    );
}
