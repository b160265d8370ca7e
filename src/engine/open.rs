//! Opening a store: creating a new one whole, checking the format of an
//! existing one, refusing a writable open of an unfinished import.

use std::path::Path;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use crate::ranked::{Mutex, RwLock};
use redb::ReadableTable;

use super::commit::write_commit;
use super::layout::*;
use super::{CommitState, Db, Engine, EngineConfig, log};
use crate::checkpoint::Durability;
use crate::error::{Result, StorageError};

pub(super) fn open_error(path: &Path, e: redb::DatabaseError) -> StorageError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StorageError::AlreadyOpen {
            path: path.display().to_string(),
        },
        redb::DatabaseError::RepairAborted => StorageError::NeedsRepair {
            path: path.to_path_buf(),
        },
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() != std::io::ErrorKind::InvalidData =>
        {
            StorageError::Io(io)
        }
        other => StorageError::NotAStore {
            path: path.to_path_buf(),
            reason: format!("redb cannot open it: {other}"),
        },
    }
}

fn not_found(path: &Path) -> StorageError {
    StorageError::Io(std::io::Error::new(
        std::io::ErrorKind::NotFound,
        format!("{} does not exist", path.display()),
    ))
}

impl Engine {
    /// Opens or creates the store at `path`. A writable open of a store
    /// whose import (`migrate`) is unfinished is refused unless
    /// `config.importing`.
    pub(crate) fn open(path: &Path, config: &EngineConfig) -> Result<Arc<Engine>> {
        let db = open_db(path, config)?;
        Engine::open_with(path, config, db)
    }

    /// Opens the engine on a database already opened (`check` opens the
    /// file through an [`OverlayBackend`](super::overlay::OverlayBackend)
    /// and verifies it first).
    pub(crate) fn open_with(path: &Path, config: &EngineConfig, db: Db) -> Result<Arc<Engine>> {
        let (next_oid, reserved) =
            init_or_verify(path, &db, config.quick_repair, config.read_only)?;
        let log_dir = log::log_dir(path);
        let log_seq = if config.read_only {
            let applied = applied_log_seq(&db)?;
            if !config.checking {
                let (waiting, stop) = log::commits_after(&log_dir, applied)?;
                if let Some(e) = log_problem(path, &db, applied, stop.as_ref())? {
                    return Err(e);
                }
                if waiting > 0 {
                    return Err(StorageError::UnappliedLog {
                        path: path.to_path_buf(),
                        commits: waiting,
                    });
                }
            }
            applied
        } else {
            replay(path, &db, config)?
        };
        let log = match config.durability {
            _ if config.read_only => None,
            Durability::Manual => {
                // The file holds every logged commit now: it says so before
                // the log goes, so that a crash in between is no alarm.
                mark_log_open(&db, false, config.quick_repair)?;
                log::remove_log(&log_dir)?;
                None
            }
            _ => {
                let log = log::CommitLog::start(&log_dir, log_seq + 1)?;
                mark_log_open(&db, true, config.quick_repair)?;
                Some(Arc::new(log))
            }
        };
        if !config.read_only && !config.importing {
            let rtxn = db.begin_read()?;
            let meta = rtxn.open_table(META)?;
            if let Some(state) = meta.get(KEY_MIGRATION)? {
                return Err(StorageError::UnfinishedImport {
                    path: path.to_path_buf(),
                    from: describe_import_state(state.value()),
                });
            }
        }
        let engine = Arc::new(Engine {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            read_only: config.read_only,
            quick_repair: config.quick_repair,
            policy: config.checkpoint.clone(),
            durability: config.durability,
            commit: Mutex::new(CommitState {
                next_oid,
                reserved,
                oid_block: OID_BLOCK,
                reserved_at: None,
                commits_since: 0,
                bytes_since: 0,
                last_checkpoint: Instant::now(),
                applied_seq: 0,
                log_seq,
                turns_done: 0,
                parked: None,
            }),
            seq: super::commit::Sequencer::new(),
            pins: Default::default(),
            alloc: super::sessions::Allocator::new(next_oid),
            inv: super::sessions::Invalidations::new(),
            sync: super::durability::Syncer::new(log, log_seq),
            handles: AtomicUsize::new(0),
            poisoned: Mutex::new(None),
            hook: OnceLock::new(),
            poison_watch: OnceLock::new(),
            #[cfg(test)]
            on_visible: OnceLock::new(),
            #[cfg(test)]
            on_lined: OnceLock::new(),
            #[cfg(test)]
            on_placing: OnceLock::new(),
        });
        if !engine.read_only {
            engine.start_checkpointer()?;
        }
        tracing::debug!(path = %path.display(), next_oid, "store opened");
        Ok(engine)
    }
}

