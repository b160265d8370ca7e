//! The shared engine behind every session of one open store: the redb
//! database, the commit path, oid allocation, durability and invalidations.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use parking_lot::{Mutex, MutexGuard, RwLock, RwLockReadGuard};
use redb::{
    Database, Durability, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, ReadableTable,
    WriteTransaction,
};

use super::layout::*;
use super::options::Options;
use crate::checkpoint::{CheckpointFacts, CheckpointPolicy, CommitDurability, CompactionFacts};
use crate::error::{Conflict, InvalidInput, Result, StorageError};
use crate::record::{Oid, Record, refs_of};
use crate::storage::validate_commit;

/// An identifier of a session (an in-process handle or a server connection).
pub type SessionId = u64;

/// An invalid set: oids a session must treat as invalid until it syncs.
pub type InvalidSet = Arc<Mutex<HashSet<Oid>>>;

pub(crate) enum Db {
    Rw(Database),
    Ro(ReadOnlyDatabase),
}

impl Db {
    pub(crate) fn begin_read(&self) -> Result<ReadTransaction> {
        Ok(match self {
            Db::Rw(db) => db.begin_read()?,
            Db::Ro(db) => db.begin_read()?,
        })
    }

    pub(crate) fn rw(&self) -> Result<&Database> {
        match self {
            Db::Rw(db) => Ok(db),
            Db::Ro(_) => Err(StorageError::ReadOnly),
        }
    }
}

/// State guarded by the commit lock: everything a commit reads or changes
/// outside redb.
pub(crate) struct CommitState {
    pub(crate) next_oid: u64,
    pub(crate) reserved: u64,
    /// Oids handed out and not yet stored, with the session that holds each.
    pub(crate) allocated: HashMap<Oid, SessionId>,
    commits_since: u64,
    bytes_since: u64,
    last_checkpoint: Instant,
    /// Sequence number of the last applied commit.
    applied_seq: u64,
    /// While a full collection runs: every oid stored or referenced by a
    /// commit since its snapshot. The sweep keeps them and what they reach.
    pub(crate) gc_extra: Option<HashSet<Oid>>,
}

impl CommitState {
    fn facts(&self) -> CheckpointFacts {
        CheckpointFacts {
            commits_since_checkpoint: self.commits_since,
            bytes_since_checkpoint: self.bytes_since,
            since_checkpoint: self.last_checkpoint.elapsed(),
        }
    }

    fn checkpointed(&mut self) {
        self.commits_since = 0;
        self.bytes_since = 0;
        self.last_checkpoint = Instant::now();
    }
}

/// What one import batch did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ImportedBatch {
    /// Records that were not in the store before.
    pub(crate) new_objects: u64,
    /// Wrapping sum of the hashes of the records replaced.
    pub(crate) replaced_hash: u64,
    /// The highest oid of the batch.
    pub(crate) max_oid: Option<u64>,
}

/// The result of applying a commit: what remains to make it durable.
#[derive(Debug, Clone, Copy)]
#[must_use = "a commit is acknowledged only after Engine::finish"]
pub struct CommitTicket {
    seq: u64,
    needs_flush: bool,
}

enum Control {
    Stop,
}

