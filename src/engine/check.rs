//! Statistics and consistency checks of a store.

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable, ReadableTableMetadata};

use super::Engine;
use super::layout::*;
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};

/// Counts and sizes of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoreStats {
    /// Records stored.
    pub objects: u64,
    /// Size of the file on disk.
    pub file_bytes: u64,
    /// On-disk format version.
    pub format_version: u32,
    /// Oids with a non-zero reference count.
    pub referenced_objects: u64,
    /// Oids waiting for the incremental collector (unreachable, in their
    /// grace window or due).
    pub gc_queue: u64,
    /// How long ago the oldest of them became unreachable.
    pub gc_oldest: Option<std::time::Duration>,
    /// Every oid below this may have been handed out.
    pub oid_mark: u64,
    /// Bytes of keys and values stored (redb's count).
    pub stored_bytes: u64,
    /// Bytes of pages allocated but unused.
    pub fragmented_bytes: u64,
}

pub(crate) fn stats(engine: &Engine) -> Result<StoreStats> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let info: FormatInfo = read_meta(&meta, KEY_FORMAT)?
        .ok_or_else(|| StorageError::damaged("no format version in the metadata"))?;
    let oids: OidMeta = read_meta(&meta, KEY_OIDS)?.unwrap_or(OidMeta { reserved: 0 });
    let records = txn.open_table(RECORDS)?;
    let s = records.stats()?;
    let counts = txn.open_table(REFCOUNTS)?;
    let (queue_len, first_drop) = super::refcount::queue_summary(&txn)?;
    Ok(StoreStats {
        objects: records.len()?,
        file_bytes: std::fs::metadata(engine.path())
            .map(|m| m.len())
            .unwrap_or(0),
        format_version: info.version,
        referenced_objects: counts.len()?,
        gc_queue: queue_len,
        gc_oldest: first_drop.map(|ms| {
            std::time::Duration::from_millis(super::layout::now_unix_ms().saturating_sub(ms))
        }),
        oid_mark: oids.reserved,
        stored_bytes: s.stored_bytes(),
        fragmented_bytes: s.fragmented_bytes(),
    })
}

/// At most this many problems of each kind are listed in a report.
pub const LISTED: usize = 100;

/// What a reference check found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckReport {
    /// Records checked.
    pub objects: u64,
    /// References counted.
    pub refs: u64,
    /// `(holder, missing)`: references to oids that do not exist (the first 100).
    pub dangling: Vec<(Oid, Oid)>,
    /// How many references dangle in all.
    pub dangling_count: u64,
    /// `(oid, stored count, recounted)` where the bookkeeping is wrong (the first 100).
    pub count_mismatches: Vec<(Oid, u64, u64)>,
    /// How many counts are wrong in all.
    pub mismatch_count: u64,
    /// Records that are not valid records for their oid (the first 100).
    pub damaged: Vec<(Oid, String)>,
    /// How many records are damaged in all.
    pub damaged_count: u64,
}

impl CheckReport {
    /// True when nothing is wrong.
    pub fn is_clean(&self) -> bool {
        self.dangling_count == 0 && self.mismatch_count == 0 && self.damaged_count == 0
    }
}

fn push_listed<T>(v: &mut Vec<T>, n: &mut u64, item: T) {
    *n += 1;
    if v.len() < LISTED {
        v.push(item);
    }
}

/// Distinct referenced oids recounted per pass: memory stays bounded
/// (about 24 MiB of counters) whatever the size of the store, and the number
/// of passes follows the number of distinct referenced oids, never the oid
/// range (a store referencing oid 2^50 costs what one referencing oid 2 does).
const RECOUNT_OIDS: usize = 1 << 19;

/// Recounts every reference from scratch on one snapshot and compares with
/// the stored counts; checks that every ref resolves and every record is valid.
///
/// Each pass scans every record and recounts the references to the next
/// [`RECOUNT_OIDS`] distinct oids from where the last pass ended.
pub(crate) fn check_references(engine: &Engine) -> Result<CheckReport> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    let counts = txn.open_table(REFCOUNTS)?;
    let mut report = CheckReport::default();
    let mut lo = 0u64;
    loop {
        let first = lo == 0;
        // Recounts of oids in `lo..limit`; `limit` drops as the map fills.
        let mut recount: std::collections::BTreeMap<u64, u64> = Default::default();
        let mut limit: Option<u64> = None;
        for item in records.iter()? {
            let (k, v) = item?;
            let oid = Oid(k.value());
            if first {
                report.objects += 1;
            }
            let record = match Record::for_oid(oid, v.value().to_vec()) {
                Ok(r) => r,
                Err(e) => {
                    if first {
                        push_listed(
                            &mut report.damaged,
                            &mut report.damaged_count,
                            (oid, e.to_string()),
                        );
                    }
                    continue;
                }
            };
            for r in record.refs() {
                if r.0 >= lo && limit.is_none_or(|l| r.0 < l) {
                    *recount.entry(r.0).or_default() += 1;
                    if recount.len() > RECOUNT_OIDS
                        && let Some((last, _)) = recount.pop_last()
                    {
                        limit = Some(last);
                    }
                }
                if first {
                    report.refs += 1;
                    if records.get(r.0)?.is_none() {
                        push_listed(&mut report.dangling, &mut report.dangling_count, (oid, r));
                    }
                }
            }
        }
        let stored = match limit {
            Some(l) => counts.range(lo..l)?,
            None => counts.range(lo..)?,
        };
        for item in stored {
            let (k, v) = item?;
            let actual = recount.remove(&k.value()).unwrap_or(0);
            if actual != v.value() {
                push_listed(
                    &mut report.count_mismatches,
                    &mut report.mismatch_count,
                    (Oid(k.value()), v.value(), actual),
                );
            }
        }
        // Counted references with no stored count.
        for (oid, actual) in recount {
            push_listed(
                &mut report.count_mismatches,
                &mut report.mismatch_count,
                (Oid(oid), 0, actual),
            );
        }
        match limit {
            Some(l) => lo = l,
            None => break,
        }
    }
    Ok(report)
}

