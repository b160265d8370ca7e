//! The sequencer: the commit order's turns, and the line of checked
//! commits waiting to be applied, applied in batches by whichever
//! committer in line gets there first (flat combining).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::time::Instant;

use crate::ranked::{MutexGuard, rank};

use super::apply::{Carry, apply, apply_all, pin_and_pass};
use super::{CommitState, CommitTicket};
use crate::checkpoint::Durability as Mode;
use crate::engine::order::{Entry, Grant, Held, Place, Standing};
use crate::engine::pins::pin_list;
use crate::engine::{Engine, SessionId};
use crate::error::{Conflict, Result, StorageError};
use crate::record::{Oid, Record};

/// Condition variables the turns' waits are spread over.
pub(in crate::engine) const TURN_SLOTS: usize = 64;

/// The sequencer: the commit order, the turns it hands out, and the line
/// of placed commits waiting to be applied. Owned by `commit/`.
pub(crate) struct Sequencer {
    /// The commit order: held by the server from sending a client its
    /// invalidations until that client's commit has its place in the order
    /// (a turn); by the library through the whole apply. Handed to waiters
    /// first come, first served (see `engine::order`).
    pub(super) order: crate::engine::order::Order,
    /// Commits placed in the commit order and waiting to be applied.
    pub(super) line: crate::ranked::Mutex<Line, { rank::LINE }>,
    /// Signalled (with `line`) when the commit of turn `n` is applied, or
    /// its committer should apply the line: at `n % TURN_SLOTS`.
    pub(super) line_cv: [crate::ranked::Condvar; TURN_SLOTS],
    /// Turns handed out (under `order`).
    pub(super) ordered: std::sync::atomic::AtomicU64,
    /// Turns finished, applied or given up: `CommitState::turns_done`,
    /// mirrored here to be read without the commit lock.
    pub(super) turns_done: std::sync::atomic::AtomicU64,
    /// Signalled (with `commit`) when a turn finishes: the one for turn
    /// `n` at `n % TURN_SLOTS`.
    pub(super) turn: [crate::ranked::Condvar; TURN_SLOTS],
    /// Committers waiting for the commit lock (the collector makes way).
    pub(super) committers_waiting: std::sync::atomic::AtomicUsize,
    /// Tests: how many times a thread went to sleep waiting for an earlier
    /// turn to finish (what tests wait for instead of sleeping).
    #[cfg(test)]
    pub(crate) turn_waits: std::sync::atomic::AtomicU64,
}

impl Sequencer {
    pub(crate) fn new() -> Sequencer {
        Sequencer {
            order: Default::default(),
            line: crate::ranked::Mutex::new(Default::default()),
            line_cv: std::array::from_fn(|_| crate::ranked::Condvar::new()),
            ordered: std::sync::atomic::AtomicU64::new(0),
            turns_done: std::sync::atomic::AtomicU64::new(0),
            turn: std::array::from_fn(|_| crate::ranked::Condvar::new()),
            committers_waiting: std::sync::atomic::AtomicUsize::new(0),
            #[cfg(test)]
            turn_waits: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// The commit order (for its guards in `engine::order`).
    pub(crate) fn order(&self) -> &crate::engine::order::Order {
        &self.order
    }
}

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
pub(crate) struct QueuedOrder<'a>(pub(super) Place<'a>);

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
/// One dropped before it joined the line (a panic while it was placed) is
/// ended as given up, once the turns before it are: never left open.
#[must_use = "a turn holds up every later commit until it is applied or dropped"]
pub(crate) struct Turn<'a> {
    engine: &'a Engine,
    pub(super) n: u64,
    done: bool,
    /// Its commit joined the line.
    lined: bool,
    /// What its commit pins while it is being placed (handed to the line
    /// with it; unpinned if it never gets there).
    pinning: Vec<u64>,
}

