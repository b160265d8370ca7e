//! Sessions (an in-process handle or a server connection), what each must
//! treat as invalid, snapshots, and oid allocation.
//!
//! # Invalidations: one shared log, not a set per session
//! Every commit (and every collection) publishes the oids it changed once,
//! as one entry of a shared [`ChangeLog`] numbered in publication order. A
//! session remembers only how far it has read (`seen`): its invalidations
//! are the entries after that, gathered when it syncs or commits. A commit
//! therefore costs O(its oids), whatever the number of sessions, and an
//! oid's latest change is one map lookup away for a load's check.
//!
//! Entries every session has read are dropped. A session that lags (an
//! idle connection) pins at most [`CHANGE_LOG_CAP`] oids of the shared
//! log; beyond that the oldest entries move into the lagging sessions' own
//! sets, which hold each distinct oid once, and only oids that existed when
//! the session last synced (see `SessionState::oid_mark`): an idle session
//! costs at most one set entry per object of the store it last saw. A
//! change nobody else needs (one session only) is not published at all.
//!
//! # Snapshots
//! A snapshot is a redb read transaction taken exactly at a publication
//! boundary: the `publish` lock is held by a writer from its log entry
//! through its redb commit, and by a session from its `begin_read` to
//! reading the log's end. The snapshot's state therefore contains exactly
//! the entries up to the sequence number it records, and a sync hands out
//! exactly those.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::ranked::{Mutex, MutexGuard, rank};
use redb::{ReadOnlyTable, ReadTransaction};

use super::Engine;
use super::layout::RECORDS;
use crate::error::{Result, StorageError};
use crate::record::Oid;

/// An identifier of a session.
pub(crate) type SessionId = u64;

/// How many oids the shared change log holds at most for lagging sessions
/// before it moves its oldest entries into their own sets (about 8 MiB of
/// log and map at 32 bytes an oid).
pub(crate) const CHANGE_LOG_CAP: usize = 1 << 18;

/// Below this many oids the log is not trimmed (trimming looks at every
/// session, so it runs once per this many oids at least).
const TRIM_FLOOR: usize = 4096;

/// A hasher for oid keys: one multiply of the integer. Oids are
/// sequential integers chosen by the store, not by a client, so SipHash's
/// protection against chosen keys buys nothing here; a commit hashes every
/// oid it changes.
#[derive(Default, Clone, Copy)]
pub(crate) struct OidHasher(u64);

impl std::hash::Hasher for OidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0 ^ n)
            .wrapping_mul(0x9e37_79b9_7f4a_7c15)
            .rotate_left(29);
    }
}

type OidBuild = std::hash::BuildHasherDefault<OidHasher>;
type OidMap<V> = HashMap<Oid, V, OidBuild>;
type OidSet = HashSet<Oid, OidBuild>;

/// One publication: the oids a commit or a collection changed.
struct Change {
    seq: u64,
    /// The committing session (its own changes are not invalid to it).
    by: Option<SessionId>,
    oids: Vec<Oid>,
}

/// The shared log of changes since the oldest point a session still needs.
pub(crate) struct ChangeLog {
    /// Sequence number of the last publication (0: none since open).
    last: u64,
    entries: VecDeque<Change>,
    /// Oids in `entries`.
    held: usize,
    /// Each oid in `entries` with the sequence number and author of its
    /// latest change.
    latest: OidMap<(u64, Option<SessionId>)>,
    /// Trim when `held` exceeds this.
    trim_at: usize,
    /// [`CHANGE_LOG_CAP`] (smaller in tests).
    cap: usize,
    /// [`TRIM_FLOOR`] (smaller in tests).
    floor: usize,
}

/// What a session has been told.
#[derive(Debug)]
pub(crate) struct SessionState {
    /// The log's entries up to this one have been handed to the session.
    seen: u64,
    /// Oids of entries dropped from the log before the session read them.
    overflow: OidSet,
    /// Every oid handed out when the session last synced is below this,
    /// and every oid the session loaded or committed since
    /// ([`SessionState::hold`] raises it). An oid at or above it the
    /// session holds no copy of, so it never needs to be told of it, and
    /// `overflow` skips it: what a lagging session pins follows the store
    /// it last saw, not the history since.
    oid_mark: u64,
    /// Entries the session had not read were dropped from the log since it
    /// last synced: the log no longer knows every oid made since, so any oid
    /// at or above `oid_mark` counts as invalid to it.
    overflowed: bool,
    /// The turns of the commit order ordered when the session was last told
    /// of changes: it reads nothing before they are applied (their changes
    /// may have been published before they were applied).
    needs: u64,
}

