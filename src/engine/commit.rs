//! The commit path: the commit order (turns, and the line of checked
//! commits waiting to be applied), the commit lock, validation inside the
//! write transaction, and the apply of one commit with its reference counts.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use parking_lot::MutexGuard;
use redb::{Durability, ReadableTable, WriteTransaction};

use super::layout::{KEY_APPLIED, LOG_STATE, RECORDS, now_unix_ms};
use super::order::{Entry, Grant, Held, Place, Standing};
use super::refcount::{Deleted, apply_ref_deltas, corrupt};
use super::{Engine, SessionId};
use crate::checkpoint::{CheckpointFacts, Durability as Mode};
use crate::error::{Conflict, Result, StorageError};
use crate::record::{Oid, Record, refs_of_validated};

/// State guarded by the commit lock: everything a commit reads or changes
/// outside redb.
pub(crate) struct CommitState {
    pub(super) next_oid: u64,
    pub(super) reserved: u64,
    /// Commits and record bytes since the last checkpoint began.
    pub(super) commits_since: u64,
    pub(super) bytes_since: u64,
    pub(super) last_checkpoint: Instant,
    /// redb write transactions committed since open (commits, the
    /// collector's, imports').
    pub(super) applied_seq: u64,
    /// Sequence number of the last commit (the log's numbering, persisted
    /// in the file with each logged commit).
    pub(super) log_seq: u64,
    /// Turns of the commit order finished (applied or refused).
    pub(super) turns_done: u64,
    /// A collector transaction cut short for a waiting committer and left
    /// open for it (see [`Engine::deletion_txn`]).
    pub(super) parked: Option<Parked>,
}

/// A collector transaction that deleted `deleted` (its oids doomed), not
/// committed: the next commit applies its records in it and commits both
/// at once, so the committer that cut the deletion short does not wait for
/// a commit of its own (only a commit expected to pass: see [`Carry`]).
/// Whoever else next needs redb's writer commits it first
/// ([`Engine::settle_parked`]).
pub(crate) struct Parked {
    w: WriteTransaction,
    deleted: Deleted,
}

/// Oids handed out and not yet stored (under their own lock, so that a
/// commit can be checked without the commit lock).
#[derive(Default)]
pub(crate) struct Allocations {
    /// Each oid with the session that holds it.
    pub(super) by_oid: HashMap<Oid, SessionId>,
    /// How many of `by_oid` each session holds.
    pub(super) by_session: HashMap<SessionId, u64>,
}

impl Allocations {
    /// Whether `session` may store `oid`, which is not stored yet: the
    /// session was handed it, or it is the root and no other session was
    /// handed it (as Durus's server, which drops a client that stores an
    /// oid another client holds).
    pub(super) fn may_create(&self, session: SessionId, oid: Oid) -> Result<()> {
        use crate::storage::Holder;
        let holder = match self.by_oid.get(&oid) {
            Some(&s) if s == session => Holder::ThisSession,
            Some(_) => Holder::AnotherSession,
            None => Holder::Nobody,
        };
        crate::storage::may_create(oid, holder)
    }
}

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
    sets: parking_lot::Mutex<PinSets>,
}

/// The sets of [`Pins`], under its lock.
#[derive(Default)]
pub(crate) struct PinSets {
    /// How many placed commits need each oid.
    pinned: HashMap<u64, u32>,
    /// Oids a collector transaction not yet committed is deleting.
    doomed: std::collections::HashSet<u64>,
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
    pub(crate) fn lock(&self) -> parking_lot::MutexGuard<'_, PinSets> {
        self.sets.lock()
    }

    /// Pins `oids`; false if one of them is being deleted (they are pinned
    /// all the same: [`unpin`](Self::unpin) them).
    fn pin(&self, oids: &[u64]) -> bool {
        let mut sets = self.sets.lock();
        let mut clear = true;
        for &oid in oids {
            *sets.pinned.entry(oid).or_default() += 1;
            clear &= !sets.doomed.contains(&oid);
        }
        clear
    }

    fn unpin(&self, oids: &[u64]) {
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
fn pin_list(records: &BTreeMap<Oid, Record>) -> Vec<u64> {
    let mut oids: Vec<u64> = records.keys().map(|o| o.0).collect();
    for r in records.values() {
        oids.extend(r.refs().map(|o| o.0));
    }
    oids.sort_unstable();
    oids.dedup();
    oids
}

impl CommitState {
    pub(super) fn facts(&self) -> CheckpointFacts {
        CheckpointFacts {
            commits_since_checkpoint: self.commits_since,
            bytes_since_checkpoint: self.bytes_since,
            since_checkpoint: self.last_checkpoint.elapsed(),
        }
    }
}

/// The result of applying a commit: what remains to make it durable.
#[derive(Debug, Clone, Copy)]
#[must_use = "a commit is acknowledged only after Engine::finish"]
pub(crate) struct CommitTicket {
    /// The commit's sequence number.
    pub(super) seq: u64,
    /// Wait for the log to be durable up to `seq`.
    pub(super) wait: bool,
    /// The checkpoint policy asks for a checkpoint.
    pub(super) checkpoint: bool,
}

/// Condition variables the turns' waits are spread over.
pub(super) const TURN_SLOTS: usize = 64;

/// The commit order, held (see [`Engine::lock_order`]).
pub(crate) struct OrderGuard<'a> {
    engine: &'a Engine,
    _order: Held<'a>,
}

/// What [`Engine::enter_order`] gives.
pub(crate) enum OrderEntry<'a> {
    /// The order was free and is held now; the grant was not run.
    Now(OrderGuard<'a>),
    /// Another holds the order; the grant runs as it is handed over.
    Queued(QueuedOrder<'a>),
}

/// A place in the commit order's queue, not yet served; given up (or the
/// order given back, if it was granted meanwhile) when dropped.
pub(crate) struct QueuedOrder<'a>(Place<'a>);

impl<'a> QueuedOrder<'a> {
    /// How the place stands now, without waiting.
    pub(crate) fn peek(&self) -> Standing {
        self.0.peek()
    }

    /// Waits until the place is served: the order, and when its grant
    /// ended; `None` if the grant failed.
    pub(crate) fn wait(self) -> Option<(OrderGuard<'a>, Instant)> {
        let engine = self.0.engine();
        self.0.wait().map(|(held, at)| {
            (
                OrderGuard {
                    engine,
                    _order: held,
                },
                at,
            )
        })
    }
}

/// A commit's place in the commit order. [`Turn::apply`] applies it once
/// every earlier turn has finished; a turn dropped unapplied is applied
/// all the same (its oids were published), so the turns after it go on.
#[must_use = "a turn holds up every later commit until it is applied or dropped"]
pub(crate) struct Turn<'a> {
    engine: &'a Engine,
    n: u64,
    done: bool,
}

impl Engine {
    /// Whether a committer is waiting for the commit lock (the collector
    /// then cuts its step short).
    pub(crate) fn committers_waiting(&self) -> bool {
        self.committers_waiting.load(Ordering::Acquire) > 0
    }

