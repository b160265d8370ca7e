//! The commit path: the commit lock and its state, and the parts it is
//! made of (each in its own file):
//!
//! - `sequencer`: the commit order's turns and the line of checked commits
//!   waiting to be applied (flat combining: whichever committer in line
//!   gets there first applies the line, several commits in one batch);
//! - `apply`: validation inside the write transaction (the one rule of
//!   `storage::validate_commit`), and the apply of one commit with its
//!   reference counts;
//!
//! What placed commits need and what the collector is deleting (pending
//! deletions) is `engine/pins.rs`, shared with the reference counts.

mod apply;
mod sequencer;
#[cfg(test)]
mod tests;

pub(in crate::engine) use apply::write_commit;
pub(crate) use sequencer::{OrderEntry, OrderGuard, Placed, QueuedOrder, Sequencer};

use std::collections::HashMap;

use crate::engine::pins::Undoom;
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::ranked::{MutexGuard, rank};
use redb::{Durability, WriteTransaction};

use crate::checkpoint::CheckpointFacts;
use crate::engine::refcount::Deleted;
use crate::engine::{Engine, SessionId};
use crate::error::{Result, StorageError};
use crate::record::Oid;

/// State guarded by the commit lock: everything a commit reads or changes
/// outside redb.
pub(crate) struct CommitState {
    pub(super) next_oid: u64,
    /// The durable reservation mark: no oid at or above it was handed out.
    pub(super) reserved: u64,
    /// How far the next reservation reaches past what is asked, and when
    /// the last one was made (see `Engine::allocate_capped`).
    pub(super) oid_block: u64,
    pub(super) reserved_at: Option<Instant>,
    /// Commits and record bytes since the last checkpoint began.
    pub(super) commits_since: u64,
    pub(super) bytes_since: u64,
    pub(super) last_checkpoint: Instant,
    /// redb write transactions committed since open (commits, the
    /// collector's, imports').
    pub(super) applied_seq: u64,
    /// Sequence number of the last commit (the log's numbering, persisted
    /// in the file with each logged commit).
    pub(super) log_seq: u64,
    /// Turns of the commit order finished (applied or refused).
    pub(super) turns_done: u64,
    /// A collector transaction cut short for a waiting committer and left
    /// open for it (see [`Engine::deletion_txn`]).
    pub(super) parked: Option<Parked>,
}

/// A collector transaction that deleted `deleted` (its oids doomed), not
/// committed: the next commit applies its records in it and commits both
/// at once, so the committer that cut the deletion short does not wait for
/// a commit of its own (only a commit expected to pass: see [`Carry`]).
/// Whoever else next needs redb's writer commits it first
/// ([`Engine::settle_parked`]).
pub(crate) struct Parked {
    w: WriteTransaction,
    deleted: Deleted,
}

/// Oids handed out and not yet stored (under their own lock, so that a
/// commit can be checked without the commit lock).
#[derive(Default)]
pub(crate) struct Allocations {
    /// Each oid with the session that holds it.
    pub(super) by_oid: HashMap<Oid, SessionId>,
    /// How many of `by_oid` each session holds.
    pub(super) by_session: HashMap<SessionId, u64>,
}

impl Allocations {
    /// Whether `session` may store `oid`, which is not stored yet: the
    /// session was handed it, or it is the root and no other session was
    /// handed it (as Durus's server, which drops a client that stores an
    /// oid another client holds).
    pub(super) fn may_create(&self, session: SessionId, oid: Oid) -> Result<()> {
        use crate::storage::Holder;
        let holder = match self.by_oid.get(&oid) {
            Some(&s) if s == session => Holder::ThisSession,
            Some(_) => Holder::AnotherSession,
            None => Holder::Nobody,
        };
        crate::storage::may_create(oid, holder)
    }
}

impl CommitState {
    pub(super) fn facts(&self) -> CheckpointFacts {
        CheckpointFacts {
            commits_since_checkpoint: self.commits_since,
            bytes_since_checkpoint: self.bytes_since,
            since_checkpoint: self.last_checkpoint.elapsed(),
        }
    }
}

/// The result of applying a commit: what remains to make it durable.
#[derive(Debug, Clone, Copy)]
#[must_use = "a commit is acknowledged only after Engine::finish"]
pub(crate) struct CommitTicket {
    /// The commit's sequence number.
    pub(super) seq: u64,
    /// Wait for the log to be durable up to `seq`.
    pub(super) wait: bool,
    /// The checkpoint policy asks for a checkpoint.
    pub(super) checkpoint: bool,
}

