//! The file readers and the SHELF-1 writer against files written by the real
//! Python Durus 4.3.
//!
//! Needs `DURUS_PYTHON`: the path of a Python interpreter with Durus 4.3
//! installed. Without it these tests fail (they never skip).

mod common;
use common::OutputWithin;

use common::{python, script};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use durus_redb::{
    FileError, FileFormat, ReadOptions, RecordSource, ShelfWriter, SourceEvent, detect_format,
    open_source,
};

const STORES: [(&str, FileFormat); 3] = [
    ("shelf", FileFormat::Shelf),
    ("dfs20", FileFormat::FileStorage2),
    ("sqlite", FileFormat::Sqlite),
];

/// The directory with the stores Durus wrote, made once per test run.
fn durus_files() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        common::make_durus_files(Path::new(env!("CARGO_TARGET_TMPDIR")), "durus-files")
    })
}

fn store(name: &str) -> PathBuf {
    durus_files().join(format!("{name}.durus"))
}

fn read_lines(path: &Path) -> Vec<u64> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect()
}

/// Every event of a source from `from` on.
fn events(path: &Path, options: ReadOptions, from: u64) -> Result<Vec<SourceEvent>, FileError> {
    let mut s = open_source(path, options)?;
    s.resume_from(from)?;
    if from != 0 {
        assert_eq!(s.position(), from, "position after resume");
    }
    let mut v = Vec::new();
    while let Some(e) = s.next_event()? {
        v.push(e);
    }
    Ok(v)
}

/// The final state (last record per oid) of a run of events.
fn state(events: &[SourceEvent]) -> BTreeMap<u64, Vec<u8>> {
    let mut m = BTreeMap::new();
    for e in events {
        if let SourceEvent::Item(i) = e {
            m.insert(i.oid.0, i.record.clone());
        }
    }
    m
}

/// A state in the dump format of make_durus_files.py.
fn dump(state: &BTreeMap<u64, Vec<u8>>) -> Vec<u8> {
    let mut v = Vec::new();
    for (oid, record) in state {
        v.extend_from_slice(&oid.to_be_bytes());
        v.extend_from_slice(&(record.len() as u32).to_be_bytes());
        v.extend_from_slice(record);
    }
    v
}

fn boundary(e: &SourceEvent) -> Option<u64> {
    match e {
        SourceEvent::TransactionEnd { offset } | SourceEvent::SafePoint { offset } => Some(*offset),
        _ => None,
    }
}

fn transaction_ends(events: &[SourceEvent]) -> Vec<u64> {
    events
        .iter()
        .filter_map(|e| match e {
            SourceEvent::TransactionEnd { offset } => Some(*offset),
            _ => None,
        })
        .collect()
}

#[test]
fn final_state_equals_what_durus_holds() {
    for (name, format) in STORES {
        let path = store(name);
        assert_eq!(detect_format(&path).unwrap(), format);
        let mut s = open_source(&path, ReadOptions::default()).unwrap();
        assert_eq!(s.format(), format);
        let mut all = Vec::new();
        let mut last_pos = 0;
        while let Some(e) = s.next_event().unwrap() {
            assert!(s.position() >= last_pos && s.position() <= s.total_len());
            last_pos = s.position();
            all.push(e);
        }
        assert_eq!(s.position(), s.total_len(), "{name}: position at the end");
        let got = state(&all);
        let want = std::fs::read(format!("{}.dump", path.display())).unwrap();
        assert!(
            dump(&got) == want,
            "{name}: final state differs from Durus's"
        );
        let present: Vec<u64> = got.keys().copied().collect();
        let reachable = read_lines(Path::new(&format!("{}.reachable", path.display())));
        assert!(
            reachable.len() < present.len(),
            "{name}: the test store should hold garbage"
        );
        assert!(
            reachable.iter().all(|o| got.contains_key(o)),
            "{name}: reachable oid missing"
        );
        if format != FileFormat::Sqlite {
            assert_eq!(s.total_len(), std::fs::metadata(&path).unwrap().len());
            let ends = transaction_ends(&all);
            for end in read_lines(Path::new(&format!("{}.ends", path.display()))) {
                assert!(ends.contains(&end), "{name}: commit end {end} not reported");
            }
            // The packed base is one transaction, with safe points between items.
            assert!(
                all.iter()
                    .any(|e| matches!(e, SourceEvent::SafePoint { .. }))
            );
        }
    }
}

