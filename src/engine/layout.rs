//! The on-disk layout of a durus-redb store, format version 4.
//!
//! A store is one redb file with these tables:
//!
//! | table              | key             | value           | meaning |
//! |--------------------|-----------------|-----------------|---------|
//! | `durus_meta`       | `&str`          | `&[u8]` rmp-serde | metadata, keys below |
//! | `durus_records`    | `u64` oid       | `&[u8]`         | the Durus record exactly as committed: `oid(8) \| u32 len \| data \| refs` |
//! | `durus_refcounts`  | `u64` oid       | `u64`           | how many refs stored records hold to the oid (each occurrence counts); absent means zero |
//! | `durus_gc_due`     | `(u64, u64)` (drop time ms, oid) | `()` | oids whose count fell to zero, in the order they did: candidates for the incremental collector once their grace window has passed, re-checked before deletion (format 3) |
//! | `durus_gc_dropped` | `u64` oid       | `u64`           | the latest time (ms since the Unix epoch) the oid's count fell to zero; a `durus_gc_due` entry with an older time is stale (format 3) |
//! | `durus_log`        | `&str`          | `u64`           | `applied`: the sequence number of the last logged commit the file holds (format 2); `open`: 1 while a writer with a commit log has the store open, 0 after a clean close (format 4) |
//!
//! Beside the file, a commit log directory `<file>-log/` (format 2; see
//! `engine/log/`) holds the commits since the last checkpoint while the
//! store is open or after a crash; a clean close removes it. Format 1 had no
//! log: a format 1 store is upgraded when first opened for writing (the
//! version is rewritten; nothing else changes).
//!
//! Format 4 records whether the log must exist (`durus_log`/`open`): a
//! store not closed cleanly whose log directory is missing is refused
//! instead of opened without the commits its log held. Its log segments
//! are version 2 (each names its number and first commit; see
//! `engine/log/mod.rs`). A format 3 store is upgraded by rewriting the version;
//! the marker is written at its next writable open.
//!
//! Format 2 kept the collector's queue as `durus_gc_queue` (`u64` oid ->
//! `()`), in oid order and without times; the upgrade to format 3 moves its
//! entries into `durus_gc_due` with the upgrade's time as their drop time
//! (they wait out one grace window) and removes it.
//!
//! Metadata keys (values are rmp-serde encoded with named fields, so that a
//! field added later is read as absent by older code, never misread):
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

use redb::{ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use crate::error::{Result, StorageError};
use crate::record::Oid;

/// The format version this build writes.
pub(crate) const FORMAT_VERSION: u32 = 4;
/// The oldest format version this build opens.
pub(crate) const OLDEST_FORMAT_VERSION: u32 = 1;

/// Metadata: `&str` keys, rmp-serde values.
pub(crate) const META: TableDefinition<&str, &[u8]> = TableDefinition::new("durus_meta");
/// Records by oid.
pub(crate) const RECORDS: TableDefinition<u64, &[u8]> = TableDefinition::new("durus_records");
/// Reference counts by oid.
pub(crate) const REFCOUNTS: TableDefinition<u64, u64> = TableDefinition::new("durus_refcounts");
/// Formats 1 and 2: oids whose reference count fell to zero (read only by
/// the upgrade to format 3).
pub(crate) const GC_QUEUE_V2: TableDefinition<u64, ()> = TableDefinition::new("durus_gc_queue");
/// Oids whose reference count fell to zero, by (drop time ms, oid).
pub(crate) const GC_DUE: TableDefinition<(u64, u64), ()> = TableDefinition::new("durus_gc_due");
/// The latest drop time (ms since the Unix epoch) of each queued oid.
pub(crate) const GC_DROPPED: TableDefinition<u64, u64> = TableDefinition::new("durus_gc_dropped");

/// Milliseconds since the Unix epoch, the clock of drop times.
pub(crate) fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
/// The commit log's state in the file (format 2).
pub(crate) const LOG_STATE: TableDefinition<&str, u64> = TableDefinition::new("durus_log");
/// [`LOG_STATE`] key: the last logged commit the file holds.
pub(crate) const KEY_APPLIED: &str = "applied";
/// [`LOG_STATE`] key: 1 while a writer with a commit log has the store
/// open, 0 (or absent, before format 4) after a clean close.
pub(crate) const KEY_LOG_OPEN: &str = "open";

/// Metadata key of [`FormatInfo`].
pub(crate) const KEY_FORMAT: &str = "format";
/// Metadata key of [`OidMeta`].
pub(crate) const KEY_OIDS: &str = "oids";
/// Metadata key of the migration state.
pub(crate) const KEY_MIGRATION: &str = "migration";
/// Metadata key of the summary of a finished import.
pub(crate) const KEY_IMPORTED: &str = "imported";
/// Metadata key of the collector state.
pub(crate) const KEY_GC: &str = "gc";

/// The format of the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct FormatInfo {
    /// On-disk format version.
    pub(crate) version: u32,
    /// The program and version that created the store.
    pub(crate) created_by: String,
}