impl Default for SessionState {
    fn default() -> Self {
        SessionState {
            seen: 0,
            needs: 0,
            overflow: OidSet::default(),
            oid_mark: u64::MAX,
            overflowed: false,
        }
    }
}

impl SessionState {
    /// Notes that the session takes a copy of `oid` (it loads or commits
    /// it). An oid at or above the mark is brought under it, so that a
    /// later trim of the log keeps its changes for the session. False if
    /// the log already dropped entries the session had not read: then
    /// its changes since may be lost to the session, which must treat it
    /// as invalid. (The highest oid, `u64::MAX`, cannot be brought under
    /// the mark: it stays covered by `overflowed` alone.)
    pub(crate) fn hold(&mut self, oid: Oid) -> bool {
        if oid.0 < self.oid_mark {
            return true;
        }
        if self.overflowed {
            return false;
        }
        self.oid_mark = oid.0.saturating_add(1);
        true
    }
}

/// What a session's load of one oid finds ([`Engine::load_for`]).
pub(crate) enum Found<'a> {
    /// Changed since the session's last sync: it must sync first.
    Invalid,
    /// The stored record.
    Record(&'a [u8]),
    /// No such record.
    Missing,
}

/// A session's state, shared with the engine (which may fill `overflow`).
pub(crate) type SessionRef = Arc<Mutex<SessionState, { rank::SESSION }>>;

/// Invalidations: the sessions, the change log they drain, the lock that
/// keeps publication and visibility together, and the snapshots held.
/// Owned here; the rest of the engine goes through its methods.
pub(crate) struct Invalidations {
    sessions: Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }>,
    /// Every change published since the oldest point a session needs.
    changes: crate::ranked::RwLock<ChangeLog, { rank::CHANGES }>,
    /// Held by a writer across publishing a change and making it visible in
    /// redb, and while a snapshot is taken: snapshots fall between
    /// publications.
    publish: Mutex<(), { rank::PUBLISH }>,
    /// Snapshots held by sessions and backups.
    snapshots: Arc<SnapshotsHeld>,
    next_session: std::sync::atomic::AtomicU64,
}

impl Invalidations {
    pub(crate) fn new() -> Invalidations {
        Invalidations {
            sessions: Mutex::new(HashMap::new()),
            changes: crate::ranked::RwLock::new(ChangeLog::new()),
            publish: Mutex::new(()),
            snapshots: Arc::default(),
            next_session: std::sync::atomic::AtomicU64::new(1),
        }
    }

    /// Held by a writer from publishing a change until it is visible.
    pub(crate) fn publishing(&self) -> MutexGuard<'_, (), { rank::PUBLISH }> {
        self.publish.lock()
    }

    /// Counts a snapshot (a backup's) while the result lives.
    pub(crate) fn hold_snapshot(&self) -> HeldSnapshot {
        self.snapshots.hold()
    }
}

/// A consistent read-only view of the records as of one publication: the
/// state a session was last synced to.
pub(crate) struct Snapshot {
    table: ReadOnlyTable<u64, &'static [u8]>,
    _txn: ReadTransaction,
    /// The last publication the snapshot contains.
    seq: u64,
    /// Its place among the snapshots held.
    held: HeldSnapshot,
}

/// The read snapshots held (connections' snapshots, backups), for their
/// count and the oldest one's age: an old snapshot keeps every page that
/// later commits free from reuse.
#[derive(Default)]
pub(crate) struct SnapshotsHeld {
    next: std::sync::atomic::AtomicU64,
    taken: Mutex<HashMap<u64, std::time::Instant>, { rank::LEAF }>,
}

impl SnapshotsHeld {
    /// Counts a snapshot taken now until the returned value is dropped.
    pub(crate) fn hold(self: &Arc<Self>) -> HeldSnapshot {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let taken = std::time::Instant::now();
        self.taken.lock().insert(id, taken);
        HeldSnapshot {
            of: self.clone(),
            id,
            taken,
        }
    }

