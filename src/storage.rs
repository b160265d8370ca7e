//! The `Storage` trait: Durus's storage interface in Rust types.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};

use crate::error::Result;
use crate::record::{Oid, Record};

/// What a full collection (pack) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PackReport {
    /// Records removed.
    pub removed_objects: u64,
    /// Bytes of record data removed.
    pub removed_bytes: u64,
    /// Records that were live and kept.
    pub live_objects: u64,
}

/// A Durus-style storage: `oid -> record` with atomic commits.
///
/// # Contract
/// - **Loads** return exactly the bytes that were stored. `load` of an absent
///   oid is [`StorageError::NotFound`](crate::StorageError::NotFound); an oid
///   this session must treat as invalid may give
///   [`StorageError::ReadConflict`](crate::StorageError::ReadConflict).
/// - **Commits**: `begin`, any number of `store`, then `end`: all of the stored
///   records become visible together, or none does. `abort` drops them. A
///   commit is refused, with nothing written, when a record is malformed or
///   names another oid ([`InvalidInput`](crate::InvalidInput)), when it stores
///   an oid that is neither the root, nor present, nor handed out by `new_oid`
///   ([`Conflict::UnknownOid`](crate::Conflict::UnknownOid)), or when a record
///   references an oid that neither exists nor is stored in the same commit
///   ([`Conflict::DanglingRefs`](crate::Conflict::DanglingRefs)). Storing the
///   same oid twice in one commit keeps the last record.
/// - **Durability** is the storage's policy: for the default policies an `end`
///   that returned `Ok` survives a crash.
/// - **sync** returns the oids this session must treat as invalid: changed by
///   another session, or removed by the garbage collector, since the last sync.
/// - **The root is oid 0** ([`Oid::ROOT`]): the object everything live is
///   reachable from. It may be stored without `new_oid`.
/// - **new_oid** never returns the same oid twice, also across restarts, and
///   never an oid that is stored, the root included. On a store without a
///   root the first one is the root, 0 (Durus's `Connection` relies on
///   that): so `new_oids(3)` on an empty store is `[0, 1, 2]`, and the first
///   of them is the root, not a place for another object. Once a root is
///   stored, oid 0 is never handed out.
/// - A record committed but referenced by nothing stays until a full
///   collection (`pack`).
pub trait Storage {
    /// The record stored for `oid`.
    fn load(&mut self, oid: Oid) -> Result<Record>;

    /// The records for `oids`, in the same order; fails on the first that fails.
    fn bulk_load(&mut self, oids: &[Oid]) -> Result<Vec<Record>> {
        oids.iter().map(|&oid| self.load(oid)).collect()
    }

    /// Starts a commit, dropping anything stored since the last `begin`.
    fn begin(&mut self);

    /// Adds a record to the commit underway. The record must name `oid`.
    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()>;

    /// Commits every record stored since `begin`, atomically.
    fn end(&mut self) -> Result<()>;

    /// Commits as [`end`](Self::end), but only if no other session changed
    /// an oid of the commit or of `reads` since this session's last sync:
    /// otherwise it fails with
    /// [`Conflict::Invalidated`](crate::Conflict::Invalidated) and writes
    /// nothing. The check and the commit are atomic (as Durus's client
    /// checks its read set against the invalidations it gets in the commit
    /// order), so a transaction that read `reads` commits only onto the
    /// state it read.
    fn end_checked(&mut self, reads: &[Oid]) -> Result<()>;

    /// Whether loads read the state of the last sync or commit (snapshot
    /// reads), so that what one session reads between syncs is always
    /// consistent. False unless the storage knows it.
    fn snapshot_reads(&self) -> bool {
        false
    }

    /// Drops the commit underway.
    fn abort(&mut self);

    /// Oids this session must treat as invalid since the last sync.
    fn sync(&mut self) -> Result<Vec<Oid>>;

    /// A new oid, never handed out before and never stored (see the
    /// contract: the first oid of a store without a root is the root).
    fn new_oid(&mut self) -> Result<Oid>;

    /// `n` new oids.
    fn new_oids(&mut self, n: usize) -> Result<Vec<Oid>> {
        (0..n).map(|_| self.new_oid()).collect()
    }

    /// Every record, in increasing oid order, as a stream. Stores that cannot
    /// list all records (a remote one) yield every record reachable from the root.
    fn iter_records(&mut self) -> Result<Box<dyn Iterator<Item = Result<Record>> + '_>>;

    /// Every record reachable from `start`, lowest oid first among those
    /// discovered, each once.
    fn traverse(&mut self, start: Oid) -> Traversal<'_, Self>
    where
        Self: Sized,
    {
        Traversal::new(self, start, 100)
    }

    /// Removes every record not reachable from the root.
    fn pack(&mut self) -> Result<PackReport>;

    /// Makes everything committed durable and releases the store.
    fn close(&mut self) -> Result<()>;
}

/// A traversal of the object graph from one oid, loading in batches through
/// [`Storage::bulk_load`] (as Durus's `gen_oid_record(start_oid)` does).
pub struct Traversal<'a, S: Storage> {
    storage: &'a mut S,
    todo: BinaryHeap<Reverse<Oid>>,
    seen: HashSet<Oid>,
    ready: std::vec::IntoIter<Record>,
    batch: usize,
    failed: bool,
}

