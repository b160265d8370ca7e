//! durus-redb: a transactional object-persistence storage engine with Durus's
//! semantics, on redb.
//!
//! - [`Storage`]: Durus's storage interface; [`MemoryStorage`] is its reference model.
//! - [`RedbStorage`]: the storage on a redb file, opened in-process with exclusive access.
//! - [`server`]: Durus's storage server protocol on a store; [`ClientStorage`] speaks it too.
//! - [`CheckpointPolicy`]: when commits become durable ([`EveryCommit`], [`Periodic`], [`Manual`]).
//! - [`GcPolicy`]: how the background garbage collector works ([`IncrementalGc`], [`IdleGc`], [`ManualGc`]).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod checkpoint;
mod client;
mod error;
mod filestorage;
mod gc;
mod memory;
mod migrate;
mod protocol;
mod record;
mod redb_store;
pub mod server;
mod storage;

pub use checkpoint::{
    CheckpointFacts, CheckpointPolicy, CommitDurability, CompactionFacts, EveryCommit, Manual,
    Periodic, default_compaction,
};
pub use client::ClientStorage;
pub use error::{Conflict, InvalidInput, Result, StorageError};
pub use filestorage::{
    FileError, FileFormat, ReadOptions, RecordSource, ShelfWriter, SourceEvent, SourceItem,
    detect_format, open_source,
};
pub use gc::{
    FullPhase, FullProgress, FullReport, FullTriggers, GcAction, GcFacts, GcPolicy, GcReport,
    GcState, GcStats, IdleGc, IncrementalGc, ManualGc, Pace,
};
pub use memory::MemoryStorage;
pub use migrate::{
    ExportReport, MigrateError, MigrateOptions, MigrateProgress, MigrateReport, export, migrate,
    migrate_storage,
};
pub use record::{Oid, Record, RecordError};
pub use redb_store::{
    CheckReport, CommitGuard, CommitTicket, Engine, FullCheck, InvalidSet, Options, RedbStorage,
    SessionId, StoreStats, check_store,
};
pub use storage::{PackReport, Storage, Traversal};
