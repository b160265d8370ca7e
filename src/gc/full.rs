//! Full (cycle) collection: mark everything reachable from the root, then
//! delete the rest in small write transactions, while loads and commits go on.
//!
//! **Mark.** Starting from the root, in chunks, each chunk on its own short
//! read transaction (no reader is held for the whole traversal). The marked
//! set is a bitmap over the dense oid range (one bit per oid handed out), with
//! a hash set for oids above it.
//!
//! **Commits during the collection.** From the start (taken under the commit
//! lock) every commit records the oids it stores and references
//! (the collector's `extra` set, fed by its commit hook). Each sweep transaction first marks everything
//! reachable from those in the current state. A marked object read by the
//! mark and not changed since references only marked objects; a changed one
//! is in `extra` with its new references. So an unmarked object is not
//! referenced by any marked one: it is unreachable.
//!
//! **Sweep without dangling references.** Deleting unreachable objects in
//! arbitrary batches could leave a remaining (unreachable) record referencing
//! a deleted one: `check` would report it after a crash, and a client that
//! still holds the survivor could commit a reference to it. So each sweep
//! transaction deletes a set `S` of unmarked objects only when every
//! reference to a member comes from inside `S`: it takes the forward closure
//! of a few unmarked seeds (bounded), compares each member's reference count
//! with the references from inside `S`, and keeps (for a later transaction)
//! every member referenced from outside, transitively. A garbage cycle is
//! thus deleted whole, in one transaction. Passes over the store repeat until
//! no unmarked record is left; a pass that deletes nothing retries with an
//! unbounded closure, so every garbage component is eventually deleted.
//!
//! **Interruptions.** The metadata key `gc` records that a full collection is
//! running; an interrupted one (a crash, a stop) restarts from scratch after
//! open when the policy allows. Sweep transactions are non-durable; `pack`
//! checkpoints at the end.

use std::collections::{HashMap, HashSet};
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use redb::{Durability, ReadableTable, ReadableTableMetadata};

use super::shared::GcShared;
use super::state::{GcMeta, meta_in, now_unix_ms, write_meta};
use crate::engine::layout::{RECORDS, REFCOUNTS};
use crate::engine::{Engine, Undoom, apply_ref_deltas, corrupt, forget};
use crate::error::{InvalidInput, Result};
use crate::record::{Oid, refs_of};

/// Objects marked per read transaction.
const MARK_CHUNK: usize = 50_000;
/// Keys scanned per read transaction while looking for sweep candidates.
const SCAN_KEYS: usize = 8192;

/// Which phase a full collection is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FullPhase {
    /// Marking everything reachable from the root.
    Mark,
    /// Waiting out the grace window after the start before sweeping
    /// (background collections only), protecting what commits reference.
    Grace,
    /// Deleting unmarked records; passes are counted from 1.
    Sweep {
        /// The pass over the store.
        pass: u32,
    },
}

/// Progress of a full collection, reported after each chunk of work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct FullProgress {
    /// The phase.
    pub phase: FullPhase,
    /// Objects marked live so far.
    pub marked: u64,
    /// Records looked at in this sweep pass.
    pub scanned: u64,
    /// Records in the store when the collection started.
    pub total: u64,
    /// Records deleted so far.
    pub removed_objects: u64,
    /// Bytes of records deleted so far.
    pub removed_bytes: u64,
}

/// What a full collection did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FullReport {
    /// Records deleted.
    pub removed_objects: u64,
    /// Bytes of the deleted records.
    pub removed_bytes: u64,
    /// Objects found reachable from the root.
    pub live_objects: u64,
    /// Sweep passes over the store.
    pub passes: u32,
    /// False if it was stopped before the end (it restarts after the next open).
    pub completed: bool,
    /// Wall time.
    pub elapsed: Duration,
}

/// The marked set: a bitmap over `0..cap`, a hash set above.
struct MarkSet {
    bits: Vec<u64>,
    cap: u64,
    overflow: HashSet<u64>,
    len: u64,
}

