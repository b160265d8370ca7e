//! Reference counts and the collector's queue: the API the collector uses
//! to reach the store's bookkeeping.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::layout::{GC_DROPPED, GC_DUE, GC_QUEUE_V2, RECORDS, REFCOUNTS};
use super::pins::{Pins, Undoom};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record, RecordError, refs_of};

/// Oids taken from the queue per round; between rounds a deletion ends
/// early if `stop()` says so.
const ROUND: usize = 8;

/// The collector's queue, open in a write transaction: entries by drop
/// time, and each queued oid's latest drop time (an oid has at most one
/// entry: a new drop replaces the older one).
pub(crate) struct Queue<'t> {
    due: redb::Table<'t, (u64, u64), ()>,
    dropped: redb::Table<'t, u64, u64>,
}

impl<'t> Queue<'t> {
    pub(crate) fn open(w: &'t WriteTransaction) -> Result<Queue<'t>> {
        Ok(Queue {
            due: w.open_table(GC_DUE)?,
            dropped: w.open_table(GC_DROPPED)?,
        })
    }

    /// Queues `oid`, whose count fell to zero at `ms`.
    fn push(&mut self, oid: u64, ms: u64) -> Result<()> {
        if let Some(old) = self.dropped.insert(oid, ms)?.map(|v| v.value())
            && old != ms
        {
            self.due.remove((old, oid))?;
        }
        self.due.insert((ms, oid), ())?;
        Ok(())
    }

    /// Takes the first entry if it dropped at or before `cutoff`; otherwise
    /// says when the first one is due (or that the queue is empty).
    fn pop_due(&mut self, cutoff: u64) -> Result<Popped> {
        let first = self.due.first()?.map(|(k, _)| k.value());
        Ok(match first {
            None => Popped::Empty,
            Some((ms, oid)) if ms <= cutoff => {
                self.due.remove((ms, oid))?;
                if self.dropped.get(oid)?.map(|v| v.value()) == Some(ms) {
                    self.dropped.remove(oid)?;
                }
                Popped::Entry(ms, oid)
            }
            Some((ms, _)) => Popped::NotYet(ms),
        })
    }

    /// Removes `oid` from the queue.
    fn remove(&mut self, oid: u64) -> Result<()> {
        if let Some(ms) = self.dropped.remove(oid)?.map(|v| v.value()) {
            self.due.remove((ms, oid))?;
        }
        Ok(())
    }

    /// Entries queued.
    pub(crate) fn len(&self) -> Result<u64> {
        Ok(self.due.len()?)
    }
}

enum Popped {
    Entry(u64, u64),
    NotYet(u64),
    Empty,
}

/// Applies reference count changes; an oid whose count falls to zero is
/// queued for the collector with the drop time `drop_ms`. Returns how many
/// oids were queued.
pub(crate) fn apply_ref_deltas(
    w: &WriteTransaction,
    delta: HashMap<u64, i64>,
    drop_ms: u64,
) -> Result<u64> {
    if delta.values().all(|d| *d == 0) {
        return Ok(0);
    }
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut queue = Queue::open(w)?;
    apply_ref_deltas_in(&mut counts, &mut queue, delta, drop_ms)
}

/// [`apply_ref_deltas`] on tables the caller holds open.
fn apply_ref_deltas_in(
    counts: &mut redb::Table<u64, u64>,
    queue: &mut Queue,
    delta: HashMap<u64, i64>,
    drop_ms: u64,
) -> Result<u64> {
    let mut delta: Vec<(u64, i64)> = delta.into_iter().filter(|(_, d)| *d != 0).collect();
    delta.sort_unstable();
    let mut queued = 0;
    for (oid, d) in delta {
        let current = counts.get(oid)?.map(|v| v.value()).unwrap_or(0);
        let Some(new) = current.checked_add_signed(d) else {
            return Err(StorageError::damaged(format!(
                "the reference count of oid {oid} would fall below zero: the reference \
                 bookkeeping is damaged (`durus-redb check` recounts it)"
            )));
        };
        if new == 0 {
            counts.remove(oid)?;
            queue.push(oid, drop_ms)?;
            queued += 1;
        } else {
            counts.insert(oid, new)?;
        }
    }
    Ok(queued)
}

/// What [`delete_queued`] did.
#[derive(Debug, Default, Clone)]
pub(crate) struct Deleted {
    /// Oids deleted.
    pub(crate) oids: Vec<Oid>,
    /// Bytes of the deleted records.
    pub(crate) bytes: u64,
    /// The queue was found empty.
    pub(crate) queue_empty: bool,
    /// When the first entry still waiting (past the cutoff) dropped, if the
    /// deletion stopped at one.
    pub(crate) next_drop_ms: Option<u64>,
    /// Queue entries left (counted only when asked).
    pub(crate) queue_left: Option<u64>,
    /// Queue entries looked at.
    pub(crate) looked: usize,
    /// Cut short because `stop()` said so (a committer waits).
    pub(crate) cut: bool,
}

/// Deletes queued oids that dropped at or before `cutoff_ms` (their grace
/// window has passed; `u64::MAX` takes every one) and are still garbage,
/// inside the write transaction `w`: up to `batch` oids looked at, what the
/// deletions release included. Used by collector steps and by commits that
/// take a share of the work. Each candidate is re-checked: a commit may have
/// referenced it again since it was queued. What a deletion releases is
/// queued with the deleted object's drop time: it has been unreachable as
/// long, so a chain goes in one step, not one window per link.
///
/// Nothing a placed commit pins is deleted (it stays queued), and what is
/// deleted is doomed in `pins`: the caller undooms `oids` once `w` is
/// committed or dropped.
pub(crate) fn delete_queued(
    w: &WriteTransaction,
    pins: &Pins,
    batch: usize,
    count_left: bool,
    cutoff_ms: u64,
    stop: impl Fn() -> bool,
) -> Result<Deleted> {
    let batch = batch.max(1);
    let mut looked = 0usize;
    let mut out = Deleted::default();
    // The tables stay open for the whole call (opening them is a good part
    // of the cost of one deletion).
    let mut queue = Queue::open(w)?;
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut records = w.open_table(RECORDS)?;
    // Popped and not deleted now: what a placed commit pins, and what a
    // round cut short did not reach.
    let mut requeue = Vec::new();
    // On an error, what this call doomed is undoomed here.
    let mut doomed = Undoom(pins, Vec::new());
    'rounds: while looked < batch {
        if looked > 0 && stop() {
            out.cut = true;
            break;
        }
        let mut candidates = Vec::new();
        while looked + candidates.len() < batch && candidates.len() < ROUND {
            match queue.pop_due(cutoff_ms)? {
                Popped::Entry(ms, oid) => candidates.push((ms, oid)),
                Popped::NotYet(ms) => {
                    out.next_drop_ms = Some(ms);
                    break;
                }
                Popped::Empty => {
                    out.queue_empty = true;
                    break;
                }
            }
        }
        if candidates.is_empty() {
            break 'rounds;
        }
        looked += candidates.len();
        // A live candidate (referenced again since it was queued) is passed
        // by without being doomed: a commit naming it meanwhile is still
        // placed, not held back to be checked in its turn.
        let mut dead = Vec::with_capacity(candidates.len());
        for (ms, oid) in candidates {
            if oid != Oid::ROOT.0 && counts.get(oid)?.is_none_or(|c| c.value() == 0) {
                dead.push((ms, oid));
            }
        }
        let mut candidates = dead;
        // What a placed commit needs waits for a later round; the rest is
        // doomed until the caller's transaction is over.
        {
            let mut sets = pins.lock();
            candidates.retain(|&(ms, oid)| {
                if sets.is_pinned(oid) {
                    requeue.push((ms, oid));
                    false
                } else {
                    sets.doom(oid);
                    doomed.1.push(oid);
                    true
                }
            });
        }
        let mut delta: HashMap<u64, i64> = HashMap::new();
        let mut latest = 0;
        let mut spared = Vec::new();
        let mut stopped = false;
        let mut candidates = candidates.into_iter();
        for (ms, oid) in candidates.by_ref() {
            // A committer waiting for the writer waits for one deletion at
            // most, not for the rest of the round.
            if !out.oids.is_empty() && stop() {
                spared.push(oid);
                requeue.push((ms, oid));
                stopped = true;
                break;
            }
            let Some(old) = records.remove(oid)? else {
                spared.push(oid);
                continue;
            };
            latest = latest.max(ms);
            out.bytes += old.value().len() as u64;
            for r in refs_of(old.value()).map_err(|e| corrupt(Oid(oid), e))? {
                *delta.entry(r.0).or_default() -= 1;
            }
            out.oids.push(Oid(oid));
        }
        // Cut short: what the round did not reach is queued again as it was.
        let rest: Vec<(u64, u64)> = candidates.collect();
        spared.extend(rest.iter().map(|&(_, oid)| oid));
        requeue.extend(rest);
        if !spared.is_empty() {
            pins.undoom(spared);
        }
        if apply_ref_deltas_in(&mut counts, &mut queue, delta, latest)? > 0 {
            // The deletions queued what they released: what the round saw
            // of the queue no longer holds.
            out.queue_empty = false;
            out.next_drop_ms = None;
        }
        if stopped {
            out.cut = true;
            break;
        }
    }
    // Queued again as they were: for a later step (what a placed commit
    // pins, after that commit is applied; a commit that references one
    // takes it out).
    for (ms, oid) in requeue {
        queue.push(oid, ms)?;
        out.queue_empty = false;
    }
    if count_left {
        out.queue_left = Some(queue.len()?);
    }
    out.looked = looked;
    doomed.1.clear();
    Ok(out)
}

