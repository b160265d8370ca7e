//! Incremental collection: deletes queued oids whose reference count is still
//! zero, in small non-durable write transactions. Time is proportional to the
//! garbage, not to the store.

use redb::Durability;

use super::collector::GcShared;
use super::state::meta_in;
use crate::engine::{Engine, Undoom, delete_queued, queue_summary};
use crate::error::{InvalidInput, Result};
use crate::record::Oid;

/// What one incremental step did.
#[derive(Debug, Default)]
pub(crate) struct Step {
    /// Oids deleted (already published to every session).
    pub removed: Vec<Oid>,
    /// Bytes of the deleted records.
    pub bytes: u64,
    /// Queue entries left after the step.
    pub queue_left: u64,
    /// Queue entries looked at.
    pub looked: usize,
}

/// Pops up to `batch` oids that dropped at or before `cutoff_ms` from the
/// queue and deletes those that are still garbage, all in one
/// `Durability::None` write transaction under the commit lock. Oids whose
/// count falls to zero are queued (transitive release).
pub(crate) fn step(engine: &Engine, gc: &GcShared, batch: usize, cutoff_ms: u64) -> Result<Step> {
    {
        let db = engine.db()?;
        let txn = db.begin_read()?;
        let (len, first) = queue_summary(&txn)?;
        if len == 0 || first.is_some_and(|ms| ms > cutoff_ms) {
            return Ok(Step {
                queue_left: len,
                ..Step::default()
            });
        }
    }
    engine.yield_to_committers();
    // Once the transaction is over, committed or not, what it deleted no
    // longer holds up a commit.
    let mut doomed = Undoom(&engine.pins, Vec::new());
    let deleted = engine.write_txn(Durability::None, |w, _| {
        let (_, migration) = meta_in(w)?;
        if migration {
            return Err(InvalidInput::ImportInProgress.into());
        }
        let d = delete_queued(w, &engine.pins, batch, true, cutoff_ms, || {
            engine.committers_waiting()
        })?;
        doomed.1.extend(d.oids.iter().map(|o| o.0));
        Ok(d)
    });
    drop(doomed);
    let deleted = deleted?;
    // Outside the commit lock: a commit may have queued meanwhile, so an
    // empty queue is only noted as "unknown".
    gc.queue_seen_unlocked(&deleted);
    // Published after the commit lock: a snapshot taken in between sees
    // the deletion before the session is told of it, harmless for garbage.
    engine.publish_changes(None, &deleted.oids);
    gc.note_deleted(deleted.oids.len() as u64, deleted.bytes, false);
    Ok(Step {
        removed: deleted.oids,
        bytes: deleted.bytes,
        queue_left: deleted.queue_left.unwrap_or(0),
        looked: deleted.looked,
    })
}
