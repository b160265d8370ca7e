//! The error every storage operation returns.
//!
//! Conflicts (another writer got there first, a reference to something that is
//! gone) are kept apart from invalid input (the caller sent something that can
//! never be committed) and from failures of the store itself.

use std::path::PathBuf;

use crate::record::{Oid, RecordError};

/// Why a commit was refused although its input was well formed: the state of
/// the store does not allow it. Retrying after `sync()` may succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Conflict {
    /// Records in the commit reference oids that neither exist nor are stored
    /// in the same commit.
    #[error("commit references oids that do not exist: {}", fmt_oids(.oids))]
    DanglingRefs {
        /// The missing oids, sorted.
        oids: Vec<Oid>,
    },
    /// The commit stores an oid that is neither the root, nor present, nor
    /// handed out by `new_oid` (for example an object the collector removed).
    #[error(
        "commit stores oid {oid}, which is neither present, nor the root, nor allocated by new_oid"
    )]
    UnknownOid {
        /// The oid.
        oid: Oid,
    },
    /// The server refused the commit (a remote storage's `I` answer).
    #[error("the server refused the commit as a write conflict")]
    Refused,
    /// The commit order moved on between the commit's invalidations and
    /// its write, unseen by the front end that served it (a database
    /// front end that held the database alone lost its hold, or the
    /// database lost commits): its client was not told of what came
    /// between.
    #[error(
        "the database's commit order moved while this front end held it alone (another front \
         end committed, or the database lost commits): nothing was written"
    )]
    OrderMoved,
    /// Oids this session read were changed by another session.
    #[error("oids changed by another session: {}", fmt_oids(.oids))]
    Invalidated {
        /// The changed oids.
        oids: Vec<Oid>,
    },
}

/// Input that can never be committed or loaded, whatever the store holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum InvalidInput {
    /// A record that is not a well-formed Durus record for its oid.
    #[error("invalid record for oid {oid}: {source}")]
    Record {
        /// The oid it was to be stored under.
        oid: Oid,
        /// What is wrong with it.
        source: RecordError,
    },
    /// The commit stores an oid that another session holds as allocated but unused.
    #[error("oid {oid} was allocated to another session")]
    OidOfAnotherSession {
        /// The oid.
        oid: Oid,
    },
    /// A collection was asked of a store that has records but no root
    /// object (oid 0): everything would be garbage, so nothing is collected.
    #[error("the store has records but no root object (oid 0): refusing to collect")]
    NoRoot,
    /// An import (`migrate`) is in progress: garbage collection waits for it.
    #[error(
        "an import is in progress (metadata key `migration`): garbage collection is skipped until it finishes"
    )]
    ImportInProgress,
    /// A full collection was asked while one is already running.
    #[error("a full collection is already running")]
    CollectionRunning,
    /// A session asked for more new oids than it may hold unused.
    #[error(
        "{asked} new oids asked while {held} handed out are not yet stored: at most {cap} may be held"
    )]
    TooManyOidsHeld {
        /// Oids handed out to the session and not yet stored.
        held: u64,
        /// Oids asked for.
        asked: u64,
        /// The most it may hold.
        cap: u64,
    },
    /// No more oids can be handed out: the store reached the top of the oid range.
    #[error("no oid is left to hand out: the store has reached oid {highest}")]
    OidsExhausted {
        /// The highest oid handed out or stored.
        highest: Oid,
    },
}