#[test]
fn resuming_at_each_boundary_yields_exactly_the_rest() {
    for (name, _) in STORES {
        let path = store(name);
        let all = events(&path, ReadOptions::default(), 0).unwrap();
        let mut checked = 0;
        for (i, e) in all.iter().enumerate() {
            let Some(offset) = boundary(e) else { continue };
            // Every transaction end; a sample of the many safe points.
            if matches!(e, SourceEvent::SafePoint { .. }) && i % 997 != 1 {
                continue;
            }
            let rest = events(&path, ReadOptions::default(), offset).unwrap();
            assert!(rest == all[i + 1..], "{name}: resume at {offset} differs");
            checked += 1;
        }
        assert!(checked >= 5, "{name}: only {checked} boundaries checked");
    }
}

#[test]
fn torn_tails_are_truncated_or_dropped_on_request() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["shelf", "dfs20"] {
        let path = store(name);
        let bytes = std::fs::read(&path).unwrap();
        let ends = read_lines(Path::new(&format!("{}.ends", path.display())));
        let last_start = ends[ends.len() - 2];
        assert_eq!(*ends.last().unwrap(), bytes.len() as u64);
        let before = std::fs::read(format!("{}.before.dump", path.display())).unwrap();
        let len = bytes.len() as u64;
        let cut_at = [
            last_start,
            last_start + 1,
            last_start + 8,
            last_start + 13,
            (last_start + len) / 2,
            len - 1,
        ];
        for cut in cut_at {
            let torn = dir.path().join(format!("{name}-{cut}"));
            std::fs::write(&torn, &bytes[..cut as usize]).unwrap();
            if cut == last_start {
                let ev = events(&torn, ReadOptions::default(), 0).unwrap();
                assert!(dump(&state(&ev)) == before, "{name}: cut at a boundary");
                continue;
            }
            match events(&torn, ReadOptions::default(), 0) {
                Err(FileError::Truncated { offset, file_len }) => {
                    assert_eq!((offset, file_len), (last_start, cut), "{name} cut at {cut}")
                }
                other => panic!("{name} cut at {cut}: {:?}", other.map(|e| e.len())),
            }
            let mut s = open_source(&torn, ReadOptions::default().with_torn_tail(true)).unwrap();
            let mut ev = Vec::new();
            while let Some(e) = s.next_event().unwrap() {
                ev.push(e);
            }
            assert_eq!(s.torn_tail(), Some(last_start));
            assert_eq!(
                ev.last(),
                Some(&SourceEvent::TransactionEnd { offset: last_start })
            );
            assert!(
                dump(&state(&ev)) == before,
                "{name} cut at {cut}: state differs"
            );
        }
    }
}

/// The offset of the first item of the last transaction, and of its record.
fn last_item(name: &str) -> (Vec<u8>, usize, usize) {
    let path = store(name);
    let bytes = std::fs::read(&path).unwrap();
    let ends = read_lines(Path::new(&format!("{}.ends", path.display())));
    let start = ends[ends.len() - 2] as usize;
    match name {
        "shelf" => (bytes, start + 8, start + 8 + 16),
        _ => (bytes, start, start + 4),
    }
}

fn expect_corrupt(path: &Path, want_offset: u64, what: &str) {
    match events(path, ReadOptions::default().with_torn_tail(true), 0) {
        Err(FileError::Corrupt { offset, reason }) => {
            assert_eq!(offset, want_offset, "{what}: {reason}")
        }
        other => panic!("{what}: expected Corrupt, got {:?}", other.map(|e| e.len())),
    }
}