    /// Lets committers waiting for the writer go first (for a few
    /// milliseconds at most), before a collector transaction.
    pub(crate) fn yield_to_committers(&self) {
        let deadline = Instant::now() + std::time::Duration::from_millis(5);
        while self.committers_waiting() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_micros(50));
        }
    }

    /// Takes the commit order. The server holds it from sending a client its
    /// invalidations until that client's commit has its turn, so no other
    /// commit falls between what the client was told and its own.
    pub(crate) fn lock_order(&self) -> OrderGuard<'_> {
        OrderGuard {
            engine: self,
            _order: self.order.lock(self),
        }
    }

    /// Takes the commit order if it is free; otherwise queues for it, and
    /// whoever hands it over runs the grant `grant` makes (made only then)
    /// first, on this waiter's behalf
    /// (the server sends the waiting client its invalidations there, so
    /// the waiting thread is woken once, by its client's answer).
    pub(crate) fn enter_order(&self, grant: impl FnOnce() -> Grant) -> OrderEntry<'_> {
        match self.order.enter(self, grant) {
            Entry::Now(held) => OrderEntry::Now(OrderGuard {
                engine: self,
                _order: held,
            }),
            Entry::Queued(q) => OrderEntry::Queued(QueuedOrder(q)),
        }
    }

    /// Takes the commit lock (the state every apply changes), counting the
    /// wait so that the collector makes way.
    fn lock_state(&self) -> MutexGuard<'_, CommitState> {
        self.committers_waiting.fetch_add(1, Ordering::AcqRel);
        let state = self.commit.lock();
        self.committers_waiting.fetch_sub(1, Ordering::AcqRel);
        state
    }

    /// Turns handed out so far.
    pub(crate) fn turns_ordered(&self) -> u64 {
        self.ordered.load(Ordering::Acquire)
    }

    /// Waits until every turn up to `n` has finished: a session told of a
    /// commit's changes reads nothing older than that commit.
    pub(crate) fn await_turns(&self, n: u64) {
        if self.turns_done.load(Ordering::Acquire) >= n {
            return;
        }
        let mut st = self.commit.lock();
        self.wait_turns(&mut st, n);
    }

    /// Commits `records` for `session` and returns once it is as durable as
    /// the store's durability mode promises.
    pub(crate) fn commit(&self, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<()> {
        let (ticket, ()) = self.lock_order().apply_then(session, records, |_| ());
        self.finish(ticket?)
    }

    /// [`commit`](Self::commit), and a snapshot of the state just after it
    /// (taken under the commit lock, so it holds nothing committed later).
    pub(crate) fn commit_and_snapshot(
        &self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
    ) -> Result<super::Snapshot> {
        let (ticket, snapshot) = self
            .lock_order()
            .apply_then(session, records, |r| r.is_ok().then(|| self.snapshot()));
        self.finish(ticket?)?;
        snapshot.expect("a snapshot follows every applied commit")
    }

    /// Runs `f` in a write transaction under the commit lock with the given
    /// durability; `f` also gets the oid allocation mark. A failure of the
    /// commit poisons the store.
    pub(crate) fn write_txn<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, u64) -> Result<T>,
    ) -> Result<T> {
        self.write_txn_state(durability, |w, st| f(w, st.next_oid))
    }

    /// [`write_txn`](Self::write_txn) with the commit state (engine-internal).
    pub(super) fn write_txn_state<T>(
        &self,
        durability: Durability,
        f: impl FnOnce(&WriteTransaction, &mut CommitState) -> Result<T>,
    ) -> Result<T> {
        self.check_writable()?;
        let mut guard = self.lock_state();
        let st = &mut *guard;
        let w = self.begin_locked(st, durability)?;
        let value = match f(&w, st) {
            Ok(v) => v,
            Err(e) => {
                drop(w);
                return Err(e);
            }
        };
        self.commit_locked(st, w)?;
        if matches!(durability, Durability::Immediate) {
            // Every commit before it is durable in the file with it.
            self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
            self.log_durable.fetch_max(st.log_seq, Ordering::AcqRel);
        }
        Ok(value)
    }

    /// A collector deletion in a `Durability::None` write transaction under
    /// the commit lock: `f` deletes (dooming what it deletes). If `f` was
    /// cut short for a waiting committer and `hand_over`, the transaction
    /// is left open for that committer instead of committed (true), and
    /// the deletion's effects ([`Engine::deletion_committed`]) follow that
    /// commit. Otherwise it is committed here and the caller sees to those
    /// effects (false).
    pub(crate) fn deletion_txn(
        &self,
        f: impl FnOnce(&WriteTransaction) -> Result<Deleted>,
        hand_over: bool,
    ) -> Result<(Deleted, bool)> {
        self.check_writable()?;
        let mut st = self.lock_state();
        let w = self.begin_locked(&mut st, Durability::None)?;
        let deleted = f(&w)?;
        // What it doomed stays doomed until its transaction is over.
        let mut doomed = Undoom(&self.pins, deleted.oids.iter().map(|o| o.0).collect());
        if hand_over && deleted.cut && !deleted.oids.is_empty() {
            doomed.1.clear();
            st.parked = Some(Parked {
                w,
                deleted: deleted.clone(),
            });
            return Ok((deleted, true));
        }
        self.commit_locked(&mut st, w)?;
        Ok((deleted, false))
    }

    /// Begins a write transaction under the commit lock, once a parked
    /// deletion is committed (redb has one writer).
    fn begin_locked(
        &self,
        st: &mut CommitState,
        durability: Durability,
    ) -> Result<WriteTransaction> {
        self.settle_parked(st)?;
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_durability(durability)?;
        w.set_quick_repair(self.quick_repair);
        Ok(w)
    }

    /// Commits `w` under the commit lock; a failure poisons the store.
    fn commit_locked(&self, st: &mut CommitState, w: WriteTransaction) -> Result<()> {
        let r = w.commit().map_err(StorageError::from);
        self.poisoning(r)?;
        st.applied_seq += 1;
        Ok(())
    }

    /// Commits the parked collector transaction, if any (before another
    /// write transaction begins: redb has one writer). A store that is not
    /// writable any more drops it instead.
    pub(super) fn settle_parked(&self, st: &mut CommitState) -> Result<()> {
        let Some(Parked { w, deleted }) = st.parked.take() else {
            return Ok(());
        };
        let _undoom = Undoom(&self.pins, deleted.oids.iter().map(|o| o.0).collect());
        self.check_writable()?;
        self.commit_locked(st, w)?;
        self.deletion_committed(&deleted);
        Ok(())
    }

    /// What follows the commit of a collector deletion: every session is
    /// told of the deleted oids, and the collector of what it learnt.
    pub(crate) fn deletion_committed(&self, deleted: &Deleted) {
        self.publish_changes(None, &deleted.oids);
        if let Some(h) = self.hook.get() {
            h.deletion_committed(deleted);
        }
    }

    /// Marks turn `n` finished and wakes whoever waits for it.
    fn end_turn(&self, st: &mut CommitState, n: u64) {
        st.turns_done = n;
        self.turns_done.store(n, Ordering::Release);
        self.turn[n as usize % TURN_SLOTS].notify_all();
    }

    /// Waits (on the commit lock) until every turn up to `n` has finished.
    /// Each wait is on the slot of the turn it waits for, so finishing a
    /// turn wakes only whoever waits for that one (its successor), not
    /// every committer in line.
    fn wait_turns(&self, st: &mut MutexGuard<'_, CommitState>, n: u64) {
        while st.turns_done < n {
            self.turn[n as usize % TURN_SLOTS].wait(st);
        }
    }
}

impl<'a> OrderGuard<'a> {
    fn take_turn(&mut self) -> Turn<'a> {
        let n = self.engine.ordered.load(Ordering::Acquire) + 1;
        self.engine.ordered.store(n, Ordering::Release);
        Turn {
            engine: self.engine,
            n,
            done: false,
        }
    }

    /// Applies a commit of `session` now, in its turn, with the order held
    /// throughout: its changes are published as they become visible, so a
    /// snapshot is exact. `after` runs under the commit lock right after
    /// the apply, with its result (a snapshot of the state just after it).
    pub(crate) fn apply_then<T>(
        &mut self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
        after: impl FnOnce(&Result<CommitTicket>) -> T,
    ) -> (Result<CommitTicket>, T) {
        self.take_turn()
            .run(session, records, Carry::IfClean, after)
    }

    /// Places a commit of `session` in the order. If it passes validation
    /// against the state applied so far, it gets the next turn and its oids
    /// are published as changed now, before it is applied: whoever takes
    /// the order next is told of them. It is applied with [`Turn::apply`]
    /// after the guard is dropped, so the next client's round trip overlaps
    /// the apply; a session told of the change waits for the turn before it
    /// reads ([`Engine::await_turns`]). A commit that does not pass is
    /// applied now, under the order, and refused as it would be in turn:
    /// a refused commit publishes nothing.
    ///
    /// Turns waiting to be applied only add and change records, and the
    /// collector deletes nothing a placed commit pins ([`Pins`]), so a
    /// commit that passes here passes in its turn. (Only a store imported
    /// with `--allow-dangling` can differ: a record that kept a dangling
    /// reference, rewritten without it by an earlier turn, makes the
    /// reference new again; the commit is then refused in its turn, its
    /// oids published for nothing.)
    pub(crate) fn place(
        &mut self,
        session: SessionId,
        records: BTreeMap<Oid, Record>,
    ) -> Placed<'a> {
        let pinned = pin_list(&records);
        if records.is_empty() || !pin_and_pass(self.engine, session, &records, &pinned) {
            self.engine.pins.unpin(&pinned);
            let turn = self.take_turn();
            return Placed::Applied(turn.run(session, &records, Carry::No, |_| ()).0);
        }
        let turn = self.take_turn();
        let oids: Vec<Oid> = records.keys().copied().collect();
        // Published before it is in the line: from there another committer
        // may apply it at once, and a load must never see it unpublished.
        self.engine.publish_changes(Some(session), &oids);
        self.engine.line.lock().queue.push_back(Queued {
            n: turn.n,
            session,
            records,
            pinned,
        });
        #[cfg(test)]
        if let Some(f) = self.engine.on_lined.get() {
            f(self.engine);
        }
        Placed::Turn(turn)
    }
}

