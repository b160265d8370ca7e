//! durus-redb: a transactional object-persistence storage engine with Durus's
//! semantics, on redb.
//!
//! - [`Storage`]: Durus's storage interface; [`MemoryStorage`] is its reference model.
//! - [`RedbStorage`]: the storage on a redb file, opened in-process with exclusive access.
//! - [`Server`]: Durus's storage server protocol on a store; [`ClientStorage`] speaks it too.
//! - [`Durability`]: when an acknowledged commit is safe (a commit log beside
//!   the store: [`Durability::Fsync`], [`Durability::Os`]; or none: [`Durability::Manual`]).
//! - [`CheckpointPolicy`]: when the store file is made durable and the log trimmed ([`Periodic`], [`Manual`]).
//! - [`GcPolicy`]: how the background garbage collector works ([`IncrementalGc`], [`IdleGc`], [`ManualGc`]).
//! - [`migrate`] and [`export`]: to and from Durus's own files.
//!
//! Cargo features: `cli` (the `durus-redb` command line) and `sqlite`
//! (migration from Durus's SqliteStorage) are on by default; the library
//! alone builds with `--no-default-features`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod checkpoint;
mod client;
mod engine;
mod error;
mod filestorage;
#[doc(hidden)]
pub mod fuzzing;
mod gc;
mod memory;
mod migrate;
mod protocol;
mod record;
mod server;
mod storage;
mod store;
mod transport;

pub use checkpoint::{
    CheckpointFacts, CheckpointPolicy, CompactionFacts, Durability, Manual, Periodic,
    default_compaction,
};
pub use client::{ClientStorage, SnapshotRecords};
pub use engine::{CheckReport, FullCheck, StoreStats, check_store, repair_store};
pub use error::{BackendError, Conflict, InvalidInput, Result, StorageError};
pub use filestorage::{
    FileError, FileFormat, ReadOptions, RecordSource, ShelfWriter, SourceEvent, SourceItem,
    detect_format, open_source,
};
pub use gc::{
    FullPhase, FullProgress, FullReport, FullTriggers, GcAction, GcFacts, GcPolicy, GcState,
    GcStats, IdleGc, IncrementalGc, ManualGc, Pace,
};
pub use memory::MemoryStorage;
pub use migrate::{
    BackupFormat, BackupReport, ExportReport, MigrateError, MigrateOptions, MigrateProgress,
    MigrateReport, backup, export, migrate, migrate_storage,
};
pub use record::{Oid, Record, RecordError};
pub use server::{DEFAULT_SNAPSHOT_IDLE, Server, ServerConfig, ShutdownHandle};
pub use storage::{PackReport, Storage, Traversal};
pub use store::{GcReport, Options, RedbStorage};
pub use transport::Address;
