//! How a store is opened.

use std::sync::Arc;

use crate::checkpoint::{CheckpointPolicy, EveryCommit};
use crate::gc::{GcPolicy, IncrementalGc};

/// Options for [`RedbStorage::open`](crate::RedbStorage::open).
#[derive(Debug, Clone)]
pub struct Options {
    /// Open read-only: loads work, every write fails with `ReadOnly`.
    /// Other read-only handles may share the file; a writer may not.
    pub read_only: bool,
    /// Create the store if the file does not exist (default true).
    pub create: bool,
    /// When commits become durable. Default: [`EveryCommit`].
    pub checkpoint: Arc<dyn CheckpointPolicy>,
    /// redb's page cache, in bytes (default 256 MiB).
    pub cache_bytes: usize,
    /// Save redb's allocator state with every durable commit, so that opening
    /// after a crash is near instant instead of a walk of the whole file
    /// (default true; costs a little on each durable commit).
    pub quick_repair: bool,
    /// How the background garbage collector works. Default: [`IncrementalGc`].
    pub gc: Arc<dyn GcPolicy>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            read_only: false,
            create: true,
            checkpoint: Arc::new(EveryCommit),
            cache_bytes: 256 << 20,
            quick_repair: true,
            gc: Arc::new(IncrementalGc::default()),
        }
    }
}

impl Options {
    /// Default options with a checkpoint policy.
    pub fn with_checkpoint(policy: impl CheckpointPolicy) -> Self {
        Options {
            checkpoint: Arc::new(policy),
            ..Options::default()
        }
    }

    /// These options with a garbage-collection policy.
    pub fn gc(self, policy: impl GcPolicy) -> Self {
        Options {
            gc: Arc::new(policy),
            ..self
        }
    }

    /// Default options for a read-only open.
    pub fn read_only() -> Self {
        Options {
            read_only: true,
            create: false,
            ..Options::default()
        }
    }
}
