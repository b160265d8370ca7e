//! The background collector thread and the engine's side of it.

use std::ops::ControlFlow;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, select};
use parking_lot::Mutex;

use super::policy::{GcAction, GcFacts, GcPolicy};
use super::state::read_state;
use super::{full, incremental};
use crate::engine::layout::now_unix_ms;
use crate::engine::{CommitHook, Deleted, Engine, Pins, delete_queued};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};

/// Counters of the collector since the store was opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcStats {
    /// Objects deleted by the incremental collector.
    pub incremental_removed: u64,
    /// Objects deleted by full collections.
    pub full_removed: u64,
    /// Bytes of records deleted, both kinds.
    pub removed_bytes: u64,
    /// Full collections finished.
    pub full_collections: u64,
    /// Decisions the background thread carried out (steps and full collections).
    pub background_rounds: u64,
}

/// The collector's state inside the engine: the policy, the counters the
/// commit path feeds, and the thread's guard.
pub(crate) struct GcShared {
    pub(crate) policy: Arc<dyn GcPolicy>,
    opened: Instant,
    bytes_since_full: AtomicU64,
    commits_since_full: AtomicU64,
    deleted_since_full: AtomicU64,
    /// Nanoseconds since `opened` of the last commit, plus one; 0: none yet.
    last_commit: AtomicU64,
    stopping: AtomicBool,
    incremental_removed: AtomicU64,
    full_removed: AtomicU64,
    removed_bytes: AtomicU64,
    full_collections: AtomicU64,
    background_rounds: AtomicU64,
    nudge: Mutex<Option<Sender<()>>>,
    /// The earliest drop time (ms since the Unix epoch) in the queue as far
    /// as known: `u64::MAX` once a deletion found the queue empty and nothing
    /// was queued since, 0 when unknown. Commits skip their share without
    /// looking while it is not yet due.
    next_drop_ms: AtomicU64,
    /// The batch of the thread's next incremental step: the policy's, doubled
    /// after every step that used all of it (a backlog), up to
    /// [`MAX_BATCH`]. A step stops early when a committer waits, so a large
    /// batch does not hold commits up.
    batch: std::sync::atomic::AtomicUsize,
    /// A burst ended with a step left to a waiting committer: its
    /// checkpoint is taken at the start of the next round instead.
    checkpoint_owed: AtomicBool,
    /// Held by whoever runs a full collection.
    pub(crate) full_lock: Mutex<()>,
    /// An explicit full collection (a pack) waits for `full_lock`: a
    /// background one gives way (it restarts later).
    pub(crate) explicit_waiting: AtomicBool,
    /// While a full collection runs: every oid stored or referenced by a
    /// commit since its start (recorded by the commit hook, under the commit
    /// lock). The sweep keeps them and what they reach.
    pub(crate) extra: Mutex<Option<std::collections::HashSet<Oid>>>,
    thread: Mutex<Option<CollectorGuard>>,
}

impl std::fmt::Debug for GcShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GcShared")
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

impl GcShared {
    pub(crate) fn new(policy: Arc<dyn GcPolicy>) -> GcShared {
        GcShared {
            policy,
            opened: Instant::now(),
            bytes_since_full: AtomicU64::new(0),
            commits_since_full: AtomicU64::new(0),
            deleted_since_full: AtomicU64::new(0),
            last_commit: AtomicU64::new(0),
            stopping: AtomicBool::new(false),
            incremental_removed: AtomicU64::new(0),
            full_removed: AtomicU64::new(0),
            removed_bytes: AtomicU64::new(0),
            full_collections: AtomicU64::new(0),
            background_rounds: AtomicU64::new(0),
            nudge: Mutex::new(None),
            next_drop_ms: AtomicU64::new(0),
            batch: std::sync::atomic::AtomicUsize::new(0),
            checkpoint_owed: AtomicBool::new(false),
            full_lock: Mutex::new(()),
            explicit_waiting: AtomicBool::new(false),
            extra: Mutex::new(None),
            thread: Mutex::new(None),
        }
    }

    /// The drop time at or before which queued oids are due now.
    pub(crate) fn cutoff_ms(&self) -> u64 {
        now_unix_ms().saturating_sub(self.policy.grace().as_millis() as u64)
    }

    /// Whether queued oids may be due at `cutoff` (see `next_drop_ms`).
    pub(crate) fn maybe_due(&self, cutoff: u64) -> bool {
        self.next_drop_ms.load(Ordering::Acquire) <= cutoff
    }

