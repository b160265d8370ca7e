//! A full collection (Durus's pack) that does not hold the commit order
//! while it marks: its memory is one bit an oid, and the set of oids
//! commits change while it runs.
//!
//! 1. Under `catch_up`, a snapshot is taken at the end of the commit log
//!    (`T0`), and from then on every oid a commit changes (through this
//!    front end or, read from the log, through any other) is noted.
//! 2. In the snapshot, everything the root reaches is marked (no order
//!    held: commits flow).
//! 3. The snapshot's oids not marked are the candidates, read in oid order.
//!    A batch of them is removed under the order: first the records of
//!    every oid changed since `T0` (their current versions) are read, and
//!    what they reference is marked, with everything that reaches in
//!    turn; the candidates still unmarked are deleted, and the deletion is
//!    a commit of its own in the log, so every front end tells its
//!    sessions.
//!
//! Why nothing reachable is deleted: an object unreachable at `T0` becomes
//! reachable again only through a commit that writes a record referencing
//! it (directly, or through other objects unreachable at `T0`), and every
//! commit up to the one before the deletion was noted and its records'
//! references marked. Objects that became unreachable after `T0`, and new
//! objects referenced by nothing, stay until the next collection.
//!
//! With a grace window (the background collector's, never a pack's), the
//! snapshot's transaction ends after the mark and the collection waits
//! until the window has passed since `T0` before it removes anything;
//! meanwhile, and again under the order before each batch is removed, it
//! reads the references of every commit logged since `T0` (`durus_log.refs`)
//! and marks them, with what they reach. So an object unreachable at `T0`
//! goes only if no commit referenced it since, for at least the window:
//! an application that detached it and attaches it again within the window
//! keeps it, also if it detaches it once more before the collection ends.
//! The log is kept for it (this front end's position, which bounds the
//! trimming, stays at what the collection has read). A log entry without
//! references (written by a front end of format 1 still running) stops
//! such a collection with an error; a pack does not need them.
//!
//! One collection runs at a time across front ends: it holds a lease, the
//! `collector` row of `durus_meta` naming its front end, and keeps its
//! front end's `alive_at` fresh; a front end silent for
//! [`LEASE_SECONDS`] loses the lease to the next collection. (Two at once,
//! from front ends of an older version, would still be safe: each batch's
//! check is under the order.)

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Conn, PgBackend, WALK_BATCH, database, fetch, key, oid_of, oids_bytes, oids_from};
use crate::error::{InvalidInput, Result, StorageError};
use crate::gc::FullReport;
use crate::record::{Oid, refs_of};
use crate::server::DatabaseGc;

/// Candidates deleted under the order at a time: the order is held for
/// the check and one `DELETE` of at most this many oids.
const SWEEP_BATCH: usize = 2000;

/// Oids read from the snapshot at a time while looking for candidates.
const SCAN_BATCH: i64 = 10_000;

/// Log entries whose references are read at a time.
const REFS_BATCH: i64 = 1000;

/// How often a collection waiting out its grace window reads the
/// references of new commits, and marks what commits changed.
const WAIT_STEP: Duration = Duration::from_millis(500);

/// A collector's front end silent for this long loses the lease.
pub(super) const LEASE_SECONDS: f64 = 120.0;

/// How often a running collection says its front end is alive.
const RENEW_EVERY: Duration = Duration::from_secs(10);

/// Oids marked: one bit per oid, in pages of 65,536 oids (8 KiB), so that
/// a store of 10 million dense oids takes 1.25 MiB and a few oids at the
/// top of the range take a page each.
#[derive(Default)]
struct Marks {
    pages: HashMap<u64, Box<[u64; 1024]>>,
}

impl Marks {
    /// Marks `oid`; true if it was not marked yet.
    fn set(&mut self, oid: Oid) -> bool {
        let page = self
            .pages
            .entry(oid.0 >> 16)
            .or_insert_with(|| Box::new([0; 1024]));
        let i = (oid.0 & 0xffff) as usize;
        let bit = 1u64 << (i % 64);
        let was = page[i / 64] & bit != 0;
        page[i / 64] |= bit;
        !was
    }

