//! The in-memory model behind the server's seam: plain maps under two
//! locks, obviously right, lost when the server stops. It serves the
//! protocol tests and the Python Durus scenarios beside the redb store, so
//! the seam cannot grow anything only one store could answer; and it lets
//! `durus-redb serve --memory` be tried without a file.
//!
//! Lock order: `order` (the commit order), then `state`, then `snapshots`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Mutex, MutexGuard};

use super::{Backend, Entry, Found, Grant, Hold, LiveState, PoisonWatch, Walk};
use crate::error::{InvalidInput, Result};
use crate::gc::FullReport;
use crate::record::{Oid, Record, refs_of};
use crate::storage::{Holder, may_create, next_free_oid, validate_commit};

type Records = BTreeMap<Oid, Arc<[u8]>>;

/// The in-memory store the server serves with `serve --memory`.
#[derive(Default)]
pub(crate) struct MemoryBackend {
    /// The commit order: held from a client's invalidations to its commit.
    order: Mutex<()>,
    state: Mutex<State>,
    /// The snapshots held, each with when it was taken.
    snapshots: Arc<Mutex<HashMap<u64, Instant>>>,
    next_snapshot: AtomicU64,
    /// Committers blocked waiting for `order`.
    order_waiting: AtomicU64,
}

#[derive(Default)]
struct State {
    /// Shared with the snapshots; a commit copies it while one is held.
    records: Arc<Records>,
    next_oid: u64,
    /// Oids handed out and not yet stored, with the session holding each.
    held: HashMap<Oid, u64>,
    sessions: HashMap<u64, SessionData>,
    next_session: u64,
    full_collections: u64,
    removed_full: u64,
}

#[derive(Default)]
struct SessionData {
    /// Changed by others (or collected) since the session's last sync.
    invalid: BTreeSet<Oid>,
    /// How many oids of `held` are this session's.
    held: u64,
}

impl MemoryBackend {
    /// An empty store.
    pub(crate) fn new() -> MemoryBackend {
        MemoryBackend::default()
    }

    fn snapshot_of(&self, records: Arc<Records>) -> Box<dyn super::Snapshot> {
        let id = self.next_snapshot.fetch_add(1, Ordering::Relaxed);
        let taken = Instant::now();
        self.snapshots.lock().insert(id, taken);
        Box::new(MemSnapshot {
            records,
            taken,
            id,
            held: self.snapshots.clone(),
        })
    }
}

impl State {
    /// Tells every session but `by` (all of them for `None`) that `oids`
    /// changed.
    fn publish(&mut self, by: Option<u64>, oids: &[Oid]) {
        for (id, s) in &mut self.sessions {
            if Some(*id) != by {
                s.invalid.extend(oids.iter().copied());
            }
        }
    }

    fn holder(&self, session: u64, oid: Oid) -> Holder {
        match self.held.get(&oid) {
            Some(&s) if s == session => Holder::ThisSession,
            Some(_) => Holder::AnotherSession,
            None => Holder::Nobody,
        }
    }

    /// Validates and applies a commit of `session` (all or nothing).
    fn commit(&mut self, session: u64, records: BTreeMap<Oid, Record>) -> Result<()> {
        let stored = &self.records;
        validate_commit(
            &records,
            |oid| Ok(stored.contains_key(&oid)),
            |oid, present| {
                if present {
                    Ok(())
                } else {
                    may_create(oid, self.holder(session, oid))
                }
            },
        )?;
        let oids: Vec<Oid> = records.keys().copied().collect();
        let map = Arc::make_mut(&mut self.records);
        for (oid, record) in records {
            map.insert(oid, record.into_bytes().into());
        }
        for oid in &oids {
            if let Some(s) = self.held.remove(oid)
                && let Some(data) = self.sessions.get_mut(&s)
            {
                data.held -= 1;
            }
        }
        self.publish(Some(session), &oids);
        Ok(())
    }
}