    /// How many are held, and how long ago the oldest was taken.
    pub(crate) fn census(&self) -> (usize, Option<std::time::Duration>) {
        let taken = self.taken.lock();
        let oldest = taken.values().min().map(|t| t.elapsed());
        (taken.len(), oldest)
    }
}

/// One snapshot counted in [`SnapshotsHeld`] while it lives.
pub(crate) struct HeldSnapshot {
    of: Arc<SnapshotsHeld>,
    id: u64,
    taken: std::time::Instant,
}

impl HeldSnapshot {
    /// How long ago the snapshot was taken.
    pub(crate) fn age(&self) -> std::time::Duration {
        self.taken.elapsed()
    }
}

impl Drop for HeldSnapshot {
    fn drop(&mut self) {
        self.of.taken.lock().remove(&self.id);
    }
}

impl std::fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Snapshot")
            .field("seq", &self.seq)
            .finish_non_exhaustive()
    }
}

impl Snapshot {
    /// Hands each of `oids`' bytes in the snapshot (checked, `None` where
    /// absent) to `each`, in order.
    pub(crate) fn load_each<E: From<StorageError>>(
        &self,
        oids: &[Oid],
        each: impl FnMut(Oid, Option<&[u8]>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        super::each_in(&self.table, oids, each)
    }

    /// How long ago the snapshot was taken.
    pub(crate) fn age(&self) -> std::time::Duration {
        self.held.age()
    }
}

impl ChangeLog {
    pub(super) fn new() -> ChangeLog {
        ChangeLog {
            last: 0,
            entries: VecDeque::new(),
            held: 0,
            latest: OidMap::default(),
            trim_at: TRIM_FLOOR,
            cap: CHANGE_LOG_CAP,
            floor: TRIM_FLOOR,
        }
    }

    /// Appends a publication, trimming the log when it has grown.
    fn publish(
        &mut self,
        by: Option<SessionId>,
        oids: &[Oid],
        sessions: &Mutex<HashMap<SessionId, SessionRef>, { rank::SESSIONS }>,
    ) {
        if oids.is_empty() {
            return;
        }
        {
            let sessions = sessions.lock();
            // The author holds what it committed: kept under its mark, or,
            // if the log already dropped entries it had not read, told to
            // it at its next sync (its copy may then miss a change).
            if let Some(author) = by.and_then(|b| sessions.get(&b)) {
                let mut st = author.lock();
                for oid in oids {
                    if !st.hold(*oid) {
                        st.overflow.insert(*oid);
                    }
                }
            }
            // Nobody to tell: no session but (maybe) the author. A session
            // registering meanwhile waits for `publish` (held by the
            // writer), so it only ever sees the change already made.
            let others = sessions.len() - by.map_or(0, |b| usize::from(sessions.contains_key(&b)));
            if others == 0 {
                return;
            }
        }
        self.push(by, oids);
        if self.held > self.trim_at {
            self.trim(&sessions.lock());
        }
    }

    /// [`flags`](Self::flags) for a load: each oid not invalid is held by
    /// the session from now on ([`SessionState::hold`]).
    fn flags_holding(&self, id: SessionId, st: &mut SessionState, oids: &[Oid]) -> Vec<bool> {
        let mut flags = self.flags(id, st, oids);
        for (oid, invalid) in oids.iter().zip(flags.iter_mut()) {
            if !*invalid && !st.hold(*oid) {
                *invalid = true;
            }
        }
        flags
    }

    /// For each of `oids`, whether session `id` must treat it as invalid.
    fn flags(&self, id: SessionId, st: &SessionState, oids: &[Oid]) -> Vec<bool> {
        oids.iter()
            .map(|oid| {
                st.overflow.contains(oid)
                    || (st.overflowed && oid.0 >= st.oid_mark)
                    || self
                        .latest
                        .get(oid)
                        .is_some_and(|(seq, by)| *seq > st.seen && *by != Some(id))
            })
            .collect()
    }