/// Opens (or creates) the redb database of the store as `config` says.
fn open_db(path: &Path, config: &EngineConfig) -> Result<Db> {
    let mut builder = redb::Builder::new();
    builder.set_cache_size(config.cache_bytes);
    let db = if config.read_only {
        if !path.exists() {
            return Err(not_found(path));
        }
        Db::Ro(
            builder
                .open_read_only(path)
                .map_err(|e| open_error(path, e))?,
        )
    } else if let Some(db) = simulated_disk(config, &builder, path)? {
        db
    } else if !config.create && !path.exists() {
        return Err(not_found(path));
    } else {
        if !path.exists() {
            create_atomically(path, config.quick_repair)?;
        }
        Db::Rw(builder.create(path).map_err(|e| open_error(path, e))?)
    };
    Ok(db)
}

/// Tests: the database on the simulated disk of `config`, if it has one.
#[cfg(test)]
fn simulated_disk(
    config: &EngineConfig,
    builder: &redb::Builder,
    path: &Path,
) -> Result<Option<Db>> {
    match &config.disk {
        None => Ok(None),
        Some(disk) => Ok(Some(Db::Rw(
            builder
                .create_with_backend(super::powercut::DiskBackend(disk.clone()))
                .map_err(|e| open_error(path, e))?,
        ))),
    }
}

#[cfg(not(test))]
fn simulated_disk(_: &EngineConfig, _: &redb::Builder, _: &Path) -> Result<Option<Db>> {
    Ok(None)
}

/// Creates a new, initialised store at `path` without ever leaving a
/// half-made file there: it is built under a temporary name in the same
/// directory and linked into place complete (a process killed while creating
/// a store leaves either no store or a whole one). A leftover temporary file
/// of a creator that died is removed: redb holds a lock on the file while it
/// is open, and a dead process holds none, so a leftover that can be locked
/// is one nobody is creating.
fn create_atomically(path: &Path, quick_repair: bool) -> Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "store".into());
    let prefix = format!(".{name}.creating-");
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let file = e.file_name().to_string_lossy().into_owned();
            if file.starts_with(&prefix)
                && let Ok(f) = std::fs::File::open(e.path())
                && f.try_lock().is_ok()
            {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
    let tmp = dir.join(format!("{prefix}{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let made = (|| -> Result<()> {
        let db = Db::Rw(
            redb::Builder::new()
                .create(&tmp)
                .map_err(|e| open_error(&tmp, e))?,
        );
        init_or_verify(&tmp, &db, quick_repair, false)?;
        // Linked while still open (and so locked): a concurrent creator
        // never takes it for a leftover.
        let linked = match std::fs::hard_link(&tmp, path) {
            Ok(()) => Ok(()),
            // Another process created it meanwhile: that one is used.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            // A file system without hard links: a rename is atomic too.
            Err(_) => std::fs::rename(&tmp, path).map_err(StorageError::from),
        };
        drop(db);
        linked
    })();
    let _ = std::fs::remove_file(&tmp);
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    made
}

/// Creates the tables of a new store, or checks the format of an existing
/// one. Returns the next oid to hand out and the reserved mark.
fn init_or_verify(path: &Path, db: &Db, quick_repair: bool, read_only: bool) -> Result<(u64, u64)> {
    let rtxn = db.begin_read()?;
    let meta = match rtxn.open_table(META) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let Some(meta) = meta else {
        let empty = rtxn.list_tables()?.next().is_none();
        drop(rtxn);
        if !empty {
            return Err(StorageError::NotAStore {
                path: path.to_path_buf(),
                reason: "a redb database without a durus_meta table".into(),
            });
        }
        let db = db
            .rw()
            .ok()
            .filter(|_| !read_only)
            .ok_or_else(|| StorageError::NotAStore {
                path: path.to_path_buf(),
                reason: "an empty redb database".into(),
            })?;
        let mut w = db.begin_write()?;
        w.set_quick_repair(quick_repair);
        {
            let mut m = w.open_table(META)?;
            let info = FormatInfo {
                version: FORMAT_VERSION,
                created_by: format!("durus-redb {}", env!("CARGO_PKG_VERSION")),
            };
            m.insert(KEY_FORMAT, encode(&info).as_slice())?;
            m.insert(KEY_OIDS, encode(&OidMeta { reserved: 0 }).as_slice())?;
            w.open_table(RECORDS)?;
            w.open_table(REFCOUNTS)?;
            w.open_table(GC_DUE)?;
            w.open_table(GC_DROPPED)?;
            w.open_table(LOG_STATE)?.insert(KEY_APPLIED, 0)?;
        }
        w.commit()?;
        tracing::debug!(path = %path.display(), version = FORMAT_VERSION, "created a new store");
        return Ok((0, 0));
    };
    let info: FormatInfo =
        read_meta(&meta, KEY_FORMAT)?.ok_or_else(|| StorageError::NotAStore {
            path: path.to_path_buf(),
            reason: "no format version in its metadata".into(),
        })?;
    check_version(path, info.version)?;
    if info.version < FORMAT_VERSION
        && !read_only
        && let Ok(rw) = db.rw()
    {
        drop(meta);
        drop(rtxn);
        upgrade(path, rw, info, quick_repair)?;
        return init_or_verify(path, db, quick_repair, read_only);
    }
    let oids: OidMeta = read_meta(&meta, KEY_OIDS)?.unwrap_or(OidMeta { reserved: 0 });
    let records = rtxn.open_table(RECORDS)?;
    let after_last = match records.last()? {
        Some((k, _)) => k.value().saturating_add(1),
        None => 0,
    };
    let next = oids.reserved.max(after_last);
    Ok((next, next))
}