    fn get(&self, oid: Oid) -> bool {
        let i = (oid.0 & 0xffff) as usize;
        self.pages
            .get(&(oid.0 >> 16))
            .is_some_and(|page| page[i / 64] & (1u64 << (i % 64)) != 0)
    }
}

/// Marks what the records of `todo` reference, and on from there, reading
/// on `conn`: the records of oids marked here are read in turn.
fn mark_from(
    conn: &mut Conn,
    marks: &mut Marks,
    mut todo: Vec<Oid>,
    stop: &mut dyn FnMut() -> bool,
    root_seen: &mut bool,
) -> Result<bool> {
    while !todo.is_empty() {
        if stop() {
            return Ok(false);
        }
        let batch: Vec<Oid> = todo.split_off(todo.len().saturating_sub(WALK_BATCH));
        let found = fetch(conn, &batch)?;
        for (oid, (_, bytes)) in &found {
            if *oid == Oid::ROOT {
                *root_seen = true;
            }
            let refs = refs_of(bytes).map_err(|e| {
                StorageError::damaged(format!("the record of oid {oid} does not decode: {e}"))
            })?;
            todo.extend(refs.filter(|r| marks.set(*r)));
        }
    }
    Ok(true)
}

impl PgBackend {
    /// Takes the collector's lease for this front end. `Some(holder)` if
    /// another front end, alive, holds it.
    pub(super) fn take_lease(&self, background: bool) -> Result<Option<i64>> {
        let mut conn = self.pool.get()?;
        conn.batch("BEGIN")?;
        let taken = (|| -> Result<Option<i64>> {
            conn.execute(
                "INSERT INTO durus_meta (name, value) VALUES ('collector', $1) \
                 ON CONFLICT (name) DO NOTHING",
                &[&self.front_end],
            )?;
            let holder: i64 = conn.query(
                "SELECT value FROM durus_meta WHERE name = 'collector' FOR UPDATE",
                &[],
            )?[0]
                .get(0);
            if holder != self.front_end {
                let alive = !conn
                    .query(
                        "SELECT 1 FROM durus_front_ends WHERE id = $1 \
                         AND alive_at > now() - interval '1 second' * $2",
                        &[&holder, &LEASE_SECONDS],
                    )?
                    .is_empty();
                let in_background = !conn
                    .query(
                        "SELECT 1 FROM durus_meta WHERE name = 'collector_background' \
                         AND value = $1",
                        &[&holder],
                    )?
                    .is_empty();
                if alive && (background || !in_background) {
                    return Ok(Some(holder));
                }
                if alive {
                    tracing::info!(
                        "a pack takes the collector's lease from the background collection \
                         of front end {holder}, which stops"
                    );
                } else {
                    tracing::warn!(
                        "front end {holder} held the collector's lease and has been silent \
                         for {LEASE_SECONDS} s: its collection is taken over"
                    );
                }
                conn.execute(
                    "UPDATE durus_meta SET value = $1 WHERE name = 'collector'",
                    &[&self.front_end],
                )?;
            }
            conn.execute(
                "DELETE FROM durus_meta WHERE name = 'collector_background'",
                &[],
            )?;
            if background {
                conn.execute(
                    "INSERT INTO durus_meta (name, value) VALUES ('collector_background', $1)",
                    &[&self.front_end],
                )?;
            }
            conn.execute(
                "UPDATE durus_front_ends SET alive_at = now() WHERE id = $1",
                &[&self.front_end],
            )?;
            Ok(None)
        })();
        match taken {
            Ok(holder) => {
                conn.batch("COMMIT")?;
                Ok(holder)
            }
            Err(e) => {
                let _ = conn.batch("ROLLBACK");
                Err(e)
            }
        }
    }

    /// Says this front end is alive (its collection goes on); false if
    /// the lease is no longer this front end's (a pack took it over).
    fn renew_lease(&self) -> Result<bool> {
        let mut conn = self.pool.get()?;
        conn.execute(
            "UPDATE durus_front_ends SET alive_at = now() WHERE id = $1",
            &[&self.front_end],
        )?;
        Ok(!conn
            .query(
                "SELECT 1 FROM durus_meta WHERE name = 'collector' AND value = $1",
                &[&self.front_end],
            )?
            .is_empty())
    }