    /// The invalidations of session `id` up to publication `upto`.
    fn drain(&self, id: SessionId, st: &mut SessionState, upto: Option<u64>) -> Vec<Oid> {
        let upto = upto.unwrap_or(self.last);
        // A sorted, deduplicated list (the server sends it under the commit
        // lock at `C`: no set is built).
        let mut oids: Vec<Oid> = std::mem::take(&mut st.overflow).into_iter().collect();
        st.overflowed = false;
        if upto > st.seen {
            let start = self.entries.partition_point(|e| e.seq <= st.seen);
            for e in self.entries.range(start..) {
                if e.seq > upto {
                    break;
                }
                if e.by != Some(id) {
                    oids.extend_from_slice(&e.oids);
                }
            }
            st.seen = upto;
        }
        oids.sort_unstable();
        oids.dedup();
        oids
    }

    fn push(&mut self, by: Option<SessionId>, oids: &[Oid]) {
        self.last += 1;
        let seq = self.last;
        for &oid in oids {
            self.latest.insert(oid, (seq, by));
        }
        self.held += oids.len();
        self.entries.push_back(Change {
            seq,
            by,
            oids: oids.to_vec(),
        });
    }

    /// Drops the oldest entry, forgetting its oids' latest change where it
    /// was that entry's.
    fn pop(&mut self) -> Option<Change> {
        let e = self.entries.pop_front()?;
        self.held -= e.oids.len();
        for oid in &e.oids {
            if self.latest.get(oid).is_some_and(|(s, _)| *s == e.seq) {
                self.latest.remove(oid);
            }
        }
        Some(e)
    }

    /// Drops what every session has read; if the log is still over its cap,
    /// moves its oldest entries into the sets of the sessions that lag.
    fn trim(&mut self, sessions: &HashMap<SessionId, SessionRef>) {
        let states: Vec<(SessionId, MutexGuard<'_, SessionState, { rank::SESSION }>)> =
            sessions.iter().map(|(id, s)| (*id, s.lock())).collect();
        let min_seen = states
            .iter()
            .map(|(_, s)| s.seen)
            .min()
            .unwrap_or(self.last);
        while self.entries.front().is_some_and(|e| e.seq <= min_seen) {
            self.pop();
        }
        let mut states = states;
        if self.held > self.cap {
            while self.held > self.cap / 2 {
                let Some(e) = self.pop() else { break };
                for (id, st) in states.iter_mut() {
                    if st.seen < e.seq && e.by != Some(*id) {
                        st.overflowed = true;
                        let mark = st.oid_mark;
                        st.overflow
                            .extend(e.oids.iter().copied().filter(|o| o.0 < mark));
                    }
                }
            }
        }
        self.trim_at = (self.held * 2).clamp(self.floor, self.cap);
    }
}

impl Engine {
    /// Registers a session, up to date with every change published so far.
    pub(crate) fn register_session(&self) -> (SessionId, SessionRef) {
        let id = self.inv.next_session.fetch_add(1, Ordering::Relaxed);
        // Not between a change's publication (which may be skipped while no
        // other session exists) and its becoming visible.
        let _p = self.inv.publish.lock();
        let changes = self.inv.changes.read();
        let state: SessionRef = Arc::new(Mutex::new(SessionState {
            seen: changes.last,
            oid_mark: self.alloc.oids_out.load(Ordering::Acquire),
            ..SessionState::default()
        }));
        self.inv.sessions.lock().insert(id, state.clone());
        // Read after the session is registered: a commit that skipped
        // publishing for want of another session has its turn by then.
        state.lock().needs = self.turns_ordered();
        (id, state)
    }

    /// How many snapshots sessions hold now.
    /// How many snapshots are held (connections' and backups'), and how
    /// long ago the oldest was taken.
    pub(crate) fn snapshots_held(&self) -> (usize, Option<std::time::Duration>) {
        self.inv.snapshots.census()
    }

    /// How many sessions receive invalidations.
    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        self.inv.sessions.lock().len()
    }

    /// Forgets a session and the oids it held allocated but unused.
    pub(crate) fn unregister_session(&self, id: SessionId) {
        self.inv.sessions.lock().remove(&id);
        let mut allocs = self.alloc.allocs.lock();
        if allocs.by_session.remove(&id).is_some_and(|n| n > 0) {
            allocs.by_oid.retain(|_, s| *s != id);
        }
    }

