//! Migration and export against stores written by the real Python Durus 4.3
//! in this test run, through the real `durus-redb` binary.
//!
//! Needs `DURUS_PYTHON` (a Python with Durus 4.3); fails without it.

mod common;
use common::OutputWithin;

use common::{python, script};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use durus_redb::{
    MemoryStorage, MigrateError, MigrateOptions, Oid, Options, Record, RedbStorage, ShelfWriter,
    Storage, migrate, migrate_storage,
};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_durus-redb"))
}

/// The stores Durus wrote (FileStorage, FileStorage2, SqliteStorage), once per run.
fn durus_files() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        common::make_durus_files(
            Path::new(env!("CARGO_TARGET_TMPDIR")),
            "migrate-durus-files",
        )
    })
}

fn durus_store(name: &str) -> PathBuf {
    durus_files().join(format!("{name}.durus"))
}

/// A `oid | u32 len | record` dump written by make_durus_files.py.
fn read_dump(path: &Path) -> BTreeMap<u64, Vec<u8>> {
    let bytes = std::fs::read(path).unwrap();
    let mut m = BTreeMap::new();
    let mut i = 0;
    while i < bytes.len() {
        let oid = u64::from_be_bytes(bytes[i..i + 8].try_into().unwrap());
        let n = u32::from_be_bytes(bytes[i + 8..i + 12].try_into().unwrap()) as usize;
        m.insert(oid, bytes[i + 12..i + 12 + n].to_vec());
        i += 12 + n;
    }
    m
}

/// Every record of a durus-redb store.
fn contents(path: &Path) -> BTreeMap<u64, Vec<u8>> {
    let mut s = RedbStorage::open_read_only(path).unwrap();
    s.iter_records()
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            (r.oid().0, r.into_bytes())
        })
        .collect()
}

