//! Incremental collection: deletes queued oids whose reference count is still
//! zero, in small non-durable write transactions. Time is proportional to the
//! garbage, not to the store.

use super::state::meta_in;
use crate::engine::{Engine, delete_queued, queue_summary};
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
    /// Cut short and left to the next commit to carry.
    pub parked: bool,
}

/// Pops up to `batch` oids that dropped at or before `cutoff_ms` from the
/// queue and deletes those that are still garbage, all in one
/// `Durability::None` write transaction under the commit lock. Oids whose
/// count falls to zero are queued (transitive release).
///
/// A step cut short for a waiting committer leaves its transaction to that
/// committer if `hand_over` (the background thread's steps): the commit
/// then carries the deletion, and `removed` is what it will carry (undone
/// with it if the commit is refused). Otherwise the step commits.
pub(crate) fn step(engine: &Engine, batch: usize, cutoff_ms: u64, hand_over: bool) -> Result<Step> {
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
    let (deleted, parked) = engine.deletion_txn(
        |w| {
            let (_, migration) = meta_in(w)?;
            if migration {
                return Err(InvalidInput::ImportInProgress.into());
            }
            delete_queued(w, &engine.pins, batch, true, cutoff_ms, || {
                engine.committers_waiting()
            })
        },
        hand_over,
    )?;
    if !parked {
        // Told after the commit lock: a snapshot taken in between sees the
        // deletion before the session is told of it, harmless for garbage.
        // (A parked deletion is told of once the commit that takes it over
        // is committed.)
        engine.deletion_committed(&deleted);
    }
    Ok(Step {
        removed: deleted.oids,
        bytes: deleted.bytes,
        queue_left: deleted.queue_left.unwrap_or(0),
        looked: deleted.looked,
        parked,
    })
}
