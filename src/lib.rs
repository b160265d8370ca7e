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
//! # Quick start
//!
//! Open (or create) a store, allocate oids, commit records, read them back.
//! A record is Durus's: the oid, the object's data (for Python Durus, a
//! pickle) and the oids it references. Oid 0 is the root: the object every
//! live object is reachable from; the first `new_oid` of a store without a
//! root returns it, and the collector reclaims what the root no longer
//! reaches.
//!
//! ```
//! use durus_redb::{Oid, Options, Record, RedbStorage, Storage};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("app.redb");
//! let mut store = RedbStorage::open(&path, Options::default())?;
//! let root = store.new_oid()?; // the first oid of a new store is the root
//! assert_eq!(root, Oid::ROOT);
//! let child = store.new_oid()?;
//! store.begin();
//! store.store(child, Record::new(child, b"a child", &[]).into_bytes())?;
//! store.store(root, Record::new(root, b"the root", &[child]).into_bytes())?;
//! store.end()?; // atomic, and durable in the commit log when it returns
//! store.close()?;
//!
//! let mut store = RedbStorage::open(&path, Options::default())?;
//! let root = store.load(Oid::ROOT)?;
//! assert_eq!(root.data(), b"the root");
//! assert_eq!(root.refs().collect::<Vec<_>>(), [child]);
//! assert_eq!(store.load(child)?.data(), b"a child");
//! store.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! The same [`Storage`] calls work on a [`ClientStorage`] connected to
//! `durus-redb serve` (or to Durus's own server), and on [`MemoryStorage`].
//!
//! Cargo features: `cli` (the `durus-redb` command line) and `sqlite`
//! (migration from Durus's SqliteStorage) are on by default; the library
//! alone builds with `--no-default-features`.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

mod backend;
mod checkpoint;
mod client;
mod engine;
mod error;
mod filestorage;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
mod gc;
mod memory;
mod migrate;
pub mod object;
mod protocol;
mod ranked;
mod record;
mod server;
mod storage;
mod store;
#[cfg(feature = "tls")]
mod tls;
mod transport;

#[cfg(feature = "postgres")]
pub use backend::postgres::{
    import::migrate_to_database,
    redact_database_url,
    tools::{
        DatabaseCheck, DatabaseStats, check_database, database_stats, export_database, gc_database,
        gc_database_with,
    },
};
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
pub use server::{
    AdminFrom, DEFAULT_BACKUP_MAX_AGE, DEFAULT_SNAPSHOT_IDLE, DEFAULT_SNAPSHOT_MAX_AGE, DatabaseGc,
    Server, ServerConfig, ShutdownHandle,
};
pub use storage::{PackReport, Storage, Traversal};
pub use store::{GcReport, Options, RedbStorage};
#[cfg(feature = "tls")]
pub use tls::{TlsClient, TlsError, TlsServer};
pub use transport::Address;
