//! The command line against real files: stats, check, exclusive access.

use std::process::Command;
mod common;
use common::OutputWithin;

use durus_redb::{Durability, Manual, ManualGc, Oid, Options, Record, RedbStorage, Storage};

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
    let out = bin().arg("stats").arg(&path).output_within(common::LIMIT);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("objects:          201"), "{text}");
    assert!(text.contains("format version:   4"), "{text}");
    let out = bin().arg("check").arg(&path).output_within(common::LIMIT);
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
        let out = bin().arg(cmd).arg(&path).output_within(common::LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("already open"), "{cmd}: {err}");
    }
    drop(held);
    assert!(
        bin()
            .arg("check")
            .arg(&path)
            .output_within(common::LIMIT)
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
        let out = bin().arg(cmd).arg(&foreign).output_within(common::LIMIT);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{cmd}: {err}");
        assert!(err.contains("not a durus-redb store"), "{cmd}: {err}");
        let out = bin()
            .arg(cmd)
            .arg(dir.path().join("missing.redb"))
            .output_within(common::LIMIT);
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
    let out = bin().arg("check").arg(&path).output_within(common::LIMIT);
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
    let out = bin().arg("check").arg(&path).output_within(common::LIMIT);
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
        let out = c.output_within(common::LIMIT);
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
    let out = bin().arg("check").arg(&path).output_within(common::LIMIT);
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
    let out = bin().arg("check").arg(&path).output_within(common::LIMIT);
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

/// Damage done to the log of a crash image.
#[derive(Debug, Clone, Copy)]
enum LogDamage {
    /// Entry 3 (of 10) zeroed whole.
    ZeroedEntry,
    /// Only entry 3's 12-byte header zeroed.
    ZeroedHeader,
    /// The segment split in two at entry 3, as a checkpoint's switch
    /// would have, and the two files' names exchanged.
    SwappedSegments,
    /// The log directory removed.
    LogRemoved,
}

/// A store left as a crash leaves it (file and log copied while it is
/// open) after ten logged commits of the root ("r" and the commit's
/// number), with `damage` done to its log: the later commits were
/// acknowledged and, but for `LogRemoved`, sit intact after the damage.
fn store_with_damaged_log(dir: &std::path::Path, damage: LogDamage) -> std::path::PathBuf {
    let path = dir.join("live.redb");
    let mut s = RedbStorage::open(
        &path,
        Options::new()
            .durability(Durability::Fsync)
            .checkpoint(Manual)
            .gc(ManualGc),
    )
    .unwrap();
    let root = s.new_oid().unwrap();
    s.begin();
    s.store(root, Record::new(root, b"root 0", &[]).into_bytes())
        .unwrap();
    s.end().unwrap();
    s.checkpoint().unwrap();
    for i in 1..=10u8 {
        s.begin();
        s.store(root, Record::new(root, &[b'r', i], &[]).into_bytes())
            .unwrap();
        s.end().unwrap();
    }
    let image = dir.join("image.redb");
    std::fs::copy(&path, &image).unwrap();
    let log = dir.join("image.redb-log");
    std::fs::create_dir(&log).unwrap();
    let seg = std::fs::read_dir(dir.join("live.redb-log"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .max()
        .unwrap();
    let mut data = std::fs::read(&seg).unwrap();
    drop(s);
    // Entries after the 32-byte header: u32 length, u64 seq, payload, u64 sum.
    let mut at = 32;
    for _ in 0..3 {
        let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
        at += 20 + len;
    }
    let len = u32::from_le_bytes(data[at..at + 4].try_into().unwrap()) as usize;
    let name = seg.file_name().unwrap().to_owned();
    match damage {
        LogDamage::ZeroedEntry => data[at..at + 20 + len].fill(0),
        LogDamage::ZeroedHeader => data[at..at + 12].fill(0),
        LogDamage::SwappedSegments => {
            let number: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
            let mut second = data[..32].to_vec();
            second[16..24].copy_from_slice(&(number + 1).to_le_bytes());
            second[24..32].copy_from_slice(&data[at + 4..at + 12]);
            second.extend_from_slice(&data[at..]);
            data[at..].fill(0);
            std::fs::write(log.join(format!("{:020}.seg", number + 1)), &data).unwrap();
            std::fs::write(log.join(name), second).unwrap();
            return image;
        }
        LogDamage::LogRemoved => {
            std::fs::remove_dir(&log).unwrap();
            return image;
        }
    }
    std::fs::write(log.join(name), data).unwrap();
    image
}

/// `durus-redb check [--repair] PATH`: its exit code and standard output.
fn check(path: &std::path::Path, repair: bool) -> (Option<i32>, String) {
    let mut cmd = bin();
    cmd.arg("check");
    if repair {
        cmd.arg("--repair");
    }
    let out = cmd.arg(path).output_within(common::LIMIT);
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// Every kind of damage, through the real binary: `serve` refuses to
/// start with a message naming it and `check --repair`; `check` exits 1;
/// `check --repair` opens the store with the commits before the damage,
/// and the store is then served and checks clean.
#[test]
fn each_kind_of_log_damage_is_refused_by_serve_reported_by_check_and_repaired() {
    for damage in [
        LogDamage::ZeroedEntry,
        LogDamage::ZeroedHeader,
        LogDamage::SwappedSegments,
        LogDamage::LogRemoved,
    ] {
        let dir = tempfile::tempdir().unwrap();
        let image = store_with_damaged_log(dir.path(), damage);
        let os = |s: &str| std::ffi::OsString::from(s);
        let (code, err) = run_to_end(&[
            &os("serve"),
            &os("--port"),
            &os("0"),
            &os("--file"),
            image.as_os_str(),
        ]);
        assert_eq!(code, Some(2), "{damage:?}: {err}");
        assert!(err.contains("check --repair"), "{damage:?}: {err}");
        assert!(
            err.contains("is damaged") || err.contains("is missing"),
            "{damage:?}: {err}"
        );
        let (code, text) = check(&image, false);
        assert_eq!(code, Some(1), "{damage:?}: {text}");
        assert!(text.contains("commit log: "), "{damage:?}: {text}");
        let (code, text) = check(&image, true);
        assert_eq!(code, Some(0), "{damage:?}: {text}");
        assert!(
            text.contains("given up") || text.contains("gave up"),
            "{damage:?}: {text}"
        );
        let (code, text) = check(&image, false);
        assert_eq!(code, Some(0), "{damage:?}: {text}");
        // The commits before the damage are there (none for a swapped or
        // removed log: the first segment read is not the first written).
        let mut s = RedbStorage::open(&image, Options::default()).unwrap();
        let want: &[u8] = match damage {
            LogDamage::ZeroedEntry | LogDamage::ZeroedHeader => b"r\x03",
            LogDamage::SwappedSegments | LogDamage::LogRemoved => b"root 0",
        };
        assert_eq!(s.load(Oid::ROOT).unwrap().data(), want, "{damage:?}");
        s.close().unwrap();
    }
}

#[test]
fn a_damaged_commit_log_stops_serve_and_check_until_check_repair_names_what_it_gives_up() {
    let dir = tempfile::tempdir().unwrap();
    let image = store_with_damaged_log(dir.path(), LogDamage::ZeroedEntry);
    // serve refuses to start, and says what is wrong and what to do.
    let (code, err) = run_to_end(&[
        std::ffi::OsStr::new("serve"),
        std::ffi::OsStr::new("--port"),
        std::ffi::OsStr::new("0"),
        std::ffi::OsStr::new("--file"),
        image.as_os_str(),
    ]);
    assert_ne!(code, Some(0), "{err}");
    assert!(
        err.contains("commit log") && err.contains("damaged"),
        "{err}"
    );
    assert!(err.contains("check --repair"), "{err}");
    // check reports the damage and exits 1; nothing was changed.
    let (code, text) = check(&image, false);
    assert_eq!(code, Some(1), "{text}");
    assert!(text.contains("commit log: DAMAGED"), "{text}");
    assert!(text.contains("6 intact entries up to commit 11"), "{text}");
    // check --repair gives up the commits after the damage, names them,
    // and keeps the log aside.
    let (code, text) = check(&image, true);
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("gave up the commits after the damage"),
        "{text}"
    );
    assert!(text.contains("the commits after 4"), "{text}");
    let kept = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .any(|n| n.starts_with("image.redb-log.damaged-"));
    assert!(kept, "the damaged log was not kept");
    let (code, text) = check(&image, false);
    assert_eq!(code, Some(0), "{text}");
    let mut s = RedbStorage::open(&image, Options::default()).unwrap();
    assert_eq!(s.load(Oid::ROOT).unwrap().data(), [b'r', 3]);
    s.close().unwrap();
}

/// Runs `durus-redb ARGS` to its end (it must end within a minute) and
/// returns its exit code and standard error.
fn run_to_end(args: &[&std::ffi::OsStr]) -> (Option<i32>, String) {
    let mut child = bin()
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("durus-redb {args:?} did not end");
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    (status.code(), err)
}

#[test]
fn serve_that_cannot_listen_names_the_address_that_failed_and_leaves_no_store() {
    let dir = tempfile::tempdir().unwrap();
    let busy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy_port = busy.local_addr().unwrap().port().to_string();
    let path = dir.path().join("new.redb");
    let os = |s: &str| std::ffi::OsString::from(s);
    // The main port busy.
    let (code, err) = run_to_end(&[
        &os("serve"),
        &os("--port"),
        &os(&busy_port),
        &os("--file"),
        path.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!("cannot listen on 127.0.0.1:{busy_port}")),
        "{err}"
    );
    assert!(!path.exists(), "a store was left behind: {err}");
    assert!(!dir.path().join("new.redb-log").exists(), "{err}");
    // The metrics port busy: the metrics address is named, not the main one.
    let (code, err) = run_to_end(&[
        &os("serve"),
        &os("--port"),
        &os("0"),
        &os("--metrics-address"),
        &os(&format!("127.0.0.1:{busy_port}")),
        &os("--file"),
        path.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(
        err.contains(&format!(
            "cannot listen for metrics on 127.0.0.1:{busy_port}"
        )),
        "{err}"
    );
    assert!(!path.exists(), "a store was left behind: {err}");
    // A metrics address that is no address says what one looks like.
    let (code, err) = run_to_end(&[
        &os("serve"),
        &os("--port"),
        &os("0"),
        &os("--metrics-address"),
        &os("29721"),
        &os("--file"),
        path.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("cannot listen for metrics on 29721"), "{err}");
    assert!(err.contains("HOST:PORT"), "{err}");
    assert!(!path.exists(), "a store was left behind: {err}");
    // An existing store is kept, whatever happens.
    small_store(&path);
    let (code, err) = run_to_end(&[
        &os("serve"),
        &os("--port"),
        &os(&busy_port),
        &os("--file"),
        path.as_os_str(),
    ]);
    assert_eq!(code, Some(2), "{err}");
    assert!(path.exists(), "an existing store was removed");
    drop(busy);
}

#[test]
fn a_durus_file_or_a_missing_folder_is_named_as_such_with_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let durus = dir.path().join("app.durus");
    std::fs::write(&durus, b"SHELF-1\n\0\0\0\0\0\0\0\0").unwrap();
    let shown = durus.display().to_string();
    let os = |s: &str| std::ffi::OsString::from(s);
    for args in [
        vec![
            os("serve"),
            os("--port"),
            os("0"),
            os("--file"),
            durus.clone().into(),
        ],
        vec![os("check"), durus.clone().into()],
        vec![os("stats"), durus.clone().into()],
    ] {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, err) = run_to_end(&refs);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("is a Durus FileStorage (SHELF-1) file"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains(&format!("durus-redb migrate {shown}")),
            "{args:?}: {err}"
        );
        assert_eq!(
            err.matches(&shown).count(),
            2,
            "the path once, and once in the advice: {err}"
        );
    }
    let lost = dir.path().join("no-such-folder").join("s.redb");
    for args in [
        vec![
            os("serve"),
            os("--port"),
            os("0"),
            os("--file"),
            lost.clone().into(),
        ],
        vec![os("check"), lost.clone().into()],
    ] {
        let refs: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_os_str()).collect();
        let (code, err) = run_to_end(&refs);
        assert_eq!(code, Some(2), "{args:?}: {err}");
        assert!(
            err.contains("the folder") && err.contains("does not exist"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn serve_with_stderr_redirected_writes_plain_log_lines() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let mut child = bin()
        .args(["serve", "--port", "0", "--file"])
        .arg(dir.path().join("s.redb"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let mut seen = String::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        seen.push_str(&line);
        seen.push('\n');
        if line.contains("Ready on") {
            break;
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(seen.contains("Ready on"), "{seen}");
    assert!(seen.contains("INFO"), "{seen}");
    assert!(
        !seen.contains('\u{1b}'),
        "escape codes in a redirected log: {seen:?}"
    );
}

/// The commands that work on a store file also take a PostgreSQL URL; one
/// that cannot be reached is said so, with the URL's password hidden (exit
/// 2, nothing written).
#[test]
fn file_commands_given_an_unreachable_database_say_so() {
    let url = "postgresql://app:s3cret@127.0.0.1:1/store";
    for args in [
        vec!["check", url],
        vec!["stats", url],
        vec!["gc", "--full", url],
    ] {
        let out = bin().args(&args).output_within(common::LIMIT);
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {text}");
        assert!(
            text.contains("database:") && !text.contains("s3cret"),
            "{args:?}: {text}"
        );
    }
    let out = bin().args(["gc", url]).output_within(common::LIMIT);
    let text = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(text.contains("gc --full"), "{text}");
}

/// `--alone-after` takes seconds or `never`; anything else is refused
/// before anything is opened, naming what it takes.
#[test]
fn serve_refuses_an_alone_after_that_is_neither_seconds_nor_never() {
    for bad in ["soon", "-1", "NaN"] {
        let out = bin()
            .args(["serve", "--memory", "--port", "0"])
            .arg(format!("--alone-after={bad}"))
            .output_within(common::LIMIT);
        let text = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{bad}: {text}");
        assert!(
            text.contains("neither a number of seconds") && text.contains("never"),
            "{bad}: {text}"
        );
    }
}
