//! Opening a store: creating a new one whole, checking the format of an
//! existing one, refusing a writable open of an unfinished import.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use parking_lot::{Mutex, RwLock};
use redb::ReadableTable;

use super::layout::*;
use super::{CommitState, Db, Engine, EngineConfig};
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
        } else if !config.create && !path.exists() {
            return Err(not_found(path));
        } else {
            if !path.exists() {
                create_atomically(path, config.quick_repair)?;
            }
            Db::Rw(builder.create(path).map_err(|e| open_error(path, e))?)
        };
        let (next_oid, reserved) = init_or_verify(path, &db, config.quick_repair)?;
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
            commit: Mutex::new(CommitState {
                next_oid,
                reserved,
                allocated: HashMap::new(),
                commits_since: 0,
                bytes_since: 0,
                last_checkpoint: Instant::now(),
                applied_seq: 0,
            }),
            committers_waiting: AtomicUsize::new(0),
            durable_seq: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            handles: AtomicUsize::new(0),
            poisoned: Mutex::new(None),
            checkpointer: Mutex::new(None),
            hook: OnceLock::new(),
        });
        if !engine.read_only {
            engine.start_checkpointer()?;
        }
        tracing::debug!(path = %path.display(), next_oid, "store opened");
        Ok(engine)
    }
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
        init_or_verify(&tmp, &db, quick_repair)?;
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
fn init_or_verify(path: &Path, db: &Db, quick_repair: bool) -> Result<(u64, u64)> {
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
        let db = db.rw().map_err(|_| StorageError::NotAStore {
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
            w.open_table(GC_QUEUE)?;
        }
        w.commit()?;
        tracing::info!(path = %path.display(), version = FORMAT_VERSION, "created a new store");
        return Ok((0, 0));
    };
    let info: FormatInfo =
        read_meta(&meta, KEY_FORMAT)?.ok_or_else(|| StorageError::NotAStore {
            path: path.to_path_buf(),
            reason: "no format version in its metadata".into(),
        })?;
    check_version(path, info.version)?;
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
