//! `RedbStorage`: the Durus storage on redb.

mod check;
pub(crate) mod engine;
pub(crate) mod layout;
mod options;

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::Arc;

pub use check::{CheckReport, FullCheck, StoreStats, check_store};
pub use engine::{CommitGuard, CommitTicket, Engine, InvalidSet, SessionId};
pub use options::Options;

use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};
use crate::storage::{PackReport, Storage, checked_record};

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
    session: SessionId,
    invalid: InvalidSet,
    pending: BTreeMap<Oid, Record>,
}

impl RedbStorage {
    /// Opens the store at `path` (created if absent unless `options.create`
    /// is false). A second open of the same file, from this process or
    /// another, fails with [`StorageError::AlreadyOpen`].
    pub fn open(path: impl AsRef<Path>, options: Options) -> Result<RedbStorage> {
        let engine = Engine::open(path.as_ref(), &options)?;
        Ok(RedbStorage::session_of(engine))
    }

    /// Opens the store read-only.
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<RedbStorage> {
        RedbStorage::open(path, Options::read_only())
    }

    /// A new session on the engine.
    pub fn session_of(engine: Arc<Engine>) -> RedbStorage {
        engine
            .handles
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let (session, invalid) = engine.register_session();
        RedbStorage {
            engine,
            session,
            invalid,
            pending: BTreeMap::new(),
        }
    }

    /// Another session on the same open store.
    pub fn new_session(&self) -> RedbStorage {
        RedbStorage::session_of(self.engine.clone())
    }

    /// The shared engine (for the server and the collector).
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    /// Makes every commit so far durable, whatever the checkpoint policy.
    pub fn checkpoint(&self) -> Result<()> {
        self.engine.checkpoint()
    }

    /// Counts and sizes of the store.
    pub fn stats(&self) -> Result<StoreStats> {
        check::stats(&self.engine)
    }

    /// Recounts every reference and checks that every ref resolves.
    pub fn check_references(&self) -> Result<CheckReport> {
        check::check_references(&self.engine)
    }
}

impl Drop for RedbStorage {
    fn drop(&mut self) {
        self.engine.unregister_session(self.session);
        // The last handle closes the store now, even if a background thread
        // still holds the engine for a moment.
        if self
            .engine
            .handles
            .fetch_sub(1, std::sync::atomic::Ordering::AcqRel)
            == 1
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
        let record = checked_record(oid, record)?;
        self.pending.insert(oid, record);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.engine.commit(self.session, &pending)
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
        crate::gc::pack(&self.engine)
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
