//! The engine behind every session of one open store: the redb database, the
//! commit path, oid allocation, durability and invalidations. Crate-private:
//! users reach it through [`RedbStorage`](crate::RedbStorage); the server,
//! the collector and the migration through the narrow APIs of its files.
//!
//! - `layout`: tables, metadata and their encodings (the on-disk format).
//! - `open`: opening, creating and checking the format of a store.
//! - `sessions`: sessions, the shared invalidation log, snapshots and oid
//!   allocation.
//! - `commit`: the commit order and its turns, the commit lock, validation
//!   and the apply of a commit.
//! - `durability`: group flushes, checkpoints, the checkpoint thread, close.
//! - `log`: the commit log and its replay.
//! - `import`: the import path of `migrate`.
//! - `refcount`: reference counts and the collector's queue.
//! - `check`: `check` and `stats`.
//!
//! # Lock order
//! One order for every lock of the engine and the collector, written in
//! their types as ranks (`crate::ranked::rank`, lowest taken first): the
//! collector's `full_lock`, `checkpoint_lock`, the commit order, `commit`,
//! `db`, `syncing`, the log's writer, its segment list, `publish`,
//! `changes`, `sessions`, a session's state, `allocs`, `pins`, `line`, and
//! the leaves (nothing taken under them). A thread takes a lock only while
//! every lock it holds ranks lower; debug builds check every acquisition
//! and panic naming both locks, so the whole test suite runs with the
//! check on and this paragraph cannot drift from the code.
//!
//! # Terms
//! - **commit order**: the global order of commits (the server holds it
//!   from a client's invalidations to its commit's turn), a sequencer with
//!   a first-come queue (`order`).
//! - **turn**: a commit's number in that order; commits are applied in
//!   turn order.
//! - **line**: the commits placed in the order and waiting to be applied;
//!   whichever committer in line gets there first applies several of them
//!   in one redb transaction (a batch, by flat combining).
//! - **group sync**: one `fdatasync` of the commit log covers every commit
//!   appended before it (group commit).
//! - **checkpoint**: a durable redb commit, after which the log before it
//!   is dropped.
//! - **pins / doomed**: what placed commits need, and what a collector
//!   transaction not yet committed deletes (pending deletions).
//! - **parked deletion**: a collector transaction cut short for a waiting
//!   committer and committed with that committer's commit.
//! - **publication**: a commit's changed oids in the shared change log,
//!   from which each session drains its invalidations.

mod check;
mod commit;
mod durability;
mod import;
pub(crate) mod layout;
pub(crate) mod log;
mod open;
pub(crate) mod order;
mod overlay;
mod pins;
#[cfg(test)]
mod powercut;
mod readgate;
mod refcount;
mod sessions;

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, OnceLock};

use crate::ranked::{MappedReadGuard, Mutex, ReadGuard, RwLock, rank};
use redb::{Database, ReadOnlyDatabase, ReadTransaction, ReadableDatabase, WriteTransaction};

pub use check::{CheckReport, FullCheck, StoreStats, check_store, repair_store};
pub(crate) use check::{check_references, stats};
use commit::{CommitState, CommitTicket};
pub(crate) use commit::{OrderEntry, OrderGuard, Placed, QueuedOrder};
pub(crate) use order::{Grant, Standing};
pub(crate) use pins::{Pins, Undoom};
pub(crate) use refcount::{
    Deleted, apply_ref_deltas, corrupt, delete_queued, forget, queue_summary, queued_since,
};
pub(crate) use sessions::{Found, SessionId, SessionRef, Snapshot};

use crate::checkpoint::{CheckpointPolicy, Durability};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};
use layout::RECORDS;
use refcount::load_from;

/// What [`Engine::each_record`] hands out: the count first, then each record.
pub(crate) enum Walk<'a> {
    Count(u64),
    Record(&'a [u8]),
}