/// The error of every [`Storage`](crate::Storage) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// No record is stored for this oid.
    #[error("no record for oid {0}")]
    NotFound(Oid),
    /// The oid was invalidated for this session (Durus's ReadConflictError).
    #[error("read conflict on oid {0}: it changed since this session last synced")]
    ReadConflict(Oid),
    /// The commit conflicts with the state of the store; nothing was written.
    #[error("conflict: {0}")]
    Conflict(#[from] Conflict),
    /// The input can never be accepted; nothing was written.
    #[error("invalid input: {0}")]
    Invalid(#[from] InvalidInput),
    /// The file is not a durus-redb store (another kind of file, or a redb
    /// database of another program).
    #[error("{} is not a durus-redb store: {reason}", path.display())]
    NotAStore {
        /// The file.
        path: PathBuf,
        /// What was found instead.
        reason: String,
    },
    /// The store has an on-disk format version this build does not read.
    #[error("{}", unsupported_format(path, *found, *oldest, *newest))]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// The version in the file.
        found: u32,
        /// The oldest version this build reads.
        oldest: u32,
        /// The version this build writes.
        newest: u32,
    },
    /// The store was not closed cleanly and needs a repair, which a read-only
    /// open cannot do.
    #[error(
        "{} was not closed cleanly and needs a repair, which a read-only open cannot do; \
         open it read-write once (`durus-redb check --repair` or `durus-redb serve` does)",
        path.display()
    )]
    NeedsRepair {
        /// The file.
        path: PathBuf,
    },
    /// A read-only open of a store whose commit log holds commits the store
    /// file does not have yet (the last writer did not close cleanly).
    #[error(
        "{} has {commits} commits in its commit log that are not yet in the file: open it for writing once (`durus-redb check --repair` or `durus-redb serve` does) to apply them",
        path.display()
    )]
    UnappliedLog {
        /// The file.
        path: PathBuf,
        /// How many logged commits wait.
        commits: u64,
    },
    /// The commit log is damaged before its end (zeros or a bad entry
    /// followed by entries, a segment missing, swapped or duplicated):
    /// commits that were acknowledged may be lost. Nothing was changed
    /// beyond applying the commits before the damage.
    #[error(
        "the commit log of {} is damaged: {detail}. Acknowledged commits may be lost, so the store \
         was not opened. Keep a copy of the log directory, then run `durus-redb check --repair {}` \
         to give up the commits after the damage (it names them and keeps the log aside)",
        path.display(), path.display()
    )]
    DamagedLog {
        /// The store file.
        path: PathBuf,
        /// Where and what the damage is, and what follows it.
        detail: String,
    },
    /// The store was not closed cleanly and its commit log directory is
    /// missing: the commits acknowledged since its last checkpoint are not
    /// in the file.
    #[error(
        "{} was not closed cleanly and its commit log {} is missing: the commits acknowledged \
         since its last checkpoint are in no file. Restore the directory if you can; \
         `durus-redb check --repair {}` opens the store without them",
        path.display(), log.display(), path.display()
    )]
    MissingLog {
        /// The store file.
        path: PathBuf,
        /// The log directory expected beside it.
        log: PathBuf,
    },
    /// A writable open of a store whose import (`migrate`) is unfinished.
    #[error(
        "{} holds an unfinished import from {from}: run `durus-redb migrate` again with the same source to finish it",
        path.display()
    )]
    UnfinishedImport {
        /// The file.
        path: PathBuf,
        /// What was being imported.
        from: String,
    },
    /// Data in the store is damaged (a record or a metadata entry that does
    /// not decode, a reference count that would fall below zero).
    #[error("the store is damaged: {what}")]
    Damaged {
        /// What is damaged.
        what: String,
    },
    /// Another process (or handle) has the store open.
    #[error("store {path} is already open by another process or handle")]
    AlreadyOpen {
        /// The path asked for.
        path: String,
    },
    /// A write on a store opened read-only.
    #[error("the store is open read-only")]
    ReadOnly,
    /// An earlier failure left the store unusable until it is reopened.
    #[error("the store is poisoned by an earlier failure and must be reopened: {reason}")]
    Poisoned {
        /// The failure that poisoned it.
        reason: String,
    },
    /// The store was closed.
    #[error("the store is closed")]
    Closed,
    /// The underlying database (redb) failed.
    #[error("storage failure: {0}")]
    Backend(#[from] BackendError),
    /// The PostgreSQL database behind `serve --database` failed, refused a
    /// statement, or holds something this build cannot serve.
    #[error("database: {detail}")]
    Database {
        /// What failed, with the database's own message.
        detail: String,
    },
    /// An I/O error outside the database (a socket, a file).
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// A remote peer broke the protocol.
    #[error("protocol error: {detail}")]
    Protocol {
        /// What it sent.
        detail: String,
    },
}

/// A failure of the underlying database, redb. Opaque, so that this crate's
/// interface does not change with redb's; its `source()` is redb's error.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct BackendError(redb::Error);

impl StorageError {
    pub(crate) fn protocol(detail: impl Into<String>) -> StorageError {
        StorageError::Protocol {
            detail: detail.into(),
        }
    }

    pub(crate) fn damaged(what: impl Into<String>) -> StorageError {
        StorageError::Damaged { what: what.into() }
    }

    /// True if the store's data is damaged (a record that does not decode,
    /// a page redb finds corrupted): a repair cannot bring back what was
    /// lost, a backup can.
    pub fn is_damage(&self) -> bool {
        match self {
            StorageError::Damaged { .. } => true,
            StorageError::Backend(BackendError(e)) => matches!(e, redb::Error::Corrupted(_)),
            _ => false,
        }
    }

    /// True for a conflict of any kind (including a read conflict): the caller
    /// may sync and retry.
    pub fn is_conflict(&self) -> bool {
        matches!(
            self,
            StorageError::Conflict(_) | StorageError::ReadConflict(_)
        )
    }
}

macro_rules! from_redb {
    ($($t:ty),*) => {$(
        impl From<$t> for StorageError {
            fn from(e: $t) -> Self {
                StorageError::Backend(BackendError(e.into()))
            }
        }
    )*};
}
from_redb!(
    redb::Error,
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::CompactionError,
    redb::SetDurabilityError
);

fn unsupported_format(path: &std::path::Path, found: u32, oldest: u32, newest: u32) -> String {
    let reads = if oldest == newest {
        format!("version {newest}")
    } else {
        format!("versions {oldest} to {newest}")
    };
    format!(
        "{} has on-disk format version {found}; this durus-redb {} reads {reads}{}",
        path.display(),
        env!("CARGO_PKG_VERSION"),
        if found > newest {
            ": use a newer durus-redb"
        } else {
            ""
        }
    )
}

fn fmt_oids(oids: &[Oid]) -> String {
    const SHOWN: usize = 20;
    let mut s: Vec<String> = oids.iter().take(SHOWN).map(|o| o.to_string()).collect();
    if oids.len() > SHOWN {
        s.push(format!("... ({} in all)", oids.len()));
    }
    s.join(", ")
}

/// Shorthand for results of storage operations.
pub type Result<T, E = StorageError> = std::result::Result<T, E>;