/// Refuses a format version this build does not read.
pub(crate) fn check_version(path: &Path, found: u32) -> Result<()> {
    if (OLDEST_FORMAT_VERSION..=FORMAT_VERSION).contains(&found) {
        Ok(())
    } else {
        Err(StorageError::UnsupportedFormat {
            path: path.to_path_buf(),
            found,
            oldest: OLDEST_FORMAT_VERSION,
            newest: FORMAT_VERSION,
        })
    }
}

/// Upgrades a store of an older format to [`FORMAT_VERSION`] in one durable
/// transaction. Format 1 -> 2: the commit log's state table is added (the
/// log itself lives beside the file). Format 2 -> 3: the collector's queue
/// moves from `durus_gc_queue` (by oid) to `durus_gc_due` (by drop time),
/// every entry with the upgrade's time. Records and counts are unchanged.
fn upgrade(path: &Path, db: &redb::Database, info: FormatInfo, quick_repair: bool) -> Result<()> {
    let mut w = db.begin_write()?;
    w.set_quick_repair(quick_repair);
    {
        let mut m = w.open_table(META)?;
        let upgraded = FormatInfo {
            version: FORMAT_VERSION,
            created_by: info.created_by.clone(),
        };
        m.insert(KEY_FORMAT, encode(&upgraded).as_slice())?;
        let mut l = w.open_table(LOG_STATE)?;
        if l.get(KEY_APPLIED)?.is_none() {
            l.insert(KEY_APPLIED, 0)?;
        }
        let now = now_unix_ms();
        let mut due = w.open_table(GC_DUE)?;
        let mut dropped = w.open_table(GC_DROPPED)?;
        let old = match w.open_table(GC_QUEUE_V2) {
            Ok(t) => Some(t),
            Err(redb::TableError::TableDoesNotExist(_)) => None,
            Err(e) => return Err(e.into()),
        };
        if let Some(old) = old {
            for item in old.iter()? {
                let oid = item?.0.value();
                due.insert((now, oid), ())?;
                dropped.insert(oid, now)?;
            }
            drop(old);
            w.delete_table(GC_QUEUE_V2)?;
        }
    }
    w.commit()?;
    tracing::info!(
        path = %path.display(),
        from = info.version,
        to = FORMAT_VERSION,
        "upgraded the store's format"
    );
    Ok(())
}

/// What is wrong with the commit log of the store at `path`, whose file
/// holds the logged commits up to `applied`: the damage `stop` names, or
/// the log directory missing although the store says a writer with a log
/// did not close it.
pub(super) fn log_problem(
    path: &Path,
    db: &Db,
    applied: u64,
    stop: Option<&log::LogStop>,
) -> Result<Option<StorageError>> {
    if let Some(stop) = stop.filter(|s| s.damage) {
        return Ok(Some(StorageError::DamagedLog {
            path: path.to_path_buf(),
            detail: stop.describe(applied),
        }));
    }
    let dir = log::log_dir(path);
    if !dir.exists() && log_marked_open(db)? {
        return Ok(Some(StorageError::MissingLog {
            path: path.to_path_buf(),
            log: dir,
        }));
    }
    Ok(None)
}

