//! Locks with ranks: the store's one lock order, written in the types and
//! checked in debug builds.
//!
//! Every lock of the engine and the collector is a [`Mutex`] or [`RwLock`]
//! whose rank is part of its type (`Mutex<CommitState, { rank::COMMIT }>`).
//! A thread may take a lock only while every lock it holds has a lower
//! rank; in debug builds (the tests) each acquisition checks this against
//! the ranks the thread holds, before it blocks, and panics naming both
//! locks. The order cannot drift from the code: a new path that takes two
//! locks the other way round fails the first test that runs it.
//! Release builds skip the check (a thread-local lookup per lock).
//!
//! A `try_lock` cannot deadlock, so it is not checked; the lock it takes
//! is counted as held all the same.

use std::marker::PhantomData;
use std::ops::{Deref, DerefMut};

/// The ranks, lowest (taken first) to highest. The gaps leave room.
pub(crate) mod rank {
    /// The collector's full collection (`GcShared::full_lock`): held
    /// through a whole collection, which commits under it.
    pub(crate) const GC_FULL: u8 = 10;
    /// The checkpoint (`Engine::checkpoint_lock`): one at a time, taken
    /// before the commit order.
    pub(crate) const CHECKPOINT: u8 = 20;
    /// The commit order (`Engine::order`), a logical lock: held from a
    /// client's invalidations to its commit's turn.
    pub(crate) const ORDER: u8 = 30;
    /// The commit lock (`Engine::commit`): the state every apply changes.
    pub(crate) const COMMIT: u8 = 40;
    /// The redb database handle (`Engine::db`): read by every transaction,
    /// written only to close.
    pub(crate) const DB: u8 = 50;
    /// Whether a group sync of the log runs (`Engine::syncing`).
    pub(crate) const SYNCING: u8 = 60;
    /// The commit log's writer and its segment bookkeeping.
    pub(crate) const LOG: u8 = 70;
    /// The log's list of the segments it created (tests: their simulated disk).
    pub(crate) const LOG_FILES: u8 = 75;
    /// Held across publishing a change and making it visible, and while a
    /// snapshot is taken (`Engine::publish`).
    pub(crate) const PUBLISH: u8 = 80;
    /// The shared change log (`Engine::changes`).
    pub(crate) const CHANGES: u8 = 90;
    /// The registered sessions (`Engine::sessions`).
    pub(crate) const SESSIONS: u8 = 100;
    /// One session's state. Several are held together only under
    /// `SESSIONS` (the change log's trim).
    pub(crate) const SESSION: u8 = 110;
    /// Oids handed out and not yet stored (`Engine::allocs`).
    pub(crate) const ALLOCS: u8 = 120;
    /// What placed commits pin and the collector dooms (`Pins`).
    pub(crate) const PINS: u8 = 130;
    /// Commits placed and waiting to be applied (`Engine::line`).
    pub(crate) const LINE: u8 = 140;
    /// Leaves: nothing is taken under them (the poison reason, the
    /// checkpointer's handle, the snapshot census, the read gate, the
    /// collector's extra set, nudge and thread handle).
    pub(crate) const LEAF: u8 = 200;

    /// A rank's name, for the message of a violation.
    pub(crate) fn name(rank: u8) -> &'static str {
        match rank {
            GC_FULL => "gc full_lock",
            CHECKPOINT => "checkpoint_lock",
            ORDER => "the commit order",
            COMMIT => "commit",
            DB => "db",
            SYNCING => "syncing",
            LOG => "the commit log",
            LOG_FILES => "the log's segment list",
            PUBLISH => "publish",
            CHANGES => "changes",
            SESSIONS => "sessions",
            SESSION => "a session's state",
            ALLOCS => "allocs",
            PINS => "pins",
            LINE => "line",
            LEAF => "a leaf lock",
            _ => "an unnamed rank",
        }
    }

    /// Whether two locks of `rank` may be held at once (checked in debug
    /// builds only).
    #[cfg_attr(not(debug_assertions), allow(dead_code))]
    pub(crate) fn nests(rank: u8) -> bool {
        rank == SESSION
    }
}

