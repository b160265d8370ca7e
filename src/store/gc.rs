//! What an explicit collection reports (the collector's methods are on
//! [`RedbStorage`](super::RedbStorage) in `store/mod.rs`).

use std::time::Duration;

/// What an explicit incremental collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// Records deleted.
    pub removed_objects: u64,
    /// Bytes of the deleted records.
    pub removed_bytes: u64,
    /// Write transactions used.
    pub steps: u64,
    /// Oids left in the queue afterwards.
    pub queue_left: u64,
    /// Wall time.
    pub elapsed: Duration,
}