/// Oid allocation state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct OidMeta {
    /// Every oid below this may have been handed out; allocation goes on from here.
    pub(crate) reserved: u64,
}

/// How many oids are reserved at least, at a time, ahead of use.
pub(crate) const OID_BLOCK: u64 = 4096;

/// The most oids reserved at a time ahead of use (what a crash may skip).
pub(crate) const OID_BLOCK_MAX: u64 = 1 << 24;

/// Encodes a metadata value (rmp-serde, named fields).
pub(crate) fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    rmp_serde::to_vec_named(value).expect("metadata encodes")
}

/// Decodes a metadata value written by [`encode`] (or by format 1's
/// positional encoding: rmp-serde reads a struct from either).
pub(crate) fn decode<T: serde::de::DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T> {
    rmp_serde::from_slice(bytes)
        .map_err(|e| StorageError::damaged(format!("metadata entry {key:?} is unreadable: {e}")))
}

/// The metadata value under `key`, decoded.
pub(crate) fn read_meta<T: serde::de::DeserializeOwned>(
    table: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<T>> {
    match table.get(key)? {
        Some(v) => Ok(Some(decode(key, v.value())?)),
        None => Ok(None),
    }
}

/// The import state stored under the `migration` metadata key while a
/// migration runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct ImportState {
    /// Version of this structure.
    pub(crate) version: u32,
    /// What is being imported.
    pub(crate) source: SourceIdentity,
    /// The source offset to resume from (a boundary; 0: the beginning).
    pub(crate) resume_offset: u64,
    /// Records the store holds.
    pub(crate) objects: u64,
    /// Wrapping sum of the hashes of the records the store holds.
    pub(crate) checksum: u64,
    /// Batches written.
    pub(crate) batches: u64,
    /// The whole source has been imported; verification remains.
    pub(crate) complete: bool,
    /// Where an ignored torn tail began.
    pub(crate) torn_tail: Option<u64>,
    /// The record hash the checksums use; absent in states written before
    /// xxh3 (they use FNV-1a).
    #[serde(default)]
    pub(crate) hash: RecordHash,
    /// The tables were rewritten in oid order after the import; absent in
    /// states written before 0.6 (false).
    #[serde(default)]
    pub(crate) repacked: bool,
}

/// Identifies a source, so that a rerun resumes only from the same one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct SourceIdentity {
    /// What it is: the file's path, or a description of a storage.
    pub(crate) name: String,
    /// Its format.
    pub(crate) format: String,
    /// Its size when the import began (file bytes, or row ids for SQLite).
    pub(crate) total: u64,
    /// A hash of its first 64 KiB (files).
    pub(crate) head_hash: u64,
}

/// The version of [`ImportState`] this build writes.
pub(crate) const IMPORT_STATE_VERSION: u32 = 1;

/// A one-line description of an import state, for messages.
pub(crate) fn describe_import_state(bytes: &[u8]) -> String {
    match decode::<ImportState>(KEY_MIGRATION, bytes) {
        Ok(s) => format!("{} ({})", s.source.name, s.source.format),
        Err(_) => "an unknown source".into(),
    }
}

/// The 64-bit hash of a record under its oid that import checksums add up,
/// stable across builds and platforms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum RecordHash {
    /// FNV-1a with a 64-bit mix (import states written before xxh3).
    #[default]
    Fnv1a,
    /// XXH3-64 of the oid's 8 bytes followed by the record.
    Xxh3,
}

impl RecordHash {
    /// The hash of `bytes` stored under `oid`.
    pub(crate) fn of(self, oid: Oid, bytes: &[u8]) -> u64 {
        match self {
            RecordHash::Xxh3 => {
                let mut h = xxhash_rust::xxh3::Xxh3Default::new();
                h.update(&oid.0.to_be_bytes());
                h.update(bytes);
                h.digest()
            }
            RecordHash::Fnv1a => {
                let mut h: u64 = 0xcbf2_9ce4_8422_2325;
                for b in oid.0.to_be_bytes().iter().chain(bytes) {
                    h ^= *b as u64;
                    h = h.wrapping_mul(0x0000_0100_0000_01b3);
                }
                // splitmix64's finalizer spreads FNV's weak high bits.
                h ^= h >> 30;
                h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
                h ^= h >> 27;
                h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
                h ^ (h >> 31)
            }
        }
    }
}
