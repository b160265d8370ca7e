//! `RedbStorage`: the Durus storage on redb, as users hold it. Opens the
//! engine, installs the collector beside it, and keeps one session per
//! handle.

pub(crate) mod backend;
mod gc;
mod options;

use std::collections::VecDeque;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

pub use gc::GcReport;
pub use options::Options;

use crate::engine::{
    CheckReport, Engine, EngineConfig, SessionId, SessionRef, Snapshot, StoreStats,
    check_references, stats,
};
use crate::error::{Result, StorageError};
use crate::gc::{FullProgress, FullReport, GcShared, GcState, GcStats, read_state, run_full, step};
use crate::record::{Oid, Record};
use crate::storage::{PackReport, PendingCommit, Storage};

/// A session on a durus-redb store: a [`Storage`] with its own pending commit,
/// its own allocated oids and its own place in the invalidation log.
///
/// The first handle comes from [`RedbStorage::open`]; more sessions on the same
/// open store come from [`RedbStorage::new_session`] and may be moved to other
/// threads. [`Storage::close`] (or dropping it) ends one session; the store
/// stays open until its last session ends, and is checkpointed and closed
/// then. [`RedbStorage::close_store`] closes it at once for every session.
#[derive(Debug)]
pub struct RedbStorage {
    engine: Arc<Engine>,
    gc: Arc<GcShared>,
    session: SessionId,
    state: SessionRef,
    pending: PendingCommit,
    snapshot_reads: bool,
    /// With snapshot reads: the state loads read (`None` until the first
    /// sync or commit, and after `release_snapshot`).
    snapshot: Option<Snapshot>,
    /// [`Storage::close`] ended this session: it is not counted among the
    /// store's handles any more, and its calls fail with `Closed`.
    closed: bool,
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
        Ok(RedbStorage::session_of(engine, gc, false))
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
        Ok(RedbStorage::session_of(engine, gc, options.snapshots()))
    }

    fn session_of(engine: Arc<Engine>, gc: Arc<GcShared>, snapshot_reads: bool) -> RedbStorage {
        engine.handles.fetch_add(1, Ordering::AcqRel);
        let (session, state) = engine.register_session();
        RedbStorage {
            engine,
            gc,
            session,
            state,
            pending: PendingCommit::default(),
            snapshot_reads,
            snapshot: None,
            closed: false,
        }
    }

    /// Another session on the same open store (with this one's snapshot
    /// reads setting).
    pub fn new_session(&self) -> RedbStorage {
        RedbStorage::session_of(self.engine.clone(), self.gc.clone(), self.snapshot_reads)
    }

    /// Turns snapshot reads on or off for this session (see
    /// [`Options::snapshot_reads`]). Turning them on takes effect at the
    /// next sync or commit; turning them off releases the snapshot.
    pub fn set_snapshot_reads(&mut self, on: bool) {
        self.snapshot_reads = on;
        if !on {
            self.snapshot = None;
        }
    }

    /// Gives up this session's snapshot, if it holds one: loads read the
    /// latest state again until the next sync or commit takes a new one.
    pub fn release_snapshot(&mut self) {
        self.snapshot = None;
    }

    /// Whether this session holds a snapshot now.
    pub fn holds_snapshot(&self) -> bool {
        self.snapshot.is_some()
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

// The collector, on demand (after `open` and the commits, in the
// documentation too).
impl RedbStorage {
    /// Runs one incremental step on the calling thread: pops up to
    /// `max_objects` oids from the collector's queue and deletes those whose
    /// reference count is still zero, in one non-durable write transaction.
    /// Explicit collections ignore the policy's grace window.
    pub fn gc_step(&self, max_objects: usize) -> Result<GcReport> {
        let started = Instant::now();
        // Durus's meaning: whatever is unreachable now goes, window or not.
        let step = step(&self.engine, max_objects, u64::MAX, false)?;
        Ok(GcReport {
            removed_objects: step.removed.len() as u64,
            removed_bytes: step.bytes,
            steps: 1,
            queue_left: step.queue_left,
            elapsed: started.elapsed(),
        })
    }

    /// Runs the incremental collector on the calling thread until its queue
    /// is empty (garbage released by the deletions included), then
    /// checkpoints. Cycles are left to a full collection ([`Storage::pack`](crate::Storage::pack)).
    pub fn collect_garbage_now(&self) -> Result<GcReport> {
        self.collect_garbage_with(&mut |_| {})
    }

    /// [`collect_garbage_now`](Self::collect_garbage_now), reporting the running
    /// totals after each step.
    pub fn collect_garbage_with(&self, progress: &mut dyn FnMut(&GcReport)) -> Result<GcReport> {
        let engine = &self.engine;
        let started = Instant::now();
        let batch = self.gc.policy.explicit_batch();
        let mut report = GcReport::default();
        loop {
            let step = step(engine, batch, u64::MAX, false)?;
            report.removed_objects += step.removed.len() as u64;
            report.removed_bytes += step.bytes;
            report.steps += 1;
            report.queue_left = step.queue_left;
            report.elapsed = started.elapsed();
            progress(&report);
            if step.queue_left == 0 {
                break;
            }
        }
        engine.checkpoint()?;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Runs a full collection (cycles included) on the calling thread and
    /// makes it durable. `progress` is called after each chunk of work; a
    /// `Break` stops the collection, which the background collector restarts
    /// after the next open (the report then says `completed: false`).
    pub fn full_collection(
        &self,
        progress: &mut dyn FnMut(&FullProgress) -> ControlFlow<()>,
    ) -> Result<FullReport> {
        self.run_full(progress)
    }

    /// The collector's persisted state and queue, with how much of the
    /// queue is still waiting out the policy's grace window.
    pub fn gc_state(&self) -> Result<GcState> {
        let mut state = read_state(&self.engine)?;
        state.waiting = self.gc_waiting(self.gc.policy.grace())?;
        Ok(state)
    }

    /// The grace window of the collector's policy.
    pub(crate) fn gc_policy_grace(&self) -> Duration {
        self.gc.policy.grace()
    }

    /// [`gc_state`](Self::gc_state) without counting what waits out the
    /// grace window (`waiting` is 0): no walk of the queue.
    pub(crate) fn gc_state_uncounted(&self) -> Result<GcState> {
        read_state(&self.engine)
    }

    /// How many queued (unreachable) objects became unreachable less than
    /// `grace` ago: those a collector with that window still keeps.
    pub fn gc_waiting(&self, grace: Duration) -> Result<u64> {
        let since = crate::engine::layout::now_unix_ms()
            .saturating_sub(grace.as_millis() as u64)
            .saturating_add(1);
        let db = self.engine.db()?;
        let txn = db.begin_read()?;
        crate::engine::queued_since(&txn, since)
    }

    /// The collector's counters since open.
    pub fn gc_stats(&self) -> GcStats {
        self.gc.stats()
    }

    /// A full collection to the end (or until `progress` breaks), durable.
    pub(super) fn run_full(
        &self,
        progress: &mut dyn FnMut(&FullProgress) -> ControlFlow<()>,
    ) -> Result<FullReport> {
        // A background collection in its grace window gives way.
        self.gc
            .explicit_waiting
            .store(true, std::sync::atomic::Ordering::Release);
        let running = self.gc.full_lock.lock();
        self.gc
            .explicit_waiting
            .store(false, std::sync::atomic::Ordering::Release);
        let _running = running;
        let report = run_full(
            &self.engine,
            &self.gc,
            self.gc.policy.explicit_batch(),
            Duration::ZERO,
            progress,
        )?;
        self.engine.checkpoint()?;
        Ok(report)
    }
}

impl RedbStorage {
    /// Ends this session (once): forgets it and the oids it holds; the
    /// last session of the store closes the store. Returns whether it was
    /// the last.
    fn end_session(&mut self) -> bool {
        if self.closed {
            return false;
        }
        self.closed = true;
        self.pending.clear();
        self.snapshot = None;
        self.engine.unregister_session(self.session);
        self.engine.handles.fetch_sub(1, Ordering::AcqRel) == 1
    }

    /// Fails with [`StorageError::Closed`] once [`Storage::close`] ended
    /// this session.
    fn live(&self) -> Result<()> {
        if self.closed {
            Err(StorageError::Closed)
        } else {
            Ok(())
        }
    }

    /// Closes the store now, for every session: everything committed is
    /// made durable (a checkpoint), the commit log removed and the file
    /// released; every session's calls fail with [`StorageError::Closed`]
    /// from then on. ([`Storage::close`] ends one session only.)
    pub fn close_store(&mut self) -> Result<()> {
        self.end_session();
        self.engine.close()
    }
}

impl Drop for RedbStorage {
    fn drop(&mut self) {
        // The last handle closes the store now, even if a background thread
        // still holds the engine for a moment.
        if self.end_session()
            && let Err(e) = self.engine.close()
        {
            tracing::error!(error = %e, "closing the store failed");
        }
    }
}

impl RedbStorage {
    /// Notes that this session takes copies of `oids`, so that it is told
    /// of their changes; a read conflict for an oid made after its last
    /// sync when the change log has already dropped entries it had not
    /// read (it could miss that oid's changes: sync first).
    fn hold(&self, oids: &[Oid]) -> Result<()> {
        let mut st = self.state.lock();
        match oids.iter().find(|oid| !st.hold(**oid)) {
            Some(oid) => Err(StorageError::ReadConflict(*oid)),
            None => Ok(()),
        }
    }
}

impl Storage for RedbStorage {
    fn load(&mut self, oid: Oid) -> Result<Record> {
        self.live()?;
        match &self.snapshot {
            Some(_) => self
                .bulk_load(&[oid])?
                .pop()
                .ok_or(StorageError::NotFound(oid)),
            None => {
                // A change this session was told of is published before it
                // is visible: wait for it to be.
                self.engine.await_session(&self.state);
                self.hold(&[oid])?;
                self.engine.load(oid)
            }
        }
    }

    fn bulk_load(&mut self, oids: &[Oid]) -> Result<Vec<Record>> {
        self.live()?;
        let found = match &self.snapshot {
            Some(snapshot) => {
                let mut out = Vec::with_capacity(oids.len());
                snapshot.load_each(oids, |oid, bytes| -> Result<()> {
                    out.push(match bytes {
                        Some(b) => Some(Record::from_bytes(b.to_vec()).map_err(|e| {
                            StorageError::damaged(format!(
                                "the record of oid {oid} is damaged: {e}"
                            ))
                        })?),
                        None => None,
                    });
                    Ok(())
                })?;
                out
            }
            None => {
                self.engine.await_session(&self.state);
                self.hold(oids)?;
                self.engine.load_many(oids)?
            }
        };
        found
            .into_iter()
            .zip(oids)
            .map(|(r, &oid)| r.ok_or(StorageError::NotFound(oid)))
            .collect()
    }

    fn begin(&mut self) {
        self.pending.clear();
    }

    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()> {
        self.live()?;
        self.pending.store(oid, record)
    }

    fn end(&mut self) -> Result<()> {
        self.live()?;
        let records = self.pending.take();
        if self.snapshot_reads {
            self.snapshot = None;
            self.snapshot = Some(self.engine.commit_and_snapshot(self.session, &records)?);
            Ok(())
        } else {
            self.engine.commit(self.session, &records)
        }
    }

    fn end_checked(&mut self, reads: &[Oid]) -> Result<()> {
        self.live()?;
        let records = self.pending.take();
        if self.snapshot_reads {
            self.snapshot = None;
        }
        let taken = self.engine.commit_checked(
            self.session,
            &self.state,
            &records,
            reads,
            self.snapshot_reads,
        )?;
        if taken.is_some() {
            self.snapshot = taken;
        }
        Ok(())
    }

    fn snapshot_reads(&self) -> bool {
        self.snapshot_reads
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<Vec<Oid>> {
        self.live()?;
        if self.snapshot_reads {
            self.snapshot = None;
            let (oids, snapshot) = self.engine.sync_to_snapshot(self.session, &self.state)?;
            self.snapshot = Some(snapshot);
            Ok(oids)
        } else {
            Ok(self.engine.take_invalid(self.session, &self.state, None))
        }
    }

    fn new_oid(&mut self) -> Result<Oid> {
        self.live()?;
        Ok(self.engine.allocate(self.session, 1)?[0])
    }

    fn new_oids(&mut self, n: usize) -> Result<Vec<Oid>> {
        self.live()?;
        self.engine.allocate(self.session, n)
    }

    fn iter_records(&mut self) -> Result<Box<dyn Iterator<Item = Result<Record>> + '_>> {
        self.live()?;
        Ok(Box::new(RecordStream {
            engine: &self.engine,
            after: None,
            buffer: VecDeque::new(),
            done: false,
        }))
    }

    fn pack(&mut self) -> Result<PackReport> {
        self.live()?;
        let r = self.run_full(&mut |_| std::ops::ControlFlow::Continue(()))?;
        Ok(PackReport {
            removed_objects: r.removed_objects,
            removed_bytes: r.removed_bytes,
            live_objects: r.live_objects,
        })
    }

    /// Ends this session: its pending commit and the oids it holds are
    /// forgotten, and its calls fail with [`StorageError::Closed`] from
    /// now on. Everything committed is made durable (a checkpoint); the
    /// last session of the store also closes the store. Other sessions go
    /// on. ([`RedbStorage::close_store`] closes the store for all.)
    fn close(&mut self) -> Result<()> {
        if self.closed {
            return Ok(());
        }
        // Made durable while this session still counts, so that the store
        // cannot be closed by another session's end meanwhile.
        let checkpointed = if self.engine.handles.load(Ordering::Acquire) > 1 {
            self.engine.checkpoint()
        } else {
            Ok(())
        };
        if self.end_session() {
            self.engine.close()
        } else {
            checkpointed
        }
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

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::RedbStorage;
    use crate::engine::Placed;
    use crate::record::Record;
    use crate::{Options, Storage};

    /// A change is published before it is visible (a server commit is
    /// published when it is placed, and applied later): a library session
    /// told of it by a sync waits for it before it loads, and never reads
    /// the state from before it (its cache would then keep a stale copy).
    #[test]
    fn a_load_after_a_sync_waits_for_the_change_the_sync_told_of() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = RedbStorage::open(dir.path().join("s.redb"), Options::new()).unwrap();
        let root = s.new_oid().unwrap();
        s.begin();
        s.store(root, Record::new(root, b"old", &[]).into_bytes())
            .unwrap();
        s.end().unwrap();
        let mut reader = s.new_session();
        reader.sync().unwrap();
        assert_eq!(reader.load(root).unwrap().data(), b"old");
        let engine = s.engine().clone();
        let (writer, _) = engine.register_session();
        let placed = engine.lock_order().place(
            writer,
            BTreeMap::from([(root, Record::new(root, b"new", &[]))]),
        );
        let Placed::Turn(turn) = placed else {
            panic!("a valid commit gets a turn")
        };
        let waits = engine.turn_waits();
        let read = std::thread::spawn(move || {
            let told = reader.sync().unwrap();
            (told, reader.load(root).unwrap())
        });
        // Until the reader, told of the commit, waits for it to be applied.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while engine.turn_waits() == waits {
            assert!(
                std::time::Instant::now() < deadline,
                "the load never waited"
            );
            std::thread::yield_now();
        }
        engine.finish(turn.apply().unwrap()).unwrap();
        let (told, record) = read.join().unwrap();
        assert_eq!(told, [root]);
        assert_eq!(record.data(), b"new");
    }
}