    /// Publishes `oids` as changed by `by` (`None`: by the collector, so
    /// invalid to every session). Called right after the change became
    /// visible to readers, with `publish` held where snapshots must see
    /// exactly the published changes.
    pub(crate) fn publish_changes(&self, by: Option<SessionId>, oids: &[Oid]) {
        if !oids.is_empty() {
            self.inv
                .changes
                .write()
                .publish(by, oids, &self.inv.sessions);
        }
    }

    /// For each of `oids`, whether `session` must treat it as invalid: it
    /// changed (by another session, or was collected) after the session's
    /// last sync.
    pub(crate) fn invalid_flags(
        &self,
        id: SessionId,
        session: &SessionRef,
        oids: &[Oid],
    ) -> Vec<bool> {
        let log = self.inv.changes.read();
        let st = session.lock();
        log.flags(id, &st, oids)
    }

    /// A session's loads (the server's): for each of `oids`, `Invalid` if it
    /// changed (by another session, or was collected) after the session's
    /// last sync, else its stored bytes (checked) or `Missing`, in order,
    /// from one read transaction. The transaction begins before the flags
    /// are read: a commit's changes are published before they become
    /// visible, so every one the transaction holds beyond the session's
    /// last sync is flagged. (A collector deletion committed on its own is
    /// published just after it: such an oid may be found missing before it
    /// is flagged, which is harmless for garbage.) It begins after the
    /// turns the session was told of are applied.
    pub(crate) fn load_for<E: From<StorageError>>(
        &self,
        id: SessionId,
        session: &SessionRef,
        oids: &[Oid],
        mut each: impl FnMut(Found<'_>) -> std::result::Result<(), E>,
    ) -> std::result::Result<(), E> {
        self.await_session(session);
        let db = self.db()?;
        let txn = db.begin_read().map_err(E::from)?;
        let table = txn.open_table(RECORDS).map_err(StorageError::from)?;
        let flags = {
            let log = self.inv.changes.read();
            let mut st = session.lock();
            log.flags_holding(id, &mut st, oids)
        };
        for (oid, invalid) in oids.iter().zip(flags) {
            if invalid {
                each(Found::Invalid)?;
            } else {
                super::each_in(&table, std::slice::from_ref(oid), |_, bytes| match bytes {
                    Some(b) => each(Found::Record(b)),
                    None => each(Found::Missing),
                })?;
            }
        }
        Ok(())
    }

    /// Waits until what `session` was told of is applied (before a read on
    /// its behalf: a change is published before it is visible).
    pub(crate) fn await_session(&self, session: &SessionRef) {
        let needs = session.lock().needs;
        self.await_turns(needs);
    }

    /// Hands `session` its invalidations: every oid changed by others after
    /// its last sync, up to publication `upto` (or the latest), sorted.
    pub(crate) fn take_invalid(
        &self,
        id: SessionId,
        session: &SessionRef,
        upto: Option<u64>,
    ) -> Vec<Oid> {
        let log = self.inv.changes.read();
        let mut st = session.lock();
        // Read after any snapshot this sync takes: above every oid in it.
        st.oid_mark = self.alloc.oids_out.load(Ordering::Acquire);
        let oids = log.drain(id, &mut st, upto);
        // Read after the drain: a turn's number is handed out before its
        // changes are published, so this covers every change handed out.
        st.needs = self.turns_ordered();
        oids
    }

    /// A snapshot of the latest state, with the sequence number of the
    /// last publication it contains. Exact: `publish` keeps a writer from
    /// making a change visible without its log entry.
    pub(crate) fn snapshot(&self) -> Result<Snapshot> {
        let db = self.db()?;
        let _p = self.inv.publish.lock();
        let txn = db.begin_read()?;
        let seq = self.inv.changes.read().last;
        drop(_p);
        let table = txn.open_table(RECORDS)?;
        Ok(Snapshot {
            table,
            _txn: txn,
            seq,
            held: self.inv.snapshots.hold(),
        })
    }

    /// A sync in snapshot mode: a new snapshot and exactly the
    /// invalidations that bring the session to it.
    pub(crate) fn sync_to_snapshot(
        &self,
        id: SessionId,
        session: &SessionRef,
    ) -> Result<(Vec<Oid>, Snapshot)> {
        let snap = self.snapshot()?;
        let oids = self.take_invalid(id, session, Some(snap.seq));
        Ok((oids, snap))
    }
}

mod alloc;
#[cfg(test)]
mod tests;

pub(crate) use alloc::Allocator;