#[cfg(debug_assertions)]
thread_local! {
    /// The ranks of the locks this thread holds, in the order taken.
    static HELD: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// A rank held by this thread while it lives (not `Send`: it is released
/// by the thread that took it).
pub(crate) struct Token {
    #[cfg(debug_assertions)]
    rank: u8,
    _not_send: PhantomData<*const ()>,
}

impl Token {
    /// Checks that `rank` may be taken now (debug builds: panics if not),
    /// then counts it as held.
    pub(crate) fn take(rank: u8) -> Token {
        #[cfg(debug_assertions)]
        HELD.with(|held| {
            let mut held = held.borrow_mut();
            if let Some(&top) = held.iter().max()
                && (top > rank || (top == rank && !rank::nests(rank)))
            {
                let holding: Vec<&str> = held.iter().map(|r| rank::name(*r)).collect();
                // Not counted: the lock is not taken.
                drop(held);
                panic!(
                    "lock order violated: taking {} (rank {rank}) while holding {} (rank {top}); \
                     held: {holding:?}",
                    rank::name(rank),
                    rank::name(top),
                );
            }
            held.push(rank);
        });
        Token::taken(rank)
    }

    /// Counts `rank` as held without a check (a `try_lock` that succeeded).
    pub(crate) fn taken_unchecked(rank: u8) -> Token {
        #[cfg(debug_assertions)]
        HELD.with(|held| held.borrow_mut().push(rank));
        Token::taken(rank)
    }

    /// The token of a rank already counted.
    fn taken(rank: u8) -> Token {
        #[cfg(not(debug_assertions))]
        let _ = rank;
        Token {
            #[cfg(debug_assertions)]
            rank,
            _not_send: PhantomData,
        }
    }
}

impl Drop for Token {
    fn drop(&mut self) {
        #[cfg(debug_assertions)]
        {
            let rank = self.rank;
            // A thread being torn down may have lost its thread-locals.
            let _ = HELD.try_with(|held| {
                let mut held = held.borrow_mut();
                if let Some(i) = held.iter().rposition(|r| *r == rank) {
                    held.remove(i);
                }
            });
        }
    }
}

/// A mutex of rank `R` (see [`rank`]).
#[derive(Default)]
pub(crate) struct Mutex<T, const R: u8> {
    inner: parking_lot::Mutex<T>,
}

/// A held [`Mutex`]; released when dropped.
pub(crate) struct MutexGuard<'a, T, const R: u8> {
    // Dropped first: the lock is released before its rank.
    guard: parking_lot::MutexGuard<'a, T>,
    _token: Token,
}

impl<T, const R: u8> Mutex<T, R> {
    pub(crate) const fn new(value: T) -> Self {
        Mutex {
            inner: parking_lot::Mutex::new(value),
        }
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, T, R> {
        let token = Token::take(R);
        MutexGuard {
            guard: self.inner.lock(),
            _token: token,
        }
    }

    pub(crate) fn try_lock(&self) -> Option<MutexGuard<'_, T, R>> {
        let guard = self.inner.try_lock()?;
        Some(MutexGuard {
            guard,
            _token: Token::taken_unchecked(R),
        })
    }
}

impl<T: std::fmt::Debug, const R: u8> std::fmt::Debug for Mutex<T, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Mutex<{}>(", rank::name(R))?;
        match self.inner.try_lock() {
            Some(v) => write!(f, "{:?})", &*v),
            None => write!(f, "locked)"),
        }
    }
}

impl<T, const R: u8> Deref for MutexGuard<'_, T, R> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T, const R: u8> DerefMut for MutexGuard<'_, T, R> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

/// A condition variable for [`MutexGuard`]s.
#[derive(Default)]
pub(crate) struct Condvar(parking_lot::Condvar);

impl Condvar {
    pub(crate) const fn new() -> Self {
        Condvar(parking_lot::Condvar::new())
    }

    /// Waits (the lock released meanwhile; its rank stays counted, as the
    /// thread takes nothing while it waits).
    pub(crate) fn wait<T, const R: u8>(&self, guard: &mut MutexGuard<'_, T, R>) {
        self.0.wait(&mut guard.guard);
    }

    pub(crate) fn notify_one(&self) -> bool {
        self.0.notify_one()
    }

    pub(crate) fn notify_all(&self) -> usize {
        self.0.notify_all()
    }
}

/// A reader-writer lock of rank `R`.
#[derive(Default)]
pub(crate) struct RwLock<T, const R: u8> {
    inner: parking_lot::RwLock<T>,
}

