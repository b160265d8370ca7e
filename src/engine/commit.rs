//! The commit path: the commit lock, validation inside the write
//! transaction, and the apply of one commit with its reference counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;
use redb::{Durability, ReadableTable, WriteTransaction};

use super::layout::RECORDS;
use super::refcount::{apply_ref_deltas, corrupt};
use super::{Engine, SessionId};
use crate::checkpoint::{CheckpointFacts, CommitDurability};
use crate::error::{Conflict, InvalidInput, Result, StorageError};
use crate::record::{Oid, Record, refs_of};
use crate::storage::validate_commit;

/// State guarded by the commit lock: everything a commit reads or changes
/// outside redb.
pub(crate) struct CommitState {
    pub(super) next_oid: u64,
    pub(super) reserved: u64,
    /// Oids handed out and not yet stored, with the session that holds each.
    pub(super) allocated: HashMap<Oid, SessionId>,
    pub(super) commits_since: u64,
    pub(super) bytes_since: u64,
    pub(super) last_checkpoint: Instant,
    /// Sequence number of the last applied commit.
    pub(super) applied_seq: u64,
}

impl CommitState {
    pub(super) fn facts(&self) -> CheckpointFacts {
        CheckpointFacts {
            commits_since_checkpoint: self.commits_since,
            bytes_since_checkpoint: self.bytes_since,
            since_checkpoint: self.last_checkpoint.elapsed(),
        }
    }

    pub(super) fn checkpointed(&mut self) {
        self.commits_since = 0;
        self.bytes_since = 0;
        self.last_checkpoint = Instant::now();
    }
}

/// The result of applying a commit: what remains to make it durable.
#[derive(Debug, Clone, Copy)]
#[must_use = "a commit is acknowledged only after Engine::finish"]
pub(crate) struct CommitTicket {
    pub(super) seq: u64,
    pub(super) needs_flush: bool,
}

/// The commit lock, held.
pub(crate) struct CommitGuard<'a> {
    engine: &'a Engine,
    state: MutexGuard<'a, CommitState>,
}

impl Engine {
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
    pub(crate) fn lock_commits(&self) -> CommitGuard<'_> {
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
    pub(crate) fn commit(&self, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<()> {
        let ticket = self.lock_commits().apply(session, records)?;
        self.finish(ticket)
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
}

impl CommitGuard<'_> {
    /// Validates and applies one commit of `session` in its own redb write
    /// transaction. Nothing is written if validation fails. Call
    /// [`Engine::finish`] with the ticket, after dropping the guard, before
    /// acknowledging the commit.
    pub(crate) fn apply(
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
        let hook = engine.hook.get();
        let collected = match hook {
            Some(h) => h.in_commit(&w)?,
            None => Vec::new(),
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
        engine.invalidate_others(Some(session), &oids);
        if !collected.is_empty() {
            engine.invalidate_others(None, &collected);
        }
        if let Some(h) = hook {
            h.after_commit(records, bytes, queued);
        }
        Ok(CommitTicket {
            seq,
            needs_flush: decision == CommitDurability::Now && !immediate,
        })
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