/// How the engine is opened (built by [`Options`](crate::Options)).
#[derive(Debug, Clone)]
pub(crate) struct EngineConfig {
    pub(crate) read_only: bool,
    pub(crate) create: bool,
    pub(crate) durability: Durability,
    pub(crate) checkpoint: Arc<dyn CheckpointPolicy>,
    pub(crate) cache_bytes: usize,
    pub(crate) quick_repair: bool,
    /// An unfinished import is allowed (the migration opens it).
    pub(crate) importing: bool,
    /// A read-only open for `check`: commits waiting in the log are
    /// reported, not refused.
    pub(crate) checking: bool,
    /// A commit log damaged before its end, or missing after an unclean
    /// close, is given up (kept aside, with an ERROR) instead of refusing
    /// the open: `check --repair`.
    pub(crate) accept_log_damage: bool,
    /// Tests: the file is this simulated disk instead of `path`.
    #[cfg(test)]
    pub(crate) disk: Option<std::sync::Arc<powercut::Disk>>,
}

impl EngineConfig {
    /// A read-only open with the default cache.
    pub(crate) fn read_only() -> EngineConfig {
        EngineConfig {
            read_only: true,
            create: false,
            durability: Durability::Manual,
            checkpoint: Arc::new(crate::checkpoint::Manual),
            cache_bytes: 32 << 20,
            quick_repair: true,
            importing: false,
            checking: false,
            accept_log_damage: false,
            #[cfg(test)]
            disk: None,
        }
    }
}

/// What is told when the store is poisoned: the reason.
pub(crate) type PoisonWatch = Arc<dyn Fn(&str) + Send + Sync>;

/// What a worker beside the engine (the collector) does in every commit.
/// Installed once after open; called under the commit lock.
pub(crate) trait CommitHook: Send + Sync {
    /// Runs inside the commit's write transaction after its records were
    /// written: the commit's share of background work. Returns the oids it
    /// deleted (the engine invalidates them for every session).
    /// It deletes nothing `pins` holds, and dooms what it deletes.
    fn in_commit(&self, w: &WriteTransaction, pins: &Pins) -> Result<Vec<Oid>>;
    /// After the commit was applied: what it stored, the oids whose
    /// reference count it lowered, the records' bytes, how many oids it
    /// queued.
    fn after_commit(
        &self,
        records: &std::collections::BTreeMap<Oid, Record>,
        released: &[Oid],
        bytes: u64,
        queued: u64,
    );
    /// A collector deletion was committed (after every session was told
    /// of it).
    fn deletion_committed(&self, deleted: &Deleted);
    /// The store is closing: stop and join any thread.
    fn on_close(&self);
}

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

/// The shared engine of one open store.
pub(crate) struct Engine {
    path: PathBuf,
    db: RwLock<Option<Db>, { rank::DB }>,
    read_only: bool,
    quick_repair: bool,
    policy: Arc<dyn CheckpointPolicy>,
    durability: Durability,
    commit: Mutex<CommitState, { rank::COMMIT }>,
    /// The sequencer: the commit order, the turns, the line of commits
    /// waiting to be applied (owned by `commit/`).
    seq: commit::Sequencer,
    /// What placed commits need and what the collector is deleting.
    pub(crate) pins: Pins,
    /// The oid allocator's handed-out oids (owned by `sessions/`).
    alloc: sessions::Allocator,
    /// Invalidations: the sessions, the shared change log, publication,
    /// snapshots (owned by `sessions/`).
    inv: sessions::Invalidations,
    /// The commit log, its group syncs and the checkpoints (owned by
    /// `durability.rs`).
    sync: durability::Syncer,
    /// Live `RedbStorage` handles; the last one dropped closes the store.
    pub(crate) handles: AtomicUsize,
    poisoned: Mutex<Option<String>, { rank::LEAF }>,
    hook: OnceLock<Arc<dyn CommitHook>>,
    /// Told, once, when the store is poisoned (the server stops on it).
    poison_watch: OnceLock<PoisonWatch>,
    /// Tests: runs in an apply right after its redb commit, with `publish`
    /// still held.
    #[cfg(test)]
    pub(crate) on_visible: OnceLock<TestHook>,
    /// Tests: runs while a commit is placed, before it joins the line.
    #[cfg(test)]
    pub(crate) on_placing: OnceLock<TestHook>,
    /// Tests: runs when a placed commit has joined the line.
    #[cfg(test)]
    pub(crate) on_lined: OnceLock<TestHook>,
}