/// The result of [`check_store`].
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct FullCheck {
    /// redb's own integrity check (page checksums, allocator state) passed.
    pub integrity_ok: bool,
    /// Commits in the commit log that are not yet in the file (a writer
    /// that did not close cleanly): a read-only check looks at the file
    /// without them; [`repair_store`] applies them first.
    pub unapplied_log_commits: u64,
    /// The commit log is damaged before its end, or missing although the
    /// store was not closed cleanly: what [`check_store`] found (the store
    /// is then not clean), or what [`repair_store`] gave up to open it.
    pub log_damage: Option<String>,
    /// The reference check.
    pub references: CheckReport,
    /// Statistics.
    pub stats: StoreStats,
}

/// Checks a closed store and never writes to it: redb's integrity check
/// (every page checksum) runs on the file opened through a backend that
/// keeps redb's own writes in memory (so a store that was not closed
/// cleanly is repaired in memory only), then every record, reference and
/// reference count is checked. Commits waiting in the commit log are
/// counted, not applied. A store open for writing elsewhere is refused.
pub fn check_store(path: &Path) -> Result<FullCheck> {
    if !path.exists() {
        return Err(StorageError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )));
    }
    let backend = super::overlay::OverlayBackend::open(path)?;
    let mut db = redb::Builder::new()
        .create_with_backend(backend)
        .map_err(|e| super::open::open_error(path, e))?;
    let integrity_ok = db.check_integrity()?;
    ensure_our_tables(path, &db)?;
    let config = super::EngineConfig {
        checking: true,
        ..super::EngineConfig::read_only()
    };
    let engine = Engine::open_with(path, &config, super::Db::Rw(db))?;
    let applied = super::open::applied_log_seq_of(&engine)?;
    let (unapplied, stop) = super::log::commits_after(&super::log::log_dir(path), applied)?;
    let log_damage =
        super::open::log_problem(path, &*engine.db()?, applied, stop.as_ref())?.map(|e| match e {
            StorageError::DamagedLog { detail, .. } => format!("DAMAGED: {detail}"),
            other => other.to_string(),
        });
    Ok(FullCheck {
        integrity_ok,
        unapplied_log_commits: unapplied,
        log_damage,
        references: check_references(&engine)?,
        stats: stats(&engine)?,
    })
}

/// Repairs a closed store, then checks it as [`check_store`] does: opens it
/// for writing (redb repairs a file that was not closed cleanly), verifies
/// every page checksum, applies the commits waiting in its commit log and
/// brings an older format up to date. Writes to the file.
pub fn repair_store(path: &Path) -> Result<FullCheck> {
    if !path.exists() {
        return Err(StorageError::Io(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("{} does not exist", path.display()),
        )));
    }
    let (integrity_ok, problem) = {
        let mut db = redb::Database::open(path).map_err(|e| super::open::open_error(path, e))?;
        let ok = db.check_integrity()?;
        ensure_our_tables(path, &db)?;
        let db = super::Db::Rw(db);
        let applied = super::open::applied_log_seq(&db)?;
        let (_, stop) = super::log::commits_after(&super::log::log_dir(path), applied)?;
        let problem = super::open::log_problem(path, &db, applied, stop.as_ref())?;
        (ok, problem)
    };
    let config = super::EngineConfig {
        read_only: false,
        importing: true,
        accept_log_damage: true,
        ..super::EngineConfig::read_only()
    };
    let engine = Engine::open(path, &config)?;
    let log_damage = problem.map(|e| match e {
        StorageError::DamagedLog { detail, .. } => format!(
            "gave up the commits after the damage: {detail}; the log is kept beside the store \
             as {}.damaged-<time>",
            super::log::log_dir(path).display()
        ),
        StorageError::MissingLog { log, .. } => format!(
            "opened without the missing commit log {}: the commits acknowledged since the \
             store's last checkpoint are given up",
            log.display()
        ),
        other => other.to_string(),
    });
    Ok(FullCheck {
        integrity_ok,
        unapplied_log_commits: 0,
        log_damage,
        references: check_references(&engine)?,
        stats: stats(&engine)?,
    })
}

/// The file must hold durus-redb's tables, not only be a redb database.
fn ensure_our_tables(path: &Path, db: &redb::Database) -> Result<()> {
    let txn = db.begin_read()?;
    if let Err(e) = txn.open_table(META) {
        return Err(StorageError::NotAStore {
            path: path.to_path_buf(),
            reason: format!("a redb database without durus-redb's tables ({e})"),
        });
    }
    Ok(())
}
