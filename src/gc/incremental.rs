//! Incremental collection: deletes queued oids whose reference count is still
//! zero, in small non-durable write transactions. Time is proportional to the
//! garbage, not to the store.

use redb::{Durability, ReadableTableMetadata};

use super::collector::GcShared;
use super::state::meta_in;
use crate::engine::layout::GC_QUEUE;
use crate::engine::{Engine, delete_queued};
use crate::error::{InvalidInput, Result};
use crate::record::Oid;

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
pub(crate) fn step(engine: &Engine, gc: &GcShared, batch: usize) -> Result<Step> {
    {
        let db = engine.db()?;
        let txn = db.begin_read()?;
        if txn.open_table(GC_QUEUE)?.is_empty()? {
            return Ok(Step::default());
        }
    }
    engine.yield_to_committers();
    let deleted = engine.write_txn(Durability::None, |w, _| {
        let (_, migration) = meta_in(w)?;
        if migration {
            return Err(InvalidInput::ImportInProgress.into());
        }
        delete_queued(w, batch, true, || engine.committers_waiting())
    })?;
    if deleted.queue_empty {
        gc.queue_found_empty();
    } else {
        gc.queue_grew();
    }
    engine.invalidate_others(None, &deleted.oids);
    gc.note_deleted(deleted.oids.len() as u64, deleted.bytes, false);
    Ok(Step {
        removed: deleted.oids,
        bytes: deleted.bytes,
        queue_left: deleted.queue_left.unwrap_or(0),
    })
}