/// The error a committer gets when the apply of its commit panicked.
fn apply_panicked() -> StorageError {
    StorageError::Poisoned {
        reason: "a commit's apply panicked".into(),
    }
}

/// A placed commit waiting for its turn.
struct Queued {
    n: u64,
    session: SessionId,
    records: BTreeMap<Oid, Record>,
    /// What it pins until it is applied.
    pinned: Vec<u64>,
}

/// The commits placed and not yet applied, in turn order, and the results
/// of those applied and not yet collected by their committers.
#[derive(Default)]
pub(crate) struct Line {
    queue: std::collections::VecDeque<Queued>,
    results: HashMap<u64, Result<CommitTicket>>,
    /// A committer is applying the line.
    combining: bool,
}

/// How many commits after its own a committer applies before it hands the
/// line on (bounds the delay of its own answer).
const COMBINE_MORE: u32 = 4;

/// How many commits of the line are applied together, in one redb write
/// transaction, at most.
const APPLY_TOGETHER: usize = 8;

/// How long a committer whose commit waits in line (applied by another
/// committer, or after a turn not in the line) waits for it without
/// sleeping, yielding its core to any other thread that can run, before it
/// sleeps on the line's condition variable: an apply of a small commit
/// takes less than sleeping and being woken (two thread switches). Not
/// with `Durability::Fsync`, where the spin for the log's syncs serves.
/// Measured, with the values tried: docs/benchmarks.md (`LINE_SPIN`).
const LINE_SPIN: std::time::Duration = std::time::Duration::from_micros(100);

/// Where [`OrderGuard::place`] put a commit.
#[must_use]
pub(crate) enum Placed<'a> {
    /// In line: wait for it with [`Turn::apply`] once the order is released.
    Turn(Turn<'a>),
    /// Applied already (or refused).
    Applied(Result<CommitTicket>),
}

/// Whether `record` references other oids than the stored bytes `old` of
/// `oid` (a corrupt record is an error); if so, `old`'s references are
/// added to `out`. Byte-equal references (most rewrites) are not parsed.
fn changed_refs(oid: Oid, old: &[u8], record: &Record, out: &mut Vec<Oid>) -> Result<bool> {
    let end = Record::check(old).map_err(|e| corrupt(oid, e))?;
    if old[end..] == *record.refs_bytes() {
        return Ok(false);
    }
    out.extend(refs_of_validated(&old[end..]));
    Ok(true)
}

/// Pins `pinned` (the commit's [`pin_list`]) and validates the commit:
/// false if something it names is being deleted or it does not pass
/// ([`passes`]). The pins are taken either way: unpin them.
fn pin_and_pass(
    engine: &Engine,
    session: SessionId,
    records: &BTreeMap<Oid, Record>,
    pinned: &[u64],
) -> bool {
    engine.pins.pin(pinned) && passes(engine, session, records).unwrap_or(false)
}

/// Whether a commit of `session` passes validation against the state
/// applied so far: each oid is stored, or the session may create it, and
/// each reference its record gains resolves.
fn passes(engine: &Engine, session: SessionId, records: &BTreeMap<Oid, Record>) -> Result<bool> {
    let db = engine.db()?;
    let txn = db.begin_read()?;
    let table = txn.open_table(RECORDS)?;
    let mut old_refs: Vec<Oid> = Vec::new();
    let mut gained: Vec<Oid> = Vec::new();
    for (oid, record) in records {
        old_refs.clear();
        match table.get(oid.0)? {
            Some(v) => {
                if !changed_refs(*oid, v.value(), record, &mut old_refs)? {
                    // The same references: none gained.
                    continue;
                }
            }
            None => {
                if engine.allocs.lock().may_create(session, *oid).is_err() {
                    return Ok(false);
                }
            }
        }
        old_refs.sort_unstable();
        gained.extend(
            record
                .refs()
                .filter(|r| old_refs.binary_search(r).is_err() && !records.contains_key(r)),
        );
    }
    gained.sort_unstable();
    gained.dedup();
    for r in gained {
        if table.get(r.0)?.is_none() {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Turn<'_> {
    /// Waits for the commit's turn: applies it, and the commits in line
    /// after it, if no other committer is applying the line, or waits for
    /// the one that does. Returns its result.
    pub(crate) fn apply(mut self) -> Result<CommitTicket> {
        self.collect()
    }

    fn collect(&mut self) -> Result<CommitTicket> {
        let engine = self.engine;
        self.done = true;
        let mut line = engine.line.lock();
        // Only where commits do not then wait for a sync of the log: with
        // `Fsync` the waits for the syncs spin already (FLUSH_SPIN), and the
        // two together ran slower than either.
        let mut spun = engine.log.is_some() && engine.durability == Mode::Fsync;
        loop {
            if let Some(r) = line.results.remove(&self.n) {
                return r;
            }
            // Apply the line if nobody does and its first commit is next. If
            // a turn not in the line comes first, its thread wakes the line
            // when done (after updating `turns_done`, so this check and
            // that wake-up cannot both miss).
            let done = engine.turns_done.load(Ordering::Acquire);
            if !line.combining && line.queue.front().is_some_and(|q| q.n == done + 1) {
                line.combining = true;
                drop(line);
                engine.combine(self.n);
                line = engine.line.lock();
                continue;
            }
            if !spun {
                // Once, before sleeping: wait without sleeping (see
                // LINE_SPIN) until the result is in or the line is free,
                // then look again under the lock.
                spun = true;
                drop(line);
                super::spin_while(LINE_SPIN, || {
                    let l = engine.line.lock();
                    let done = engine.turns_done.load(Ordering::Acquire);
                    !(l.results.contains_key(&self.n)
                        || (!l.combining && l.queue.front().is_some_and(|q| q.n == done + 1)))
                });
                line = engine.line.lock();
                continue;
            }
            engine.line_cv[self.n as usize % TURN_SLOTS].wait(&mut line);
        }
    }

    /// Applies a commit that is not in the line (under the order), once
    /// every earlier turn has finished.
    fn run<T>(
        mut self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
        carry: Carry,
        after: impl FnOnce(&Result<CommitTicket>) -> T,
    ) -> (Result<CommitTicket>, T) {
        let engine = self.engine;
        self.done = true;
        let mut st = engine.lock_state();
        engine.wait_turns(&mut st, self.n - 1);
        let applied = engine.guarded(|| {
            let r = apply(engine, &mut st, session, records, true, carry);
            let value = after(&r);
            (r, value)
        });
        engine.end_turn(&mut st, self.n);
        // Commits in line after this one wait for it: the line goes on.
        engine.wake_line();
        drop(st);
        applied.unwrap_or_else(|p| std::panic::resume_unwind(p))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        if !self.done {
            // A placed commit was published: it is applied all the same.
            let _ = self.collect();
        }
    }
}

impl Engine {
    /// Applies the line's commits in turn order with the commit lock taken
    /// once (flat combining): a commit in line is applied by whichever
    /// committer in line gets here first, with no thread wake-up between
    /// one apply and the next, and the commits waiting next to each other
    /// (up to [`APPLY_TOGETHER`]) in one redb write transaction and one
    /// write of the log: load generator, 3 s cells alternating with the
    /// build that applied each in its own, 16 connections 13,126 against
    /// 11,638 commits/s (`os`) and 10,292 against 8,726 (`fsync`), means of
    /// three rounds; 4 connections within the noise. Stops once its own commit and at most
    /// [`COMBINE_MORE`] after it are applied, or at a turn not in the line
    /// (its own thread applies it, then wakes the line), or when the line
    /// is empty; the owner of the first commit left then takes over.
    fn combine(&self, own: u64) {
        let mut st = self.lock_state();
        let mut more = 0;
        loop {
            let batch: Vec<Queued> = {
                let mut line = self.line.lock();
                let mut batch = Vec::new();
                while batch.len() < APPLY_TOGETHER {
                    let at = st.turns_done + 1 + batch.len() as u64;
                    if line.queue.front().is_none_or(|q| q.n != at)
                        || (at > own && more >= COMBINE_MORE)
                    {
                        break;
                    }
                    if at > own {
                        more += 1;
                    }
                    batch.extend(line.queue.pop_front());
                }
                if batch.is_empty() {
                    line.combining = false;
                    if let Some(q) = line.queue.front()
                        && q.n == st.turns_done + 1
                    {
                        self.line_cv[q.n as usize % TURN_SLOTS].notify_all();
                    }
                }
                batch
            };
            if batch.is_empty() {
                break;
            }
            let commits: Vec<(SessionId, &BTreeMap<Oid, Record>)> =
                batch.iter().map(|q| (q.session, &q.records)).collect();
            let (results, panicked) = match self.guarded(|| self.apply_line(&mut st, &commits)) {
                Ok(rs) => (rs, None),
                Err(p) => (
                    batch.iter().map(|_| Err(apply_panicked())).collect(),
                    Some(p),
                ),
            };
            for (q, r) in batch.iter().zip(results) {
                self.pins.unpin(&q.pinned);
                self.end_turn(&mut st, q.n);
                self.line.lock().results.insert(q.n, r);
                self.line_cv[q.n as usize % TURN_SLOTS].notify_all();
            }
            if let Some(p) = panicked {
                self.line.lock().combining = false;
                self.wake_line();
                drop(st);
                std::panic::resume_unwind(p);
            }
        }
    }

    /// Applies consecutive commits of the line: together in one redb
    /// transaction, or, if that fails (one is refused), one by one, so
    /// that each gets its own result.
    fn apply_line(
        &self,
        st: &mut CommitState,
        commits: &[(SessionId, &BTreeMap<Oid, Record>)],
    ) -> Vec<Result<CommitTicket>> {
        if let [(session, records)] = commits {
            return vec![apply(self, st, *session, records, false, Carry::Yes)];
        }
        match apply_all(self, st, commits, false, Carry::Yes) {
            Ok(tickets) => tickets.into_iter().map(Ok).collect(),
            Err(_) => commits
                .iter()
                .map(|&(session, records)| apply(self, st, session, records, false, Carry::Yes))
                .collect(),
        }
    }

    /// Runs an apply; a panic in it poisons the store (its state is not
    /// known any more) and is handed back, to be raised again once the
    /// turn is ended, so that no later turn waits for ever.
    fn guarded<R>(&self, f: impl FnOnce() -> R) -> std::thread::Result<R> {
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f));
        if r.is_err() {
            self.poison(&apply_panicked());
        }
        r
    }

    /// Wakes the owner of the first commit in line if nobody applies the
    /// line.
    fn wake_line(&self) {
        let line = self.line.lock();
        if !line.combining
            && let Some(q) = line.queue.front()
        {
            self.line_cv[q.n as usize % TURN_SLOTS].notify_all();
        }
    }
}

