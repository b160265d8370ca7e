//! The commit path: the commit lock, validation inside the write
//! transaction, and the apply of one commit with its reference counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;
use redb::{Durability, ReadableTable, WriteTransaction};

use super::layout::{KEY_APPLIED, LOG_STATE, RECORDS, now_unix_ms};
use super::refcount::{apply_ref_deltas, corrupt};
use super::{Engine, SessionId};
use crate::checkpoint::{CheckpointFacts, Durability as Mode};
use crate::error::{Conflict, InvalidInput, Result, StorageError};
use crate::record::{Oid, Record, refs_of};

/// State guarded by the commit lock: everything a commit reads or changes
/// outside redb.
pub(crate) struct CommitState {
    pub(super) next_oid: u64,
    pub(super) reserved: u64,
    /// Oids handed out and not yet stored, with the session that holds each.
    pub(super) allocated: HashMap<Oid, SessionId>,
    /// How many of `allocated` each session holds.
    pub(super) allocated_by: HashMap<SessionId, u64>,
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

    /// Commits `records` for `session` and returns once it is as durable as
    /// the store's durability mode promises.
    pub(crate) fn commit(&self, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<()> {
        let ticket = self.lock_commits().apply(session, records)?;
        self.finish(ticket)
    }

    /// [`commit`](Self::commit), and a snapshot of the state just after it
    /// (taken under the commit lock, so it holds nothing committed later).
    pub(crate) fn commit_and_snapshot(
        &self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
    ) -> Result<super::Snapshot> {
        let mut guard = self.lock_commits();
        let ticket = guard.apply(session, records)?;
        let snapshot = self.snapshot()?;
        drop(guard);
        self.finish(ticket)?;
        Ok(snapshot)
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
            // Every commit before it is durable in the file with it.
            self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
            self.log_durable.fetch_max(st.log_seq, Ordering::AcqRel);
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
                seq: st.log_seq,
                wait: false,
                checkpoint: false,
            });
        }
        let bytes: u64 = records.values().map(|r| r.len() as u64).sum();
        let db = engine.db()?;
        let mut w = db.rw()?.begin_write()?;
        // Never redb's fsync here: the log, or a checkpoint, makes it durable.
        w.set_durability(Durability::None)?;
        w.set_quick_repair(engine.quick_repair);
        let (queued, released) = write_commit(&w, Some((session, &st.allocated)), records)?;
        // The commit's share of the collector's work, in its own transaction.
        let hook = engine.hook.get();
        let collected = match hook {
            Some(h) => h.in_commit(&w)?,
            None => Vec::new(),
        };
        let seq = st.log_seq + 1;
        let mut logged_at = None;
        if let Some(log) = &engine.log {
            w.open_table(LOG_STATE)?.insert(KEY_APPLIED, seq)?;
            let at = log.position();
            if let Err(e) = log.append(seq, records.values()) {
                drop(w);
                return Err(e);
            }
            logged_at = Some((log, at));
        }
        let oids: Vec<Oid> = records.keys().copied().collect();
        {
            // Visible and published as one step (a snapshot falls before
            // or after both).
            let _published = engine.publish.lock();
            let r = w.commit().map_err(StorageError::from);
            if r.is_err()
                && let Some((log, at)) = logged_at
            {
                // Not in the file: not in the log either, so a replay cannot
                // apply a commit that was refused.
                let _ = log.unappend(seq, at);
            }
            engine.poisoning(r)?;
            engine.publish_changes(Some(session), &oids);
            engine.publish_changes(None, &collected);
        }

        st.applied_seq += 1;
        st.log_seq = seq;
        st.commits_since += 1;
        st.bytes_since += bytes;
        let checkpoint = engine.policy.checkpoint_due(&st.facts());
        for oid in &oids {
            if let Some(s) = st.allocated.remove(oid)
                && let Some(n) = st.allocated_by.get_mut(&s)
            {
                *n = n.saturating_sub(1);
            }
        }
        if let Some(h) = hook {
            h.after_commit(records, &released, bytes, queued);
        }
        Ok(CommitTicket {
            seq,
            wait: engine.log.is_some() && engine.durability == Mode::Fsync,
            checkpoint,
        })
    }
}