/// Tests: a function the engine calls at a point of interest.
#[cfg(test)]
pub(crate) type TestHook = Box<dyn Fn(&Engine) + Send + Sync>;

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("path", &self.path)
            .field("read_only", &self.read_only)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// The path of the store.
    pub(crate) fn path(&self) -> &Path {
        &self.path
    }

    /// True if opened read-only.
    pub(crate) fn is_read_only(&self) -> bool {
        self.read_only
    }

    /// Installs the commit hook (once, right after open).
    pub(crate) fn set_hook(&self, hook: Arc<dyn CommitHook>) {
        let _ = self.hook.set(hook);
    }

    pub(crate) fn db(&self) -> Result<MappedReadGuard<'_, Db, { rank::DB }>> {
        ReadGuard::try_map(self.db.read(), |d| d.as_ref()).map_err(|_| StorageError::Closed)
    }

    fn check_writable(&self) -> Result<()> {
        if self.read_only {
            return Err(StorageError::ReadOnly);
        }
        if let Some(why) = self.poisoned.lock().as_ref() {
            return Err(StorageError::Poisoned {
                reason: why.clone(),
            });
        }
        Ok(())
    }

    /// Why the store takes no more commits, if an earlier failure poisoned
    /// it.
    pub(crate) fn poisoned_reason(&self) -> Option<String> {
        self.poisoned.lock().clone()
    }

    /// Has `watch` called (on a thread of its own) with the reason when the
    /// store is poisoned. One watcher per store; a second is ignored.
    pub(crate) fn watch_poison(&self, watch: PoisonWatch) {
        let _ = self.poison_watch.set(watch);
    }

    /// Marks the store unusable for writes after a failure that leaves redb's
    /// state unknown.
    pub(crate) fn poison(&self, why: &StorageError) {
        tracing::error!(error = %why, "store poisoned");
        let first = {
            let mut p = self.poisoned.lock();
            let first = p.is_none();
            if first {
                *p = Some(why.to_string());
            }
            first
        };
        if first && let Some(watch) = self.poison_watch.get() {
            // Not on this thread: it may hold the commit lock.
            let (watch, why) = (watch.clone(), why.to_string());
            let _ = std::thread::Builder::new()
                .name("durus-poisoned".into())
                .spawn(move || watch(&why));
        }
    }

    /// Passes `r` on, poisoning the store if it failed.
    fn poisoning<T>(&self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r {
            self.poison(e);
        }
        r
    }

    // ---- loads -----------------------------------------------------------

    /// The record for `oid`, from the latest committed state.
    pub(crate) fn load(&self, oid: Oid) -> Result<Record> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        load_from(&table, oid)
    }

    /// The records for `oids` from one snapshot; `None` where absent.
    pub(crate) fn load_many(&self, oids: &[Oid]) -> Result<Vec<Option<Record>>> {
        let mut out = Vec::with_capacity(oids.len());
        self.load_each(oids, |bytes| -> Result<()> {
            let record = match bytes {
                Some(b) => Some(Record::from_bytes(b.to_vec()).map_err(|e| {
                    StorageError::damaged(format!("a stored record is damaged: {e}"))
                })?),
                None => None,
            };
            out.push(record);
            Ok(())
        })?;
        Ok(out)
    }

    /// How many records the store holds (from redb's table header: no walk).
    pub(crate) fn object_count(&self) -> Result<u64> {
        use redb::ReadableTableMetadata;
        let db = self.db()?;
        let txn = db.begin_read()?;
        Ok(txn.open_table(RECORDS)?.len()?)
    }

    /// Hands each of `oids`' stored bytes (checked, `None` where absent) to
    /// `each`, in order, from one snapshot, without copying them: a bulk
    /// load's answer is written as it is read, so its memory does not grow
    /// with the number or size of the records asked for.
    pub(crate) fn load_each<E: From<StorageError>>(
        &self,
        oids: &[Oid],
        mut each: impl FnMut(Option<&[u8]>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        let db = self.db()?;
        let txn = db.begin_read().map_err(E::from)?;
        let table = txn.open_table(RECORDS).map_err(StorageError::from)?;
        each_in(&table, oids, |_, bytes| each(bytes))
    }

    /// The number of records, then each record's bytes (checked) in oid
    /// order, all from one snapshot (a backup; the snapshot is held for the
    /// whole walk).
    pub(crate) fn each_record<E: From<StorageError>>(
        &self,
        mut each: impl FnMut(Walk<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        use redb::{ReadableTable, ReadableTableMetadata};
        let db = self.db()?;
        let txn = db.begin_read().map_err(E::from)?;
        let _held = self.inv.hold_snapshot();
        let table = txn.open_table(RECORDS).map_err(StorageError::from)?;
        each(Walk::Count(table.len().map_err(StorageError::from)?))?;
        for item in table.iter().map_err(StorageError::from)? {
            let (k, v) = item.map_err(StorageError::from)?;
            let bytes = v.value();
            Record::check(bytes).map_err(|e| corrupt(Oid(k.value()), e))?;
            each(Walk::Record(bytes))?;
        }
        Ok(())
    }

    /// Up to `limit` records with oids above `after` (or from the first), in oid order.
    pub(crate) fn records_after(&self, after: Option<Oid>, limit: usize) -> Result<Vec<Record>> {
        let start = match after {
            None => 0,
            Some(Oid(o)) => match o.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
        };
        let db = self.db()?;
        let txn = db.begin_read()?;
        let table = txn.open_table(RECORDS)?;
        let mut out = Vec::new();
        for item in table.range(start..)? {
            let (k, v) = item?;
            out.push(refcount::stored_record(Oid(k.value()), v.value())?);
            if out.len() >= limit {
                break;
            }
        }
        Ok(out)
    }
}

/// Hands each of `oids`' bytes in `table` (checked, `None` where absent) to
/// `each`, in order, without copying them.
pub(crate) fn each_in<E: From<StorageError>>(
    table: &redb::ReadOnlyTable<u64, &'static [u8]>,
    oids: &[Oid],
    mut each: impl FnMut(Oid, Option<&[u8]>) -> std::result::Result<(), E>,
) -> std::result::Result<(), E> {
    for &oid in oids {
        // Through the read gate: big records are handed on a few at a time.
        readgate::read(
            || table.get(oid.0),
            |found| found.as_ref().ok()?.as_ref().map(|v| v.value().len()),
            |found| -> std::result::Result<(), E> {
                match found.map_err(StorageError::from)? {
                    Some(v) => {
                        let bytes = v.value();
                        Record::check(bytes).map_err(|e| corrupt(oid, e))?;
                        if Oid::from_slice(bytes) != Some(oid) {
                            return Err(StorageError::damaged(format!(
                                "the record stored under oid {oid} names another oid"
                            ))
                            .into());
                        }
                        each(oid, Some(bytes))
                    }
                    None => each(oid, None),
                }
            },
        )?;
    }
    Ok(())
}

impl Drop for Engine {
    fn drop(&mut self) {
        if let Err(e) = self.close() {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}

/// Waits without sleeping while `waiting` holds, for at most `limit`,
/// yielding the core to any other thread that can run between looks: for a
/// wait expected to be shorter than the two thread switches that sleeping
/// and being woken cost. The caller
/// looks again, under its lock, before it sleeps.
pub(super) fn spin_while(limit: std::time::Duration, mut waiting: impl FnMut() -> bool) {
    let until = std::time::Instant::now() + limit;
    while waiting() && std::time::Instant::now() < until {
        std::thread::yield_now();
    }
}

/// A fresh engine on a new store in a temporary directory, for unit tests
/// (the directory lives as long as the first value).
#[cfg(test)]
pub(crate) fn open_temp() -> (tempfile::TempDir, Arc<Engine>) {
    let dir = tempfile::tempdir().unwrap();
    let config = crate::store::Options::new().engine_config(false);
    let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
    (dir, engine)
}