impl<'a, S: Storage> Traversal<'a, S> {
    /// A traversal from `start` that loads `batch` records at a time.
    pub fn new(storage: &'a mut S, start: Oid, batch: usize) -> Self {
        let mut todo = BinaryHeap::new();
        todo.push(Reverse(start));
        Traversal {
            storage,
            todo,
            seen: HashSet::new(),
            ready: Vec::new().into_iter(),
            batch: batch.max(1),
            failed: false,
        }
    }
}

impl<S: Storage> Iterator for Traversal<'_, S> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        loop {
            if let Some(r) = self.ready.next() {
                for oid in r.refs() {
                    if !self.seen.contains(&oid) {
                        self.todo.push(Reverse(oid));
                    }
                }
                return Some(Ok(r));
            }
            if self.failed {
                return None;
            }
            let mut batch = Vec::new();
            while batch.len() < self.batch {
                let Some(Reverse(oid)) = self.todo.pop() else {
                    break;
                };
                if self.seen.insert(oid) {
                    batch.push(oid);
                }
            }
            if batch.is_empty() {
                return None;
            }
            match self.storage.bulk_load(&batch) {
                Ok(records) => self.ready = records.into_iter(),
                Err(e) => {
                    self.failed = true;
                    return Some(Err(e));
                }
            }
        }
    }
}

/// Checks a commit the same way in every storage, so that the model and the
/// engine refuse exactly the same commits with the same errors:
/// first that every stored oid may be written (`may_write`), then that every
/// ref names an oid that `exists` or is stored in the same commit.
pub(crate) fn validate_commit(
    records: &std::collections::BTreeMap<Oid, Record>,
    mut exists: impl FnMut(Oid) -> Result<bool>,
    mut may_write: impl FnMut(Oid, bool) -> Result<()>,
) -> Result<()> {
    for &oid in records.keys() {
        let present = exists(oid)?;
        may_write(oid, present)?;
    }
    let mut dangling = std::collections::BTreeSet::new();
    for record in records.values() {
        for r in record.refs() {
            if !records.contains_key(&r) && !dangling.contains(&r) && !exists(r)? {
                dangling.insert(r);
            }
        }
    }
    if dangling.is_empty() {
        Ok(())
    } else {
        Err(crate::Conflict::DanglingRefs {
            oids: dangling.into_iter().collect(),
        }
        .into())
    }
}

/// Where a store's oid sequence goes on from `next`: never a stored oid.
/// The first oid of a store is the root (0), handed out only while no
/// root is stored; a root committed directly (without `new_oid`) is passed
/// over. Every other oid is above every oid stored or handed out. The rule
/// of every store.
pub(crate) fn next_free_oid(next: u64, root_stored: impl FnOnce() -> Result<bool>) -> Result<u64> {
    if next == 0 && root_stored()? {
        Ok(1)
    } else {
        Ok(next)
    }
}

/// Who holds an oid handed out by `new_oid` and not yet stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Holder {
    /// The session committing it.
    ThisSession,
    /// Another session.
    AnotherSession,
    /// No session (never handed out, or forgotten at a reopen).
    Nobody,
}

/// Whether a session may store `oid`, which is not stored yet: the session
/// was handed it, or it is the root and no other session was handed it
/// (as Durus's server, which drops a client that stores an oid another
/// client holds). The rule of every store.
pub(crate) fn may_create(oid: Oid, holder: Holder) -> Result<()> {
    match holder {
        Holder::ThisSession => Ok(()),
        Holder::AnotherSession => Err(crate::InvalidInput::OidOfAnotherSession { oid }.into()),
        Holder::Nobody if oid == Oid::ROOT => Ok(()),
        Holder::Nobody => Err(crate::Conflict::UnknownOid { oid }.into()),
    }
}

/// Validates a record for `store`: well formed and naming `oid`.
pub(crate) fn checked_record(oid: Oid, bytes: Vec<u8>) -> Result<Record> {
    Record::for_oid(oid, bytes).map_err(|source| crate::InvalidInput::Record { oid, source }.into())
}

/// The records of the commit underway, kept alike by every storage:
/// `begin` and `abort` drop them, `store` checks and adds one (the last
/// record stored for an oid wins), `take` hands them to the commit.
#[derive(Debug, Default, Clone)]
pub(crate) struct PendingCommit {
    records: std::collections::BTreeMap<Oid, Record>,
}

impl PendingCommit {
    /// Drops everything stored (`begin` and `abort`).
    pub(crate) fn clear(&mut self) {
        self.records.clear();
    }

    /// Checks a record (well formed, naming `oid`) and adds it.
    pub(crate) fn store(&mut self, oid: Oid, bytes: Vec<u8>) -> Result<()> {
        let record = checked_record(oid, bytes)?;
        self.records.insert(oid, record);
        Ok(())
    }

    /// The records stored, leaving none.
    pub(crate) fn take(&mut self) -> std::collections::BTreeMap<Oid, Record> {
        std::mem::take(&mut self.records)
    }
}
