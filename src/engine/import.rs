//! The import path of a migration: batches written without the per-commit
//! checks, reference counts kept exact, the import state in the same
//! transaction.

use std::collections::HashMap;

use redb::{Durability, ReadableTable, ReadableTableMetadata, TableDefinition, Value};

use super::Engine;
use super::layout::{
    KEY_IMPORTED, KEY_MIGRATION, KEY_OIDS, META, OidMeta, RECORDS, REFCOUNTS, RecordHash, encode,
};
use super::refcount::{apply_ref_deltas, corrupt};
use crate::error::Result;
use crate::record::{Oid, Record, refs_of};

/// What one import batch did.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ImportedBatch {
    /// Records that were not in the store before.
    pub(crate) new_objects: u64,
    /// Wrapping sum of the hashes of the records replaced.
    pub(crate) replaced_hash: u64,
    /// The highest oid of the batch.
    pub(crate) max_oid: Option<u64>,
}

impl Engine {
    /// The highest oid stored.
    pub(crate) fn last_oid(&self) -> Result<Option<Oid>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let records = txn.open_table(RECORDS)?;
        Ok(records.last()?.map(|(k, _)| Oid(k.value())))
    }

    /// The raw metadata value under `key`.
    pub(crate) fn meta_bytes(&self, key: &str) -> Result<Option<Vec<u8>>> {
        let db = self.db()?;
        let txn = db.begin_read()?;
        let meta = txn.open_table(META)?;
        Ok(meta.get(key)?.map(|v| v.value().to_vec()))
    }

    /// Raises the allocation mark above `oid` (after an import). After an
    /// oid at the top of the range the mark stays at `u64::MAX`, and
    /// allocation refuses with [`InvalidInput::OidsExhausted`].
    pub(crate) fn reserve_above(&self, oid: Oid) -> Result<()> {
        let next = oid.0.saturating_add(1);
        let mut st = self.commit.lock();
        if next > st.next_oid {
            self.write_oid_meta(next.max(st.reserved), &mut st)?;
            st.next_oid = next;
            self.alloc.raise(next);
            st.reserved = st.reserved.max(next);
        }
        Ok(())
    }

    /// Writes a batch of imported records without the per-commit checks (a
    /// record may reference an oid a later batch brings; imported oids were
    /// never handed out), keeping reference counts exact, and stores the
    /// import state that `state` makes from the batch's figures, all in one
    /// write transaction. Raises the oid mark above every imported oid.
    pub(crate) fn import_batch(
        &self,
        items: &[(Oid, Record)],
        durable: bool,
        hash: RecordHash,
        state: impl FnOnce(&ImportedBatch) -> Vec<u8>,
    ) -> Result<ImportedBatch> {
        let durability = if durable {
            Durability::Immediate
        } else {
            Durability::None
        };
        self.write_txn_state(durability, |w, st| {
            let mut batch = ImportedBatch::default();
            let mut delta: HashMap<u64, i64> = HashMap::new();
            {
                let mut table = w.open_table(RECORDS)?;
                for (oid, record) in items {
                    batch.max_oid = batch.max_oid.max(Some(oid.0));
                    match table.insert(oid.0, record.as_bytes())? {
                        Some(old) => {
                            let old = old.value();
                            batch.replaced_hash =
                                batch.replaced_hash.wrapping_add(hash.of(*oid, old));
                            for r in refs_of(old).map_err(|e| corrupt(*oid, e))? {
                                *delta.entry(r.0).or_default() -= 1;
                            }
                        }
                        None => batch.new_objects += 1,
                    }
                    for r in record.refs() {
                        *delta.entry(r.0).or_default() += 1;
                    }
                }
            }
            apply_ref_deltas(w, delta, super::layout::now_unix_ms())?;
            let mut meta = w.open_table(META)?;
            meta.insert(KEY_MIGRATION, state(&batch).as_slice())?;
            if let Some(max) = batch.max_oid
                && max >= st.next_oid
            {
                // At the top of the range the mark stays at u64::MAX: no oid
                // is left to hand out, and allocation says so.
                let next = max.saturating_add(1);
                st.next_oid = next;
                self.alloc.raise(next);
                st.reserved = st.reserved.max(next);
                meta.insert(
                    KEY_OIDS,
                    encode(&OidMeta {
                        reserved: st.reserved,
                    })
                    .as_slice(),
                )?;
            }
            Ok(batch)
        })
    }

    /// Rewrites the records and the reference counts in oid order (for
    /// [`compact`](Self::compact) to shrink the file). A table filled in the
    /// order of a Durus file (not oid order) has pages a half to three
    /// quarters full; one filled in key order has full pages. Each table is
    /// copied into a new one in write transactions of about `batch_bytes`,
    /// and the last of them swaps the copy in, the last swap together with
    /// the import state `state` (which says the repack is done): a crash
    /// before leaves the old table whole and the copy so far, which the
    /// next run goes on from (nothing else writes during an import).
    /// `progress` gets the records copied and their total.
    pub(crate) fn repack(
        &self,
        batch_bytes: usize,
        state: &[u8],
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()> {
        const RECORDS_NEW: TableDefinition<u64, &[u8]> =
            TableDefinition::new("durus_records_repack");
        const REFCOUNTS_NEW: TableDefinition<u64, u64> =
            TableDefinition::new("durus_refcounts_repack");
        self.repack_table(RECORDS, RECORDS_NEW, batch_bytes, None, progress)?;
        self.repack_table(
            REFCOUNTS,
            REFCOUNTS_NEW,
            batch_bytes,
            Some(state),
            &mut |_, _| {},
        )
    }

    fn repack_table<V: Value + 'static>(
        &self,
        table: TableDefinition<u64, V>,
        copy: TableDefinition<u64, V>,
        batch_bytes: usize,
        state: Option<&[u8]>,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<()>
    where
        for<'a> V::SelfType<'a>: std::borrow::Borrow<V::SelfType<'a>>,
    {
        let mut copied = 0u64;
        loop {
            let done = self.write_txn(Durability::None, |w, _| {
                let from = w.open_table(table)?;
                let mut to = w.open_table(copy)?;
                let total = from.len()?;
                copied = to.len()?;
                let start = match to.last()? {
                    None => 0,
                    Some((k, _)) => match k.value().checked_add(1) {
                        Some(next) => next,
                        // The copy reached the top of the oid range.
                        None => return Ok((true, total)),
                    },
                };
                let mut bytes = 0usize;
                for item in from.range(start..)? {
                    let (k, v) = item?;
                    let value = v.value();
                    bytes += V::as_bytes(&value).as_ref().len() + 8;
                    to.insert(k.value(), value)?;
                    copied += 1;
                    if bytes >= batch_bytes {
                        return Ok((false, total));
                    }
                }
                Ok((true, total))
            })?;
            progress(copied, done.1);
            if done.0 {
                break;
            }
        }
        self.write_txn(Durability::Immediate, |w, _| {
            w.delete_table(table)?;
            w.rename_table(copy, table)?;
            if let Some(state) = state {
                w.open_table(META)?.insert(KEY_MIGRATION, state)?;
            }
            Ok(())
        })
    }

    /// Compacts the file: redb moves the pages in use to its start and
    /// truncates it. Returns whether it did; it does not (and changes
    /// nothing) while a transaction or snapshot is live elsewhere.
    pub(crate) fn compact(&self) -> Result<bool> {
        let mut st = self.commit.lock();
        self.settle_parked(&mut st)?;
        let mut slot = self.db.write();
        let Some(super::Db::Rw(db)) = slot.as_mut() else {
            return Ok(false);
        };
        match db.compact() {
            Ok(done) => Ok(done),
            Err(redb::CompactionError::TransactionInProgress) => {
                tracing::warn!("not compacted: a read or write is in progress");
                Ok(false)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Ends an import: removes its state (the collector and writable opens
    /// are allowed again), records `summary` under the `imported` key, and
    /// makes everything durable.
    pub(crate) fn finish_import(&self, summary: &[u8]) -> Result<()> {
        self.write_txn(Durability::Immediate, |w, _| {
            let mut meta = w.open_table(META)?;
            meta.remove(KEY_MIGRATION)?;
            meta.insert(KEY_IMPORTED, summary)?;
            Ok(())
        })
    }
}