impl Engine {
    /// Whether a committer is waiting for the commit lock (the collector
    /// then cuts its step short).
    pub(crate) fn committers_waiting(&self) -> bool {
        self.seq.committers_waiting.load(Ordering::Acquire) > 0
    }

    /// Lets committers waiting for the writer go first (for a few
    /// milliseconds at most), before a collector transaction.
    pub(crate) fn yield_to_committers(&self) {
        let deadline = Instant::now() + std::time::Duration::from_millis(5);
        while self.committers_waiting() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Takes the commit lock (the state every apply changes), counting the
    /// wait so that the collector makes way.
    fn lock_state(&self) -> MutexGuard<'_, CommitState, { rank::COMMIT }> {
        self.seq.committers_waiting.fetch_add(1, Ordering::AcqRel);
        let state = self.commit.lock();
        self.seq.committers_waiting.fetch_sub(1, Ordering::AcqRel);
        state
    }

    /// Runs `f` in a write transaction under the commit lock with the given
    /// durability; `f` also gets the oid allocation mark. A failure of the
    /// commit poisons the store.
    pub(crate) fn write_txn<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, u64) -> Result<T>,
    ) -> Result<T> {
        self.write_txn_state(durability, |w, st| f(w, st.next_oid))
    }

    /// [`write_txn`](Self::write_txn) with the commit state (engine-internal).
    pub(super) fn write_txn_state<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, &mut CommitState) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        let mut guard = self.lock_state();
        let st = &mut *guard;
        let w = self.begin_locked(st, durability)?;
        let value = match f(&w, st) {
            Ok(v) => v,
            Err(e) => {
                drop(w);
                return Err(e);
            }
        };
        self.commit_locked(st, w)?;
        if matches!(durability, Durability::Immediate) {
            // Every commit before it is durable in the file with it.
            self.sync.made_durable(st.applied_seq, st.log_seq);
        }
        Ok(value)
    }

    /// A collector deletion in a `Durability::None` write transaction under
    /// the commit lock: `f` deletes (dooming what it deletes). If `f` was
    /// cut short for a waiting committer and `hand_over`, the transaction
    /// is left open for that committer instead of committed (true), and
    /// the deletion's effects ([`Engine::deletion_committed`]) follow that
    /// commit. Otherwise it is committed here and the caller sees to those
    /// effects (false).
    pub(crate) fn deletion_txn(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<Deleted>,
        hand_over: bool,
    ) -> Result<(Deleted, bool)> {
        self.check_writable()?;
        let mut st = self.lock_state();
        let w = self.begin_locked(&mut st, Durability::None)?;
        let deleted = f(&w)?;
        // What it doomed stays doomed until its transaction is over.
        let mut doomed = Undoom(&self.pins, deleted.oids.iter().map(|o| o.0).collect());
        if hand_over && deleted.cut && !deleted.oids.is_empty() {
            doomed.1.clear();
            st.parked = Some(Parked {
                w,
                deleted: deleted.clone(),
            });
            return Ok((deleted, true));
        }
        self.commit_locked(&mut st, w)?;
        Ok((deleted, false))
    }

    /// Begins a write transaction under the commit lock, once a parked
    /// deletion is committed (redb has one writer).
    fn begin_locked(
        &self,
        st: &mut CommitState,
        durability: Durability,
    ) -> Result<WriteTransaction> {
        self.settle_parked(st)?;
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_durability(durability)?;
        w.set_quick_repair(self.quick_repair);
        Ok(w)
    }

    /// Commits `w` under the commit lock; a failure poisons the store.
    fn commit_locked(&self, st: &mut CommitState, w: WriteTransaction) -> Result<()> {
        let r = w.commit().map_err(StorageError::from);
        self.poisoning(r)?;
        st.applied_seq += 1;
        Ok(())
    }

    /// Commits the parked collector transaction, if any (before another
    /// write transaction begins: redb has one writer). A store that is not
    /// writable any more drops it instead.
    pub(super) fn settle_parked(&self, st: &mut CommitState) -> Result<()> {
        let Some(Parked { w, deleted }) = st.parked.take() else {
            return Ok(());
        };
        let _undoom = Undoom(&self.pins, deleted.oids.iter().map(|o| o.0).collect());
        self.check_writable()?;
        self.commit_locked(st, w)?;
        self.deletion_committed(&deleted);
        Ok(())
    }

    /// What follows the commit of a collector deletion: every session is
    /// told of the deleted oids, and the collector of what it learnt.
    pub(crate) fn deletion_committed(&self, deleted: &Deleted) {
        self.publish_changes(None, &deleted.oids);
        if let Some(h) = self.hook.get() {
            h.deletion_committed(deleted);
        }
    }
}
