//! A front end's commits in one database transaction.
//!
//! The commit order is held from a client's invalidations until its commit
//! is written; while it is, other committers of this front end wait for it.
//! When one of them is waiting, a commit does not end its transaction: it
//! hands the order (the transaction, holding the order row) to the next
//! committer here, which is told the batch's oids as changed, and waits. The
//! last commit of the batch (nobody waiting, or the bounds reached) commits
//! the transaction once for all, and they are answered together. Loads of an
//! oid a batch has written are answered `Invalid` until the batch is
//! committed: whoever was told of the change cannot read what came before
//! it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{Conn, PgBackend};
use crate::error::{Result, StorageError};
use crate::record::Oid;

/// Commits at most in one batch.
pub(super) const MAX_COMMITS: usize = 32;

/// How long a batch may hold the order row at most (other front ends wait
/// for it meanwhile).
pub(super) const MAX_HOLD: Duration = Duration::from_millis(5);

/// The longest a commit waits for the batch it joined to end.
pub(super) const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// This front end's side of the commit order: its connection, and the
/// transaction a batch left open.
#[derive(Default)]
pub(crate) struct OrderSlot {
    /// The order's connection (`None` until connected, or after it broke).
    pub(super) conn: Option<Conn>,
    /// A batch whose transaction is open on `conn`, holding the order row.
    pub(super) open: Option<Batch>,
}

/// Commits written in the open transaction, not yet committed.
pub(super) struct Batch {
    /// The last tid written in it.
    pub(super) tid: u64,
    pub(super) started: Instant,
    /// Each commit's session and the oids it wrote, in order.
    pub(super) commits: Vec<(u64, Vec<Oid>)>,
    pub(super) outcome: Arc<Outcome>,
}

/// How a batch ended, for the commits waiting in it.
#[derive(Default)]
pub(super) struct Outcome {
    /// `Ok(true)`: committed, the flush barrier still to be waited for;
    /// `Ok(false)`: committed and flushed; `Err`: not committed.
    result: Mutex<Option<std::result::Result<bool, String>>>,
    ended: Condvar,
}

impl Outcome {
    fn set(&self, result: std::result::Result<bool, String>) {
        *self.result.lock() = Some(result);
        self.ended.notify_all();
    }

    /// Waits until the batch has ended, at most [`WAIT_LIMIT`]: a commit
    /// is never left waiting for ever (its answer then says that whether
    /// it was committed is unknown).
    pub(super) fn wait(&self) -> std::result::Result<bool, String> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut result = self.result.lock();
        loop {
            if let Some(r) = &*result {
                return r.clone();
            }
            if self.ended.wait_until(&mut result, deadline).timed_out() && result.is_none() {
                tracing::error!(
                    "a batch of commits was not ended within {} s: answering its commit as unknown",
                    WAIT_LIMIT.as_secs()
                );
                return Err(format!(
                    "the batch of commits this one joined was not ended within {} s: whether \
                     it was committed is unknown (sync and look)",
                    WAIT_LIMIT.as_secs()
                ));
            }
        }
    }
}

/// A batch's outcome to be set: set as failed if dropped unset (a panic
/// while the batch was being ended), so that no commit waits for it.
struct Answer(Option<Arc<Outcome>>);

impl Answer {
    fn set(&mut self, result: std::result::Result<bool, String>) {
        if let Some(o) = self.0.take() {
            o.set(result);
        }
    }
}

impl Drop for Answer {
    fn drop(&mut self) {
        self.set(Err(
            "the front end failed while ending the batch of commits this one joined: whether \
             it was committed is unknown (sync and look)"
                .into(),
        ));
    }
}

impl Batch {
    /// Whether the commit that just wrote may leave the transaction open
    /// for the next: someone waits, and the bounds allow one more.
    pub(super) fn may_grow(commits: usize, started: Instant, waiting: u64) -> bool {
        waiting > 0 && commits < MAX_COMMITS && started.elapsed() < MAX_HOLD
    }
}

