//! `RedbStorage`: the Durus storage on redb, as users hold it. Opens the
//! engine, installs the collector beside it, and keeps one session per
//! handle.

mod gc;
mod options;

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub use gc::GcReport;
pub use options::Options;

use crate::engine::{
    CheckReport, Engine, EngineConfig, InvalidSet, SessionId, StoreStats, check_references, stats,
};
use crate::error::{Result, StorageError};
use crate::gc::GcShared;
use crate::record::{Oid, Record};
use crate::storage::{PackReport, PendingCommit, Storage};

/// A session on a durus-redb store: a [`Storage`] with its own pending commit,
/// its own allocated oids and its own invalid set.
///
/// The first handle comes from [`RedbStorage::open`]; more sessions on the same
/// open store come from [`RedbStorage::new_session`] and may be moved to other
/// threads. The store stays open until [`Storage::close`] is called on any
/// session or every session is dropped; either way it is checkpointed.
#[derive(Debug)]
pub struct RedbStorage {
    engine: Arc<Engine>,
    gc: Arc<GcShared>,
    session: SessionId,
    invalid: InvalidSet,
    pending: PendingCommit,
}

impl RedbStorage {
    /// Opens the store at `path` for reading and writing (created if absent
    /// unless [`Options::create`] says not to). A second open of the same
    /// file, from this process or another, fails with
    /// [`StorageError::AlreadyOpen`].
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<RedbStorage> {
        RedbStorage::open_with(path.as_ref(), &options, false)
    }

    /// Opens the store read-only: loads work, every write fails with
    /// [`StorageError::ReadOnly`]. Other read-only handles may share the
    /// file; a writer may not.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<RedbStorage> {
        let config = EngineConfig::read_only();
        let engine = Engine::open(path.as_ref(), &config)?;
        let gc = Arc::new(GcShared::new(Arc::new(crate::gc::ManualGc)));
        Ok(RedbStorage::session_of(engine, gc))
    }

    /// Opens for a migration (`importing`: an unfinished import is allowed).
    pub(crate) fn open_with(
        path: &Path,
        options: &Options,
        importing: bool,
    ) -> Result<RedbStorage> {
        let engine = Engine::open(path, &options.engine_config(importing))?;
        let gc = Arc::new(GcShared::new(options.gc_policy().clone()));
        engine.set_hook(gc.clone());
        crate::gc::start(&engine, &gc);
        Ok(RedbStorage::session_of(engine, gc))
    }

    fn session_of(engine: Arc<Engine>, gc: Arc<GcShared>) -> RedbStorage {
        engine.handles.fetch_add(1, Ordering::AcqRel);
        let (session, invalid) = engine.register_session();
        RedbStorage {
            engine,
            gc,
            session,
            invalid,
            pending: PendingCommit::default(),
        }
    }

    /// Another session on the same open store.
    pub fn new_session(&self) -> RedbStorage {
        RedbStorage::session_of(self.engine.clone(), self.gc.clone())
    }

    /// A handle that keeps the store open and makes sessions (for the
    /// server) but is not a session itself: no invalidation is ever added
    /// to it, so it holds no memory for the life of the server.
    pub(crate) fn session_maker(&self) -> RedbStorage {
        let s = self.new_session();
        s.engine.unregister_session(s.session);
        s
    }

    /// The engine (for the server and the migration).
    pub(crate) fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// The path of the store.
    pub fn path(&self) -> &Path {
        self.engine.path()
    }

    /// True if opened read-only.
    pub fn is_read_only(&self) -> bool {
        self.engine.is_read_only()
    }

    /// Makes every commit so far durable, whatever the checkpoint policy.
    pub fn checkpoint(&self) -> Result<()> {
        self.engine.checkpoint()
    }

    /// Counts and sizes of the store.
    pub fn stats(&self) -> Result<StoreStats> {
        stats(&self.engine)
    }

    /// Recounts every reference and checks that every ref resolves.
    pub fn check_references(&self) -> Result<CheckReport> {
        check_references(&self.engine)
    }
}

impl Drop for RedbStorage {
    fn drop(&mut self) {
        self.engine.unregister_session(self.session);
        // The last handle closes the store now, even if a background thread
        // still holds the engine for a moment.
        if self.engine.handles.fetch_sub(1, Ordering::AcqRel) == 1
            && let Err(e) = self.engine.close()
        {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}

impl Storage for RedbStorage {
    fn load(&mut self, oid: Oid) -> Result<Record> {
        self.engine.load(oid)
    }

    fn bulk_load(&mut self, oids: &[Oid]) -> Result<Vec<Record>> {
        self.engine
            .load_many(oids)?
            .into_iter()
            .zip(oids)
            .map(|(r, &oid)| r.ok_or(StorageError::NotFound(oid)))
            .collect()
    }

    fn begin(&mut self) {
        self.pending.clear();
    }

    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()> {
        self.pending.store(oid, record)
    }

    fn end(&mut self) -> Result<()> {
        let records = self.pending.take();
        self.engine.commit(self.session, &records)
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<Vec<Oid>> {
        let mut set = self.invalid.lock();
        let mut oids: Vec<Oid> = set.drain().collect();
        oids.sort_unstable();
        Ok(oids)
    }

    fn new_oid(&mut self) -> Result<Oid> {
        Ok(self.engine.allocate(self.session, 1)?[0])
    }

    fn new_oids(&mut self, n: usize) -> Result<Vec<Oid>> {
        self.engine.allocate(self.session, n)
    }

    fn iter_records(&mut self) -> Result<Box<dyn Iterator<Item = Result<Record>> + '_>> {
        Ok(Box::new(RecordStream {
            engine: &self.engine,
            after: None,
            buffer: VecDeque::new(),
            done: false,
        }))
    }

    fn pack(&mut self) -> Result<PackReport> {
        let r = self.run_full(&mut |_| std::ops::ControlFlow::Continue(()))?;
        Ok(PackReport {
            removed_objects: r.removed_objects,
            removed_bytes: r.removed_bytes,
            live_objects: r.live_objects,
        })
    }

    fn close(&mut self) -> Result<()> {
        self.pending.clear();
        self.engine.close()
    }
}

/// Every record in oid order, read in batches, each batch from a short read
/// transaction (so a long iteration never pins old pages).
struct RecordStream<'a> {
    engine: &'a Engine,
    after: Option<Oid>,
    buffer: VecDeque<Record>,
    done: bool,
}

const STREAM_BATCH: usize = 512;

impl Iterator for RecordStream<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.buffer.is_empty() && !self.done {
            match self.engine.records_after(self.after, STREAM_BATCH) {
                Ok(batch) => {
                    self.done = batch.len() < STREAM_BATCH;
                    self.buffer.extend(batch);
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(e));
                }
            }
        }
        let r = self.buffer.pop_front()?;
        self.after = Some(r.oid());
        Some(Ok(r))
    }
}
