//! Pins and pending deletions: what placed commits need and what the
//! collector is deleting, so that neither overtakes the other.

use std::collections::{BTreeMap, HashMap};

use crate::record::{Oid, Record};

/// What placed commits need and what the collector is deleting, so that
/// neither overtakes the other: a commit placed in line is checked against
/// the state applied so far and must pass again in its turn.
///
/// A placed commit pins its oids and every oid its records reference until
/// it is applied; a collector transaction deletes no pinned oid, and marks
/// what it deletes as doomed until its transaction is committed. A commit
/// that names a doomed oid is not placed but checked in its turn (after
/// the deletion), so the collector never makes a placed commit fail in its
/// turn.
#[derive(Default)]
pub(crate) struct Pins {
    sets: crate::ranked::Mutex<PinSets, { crate::ranked::rank::PINS }>,
}

/// The sets of [`Pins`], under its lock.
#[derive(Default)]
pub(crate) struct PinSets {
    /// How many placed commits need each oid.
    pinned: HashMap<u64, u32>,
    /// Oids a collector transaction not yet committed is deleting.
    pub(in crate::engine) doomed: std::collections::HashSet<u64>,
}

impl PinSets {
    /// Whether a placed commit needs `oid`.
    pub(crate) fn is_pinned(&self, oid: u64) -> bool {
        self.pinned.contains_key(&oid)
    }

    /// Marks `oid` as being deleted (until [`Pins::undoom`]).
    pub(crate) fn doom(&mut self, oid: u64) {
        self.doomed.insert(oid);
    }
}

impl Pins {
    /// Takes the lock, for a collector's choice of what it deletes.
    pub(crate) fn lock(
        &self,
    ) -> crate::ranked::MutexGuard<'_, PinSets, { crate::ranked::rank::PINS }> {
        self.sets.lock()
    }

    /// Pins `oids`; false if one of them is being deleted (they are pinned
    /// all the same: [`unpin`](Self::unpin) them).
    pub(in crate::engine) fn pin(&self, oids: &[u64]) -> bool {
        let mut sets = self.sets.lock();
        let mut clear = true;
        for &oid in oids {
            *sets.pinned.entry(oid).or_default() += 1;
            clear &= !sets.doomed.contains(&oid);
        }
        clear
    }

    pub(in crate::engine) fn unpin(&self, oids: &[u64]) {
        let mut sets = self.sets.lock();
        for oid in oids {
            if let Some(n) = sets.pinned.get_mut(oid) {
                *n -= 1;
                if *n == 0 {
                    sets.pinned.remove(oid);
                }
            }
        }
    }

    /// The collector's transaction that deleted `oids` is committed (or
    /// failed).
    pub(crate) fn undoom(&self, oids: impl IntoIterator<Item = u64>) {
        let mut sets = self.sets.lock();
        for oid in oids {
            sets.doomed.remove(&oid);
        }
    }
}

/// Undooms the oids it holds when dropped: what a collector transaction
/// doomed, once the transaction is over whatever its outcome.
pub(crate) struct Undoom<'a>(pub(crate) &'a Pins, pub(crate) Vec<u64>);

impl Drop for Undoom<'_> {
    fn drop(&mut self) {
        if !self.1.is_empty() {
            self.0.undoom(self.1.drain(..));
        }
    }
}

/// What a placed commit pins: its oids and every oid its records reference.
pub(in crate::engine) fn pin_list(records: &BTreeMap<Oid, Record>) -> Vec<u64> {
    let mut oids: Vec<u64> = records.keys().map(|o| o.0).collect();
    for r in records.values() {
        oids.extend(r.refs().map(|o| o.0));
    }
    oids.sort_unstable();
    oids.dedup();
    oids
}