/// Validates a commit of `session` inside `w` (unless `check` is `None`:
/// a replay of a logged commit) and writes its records and reference counts.
/// Returns how many oids it queued for the collector, and the oids whose
/// reference count it lowered.
///
/// The records are written first and checked as they go: a refusal returns
/// an error, and the caller drops the transaction, which undoes every write.
/// Writing first lets each insert hand back the record it replaces, so the
/// checks cost only what is new: whether each oid may be written (from the
/// old record's presence), and whether each reference the old record did
/// not already hold resolves. A reference the old record held is kept
/// without a lookup: its count kept its target alive. (A store imported with
/// `--allow-dangling` may hold a dangling one; a commit that keeps it is
/// accepted, one that adds it is refused.) Every oid's permission is checked
/// before any reference, as `validate_commit` does.
pub(super) fn write_commit(
    w: &WriteTransaction,
    check: Option<(SessionId, &HashMap<Oid, SessionId>)>,
    records: &BTreeMap<Oid, Record>,
) -> Result<(u64, Vec<Oid>)> {
    let mut table = w.open_table(RECORDS)?;
    // Only the references a record gained or lost change a count: most
    // rewrites keep their references, and then nothing is counted at all.
    let mut delta: HashMap<u64, i64> = HashMap::new();
    // References to look up once every record is written.
    let mut new_refs: Vec<Oid> = Vec::new();
    let (mut old_refs, mut refs): (Vec<Oid>, Vec<Oid>) = (Vec::new(), Vec::new());
    for (oid, record) in records {
        let old = table.insert(oid.0, record.as_bytes())?;
        let present = old.is_some();
        old_refs.clear();
        if let Some(v) = &old {
            old_refs.extend(refs_of(v.value()).map_err(|e| corrupt(*oid, e))?);
        }
        drop(old);
        if let Some((session, allocated)) = check {
            may_write(session, allocated, *oid, present)?;
        }
        refs.clear();
        refs.extend(record.refs());
        old_refs.sort_unstable();
        refs.sort_unstable();
        // A merge of the two sorted lists: an occurrence in both cancels.
        let (mut i, mut j) = (0, 0);
        while i < old_refs.len() || j < refs.len() {
            match (old_refs.get(i), refs.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    *delta.entry(a.0).or_default() -= 1;
                    i += 1;
                }
                (_, Some(b)) => {
                    *delta.entry(b.0).or_default() += 1;
                    if check.is_some()
                        && old_refs.binary_search(b).is_err()
                        && !records.contains_key(b)
                    {
                        new_refs.push(*b);
                    }
                    j += 1;
                }
                _ => break,
            }
        }
    }
    if check.is_some() && !new_refs.is_empty() {
        new_refs.sort_unstable();
        new_refs.dedup();
        let mut dangling = Vec::new();
        for r in new_refs {
            if table.get(r.0)?.is_none() {
                dangling.push(r);
            }
        }
        if !dangling.is_empty() {
            return Err(Conflict::DanglingRefs { oids: dangling }.into());
        }
    }
    drop(table);
    let released = delta
        .iter()
        .filter(|(_, d)| **d < 0)
        .map(|(o, _)| Oid(*o))
        .collect();
    Ok((apply_ref_deltas(w, delta, now_unix_ms())?, released))
}

/// Whether `session` may write `oid`: it is stored already, or it is the
/// root, or the session was handed it.
fn may_write(
    session: SessionId,
    allocated: &HashMap<Oid, SessionId>,
    oid: Oid,
    present: bool,
) -> Result<()> {
    if present || oid == Oid::ROOT {
        return Ok(());
    }
    match allocated.get(&oid) {
        Some(&s) if s == session => Ok(()),
        Some(_) => Err(InvalidInput::OidOfAnotherSession { oid }.into()),
        None => Err(Conflict::UnknownOid { oid }.into()),
    }
}