fn run(cmd: &mut Command) -> Output {
    cmd.output_within(common::LIMIT)
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn check_clean(path: &Path) {
    let out = run(bin().arg("check").arg(path));
    assert!(out.status.success(), "check failed: {}", text(&out));
}

/// Runs compare_stores.py: ORIGINAL against `other` args; must be identical.
fn compare(original: &Path, other: &[&str]) {
    let out = Command::new(python())
        .arg(script("compare_stores.py"))
        .arg(original)
        .args(other)
        .arg("--classes")
        .arg(script("make_durus_files.py"))
        .output_within(common::LIMIT);
    let t = text(&out);
    assert!(out.status.success(), "compare_stores.py: {t}");
    assert!(t.contains("\"identical\": true"), "{t}");
}

/// Kills a child process when dropped (a failed assertion included).
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Serves `store` with the real server and runs `f(port)`; stops it with Q.
fn serving(store: &Path, f: impl FnOnce(u16)) {
    serving_args(&["--file", store.to_str().unwrap()], f)
}

/// Serves what `what` names (`--file PATH`, `--database URL`) and runs
/// `f(port)`; stops it with Q.
fn serving_args(what: &[&str], f: impl FnOnce(u16)) {
    let mut child = KillOnDrop(
        bin()
            .arg("serve")
            .args(what)
            .args(["--port", "0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let child_stderr = child.0.stderr.take().unwrap();
    let mut lines = BufReader::new(child_stderr).lines();
    let port = loop {
        let line = lines.next().expect("server log").unwrap();
        if let Some(port) = common::ready_port(&line) {
            break port;
        }
    };
    std::thread::spawn(move || for _ in lines {});
    f(port);
    let out = run(bin().args(["stop", "--port", &port.to_string()]));
    assert!(out.status.success(), "{}", text(&out));
    assert!(common::wait_within(&mut child.0, common::LIMIT).success());
}

#[test]
fn durus_stores_migrate_serve_and_export_identically() {
    for name in ["shelf", "dfs20", "sqlite"] {
        let source = durus_store(name);
        let dir = tempfile::tempdir().unwrap();
        let dest = dir.path().join(format!("{name}.redb"));
        let out = run(bin()
            .arg("migrate")
            .arg(&source)
            .arg(&dest)
            .args(["--batch-records", "700"]));
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(text(&out).contains("verified"), "{}", text(&out));
        check_clean(&dest);

        // Every record Durus holds, and nothing else.
        let want = read_dump(&durus_files().join(format!("{name}.durus.dump")));
        assert_eq!(contents(&dest), want, "{name}: records differ");

        // New oids continue above the highest imported one.
        let max = *want.keys().max().unwrap();
        {
            let mut s = RedbStorage::open(&dest, Options::default()).unwrap();
            assert!(s.new_oid().unwrap().0 > max);
        }

        // The real Durus client, through our server, reads every reachable
        // object exactly as Durus reads the original.
        serving(&dest, |port| {
            compare(&source, &["--port", &port.to_string()])
        });

        // Round trip: export, and Durus opens the exported file identically.
        let back = dir.path().join(format!("{name}-back.durus"));
        let out = run(bin().arg("export").arg(&dest).arg(&back));
        assert!(out.status.success(), "{}", text(&out));
        compare(&source, &["--file", back.to_str().unwrap()]);
    }
}

#[test]
fn a_migration_killed_at_random_moments_resumes_to_the_same_store() {
    let source = durus_store("shelf");
    let dir = tempfile::tempdir().unwrap();
    let reference = dir.path().join("reference.redb");
    let out = run(bin()
        .arg("migrate")
        .arg(&source)
        .arg(&reference)
        .args(["--batch-records", "40"]));
    assert!(out.status.success(), "{}", text(&out));
    let want = contents(&reference);

    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut kills = 0;
    for round in 0..4 {
        let dest = dir.path().join(format!("killed-{round}.redb"));
        // Kill it again and again until a run completes.
        let mut runs = 0;
        loop {
            runs += 1;
            assert!(runs < 200, "migration never completed");
            let errors = dir.path().join("stderr.txt");
            let mut child = bin()
                .arg("migrate")
                .arg(&source)
                .arg(&dest)
                .args(["--batch-records", "40"])
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&errors).unwrap())
                .spawn()
                .unwrap();
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            // Each kill of a round comes a little later than the last, so
            // that a round ends however slow the machine (the last phase,
            // the repack, runs whole in one run); the first ones fall at
            // random within the import.
            let wait = Duration::from_millis(5 + seed % 120 + 20 * runs);
            let deadline = Instant::now() + wait;
            let mut finished = None;
            while Instant::now() < deadline {
                if let Some(s) = child.try_wait().unwrap() {
                    finished = Some(s);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            match finished {
                Some(status) => {
                    assert!(
                        status.success(),
                        "a rerun failed with {status}: {}",
                        std::fs::read_to_string(&errors).unwrap_or_default()
                    );
                    break;
                }
                None => {
                    child.kill().unwrap();
                    child.wait().unwrap();
                    kills += 1;
                }
            }
        }
        check_clean(&dest);
        assert_eq!(contents(&dest), want, "round {round}: the store differs");
    }
    assert!(
        kills >= 4,
        "only {kills} kills: the test did not interrupt anything"
    );
}

#[test]
fn an_unfinished_migration_is_refused_by_other_opens_and_resumed_by_migrate() {
    let source = durus_store("dfs20");
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("d.redb");
    // Stop a library migration after its first batches by failing progress.
    let mut options = MigrateOptions::default();
    options.batch_records = 100;
    let outcome = std::panic::catch_unwind(|| {
        let mut batches = 0;
        let _ = migrate(&source, &dest, &options, &mut |_| {
            batches += 1;
            if batches == 5 {
                panic!("interrupted");
            }
        });
    });
    assert!(outcome.is_err());
    let err = RedbStorage::open(&dest, Options::default()).unwrap_err();
    assert!(err.to_string().contains("unfinished import"), "{err}");
    // Another source is refused.
    let other = durus_store("shelf");
    let err = migrate(&other, &dest, &options, &mut |_| {}).unwrap_err();
    assert!(matches!(err, MigrateError::Refused(_)), "{err}");
    // The same source resumes and completes.
    let report = migrate(&source, &dest, &options, &mut |_| {}).unwrap();
    assert!(report.resumed_from.is_some());
    let want = read_dump(&durus_files().join("dfs20.durus.dump"));
    assert_eq!(contents(&dest), want);
    // Rerunning a finished migration does nothing; another source is refused.
    let again = migrate(&source, &dest, &options, &mut |_| {}).unwrap();
    assert!(again.already_complete);
    assert_eq!(again.objects, report.objects);
    let err = migrate(&other, &dest, &options, &mut |_| {}).unwrap_err();
    assert!(err.to_string().contains("already holds a store"), "{err}");
    // Once clients committed to the store, a rerun says it changed.
    {
        let mut s = RedbStorage::open(&dest, Options::default()).unwrap();
        let root = s.load(Oid::ROOT).unwrap();
        s.begin();
        let refs: Vec<Oid> = root.refs().collect();
        s.store(
            Oid::ROOT,
            Record::new(Oid::ROOT, b"changed", &refs).into_bytes(),
        )
        .unwrap();
        s.end().unwrap();
        s.close().unwrap();
    }
    let err = migrate(&source, &dest, &options, &mut |_| {}).unwrap_err();
    assert!(matches!(err, MigrateError::Refused(_)), "{err}");
    assert!(err.to_string().contains("changed since"), "{err}");
    assert!(err.to_string().contains("new file"), "{err}");
    // A durus-redb store given as the source is named as one.
    let out = run(bin()
        .arg("migrate")
        .arg(&dest)
        .arg(dir.path().join("z.redb")));
    assert!(!out.status.success());
    assert!(
        text(&out).contains("already a durus-redb store"),
        "{}",
        text(&out)
    );
    assert!(!dir.path().join("z.redb").exists());
}

#[test]
fn a_torn_tail_is_named_and_can_be_left_out() {
    let source = durus_store("shelf");
    let ends: Vec<u64> = std::fs::read_to_string(durus_files().join("shelf.durus.ends"))
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let (last_start, last_end) = (ends[ends.len() - 2], ends[ends.len() - 1]);
    let dir = tempfile::tempdir().unwrap();
    let torn = dir.path().join("torn.durus");
    let bytes = std::fs::read(&source).unwrap();
    assert_eq!(bytes.len() as u64, last_end);
    std::fs::write(
        &torn,
        &bytes[..(last_start + (last_end - last_start) / 2) as usize],
    )
    .unwrap();

    let dest = dir.path().join("t.redb");
    let out = run(bin().arg("migrate").arg(&torn).arg(&dest));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains(&format!("transaction that starts at byte {last_start}")),
        "{}",
        text(&out)
    );
    // Resumable: the same command with the option finishes the job.
    let out = run(bin()
        .arg("migrate")
        .arg(&torn)
        .arg(&dest)
        .arg("--accept-torn-tail"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains(&format!("torn tail:  ignored from byte {last_start}")));
    let want = read_dump(&durus_files().join("shelf.durus.before.dump"));
    assert_eq!(
        contents(&dest),
        want,
        "the store is Durus's state before the torn commit"
    );
    check_clean(&dest);
}

#[test]
fn corrupt_files_give_clear_errors_and_never_a_panic() {
    let source = durus_store("shelf");
    let bytes = std::fs::read(&source).unwrap();
    let dir = tempfile::tempdir().unwrap();
    // Find a record of oid 0 (the root) in the file: its item is
    // `u32 length | oid(8) | u32 data length | ...` (see the reader).
    let root_at = bytes
        .windows(12)
        .position(|w| w[..8] == [0u8; 8] && u32::from_be_bytes(w[8..12].try_into().unwrap()) > 0)
        .expect("a root record");
    let mut cases: Vec<(&str, Vec<u8>, &str)> = Vec::new();
    let mut bad_magic = bytes.clone();
    bad_magic[..7].copy_from_slice(b"SHELF-9");
    cases.push(("bad magic", bad_magic, "not a Durus storage file"));
    let mut mismatch = bytes.clone();
    mismatch[root_at + 7] = 0x55; // the record now names another oid
    cases.push(("oid mismatch", mismatch, "corrupt storage file"));
    let mut overrun = bytes.clone();
    overrun[root_at + 8..root_at + 12].copy_from_slice(&0x7fff_ffffu32.to_be_bytes());
    cases.push(("overrunning length", overrun, "corrupt storage file"));
    for (name, data, needle) in cases {
        let src = dir.path().join(format!("{name}.durus"));
        std::fs::write(&src, &data).unwrap();
        let dest = dir.path().join(format!("{name}.redb"));
        let out = run(bin().arg("migrate").arg(&src).arg(&dest));
        let t = text(&out);
        assert_eq!(out.status.code(), Some(1), "{name}: {t}");
        assert!(t.contains(needle), "{name}: {t}");
        assert!(!t.contains("panicked"), "{name}: {t}");
        // The destination is absent or resumable: a rerun fails the same way.
        if dest.exists() {
            let again = run(bin().arg("migrate").arg(&src).arg(&dest));
            assert_eq!(again.status.code(), Some(1), "{name}: {}", text(&again));
            assert!(text(&again).contains(needle));
        }
    }
}

#[test]
fn dangling_references_are_listed_and_imported_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("dangling.durus");
    let mut w = ShelfWriter::create(&src).unwrap();
    w.write(
        Oid(0),
        Record::new(Oid(0), b"root", &[Oid(1), Oid(7)]).as_bytes(),
    )
    .unwrap();
    w.write(Oid(1), Record::new(Oid(1), b"one", &[Oid(9)]).as_bytes())
        .unwrap();
    w.finish().unwrap();
    let dest = dir.path().join("d.redb");
    let out = run(bin().arg("migrate").arg(&src).arg(&dest));
    let t = text(&out);
    assert_eq!(out.status.code(), Some(1), "{t}");
    assert!(t.contains("2 references to oids it does not hold"), "{t}");
    assert!(t.contains("0 -> 7") && t.contains("1 -> 9"), "{t}");
    let out = run(bin()
        .arg("migrate")
        .arg(&src)
        .arg(&dest)
        .arg("--allow-dangling"));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("dangling:   2 references"));
    assert_eq!(contents(&dest).len(), 2);
}

#[test]
fn any_storage_migrates_through_the_library() {
    let mut source = MemoryStorage::new();
    let oids = source.new_oids(500).unwrap();
    source.begin();
    for (i, o) in oids.iter().enumerate() {
        let refs: Vec<Oid> = oids.get(i + 1).copied().into_iter().collect();
        source
            .store(*o, Record::new(*o, &[i as u8; 30], &refs).into_bytes())
            .unwrap();
    }
    source.end().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let dest = dir.path().join("m.redb");
    let mut options = MigrateOptions::default();
    options.batch_records = 64;
    let report = migrate_storage(&mut source, "memory", &dest, &options, &mut |_| {}).unwrap();
    assert_eq!(report.objects, 500);
    let got = contents(&dest);
    let want: BTreeMap<u64, Vec<u8>> = source
        .iter_records()
        .unwrap()
        .map(|r| {
            let r = r.unwrap();
            (r.oid().0, r.into_bytes())
        })
        .collect();
    assert_eq!(got, want);
    check_clean(&dest);
}

/// Runs `f` on a thread and fails the test if it has not finished within
/// `limit`: a guard against a hang, not a speed target.
fn within<T: Send + 'static>(limit: Duration, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(limit)
        .expect("hung: did not finish within the limit")
}

/// A tiny file whose records sit at the top of the oid range: the
/// migration's verification and `check` take time proportional to the
/// records, not to the oid range, and the store then refuses to hand out
/// oids (the root included) instead of wrapping around.
#[test]
fn records_at_the_top_of_the_oid_range_migrate_and_exhaust_allocation() {
    use durus_redb::InvalidInput;
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("top.durus");
    let far = Oid(1 << 50);
    let top = Oid(u64::MAX);
    // The initial transaction holds the root; a later transaction (as
    // Durus appends one) the two far records: `n | (len | oid | record)*`.
    let mut w = ShelfWriter::create(&src).unwrap();
    w.write(
        Oid::ROOT,
        Record::new(Oid::ROOT, b"root", &[far, top]).as_bytes(),
    )
    .unwrap();
    w.finish().unwrap();
    let mut items = Vec::new();
    for r in [
        Record::new(far, b"far", &[top]),
        Record::new(top, b"top", &[]),
    ] {
        items.extend_from_slice(&(r.len() as u64 + 8).to_be_bytes());
        items.extend_from_slice(&r.oid().to_bytes());
        items.extend_from_slice(r.as_bytes());
    }
    let mut file = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
    use std::io::Write;
    file.write_all(&(items.len() as u64).to_be_bytes()).unwrap();
    file.write_all(&items).unwrap();
    drop(file);
    let dest = dir.path().join("top.redb");
    let (s, d) = (src.clone(), dest.clone());
    let report = within(Duration::from_secs(60), move || {
        durus_redb::migrate(&s, &d, &MigrateOptions::default(), &mut |_| {})
    })
    .unwrap();
    assert_eq!(report.objects, 3);
    let d = dest.clone();
    let check = within(Duration::from_secs(60), move || {
        durus_redb::check_store(&d).unwrap()
    });
    assert_eq!(check.references.refs, 3);
    assert_eq!(check.references.mismatch_count, 0);
    let mut store = RedbStorage::open(&dest, Options::default()).unwrap();
    let err = store.new_oid().unwrap_err();
    assert!(
        matches!(
            err,
            durus_redb::StorageError::Invalid(InvalidInput::OidsExhausted { .. })
        ),
        "{err:?}"
    );
    assert_eq!(store.load(top).unwrap().data(), b"top");
    drop(store);

    // Into PostgreSQL (where an oid is a bigint, so the top half of the
    // range is negative): every record is imported, checked and counted;
    // export refuses, as from the store, since a Durus file's offset map
    // cannot hold such oids.
    let url = common::fresh_database("migrate_top");
    let out = run(bin().arg("migrate").arg(&src).arg(&url));
    assert!(out.status.success(), "{}", text(&out));
    let stored = database_contents(&url);
    let want: BTreeMap<u64, Vec<u8>> = [
        (Oid::ROOT, Record::new(Oid::ROOT, b"root", &[far, top])),
        (far, Record::new(far, b"far", &[top])),
        (top, Record::new(top, b"top", &[])),
    ]
    .into_iter()
    .map(|(o, r)| (o.0, r.as_bytes().to_vec()))
    .collect();
    assert_eq!(stored, want);
    let out = run(bin().arg("check").arg(&url));
    assert!(text(&out).contains("result:     clean"), "{}", text(&out));
    assert!(text(&out).contains("objects:    3"), "{}", text(&out));
    for from in [url.as_str(), dest.to_str().unwrap()] {
        let out = run(bin()
            .arg("export")
            .arg(from)
            .arg(dir.path().join("back.durus")));
        assert!(!out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("oids too large"), "{}", text(&out));
        // Nothing left behind: the next try meets the same reason.
        assert!(!dir.path().join("back.durus").exists());
        assert!(!dir.path().join("back.export-partial").exists());
    }
}

/// A Durus file's records come in the file's order, not oid order; the
/// migration rewrites the tables in oid order and compacts, so the store
/// is as small as one filled in oid order (without that, pages filled out
/// of order stay a half to three quarters full: a file about a third
/// larger).
#[test]
fn a_store_migrated_from_records_out_of_oid_order_is_as_small_as_one_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let n = 30_000u64;
    let records: Vec<Record> = (0..n)
        .map(|i| {
            let oid = Oid(i);
            let refs: Vec<Oid> = if i == 0 {
                (1..n).map(Oid).collect()
            } else {
                Vec::new()
            };
            Record::new(
                oid,
                format!("object {i:>6} {}", "x".repeat(150)).as_bytes(),
                &refs,
            )
        })
        .collect();
    // The same records in oid order, and shuffled (a fixed permutation).
    let mut shuffled: Vec<usize> = (0..n as usize).collect();
    let mut seed = 0x2545_F491_4F6C_DD1Du64;
    for i in (1..shuffled.len()).rev() {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        shuffled.swap(i, (seed % (i as u64 + 1)) as usize);
    }
    let mut sizes = Vec::new();
    for (name, order) in [
        ("ordered", (0..n as usize).collect::<Vec<_>>()),
        ("shuffled", shuffled),
    ] {
        // An empty initial transaction, then transactions of 500 records
        // in the given order, as Durus appends them: `n | (len | oid |
        // record)*`.
        let src = dir.path().join(format!("{name}.durus"));
        ShelfWriter::create(&src).unwrap().finish().unwrap();
        let mut file = std::fs::OpenOptions::new().append(true).open(&src).unwrap();
        for chunk in order.chunks(500) {
            let mut items = Vec::new();
            for &i in chunk {
                let r = &records[i];
                items.extend_from_slice(&(r.len() as u64 + 8).to_be_bytes());
                items.extend_from_slice(&r.oid().to_bytes());
                items.extend_from_slice(r.as_bytes());
            }
            std::io::Write::write_all(&mut file, &(items.len() as u64).to_be_bytes()).unwrap();
            std::io::Write::write_all(&mut file, &items).unwrap();
        }
        drop(file);
        let dest = dir.path().join(format!("{name}.redb"));
        let out = run(bin().arg("migrate").arg(&src).arg(&dest));
        assert!(out.status.success(), "{}", text(&out));
        check_clean(&dest);
        sizes.push(std::fs::metadata(&dest).unwrap().len());
    }
    let (ordered, shuffled) = (sizes[0] as f64, sizes[1] as f64);
    assert!(
        shuffled <= ordered * 1.05,
        "migrated out of order: {shuffled} bytes; in order: {ordered} bytes"
    );
    let raw: usize = records.iter().map(|r| r.len()).sum();
    eprintln!("raw record bytes {raw}, store in order {ordered}, out of order {shuffled}");
}