struct Checkpointer {
    tx: Sender<Control>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.tx.send(Control::Stop);
        if let Some(h) = self.handle.take() {
            // The last handle may be dropped on the checkpointer itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

/// The shared engine of one open store.
pub struct Engine {
    path: PathBuf,
    db: RwLock<Option<Db>>,
    read_only: bool,
    quick_repair: bool,
    policy: Arc<dyn CheckpointPolicy>,
    commit: Mutex<CommitState>,
    committers_waiting: AtomicUsize,
    durable_seq: AtomicU64,
    flush_lock: Mutex<()>,
    sessions: Mutex<HashMap<SessionId, InvalidSet>>,
    next_session: AtomicU64,
    /// Live `RedbStorage` handles; the last one dropped closes the store.
    pub(crate) handles: AtomicUsize,
    poisoned: Mutex<Option<String>>,
    checkpointer: Mutex<Option<Checkpointer>>,
    /// The garbage collector's state and thread.
    pub(crate) gc: crate::gc::GcShared,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

fn open_error(path: &Path, e: redb::DatabaseError) -> StorageError {
    match e {
        redb::DatabaseError::DatabaseAlreadyOpen => StorageError::AlreadyOpen {
            path: path.display().to_string(),
        },
        redb::DatabaseError::RepairAborted => StorageError::Format(format!(
            "{} was not closed cleanly and needs a repair, which a read-only open cannot do; \
             open it read-write once (`durus-redb check` does)",
            path.display()
        )),
        redb::DatabaseError::Storage(redb::StorageError::Io(io))
            if io.kind() != std::io::ErrorKind::InvalidData =>
        {
            StorageError::Io(io)
        }
        other => StorageError::Format(format!(
            "{} is not a durus-redb store (redb cannot open it: {other})",
            path.display()
        )),
    }
}

pub(crate) fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec(value).expect("metadata encodes")
}

pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::Format(format!("metadata entry {key:?} is unreadable: {e}")))
}

pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    match table.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

impl Engine {
    /// Opens or creates the store at `path`. A writable open of a store
    /// whose import (`migrate`) is unfinished is refused.
    pub fn open(path: &Path, options: &Options) -> Result<Arc<Engine>> {
        Self::open_with(path, options, false)
    }

