//! The collector's state shared with the engine: the policy, the counters
//! the commit path feeds (through `CommitHook`), and the thread's guard.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::ranked::{Mutex, rank};
use crossbeam_channel::Sender;

use super::policy::{GcFacts, GcPolicy};
use super::state::read_state;
use crate::engine::layout::now_unix_ms;
use crate::engine::{CommitHook, Deleted, Engine, Pins, delete_queued};
use crate::error::Result;
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
    pub(super) opened: Instant,
    pub(super) bytes_since_full: AtomicU64,
    pub(super) commits_since_full: AtomicU64,
    pub(super) deleted_since_full: AtomicU64,
    /// Nanoseconds since `opened` of the last commit, plus one; 0: none yet.
    pub(super) last_commit: AtomicU64,
    pub(super) stopping: AtomicBool,
    pub(super) incremental_removed: AtomicU64,
    pub(super) full_removed: AtomicU64,
    pub(super) removed_bytes: AtomicU64,
    pub(super) full_collections: AtomicU64,
    pub(super) background_rounds: AtomicU64,
    pub(super) nudge: Mutex<Option<Sender<()>>, { rank::LEAF }>,
    /// The earliest drop time (ms since the Unix epoch) in the queue as far
    /// as known: `u64::MAX` once a deletion found the queue empty and nothing
    /// was queued since, 0 when unknown. Commits skip their share without
    /// looking while it is not yet due.
    pub(super) next_drop_ms: AtomicU64,
    /// The batch of the thread's next incremental step: the policy's, doubled
    /// after every step that used all of it (a backlog), up to
    /// [`MAX_BATCH`]. A step stops early when a committer waits, so a large
    /// batch does not hold commits up.
    pub(super) batch: std::sync::atomic::AtomicUsize,
    /// A burst ended with a step left to a waiting committer: its
    /// checkpoint is taken at the start of the next round instead.
    pub(super) checkpoint_owed: AtomicBool,
    /// Held by whoever runs a full collection.
    pub(crate) full_lock: Mutex<(), { rank::GC_FULL }>,
    /// An explicit full collection (a pack) waits for `full_lock`: a
    /// background one gives way (it restarts later).
    pub(crate) explicit_waiting: AtomicBool,
    /// While a full collection runs: every oid stored or referenced by a
    /// commit since its start (recorded by the commit hook, under the commit
    /// lock). The sweep keeps them and what they reach.
    pub(crate) extra: Mutex<Option<std::collections::HashSet<Oid>>, { rank::LEAF }>,
    pub(super) thread: Mutex<Option<CollectorGuard>, { rank::LEAF }>,
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

    pub(super) fn facts(&self, engine: &Engine, full_running: bool) -> Result<(GcFacts, bool)> {
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
pub(super) struct CollectorGuard {
    pub(super) stop: Sender<Sender<()>>,
    pub(super) handle: Option<JoinHandle<()>>,
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