impl<'a> OrderGuard<'a> {
    fn take_turn(&mut self) -> Turn<'a> {
        let n = self.engine.seq.ordered.load(Ordering::Acquire) + 1;
        self.engine.seq.ordered.store(n, Ordering::Release);
        Turn {
            engine: self.engine,
            n,
            done: false,
            lined: false,
            pinning: Vec::new(),
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
        let mut turn = self.take_turn();
        turn.pinning = pinned;
        let oids: Vec<Oid> = records.keys().copied().collect();
        // Published before it is in the line: from there another committer
        // may apply it at once, and a load must never see it unpublished.
        self.engine.publish_changes(Some(session), &oids);
        #[cfg(test)]
        if let Some(f) = self.engine.on_placing.get() {
            f(self.engine);
        }
        turn.lined = true;
        let pinned = std::mem::take(&mut turn.pinning);
        self.engine.seq.line.lock().queue.push_back(Queued {
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
pub(super) fn apply_panicked() -> StorageError {
    StorageError::Poisoned {
        reason: "a commit's apply panicked".into(),
    }
}

/// A placed commit waiting for its turn.
pub(super) struct Queued {
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
    pub(super) queue: std::collections::VecDeque<Queued>,
    pub(super) results: HashMap<u64, Result<CommitTicket>>,
    /// A committer is applying the line.
    pub(super) combining: bool,
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
        let mut line = engine.seq.line.lock();
        // Only where commits do not then wait for a sync of the log: with
        // `Fsync` the waits for the syncs spin already (FLUSH_SPIN), and the
        // two together ran slower than either.
        let mut spun = engine.sync.log().is_some() && engine.durability == Mode::Fsync;
        loop {
            if let Some(r) = line.results.remove(&self.n) {
                return r;
            }
            // Apply the line if nobody does and its first commit is next. If
            // a turn not in the line comes first, its thread wakes the line
            // when done (after updating `turns_done`, so this check and
            // that wake-up cannot both miss).
            let done = engine.seq.turns_done.load(Ordering::Acquire);
            if !line.combining && line.queue.front().is_some_and(|q| q.n == done + 1) {
                line.combining = true;
                drop(line);
                engine.combine(self.n);
                line = engine.seq.line.lock();
                continue;
            }
            if !spun {
                // Once, before sleeping: wait without sleeping (see
                // LINE_SPIN) until the result is in or the line is free,
                // then look again under the lock.
                spun = true;
                drop(line);
                crate::engine::spin_while(LINE_SPIN, || {
                    let l = engine.seq.line.lock();
                    let done = engine.seq.turns_done.load(Ordering::Acquire);
                    !(l.results.contains_key(&self.n)
                        || (!l.combining && l.queue.front().is_some_and(|q| q.n == done + 1)))
                });
                line = engine.seq.line.lock();
                continue;
            }
            engine.seq.line_cv[self.n as usize % TURN_SLOTS].wait(&mut line);
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
        if self.done {
            return;
        }
        if self.lined {
            // A placed commit was published: it is applied all the same.
            let _ = self.collect();
        } else {
            // Never in the line (a panic while it was placed): nothing to
            // apply; the turn ends once the ones before it have, and the
            // later ones go on. (Its oids, if published, are invalidations
            // of records that did not change: harmless.)
            self.done = true;
            let engine = self.engine;
            engine.pins.unpin(&self.pinning);
            let mut st = engine.lock_state();
            engine.wait_turns(&mut st, self.n - 1);
            engine.end_turn(&mut st, self.n);
            drop(st);
            engine.wake_line();
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
    pub(super) fn combine(&self, own: u64) {
        let mut st = self.lock_state();
        let mut more = 0;
        loop {
            let batch: Vec<Queued> = {
                let mut line = self.seq.line.lock();
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
                        self.seq.line_cv[q.n as usize % TURN_SLOTS].notify_all();
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
                self.seq.line.lock().results.insert(q.n, r);
                self.seq.line_cv[q.n as usize % TURN_SLOTS].notify_all();
            }
            if let Some(p) = panicked {
                self.seq.line.lock().combining = false;
                self.wake_line();
                drop(st);
                std::panic::resume_unwind(p);
            }
        }
    }

    /// Applies consecutive commits of the line: together in one redb
    /// transaction, or, if that fails (one is refused), one by one, so
    /// that each gets its own result.
    pub(super) fn apply_line(
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
        let line = self.seq.line.lock();
        if !line.combining
            && let Some(q) = line.queue.front()
        {
            self.seq.line_cv[q.n as usize % TURN_SLOTS].notify_all();
        }
    }
}

impl Engine {
    /// Takes the commit order. The server holds it from sending a client its
    /// invalidations until that client's commit has its turn, so no other
    /// commit falls between what the client was told and its own.
    pub(crate) fn lock_order(&self) -> OrderGuard<'_> {
        OrderGuard {
            engine: self,
            _order: self.seq.order.lock(self),
        }
    }

    /// Takes the commit order if it is free; otherwise queues for it, and
    /// whoever hands it over runs the grant `grant` makes (made only then)
    /// first, on this waiter's behalf
    /// (the server sends the waiting client its invalidations there, so
    /// the waiting thread is woken once, by its client's answer).
    pub(crate) fn enter_order(&self, grant: impl FnOnce() -> Grant) -> OrderEntry<'_> {
        match self.seq.order.enter(self, grant) {
            Entry::Now(held) => OrderEntry::Now(OrderGuard {
                engine: self,
                _order: held,
            }),
            Entry::Queued(q) => OrderEntry::Queued(QueuedOrder(q)),
        }
    }

    /// Tests: how many times a thread went to sleep waiting for an
    /// earlier turn.
    #[cfg(test)]
    pub(crate) fn turn_waits(&self) -> u64 {
        self.seq.turn_waits.load(Ordering::Acquire)
    }

    /// How many committers wait for the commit order now.
    pub(crate) fn order_waiting(&self) -> usize {
        self.seq.order.waiting()
    }

    /// Turns handed out so far.
    pub(crate) fn turns_ordered(&self) -> u64 {
        self.seq.ordered.load(Ordering::Acquire)
    }

    /// Waits until every turn up to `n` has finished: a session told of a
    /// commit's changes reads nothing older than that commit.
    pub(crate) fn await_turns(&self, n: u64) {
        if self.seq.turns_done.load(Ordering::Acquire) >= n {
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

    /// [`commit`](Self::commit) (with a snapshot of the state just after
    /// it if `snapshot`), refused with [`Conflict::Invalidated`] and
    /// nothing written when another session changed one of `reads` or of
    /// the oids it stores since `session`'s last sync: checked in the
    /// commit order, so no commit can come between the check and this one.
    pub(crate) fn commit_checked(
        &self,
        session: SessionId,
        state: &crate::engine::sessions::SessionRef,
        records: &BTreeMap<Oid, Record>,
        reads: &[Oid],
        snapshot: bool,
    ) -> Result<Option<crate::engine::Snapshot>> {
        let mut order = self.lock_order();
        let oids: Vec<Oid> = reads.iter().chain(records.keys()).copied().collect();
        let flags = self.invalid_flags(session, state, &oids);
        let mut clash: Vec<Oid> = oids
            .iter()
            .zip(flags)
            .filter_map(|(oid, invalid)| invalid.then_some(*oid))
            .collect();
        if !clash.is_empty() {
            clash.sort_unstable();
            clash.dedup();
            return Err(Conflict::Invalidated { oids: clash }.into());
        }
        let (ticket, taken) = order.apply_then(session, records, |r| {
            (snapshot && r.is_ok()).then(|| self.snapshot())
        });
        self.finish(ticket?)?;
        taken.transpose()
    }

    /// [`commit`](Self::commit), and a snapshot of the state just after it
    /// (taken under the commit lock, so it holds nothing committed later).
    pub(crate) fn commit_and_snapshot(
        &self,
        session: SessionId,
        records: &BTreeMap<Oid, Record>,
    ) -> Result<crate::engine::Snapshot> {
        let (ticket, snapshot) = self
            .lock_order()
            .apply_then(session, records, |r| r.is_ok().then(|| self.snapshot()));
        self.finish(ticket?)?;
        snapshot.expect("a snapshot follows every applied commit")
    }

    /// Marks turn `n` finished and wakes whoever waits for it.
    fn end_turn(&self, st: &mut CommitState, n: u64) {
        st.turns_done = n;
        self.seq.turns_done.store(n, Ordering::Release);
        self.seq.turn[n as usize % TURN_SLOTS].notify_all();
    }

    /// Waits (on the commit lock) until every turn up to `n` has finished.
    /// Each wait is on the slot of the turn it waits for, so finishing a
    /// turn wakes only whoever waits for that one (its successor), not
    /// every committer in line.
    fn wait_turns(&self, st: &mut MutexGuard<'_, CommitState, { rank::COMMIT }>, n: u64) {
        while st.turns_done < n {
            #[cfg(test)]
            self.seq.turn_waits.fetch_add(1, Ordering::AcqRel);
            self.seq.turn[n as usize % TURN_SLOTS].wait(st);
        }
    }
}