/// Whether a commit may carry a collector deletion parked for it
/// ([`Parked`]). A commit refused with the deletion in its transaction
/// undoes the deletion too, so only commits expected to pass carry one:
/// bad input must not undo the collector's work (a client sending commits
/// that are refused would otherwise stop the collector for good).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// Placed in the line: validated and pinned, it passes in its turn.
    Yes,
    /// Refused when it was placed: the deletion is committed on its own
    /// first.
    No,
    /// Not validated yet (the library, snapshot reads): carries it only if
    /// it passes validation and touches nothing the deletion removes.
    IfClean,
}

/// Whether a commit of `session` not yet validated may carry a parked
/// deletion: nothing it writes or references is being deleted, and it
/// passes validation against the state applied so far.
fn clean(engine: &Engine, session: SessionId, records: &BTreeMap<Oid, Record>) -> bool {
    let pinned = pin_list(records);
    let clean = pin_and_pass(engine, session, records, &pinned);
    engine.pins.unpin(&pinned);
    clean
}

/// Validates and applies one commit of `session` in its own redb write
/// transaction, under the commit lock. Nothing is written if validation
/// fails. With `publish`, its changes are published just before they become
/// visible (else they were published when it took its turn). Call
/// [`Engine::finish`] with the ticket before acknowledging the commit.
fn apply(
    engine: &Engine,
    st: &mut CommitState,
    session: SessionId,
    records: &BTreeMap<Oid, Record>,
    publish: bool,
    carry: Carry,
) -> Result<CommitTicket> {
    if records.is_empty() {
        engine.check_writable()?;
        return Ok(CommitTicket {
            seq: st.log_seq,
            wait: false,
            checkpoint: false,
        });
    }
    let mut tickets = apply_all(engine, st, &[(session, records)], publish, carry)?;
    Ok(tickets.pop().expect("one ticket for one commit"))
}

/// [`apply`] for consecutive commits, none empty, in one redb write
/// transaction: all are applied, each in turn on the state the ones before
/// it left, or none is (a refusal of one undoes all: apply them one by one
/// then). One ticket for each, in order.
fn apply_all(
    engine: &Engine,
    st: &mut CommitState,
    commits: &[(SessionId, &BTreeMap<Oid, Record>)],
    publish: bool,
    carry: Carry,
) -> Result<Vec<CommitTicket>> {
    engine.check_writable()?;
    let bytes: Vec<u64> = commits
        .iter()
        .map(|(_, r)| r.values().map(|r| r.len() as u64).sum())
        .collect();
    // A collector deletion left open for this commit is committed with it
    // (undone with it if the commit is refused) if the commit may carry it;
    // else `begin_locked` commits it first.
    let carry = match carry {
        Carry::Yes => true,
        Carry::No => false,
        Carry::IfClean => st.parked.is_some() && commits.iter().all(|(s, r)| clean(engine, *s, r)),
    };
    let parked = if carry { st.parked.take() } else { None };
    let _undoom_parked = Undoom(
        &engine.pins,
        parked
            .iter()
            .flat_map(|p| p.deleted.oids.iter().map(|o| o.0))
            .collect(),
    );
    // Never redb's fsync here: the log, or a checkpoint, makes it durable.
    let (w, adopted) = match parked {
        Some(Parked { w, deleted }) => (w, Some(deleted)),
        None => (engine.begin_locked(st, Durability::None)?, None),
    };
    let mut counted = Vec::with_capacity(commits.len());
    for &(session, records) in commits {
        let may_create = |oid| engine.allocs.lock().may_create(session, oid);
        counted.push(write_commit(&w, Some(&may_create), records)?);
    }
    // The commits' share of the collector's work, in their transaction
    // (a deletion they adopted is that share).
    let hook = engine.hook.get();
    let collected = match hook {
        Some(h) if adopted.is_none() => h.in_commit(&w, &engine.pins)?,
        _ => Vec::new(),
    };
    let _undoom = Undoom(&engine.pins, collected.iter().map(|o| o.0).collect());
    let first = st.log_seq + 1;
    let last = st.log_seq + commits.len() as u64;
    let mut logged_at = None;
    if let Some(log) = &engine.log {
        w.open_table(LOG_STATE)?.insert(KEY_APPLIED, last)?;
        let at = log.position();
        if let Err(e) = log.append_all(first, commits.iter().map(|(_, r)| r.values())) {
            drop(w);
            return Err(e);
        }
        logged_at = Some((log, at));
    }
    {
        // Published, then visible, as one step: a snapshot falls before or
        // after both, and a load that sees a change (it reads without the
        // `publish` lock) finds it published, so flagged for a session not
        // yet told of it. (A failed redb commit poisons the store: what was
        // published for it no longer matters.)
        let _published = engine.publish.lock();
        if publish {
            for &(session, records) in commits {
                let oids: Vec<Oid> = records.keys().copied().collect();
                engine.publish_changes(Some(session), &oids);
            }
        }
        engine.publish_changes(None, &collected);
        if let Some(d) = &adopted {
            engine.publish_changes(None, &d.oids);
        }
        let r = w.commit().map_err(StorageError::from);
        if r.is_err()
            && let Some((log, at)) = logged_at
        {
            // Not in the file: not in the log either, so a replay cannot
            // apply a commit that was refused.
            let _ = log.unappend(first, at);
        }
        engine.poisoning(r)?;
        #[cfg(test)]
        if let Some(f) = engine.on_visible.get() {
            for _ in commits {
                f(engine);
            }
        }
    }
    if let (Some(d), Some(h)) = (&adopted, hook) {
        h.deletion_committed(d);
    }

    st.applied_seq += 1;
    st.log_seq = last;
    st.commits_since += commits.len() as u64;
    st.bytes_since += bytes.iter().sum::<u64>();
    let checkpoint = engine.policy.checkpoint_due(&st.facts());
    {
        let mut allocs = engine.allocs.lock();
        for oid in commits.iter().flat_map(|(_, r)| r.keys()) {
            if let Some(s) = allocs.by_oid.remove(oid)
                && let Some(n) = allocs.by_session.get_mut(&s)
            {
                *n = n.saturating_sub(1);
            }
        }
    }
    if let Some(h) = hook {
        for (&(_, records), ((queued, released), bytes)) in
            commits.iter().zip(counted.iter().zip(&bytes))
        {
            h.after_commit(records, released, *bytes, *queued);
        }
    }
    let wait = engine.log.is_some() && engine.durability == Mode::Fsync;
    Ok((first..=last)
        .map(|seq| CommitTicket {
            seq,
            wait,
            // The last one's committer takes a checkpoint that is due.
            checkpoint: checkpoint && seq == last,
        })
        .collect())
}

