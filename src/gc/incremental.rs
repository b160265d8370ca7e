//! Incremental collection: deletes queued oids whose reference count is still
//! zero, in small non-durable write transactions. Time is proportional to the
//! garbage, not to the store.

use std::collections::HashMap;

use redb::{Durability, ReadableTable, ReadableTableMetadata, WriteTransaction};

use super::state::{meta_in, migration_error};
use crate::error::Result;
use crate::record::{Oid, refs_of};
use crate::redb_store::engine::{Engine, apply_ref_deltas_in, corrupt};
use crate::redb_store::layout::{GC_QUEUE, RECORDS, REFCOUNTS};

/// Oids taken from the queue per round; between rounds a step ends early
/// if a committer waits.
const ROUND: usize = 8;

/// What one incremental step did.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Oids deleted (already sent to every session's invalid set).
    pub removed: Vec<Oid>,
    /// Bytes of the deleted records.
    pub bytes: u64,
    /// Queue entries left after the step.
    pub queue_left: u64,
}

/// Pops up to `batch` oids from the queue and deletes those that are still
/// garbage, all in one `Durability::None` write transaction under the commit
/// lock. Oids whose count falls to zero are queued (transitive release).
pub(crate) fn step(engine: &Engine, batch: usize) -> Result<Step> {
    {
        let db = engine.db()?;
        let txn = db.begin_read()?;
        if txn.open_table(GC_QUEUE)?.is_empty()? {
            return Ok(Step::default());
        }
    }
    engine.yield_to_committers();
    let step = engine.write_txn(Durability::None, |w, _st| {
        let (_, migration) = meta_in(w)?;
        if migration {
            return Err(migration_error());
        }
        let (removed, bytes, empty) = delete_queued(w, batch, || engine.committers_waiting())?;
        if empty {
            engine.gc.queue_found_empty();
        } else {
            engine.gc.queue_grew();
        }
        let queue_left = w.open_table(GC_QUEUE)?.len()?;
        Ok(Step {
            removed,
            bytes,
            queue_left,
        })
    })?;
    engine.invalidate_others(None, &step.removed);
    engine
        .gc
        .note_deleted(step.removed.len() as u64, step.bytes, false);
    Ok(step)
}

/// Deletes queued oids that are still garbage inside the write transaction
/// `w`: up to `batch` oids looked at, what the deletions release included.
/// Returns the oids deleted, their bytes, and whether the queue was found
/// empty. Used by collector steps and by commits that take a share of the
/// work.
pub(crate) fn delete_queued(
    w: &WriteTransaction,
    batch: usize,
    stop: impl Fn() -> bool,
) -> Result<(Vec<Oid>, u64, bool)> {
    let batch = batch.max(1);
    // Rounds within the one transaction: deletions queue what they
    // release, and the next round takes those, until `batch` oids were
    // looked at (a chain of garbage goes in one step, not one per link)
    // or `stop()` says a committer is waiting.
    let mut looked = 0usize;
    let mut removed = Vec::new();
    let mut bytes = 0u64;
    // The three tables stay open for the whole call (opening them is a
    // good part of the cost of one deletion).
    let mut queue = w.open_table(GC_QUEUE)?;
    let mut counts = w.open_table(REFCOUNTS)?;
    let mut records = w.open_table(RECORDS)?;
    while looked < batch {
        // A committer waits for the writer: finish this step now.
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
            return Ok((removed, bytes, true));
        }
        looked += candidates.len();
        let mut delta: HashMap<u64, i64> = HashMap::new();
        for oid in candidates {
            // Re-check inside the transaction: a commit may have
            // referenced it again since it was queued.
            if oid == Oid::ROOT.0 || counts.get(oid)?.is_some_and(|c| c.value() > 0) {
                continue;
            }
            let Some(old) = records.remove(oid)? else {
                continue;
            };
            bytes += old.value().len() as u64;
            for r in refs_of(old.value()).map_err(|e| corrupt(Oid(oid), e))? {
                *delta.entry(r.0).or_default() -= 1;
            }
            removed.push(Oid(oid));
        }
        apply_ref_deltas_in(&mut counts, &mut queue, delta)?;
    }
    Ok((removed, bytes, false))
}
