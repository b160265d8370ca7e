//! `MemoryStorage`: the reference model every other storage is tested against.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use crate::error::{Conflict, InvalidInput, Result, StorageError};
use crate::record::{Oid, Record};
use crate::storage::{
    Holder, PackReport, PendingCommit, Storage, may_create, next_free_oid, validate_commit,
};

/// A storage that keeps everything in memory, with the same semantics as
/// [`RedbStorage`](crate::RedbStorage): the same validation, the same oid
/// sequence, the same pack. Plain data structures, obviously right: the model.
#[derive(Debug, Default, Clone)]
pub struct MemoryStorage {
    records: BTreeMap<Oid, Record>,
    next_oid: u64,
    allocated: HashSet<Oid>,
    pending: PendingCommit,
    invalid: BTreeSet<Oid>,
}

impl MemoryStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    /// What a clean close and reopen does to a persistent store: the pending
    /// commit and the allocated-but-unused oids are forgotten; everything
    /// committed, and the oid sequence, stay.
    pub fn reopen(&mut self) {
        self.pending.clear();
        self.allocated.clear();
        self.invalid.clear();
    }

    /// Number of records stored.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when nothing is stored.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// The oids reachable from the root.
    pub fn reachable(&self) -> BTreeSet<Oid> {
        let mut seen = BTreeSet::new();
        if !self.records.contains_key(&Oid::ROOT) {
            return seen;
        }
        let mut todo = vec![Oid::ROOT];
        while let Some(oid) = todo.pop() {
            if !seen.insert(oid) {
                continue;
            }
            if let Some(r) = self.records.get(&oid) {
                todo.extend(r.refs().filter(|o| !seen.contains(o)));
            }
        }
        seen
    }
}

impl MemoryStorage {
    /// Validates and applies the records of a commit.
    fn commit(&mut self, pending: BTreeMap<Oid, Record>) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let records = &self.records;
        let allocated = &self.allocated;
        validate_commit(
            &pending,
            |oid| Ok(records.contains_key(&oid)),
            |oid, present| {
                if present {
                    return Ok(());
                }
                let holder = if allocated.contains(&oid) {
                    Holder::ThisSession
                } else {
                    Holder::Nobody
                };
                may_create(oid, holder)
            },
        )?;
        for (oid, record) in pending {
            self.allocated.remove(&oid);
            self.records.insert(oid, record);
        }
        Ok(())
    }
}

impl Storage for MemoryStorage {
    fn load(&mut self, oid: Oid) -> Result<Record> {
        self.records
            .get(&oid)
            .cloned()
            .ok_or(StorageError::NotFound(oid))
    }

    fn begin(&mut self) {
        self.pending.clear();
    }

    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()> {
        self.pending.store(oid, record)?;
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let pending = self.pending.take();
        self.commit(pending)
    }

    fn end_checked(&mut self, reads: &[Oid]) -> Result<()> {
        let pending = self.pending.take();
        let clash: Vec<Oid> = self
            .invalid
            .iter()
            .copied()
            .filter(|o| reads.contains(o) || pending.contains_key(o))
            .collect();
        if !clash.is_empty() {
            return Err(Conflict::Invalidated { oids: clash }.into());
        }
        self.commit(pending)
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<Vec<Oid>> {
        Ok(std::mem::take(&mut self.invalid).into_iter().collect())
    }

    fn new_oid(&mut self) -> Result<Oid> {
        let records = &self.records;
        self.next_oid = next_free_oid(self.next_oid, || Ok(records.contains_key(&Oid::ROOT)))?;
        let oid = Oid(self.next_oid);
        self.next_oid += 1;
        self.allocated.insert(oid);
        Ok(oid)
    }

    fn iter_records(&mut self) -> Result<Box<dyn Iterator<Item = Result<Record>> + '_>> {
        Ok(Box::new(self.records.values().cloned().map(Ok)))
    }

    fn pack(&mut self) -> Result<PackReport> {
        if self.records.is_empty() {
            return Ok(PackReport::default());
        }
        if !self.records.contains_key(&Oid::ROOT) {
            return Err(InvalidInput::NoRoot.into());
        }
        let live = self.reachable();
        let mut report = PackReport::default();
        self.records.retain(|oid, r| {
            if live.contains(oid) {
                report.live_objects += 1;
                true
            } else {
                report.removed_objects += 1;
                report.removed_bytes += r.len() as u64;
                self.invalid.insert(*oid);
                false
            }
        });
        Ok(report)
    }

    fn close(&mut self) -> Result<()> {
        self.reopen();
        Ok(())
    }
}
