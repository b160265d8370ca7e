//! The redb store behind the server's seam ([`crate::backend::Backend`]).

use std::collections::BTreeMap;
use std::ops::ControlFlow;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::RedbStorage;
use crate::backend::{self, Entry, Found, Grant, Hold, LiveState, PoisonWatch, Standing, Walk};
use crate::engine::{
    self, Engine, OrderEntry, OrderGuard, Placed, QueuedOrder, SessionId, SessionRef,
};
use crate::error::{Result, StorageError};
use crate::gc::FullReport;
use crate::record::{Oid, Record};

/// How old a count of the collector's waiting queue the live state may
/// report: counting walks the waiting part of the queue, so scrapes reuse
/// a recent count and stay cheap however long the queue.
const WAITING_RECOUNT: Duration = Duration::from_secs(5);

/// An open redb store, served.
pub(crate) struct RedbBackend {
    /// Keeps the store open; not a session itself (no invalidation is ever
    /// added to it). The pack's sessions come from it.
    store: RedbStorage,
    /// The last count of the collector's waiting queue, and when it was made.
    waiting_count: Mutex<Option<(Instant, u64)>>,
}

impl RedbBackend {
    /// Serves the store `store` is a session of; keeps it open while it lives.
    pub(crate) fn new(store: &RedbStorage) -> RedbBackend {
        RedbBackend {
            store: store.session_maker(),
            waiting_count: Mutex::new(None),
        }
    }

    fn engine(&self) -> &Engine {
        self.store.engine()
    }

    fn gc_waiting(&self) -> Result<u64> {
        let mut cached = self.waiting_count.lock();
        if let Some((at, n)) = *cached
            && at.elapsed() < WAITING_RECOUNT
        {
            return Ok(n);
        }
        let n = self.store.gc_waiting(self.store.gc_policy_grace())?;
        *cached = Some((Instant::now(), n));
        Ok(n)
    }
}

/// An engine walk stopped by its callback, or failed.
enum Stop {
    Asked,
    Failed(StorageError),
}

impl From<StorageError> for Stop {
    fn from(e: StorageError) -> Stop {
        Stop::Failed(e)
    }
}

fn go_on(more: bool) -> std::result::Result<(), Stop> {
    if more { Ok(()) } else { Err(Stop::Asked) }
}

fn settle(r: std::result::Result<(), Stop>) -> Result<()> {
    match r {
        Ok(()) | Err(Stop::Asked) => Ok(()),
        Err(Stop::Failed(e)) => Err(e),
    }
}

impl backend::Backend for RedbBackend {
    fn open_session(&self) -> Box<dyn backend::Session + '_> {
        let engine = self.engine();
        let (id, state) = engine.register_session();
        Box::new(RedbSession { engine, id, state })
    }

    fn live_state(&self) -> Result<LiveState> {
        let engine = self.engine();
        let gc = self.store.gc_state_uncounted()?;
        let gcs = self.store.gc_stats();
        let (not_durable, since_checkpoint) = engine.durability_lag();
        let (held, oldest) = engine.snapshots_held();
        Ok(LiveState {
            healthy: engine.poisoned_reason().is_none(),
            objects: engine.object_count()?,
            file_bytes: std::fs::metadata(engine.path()).map_or(0, |m| m.len()),
            snapshots_held: held,
            snapshot_oldest: oldest,
            order_waiting: engine.order_waiting() as u64,
            commits_not_durable: not_durable,
            since_checkpoint,
            gc_queue: gc.queue_len,
            gc_waiting: self.gc_waiting()?,
            gc_oldest: gc.oldest_queued,
            gc_full_running: gc.full_pending,
            gc_removed_incremental: gcs.incremental_removed,
            gc_removed_full: gcs.full_removed,
            gc_full_collections: gcs.full_collections,
        })
    }

    fn full_collection(&self, stop: &mut dyn FnMut() -> bool) -> Result<FullReport> {
        let session = self.store.new_session();
        session.full_collection(&mut |_| {
            if stop() {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        })
    }

    fn watch_poison(&self, watch: PoisonWatch) {
        self.engine().watch_poison(watch);
    }

    fn hold_commits(&self) -> Box<dyn Hold + '_> {
        let engine = self.engine();
        let order = engine.lock_order();
        engine.await_turns(engine.turns_ordered());
        Box::new(order)
    }

    fn close(&self) -> Result<()> {
        self.engine().close()
    }
}

/// A client's session on the engine; unregistered when dropped.
struct RedbSession<'a> {
    engine: &'a Engine,
    id: SessionId,
    state: SessionRef,
}

impl Drop for RedbSession<'_> {
    fn drop(&mut self) {
        self.engine.unregister_session(self.id);
    }
}