/// A [`RwLock`] read.
pub(crate) struct ReadGuard<'a, T, const R: u8> {
    guard: parking_lot::RwLockReadGuard<'a, T>,
    _token: Token,
}

/// A part of a [`RwLock`] read ([`ReadGuard::try_map`]).
pub(crate) struct MappedReadGuard<'a, T, const R: u8> {
    guard: parking_lot::MappedRwLockReadGuard<'a, T>,
    _token: Token,
}

/// A [`RwLock`] written.
pub(crate) struct WriteGuard<'a, T, const R: u8> {
    guard: parking_lot::RwLockWriteGuard<'a, T>,
    _token: Token,
}

impl<T, const R: u8> RwLock<T, R> {
    pub(crate) const fn new(value: T) -> Self {
        RwLock {
            inner: parking_lot::RwLock::new(value),
        }
    }

    /// Reads. A thread never reads a lock it holds already (a waiting
    /// writer would deadlock it): the rank check catches that too.
    pub(crate) fn read(&self) -> ReadGuard<'_, T, R> {
        let token = Token::take(R);
        ReadGuard {
            guard: self.inner.read(),
            _token: token,
        }
    }

    pub(crate) fn write(&self) -> WriteGuard<'_, T, R> {
        let token = Token::take(R);
        WriteGuard {
            guard: self.inner.write(),
            _token: token,
        }
    }
}

impl<'a, T, const R: u8> ReadGuard<'a, T, R> {
    /// The part `f` finds, still read; the whole guard back if none.
    pub(crate) fn try_map<U>(
        this: Self,
        f: impl FnOnce(&T) -> Option<&U>,
    ) -> Result<MappedReadGuard<'a, U, R>, Self> {
        let ReadGuard { guard, _token } = this;
        match parking_lot::RwLockReadGuard::try_map(guard, f) {
            Ok(guard) => Ok(MappedReadGuard { guard, _token }),
            Err(guard) => Err(ReadGuard { guard, _token }),
        }
    }
}

impl<T, const R: u8> Deref for ReadGuard<'_, T, R> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T, const R: u8> Deref for MappedReadGuard<'_, T, R> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T, const R: u8> Deref for WriteGuard<'_, T, R> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.guard
    }
}

impl<T, const R: u8> DerefMut for WriteGuard<'_, T, R> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.guard
    }
}

#[cfg(all(test, debug_assertions))]
mod tests {
    use super::*;

    #[test]
    fn locks_taken_in_rank_order_pass_and_out_of_order_panic_naming_both() {
        let commit: Mutex<u32, { rank::COMMIT }> = Mutex::new(0);
        let line: Mutex<u32, { rank::LINE }> = Mutex::new(0);
        let db: RwLock<u32, { rank::DB }> = RwLock::new(0);
        {
            let _c = commit.lock();
            let _d = db.read();
            let _l = line.lock();
        }
        // Released: the other way round is fine one at a time.
        drop(line.lock());
        drop(commit.lock());
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _l = line.lock();
            let _c = commit.lock();
        }));
        let message = caught.expect_err("commit taken under line must panic");
        let message = message
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_default();
        assert!(
            message.contains("taking commit") && message.contains("while holding line"),
            "{message}"
        );
        // The panic left nothing counted: the right order works again.
        let _c = commit.lock();
        let _l = line.lock();
    }

    #[test]
    fn a_lock_of_the_same_rank_nests_only_where_allowed_and_a_read_never_nests() {
        let a: Mutex<u32, { rank::SESSION }> = Mutex::new(0);
        let b: Mutex<u32, { rank::SESSION }> = Mutex::new(0);
        {
            let _a = a.lock();
            let _b = b.lock();
        }
        let db: RwLock<u32, { rank::DB }> = RwLock::new(0);
        let twice = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _r = db.read();
            let _again = db.read();
        }));
        assert!(
            twice.is_err(),
            "a second read of db by one thread must panic"
        );
        // try_lock is not checked, but what it takes counts.
        let line: Mutex<u32, { rank::LINE }> = Mutex::new(0);
        let commit: Mutex<u32, { rank::COMMIT }> = Mutex::new(0);
        let _l = line.try_lock().expect("free");
        let under = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _c = commit.lock();
        }));
        assert!(under.is_err(), "commit under a try_locked line must panic");
    }
}