    /// Opens or creates the store; `importing` allows an unfinished import.
    pub(crate) fn open_with(
        path: &Path,
        options: &Options,
        importing: bool,
    ) -> Result<Arc<Engine>> {
        let mut builder = redb::Builder::new();
        builder.set_cache_size(options.cache_bytes);
        let db = if options.read_only {
            if !path.exists() {
                return Err(StorageError::Io(std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    format!("{} does not exist", path.display()),
                )));
            }
            Db::Ro(
                builder
                    .open_read_only(path)
                    .map_err(|e| open_error(path, e))?,
            )
        } else if !options.create && !path.exists() {
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("{} does not exist", path.display()),
            )));
        } else {
            if !path.exists() {
                Self::create_atomically(path, options.quick_repair)?;
            }
            Db::Rw(builder.create(path).map_err(|e| open_error(path, e))?)
        };
        let (next_oid, reserved) = Self::init_or_verify(path, &db, options.quick_repair)?;
        if !options.read_only && !importing {
            let rtxn = db.begin_read()?;
            let meta = rtxn.open_table(META)?;
            if let Some(state) = meta.get(KEY_MIGRATION)? {
                let source = crate::migrate::describe_state(state.value());
                return Err(StorageError::Format(format!(
                    "{} holds an unfinished import from {source}: run `durus-redb migrate` \
                     again with the same source to finish it",
                    path.display()
                )));
            }
        }
        let engine = Arc::new(Engine {
            path: path.to_path_buf(),
            db: RwLock::new(Some(db)),
            read_only: options.read_only,
            quick_repair: options.quick_repair,
            policy: options.checkpoint.clone(),
            commit: Mutex::new(CommitState {
                next_oid,
                reserved,
                allocated: HashMap::new(),
                commits_since: 0,
                bytes_since: 0,
                last_checkpoint: Instant::now(),
                applied_seq: 0,
                gc_extra: None,
            }),
            committers_waiting: AtomicUsize::new(0),
            durable_seq: AtomicU64::new(0),
            flush_lock: Mutex::new(()),
            sessions: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            handles: AtomicUsize::new(0),
            poisoned: Mutex::new(None),
            checkpointer: Mutex::new(None),
            gc: crate::gc::GcShared::new(options.gc.clone()),
        });
        if !engine.read_only {
            engine.start_checkpointer();
            crate::gc::start(&engine);
        }
        tracing::debug!(path = %path.display(), next_oid, "store opened");
        Ok(engine)
    }

    /// Creates a new, initialised store at `path` without ever leaving a
    /// half-made file there: it is built under a temporary name in the same
    /// directory and linked into place complete (a process killed while
    /// creating a store leaves either no store or a whole one).
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
        // Leftovers of creations killed before they finished.
        if let Ok(entries) = std::fs::read_dir(dir) {
            for e in entries.flatten() {
                let file = e.file_name().to_string_lossy().into_owned();
                if let Some(pid) = file.strip_prefix(&prefix)
                    && !Path::new("/proc").join(pid).exists()
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
            Self::init_or_verify(&tmp, &db, quick_repair)?;
            drop(db);
            match std::fs::hard_link(&tmp, path) {
                Ok(()) => Ok(()),
                // Another process created it meanwhile: that one is used.
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
                // A file system without hard links: a rename is atomic too.
                Err(_) => std::fs::rename(&tmp, path).map_err(StorageError::from),
            }
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
                return Err(StorageError::Format(format!(
                    "{} is a redb database but not a durus-redb store (it has no durus_meta table)",
                    path.display()
                )));
            }
            let db = db.rw().map_err(|_| {
                StorageError::Format(format!(
                    "{} is an empty redb database, not a durus-redb store",
                    path.display()
                ))
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
        let info: FormatInfo = read_meta(&meta, KEY_FORMAT)?.ok_or_else(|| {
            StorageError::Format(format!(
                "{} has no format version in its metadata",
                path.display()
            ))
        })?;
        if info.version > FORMAT_VERSION {
            return Err(StorageError::Format(format!(
                "{} has on-disk format version {}, newer than version {} that this durus-redb {} reads: use a newer durus-redb",
                path.display(),
                info.version,
                FORMAT_VERSION,
                env!("CARGO_PKG_VERSION")
            )));
        }
        if info.version < 1 {
            return Err(StorageError::Format(format!(
                "{} has unknown on-disk format version {}",
                path.display(),
                info.version
            )));
        }
        let oids: OidMeta = read_meta(&meta, KEY_OIDS)?.unwrap_or(OidMeta { reserved: 0 });
        let records = rtxn.open_table(RECORDS)?;
        let after_last = records.last()?.map(|(k, _)| k.value() + 1).unwrap_or(0);
        let next = oids.reserved.max(after_last);
        Ok((next, next))
    }

    fn start_checkpointer(self: &Arc<Self>) {
        let Some(interval) = self.policy.background_interval() else {
            return;
        };
        let (tx, rx): (Sender<Control>, Receiver<Control>) = crossbeam_channel::bounded(1);
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("durus-redb-checkpoint".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(interval) {
                        Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => {
                            let Some(engine) = weak.upgrade() else { return };
                            let due = engine.policy.checkpoint_due(&engine.commit.lock().facts());
                            if due && let Err(e) = engine.checkpoint() {
                                tracing::error!(error = %e, "background checkpoint failed");
                                return;
                            }
                        }
                    }
                }
            })
            .expect("spawn checkpoint thread");
        *self.checkpointer.lock() = Some(Checkpointer {
            tx,
            handle: Some(handle),
        });
    }

    /// The path of the store.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// True if opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.read_only
    }

    pub(crate) fn db(&self) -> Result<parking_lot::MappedRwLockReadGuard<'_, Db>> {
        RwLockReadGuard::try_map(self.db.read(), |d| d.as_ref()).map_err(|_| StorageError::Closed)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        if let Some(why) = self.poisoned.lock().as_ref() {
            return Err(StorageError::Poisoned(why.clone()));
        }
        Ok(())
    }

    /// Marks the store unusable for writes after a failure that leaves redb's
    /// state unknown.
    pub(crate) fn poison(&self, why: &StorageError) {
        tracing::error!(error = %why, "store poisoned");
        let mut p = self.poisoned.lock();
        if p.is_none() {
            *p = Some(why.to_string());
        }
    }

    /// Runs `f` and poisons the store if it fails.
    fn poisoning<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    // ---- sessions and invalidations ------------------------------------

    /// Registers a session and returns its id and invalid set.
    pub fn register_session(&self) -> (SessionId, InvalidSet) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let set: InvalidSet = Arc::new(Mutex::new(HashSet::new()));
        self.sessions.lock().insert(id, set.clone());
        (id, set)
    }

    /// Forgets a session and the oids it held allocated but unused.
    pub fn unregister_session(&self, id: SessionId) {
        self.sessions.lock().remove(&id);
        self.commit.lock().allocated.retain(|_, s| *s != id);
    }

    /// Adds `oids` to the invalid set of every session but `except`.
    pub(crate) fn invalidate_others(&self, except: Option<SessionId>, oids: &[Oid]) {
        if oids.is_empty() {
            return;
        }
        for (id, set) in self.sessions.lock().iter() {
            if Some(*id) != except {
                set.lock().extend(oids.iter().copied());
            }
        }
    }

    /// Whether `session` holds `oid` as allocated but unused.
    pub fn holds_allocated(&self, session: SessionId, oid: Oid) -> bool {
        self.commit.lock().allocated.get(&oid) == Some(&session)
    }

    // ---- loads -----------------------------------------------------------

    /// The record for `oid`, from the latest committed state.
    pub fn load(&self, oid: Oid) -> Result<Record> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        load_from(&table, oid)
    }

    /// The records for `oids` from one snapshot; `None` where absent.
    pub fn load_many(&self, oids: &[Oid]) -> Result<Vec<Option<Record>>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        oids.iter()
            .map(|&oid| match load_from(&table, oid) {
                Ok(r) => Ok(Some(r)),
                Err(StorageError::NotFound(_)) => Ok(None),
                Err(e) => Err(e),
            })
            .collect()
    }

    /// Up to `limit` records with oids above `after` (or from the first), in oid order.
    pub fn records_after(&self, after: Option<Oid>, limit: usize) -> Result<Vec<Record>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let start = match after {
            None => 0,
            Some(Oid(u64::MAX)) => return Ok(Vec::new()),
            Some(Oid(o)) => o + 1,
        };
        let mut out = Vec::new();
        for item in table.range(start..)? {
            let (k, v) = item?;
            out.push(stored_record(Oid(k.value()), v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }

    // ---- oid allocation --------------------------------------------------

    /// Hands out `n` new oids to `session`. The reserved mark is made durable
    /// before any oid above it is handed out.
    pub fn allocate(&self, session: SessionId, n: usize) -> Result<Vec<Oid>> {
        self.check_writable()?;
        let n = n as u64;
        let mut st = self.commit.lock();
        if st.next_oid + n > st.reserved {
            let reserved = st.next_oid + n + OID_BLOCK;
            let r = self.write_oid_meta(reserved, &mut st);
            self.poisoning(r)?;
            st.reserved = reserved;
        }
        let start = st.next_oid;
        st.next_oid += n;
        let oids: Vec<Oid> = (start..start + n).map(Oid).collect();
        for &oid in &oids {
            st.allocated.insert(oid, session);
        }
        Ok(oids)
    }

    /// Durably records the oid reservation mark; this also checkpoints.
    fn write_oid_meta(&self, reserved: u64, st: &mut CommitState) -> Result<()> {
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_quick_repair(self.quick_repair);
        {
            let mut m = w.open_table(META)?;
            m.insert(KEY_OIDS, encode(&OidMeta { reserved }).as_slice())?;
        }
        w.commit()?;
        self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
        st.checkpointed();
        Ok(())
    }

    /// Raises the allocation mark above `oid` (after an import).
    pub(crate) fn reserve_above(&self, oid: Oid) -> Result<()> {
        let mut st = self.commit.lock();
        if oid.0 >= st.next_oid {
            let next = oid.0 + 1;
            self.write_oid_meta(next.max(st.reserved), &mut st)?;
            st.next_oid = next;
            st.reserved = st.reserved.max(next);
        }
        Ok(())
    }

    // ---- import (migration) ----------------------------------------------

    /// The highest oid stored.
    pub(crate) fn last_oid(&self) -> Result<Option<Oid>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        Ok(records.last()?.map(|(k, _)| Oid(k.value())))
    }

    /// The raw metadata value under `key`.
    pub(crate) fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Writes a batch of imported records without the per-commit checks (a
    /// record may reference an oid a later batch brings; imported oids were
    /// never handed out), keeping reference counts exact, and stores the
    /// import state that `state` makes from the batch's figures, all in one
    /// write transaction. Raises the oid mark above every imported oid.
    pub(crate) fn import_batch(
        &self,
        items: &[(Oid, Record)],
        durable: bool,
        state: impl FnOnce(&ImportedBatch) -> Vec<u8>,
    ) -> Result<ImportedBatch> {
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.write_txn(durability, |w, st| {
            let mut batch = ImportedBatch::default();
            let mut delta: HashMap<u64, i64> = HashMap::new();
            {
                let mut table = w.open_table(RECORDS)?;
                for (oid, record) in items {
                    batch.max_oid = batch.max_oid.max(Some(oid.0));
                    match table.insert(oid.0, record.as_bytes())? {
                        Some(old) => {
                            let old = old.value();
                            batch.replaced_hash = batch
                                .replaced_hash
                                .wrapping_add(crate::migrate::record_hash(*oid, old));
                            for r in refs_of(old).map_err(|e| corrupt(*oid, e))? {
                                *delta.entry(r.0).or_default() -= 1;
                            }
                        }
                        None => batch.new_objects += 1,
                    }
                    for r in record.refs() {
                        *delta.entry(r.0).or_default() += 1;
                    }
                }
            }
            apply_ref_deltas(w, delta)?;
            let mut meta = w.open_table(META)?;
            meta.insert(KEY_MIGRATION, state(&batch).as_slice())?;
            if let Some(max) = batch.max_oid
                && max >= st.next_oid
            {
                st.next_oid = max + 1;
                st.reserved = st.reserved.max(max + 1);
                meta.insert(
                    KEY_OIDS,
                    encode(&OidMeta {
                        reserved: st.reserved,
                    })
                    .as_slice(),
                )?;
            }
            Ok(batch)
        })
    }

    /// Ends an import: removes its state (the collector and writable opens
    /// are allowed again), records `summary` under the `imported` key, and
    /// makes everything durable.
    pub(crate) fn finish_import(&self, summary: &[u8]) -> Result<()> {
        self.write_txn(Durability::Immediate, |w, _| {
            let mut meta = w.open_table(META)?;
            meta.remove(KEY_MIGRATION)?;
            meta.insert(KEY_IMPORTED, summary)?;
            Ok(())
        })
    }

    // ---- commits ---------------------------------------------------------

    /// Whether a committer is waiting for the commit lock (the collector
    /// then cuts its step short).
    pub(crate) fn committers_waiting(&self) -> bool {
        self.committers_waiting.load(Ordering::Acquire) > 0
    }

    /// Lets committers waiting for the writer go first (for a few
    /// milliseconds at most), before a collector transaction.
    pub(crate) fn yield_to_committers(&self) {
        let deadline = Instant::now() + std::time::Duration::from_millis(5);
        while self.committers_waiting() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Takes the commit lock. Nothing else commits while the guard lives; the
    /// server holds it from sending a client its invalidations until that
    /// client's commit is applied.
    pub fn lock_commits(&self) -> CommitGuard<'_> {
        self.committers_waiting.fetch_add(1, Ordering::AcqRel);
        let state = self.commit.lock();
        self.committers_waiting.fetch_sub(1, Ordering::AcqRel);
        CommitGuard {
            engine: self,
            state,
        }
    }

    /// Commits `records` for `session` and returns once the checkpoint policy
    /// is satisfied (for `EveryCommit`: once durable).
    pub fn commit(&self, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<()> {
        let ticket = self.lock_commits().apply(session, records)?;
        self.finish(ticket)
    }

    /// Waits until the commit of `ticket` is as durable as its policy asked.
    pub fn finish(&self, ticket: CommitTicket) -> Result<()> {
        if !ticket.needs_flush || self.durable_seq.load(Ordering::Acquire) >= ticket.seq {
            return Ok(());
        }
        let _leader = self.flush_lock.lock();
        if self.durable_seq.load(Ordering::Acquire) >= ticket.seq {
            return Ok(());
        }
        // The group's flush runs without the commit lock, so that other
        // connections go on sending invalidations and receiving commit data
        // meanwhile (their writes wait for redb's single writer only).
        // Every commit applied before this durable transaction becomes
        // durable with it.
        let target = self.commit.lock().applied_seq;
        self.durable_flush()?;
        self.durable_seq.fetch_max(target, Ordering::AcqRel);
        let mut st = self.commit.lock();
        if st.applied_seq == target {
            // Nothing was applied meanwhile: the policy's counters restart.
            st.checkpointed();
        }
        Ok(())
    }

    /// An empty durable write transaction: redb makes every transaction
    /// committed before it durable with it. A failure poisons the store.
    fn durable_flush(&self) -> Result<()> {
        let r = (|| -> Result<()> {
            let db = self.db()?;
            let mut w = db.rw()?.begin_write()?;
            w.set_quick_repair(self.quick_repair);
            w.commit()?;
            Ok(())
        })();
        self.poisoning(r)
    }

    /// Makes every applied commit durable (one fsync).
    pub fn checkpoint(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.commit.lock();
        if st.applied_seq == self.durable_seq.load(Ordering::Acquire) && st.commits_since == 0 {
            return Ok(());
        }
        self.durable_flush()?;
        self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
        st.checkpointed();
        Ok(())
    }

    // ---- write transactions for other workers (collector, migration) ------

    /// Runs `f` in a write transaction under the commit lock with the given
    /// durability. A failure poisons the store.
    pub(crate) fn write_txn<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, &mut CommitState) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        let mut guard = self.lock_commits();
        let st = &mut *guard.state;
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_durability(durability)?;
        w.set_quick_repair(self.quick_repair);
        let value = match f(&w, st) {
            Ok(v) => v,
            Err(e) => {
                drop(w);
                return Err(e);
            }
        };
        let r = w.commit().map_err(StorageError::from);
        self.poisoning(r)?;
        st.applied_seq += 1;
        if matches!(durability, Durability::Immediate) {
            self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
            st.checkpointed();
        } else {
            st.commits_since += 1;
        }
        Ok(value)
    }

    // ---- closing ---------------------------------------------------------

    /// Checkpoints, compacts if the policy asks, and closes the database.
    /// Later calls on any session fail with [`StorageError::Closed`].
    pub fn close(&self) -> Result<()> {
        self.gc.shutdown();
        drop(self.checkpointer.lock().take());
        let mut slot = self.db.write();
        let Some(db) = slot.take() else { return Ok(()) };
        let Db::Rw(mut db) = db else { return Ok(()) };
        if self.poisoned.lock().is_some() {
            return Ok(());
        }
        {
            let mut st = self.commit.lock();
            // Persist the exact oid mark and make every applied commit durable,
            // unless both already are.
            let pending =
                st.applied_seq != self.durable_seq.load(Ordering::Acquire) || st.commits_since > 0;
            if pending || st.next_oid != st.reserved {
                let mut w = db.begin_write()?;
                w.set_quick_repair(self.quick_repair);
                {
                    let mut m = w.open_table(META)?;
                    m.insert(
                        KEY_OIDS,
                        encode(&OidMeta {
                            reserved: st.next_oid,
                        })
                        .as_slice(),
                    )?;
                }
                w.commit()?;
                st.reserved = st.next_oid;
                st.checkpointed();
            }
            let file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
            // Only a large file can be worth compacting: skip the stats otherwise.
            if file_bytes >= 64 << 20 {
                let fragmented = {
                    let w = db.begin_write()?;
                    let f = w.stats()?.fragmented_bytes();
                    w.abort()?;
                    f
                };
                let facts = CompactionFacts {
                    file_bytes,
                    fragmented_bytes: fragmented,
                };
                if self.policy.compact_on_close(&facts) {
                    tracing::info!(?facts, "compacting on close");
                    db.compact()?;
                }
            }
        }
        drop(db);
        tracing::debug!(path = %self.path.display(), "store closed");
        Ok(())
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}

/// The commit lock, held.
pub struct CommitGuard<'a> {
    engine: &'a Engine,
    state: MutexGuard<'a, CommitState>,
}