    /// What a deletion learnt about the queue.
    pub(crate) fn queue_seen(&self, deleted: &Deleted) {
        let next = match (deleted.queue_empty, deleted.next_drop_ms) {
            (true, _) => u64::MAX,
            (false, Some(ms)) => ms,
            (false, None) => 0,
        };
        self.next_drop_ms.store(next, Ordering::Release);
    }

    /// [`queue_seen`](Self::queue_seen) from outside the commit lock: never
    /// claims the queue empty (a commit may have queued since).
    pub(crate) fn queue_seen_unlocked(&self, deleted: &Deleted) {
        let next = match deleted.next_drop_ms {
            Some(ms) if !deleted.queue_empty => ms,
            _ => 0,
        };
        self.next_drop_ms.fetch_min(next, Ordering::AcqRel);
    }

    /// Something was queued outside a commit (a collector transaction),
    /// possibly with an earlier drop time than known.
    pub(crate) fn queue_grew(&self) {
        self.next_drop_ms.store(0, Ordering::Release);
    }

    /// Called by the commit path after each applied commit: updates the facts
    /// and, when the commit queued garbage, nudges the thread without
    /// blocking (otherwise the thread's own timer is soon enough).
    pub(crate) fn committed(&self, bytes: u64, queued: u64) {
        self.bytes_since_full.fetch_add(bytes, Ordering::Relaxed);
        self.commits_since_full.fetch_add(1, Ordering::Relaxed);
        let now = self.opened.elapsed().as_nanos() as u64 + 1;
        self.last_commit.store(now, Ordering::Relaxed);
        if queued > 0 {
            // Queued now: due one grace window from now at the earliest.
            self.next_drop_ms
                .fetch_min(now_unix_ms().saturating_sub(1), Ordering::AcqRel);
        }
        if queued > 0
            && let Some(tx) = self.nudge.lock().as_ref()
        {
            let _ = tx.try_send(());
        }
    }

