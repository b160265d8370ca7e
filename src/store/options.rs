//! How a store is opened.

use std::sync::Arc;

use crate::checkpoint::{CheckpointPolicy, Durability, Periodic};
use crate::engine::EngineConfig;
use crate::gc::{GcPolicy, IncrementalGc};

/// Options for a writable [`RedbStorage::open`](crate::RedbStorage::open),
/// built from the defaults with one method per setting:
///
/// ```
/// # use durus_redb::{Options, Periodic, IdleGc};
/// let options = Options::new()
///     .durability(durus_redb::Durability::os())
///     .checkpoint(Periodic::default())
///     .gc(IdleGc::default());
/// ```
///
/// A read-only open takes no options: see
/// [`RedbStorage::open_read_only`](crate::RedbStorage::open_read_only).
#[derive(Debug, Clone)]
pub struct Options {
    create: bool,
    durability: Durability,
    checkpoint: Arc<dyn CheckpointPolicy>,
    cache_bytes: usize,
    quick_repair: bool,
    gc: Arc<dyn GcPolicy>,
    snapshot_reads: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            create: true,
            durability: Durability::Fsync,
            checkpoint: Arc::new(Periodic::default()),
            cache_bytes: 256 << 20,
            quick_repair: true,
            gc: Arc::new(IncrementalGc::default()),
            snapshot_reads: false,
        }
    }
}

impl Options {
    /// The defaults: create if absent, [`Durability::Fsync`], [`Periodic`]
    /// checkpoints, [`IncrementalGc`], a 256 MiB page cache, quick repair on.
    pub fn new() -> Self {
        Options::default()
    }

    /// Whether to create the store if the file does not exist (default true).
    pub fn create(mut self, create: bool) -> Self {
        self.create = create;
        self
    }

    /// When an acknowledged commit is safe. Default: [`Durability::Fsync`].
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// When the store file is made durable and the commit log trimmed.
    /// Default: [`Periodic`].
    pub fn checkpoint(self, policy: impl CheckpointPolicy) -> Self {
        self.checkpoint_shared(Arc::new(policy))
    }

    /// [`checkpoint`](Self::checkpoint) with a policy chosen at run time.
    pub fn checkpoint_shared(mut self, policy: Arc<dyn CheckpointPolicy>) -> Self {
        self.checkpoint = policy;
        self
    }

    /// How the background garbage collector works. Default: [`IncrementalGc`].
    pub fn gc(self, policy: impl GcPolicy) -> Self {
        self.gc_shared(Arc::new(policy))
    }

    /// [`gc`](Self::gc) with a policy chosen at run time.
    pub fn gc_shared(mut self, policy: Arc<dyn GcPolicy>) -> Self {
        self.gc = policy;
        self
    }

    /// redb's page cache, in bytes (default 256 MiB).
    pub fn cache_bytes(mut self, bytes: usize) -> Self {
        self.cache_bytes = bytes;
        self
    }

    /// Save redb's allocator state with every durable commit, so that opening
    /// after a crash is near instant instead of a walk of the whole file
    /// (default true; costs a little on each durable commit).
    pub fn quick_repair(mut self, on: bool) -> Self {
        self.quick_repair = on;
        self
    }

    /// Snapshot reads for the sessions of this open (default false): a
    /// session loads from the state of its last [`sync`](crate::Storage::sync)
    /// or commit, so an oid another session changed since still loads as
    /// it was then; [`sync`](crate::Storage::sync) moves the session to the
    /// latest state and returns what changed, as without snapshots. A
    /// session's snapshot keeps the pages it reads from being reused until
    /// it syncs, commits, calls
    /// [`release_snapshot`](crate::RedbStorage::release_snapshot) or is
    /// dropped; see also [`RedbStorage::set_snapshot_reads`](crate::RedbStorage::set_snapshot_reads).
    pub fn snapshot_reads(mut self, on: bool) -> Self {
        self.snapshot_reads = on;
        self
    }

    pub(crate) fn snapshots(&self) -> bool {
        self.snapshot_reads
    }

    pub(crate) fn gc_policy(&self) -> &Arc<dyn GcPolicy> {
        &self.gc
    }

    pub(crate) fn engine_config(&self, importing: bool) -> EngineConfig {
        EngineConfig {
            read_only: false,
            create: self.create,
            durability: self.durability,
            checkpoint: self.checkpoint.clone(),
            cache_bytes: self.cache_bytes,
            quick_repair: self.quick_repair,
            importing,
            checking: false,
            accept_log_damage: false,
            #[cfg(test)]
            disk: None,
        }
    }
}
