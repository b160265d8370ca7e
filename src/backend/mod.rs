//! The backend seam: what the server serves Durus's protocol through.
//!
//! The server's connection loop, commit handshake, live state and metrics
//! talk only to [`Backend`] and the [`Session`]s it opens; nothing under
//! `server/` names a store's internals. The redb store implements it
//! (`store/backend.rs`), and so does [`memory::MemoryBackend`], a plain
//! in-memory model that keeps the seam honest: the server's protocol tests
//! and the Python Durus client scenarios run against both.
//!
//! What a backend promises the server:
//! - **Sessions.** A [`Session`] is one client's view: the oids changed by
//!   others since its last sync (its invalidations), its loads, the oids
//!   handed out to it and not yet stored. Dropping it forgets it.
//! - **The commit order.** [`Session::enter_order`] gives one global order:
//!   while it is held nothing else commits, so the invalidations sent to a
//!   client and the commit it answers with fall in one place of the order
//!   (Durus's rule). A backend may queue a committer and hand it the order
//!   later, running its [`Grant`] (which sends the client its
//!   invalidations) on the releasing thread; or it may simply block in
//!   `enter_order` until the order is free.
//! - **A commit** ([`Order::commit`]) is validated by the one rule in
//!   `storage::validate_commit`, applied all or nothing, and returns once it
//!   is as durable as the backend promises; the order is released as early
//!   as the backend can (at the latest when `commit` returns).
//! - **Loads** answer, for each oid, `Invalid` if it changed (by another
//!   session, or was collected) after the session's last sync, else the
//!   record or `Missing`; never a state older than what the session was
//!   told of.

pub(crate) mod memory;
#[cfg(feature = "postgres")]
pub(crate) mod postgres;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::error::Result;
use crate::gc::FullReport;
use crate::record::{Oid, Record};

/// What a session's load of one oid finds.
pub(crate) enum Found<'a> {
    /// Changed since the session's last sync: it must sync first.
    Invalid,
    /// The stored record's bytes.
    Record(&'a [u8]),
    /// No such record.
    Missing,
}

/// What a backup walk hands on: first the number of records, then each.
pub(crate) enum Walk<'a> {
    /// How many records follow.
    Count(u64),
    /// One record's bytes.
    Record(&'a [u8]),
}

/// How a queued place in the commit order stands.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Standing {
    /// Another holds the order.
    Waiting,
    /// The order is this place's since then (its grant ran).
    Granted(Instant),
    /// The grant failed: the client could not be told its invalidations.
    Failed,
}

/// Run by whoever hands the commit order to a queued committer, with that
/// committer's invalidations: sends them to its client, and says whether
/// that worked.
pub(crate) type Grant = Box<dyn FnOnce(&[Oid]) -> bool + Send>;

/// Called once if the backend stops taking commits for good, with why.
pub(crate) type PoisonWatch = Arc<dyn Fn(&str) + Send + Sync>;

/// Something held until dropped (the commit order at shutdown).
pub(crate) trait Hold {}

impl<T> Hold for T {}

/// A store the server can serve.
pub(crate) trait Backend: Send + Sync {
    /// A new session, up to date with every commit so far.
    fn open_session(&self) -> Box<dyn Session + '_>;

    /// The figures of the live state (`X`, `/metrics`); cheap: a scrape
    /// must not walk the store.
    fn live_state(&self) -> Result<LiveState>;

    /// A full collection: everything the root no longer reaches is
    /// removed, and invalid to every session. `stop` is asked between
    /// chunks of work; true stops it (the report then says not completed).
    fn full_collection(&self, stop: &mut dyn FnMut() -> bool) -> Result<FullReport>;

    /// Calls `watch` once, if the store stops taking commits for good.
    fn watch_poison(&self, watch: PoisonWatch);

    /// Takes the commit order and waits until every commit given a place
    /// in it is applied; nothing commits until the result is dropped.
    fn hold_commits(&self) -> Box<dyn Hold + '_>;

    /// Closes the store (checkpointed, where that means something).
    fn close(&self) -> Result<()>;
}

/// One client's view of a [`Backend`].
pub(crate) trait Session {
    /// The session's invalidations: every oid changed by others since its
    /// last sync, sorted; the session is synced to now.
    fn sync(&self) -> Vec<Oid>;

    /// A sync in snapshot mode: the invalidations, and a snapshot of
    /// exactly the state they bring the session to.
    fn sync_to_snapshot(&self) -> Result<(Vec<Oid>, Box<dyn Snapshot>)>;