/// Whether the store says a writer with a commit log has it open (or did
/// not close it cleanly).
fn log_marked_open(db: &Db) -> Result<bool> {
    let rtxn = db.begin_read()?;
    let t = match rtxn.open_table(LOG_STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(false),
        Err(e) => return Err(e.into()),
    };
    Ok(t.get(KEY_LOG_OPEN)?.is_some_and(|v| v.value() != 0))
}

/// Records durably whether a writer with a commit log has the store open
/// (nothing is written if the store already says so).
fn mark_log_open(db: &Db, open: bool, quick_repair: bool) -> Result<()> {
    if log_marked_open(db)? == open {
        return Ok(());
    }
    let mut w = db.rw()?.begin_write()?;
    w.set_quick_repair(quick_repair);
    w.open_table(LOG_STATE)?
        .insert(KEY_LOG_OPEN, u64::from(open))?;
    w.commit()?;
    Ok(())
}

/// The last logged commit the file holds (0 if none was ever logged).
/// The last logged commit the engine's file holds.
pub(super) fn applied_log_seq_of(engine: &Engine) -> Result<u64> {
    applied_log_seq(&*engine.db()?)
}

pub(super) fn applied_log_seq(db: &Db) -> Result<u64> {
    let rtxn = db.begin_read()?;
    let t = match rtxn.open_table(LOG_STATE) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    Ok(t.get(KEY_APPLIED)?.map(|v| v.value()).unwrap_or(0))
}

/// Applies the commits in the log that the file does not hold (the last
/// writer did not close cleanly), and makes the file durable with them.
/// Idempotent: a crash during a replay leaves the file as it was before it,
/// and the next open replays again. Returns the last logged commit.
///
/// A log damaged before its end, or missing although the store was not
/// closed cleanly, refuses the open ([`StorageError::DamagedLog`],
/// [`StorageError::MissingLog`]) unless `config.accept_log_damage`: then the
/// commits before the damage are kept, the log is set aside with an ERROR
/// naming what was given up, and the store opens.
fn replay(path: &Path, db: &Db, config: &EngineConfig) -> Result<u64> {
    let quick_repair = config.quick_repair;
    let dir = log::log_dir(path);
    let applied = applied_log_seq(db)?;
    if !dir.exists() {
        if let Some(e) = log_problem(path, db, applied, None)? {
            if !config.accept_log_damage {
                return Err(e);
            }
            tracing::error!(
                error = %e,
                "opening without the missing commit log, as asked: the commits it held are given up"
            );
        }
        return Ok(applied);
    }
    let rw = db.rw()?;
    let started = std::time::Instant::now();
    let log::LogRead { last, stop } = log::read_log(&dir, applied, 8 << 20, |batch| {
        if batch.is_empty() {
            return Ok(());
        }
        let mut w = rw.begin_write()?;
        w.set_durability(redb::Durability::None)?;
        w.set_quick_repair(quick_repair);
        let mut seq = 0;
        for commit in batch {
            let records = commit.records.into_iter().map(|r| (r.oid(), r)).collect();
            write_commit(&w, None, &records)?;
            seq = commit.seq;
        }
        w.open_table(LOG_STATE)?.insert(KEY_APPLIED, seq)?;
        w.commit()?;
        Ok(())
    })?;
    // The replayed commits are made durable before anything happens to the
    // log: a crash in between replays them again.
    if last > applied {
        let mut w = rw.begin_write()?;
        w.set_quick_repair(quick_repair);
        w.commit()?;
        tracing::info!(
            path = %path.display(),
            commits = last - applied,
            ms = started.elapsed().as_millis() as u64,
            "replayed the commit log"
        );
    }
    if let Some(stop) = &stop {
        if stop.damage {
            // Not a torn tail: something is damaged in the middle of the log.
            let detail = stop.describe(last);
            if !config.accept_log_damage {
                return Err(StorageError::DamagedLog {
                    path: path.to_path_buf(),
                    detail,
                });
            }
            let mut name = dir.file_name().unwrap_or_default().to_os_string();
            name.push(format!(".damaged-{}", super::layout::now_unix_ms()));
            let aside = dir.with_file_name(name);
            tracing::error!(
                damage = %detail,
                kept = %aside.display(),
                "the commit log is damaged before its end: kept the commits up to {last}, gave up every later one as asked; the log is kept aside"
            );
            std::fs::rename(&dir, &aside)?;
        } else {
            tracing::warn!(
                segment = %stop.segment.display(),
                offset = stop.offset,
                reason = %stop.reason,
                "the commit log ends in a torn or corrupt entry (a crash while it was written); replayed the commits before it"
            );
        }
    }
    Ok(last)
}
