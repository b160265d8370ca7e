//! The on-disk layout of a durus-redb store, format version 1.
//!
//! A store is one redb file with these tables:
//!
//! | table              | key             | value           | meaning |
//! |--------------------|-----------------|-----------------|---------|
//! | `durus_meta`       | `&str`          | `&[u8]` rmp-serde | metadata, keys below |
//! | `durus_records`    | `u64` oid       | `&[u8]`         | the Durus record exactly as committed: `oid(8) \| u32 len \| data \| refs` |
//! | `durus_refcounts`  | `u64` oid       | `u64`           | how many refs stored records hold to the oid (each occurrence counts); absent means zero |
//! | `durus_gc_queue`   | `u64` oid       | `()`            | oids whose count fell to zero: candidates for the incremental collector, re-checked before deletion |
//!
//! Metadata keys (values are rmp-serde encoded):
//! - `format`: [`FormatInfo`]: the format version; a store of a newer version is refused.
//! - `oids`: [`OidMeta`]: every oid below `reserved` may have been handed out.
//!   Allocation persists `reserved` ahead of use, in blocks, so a restart
//!   (clean or not) never hands out an oid twice.
//! - `migration`: state of an import in progress (written by `migrate`); while
//!   present the collector leaves the store alone.
//! - `imported`: the summary of a finished import (source, record count,
//!   checksum), so that rerunning a finished migration is recognised.
//! - `gc`: the collector's persisted state (`GcMeta` in `src/gc/state.rs`):
//!   whether a full collection is running (an interrupted one restarts after
//!   open), when the last one finished, how many finished.
//!
//! A reference count counts references from stored records, so an object that
//! was committed but never referenced has no count and no queue entry: only a
//! full collection removes it. An object whose count falls to zero is queued.

use redb::TableDefinition;
use serde::{Deserialize, Serialize};

/// The format version this build writes.
pub const FORMAT_VERSION: u32 = 1;

/// Metadata: `&str` keys, rmp-serde values.
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("durus_meta");
/// Records by oid.
pub const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("durus_records");
/// Reference counts by oid.
pub const REFCOUNTS: TableDefinition<u64, u64> = TableDefinition::new("durus_refcounts");
/// Oids whose reference count fell to zero.
pub const GC_QUEUE: TableDefinition<u64, ()> = TableDefinition::new("durus_gc_queue");

/// Metadata key of [`FormatInfo`].
pub const KEY_FORMAT: &str = "format";
/// Metadata key of [`OidMeta`].
pub const KEY_OIDS: &str = "oids";
/// Metadata key of the migration state.
pub const KEY_MIGRATION: &str = "migration";
/// Metadata key of the summary of a finished import.
pub const KEY_IMPORTED: &str = "imported";
/// Metadata key of the collector state.
pub const KEY_GC: &str = "gc";

/// The format of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FormatInfo {
    /// On-disk format version.
    pub version: u32,
    /// The program and version that created the store.
    pub created_by: String,
}

/// Oid allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct OidMeta {
    /// Every oid below this may have been handed out; allocation goes on from here.
    pub reserved: u64,
}

/// How many oids are reserved at a time ahead of use.
pub const OID_BLOCK: u64 = 4096;