impl CommitGuard<'_> {
    /// Validates and applies one commit of `session` in its own redb write
    /// transaction. Nothing is written if validation fails. Call
    /// [`Engine::finish`] with the ticket, after dropping the guard, before
    /// acknowledging the commit.
    pub fn apply(
        &mut self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
    ) -> Result<CommitTicket> {
        let engine = self.engine;
        engine.check_writable()?;
        let st = &mut *self.state;
        if records.is_empty() {
            return Ok(CommitTicket {
                seq: st.applied_seq,
                needs_flush: false,
            });
        }
        let bytes: u64 = records.values().map(|r| r.len() as u64).sum();
        let mut facts = st.facts();
        facts.commits_since_checkpoint += 1;
        facts.bytes_since_checkpoint += bytes;
        let decision = engine.policy.on_commit(&facts);
        // With other committers queued, make this commit cheap and let one
        // flush cover all of them (group commit).
        let immediate = decision == CommitDurability::Now
            && engine.committers_waiting.load(Ordering::Acquire) == 0;

        let db = engine.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_durability(if immediate {
            Durability::Immediate
        } else {
            Durability::None
        })?;
        w.set_quick_repair(engine.quick_repair);
        let queued = write_commit(&w, session, records, &st.allocated)?;
        // The commit's share of the collector's work, in its own transaction.
        let share = engine.gc.policy.in_commit();
        let (collected, collected_bytes) = if share > 0 && engine.gc.queue_maybe_nonempty() {
            let (removed, bytes, empty) = crate::gc::delete_queued(&w, share, || false)?;
            if empty {
                engine.gc.queue_found_empty();
            }
            (removed, bytes)
        } else {
            (Vec::new(), 0)
        };
        let r = w.commit().map_err(StorageError::from);
        engine.poisoning(r)?;

        st.applied_seq += 1;
        let seq = st.applied_seq;
        if immediate {
            engine.durable_seq.fetch_max(seq, Ordering::AcqRel);
            st.checkpointed();
        } else {
            st.commits_since = facts.commits_since_checkpoint;
            st.bytes_since = facts.bytes_since_checkpoint;
        }
        let oids: Vec<Oid> = records.keys().copied().collect();
        for oid in &oids {
            st.allocated.remove(oid);
        }
        if let Some(extra) = st.gc_extra.as_mut() {
            for r in records.values() {
                extra.insert(r.oid());
                extra.extend(r.refs());
            }
        }
        engine.invalidate_others(Some(session), &oids);
        if !collected.is_empty() {
            engine.invalidate_others(None, &collected);
            engine
                .gc
                .note_deleted(collected.len() as u64, collected_bytes, false);
        }
        engine.gc.committed(bytes, queued);
        Ok(CommitTicket {
            seq,
            needs_flush: decision == CommitDurability::Now && !immediate,
        })
    }

    /// The engine this guard locks.
    pub fn engine(&self) -> &Engine {
        self.engine
    }
}