impl Backend for MemoryBackend {
    fn open_session(&self) -> Box<dyn super::Session + '_> {
        let mut st = self.state.lock();
        st.next_session += 1;
        let id = st.next_session;
        st.sessions.insert(id, SessionData::default());
        Box::new(MemSession { backend: self, id })
    }

    fn live_state(&self) -> Result<LiveState> {
        let st = self.state.lock();
        let snapshots = self.snapshots.lock();
        Ok(LiveState {
            healthy: true,
            objects: st.records.len() as u64,
            snapshots_held: snapshots.len(),
            snapshot_oldest: snapshots.values().min().map(|t| t.elapsed()),
            order_waiting: self.order_waiting.load(Ordering::Acquire),
            gc_removed_full: st.removed_full,
            gc_full_collections: st.full_collections,
            ..LiveState::default()
        })
    }

    /// Removes at once everything the root does not reach (there is no
    /// grace window: as Durus's own pack).
    fn full_collection(&self, _stop: &mut dyn FnMut() -> bool) -> Result<FullReport> {
        let started = Instant::now();
        let mut st = self.state.lock();
        let mut report = FullReport {
            completed: true,
            passes: 1,
            ..FullReport::default()
        };
        if st.records.is_empty() {
            return Ok(report);
        }
        if !st.records.contains_key(&Oid::ROOT) {
            return Err(InvalidInput::NoRoot.into());
        }
        let mut live = BTreeSet::new();
        let mut todo = vec![Oid::ROOT];
        while let Some(oid) = todo.pop() {
            if !live.insert(oid) {
                continue;
            }
            if let Some(bytes) = st.records.get(&oid) {
                // Stored only after validation: always a record.
                let refs = refs_of(bytes).expect("a stored record is well formed");
                todo.extend(refs.filter(|o| !live.contains(o)));
            }
        }
        let dead: Vec<Oid> = st
            .records
            .keys()
            .filter(|o| !live.contains(o))
            .copied()
            .collect();
        let map = Arc::make_mut(&mut st.records);
        for oid in &dead {
            if let Some(bytes) = map.remove(oid) {
                report.removed_bytes += bytes.len() as u64;
            }
        }
        report.removed_objects = dead.len() as u64;
        report.live_objects = live.len() as u64;
        st.publish(None, &dead);
        st.full_collections += 1;
        st.removed_full += report.removed_objects;
        report.elapsed = started.elapsed();
        Ok(report)
    }

    /// Never called: this store never stops taking commits.
    fn watch_poison(&self, _watch: PoisonWatch) {}

    fn hold_commits(&self) -> Box<dyn Hold + '_> {
        Box::new(self.order.lock())
    }

    fn close(&self) -> Result<()> {
        Ok(())
    }
}

/// One client's session.
struct MemSession<'a> {
    backend: &'a MemoryBackend,
    id: u64,
}

impl Drop for MemSession<'_> {
    fn drop(&mut self) {
        let mut st = self.backend.state.lock();
        if st.sessions.remove(&self.id).is_some_and(|s| s.held > 0) {
            st.held.retain(|_, s| *s != self.id);
        }
    }
}

impl MemSession<'_> {
    fn take_invalid(&self, st: &mut State) -> Vec<Oid> {
        st.sessions
            .get_mut(&self.id)
            .map(|s| std::mem::take(&mut s.invalid).into_iter().collect())
            .unwrap_or_default()
    }
}