/// The queue's length and the drop time of its first entry, from a read
/// transaction (a format 2 store opened read-only has the old queue, without
/// times).
pub(crate) fn queue_summary(txn: &redb::ReadTransaction) -> Result<(u64, Option<u64>)> {
    match txn.open_table(GC_DUE) {
        Ok(t) => Ok((t.len()?, t.first()?.map(|(k, _)| k.value().0))),
        Err(redb::TableError::TableDoesNotExist(_)) => match txn.open_table(GC_QUEUE_V2) {
            Ok(t) => Ok((t.len()?, None)),
            Err(redb::TableError::TableDoesNotExist(_)) => Ok((0, None)),
            Err(e) => Err(e.into()),
        },
        Err(e) => Err(e.into()),
    }
}

/// How many queued oids dropped at or after `since_ms` (counted one by one:
/// as many as a grace window's worth of drops).
pub(crate) fn queued_since(txn: &redb::ReadTransaction, since_ms: u64) -> Result<u64> {
    match txn.open_table(GC_DUE) {
        Ok(t) => {
            let mut n = 0;
            for item in t.range((since_ms, 0)..)? {
                item?;
                n += 1;
            }
            Ok(n)
        }
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(0),
        Err(e) => Err(e.into()),
    }
}

/// Removes the counts and queue entries of `oids` (deleted by a sweep).
pub(crate) fn forget(w: &WriteTransaction, oids: &[Oid]) -> Result<()> {
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut queue = Queue::open(w)?;
    for oid in oids {
        counts.remove(oid.0)?;
        queue.remove(oid.0)?;
    }
    Ok(())
}

/// The error for a stored record that does not parse.
pub(crate) fn corrupt(oid: Oid, e: RecordError) -> StorageError {
    StorageError::damaged(format!("the stored record for oid {oid} is damaged: {e}"))
}

/// A stored record, checked.
pub(crate) fn stored_record(oid: Oid, bytes: &[u8]) -> Result<Record> {
    Record::for_oid(oid, bytes.to_vec()).map_err(|e| corrupt(oid, e))
}

/// The record for `oid` from an open records table.
pub(crate) fn load_from(
    table: &impl ReadableTable<u64, &'static [u8]>,
    oid: Oid,
) -> Result<Record> {
    match table.get(oid.0)? {
        Some(v) => stored_record(oid, v.value()),
        None => Err(StorageError::NotFound(oid)),
    }
}