#[test]
fn corrupt_real_files_give_corrupt_errors_with_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = |n: &str| dir.path().join(n);

    // Bad magic.
    let (bytes, item, record) = last_item("shelf");
    let mut bad = bytes.clone();
    bad[..8].copy_from_slice(b"SHELF-9\n");
    std::fs::write(p("magic"), &bad).unwrap();
    assert!(matches!(
        open_source(p("magic"), ReadOptions::default()),
        Err(FileError::UnknownFormat { .. })
    ));

    // An item whose oid differs from its record's oid.
    let mut bad = bytes.clone();
    bad[item + 15] ^= 0x40;
    std::fs::write(p("oid"), &bad).unwrap();
    expect_corrupt(&p("oid"), item as u64, "shelf oid mismatch");

    // An item length that overruns its transaction.
    let mut bad = bytes.clone();
    bad[item..item + 8].copy_from_slice(&(1u64 << 40).to_be_bytes());
    std::fs::write(p("overrun"), &bad).unwrap();
    expect_corrupt(&p("overrun"), item as u64, "shelf item overrun");

    // A malformed record: its data length runs past its end.
    let mut bad = bytes.clone();
    bad[record + 8..record + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(p("record"), &bad).unwrap();
    expect_corrupt(&p("record"), item as u64, "shelf malformed record");

    // An offset map with the wrong dimensions.
    let mut bad = bytes.clone();
    let init_end = 16 + u64::from_be_bytes(bad[8..16].try_into().unwrap()) as usize;
    bad[init_end + 8..init_end + 16].copy_from_slice(&9u64.to_be_bytes());
    std::fs::write(p("map"), &bad).unwrap();
    expect_corrupt(&p("map"), init_end as u64, "shelf offset map");

    // DFS20: a malformed record, and an index offset beyond the file.
    let (bytes, item, record) = last_item("dfs20");
    let mut bad = bytes.clone();
    bad[record + 8..record + 12].copy_from_slice(&u32::MAX.to_be_bytes());
    std::fs::write(p("d-record"), &bad).unwrap();
    expect_corrupt(&p("d-record"), item as u64, "dfs20 malformed record");
    let mut bad = bytes.clone();
    bad[6..14].copy_from_slice(&u64::MAX.to_be_bytes());
    std::fs::write(p("d-index"), &bad).unwrap();
    expect_corrupt(&p("d-index"), 6, "dfs20 index offset");

    // Garbage is never read as a store.
    std::fs::write(p("garbage"), b"\x89PNG\r\n\x1a\n").unwrap();
    let err = open_source(p("garbage"), ReadOptions::default())
        .err()
        .unwrap();
    assert!(err.to_string().contains("PNG"), "{err}");
}

#[test]
fn exported_shelf_opens_in_durus_with_every_record() {
    let dir = tempfile::tempdir().unwrap();
    for (name, _) in STORES {
        let path = store(name);
        let mut s = open_source(&path, ReadOptions::default()).unwrap();
        let mut all = Vec::new();
        while let Some(e) = s.next_event().unwrap() {
            all.push(e);
        }
        let final_state = state(&all);
        let out = dir.path().join(format!("{name}-export.durus"));
        let mut w = ShelfWriter::create(&out).unwrap();
        for (oid, record) in &final_state {
            w.write((*oid).into(), record).unwrap();
        }
        let len = w.finish().unwrap();
        assert_eq!(len, std::fs::metadata(&out).unwrap().len());
        // Our reader reads it back...
        let back = events(&out, ReadOptions::default(), 0).unwrap();
        assert!(
            state(&back) == final_state,
            "{name}: export reads back differently"
        );
        assert_eq!(transaction_ends(&back).len(), 1);
        // ...and so does Durus.
        let dump_path = format!("{}.dump", path.display());
        let check = Command::new(python())
            .arg(script("check_shelf.py"))
            .arg(&out)
            .arg(&dump_path)
            .output_within(common::LIMIT);
        assert!(
            check.status.success(),
            "{name}: Durus rejects the exported file: {}{}",
            String::from_utf8_lossy(&check.stdout),
            String::from_utf8_lossy(&check.stderr)
        );
    }
    // An empty export is a valid, empty FileStorage too.
    let out = dir.path().join("empty.durus");
    ShelfWriter::create(&out).unwrap().finish().unwrap();
    let empty_dump = dir.path().join("empty.dump");
    std::fs::write(&empty_dump, b"").unwrap();
    let check = Command::new(python())
        .arg(script("check_shelf.py"))
        .arg(&out)
        .arg(&empty_dump)
        .output_within(common::LIMIT);
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
}

/// `RecordSource` is object safe and usable behind a box across threads.
#[test]
fn sources_are_send() {
    fn assert_send<T: Send + ?Sized>() {}
    assert_send::<Box<dyn RecordSource>>();
}
