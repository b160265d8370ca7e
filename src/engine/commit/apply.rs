//! Validation inside the write transaction and the apply of commits,
//! with their reference counts.

use std::collections::{BTreeMap, HashMap};

use redb::{Durability, ReadableTable, WriteTransaction};

use super::{CommitState, CommitTicket, Parked};
use crate::checkpoint::Durability as Mode;
use crate::engine::layout::{KEY_APPLIED, LOG_STATE, RECORDS, now_unix_ms};
use crate::engine::pins::{Undoom, pin_list};
use crate::engine::refcount::{apply_ref_deltas, corrupt};
use crate::engine::{Engine, SessionId};
use crate::error::{Conflict, Result, StorageError};
use crate::record::{Oid, Record, refs_of_validated};

/// Whether `record` references other oids than the stored bytes `old` of
/// `oid` (a corrupt record is an error); if so, `old`'s references are
/// added to `out`. Byte-equal references (most rewrites) are not parsed.
fn changed_refs(oid: Oid, old: &[u8], record: &Record, out: &mut Vec<Oid>) -> Result<bool> {
    let end = Record::check(old).map_err(|e| corrupt(oid, e))?;
    if old[end..] == *record.refs_bytes() {
        return Ok(false);
    }
    out.extend(refs_of_validated(&old[end..]));
    Ok(true)
}

/// Pins `pinned` (the commit's [`pin_list`]) and validates the commit:
/// false if something it names is being deleted or it does not pass
/// ([`passes`]). The pins are taken either way: unpin them.
pub(super) fn pin_and_pass(
    engine: &Engine,
    session: SessionId,
    records: &BTreeMap<Oid, Record>,
    pinned: &[u64],
) -> bool {
    engine.pins.pin(pinned) && passes(engine, session, records).unwrap_or(false)
}