/// Validates a commit inside `w` and writes its records and reference counts.
/// Every check runs before the first write. Returns how many oids it queued
/// for the collector.
fn write_commit(
    w: &WriteTransaction,
    session: SessionId,
    records: &BTreeMap<Oid, Record>,
    allocated: &HashMap<Oid, SessionId>,
) -> Result<u64> {
    let mut table = w.open_table(RECORDS)?;
    {
        let t = &table;
        validate_commit(
            records,
            |oid| Ok(t.get(oid.0)?.is_some()),
            |oid, present| {
                if present || oid == Oid::ROOT {
                    return Ok(());
                }
                match allocated.get(&oid) {
                    Some(&s) if s == session => Ok(()),
                    Some(_) => Err(InvalidInput::OidOfAnotherSession { oid }.into()),
                    None => Err(Conflict::UnknownOid { oid }.into()),
                }
            },
        )?;
    }
    let mut delta: HashMap<u64, i64> = HashMap::new();
    for (oid, record) in records {
        if let Some(old) = table.insert(oid.0, record.as_bytes())? {
            for r in refs_of(old.value()).map_err(|e| corrupt(*oid, e))? {
                *delta.entry(r.0).or_default() -= 1;
            }
        }
        for r in record.refs() {
            *delta.entry(r.0).or_default() += 1;
        }
    }
    drop(table);
    apply_ref_deltas(w, delta)
}