/// Every record in a PostgreSQL database of `serve --database`.
fn database_contents(url: &str) -> BTreeMap<u64, Vec<u8>> {
    let mut c = postgres::Client::connect(url, postgres::NoTls).unwrap();
    let mut m: BTreeMap<u64, Vec<u8>> = BTreeMap::new();
    for row in c
        .query(
            "SELECT oid, data FROM durus_records ORDER BY oid, chunk",
            &[],
        )
        .unwrap()
    {
        let oid: i64 = row.get(0);
        let data: &[u8] = row.get(1);
        m.entry(oid as u64).or_default().extend_from_slice(data);
    }
    m
}

/// Durus's files, and a durus-redb store, migrate into PostgreSQL: every
/// record Durus holds and nothing else, new oids above them, the real
/// Durus client reads them through `serve --database` exactly as Durus
/// reads the original, and a migration killed part way resumes to the
/// same records.
#[test]
fn durus_stores_and_a_store_migrate_into_postgresql() {
    for name in ["shelf", "dfs20", "sqlite"] {
        let source = durus_store(name);
        let want = read_dump(&durus_files().join(format!("{name}.durus.dump")));
        let url = common::fresh_database(&format!("migrate_{name}"));
        let out = run(bin()
            .arg("migrate")
            .arg(&source)
            .arg(&url)
            .args(["--batch-records", "700"]));
        assert!(out.status.success(), "{name}: {}", text(&out));
        assert!(
            text(&out).contains("every reference checked"),
            "{}",
            text(&out)
        );
        assert_eq!(database_contents(&url), want, "{name}: records differ");
        // A second run finds the database full and refuses it.
        let out = run(bin().arg("migrate").arg(&source).arg(&url));
        assert!(!out.status.success());
        assert!(
            text(&out).contains("already holds records"),
            "{}",
            text(&out)
        );
        let max = *want.keys().max().unwrap();
        serving_args(&["--database", &url], |port| {
            compare(&source, &["--port", &port.to_string()]);
            let mut c = durus_redb::ClientStorage::connect_tcp("127.0.0.1", port).unwrap();
            assert!(
                c.new_oid().unwrap().0 > max,
                "a new oid at or below an imported one"
            );
        });
        // check, stats and export read the database as they read a file.
        let out = run(bin().arg("check").arg(&url));
        assert!(out.status.success(), "{}", text(&out));
        assert!(text(&out).contains("result:     clean"), "{}", text(&out));
        let out = run(bin().arg("stats").arg(&url));
        assert!(out.status.success(), "{}", text(&out));
        assert!(
            text(&out).contains(&format!("objects:           {}", want.len())),
            "{}",
            text(&out)
        );
        let dir = tempfile::tempdir().unwrap();
        let back = dir.path().join("back.durus");
        let out = run(bin().arg("export").arg(&url).arg(&back));
        assert!(out.status.success(), "{}", text(&out));
        compare(&source, &["--file", back.to_str().unwrap()]);
        // A pack keeps everything the root reaches (the Durus client still
        // reads every object as in the original), and the check stays clean.
        let out = run(bin().args(["gc", "--full"]).arg(&url));
        assert!(out.status.success(), "{}", text(&out));
        serving_args(&["--database", &url], |port| {
            compare(&source, &["--port", &port.to_string()]);
        });
        let out = run(bin().arg("check").arg(&url));
        assert!(text(&out).contains("result:     clean"), "{}", text(&out));
    }

    // A reference to a record that is gone, and a count that is off: check
    // names both and exits 1.
    let url = common::fresh_database("migrate_damaged");
    assert!(
        run(bin().arg("migrate").arg(durus_store("dfs20")).arg(&url))
            .status
            .success()
    );
    let mut c = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let victim: i64 = c
        .query_one(
            "SELECT min(oid) FROM durus_records WHERE oid > 0 AND chunk = 0",
            &[],
        )
        .unwrap()
        .get(0);
    c.execute("DELETE FROM durus_records WHERE oid = $1", &[&victim])
        .unwrap();
    let out = run(bin().arg("check").arg(&url));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(
        text(&out).contains("which is not stored") && text(&out).contains("counts"),
        "{}",
        text(&out)
    );

    // A durus-redb store into a database.
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("s.redb");
    let source = durus_store("dfs20");
    assert!(
        run(bin().arg("migrate").arg(&source).arg(&store))
            .status
            .success()
    );
    let url = common::fresh_database("migrate_store");
    let out = run(bin().arg("migrate").arg(&store).arg(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(database_contents(&url), contents(&store));

    // Killed part way (batches of 5 records, each its own transaction),
    // once a batch is in (not after a fixed delay: on a loaded machine the
    // migration may not have begun), refused by serve meanwhile, then
    // resumed to the same records.
    let url = common::fresh_database("migrate_killed");
    let want = read_dump(&durus_files().join("dfs20.durus.dump"));
    let mut watch = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    let mut killed = false;
    for _ in 0..4 {
        let mut child = KillOnDrop(
            bin()
                .arg("migrate")
                .arg(&source)
                .arg(&url)
                .args(["--batch-records", "5"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let deadline = std::time::Instant::now() + common::LIMIT;
        let running = loop {
            if child.0.try_wait().unwrap().is_some() {
                break false;
            }
            let imported: i64 = match watch.query_one("SELECT count(*) FROM durus_records", &[]) {
                Ok(row) => row.get(0),
                Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => 0,
                Err(e) => panic!("{e}"),
            };
            if imported > 0 {
                break true;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the migration wrote nothing in {:?}",
                common::LIMIT
            );
            std::thread::sleep(Duration::from_millis(2));
        };
        if running {
            drop(child);
            killed = true;
            let out = run(bin().args(["serve", "--database", &url, "--port", "0"]));
            assert!(!out.status.success());
            assert!(text(&out).contains("unfinished import"), "{}", text(&out));
            break;
        }
        // Finished before the kill: start again on a new database.
        watch
            .batch_execute(
            "DROP TABLE durus_meta, durus_order, durus_oids, durus_records, durus_log, durus_front_ends, \
             durus_alone, durus_aware",
        )
        .unwrap();
    }
    assert!(killed, "the migration was never caught running");
    let out = run(bin().arg("migrate").arg(&source).arg(&url));
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("resumed"), "{}", text(&out));
    assert_eq!(database_contents(&url), want);
}