impl backend::Session for RedbSession<'_> {
    fn sync(&self) -> Vec<Oid> {
        self.engine.take_invalid(self.id, &self.state, None)
    }

    fn sync_to_snapshot(&self) -> Result<(Vec<Oid>, Box<dyn backend::Snapshot>)> {
        let (oids, snapshot) = self.engine.sync_to_snapshot(self.id, &self.state)?;
        Ok((oids, Box::new(snapshot)))
    }

    fn snapshot(&self) -> Result<Box<dyn backend::Snapshot>> {
        Ok(Box::new(self.engine.snapshot()?))
    }

    fn invalid_flags(&self, oids: &[Oid]) -> Vec<bool> {
        self.engine.invalid_flags(self.id, &self.state, oids)
    }

    fn load(&self, oids: &[Oid], each: &mut dyn FnMut(Found<'_>) -> bool) -> Result<()> {
        settle(self.engine.load_for(
            self.id,
            &self.state,
            oids,
            |found| -> std::result::Result<(), Stop> {
                go_on(each(match found {
                    engine::Found::Invalid => Found::Invalid,
                    engine::Found::Record(b) => Found::Record(b),
                    engine::Found::Missing => Found::Missing,
                }))
            },
        ))
    }

    fn new_oids(&self, n: usize, cap: u64) -> Result<Vec<Oid>> {
        self.engine.allocate_capped(self.id, n, cap)
    }

    fn backup(&self, each: &mut dyn FnMut(Walk<'_>) -> bool) -> Result<()> {
        self.engine.await_session(&self.state);
        settle(
            self.engine
                .each_record(|item| -> std::result::Result<(), Stop> {
                    go_on(each(match item {
                        engine::Walk::Count(n) => Walk::Count(n),
                        engine::Walk::Record(b) => Walk::Record(b),
                    }))
                }),
        )
    }

    fn enter_order(&self, grant: &mut dyn FnMut() -> Grant) -> Entry<'_> {
        let (id, engine) = (self.id, self.engine);
        let engine_grant = || -> engine::Grant {
            let send = grant();
            let state = self.state.clone();
            Box::new(move |engine: &Engine| send(&engine.take_invalid(id, &state, None)))
        };
        match engine.enter_order(engine_grant) {
            OrderEntry::Now(guard) => Entry::Now(Box::new(RedbOrder { guard, id, engine })),
            OrderEntry::Queued(place) => Entry::Queued(Box::new(RedbQueued { place, id, engine })),
        }
    }
}

struct RedbQueued<'a> {
    place: QueuedOrder<'a>,
    id: SessionId,
    engine: &'a Engine,
}

impl<'a> backend::Queued<'a> for RedbQueued<'a> {
    fn peek(&self) -> Standing {
        match self.place.peek() {
            engine::Standing::Waiting => Standing::Waiting,
            engine::Standing::Granted(at) => Standing::Granted(at),
            engine::Standing::Failed => Standing::Failed,
        }
    }

    fn wait(self: Box<Self>) -> Option<(Box<dyn backend::Order + 'a>, Instant)> {
        let RedbQueued { place, id, engine } = *self;
        let (guard, at) = place.wait()?;
        Some((Box::new(RedbOrder { guard, id, engine }), at))
    }
}

struct RedbOrder<'a> {
    guard: OrderGuard<'a>,
    id: SessionId,
    engine: &'a Engine,
}

impl backend::Order for RedbOrder<'_> {
    /// Without a snapshot the order is released as soon as the commit has
    /// its turn, so the next client's round trip overlaps this apply. With
    /// one, the apply and the snapshot of the state just after it happen
    /// under the order, so that snapshot is exact.
    fn commit(
        self: Box<Self>,
        records: BTreeMap<Oid, Record>,
        snapshot: bool,
    ) -> (Result<()>, Option<Result<Box<dyn backend::Snapshot>>>) {
        let RedbOrder {
            mut guard,
            id,
            engine,
        } = *self;
        if snapshot {
            let (applied, snapshot) = guard.apply_then(id, &records, |r| {
                (r.is_ok() || r.as_ref().is_err_and(|e| e.is_conflict())).then(|| engine.snapshot())
            });
            drop(guard);
            let snapshot = snapshot.map(|s| s.map(|s| Box::new(s) as Box<dyn backend::Snapshot>));
            (applied.and_then(|t| engine.finish(t)), snapshot)
        } else {
            let applied = match guard.place(id, records) {
                Placed::Turn(turn) => {
                    drop(guard);
                    turn.apply()
                }
                // Applied (or refused) under the order: the next committer
                // need not wait for this one's sync.
                Placed::Applied(applied) => {
                    drop(guard);
                    applied
                }
            };
            (applied.and_then(|t| engine.finish(t)), None)
        }
    }
}

impl backend::Snapshot for engine::Snapshot {
    fn age(&self) -> Duration {
        engine::Snapshot::age(self)
    }

    fn load_each(
        &self,
        oids: &[Oid],
        each: &mut dyn FnMut(Oid, Option<&[u8]>) -> bool,
    ) -> Result<()> {
        settle(engine::Snapshot::load_each(self, oids, |oid, bytes| {
            go_on(each(oid, bytes))
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::Backend;
    use crate::{Options, RedbStorage};

    /// The served store's own handle is not a session: the invalidations
    /// of every commit and collection would otherwise pile up in it for
    /// the life of the server (nothing ever syncs it).
    #[test]
    fn the_served_store_keeps_no_session_of_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let store = RedbStorage::open(dir.path().join("s.redb"), Options::new()).unwrap();
        let engine = store.engine().clone();
        assert_eq!(engine.session_count(), 1, "the store's own handle");
        let backend = RedbBackend::new(&store);
        assert_eq!(engine.session_count(), 1, "serving registered a session");
        let session = backend.open_session();
        assert_eq!(engine.session_count(), 2);
        drop(session);
        assert_eq!(engine.session_count(), 1);
    }
}