impl super::Session for MemSession<'_> {
    fn sync(&self) -> Vec<Oid> {
        self.take_invalid(&mut self.backend.state.lock())
    }

    fn sync_to_snapshot(&self) -> Result<(Vec<Oid>, Box<dyn super::Snapshot>)> {
        let mut st = self.backend.state.lock();
        let oids = self.take_invalid(&mut st);
        Ok((oids, self.backend.snapshot_of(st.records.clone())))
    }

    fn snapshot(&self) -> Result<Box<dyn super::Snapshot>> {
        let records = self.backend.state.lock().records.clone();
        Ok(self.backend.snapshot_of(records))
    }

    fn invalid_flags(&self, oids: &[Oid]) -> Vec<bool> {
        let st = self.backend.state.lock();
        let invalid = st.sessions.get(&self.id).map(|s| &s.invalid);
        oids.iter()
            .map(|o| invalid.is_some_and(|i| i.contains(o)))
            .collect()
    }

    fn load(&self, oids: &[Oid], each: &mut dyn FnMut(Found<'_>) -> bool) -> Result<()> {
        // Read under the lock, answered after it (answers go to a socket).
        let answers: Vec<Option<Option<Arc<[u8]>>>> = {
            let st = self.backend.state.lock();
            let invalid = st.sessions.get(&self.id).map(|s| &s.invalid);
            oids.iter()
                .map(|o| {
                    if invalid.is_some_and(|i| i.contains(o)) {
                        None
                    } else {
                        Some(st.records.get(o).cloned())
                    }
                })
                .collect()
        };
        for answer in &answers {
            let found = match answer {
                None => Found::Invalid,
                Some(Some(bytes)) => Found::Record(bytes),
                Some(None) => Found::Missing,
            };
            if !each(found) {
                break;
            }
        }
        Ok(())
    }

    fn new_oids(&self, n: usize, cap: u64) -> Result<Vec<Oid>> {
        let mut st = self.backend.state.lock();
        let held = st.sessions.get(&self.id).map_or(0, |s| s.held);
        let asked = n as u64;
        if held.saturating_add(asked) > cap {
            return Err(InvalidInput::TooManyOidsHeld { held, asked, cap }.into());
        }
        let mut oids = Vec::with_capacity(n);
        for _ in 0..n {
            let records = &st.records;
            st.next_oid = next_free_oid(st.next_oid, || Ok(records.contains_key(&Oid::ROOT)))?;
            let oid = Oid(st.next_oid);
            st.next_oid += 1;
            st.held.insert(oid, self.id);
            oids.push(oid);
        }
        if let Some(s) = st.sessions.get_mut(&self.id) {
            s.held += asked;
        }
        Ok(oids)
    }

    fn backup(&self, each: &mut dyn FnMut(Walk<'_>) -> bool) -> Result<()> {
        let records = self.backend.state.lock().records.clone();
        if !each(Walk::Count(records.len() as u64)) {
            return Ok(());
        }
        for bytes in records.values() {
            if !each(Walk::Record(bytes)) {
                break;
            }
        }
        Ok(())
    }

    /// Blocks until the order is free: no queue, no grant.
    fn enter_order(&self, _grant: &mut dyn FnMut() -> Grant) -> Entry<'_> {
        let order = self.backend.order.try_lock().unwrap_or_else(|| {
            let waiting = &self.backend.order_waiting;
            waiting.fetch_add(1, Ordering::AcqRel);
            let order = self.backend.order.lock();
            waiting.fetch_sub(1, Ordering::AcqRel);
            order
        });
        Entry::Now(Box::new(MemOrder {
            session: self,
            _order: order,
        }))
    }
}

struct MemOrder<'a> {
    session: &'a MemSession<'a>,
    _order: MutexGuard<'a, ()>,
}

impl super::Order for MemOrder<'_> {
    fn commit(
        self: Box<Self>,
        records: BTreeMap<Oid, Record>,
        snapshot: bool,
    ) -> (Result<()>, Option<Result<Box<dyn super::Snapshot>>>) {
        let backend = self.session.backend;
        let mut st = backend.state.lock();
        let result = st.commit(self.session.id, records);
        let snapshot = (snapshot
            && (result.is_ok() || result.as_ref().is_err_and(|e| e.is_conflict())))
        .then(|| Ok(backend.snapshot_of(st.records.clone())));
        (result, snapshot)
    }
}

struct MemSnapshot {
    records: Arc<Records>,
    taken: Instant,
    id: u64,
    held: Arc<Mutex<HashMap<u64, Instant>>>,
}

impl Drop for MemSnapshot {
    fn drop(&mut self) {
        self.held.lock().remove(&self.id);
    }
}

impl super::Snapshot for MemSnapshot {
    fn age(&self) -> Duration {
        self.taken.elapsed()
    }

    fn load_each(
        &self,
        oids: &[Oid],
        each: &mut dyn FnMut(Oid, Option<&[u8]>) -> bool,
    ) -> Result<()> {
        for &oid in oids {
            if !each(oid, self.records.get(&oid).map(|b| &b[..])) {
                break;
            }
        }
        Ok(())
    }
}