/// Whether a commit of `session` passes validation against the state
/// applied so far: each oid is stored, or the session may create it, and
/// each reference its record gains resolves.
fn passes(engine: &Engine, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<bool> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let mut old_refs: Vec<Oid> = Vec::new();
    let mut gained: Vec<Oid> = Vec::new();
    for (oid, record) in records {
        old_refs.clear();
        match table.get(oid.0)? {
            Some(v) => {
                if !changed_refs(*oid, v.value(), record, &mut old_refs)? {
                    // The same references: none gained.
                    continue;
                }
            }
            None => {
                if engine.alloc.may_create(session, *oid).is_err() {
                    return Ok(false);
                }
            }
        }
        old_refs.sort_unstable();
        gained.extend(
            record
                .refs()
                .filter(|r| old_refs.binary_search(r).is_err() && !records.contains_key(r)),
        );
    }
    gained.sort_unstable();
    gained.dedup();
    for r in gained {
        if table.get(r.0)?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Whether a commit may carry a collector deletion parked for it
/// ([`Parked`]). A commit refused with the deletion in its transaction
/// undoes the deletion too, so only commits expected to pass carry one:
/// bad input must not undo the collector's work (a client sending commits
/// that are refused would otherwise stop the collector for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Carry {
    /// Placed in the line: validated and pinned, it passes in its turn.
    Yes,
    /// Refused when it was placed: the deletion is committed on its own
    /// first.
    No,
    /// Not validated yet (the library, snapshot reads): carries it only if
    /// it passes validation and touches nothing the deletion removes.
    IfClean,
}

/// Whether a commit of `session` not yet validated may carry a parked
/// deletion: nothing it writes or references is being deleted, and it
/// passes validation against the state applied so far.
pub(super) fn clean(engine: &Engine, session: SessionId, records: &BTreeMap<Oid, Record>) -> bool {
    let pinned = pin_list(records);
    let clean = pin_and_pass(engine, session, records, &pinned);
    engine.pins.unpin(&pinned);
    clean
}

/// Validates and applies one commit of `session` in its own redb write
/// transaction, under the commit lock. Nothing is written if validation
/// fails. With `publish`, its changes are published just before they become
/// visible (else they were published when it took its turn). Call
/// [`Engine::finish`] with the ticket before acknowledging the commit.
pub(super) fn apply(
    engine: &Engine,
    st: &mut CommitState,
    session: SessionId,
    records: &BTreeMap<Oid, Record>,
    publish: bool,
    carry: Carry,
) -> Result<CommitTicket> {
    if records.is_empty() {
        engine.check_writable()?;
        return Ok(CommitTicket {
            seq: st.log_seq,
            wait: false,
            checkpoint: false,
        });
    }
    let mut tickets = apply_all(engine, st, &[(session, records)], publish, carry)?;
    Ok(tickets.pop().expect("one ticket for one commit"))
}

/// [`apply`] for consecutive commits, none empty, in one redb write
/// transaction: all are applied, each in turn on the state the ones before
/// it left, or none is (a refusal of one undoes all: apply them one by one
/// then). One ticket for each, in order.
pub(super) fn apply_all(
    engine: &Engine,
    st: &mut CommitState,
    commits: &[(SessionId, &BTreeMap<Oid, Record>)],
    publish: bool,
    carry: Carry,
) -> Result<Vec<CommitTicket>> {
    engine.check_writable()?;
    let bytes: Vec<u64> = commits
        .iter()
        .map(|(_, r)| r.values().map(|r| r.len() as u64).sum())
        .collect();
    // A collector deletion left open for this commit is committed with it
    // (undone with it if the commit is refused) if the commit may carry it;
    // else `begin_locked` commits it first.
    let carry = match carry {
        Carry::Yes => true,
        Carry::No => false,
        Carry::IfClean => st.parked.is_some() && commits.iter().all(|(s, r)| clean(engine, *s, r)),
    };
    let parked = if carry { st.parked.take() } else { None };
    let _undoom_parked = Undoom(
        &engine.pins,
        parked
            .iter()
            .flat_map(|p| p.deleted.oids.iter().map(|o| o.0))
            .collect(),
    );
    // Never redb's fsync here: the log, or a checkpoint, makes it durable.
    let (w, adopted) = match parked {
        Some(Parked { w, deleted }) => (w, Some(deleted)),
        None => (engine.begin_locked(st, Durability::None)?, None),
    };
    let mut counted = Vec::with_capacity(commits.len());
    for &(session, records) in commits {
        let may_create = |oid| engine.alloc.may_create(session, oid);
        counted.push(write_commit(&w, Some(&may_create), records)?);
    }
    // The commits' share of the collector's work, in their transaction
    // (a deletion they adopted is that share).
    let hook = engine.hook.get();
    let collected = match hook {
        Some(h) if adopted.is_none() => h.in_commit(&w, &engine.pins)?,
        _ => Vec::new(),
    };
    let _undoom = Undoom(&engine.pins, collected.iter().map(|o| o.0).collect());
    let first = st.log_seq + 1;
    let last = st.log_seq + commits.len() as u64;
    let mut logged_at = None;
    if let Some(log) = engine.sync.log() {
        w.open_table(LOG_STATE)?.insert(KEY_APPLIED, last)?;
        let at = log.position();
        if let Err(e) = log.append_all(first, commits.iter().map(|(_, r)| r.values())) {
            drop(w);
            return Err(e);
        }
        logged_at = Some((log, at));
    }
    {
        // Published, then visible, as one step: a snapshot falls before or
        // after both, and a load that sees a change (it reads without the
        // `publish` lock) finds it published, so flagged for a session not
        // yet told of it. (A failed redb commit poisons the store: what was
        // published for it no longer matters.)
        let _published = engine.inv.publishing();
        if publish {
            for &(session, records) in commits {
                let oids: Vec<Oid> = records.keys().copied().collect();
                engine.publish_changes(Some(session), &oids);
            }
        }
        engine.publish_changes(None, &collected);
        if let Some(d) = &adopted {
            engine.publish_changes(None, &d.oids);
        }
        let r = w.commit().map_err(StorageError::from);
        if r.is_err()
            && let Some((log, at)) = logged_at
        {
            // Not in the file: not in the log either, so a replay cannot
            // apply a commit that was refused.
            let _ = log.unappend(first, at);
        }
        engine.poisoning(r)?;
        #[cfg(test)]
        if let Some(f) = engine.on_visible.get() {
            for _ in commits {
                f(engine);
            }
        }
    }
    if let (Some(d), Some(h)) = (&adopted, hook) {
        h.deletion_committed(d);
    }

    st.applied_seq += 1;
    st.log_seq = last;
    st.commits_since += commits.len() as u64;
    st.bytes_since += bytes.iter().sum::<u64>();
    let checkpoint = engine.policy.checkpoint_due(&st.facts());
    engine
        .alloc
        .stored(commits.iter().flat_map(|(_, r)| r.keys().copied()));
    if let Some(h) = hook {
        for (&(_, records), ((queued, released), bytes)) in
            commits.iter().zip(counted.iter().zip(&bytes))
        {
            h.after_commit(records, released, *bytes, *queued);
        }
    }
    let wait = engine.sync.log().is_some() && engine.durability == Mode::Fsync;
    Ok((first..=last)
        .map(|seq| CommitTicket {
            seq,
            wait,
            // The last one's committer takes a checkpoint that is due.
            checkpoint: checkpoint && seq == last,
        })
        .collect())
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
pub(in crate::engine) fn write_commit(
    w: &WriteTransaction,
    check: Option<&dyn Fn(Oid) -> Result<()>>,
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
        if let Some(v) = &old
            && !changed_refs(*oid, v.value(), record, &mut old_refs)?
        {
            // The same references in the same order (most rewrites): no
            // count changes, and none is new.
            continue;
        }
        drop(old);
        if let Some(may_create) = check
            && !present
        {
            may_create(*oid)?;
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
