//! The collector's methods on [`RedbStorage`].

use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use super::RedbStorage;
use crate::error::Result;
use crate::gc::{FullProgress, FullReport, GcState, GcStats, read_state, run_full, step};

/// What an explicit incremental collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Records deleted.
    pub removed_objects: u64,
    /// Bytes of the deleted records.
    pub removed_bytes: u64,
    /// Write transactions used.
    pub steps: u64,
    /// Oids left in the queue afterwards.
    pub queue_left: u64,
    /// Wall time.
    pub elapsed: Duration,
}

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
