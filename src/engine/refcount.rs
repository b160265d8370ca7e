//! Reference counts and the collector's queue: the API the collector uses
//! to reach the store's bookkeeping.

use std::collections::HashMap;

use redb::{ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::layout::{GC_QUEUE, RECORDS, REFCOUNTS};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record, RecordError, refs_of};

/// Oids taken from the queue per round; between rounds a deletion ends
/// early if `stop()` says so.
const ROUND: usize = 8;

/// Applies reference count changes; an oid whose count falls to zero is queued
/// for the collector.
/// Returns how many oids were queued.
pub(crate) fn apply_ref_deltas(w: &WriteTransaction, delta: HashMap<u64, i64>) -> Result<u64> {
    if delta.values().all(|d| *d == 0) {
        return Ok(0);
    }
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut queue = w.open_table(GC_QUEUE)?;
    apply_ref_deltas_in(&mut counts, &mut queue, delta)
}

/// [`apply_ref_deltas`] on tables the caller holds open.
fn apply_ref_deltas_in(
    counts: &mut redb::Table<u64, u64>,
    queue: &mut redb::Table<u64, ()>,
    delta: HashMap<u64, i64>,
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
            queue.insert(oid, ())?;
            queued += 1;
        } else {
            counts.insert(oid, new)?;
        }
    }
    Ok(queued)
}

/// What [`delete_queued`] did.
#[derive(Debug, Default)]
pub(crate) struct Deleted {
    /// Oids deleted.
    pub(crate) oids: Vec<Oid>,
    /// Bytes of the deleted records.
    pub(crate) bytes: u64,
    /// The queue was found empty.
    pub(crate) queue_empty: bool,
    /// Queue entries left (counted only when asked).
    pub(crate) queue_left: Option<u64>,
}

/// Deletes queued oids that are still garbage inside the write transaction
/// `w`: up to `batch` oids looked at, what the deletions release included.
/// Used by collector steps and by commits that take a share of the work.
/// Each candidate is re-checked: a commit may have referenced it again
/// since it was queued.
pub(crate) fn delete_queued(
    w: &WriteTransaction,
    batch: usize,
    count_left: bool,
    stop: impl Fn() -> bool,
) -> Result<Deleted> {
    let batch = batch.max(1);
    // Rounds within the one transaction: deletions queue what they
    // release, and the next round takes those, until `batch` oids were
    // looked at (a chain of garbage goes in one step, not one per link)
    // or `stop()` says a committer is waiting.
    let mut looked = 0usize;
    let mut out = Deleted::default();
    // The three tables stay open for the whole call (opening them is a
    // good part of the cost of one deletion).
    let mut queue = w.open_table(GC_QUEUE)?;
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut records = w.open_table(RECORDS)?;
    while looked < batch {
        if looked > 0 && stop() {
            break;
        }
        let mut candidates = Vec::new();
        while looked + candidates.len() < batch && candidates.len() < ROUND {
            let Some((k, _)) = queue.pop_first()? else {
                break;
            };
            candidates.push(k.value());
        }
        if candidates.is_empty() {
            out.queue_empty = true;
            break;
        }
        looked += candidates.len();
        let mut delta: HashMap<u64, i64> = HashMap::new();
        for oid in candidates {
            if oid == Oid::ROOT.0 || counts.get(oid)?.is_some_and(|c| c.value() > 0) {
                continue;
            }
            let Some(old) = records.remove(oid)? else {
                continue;
            };
            out.bytes += old.value().len() as u64;
            for r in refs_of(old.value()).map_err(|e| corrupt(Oid(oid), e))? {
                *delta.entry(r.0).or_default() -= 1;
            }
            out.oids.push(Oid(oid));
        }
        apply_ref_deltas_in(&mut counts, &mut queue, delta)?;
    }
    if count_left {
        out.queue_left = Some(queue.len()?);
    }
    Ok(out)
}

/// Removes the counts and queue entries of `oids` (deleted by a sweep).
pub(crate) fn forget(w: &WriteTransaction, oids: &[Oid]) -> Result<()> {
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut queue = w.open_table(GC_QUEUE)?;
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
