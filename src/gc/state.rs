//! The collector's persisted state (metadata key `gc`) and the facts it gathers.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{ReadableTable, WriteTransaction};
use serde::{Deserialize, Serialize};

use crate::engine::Engine;
use crate::engine::layout::{KEY_GC, KEY_MIGRATION, META, encode, read_meta};
use crate::engine::queue_summary;
use crate::error::Result;

/// What the collector keeps in the store between opens (rmp-serde under the
/// metadata key `gc`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct GcMeta {
    /// A full collection started and has not finished: it restarts after open.
    pub full_running: bool,
    /// When the last full collection finished (ms since the Unix epoch).
    pub last_full_unix_ms: Option<u64>,
    /// Full collections finished in the life of the store.
    pub full_collections: u64,
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The collector's state as seen from outside.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcState {
    /// Oids waiting in the incremental collector's queue.
    pub queue_len: u64,
    /// How long ago the oldest of them became unreachable.
    pub oldest_queued: Option<Duration>,
    /// How many of them are still waiting out the policy's grace window
    /// (filled by `RedbStorage::gc_state`).
    pub waiting: u64,
    /// A full collection was started and has not finished (it may be running
    /// now, or it was interrupted and will restart).
    pub full_pending: bool,
    /// Full collections finished in the life of the store.
    pub full_collections: u64,
    /// Time since the last full collection finished, if any did.
    pub since_full: Option<Duration>,
    /// An import is in progress (metadata key `migration`): nothing is collected.
    pub migration_in_progress: bool,
}

/// Reads the collector's state from one short read transaction.
pub(crate) fn read_state(engine: &Engine) -> Result<GcState> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let meta = txn.open_table(META)?;
    let gc: GcMeta = read_meta(&meta, KEY_GC)?.unwrap_or_default();
    let migration = meta.get(KEY_MIGRATION)?.is_some();
    let (queue_len, first_drop) = queue_summary(&txn)?;
    Ok(GcState {
        queue_len,
        oldest_queued: first_drop.map(|ms| Duration::from_millis(now_unix_ms().saturating_sub(ms))),
        full_pending: gc.full_running,
        full_collections: gc.full_collections,
        since_full: gc
            .last_full_unix_ms
            .map(|t| Duration::from_millis(now_unix_ms().saturating_sub(t))),
        migration_in_progress: migration,
        waiting: 0,
    })
}

/// Reads the persisted state inside a write transaction.
pub(crate) fn meta_in(w: &WriteTransaction) -> Result<(GcMeta, bool)> {
    let meta = w.open_table(META)?;
    let gc: GcMeta = read_meta(&meta, KEY_GC)?.unwrap_or_default();
    let migration = meta.get(KEY_MIGRATION)?.is_some();
    Ok((gc, migration))
}

/// Writes the persisted state inside a write transaction.
pub(crate) fn write_meta(w: &WriteTransaction, gc: &GcMeta) -> Result<()> {
    let mut meta = w.open_table(META)?;
    meta.insert(KEY_GC, encode(gc).as_slice())?;
    Ok(())
}