    pub(crate) fn note_deleted(&self, objects: u64, bytes: u64, full: bool) {
        if full {
            self.full_removed.fetch_add(objects, Ordering::Relaxed);
        } else {
            self.incremental_removed
                .fetch_add(objects, Ordering::Relaxed);
            self.deleted_since_full
                .fetch_add(objects, Ordering::Relaxed);
        }
        self.removed_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    pub(crate) fn full_finished(&self) {
        self.bytes_since_full.store(0, Ordering::Relaxed);
        self.commits_since_full.store(0, Ordering::Relaxed);
        self.deleted_since_full.store(0, Ordering::Relaxed);
        self.full_collections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> GcStats {
        GcStats {
            incremental_removed: self.incremental_removed.load(Ordering::Relaxed),
            full_removed: self.full_removed.load(Ordering::Relaxed),
            removed_bytes: self.removed_bytes.load(Ordering::Relaxed),
            full_collections: self.full_collections.load(Ordering::Relaxed),
            background_rounds: self.background_rounds.load(Ordering::Relaxed),
        }
    }

    /// Stops the thread (acknowledged, joined). Called when the store closes.
    pub(crate) fn shutdown(&self) {
        self.stopping.store(true, Ordering::Release);
        *self.nudge.lock() = None;
        drop(self.thread.lock().take());
    }

    fn facts(&self, engine: &Engine, full_running: bool) -> Result<(GcFacts, bool)> {
        let state = read_state(engine)?;
        let last = self.last_commit.load(Ordering::Relaxed);
        let facts = GcFacts {
            queue_len: state.queue_len,
            oldest_queued: state.oldest_queued,
            bytes_since_full: self.bytes_since_full.load(Ordering::Relaxed),
            commits_since_full: self.commits_since_full.load(Ordering::Relaxed),
            deleted_since_full: self.deleted_since_full.load(Ordering::Relaxed),
            since_last_commit: (last > 0).then(|| {
                self.opened
                    .elapsed()
                    .saturating_sub(Duration::from_nanos(last - 1))
            }),
            since_full: state.since_full,
            full_interrupted: state.full_pending && !full_running,
            full_running,
        };
        Ok((facts, state.migration_in_progress))
    }
}

/// Owns the collector thread: dropping it sends Stop, waits for the
/// acknowledgment and joins.
struct CollectorGuard {
    stop: Sender<Sender<()>>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for CollectorGuard {
    fn drop(&mut self) {
        let Some(handle) = self.handle.take() else {
            return;
        };
        // The thread itself may drop the last handle of the engine: it then
        // must not wait for itself; it ends once this returns.
        if handle.thread().id() == std::thread::current().id() {
            return;
        }
        // The thread ends on this message, or on its own if it saw the
        // nudge channel close first: joining covers both.
        let (ack_tx, _ack_rx) = crossbeam_channel::bounded(1);
        let _ = self.stop.send(ack_tx);
        if handle.join().is_err() {
            tracing::error!("the garbage collector thread panicked");
        }
    }
}

/// Starts the collector thread if the store is writable and the policy wants one.
pub(crate) fn start(engine: &Arc<Engine>, gc: &Arc<GcShared>) {
    if engine.is_read_only() || !gc.policy.background() {
        return;
    }
    let (nudge_tx, nudge_rx) = crossbeam_channel::bounded(1);
    let (stop_tx, stop_rx) = crossbeam_channel::bounded(1);
    let weak = Arc::downgrade(engine);
    let shared = gc.clone();
    let spawned = std::thread::Builder::new()
        .name("durus-redb-gc".into())
        .spawn(move || thread_main(weak, &shared, nudge_rx, stop_rx));
    match spawned {
        Ok(handle) => {
            *gc.nudge.lock() = Some(nudge_tx);
            *gc.thread.lock() = Some(CollectorGuard {
                stop: stop_tx,
                handle: Some(handle),
            });
        }
        Err(e) => engine.poison(&StorageError::Io(e)),
    }
}

/// The largest batch an incremental step grows to under a backlog.
const MAX_BATCH: usize = 4096;

/// What a round asks the loop to do next.
enum Next {
    Wait(Duration),
    Stop(Option<Sender<()>>),
}

fn thread_main(
    weak: std::sync::Weak<Engine>,
    gc: &GcShared,
    nudge: Receiver<()>,
    stop: Receiver<Sender<()>>,
) {
    let mut wait = Duration::ZERO;
    loop {
        select! {
            recv(stop) -> ack => {
                if let Ok(ack) = ack {
                    let _ = ack.send(());
                }
                return;
            }
            recv(nudge) -> msg => {
                if msg.is_err() {
                    return;
                }
            }
            default(wait) => {}
        }
        let Some(engine) = weak.upgrade() else { return };
        if gc.stopping.load(Ordering::Acquire) {
            // Wait for the Stop message to acknowledge it.
            wait = Duration::from_millis(50);
            continue;
        }
        // A panic in a round (a bug, or a policy that panics) is a failure
        // like an error: logged, and the store refuses writes from then on,
        // instead of going on without a collector and without a word.
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| round(&engine, gc, &stop)))
                .unwrap_or_else(|payload| {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    Err(StorageError::Poisoned {
                        reason: format!("the garbage collector panicked: {what}"),
                    })
                });
        match result {
            Ok(Next::Wait(d)) => wait = d,
            // An import started meanwhile, or the store cannot be collected
            // as it is (records but no root): not a failure of the store.
            Err(e @ StorageError::Invalid(_)) => {
                tracing::warn!(error = %e, "garbage collection skipped");
                wait = Duration::from_secs(1);
            }
            Ok(Next::Stop(ack)) => {
                if let Some(ack) = ack {
                    let _ = ack.send(());
                }
                return;
            }
            Err(StorageError::Closed) => return,
            Err(e) => {
                tracing::error!(error = %e, "garbage collector failed");
                engine.poison(&e);
                return;
            }
        }
    }
}

/// Sleeps `d` unless Stop arrives (then returns its acknowledgment channel).
fn pause(stop: &Receiver<Sender<()>>, d: Duration) -> Option<Option<Sender<()>>> {
    if d.is_zero() {
        return match stop.try_recv() {
            Ok(ack) => Some(Some(ack)),
            Err(crossbeam_channel::TryRecvError::Empty) => None,
            Err(_) => Some(None),
        };
    }
    match stop.recv_timeout(d) {
        Ok(ack) => Some(Some(ack)),
        Err(RecvTimeoutError::Timeout) => None,
        Err(RecvTimeoutError::Disconnected) => Some(None),
    }
}

/// One decision of the policy, carried out.
fn round(engine: &Arc<Engine>, gc: &GcShared, stop: &Receiver<Sender<()>>) -> Result<Next> {
    let (facts, migration) = gc.facts(engine, false)?;
    if migration {
        return Ok(Next::Wait(Duration::from_secs(1)));
    }
    if gc.checkpoint_owed.swap(false, Ordering::AcqRel) {
        engine.checkpoint()?;
    }
    let action = gc.policy.decide(&facts);
    if !matches!(action, GcAction::Wait(_)) {
        gc.background_rounds.fetch_add(1, Ordering::Relaxed);
    }
    match action {
        GcAction::Wait(d) => Ok(Next::Wait(d)),
        GcAction::Incremental(pace) => {
            let batch = gc.batch.load(Ordering::Relaxed).max(pace.batch.max(1));
            let step = incremental::step(engine, batch, gc.cutoff_ms(), true)?;
            let next = if step.looked >= batch {
                (batch * 2).min(MAX_BATCH.max(pace.batch))
            } else {
                pace.batch
            };
            gc.batch.store(next, Ordering::Relaxed);
            if step.queue_left == 0 && !step.removed.is_empty() {
                // A burst is over: make its deletions durable so redb can
                // reuse the pages. After a step left to a waiting committer,
                // at the next round: now the checkpoint would commit the
                // step first and make that committer wait for the fsync.
                if step.parked {
                    gc.checkpoint_owed.store(true, Ordering::Release);
                } else {
                    engine.checkpoint()?;
                }
            }
            if let Some(ack) = pause(stop, pace.pause) {
                return Ok(Next::Stop(ack));
            }
            Ok(Next::Wait(Duration::ZERO))
        }
        GcAction::Full(pace) => {
            let Some(_running) = gc.full_lock.try_lock() else {
                // A caller runs one (pack): leave it alone.
                return Ok(Next::Wait(Duration::from_millis(100)));
            };
            let mut stopped: Option<Option<Sender<()>>> = None;
            let mut failure: Option<StorageError> = None;
            let mut between = |_: &full::FullProgress| -> ControlFlow<()> {
                loop {
                    if gc.stopping.load(Ordering::Acquire)
                        || gc.explicit_waiting.load(Ordering::Acquire)
                        || Arc::strong_count(engine) <= 1
                    {
                        return ControlFlow::Break(());
                    }
                    let facts = match gc.facts(engine, true) {
                        Ok((f, false)) => f,
                        Ok((_, true)) => return ControlFlow::Break(()),
                        Err(e) => {
                            failure = Some(e);
                            return ControlFlow::Break(());
                        }
                    };
                    let d = match gc.policy.decide(&facts) {
                        GcAction::Wait(d) => d,
                        action @ (GcAction::Incremental(p) | GcAction::Full(p)) => {
                            // Due garbage is reclaimed between the chunks of
                            // a full collection too.
                            if matches!(action, GcAction::Incremental(_))
                                && let Err(e) =
                                    incremental::step(engine, p.batch, gc.cutoff_ms(), true)
                            {
                                failure = Some(e);
                                return ControlFlow::Break(());
                            }
                            if let Some(ack) = pause(stop, p.pause) {
                                stopped = Some(ack);
                                return ControlFlow::Break(());
                            }
                            return ControlFlow::Continue(());
                        }
                    };
                    if let Some(ack) = pause(stop, d) {
                        stopped = Some(ack);
                        return ControlFlow::Break(());
                    }
                }
            };
            let report = full::run(engine, gc, pace.batch, gc.policy.grace(), &mut between)?;
            if let Some(e) = failure {
                return Err(e);
            }
            if report.completed {
                engine.checkpoint()?;
            }
            if let Some(ack) = stopped {
                return Ok(Next::Stop(ack));
            }
            Ok(Next::Wait(Duration::ZERO))
        }
    }
}

impl CommitHook for GcShared {
    fn in_commit(&self, w: &redb::WriteTransaction, pins: &Pins) -> Result<Vec<Oid>> {
        let share = self.policy.in_commit();
        let cutoff = self.cutoff_ms();
        if share == 0 || !self.maybe_due(cutoff) {
            return Ok(Vec::new());
        }
        let deleted = delete_queued(w, pins, share, false, cutoff, || false)?;
        self.queue_seen(&deleted);
        self.note_deleted(deleted.oids.len() as u64, deleted.bytes, false);
        Ok(deleted.oids)
    }

    fn after_commit(
        &self,
        records: &std::collections::BTreeMap<Oid, Record>,
        released: &[Oid],
        bytes: u64,
        queued: u64,
    ) {
        if let Some(extra) = self.extra.lock().as_mut() {
            for r in records.values() {
                extra.insert(r.oid());
                extra.extend(r.refs());
            }
            // What the commit stopped referencing was reachable until now
            // (perhaps not yet marked): this collection keeps it, so that it
            // is never swept inside its grace window; a later one takes it.
            extra.extend(released.iter().copied());
        }
        self.committed(bytes, queued);
    }

    fn deletion_committed(&self, deleted: &Deleted) {
        // Possibly outside the commit lock: a commit may have queued since.
        self.queue_seen_unlocked(deleted);
        self.note_deleted(deleted.oids.len() as u64, deleted.bytes, false);
    }

    fn on_close(&self) {
        self.shutdown();
    }
}