    /// A snapshot of the latest state.
    fn snapshot(&self) -> Result<Box<dyn Snapshot>>;

    /// For each of `oids`, whether it changed since the session's last
    /// sync (or was collected).
    fn invalid_flags(&self, oids: &[Oid]) -> Vec<bool>;

    /// Hands what each of `oids` finds to `each`, in order, from one
    /// consistent state no older than what the session was told of;
    /// `each` returning false stops.
    fn load(&self, oids: &[Oid], each: &mut dyn FnMut(Found<'_>) -> bool) -> Result<()>;

    /// `n` new oids for this session, refused if it would then hold more
    /// than `cap` handed out and not yet stored. Never a stored oid.
    fn new_oids(&self, n: usize, cap: u64) -> Result<Vec<Oid>>;

    /// Walks a consistent copy of every record (for a backup), from a
    /// state no older than what the session was told of; `each` returning
    /// false stops.
    fn backup(&self, each: &mut dyn FnMut(Walk<'_>) -> bool) -> Result<()>;

    /// Takes the commit order, or a place in its queue. `grant` is called
    /// only if the session is queued and the backend hands the order over
    /// by running grants (see [`Grant`]).
    fn enter_order(&self, grant: &mut dyn FnMut() -> Grant) -> Entry<'_>;
}

/// What [`Session::enter_order`] gives.
pub(crate) enum Entry<'a> {
    /// The order is held now; the client must be sent its invalidations
    /// ([`Session::sync`]).
    Now(Box<dyn Order + 'a>),
    /// Another holds the order; the grant runs as it is handed over.
    Queued(Box<dyn Queued<'a> + 'a>),
}

/// A place in the commit order's queue, not yet served; given up (or the
/// order given back, if it was granted meanwhile) when dropped.
pub(crate) trait Queued<'a> {
    /// How the place stands now, without waiting.
    fn peek(&self) -> Standing;

    /// Waits until the place is served: the order, and when its grant
    /// ended; `None` if the grant failed.
    fn wait(self: Box<Self>) -> Option<(Box<dyn Order + 'a>, Instant)>;
}

/// The commit order, held. Dropped without a commit, it is released (the
/// client gave up after its invalidations).
pub(crate) trait Order {
    /// Commits `records` for the session that holds the order and returns
    /// once the commit is as durable as the backend promises. With
    /// `snapshot`, also a snapshot of the state just after it (or, if it
    /// was refused as a conflict, of the state before it).
    fn commit(
        self: Box<Self>,
        records: BTreeMap<Oid, Record>,
        snapshot: bool,
    ) -> (Result<()>, Option<Result<Box<dyn Snapshot>>>);
}

/// A consistent read-only view of the records at one moment.
pub(crate) trait Snapshot {
    /// How long ago it was taken.
    fn age(&self) -> Duration;

    /// Hands each of `oids`' bytes in the snapshot (`None` where absent)
    /// to `each`, in order; `each` returning false stops.
    fn load_each(
        &self,
        oids: &[Oid],
        each: &mut dyn FnMut(Oid, Option<&[u8]>) -> bool,
    ) -> Result<()>;
}

/// The figures of a backend's live state.
#[derive(Debug, Clone, Default)]
pub(crate) struct LiveState {
    /// Commits are taken (not poisoned).
    pub(crate) healthy: bool,
    pub(crate) objects: u64,
    /// The store's size on disk (0 where there is no file).
    pub(crate) file_bytes: u64,
    /// Snapshots held, and the oldest one's age.
    pub(crate) snapshots_held: usize,
    pub(crate) snapshot_oldest: Option<Duration>,
    /// Committers waiting for the commit order now.
    pub(crate) order_waiting: u64,
    /// Acknowledged commits not yet durable in the store itself, and the
    /// time since it last was.
    pub(crate) commits_not_durable: u64,
    pub(crate) since_checkpoint: Duration,
    /// The collector: its queue, what of it waits out the grace window,
    /// how old its oldest entry is, whether a full collection runs.
    pub(crate) gc_queue: u64,
    pub(crate) gc_waiting: u64,
    pub(crate) gc_oldest: Option<Duration>,
    pub(crate) gc_full_running: bool,
    pub(crate) gc_removed_incremental: u64,
    pub(crate) gc_removed_full: u64,
    pub(crate) gc_full_collections: u64,
}