/// Applies reference count changes; an oid whose count falls to zero is queued
/// for the collector.
/// Returns how many oids were queued.
pub(crate) fn apply_ref_deltas(w: &WriteTransaction, delta: HashMap<u64, i64>) -> Result<u64> {
    if delta.values().all(|d| *d == 0) {
        return Ok(0);
    }
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut queue = w.open_table(GC_QUEUE)?;
    apply_ref_deltas_in(&mut counts, &mut queue, delta)
}

/// [`apply_ref_deltas`] on tables the caller holds open.
pub(crate) fn apply_ref_deltas_in(
    counts: &mut redb::Table<u64, u64>,
    queue: &mut redb::Table<u64, ()>,
    delta: HashMap<u64, i64>,
) -> Result<u64> {
    let mut delta: Vec<(u64, i64)> = delta.into_iter().filter(|(_, d)| *d != 0).collect();
    delta.sort_unstable();
    let mut queued = 0;
    for (oid, d) in delta {
        let current = counts.get(oid)?.map(|v| v.value()).unwrap_or(0);
        let new = current as i64 + d;
        if new < 0 {
            return Err(StorageError::Poisoned(format!(
                "reference count of oid {oid} would fall below zero: the reference bookkeeping is damaged (run `durus-redb check`)"
            )));
        }
        if new == 0 {
            counts.remove(oid)?;
            queue.insert(oid, ())?;
            queued += 1;
        } else {
            counts.insert(oid, new as u64)?;
        }
    }
    Ok(queued)
}

pub(crate) fn corrupt(oid: Oid, e: crate::RecordError) -> StorageError {
    StorageError::Format(format!("stored record for oid {oid} is damaged: {e}"))
}

pub(crate) fn stored_record(oid: Oid, bytes: &[u8]) -> Result<Record> {
    Record::for_oid(oid, bytes.to_vec()).map_err(|e| corrupt(oid, e))
}

pub(crate) fn load_from(
    table: &impl ReadableTable<u64, &'static [u8]>,
    oid: Oid,
) -> Result<Record> {
    match table.get(oid.0)? {
        Some(v) => stored_record(oid, v.value()),
        None => Err(StorageError::NotFound(oid)),
    }
}

impl CommitGuard<'_> {
    pub(crate) fn state_mut(&mut self) -> &mut CommitState {
        &mut self.state
    }
}