impl MarkSet {
    fn new(oid_mark: u64, records: u64) -> MarkSet {
        // A bitmap no larger than what a hash set of the records would take.
        let cap = if oid_mark / 8 <= records.saturating_mul(16).max(1 << 20) {
            oid_mark
        } else {
            0
        };
        MarkSet {
            bits: vec![0; cap.div_ceil(64) as usize],
            cap,
            overflow: HashSet::new(),
            len: 0,
        }
    }

    fn contains(&self, oid: u64) -> bool {
        if oid < self.cap {
            self.bits[(oid / 64) as usize] & (1 << (oid % 64)) != 0
        } else {
            self.overflow.contains(&oid)
        }
    }

    fn insert(&mut self, oid: u64) -> bool {
        let new = if oid < self.cap {
            let w = &mut self.bits[(oid / 64) as usize];
            let bit = 1 << (oid % 64);
            let new = *w & bit == 0;
            *w |= bit;
            new
        } else {
            self.overflow.insert(oid)
        };
        self.len += new as u64;
        new
    }
}

/// Stops recording commits when the collection ends, however it ends.
struct ExtraGuard<'a>(&'a GcShared);

impl Drop for ExtraGuard<'_> {
    fn drop(&mut self) {
        *self.0.extra.lock() = None;
    }
}