impl PgBackend {
    /// Whether commits may share transactions: not with snapshot reads,
    /// whose snapshot after a commit must show the state just after it.
    pub(super) fn batching(&self) -> bool {
        !self
            .snapshot_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ends the open batch of `slot` (if any), with `last` (a commit just
    /// written, its session and oids) as its last: commits the transaction,
    /// tells every session, answers the commits waiting in it. Returns
    /// whether the flush barrier is still to be waited for.
    pub(super) fn end_batch(
        &self,
        slot: &mut OrderSlot,
        last: Option<(u64, u64, Vec<Oid>)>,
    ) -> Result<bool> {
        let (tid, mut commits, outcome) = match slot.open.take() {
            Some(b) => (b.tid, b.commits, Answer(Some(b.outcome))),
            None => match &last {
                Some((tid, _, _)) => (*tid, Vec::new(), Answer(None)),
                None => return Ok(false),
            },
        };
        let mut outcome = outcome;
        let tid = match last {
            Some((t, session, oids)) => {
                commits.push((session, oids));
                t
            }
            None => tid,
        };
        let Some(conn) = slot.conn.as_mut() else {
            let e = "the order's connection was lost".to_string();
            self.forget_pending();
            outcome.set(Err(e.clone()));
            return Err(super::database(e));
        };
        // With no other committer waiting here, the transaction flushes the
        // WAL itself (nobody would be released early), saving the
        // barrier's round trip; else the order is released before the
        // flush.
        let flush_now = self
            .deferred_flush
            .load(std::sync::atomic::Ordering::Relaxed)
            && self
                .order_waiting
                .load(std::sync::atomic::Ordering::Acquire)
                == 0;
        let barrier = self
            .deferred_flush
            .load(std::sync::atomic::Ordering::Relaxed)
            && !flush_now;
        // Visible and told under `catch_up`: a sync reading the log
        // meanwhile cannot tell a commit to its own session.
        let _log = self.catch_up.lock();
        let end = if flush_now {
            "SET LOCAL synchronous_commit = on; COMMIT"
        } else {
            "COMMIT"
        };
        match conn.batch(end) {
            Ok(()) => {
                let mut st = self.state.lock();
                st.pending.clear();
                // Commit i is told to every session but its own and those
                // of the later commits, which were told of it when they
                // took the order.
                for (i, (session, oids)) in commits.iter().enumerate() {
                    let told: Vec<u64> = commits[i..].iter().map(|(s, _)| *s).collect();
                    st.publish_except(&told, oids);
                    for oid in oids {
                        if let Some(s) = st.held.remove(oid)
                            && let Some(data) = st.sessions.get_mut(&s)
                        {
                            data.held -= 1;
                        }
                    }
                    if let Some(s) = st.sessions.get_mut(session) {
                        s.seen = tid;
                    }
                }
                st.known = tid;
                drop(st);
                outcome.set(Ok(barrier));
                Ok(barrier)
            }
            Err(e) => {
                // Whether it was applied is unknown: the log says, to
                // whoever reads it next (this front end included).
                slot.conn = None;
                self.state.lock().pending.clear();
                outcome.set(Err(e.to_string()));
                Err(e)
            }
        }
    }

    /// Rolls back the open batch of `slot` (its transaction failed): every
    /// commit waiting in it fails with `why`.
    pub(super) fn abandon_batch(&self, slot: &mut OrderSlot, why: &StorageError) {
        if let Some(conn) = slot.conn.as_mut()
            && conn.batch("ROLLBACK").is_err()
        {
            slot.conn = None;
        }
        self.forget_pending();
        if let Some(b) = slot.open.take() {
            b.outcome.set(Err(why.to_string()));
        }
    }

    fn forget_pending(&self) {
        self.state.lock().pending.clear();
    }
}