/// Validates a commit of `session` inside `w` (unless `check` is `None`:
/// a replay of a logged commit) and writes its records and reference counts.
/// Returns how many oids it queued for the collector, and the oids whose
/// reference count it lowered.
///
/// The records are written first and checked as they go: a refusal returns
/// an error, and the caller drops the transaction, which undoes every write.
/// Writing first lets each insert hand back the record it replaces, so the
/// checks cost only what is new: whether each oid may be written (from the
/// old record's presence), and whether each reference the old record did
/// not already hold resolves. A reference the old record held is kept
/// without a lookup: its count kept its target alive. (A store imported with
/// `--allow-dangling` may hold a dangling one; a commit that keeps it is
/// accepted, one that adds it is refused.) Every oid's permission is checked
/// before any reference, as `validate_commit` does.
pub(super) fn write_commit(
    w: &WriteTransaction,
    check: Option<&dyn Fn(Oid) -> Result<()>>,
    records: &BTreeMap<Oid, Record>,
) -> Result<(u64, Vec<Oid>)> {
    let mut table = w.open_table(RECORDS)?;
    // Only the references a record gained or lost change a count: most
    // rewrites keep their references, and then nothing is counted at all.
    let mut delta: HashMap<u64, i64> = HashMap::new();
    // References to look up once every record is written.
    let mut new_refs: Vec<Oid> = Vec::new();
    let (mut old_refs, mut refs): (Vec<Oid>, Vec<Oid>) = (Vec::new(), Vec::new());
    for (oid, record) in records {
        let old = table.insert(oid.0, record.as_bytes())?;
        let present = old.is_some();
        old_refs.clear();
        if let Some(v) = &old
            && !changed_refs(*oid, v.value(), record, &mut old_refs)?
        {
            // The same references in the same order (most rewrites): no
            // count changes, and none is new.
            continue;
        }
        drop(old);
        if let Some(may_create) = check
            && !present
        {
            may_create(*oid)?;
        }
        refs.clear();
        refs.extend(record.refs());
        old_refs.sort_unstable();
        refs.sort_unstable();
        // A merge of the two sorted lists: an occurrence in both cancels.
        let (mut i, mut j) = (0, 0);
        while i < old_refs.len() || j < refs.len() {
            match (old_refs.get(i), refs.get(j)) {
                (Some(a), Some(b)) if a == b => {
                    i += 1;
                    j += 1;
                }
                (Some(a), b) if b.is_none_or(|b| a < b) => {
                    *delta.entry(a.0).or_default() -= 1;
                    i += 1;
                }
                (_, Some(b)) => {
                    *delta.entry(b.0).or_default() += 1;
                    if check.is_some()
                        && old_refs.binary_search(b).is_err()
                        && !records.contains_key(b)
                    {
                        new_refs.push(*b);
                    }
                    j += 1;
                }
                _ => break,
            }
        }
    }
    if check.is_some() && !new_refs.is_empty() {
        new_refs.sort_unstable();
        new_refs.dedup();
        let mut dangling = Vec::new();
        for r in new_refs {
            if table.get(r.0)?.is_none() {
                dangling.push(r);
            }
        }
        if !dangling.is_empty() {
            return Err(Conflict::DanglingRefs { oids: dangling }.into());
        }
    }
    drop(table);
    let released = delta
        .iter()
        .filter(|(_, d)| **d < 0)
        .map(|(o, _)| Oid(*o))
        .collect();
    Ok((apply_ref_deltas(w, delta, now_unix_ms())?, released))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Arc;
    use std::time::Duration;

    use super::{Carry, Placed, apply};
    use crate::engine::{Engine, SessionId, SessionRef};
    use crate::record::{Oid, Record};

    use crate::engine::open_temp as open;

    fn one(oid: Oid, data: &[u8], refs: &[Oid]) -> BTreeMap<Oid, Record> {
        BTreeMap::from([(oid, Record::new(oid, data, refs))])
    }

    /// Waits up to 10 s for `done`, failing with `never` after that.
    fn wait_until(never: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{never}");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// A store, two sessions `a` and `b`, `b`'s state, and `a`'s oids.
    type Setup = (
        tempfile::TempDir,
        Arc<Engine>,
        SessionId,
        SessionId,
        SessionRef,
        Vec<Oid>,
    );

    /// A store with a root and two sessions: `a`, handed `n` oids (the
    /// root first), commits; `b` is up to date.
    fn two_sessions(n: usize) -> Setup {
        let (dir, engine) = open();
        let (a, _) = engine.register_session();
        let (b, b_state) = engine.register_session();
        let oids = engine.allocate(a, n).unwrap();
        engine.commit(a, &one(oids[0], b"root", &[])).unwrap();
        engine.take_invalid(b, &b_state, None);
        (dir, engine, a, b, b_state, oids)
    }

    /// A placed commit holds up the turns after it until it is applied;
    /// its committer applies it when waiting for it, or when dropping its
    /// turn (it was published), and then the later turns go on.
    #[test]
    fn a_placed_commit_is_applied_in_turn_even_if_its_turn_is_dropped() {
        let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
        let placed = engine.lock_order().place(a, one(oids[1], b"x", &[]));
        let Placed::Turn(turn) = placed else {
            panic!("a valid commit gets a turn")
        };
        // Another committer queues behind it (not in the line: the
        // library applies under the order).
        let (e, third) = (engine.clone(), oids[2]);
        let later = std::thread::spawn(move || e.commit(a, &one(third, b"y", &[])));
        std::thread::sleep(Duration::from_millis(50));
        assert!(!later.is_finished(), "a later turn went first");
        assert!(matches!(
            engine.load(oids[1]),
            Err(crate::StorageError::NotFound(_))
        ));
        drop(turn);
        wait_until("the turn after a dropped one never came", || {
            later.is_finished()
        });
        later.join().unwrap().unwrap();
        assert_eq!(
            engine.take_invalid(b, &b_state, None),
            vec![oids[1], oids[2]]
        );
        assert_eq!(engine.load(oids[1]).unwrap().data(), b"x");
        assert_eq!(engine.load(oids[2]).unwrap().data(), b"y");
    }

    /// Commits of the line are applied together in one redb transaction,
    /// each on the state the ones before it left, with a log entry and a
    /// sequence number each; if one of them is refused, the others are
    /// applied one by one and only it is refused.
    #[test]
    fn commits_of_the_line_are_applied_together_and_one_refusal_refuses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::store::Options::new()
            .durability(crate::checkpoint::Durability::Fsync)
            .engine_config(false);
        let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
        let (a, _) = engine.register_session();
        let oids = engine.allocate(a, 5).unwrap();
        engine.commit(a, &one(oids[0], b"root", &[])).unwrap();
        let together = [
            one(oids[1], b"p", &[]),
            one(oids[2], b"q", &[oids[1]]),
            one(oids[1], b"p2", &[oids[2]]),
        ];
        let (before, redb_before) = {
            let st = engine.lock_state();
            (st.log_seq, st.applied_seq)
        };
        let results = {
            let mut st = engine.lock_state();
            let commits: Vec<_> = together.iter().map(|r| (a, r)).collect();
            engine.apply_line(&mut st, &commits)
        };
        let seqs: Vec<u64> = results.into_iter().map(|r| r.unwrap().seq).collect();
        assert_eq!(seqs, [before + 1, before + 2, before + 3]);
        {
            let st = engine.lock_state();
            assert_eq!(st.log_seq, before + 3);
            assert_eq!(st.applied_seq, redb_before + 1, "one redb transaction");
        }
        assert_eq!(engine.load(oids[1]).unwrap().data(), b"p2");
        assert_eq!(
            engine.load(oids[2]).unwrap().refs().collect::<Vec<_>>(),
            [oids[1]]
        );
        // The middle one names an oid nobody was handed: refused alone.
        let mixed = [
            one(oids[3], b"r", &[]),
            one(Oid(777), b"unknown", &[]),
            one(oids[4], b"s", &[oids[3]]),
        ];
        let results = {
            let mut st = engine.lock_state();
            let commits: Vec<_> = mixed.iter().map(|r| (a, r)).collect();
            engine.apply_line(&mut st, &commits)
        };
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(results[1].as_ref().unwrap_err().is_conflict());
        assert_eq!(engine.load(oids[4]).unwrap().data(), b"s");
        assert!(engine.load(Oid(777)).is_err());
        let last = results[2].as_ref().unwrap().seq;
        engine
            .finish(results.into_iter().nth(2).unwrap().unwrap())
            .unwrap();
        assert_eq!(last, before + 5, "the refused one took no sequence number");
        // Everything applied is in the log, in order: a reopen replays or
        // finds it.
        drop(engine);
        let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
        assert_eq!(engine.load(oids[1]).unwrap().data(), b"p2");
        assert_eq!(engine.load(oids[4]).unwrap().data(), b"s");
        engine.close().unwrap();
    }

    /// Commits placed by many threads at once are applied exactly once
    /// each, in turn order, whoever applies them: with `Fsync` and with
    /// `Os` (where a commit waiting in line spins before it sleeps).
    #[test]
    fn commits_in_line_are_applied_once_each_in_turn_order() {
        for durability in [
            crate::checkpoint::Durability::Fsync,
            crate::checkpoint::Durability::os(),
        ] {
            let dir = tempfile::tempdir().unwrap();
            let config = crate::store::Options::new()
                .durability(durability)
                .engine_config(false);
            let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
            // On its own thread: a lost wake-up fails the test instead of
            // hanging the run.
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::spawn(move || {
                commits_in_line(engine);
                let _ = tx.send(());
            });
            match rx.recv_timeout(Duration::from_secs(120)) {
                Ok(()) => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
                    panic!("commits in line hung for 2 minutes ({durability:?})")
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    panic!("commits in line failed ({durability:?}): see the panic above")
                }
            }
        }
    }

    fn commits_in_line(engine: Arc<Engine>) {
        let (a, _) = engine.register_session();
        let root = engine.allocate(a, 1).unwrap()[0];
        engine.commit(a, &one(root, b"root", &[])).unwrap();
        let obj = engine.allocate(a, 1).unwrap()[0];
        engine
            .commit(a, &one(obj, &0u64.to_be_bytes(), &[]))
            .unwrap();
        const THREADS: u64 = 8;
        const EACH: u64 = 200;
        let threads: Vec<_> = (0..THREADS)
            .map(|_| {
                let e = engine.clone();
                std::thread::spawn(move || {
                    let (s, _) = e.register_session();
                    for _ in 0..EACH {
                        // Each commit writes the turn it got: applied in
                        // turn order, the last one written is the last turn.
                        let mut order = e.lock_order();
                        let n = e.turns_ordered() + 1;
                        let placed = order.place(s, one(obj, &n.to_be_bytes(), &[]));
                        drop(order);
                        match placed {
                            Placed::Turn(t) => {
                                assert_eq!(t.n, n);
                                e.finish(t.apply().unwrap()).unwrap();
                            }
                            Placed::Applied(r) => panic!("not placed: {:?}", r.map(|_| ())),
                        }
                    }
                    e.unregister_session(s);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let last = engine.turns_ordered();
        engine.await_turns(last);
        assert_eq!(engine.load(obj).unwrap().data(), &last.to_be_bytes());
        let st = engine.commit.lock();
        assert_eq!(st.turns_done, last);
        // Every placed commit was logged once: two setup commits and one
        // per placement.
        assert_eq!(st.log_seq, 2 + THREADS * EACH);
        drop(st);
        let line = engine.line.lock();
        assert!(line.queue.is_empty() && line.results.is_empty() && !line.combining);
    }

    /// A hook that panics in the commit it is told to.
    struct PanicAt(std::sync::atomic::AtomicBool);

    impl crate::engine::CommitHook for PanicAt {
        fn in_commit(
            &self,
            _: &redb::WriteTransaction,
            _: &crate::engine::Pins,
        ) -> crate::Result<Vec<Oid>> {
            if self.0.swap(false, std::sync::atomic::Ordering::AcqRel) {
                panic!("a bug in an apply");
            }
            Ok(Vec::new())
        }
        fn after_commit(&self, _: &BTreeMap<Oid, Record>, _: &[Oid], _: u64, _: u64) {}
        fn deletion_committed(&self, _: &crate::engine::Deleted) {}
        fn on_close(&self) {}
    }

    /// A panic while a commit is applied poisons the store and ends its
    /// turn: the committer's thread sees the panic, later turns are
    /// refused with the poisoning instead of waiting for ever, and a
    /// session told of the commit does not wait for ever either.
    #[test]
    fn a_panic_in_an_apply_poisons_the_store_and_holds_up_no_one() {
        let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
        let hook = Arc::new(PanicAt(std::sync::atomic::AtomicBool::new(false)));
        engine.set_hook(hook.clone());
        hook.0.store(true, std::sync::atomic::Ordering::Release);
        let placed = engine.lock_order().place(a, one(oids[1], b"x", &[]));
        let Placed::Turn(turn) = placed else {
            panic!("a valid commit gets a turn")
        };
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| turn.apply()));
        assert!(caught.is_err(), "the committer's thread sees the panic");
        engine.take_invalid(b, &b_state, None);
        engine.await_turns(engine.turns_ordered());
        let later = engine.commit(a, &one(oids[2], b"y", &[]));
        assert!(
            matches!(later, Err(crate::StorageError::Poisoned { .. })),
            "{later:?}"
        );
    }

    /// A session's load reads without the `publish` lock, so a change must
    /// be published before it becomes visible: a load that sees it then
    /// finds it flagged for a session not yet told of it (never the new
    /// record as if the session were up to date, which a sync naming the
    /// oid afterwards would contradict). Every way a commit is applied: in
    /// its turn under the order (the library), placed in line and applied
    /// by its committer, and applied by another committer the moment it
    /// joins the line.
    #[test]
    fn a_load_that_sees_a_commit_finds_it_flagged_for_a_session_not_told_of_it() {
        let (_dir, engine, a, b, b_state, oids) = two_sessions(3);
        let seen: Arc<parking_lot::Mutex<Vec<&'static str>>> = Arc::default();
        let (log, watched, state) = (seen.clone(), oids[1], b_state.clone());
        let hook: crate::engine::TestHook = Box::new(move |e: &Engine| {
            let mut log = log.lock();
            e.load_for(b, &state, &[watched], |found| -> crate::Result<()> {
                log.push(match found {
                    crate::engine::Found::Invalid => "invalid",
                    crate::engine::Found::Record(_) => "record",
                    crate::engine::Found::Missing => "missing",
                });
                Ok(())
            })
            .unwrap();
        });
        assert!(engine.on_visible.set(hook).is_ok());
        // Applied in its turn, under the order.
        engine.commit(a, &one(oids[1], b"x", &[])).unwrap();
        // Placed in line, then applied.
        let Placed::Turn(turn) = engine.lock_order().place(a, one(oids[1], b"y", &[])) else {
            panic!("a valid commit gets a turn")
        };
        engine.finish(turn.apply().unwrap()).unwrap();
        // Applied by the committer ahead of it in line as soon as it joins.
        engine.take_invalid(b, &b_state, None);
        let Placed::Turn(first) = engine.lock_order().place(a, one(oids[2], b"z", &[])) else {
            panic!("a valid commit gets a turn")
        };
        let ahead = first.n;
        let armed = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let on_lined: crate::engine::TestHook = Box::new(move |e: &Engine| {
            if armed.swap(false, std::sync::atomic::Ordering::AcqRel) {
                e.line.lock().combining = true;
                e.combine(ahead);
            }
        });
        assert!(engine.on_lined.set(on_lined).is_ok());
        let Placed::Turn(second) = engine.lock_order().place(a, one(oids[1], b"w", &[])) else {
            panic!("a valid commit gets a turn")
        };
        engine.finish(first.apply().unwrap()).unwrap();
        engine.finish(second.apply().unwrap()).unwrap();
        // (`w` is published, though not yet applied, when `z` is applied.)
        assert_eq!(*seen.lock(), ["invalid"; 4]);
    }

    /// The collector passes by a queued oid referenced again since without
    /// dooming it: a commit naming it while the collector's round runs is
    /// placed, not held back to be checked in its turn.
    #[test]
    fn the_collector_does_not_doom_a_queued_oid_that_is_live_again() {
        let (_dir, engine, a, _, _, oids) = two_sessions(4);
        let (root, d, x, e) = (oids[0], oids[1], oids[2], oids[3]);
        let mut all = one(root, b"root", &[d, x, e]);
        for o in [d, x, e] {
            all.extend(one(o, b"o", &[]));
        }
        engine.commit(a, &all).unwrap();
        // All three queued, then `x` referenced again.
        engine.commit(a, &one(root, b"root", &[])).unwrap();
        engine.commit(a, &one(root, b"root", &[x])).unwrap();
        let seen = parking_lot::Mutex::new(Vec::new());
        let (deleted, _) = engine
            .deletion_txn(
                |w| {
                    crate::engine::refcount::delete_queued(
                        w,
                        &engine.pins,
                        10,
                        true,
                        u64::MAX,
                        || {
                            seen.lock().push(engine.pins.lock().doomed.contains(&x.0));
                            false
                        },
                    )
                },
                false,
            )
            .unwrap();
        assert_eq!(deleted.oids, [d, e]);
        let seen = seen.into_inner();
        assert!(!seen.is_empty(), "looked at after `d` was deleted");
        assert!(seen.iter().all(|&doomed| !doomed), "{seen:?}");
    }

    /// A commit that would be refused is applied (refused) under the order
    /// and publishes nothing: no other session is told of it.
    #[test]
    fn a_commit_that_would_be_refused_publishes_nothing() {
        let (_dir, engine, a, b, b_state, oids) = two_sessions(2);
        let mut both = one(oids[0], b"root", &[]);
        both.extend(one(oids[1], b"x", &[oids[0]]));
        engine.commit(a, &both).unwrap();
        engine.take_invalid(b, &b_state, None);
        // A dangling reference added, one in place of a reference held
        // (as many references as before), then an oid nobody was handed.
        for records in [
            one(oids[1], b"dangling", &[oids[0], Oid(999)]),
            one(oids[1], b"dangling", &[Oid(999)]),
            one(Oid(777), b"unknown", &[]),
        ] {
            match engine.lock_order().place(a, records) {
                Placed::Applied(r) => assert!(r.unwrap_err().is_conflict()),
                Placed::Turn(_) => panic!("a commit that fails its checks got a turn"),
            }
        }
        assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
        assert_eq!(engine.load(oids[1]).unwrap().data(), b"x");
    }

    /// A store where `x` (oids[1]) was referenced by the root and then let
    /// go: queued for the collector, past any grace with a cutoff of
    /// `u64::MAX`.
    fn garbage_x() -> Setup {
        let (dir, engine, a, b, b_state, oids) = two_sessions(2);
        let (root, x) = (oids[0], oids[1]);
        let mut both = one(root, b"root", &[x]);
        both.extend(one(x, b"x", &[]));
        engine.commit(a, &both).unwrap();
        engine.commit(a, &one(root, b"root", &[])).unwrap();
        engine.take_invalid(b, &b_state, None);
        (dir, engine, a, b, b_state, oids)
    }

    /// The collector's deletion inside a write transaction, undoomed after
    /// it as the collector does.
    fn collect_all(engine: &Engine) -> Vec<Oid> {
        let deleted = engine
            .write_txn(redb::Durability::None, |w, _| {
                crate::engine::delete_queued(w, &engine.pins, 100, false, u64::MAX, || false)
            })
            .unwrap();
        engine.pins.undoom(deleted.oids.iter().map(|o| o.0));
        deleted.oids
    }

    /// A deletion cut short because a committer waits for the writer
    /// stops after one deletion, not at the end of its round, and queues
    /// what the round did not reach again as it was: nothing of it stays
    /// doomed, and a later deletion takes it.
    #[test]
    fn a_deletion_cut_short_queues_the_rest_of_its_round_again() {
        let (_dir, engine, a, _b, _b_state, oids) = two_sessions(6);
        let (root, xs) = (oids[0], &oids[1..]);
        let mut all = one(root, b"root", xs);
        for &x in xs {
            all.extend(one(x, b"x", &[]));
        }
        engine.commit(a, &all).unwrap();
        engine.commit(a, &one(root, b"root", &[])).unwrap();
        // A committer waits throughout.
        let first = engine
            .write_txn(redb::Durability::None, |w, _| {
                crate::engine::delete_queued(w, &engine.pins, 100, true, u64::MAX, || true)
            })
            .unwrap();
        engine.pins.undoom(first.oids.iter().map(|o| o.0));
        assert_eq!(first.oids.len(), 1, "the round went on past one deletion");
        assert_eq!(first.queue_left, Some(xs.len() as u64 - 1));
        let rest: Vec<u64> = xs
            .iter()
            .map(|o| o.0)
            .filter(|o| *o != first.oids[0].0)
            .collect();
        assert!(engine.pins.pin(&rest), "an oid put back is still doomed");
        engine.pins.unpin(&rest);
        let mut deleted = collect_all(&engine);
        deleted.extend(first.oids);
        deleted.sort();
        assert_eq!(deleted, xs);
    }

    /// A commit placed in line that takes back an object the collector
    /// could delete keeps it: the collector spares it (and queues it again)
    /// until the commit is applied, so the commit is not refused in its
    /// turn after its oids were published.
    #[test]
    fn the_collector_spares_what_a_placed_commit_needs() {
        let (_dir, engine, a, _b, _b_state, oids) = garbage_x();
        let (root, x) = (oids[0], oids[1]);
        let Placed::Turn(turn) = engine.lock_order().place(a, one(root, b"again", &[x])) else {
            panic!("a valid commit gets a turn")
        };
        assert_eq!(
            collect_all(&engine),
            Vec::<Oid>::new(),
            "a pinned oid was deleted"
        );
        engine.finish(turn.apply().unwrap()).unwrap();
        assert_eq!(engine.load(x).unwrap().data(), b"x");
        // Referenced again, it is no garbage for the next step either.
        assert_eq!(collect_all(&engine), Vec::<Oid>::new());
        assert_eq!(engine.load(x).unwrap().data(), b"x");
        // Let go again, it goes.
        engine.commit(a, &one(root, b"root", &[])).unwrap();
        assert_eq!(collect_all(&engine), vec![x]);
    }

    /// A commit that names what a collector transaction not yet committed
    /// is deleting gets no turn: it waits for the deletion and is refused
    /// in its turn, publishing nothing.
    #[test]
    fn a_commit_naming_what_is_being_deleted_is_checked_after_the_deletion() {
        let (_dir, engine, a, b, b_state, oids) = garbage_x();
        let (root, x) = (oids[0], oids[1]);
        let mut placer = None;
        let deleted = engine
            .write_txn(redb::Durability::None, |w, _| {
                let d =
                    crate::engine::delete_queued(w, &engine.pins, 100, false, u64::MAX, || false)?;
                assert_eq!(d.oids, vec![x]);
                let e = engine.clone();
                placer = Some(std::thread::spawn(move || {
                    match e.lock_order().place(a, one(root, b"again", &[x])) {
                        Placed::Applied(r) => Some(r.map(|_| ()).map_err(|e| e.is_conflict())),
                        Placed::Turn(t) => {
                            let _ = t.apply();
                            None
                        }
                    }
                }));
                // Until it waits for this transaction's commit lock.
                wait_until(
                    "the commit took a turn instead of waiting for the deletion",
                    || engine.committers_waiting(),
                );
                Ok(d)
            })
            .unwrap();
        engine.pins.undoom(deleted.oids.iter().map(|o| o.0));
        let outcome = placer.unwrap().join().unwrap();
        assert_eq!(
            outcome,
            Some(Err(true)),
            "refused as a conflict, without a turn"
        );
        // The refused commit published nothing (the test's deletion is not
        // published either: the collector does that itself).
        assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
        assert!(matches!(
            engine.load(x),
            Err(crate::StorageError::NotFound(_))
        ));
    }

    /// Parks a deletion of everything queued, cut short as if a committer
    /// waited: the transaction is left open for the next commit.
    fn park(engine: &Engine) -> Vec<Oid> {
        let (deleted, parked) = engine
            .deletion_txn(
                |w| crate::engine::delete_queued(w, &engine.pins, 100, true, u64::MAX, || true),
                true,
            )
            .unwrap();
        assert!(
            parked,
            "a deletion cut short was committed, not handed over"
        );
        deleted.oids
    }

    /// A deletion cut short for a waiting committer is left to it: nothing
    /// of it is visible or published until the next commit, which commits
    /// it with its own records; its oids stay doomed until then.
    #[test]
    fn a_deletion_handed_over_is_committed_with_the_next_commit() {
        let (_dir, engine, a, b, b_state, oids) = garbage_x();
        let (root, x) = (oids[0], oids[1]);
        assert_eq!(park(&engine), vec![x]);
        assert_eq!(
            engine.load(x).unwrap().data(),
            b"x",
            "visible before its commit"
        );
        assert!(
            !engine.pins.pin(&[x.0]),
            "a parked deletion's oid is not doomed"
        );
        engine.pins.unpin(&[x.0]);
        assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
        engine.commit(a, &one(root, b"root2", &[])).unwrap();
        assert!(matches!(
            engine.load(x),
            Err(crate::StorageError::NotFound(_))
        ));
        assert_eq!(engine.load(root).unwrap().data(), b"root2");
        let mut told = engine.take_invalid(b, &b_state, None);
        told.sort();
        assert_eq!(told, vec![root, x]);
        assert!(engine.pins.pin(&[x.0]), "still doomed after its commit");
    }

    /// A commit that carries a deletion and is refused in its turn undoes
    /// both: the garbage stays, queued and not doomed, for a later deletion.
    /// (Only a commit expected to pass carries one, see the next tests; a
    /// placed commit can still be refused in its turn in a store imported
    /// with `--allow-dangling`. This applies one as the line does.)
    #[test]
    fn a_carried_deletion_is_undone_with_a_commit_refused_in_its_turn() {
        let (_dir, engine, a, b, b_state, oids) = garbage_x();
        let x = oids[1];
        assert_eq!(park(&engine), vec![x]);
        let refused = {
            let mut st = engine.lock_state();
            let bad = one(Oid(777), b"unknown", &[]);
            let r = apply(&engine, &mut st, a, &bad, false, Carry::Yes);
            assert!(st.parked.is_none(), "the deletion was not carried");
            r
        };
        assert!(refused.unwrap_err().is_conflict());
        assert_eq!(engine.load(x).unwrap().data(), b"x");
        assert_eq!(engine.take_invalid(b, &b_state, None), Vec::<Oid>::new());
        assert!(
            engine.pins.pin(&[x.0]),
            "still doomed after its commit was refused"
        );
        engine.pins.unpin(&[x.0]);
        assert_eq!(collect_all(&engine), vec![x], "no longer queued");
    }

    /// A commit refused by validation does not carry a parked deletion: the
    /// deletion is committed on its own first, so bad input cannot undo the
    /// collector's work (a client sending only refused commits would
    /// otherwise stop the collector for good). Through the library (not
    /// validated before its apply) and through the line (refused when
    /// placed).
    #[test]
    fn a_refused_commit_leaves_a_parked_deletion_to_be_committed() {
        for placed in [false, true] {
            let (_dir, engine, a, b, b_state, oids) = garbage_x();
            let x = oids[1];
            assert_eq!(park(&engine), vec![x]);
            let bad = one(Oid(777), b"unknown", &[]);
            let refused = if placed {
                match engine.lock_order().place(a, bad) {
                    Placed::Applied(r) => r.map(|_| ()),
                    Placed::Turn(_) => panic!("a commit of an unknown oid was placed"),
                }
            } else {
                engine.commit(a, &bad)
            };
            assert!(refused.unwrap_err().is_conflict());
            assert!(
                matches!(engine.load(x), Err(crate::StorageError::NotFound(_))),
                "a refused commit undid the deletion (placed: {placed})"
            );
            assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);
            assert!(engine.pins.pin(&[x.0]), "still doomed");
            engine.pins.unpin(&[x.0]);
        }
    }

    /// A library commit that references what a parked deletion removes
    /// does not carry it: the deletion is committed first, and the commit
    /// is refused for a reference to a deleted object, as it would be had
    /// the collector committed the deletion itself (not refused by a
    /// deletion that is then undone).
    #[test]
    fn a_commit_referencing_a_parked_deletion_does_not_carry_it() {
        let (_dir, engine, a, b, b_state, oids) = garbage_x();
        let (root, x) = (oids[0], oids[1]);
        assert_eq!(park(&engine), vec![x]);
        let refused = engine.commit(a, &one(root, b"root", &[x]));
        assert!(refused.unwrap_err().is_conflict());
        assert!(
            matches!(engine.load(x), Err(crate::StorageError::NotFound(_))),
            "the deletion was undone"
        );
        assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);
        assert_eq!(engine.load(root).unwrap().data(), b"root");
    }

    /// Whatever else needs redb's single writer commits a parked deletion
    /// first instead of waiting for it: a checkpoint, another collector
    /// transaction, the close (the deletion is in the file after a reopen).
    #[test]
    fn a_parked_deletion_is_committed_before_any_other_writer() {
        let (_dir, engine, _a, b, b_state, oids) = garbage_x();
        let x = oids[1];
        park(&engine);
        let (tx, rx) = std::sync::mpsc::channel();
        let e = engine.clone();
        std::thread::spawn(move || tx.send(e.checkpoint().map_err(|e| e.to_string())));
        let done = rx.recv_timeout(Duration::from_secs(10));
        assert_eq!(
            done,
            Ok(Ok(())),
            "the checkpoint waited for the parked deletion"
        );
        assert!(matches!(
            engine.load(x),
            Err(crate::StorageError::NotFound(_))
        ));
        assert_eq!(engine.take_invalid(b, &b_state, None), vec![x]);

        // Another collector transaction.
        let (_dir, engine, ..) = garbage_x();
        let x = park(&engine)[0];
        engine
            .write_txn(redb::Durability::None, |_, _| Ok(()))
            .unwrap();
        assert!(matches!(
            engine.load(x),
            Err(crate::StorageError::NotFound(_))
        ));

        // The close.
        let (dir, engine, ..) = garbage_x();
        let x = park(&engine)[0];
        engine.close().unwrap();
        let config = crate::store::Options::new().engine_config(false);
        let engine = Engine::open(&dir.path().join("s.redb"), &config).unwrap();
        assert!(matches!(
            engine.load(x),
            Err(crate::StorageError::NotFound(_))
        ));
    }
}