/// Runs a full collection with `batch` seeds per sweep transaction, calling
/// `between` after each chunk of work (it may sleep; `Break` stops the
/// collection, which then restarts after the next open). The sweep starts no
/// earlier than `grace` after the start: what is unmarked then was
/// unreachable at the start and not referenced by any commit since, so it
/// has been unreachable for at least `grace`. The caller holds the engine's
/// full-collection lock.
pub(crate) fn run(
    engine: &Engine,
    gc: &GcShared,
    batch: usize,
    grace: Duration,
    between: &mut dyn FnMut(&FullProgress) -> ControlFlow<()>,
) -> Result<FullReport> {
    let started = Instant::now();
    let batch = batch.max(1);
    // Start: persist that a collection runs, and record commits from now on.
    // Under the commit lock, so that every commit after this point is
    // recorded in `extra`.
    let start = engine.write_txn(Durability::None, |w, oid_mark| {
        let (mut meta, migration) = meta_in(w)?;
        if migration {
            return Err(InvalidInput::ImportInProgress.into());
        }
        let mut extra = gc.extra.lock();
        if extra.is_some() {
            return Err(InvalidInput::CollectionRunning.into());
        }
        let records = w.open_table(RECORDS)?;
        let total = records.len()?;
        if total > 0 && records.get(Oid::ROOT.0)?.is_none() {
            return Err(InvalidInput::NoRoot.into());
        }
        drop(records);
        meta.full_running = total > 0;
        write_meta(w, &meta)?;
        if total > 0 {
            *extra = Some(HashSet::new());
        }
        Ok((total, oid_mark))
    })?;
    let (total, oid_mark) = start;
    let mut progress = FullProgress {
        phase: FullPhase::Mark,
        marked: 0,
        scanned: 0,
        total,
        removed_objects: 0,
        removed_bytes: 0,
    };
    let mut report = FullReport::default();
    if total > 0 {
        let _extra = ExtraGuard(gc);
        let mut marked = MarkSet::new(oid_mark, total);
        if mark(engine, &mut marked, &mut progress, between)?.is_break() {
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        // Wait out the grace window, keeping the set of what commits since
        // the start reach small by marking it as it comes.
        let sweep_at = started + grace;
        while Instant::now() < sweep_at {
            progress.phase = FullPhase::Grace;
            absorb(engine, gc, &mut marked)?;
            progress.marked = marked.len;
            if between(&progress).is_break() {
                report.elapsed = started.elapsed();
                return Ok(report);
            }
            let left = sweep_at.saturating_duration_since(Instant::now());
            std::thread::sleep(left.min(Duration::from_millis(100)));
        }
        report.live_objects = marked.len;
        let mut limit = batch.saturating_mul(4).max(64);
        loop {
            report.passes += 1;
            progress.phase = FullPhase::Sweep {
                pass: report.passes,
            };
            progress.scanned = 0;
            let before = progress.removed_objects;
            let mut seeds_seen = 0u64;
            let mut cursor = Some(0u64);
            while let Some(from) = cursor {
                let (seeds, scanned, next) = scan(engine, from, &marked, batch)?;
                cursor = next;
                progress.scanned += scanned;
                seeds_seen += seeds.len() as u64;
                if !seeds.is_empty() {
                    let (removed, bytes) = sweep(engine, gc, &seeds, &mut marked, limit)?;
                    progress.removed_objects += removed.len() as u64;
                    progress.removed_bytes += bytes;
                    engine.publish_changes(None, &removed);
                    gc.note_deleted(removed.len() as u64, bytes, true);
                }
                progress.marked = marked.len;
                if between(&progress).is_break() {
                    report.removed_objects = progress.removed_objects;
                    report.removed_bytes = progress.removed_bytes;
                    report.elapsed = started.elapsed();
                    return Ok(report);
                }
            }
            if seeds_seen == 0 {
                break;
            }
            if progress.removed_objects == before {
                if limit == usize::MAX {
                    tracing::warn!(
                        seeds_seen,
                        "full collection: a pass with an unbounded closure deleted nothing; stopping"
                    );
                    break;
                }
                limit = usize::MAX;
            }
        }
    }
    // Finish: persist, stop recording commits.
    engine.write_txn(Durability::None, |w, _| {
        let (meta, _) = meta_in(w)?;
        write_meta(
            w,
            &GcMeta {
                full_running: false,
                last_full_unix_ms: Some(now_unix_ms()),
                full_collections: meta.full_collections + 1,
            },
        )?;
        *gc.extra.lock() = None;
        Ok(())
    })?;
    gc.full_finished();
    report.removed_objects = progress.removed_objects;
    report.removed_bytes = progress.removed_bytes;
    report.completed = true;
    report.elapsed = started.elapsed();
    tracing::info!(
        removed = report.removed_objects,
        bytes = report.removed_bytes,
        live = report.live_objects,
        passes = report.passes,
        elapsed_ms = report.elapsed.as_millis() as u64,
        "full collection finished"
    );
    Ok(report)
}

/// Marks everything reachable from the root, a chunk per read transaction.
fn mark(
    engine: &Engine,
    marked: &mut MarkSet,
    progress: &mut FullProgress,
    between: &mut dyn FnMut(&FullProgress) -> ControlFlow<()>,
) -> Result<ControlFlow<()>> {
    let mut todo = vec![Oid::ROOT.0];
    while !todo.is_empty() {
        {
            let db = engine.db()?;
            let txn = db.begin_read()?;
            let records = txn.open_table(RECORDS)?;
            let mut n = 0;
            while n < MARK_CHUNK {
                let Some(oid) = todo.pop() else { break };
                if !marked.insert(oid) {
                    continue;
                }
                n += 1;
                if let Some(v) = records.get(oid)? {
                    for r in refs_of(v.value()).map_err(|e| corrupt(Oid(oid), e))? {
                        if !marked.contains(r.0) {
                            todo.push(r.0);
                        }
                    }
                }
            }
        }
        progress.marked = marked.len;
        if between(progress).is_break() {
            return Ok(ControlFlow::Break(()));
        }
    }
    Ok(ControlFlow::Continue(()))
}

/// Marks `todo` and everything reachable from it in `records`.
fn mark_reachable(
    records: &impl ReadableTable<u64, &'static [u8]>,
    marked: &mut MarkSet,
    mut todo: Vec<u64>,
) -> Result<()> {
    while let Some(oid) = todo.pop() {
        if !marked.insert(oid) {
            continue;
        }
        if let Some(v) = records.get(oid)? {
            for r in refs_of(v.value()).map_err(|e| corrupt(Oid(oid), e))? {
                if !marked.contains(r.0) {
                    todo.push(r.0);
                }
            }
        }
    }
    Ok(())
}

/// Marks what the commits since the start reach, in one read transaction
/// (the sweep's own transactions do it again under the commit lock for what
/// comes later).
fn absorb(engine: &Engine, gc: &GcShared, marked: &mut MarkSet) -> Result<()> {
    let extra: Vec<u64> = gc
        .extra
        .lock()
        .as_mut()
        .map(|e| e.drain().map(|o| o.0).collect())
        .unwrap_or_default();
    let todo: Vec<u64> = extra.into_iter().filter(|&o| !marked.contains(o)).collect();
    if todo.is_empty() {
        return Ok(());
    }
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    mark_reachable(&records, marked, todo)
}

/// Up to `want` unmarked oids from `from` on, scanning at most [`SCAN_KEYS`]
/// keys in one short read transaction. Returns them, the keys scanned, and
/// where to go on (`None` at the end).
fn scan(
    engine: &Engine,
    from: u64,
    marked: &MarkSet,
    want: usize,
) -> Result<(Vec<u64>, u64, Option<u64>)> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let records = txn.open_table(RECORDS)?;
    let mut seeds = Vec::new();
    let mut scanned = 0u64;
    for item in records.range(from..)? {
        let (k, _) = item?;
        let oid = k.value();
        scanned += 1;
        if !marked.contains(oid) {
            seeds.push(oid);
        }
        if seeds.len() >= want || scanned as usize >= SCAN_KEYS {
            return Ok((seeds, scanned, oid.checked_add(1)));
        }
    }
    Ok((seeds, scanned, None))
}