    /// Gives the lease up, if this front end holds it.
    fn release_lease(&self) -> Result<()> {
        self.pool.get()?.execute(
            "DELETE FROM durus_meta WHERE name IN ('collector', 'collector_background') \
             AND value = $1",
            &[&self.front_end],
        )?;
        Ok(())
    }

    /// A full collection: see the module's documentation. Refused while
    /// another front end's collection holds the lease.
    pub(super) fn collect(
        &self,
        grace: Duration,
        background: bool,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<FullReport> {
        // A pack makes a background collection of this front end or
        // another give way to it.
        if !background {
            self.packs_waiting.fetch_add(1, Ordering::AcqRel);
        }
        let _one = self.collector.lock();
        if !background {
            self.packs_waiting.fetch_sub(1, Ordering::AcqRel);
        }
        if let Some(holder) = self.take_lease(background)? {
            return Err(database(format!(
                "a full collection is running on front end {holder} (it holds the \
                 collector's lease): this one is not started; run it again when that \
                 one has finished"
            )));
        }
        let result = {
            let mut renewed = Instant::now();
            let mut lost = false;
            let mut stop = || {
                if renewed.elapsed() >= RENEW_EVERY {
                    renewed = Instant::now();
                    match self.renew_lease() {
                        Ok(held) => lost = !held,
                        Err(e) => tracing::warn!("the collector's lease was not renewed: {e}"),
                    }
                }
                lost || (background && self.packs_waiting.load(Ordering::Acquire) > 0) || stop()
            };
            self.collect_holding(grace, &mut stop)
        };
        if let Err(e) = self.release_lease() {
            tracing::warn!(
                "the collector's lease was not given up ({e}): another front end takes it \
                 over after {LEASE_SECONDS} s"
            );
        }
        result
    }

    /// Objects this front end's collections removed so far.
    pub(super) fn removed_by_collections(&self) -> u64 {
        self.state.lock().removed_full
    }

    /// Runs collections with `policy`'s grace window on a thread of its
    /// own whenever one is due (see [`DatabaseGc`]), for as long as the
    /// backend lives. A collection refused by another front end's lease,
    /// or failed, is tried again when the next one is due.
    pub(crate) fn start_collector(backend: &Arc<PgBackend>, policy: DatabaseGc) {
        let weak = Arc::downgrade(backend);
        let spawned = std::thread::Builder::new()
            .name("durus-collector".into())
            .spawn(move || {
                let step = policy
                    .check_every
                    .clamp(Duration::from_millis(10), Duration::from_millis(100));
                let mut looked = Looked::default();
                loop {
                    let mut waited = Duration::ZERO;
                    loop {
                        std::thread::sleep(step);
                        waited += step;
                        if weak.strong_count() == 0 {
                            return;
                        }
                        if waited >= policy.check_every {
                            break;
                        }
                    }
                    let Some(backend) = weak.upgrade() else {
                        return;
                    };
                    if backend.closed.load(Ordering::Acquire) {
                        return;
                    }
                    match backend.collection_due(&policy, &mut looked) {
                        Ok(false) => continue,
                        Ok(true) => {}
                        Err(e) => {
                            tracing::warn!(
                                "the collector could not tell if a collection is due: {e}"
                            );
                            continue;
                        }
                    }
                    tracing::info!(
                        "a collection with a grace window of {:.0} s starts",
                        policy.grace.as_secs_f64()
                    );
                    // Stops when the backend is closed or let go.
                    let gone = || {
                        Arc::strong_count(&backend) <= 1 || backend.closed.load(Ordering::Acquire)
                    };
                    let mut stop = gone;
                    match backend.collect(policy.grace, true, &mut stop) {
                        Ok(r) if r.completed => tracing::info!(
                            "collection: {} objects ({} bytes) removed, {} live, in {:.1} s",
                            r.removed_objects,
                            r.removed_bytes,
                            r.live_objects,
                            r.elapsed.as_secs_f64()
                        ),
                        Ok(_) if gone() => return,
                        Ok(_) => tracing::info!(
                            "the collection gave way to a pack (or lost its lease to one)"
                        ),
                        Err(e) if e.to_string().contains("is running on front end") => {
                            tracing::debug!("{e}")
                        }
                        Err(e) => tracing::warn!("the collection failed (tried again later): {e}"),
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!("no collector thread ({e}): garbage stays until a pack");
        }
    }

    /// Whether a collection is due: `policy.after_commits` commits since
    /// the last collection of any front end (or this one's last try; since
    /// the database was made if none ran), or `policy.interval` with a
    /// commit since (if none ran: since a front end first looked, the row
    /// `gc_since`, which a restart does not move); with `idle_only`, only if
    /// no commit came since the last look.
    pub(super) fn collection_due(&self, policy: &DatabaseGc, looked: &mut Looked) -> Result<bool> {
        let mut conn = self.pool.get()?;
        let tid: i64 = conn
            .query("SELECT tid FROM durus_order WHERE id = 1", &[])?
            .first()
            .map(|row| row.get(0))
            .ok_or_else(|| database("the database has no commit order row"))?;
        if looked.tid.is_none() {
            conn.execute(
                "INSERT INTO durus_meta (name, value) \
                 VALUES ('gc_since', extract(epoch FROM now())::bigint) \
                 ON CONFLICT (name) DO NOTHING",
                &[],
            )?;
        }
        // Before any collection completed: the commits since the
        // database was made, the time since a front end first looked.
        let rows = conn.query(
            "SELECT coalesce(max(value) FILTER (WHERE name = 'collected_tid'), 0), \
                    extract(epoch FROM now())::bigint - coalesce( \
                        max(value) FILTER (WHERE name = 'collected_at'), \
                        max(value) FILTER (WHERE name = 'gc_since'), \
                        extract(epoch FROM now())::bigint) \
             FROM durus_meta WHERE name IN ('collected_tid', 'collected_at', 'gc_since')",
            &[],
        )?;
        let (mut since_tid, mut ago): (i64, i64) = (rows[0].get(0), rows[0].get(1));
        if let Some((tried_tid, tried_at)) = looked.tried {
            since_tid = since_tid.max(tried_tid);
            ago = ago.min(tried_at.elapsed().as_secs() as i64);
        }
        let quiet = looked.tid == Some(tid);
        looked.tid = Some(tid);
        let commits = tid.saturating_sub(since_tid).max(0) as u64;
        let due = commits >= policy.after_commits.max(1)
            || (commits > 0 && ago >= policy.interval.as_secs() as i64);
        if due && (quiet || !policy.idle_only) {
            looked.tried = Some((tid, Instant::now()));
            return Ok(true);
        }
        Ok(false)
    }

    /// Records that a collection from a snapshot at `tid` completed.
    fn collected(&self, tid: u64) -> Result<()> {
        self.pool.get()?.execute(
            "INSERT INTO durus_meta (name, value) \
             VALUES ('collected_tid', $1), ('collected_at', extract(epoch FROM now())::bigint) \
             ON CONFLICT (name) DO UPDATE SET value = excluded.value",
            &[&(tid as i64)],
        )?;
        Ok(())
    }

    /// [`collect`](Self::collect), the lease held.
    fn collect_holding(
        &self,
        grace: Duration,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<FullReport> {
        let began = Instant::now();

        let (snapshot, t0) = {
            let _log = self.catch_up.lock();
            let (snapshot, t0) = self.snapshot_at_log_end()?;
            let mut st = self.state.lock();
            st.collecting = Some(std::collections::HashSet::new());
            st.collect_lost = false;
            st.refs_read = (!grace.is_zero()).then_some(t0);
            (snapshot, t0)
        };
        /// Stops the noting of changes however the collection ends.
        struct Noting<'a>(&'a PgBackend);
        impl Drop for Noting<'_> {
            fn drop(&mut self) {
                let mut st = self.0.state.lock();
                st.collecting = None;
                st.refs_read = None;
            }
        }
        let noting = Noting(self);
        let mut conn = snapshot.into_conn();
        let mut run = Run {
            marks: Marks::default(),
            grace,
            refs_read: t0,
            started: Instant::now(),
        };
        let result = self.collect_from(&mut conn, &mut run, stop);
        drop(noting);
        if conn.batch("ROLLBACK").is_ok() {
            self.pool.give_back(conn);
        }
        let mut report = result?;
        report.elapsed = began.elapsed();
        if report.completed {
            self.state.lock().full_collections += 1;
            if let Err(e) = self.collected(t0) {
                tracing::warn!("the collection's end was not recorded: {e}");
            }
        }
        Ok(report)
    }

    /// Marks in the snapshot on `snap`, then (with a grace window) ends
    /// the snapshot and waits out the window, then removes the unmarked in
    /// batches under the order. `snap` stays this collection's connection
    /// throughout: if it is lost (as in a failover), the collection stops.
    fn collect_from(
        &self,
        snap: &mut Conn,
        run: &mut Run,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<FullReport> {
        // (`elapsed` is set by the caller, from before the snapshot.)
        let mut report = FullReport {
            completed: true,
            passes: 1,
            ..FullReport::default()
        };
        let any = snap.query("SELECT oid FROM durus_records WHERE chunk = 0 LIMIT 1", &[])?;
        if any.is_empty() {
            return Ok(report);
        }
        let marks = &mut run.marks;
        marks.set(Oid::ROOT);
        let mut root_seen = false;
        if !mark_from(snap, marks, vec![Oid::ROOT], stop, &mut root_seen)? {
            report.completed = false;
            return Ok(report);
        }
        if !root_seen {
            return Err(InvalidInput::NoRoot.into());
        }
        if !run.grace.is_zero() {
            // The candidates are read from the current state from here on:
            // an oid stored since `T0` was written since, and is marked
            // before any batch is removed.
            snap.batch("ROLLBACK")?;
            if !self.wait_out_grace(snap, run, stop)? {
                report.completed = false;
                return Ok(report);
            }
        }
        // From the lowest key (oids from 2^63 up are negative bigints).
        let mut from = Some(i64::MIN);
        let mut present = 0u64;
        let mut scanned_all = false;
        while !scanned_all {
            let mut candidates = Vec::new();
            while candidates.len() < SWEEP_BATCH {
                let Some(at) = from else {
                    scanned_all = true;
                    break;
                };
                if stop() {
                    report.completed = false;
                    return Ok(report);
                }
                let rows = snap.query(
                    "SELECT oid FROM durus_records WHERE chunk = 0 AND oid >= $1 \
                     ORDER BY oid LIMIT $2",
                    &[&at, &SCAN_BATCH],
                )?;
                if rows.is_empty() {
                    scanned_all = true;
                    break;
                }
                for row in &rows {
                    let k: i64 = row.get(0);
                    from = k.checked_add(1);
                    present += 1;
                    let oid = oid_of(k);
                    if !run.marks.get(oid) {
                        candidates.push(oid);
                        if candidates.len() == SWEEP_BATCH {
                            // The rest of these rows are read again.
                            break;
                        }
                    }
                }
            }
            if candidates.is_empty() {
                continue;
            }
            if stop() {
                report.completed = false;
                break;
            }
            // What commits referenced and changed since the last look is
            // marked before the order is taken, so that only the last few
            // entries are read under it.
            if !run.grace.is_zero() && !self.mark_changes(snap, run, stop)? {
                report.completed = false;
                break;
            }
            let Some((objects, bytes)) = self.sweep(snap, run, &candidates, stop)? else {
                report.completed = false;
                break;
            };
            report.removed_objects += objects;
            report.removed_bytes += bytes;
        }
        report.live_objects = present - report.removed_objects;
        Ok(report)
    }

    /// Deletes those of `candidates` that nothing changed since the
    /// snapshot references (and that nothing it references reaches), in
    /// one commit under the order. Returns the objects and bytes removed,
    /// or `None` if `stop` said stop (nothing removed).
    fn sweep(
        &self,
        snap: &mut Conn,
        run: &mut Run,
        candidates: &[Oid],
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<(u64, u64)>> {
        let mut order = self.order.lock();
        if let Some(sent) = self.end_batch(&mut order)? {
            self.flush_barrier(sent)?;
        }
        if order.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
            order.conn = Some(self.order_conn()?);
        }
        let conn = order.conn.as_mut().expect("just connected");
        let tid = self.take_order(conn)?;
        let checked = (|| -> Result<Option<(Vec<Oid>, u64)>> {
            let written = {
                let mut st = self.state.lock();
                if st.collect_lost {
                    return Err(lost_track());
                }
                std::mem::take(st.collecting.as_mut().expect("set while collecting"))
            };
            // The collection's connection still reaches the database it
            // marked in: a failover since would have closed it (and may
            // have lost commits this front end read).
            snap.batch("SELECT 1").map_err(|e| {
                database(format!(
                    "the collection's connection to the database was lost ({e}): nothing \
                     more is removed; run it again"
                ))
            })?;
            let marks = &mut run.marks;
            if !run.grace.is_zero()
                && !self.mark_logged_refs(conn, marks, &mut run.refs_read, tid, stop)?
            {
                return Ok(None);
            }
            // Changed since the snapshot: kept, with what they reference.
            let todo: Vec<Oid> = written.into_iter().collect();
            for oid in &todo {
                marks.set(*oid);
            }
            let mut root_seen = false;
            if !mark_from(conn, marks, todo, stop, &mut root_seen)? {
                return Ok(None);
            }
            let dead: Vec<Oid> = candidates
                .iter()
                .copied()
                .filter(|o| !marks.get(*o))
                .collect();
            if dead.is_empty() {
                return Ok(Some((dead, 0)));
            }
            let keys: Vec<i64> = dead.iter().map(|o| key(*o)).collect();
            let rows = conn.query(
                "DELETE FROM durus_records WHERE oid = ANY($1) \
                 RETURNING oid, length(data)::bigint",
                &[&keys],
            )?;
            let bytes: i64 = rows.iter().map(|r| r.get::<_, i64>(1)).sum();
            // Another collection may have removed some already.
            let mut dead: Vec<Oid> = rows.iter().map(|r| oid_of(r.get(0))).collect();
            dead.sort_unstable();
            dead.dedup();
            if dead.is_empty() {
                return Ok(Some((dead, 0)));
            }
            let next = (tid + 1) as i64;
            conn.execute(
                "INSERT INTO durus_log (tid, oids, refs) VALUES ($1, $2, '')",
                &[&next, &oids_bytes(&dead)],
            )?;
            conn.execute(
                "UPDATE durus_order SET tid = $1, objects = objects - $2 WHERE id = 1",
                &[&next, &(dead.len() as i64)],
            )?;
            Ok(Some((dead, bytes as u64)))
        })();
        let (dead, bytes) = match checked {
            Ok(Some((dead, bytes))) if !dead.is_empty() => (dead, bytes),
            other => {
                if conn.batch("ROLLBACK").is_err() {
                    order.conn = None;
                }
                return match other {
                    Ok(Some(_)) => Ok(Some((0, 0))),
                    Ok(None) => Ok(None),
                    Err(e) => Err(e),
                };
            }
        };
        let sent = std::time::Instant::now();
        {
            let _log = self.catch_up.lock();
            if let Err(e) = conn.batch("COMMIT") {
                order.conn = None;
                self.outcome_unknown();
                return Err(e);
            }
            let mut st = self.state.lock();
            st.publish(None, &dead);
            st.known = tid + 1;
            st.removed_full += dead.len() as u64;
        }
        drop(order);
        self.flush_barrier(sent)?;
        Ok(Some((dead.len() as u64, bytes)))
    }

    /// Waits until the grace window has passed since the collection's
    /// snapshot, marking meanwhile what commits reference and change.
    /// `false` if `stop` said stop.
    fn wait_out_grace(
        &self,
        conn: &mut Conn,
        run: &mut Run,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<bool> {
        loop {
            if stop() || !self.mark_changes(conn, run, stop)? {
                return Ok(false);
            }
            let Some(left) = run.grace.checked_sub(run.started.elapsed()) else {
                return Ok(true);
            };
            std::thread::sleep(left.min(WAIT_STEP));
        }
    }

    /// Marks what commits changed and referenced since the last call (as
    /// far as this front end has read the log), with what that reaches
    /// now. The changed oids are marked now rather than kept in the set
    /// until a batch is removed (the set would grow with every oid changed
    /// during the window; marks are a bit an oid). `false` if `stop` said
    /// stop.
    fn mark_changes(
        &self,
        conn: &mut Conn,
        run: &mut Run,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<bool> {
        let (known, written) = {
            let mut st = self.state.lock();
            if st.collect_lost {
                return Err(lost_track());
            }
            let written = std::mem::take(st.collecting.as_mut().expect("set while collecting"));
            (st.known, written)
        };
        let todo: Vec<Oid> = written.into_iter().filter(|o| run.marks.set(*o)).collect();
        let mut root_seen = false;
        if !mark_from(conn, &mut run.marks, todo, stop, &mut root_seen)? {
            return Ok(false);
        }
        self.mark_logged_refs(conn, &mut run.marks, &mut run.refs_read, known, stop)
    }

    /// Marks what the records of the commits logged after `*read_to` and
    /// up to `upto` referenced, and what that reaches now, reading on
    /// `conn`; moves `*read_to` on (and this front end's position with it,
    /// which keeps those entries from being trimmed until read). `false`
    /// if `stop` said stop.
    fn mark_logged_refs(
        &self,
        conn: &mut Conn,
        marks: &mut Marks,
        read_to: &mut u64,
        upto: u64,
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<bool> {
        while *read_to < upto {
            let rows = conn.query(
                "SELECT tid, refs FROM durus_log WHERE tid > $1 AND tid <= $2 \
                 ORDER BY tid LIMIT $3",
                &[&(*read_to as i64), &(upto as i64), &REFS_BATCH],
            )?;
            if rows.is_empty() {
                return Err(lost_track());
            }
            let mut todo = Vec::new();
            for row in &rows {
                let tid = row.get::<_, i64>(0) as u64;
                if tid != *read_to + 1 {
                    return Err(lost_track());
                }
                let Some(refs) = row.get::<_, Option<&[u8]>>(1) else {
                    return Err(database(format!(
                        "commit {tid} was logged by a front end of an earlier version, \
                         without the references of its records: a collection with a grace \
                         window cannot tell what it re-attached, and removes nothing more \
                         (stop the front ends of versions before 0.10; a pack, which has no \
                         grace window, is not affected)"
                    )));
                };
                todo.extend(oids_from(refs)?.into_iter().filter(|o| marks.set(*o)));
                *read_to = tid;
            }
            let mut root_seen = false;
            if !mark_from(conn, marks, todo, stop, &mut root_seen)? {
                return Ok(false);
            }
            self.state.lock().refs_read = Some(*read_to);
        }
        Ok(true)
    }
}

/// What the background collector saw when it last looked.
#[derive(Default)]
pub(super) struct Looked {
    /// The order's tid.
    tid: Option<i64>,
    /// The tid and time of this front end's last collection started.
    tried: Option<(i64, Instant)>,
}

/// One collection's progress.
struct Run {
    marks: Marks,
    /// Zero for a pack.
    grace: Duration,
    /// The references of every commit logged up to this tid are marked.
    refs_read: u64,
    /// When the snapshot was taken (`T0`).
    started: Instant,
}

fn lost_track() -> StorageError {
    database(
        "this front end lost track of the commit log during the collection \
         (entries trimmed, or commits lost in a failover): nothing more is \
         removed; run it again",
    )
}

#[cfg(test)]
mod tests {
    use super::Marks;
    use crate::record::Oid;

    #[test]
    fn marks_are_one_bit_an_oid_and_take_sparse_oids_at_the_top() {
        let mut m = Marks::default();
        for oid in [0, 1, 63, 64, 65_535, 65_536, u64::MAX, u64::MAX - 1] {
            assert!(!m.get(Oid(oid)));
            assert!(m.set(Oid(oid)), "{oid}");
            assert!(!m.set(Oid(oid)), "{oid} twice");
            assert!(m.get(Oid(oid)));
        }
        assert!(!m.get(Oid(2)) && !m.get(Oid(65_537)) && !m.get(Oid(u64::MAX - 2)));
        assert_eq!(m.pages.len(), 3);
    }
}
