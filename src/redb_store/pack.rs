//! Full collection: mark everything reachable from the root on a read
//! snapshot, then sweep the rest in small write transactions, while loads and
//! commits go on.
//!
//! Commits made after the snapshot may reference objects that were unreachable
//! in it (a client that still held one). Every commit therefore records, while
//! a collection runs, the oids it stored and referenced (`gc_extra`); each sweep
//! transaction first marks everything reachable from those in the current
//! state, under the same commit lock, so nothing a commit reaches is deleted.
//! An object marked in the snapshot and not changed since still references
//! only marked objects, so that traversal stops at marked objects.

use std::collections::{HashMap, HashSet};

use redb::{Durability, ReadableTable, ReadableTableMetadata};

use super::engine::{Engine, apply_ref_deltas, corrupt};
use super::layout::{GC_QUEUE, RECORDS, REFCOUNTS};
use crate::error::{InvalidInput, Result, StorageError};
use crate::record::{Oid, refs_of};
use crate::storage::PackReport;

/// Candidates deleted per write transaction.
const SWEEP_BATCH: usize = 256;

/// Runs a full collection to the end and makes it durable.
pub(crate) fn full_collection(engine: &Engine) -> Result<PackReport> {
    full_collection_with(engine, &mut |_| {})
}

/// Progress of a full collection.
#[expect(dead_code, reason = "read by the `gc` command's progress bar")]
#[derive(Debug, Clone, Copy)]
pub enum PackProgress {
    /// Objects marked live so far.
    Marked(u64),
    /// Snapshot records swept so far, out of the total.
    Swept(u64, u64),
}

/// Runs a full collection, reporting progress.
pub(crate) fn full_collection_with(
    engine: &Engine,
    progress: &mut dyn FnMut(PackProgress),
) -> Result<PackReport> {
    // Start recording commits and take the snapshot atomically with respect to commits.
    let snapshot = {
        let mut g = engine.lock_commits();
        if g.state_mut().gc_extra.is_some() {
            return Err(InvalidInput::Other("a full collection is already running".into()).into());
        }
        let txn = engine.db()?.begin_read()?;
        g.state_mut().gc_extra = Some(HashSet::new());
        txn
    };
    let result = (|| -> Result<PackReport> {
        let records = snapshot.open_table(RECORDS)?;
        let total = records.len()?;
        if total == 0 {
            return Ok(PackReport::default());
        }
        if records.get(Oid::ROOT.0)?.is_none() {
            return Err(InvalidInput::Other(
                "the store has records but no root object (oid 0): refusing to collect".into(),
            )
            .into());
        }
        // Mark.
        let mut marked: HashSet<u64> = HashSet::new();
        let mut todo = vec![Oid::ROOT.0];
        while let Some(oid) = todo.pop() {
            if !marked.insert(oid) {
                continue;
            }
            if marked.len().is_multiple_of(100_000) {
                progress(PackProgress::Marked(marked.len() as u64));
            }
            if let Some(v) = records.get(oid)? {
                for r in refs_of(v.value()).map_err(|e| corrupt(Oid(oid), e))? {
                    if !marked.contains(&r.0) {
                        todo.push(r.0);
                    }
                }
            }
        }
        progress(PackProgress::Marked(marked.len() as u64));
        // Sweep.
        let mut report = PackReport {
            live_objects: marked.len() as u64,
            ..PackReport::default()
        };
        let mut batch = Vec::with_capacity(SWEEP_BATCH);
        let mut swept = 0u64;
        for item in records.iter()? {
            let (k, _) = item?;
            swept += 1;
            let oid = k.value();
            if !marked.contains(&oid) {
                batch.push(oid);
            }
            if batch.len() >= SWEEP_BATCH {
                sweep(engine, &mut batch, &mut marked, &mut report)?;
                progress(PackProgress::Swept(swept, total));
            }
        }
        sweep(engine, &mut batch, &mut marked, &mut report)?;
        progress(PackProgress::Swept(total, total));
        Ok(report)
    })();
    drop(snapshot);
    engine.lock_commits().state_mut().gc_extra = None;
    let report = result?;
    engine.checkpoint()?;
    tracing::info!(
        removed = report.removed_objects,
        bytes = report.removed_bytes,
        "full collection finished"
    );
    Ok(report)
}

/// Deletes the candidates of `batch` that are still unreachable, in one
/// non-durable write transaction under the commit lock.
fn sweep(
    engine: &Engine,
    batch: &mut Vec<u64>,
    marked: &mut HashSet<u64>,
    report: &mut PackReport,
) -> Result<()> {
    if batch.is_empty() {
        return Ok(());
    }
    let removed = engine.write_txn(Durability::None, |w, st| {
        let extra: Vec<Oid> = st
            .gc_extra
            .as_mut()
            .map(|e| e.drain().collect())
            .unwrap_or_default();
        let mut table = w.open_table(RECORDS)?;
        // Protect whatever commits since the snapshot reach.
        let mut todo: Vec<u64> = extra
            .into_iter()
            .map(|o| o.0)
            .filter(|o| !marked.contains(o))
            .collect();
        while let Some(oid) = todo.pop() {
            if !marked.insert(oid) {
                continue;
            }
            if let Some(v) = table.get(oid)? {
                for r in refs_of(v.value()).map_err(|e| corrupt(Oid(oid), e))? {
                    if !marked.contains(&r.0) {
                        todo.push(r.0);
                    }
                }
            }
        }
        let mut delta: HashMap<u64, i64> = HashMap::new();
        let mut removed = Vec::new();
        let mut bytes = 0u64;
        for &oid in batch.iter() {
            if marked.contains(&oid) {
                continue;
            }
            let Some(old) = table.remove(oid)? else {
                continue;
            };
            bytes += old.value().len() as u64;
            for r in refs_of(old.value()).map_err(|e| corrupt(Oid(oid), e))? {
                *delta.entry(r.0).or_default() -= 1;
            }
            removed.push(Oid(oid));
        }
        drop(table);
        apply_ref_deltas(w, delta)?;
        let mut counts = w.open_table(REFCOUNTS)?;
        let mut queue = w.open_table(GC_QUEUE)?;
        for oid in &removed {
            counts.remove(oid.0)?;
            queue.remove(oid.0)?;
        }
        Ok::<_, StorageError>((removed, bytes))
    })?;
    let (removed, bytes) = removed;
    report.removed_objects += removed.len() as u64;
    report.removed_bytes += bytes;
    engine.invalidate_others(None, &removed);
    batch.clear();
    Ok(())
}