/// One sweep transaction: protects what commits since the start reach, then
/// deletes the largest set around `seeds` that nothing outside references.
fn sweep(
    engine: &Engine,
    gc: &GcShared,
    seeds: &[u64],
    marked: &mut MarkSet,
    limit: usize,
) -> Result<(Vec<Oid>, u64)> {
    engine.yield_to_committers();
    // Once the transaction is over, committed or not, what it swept no
    // longer holds up a commit.
    let mut doomed = Undoom(&engine.pins, Vec::new());
    let swept = engine.write_txn(Durability::None, |w, _| {
        let extra: Vec<Oid> = gc
            .extra
            .lock()
            .as_mut()
            .map(|e| e.drain().collect())
            .unwrap_or_default();
        let mut records = w.open_table(RECORDS)?;
        // Protect whatever commits since the start reach, in the current state.
        let todo: Vec<u64> = extra
            .into_iter()
            .map(|o| o.0)
            .filter(|&o| !marked.contains(o))
            .collect();
        mark_reachable(&records, marked, todo)?;
        // The candidate set: forward closure of the seeds among unmarked records.
        let mut members: HashMap<u64, (Vec<u64>, u64)> = HashMap::new();
        'seeds: for &seed in seeds {
            let mut stack = vec![seed];
            while let Some(oid) = stack.pop() {
                // Any subset is safe to sweep (what is referenced from
                // outside it is kept), so the set stops growing at the limit
                // or as soon as a committer waits for the writer.
                if members.len() >= limit || (!members.is_empty() && engine.committers_waiting()) {
                    break 'seeds;
                }
                if marked.contains(oid) || members.contains_key(&oid) {
                    continue;
                }
                let Some(v) = records.get(oid)? else { continue };
                let refs: Vec<u64> = refs_of(v.value())
                    .map_err(|e| corrupt(Oid(oid), e))?
                    .map(|o| o.0)
                    .collect();
                let len = v.value().len() as u64;
                drop(v);
                stack.extend(
                    refs.iter()
                        .copied()
                        .filter(|r| !marked.contains(*r) && !members.contains_key(r)),
                );
                members.insert(oid, (refs, len));
            }
        }
        // Keep every member referenced from outside the set, transitively.
        let mut inner: HashMap<u64, u64> = HashMap::new();
        for (refs, _) in members.values() {
            for r in refs {
                if members.contains_key(r) {
                    *inner.entry(*r).or_default() += 1;
                }
            }
        }
        let mut kept: HashSet<u64> = HashSet::new();
        let mut outside = Vec::new();
        {
            let counts = w.open_table(REFCOUNTS)?;
            for &oid in members.keys() {
                let count = counts.get(oid)?.map(|c| c.value()).unwrap_or(0);
                if count != inner.get(&oid).copied().unwrap_or(0) {
                    outside.push(oid);
                }
            }
        }
        {
            // What a placed commit needs is kept as if referenced from
            // outside, and what is swept is doomed until this transaction
            // is over, under one hold of the pins.
            let mut pins = engine.pins.lock();
            outside.extend(members.keys().copied().filter(|&o| pins.is_pinned(o)));
            while let Some(oid) = outside.pop() {
                if !kept.insert(oid) {
                    continue;
                }
                if let Some((refs, _)) = members.get(&oid) {
                    outside.extend(
                        refs.iter()
                            .copied()
                            .filter(|r| members.contains_key(r) && !kept.contains(r)),
                    );
                }
            }
            for &oid in members.keys().filter(|o| !kept.contains(o)) {
                pins.doom(oid);
                doomed.1.push(oid);
            }
        }
        // Delete the rest; release what it referenced outside the set.
        let mut delta: HashMap<u64, i64> = HashMap::new();
        let mut removed = Vec::new();
        let mut bytes = 0u64;
        for (&oid, (refs, len)) in &members {
            if kept.contains(&oid) {
                continue;
            }
            records.remove(oid)?;
            bytes += len;
            removed.push(Oid(oid));
            for r in refs {
                if !members.contains_key(r) || kept.contains(r) {
                    *delta.entry(*r).or_default() -= 1;
                }
            }
        }
        drop(records);
        if apply_ref_deltas(w, delta, now_unix_ms())? > 0 {
            gc.queue_grew();
        }
        forget(w, &removed)?;
        removed.sort_unstable();
        Ok((removed, bytes))
    });
    drop(doomed);
    swept
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::ops::ControlFlow;
    use std::sync::Arc;
    use std::time::Duration;

    use crate::engine::{Engine, Placed};
    use crate::gc::{GcShared, IncrementalGc};
    use crate::record::{Oid, Record};

    /// A full collection spares a cycle that a commit placed in line takes
    /// back (and the commit applies in its turn), and sweeps it once it is
    /// let go again.
    #[test]
    fn a_sweep_spares_a_cycle_that_a_placed_commit_takes_back() {
        let (_dir, engine) = crate::engine::open_temp();
        let (a, _) = engine.register_session();
        let oids = engine.allocate(a, 3).unwrap();
        let (root, x, y) = (oids[0], oids[1], oids[2]);
        let rec = |oid: Oid, refs: &[Oid]| (oid, Record::new(oid, b"r", refs));
        let commit = |records: Vec<(Oid, Record)>| {
            engine
                .commit(a, &records.into_iter().collect::<BTreeMap<_, _>>())
                .unwrap()
        };
        // x and y reference each other: once the root lets go, only a full
        // collection takes them.
        commit(vec![rec(root, &[x]), rec(x, &[y]), rec(y, &[x])]);
        commit(vec![rec(root, &[])]);
        let gc = GcShared::new(Arc::new(IncrementalGc::default()));
        let full = |engine: &Engine| {
            super::run(engine, &gc, 100, Duration::ZERO, &mut |_| {
                ControlFlow::Continue(())
            })
            .unwrap()
        };
        let placed = engine
            .lock_order()
            .place(a, BTreeMap::from([rec(root, &[x])]));
        let Placed::Turn(turn) = placed else {
            panic!("a valid commit gets a turn")
        };
        let report = full(&engine);
        assert_eq!(report.removed_objects, 0, "a pinned cycle was swept");
        engine.finish(turn.apply().unwrap()).unwrap();
        assert!(engine.load(x).is_ok() && engine.load(y).is_ok());
        commit(vec![rec(root, &[])]);
        assert_eq!(full(&engine).removed_objects, 2);
        assert!(engine.load(y).is_err());
    }
}
