//! durus-redb: a transactional object-persistence storage engine with Durus's
//! semantics, on redb.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

mod error;
mod filestorage;
mod record;
mod storage;

pub use error::{Conflict, InvalidInput, Result, StorageError};
pub use filestorage::{
    FileError, FileFormat, ReadOptions, RecordSource, ShelfWriter, SourceEvent, SourceItem,
    detect_format, open_source,
};
pub use record::{Oid, Record, RecordError};
pub use storage::{PackReport, Storage, Traversal};
