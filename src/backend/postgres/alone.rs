//! A front end alone: while it is the only one committing, it serves loads
//! and syncs from memory, with no database round trip.
//!
//! A load must be answered as one Durus server would: `Invalid` for an
//! object changed since the session's last sync, by whichever front end.
//! Knowing that needs the commit log read up to the present, a round trip,
//! unless no other front end can commit. A front end that saw no commit of
//! another for `--alone-after` takes the database alone: under the commit
//! order (so after every commit before it, which it reads), it writes its
//! id as `durus_alone.holder`. From then on, every other front end finds
//! the holder when it takes the order (the same round trip), gives the
//! order back, asks the holder to give way (`wanted`) and waits.
//!
//! The holder renews its hold every [`RENEW_EVERY`] (a counter in the
//! row). A renewal sent at T, once answered, lets it serve from memory
//! until T + [`LEASE`] by its own clock. When a renewal finds `wanted`, it
//! stops serving from memory first, then clears `holder`. A waiting front
//! end that sees the counter unchanged for [`TAKEOVER`] (longer than
//! [`LEASE`]) from when it read it takes the row over itself (an update
//! on the counter's value it read): any renewal answered since came before
//! that read, so its hold ended before. Only the rate of the two clocks
//! matters, not their time. A renewal that comes after a takeover finds
//! another holder and ends the hold.
//!
//! While held, what the front end knows is the database's state: its
//! sessions are told at its own commits, and a load is answered from the
//! record cache (records as of the last commit known, each forgotten when a
//! commit changes it) or, for what it does not hold, from the database.
//!
//! A commit while held need not take the order first either: its
//! invalidations are what the sessions were told (see `commit_alone` in
//! `session`). With nobody waiting behind it, it is checked from what the
//! front end knows is stored and written in one statement outside a
//! transaction, flushed before it is answered: one database round trip
//! where taking the order, writing and committing take three. The
//! statement writes only if the order row is still at the last tid the
//! front end knew (and the commit's log entry's tid is free): another
//! front end's commit in between (a hold lost), or commits the database
//! lost (a failover), make it fail, changing nothing. A front end giving
//! the database up waits for such commits to end first, so that none
//! fails for it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::{Conn, PgBackend, database};
use crate::error::Result;
use crate::record::Oid;

/// How often the holder renews its hold.
pub(super) const RENEW_EVERY: Duration = Duration::from_millis(100);

/// How long one renewal lets the holder serve from memory, from when it
/// was sent.
pub(super) const LEASE: Duration = Duration::from_secs(1);

/// How long a waiting front end sees the holder's renewals stop before
/// it takes the row over (half a lease more: the two clocks' rates may
/// differ).
pub(super) const TAKEOVER: Duration = Duration::from_millis(1500);

/// How long a front end waits for a holder that keeps renewing and does
/// not give way before its commit fails.
const GIVE_WAY_LIMIT: Duration = Duration::from_secs(10);

/// How often a front end that may hold the database alone tries to.
const LOOK_EVERY: Duration = Duration::from_secs(1);

/// The waiting front end's reads of `durus_alone`.
const POLL: Duration = Duration::from_millis(5);

/// Per-record overhead counted against the cache's bytes.
const ENTRY_BYTES: usize = 64;

/// The cache's size unless the server sets it.
const DEFAULT_CACHE_BYTES: usize = 64 << 20;

/// Records with their tids, bounded in bytes: when full, the oldest
/// entries go first (each entry's place in `order` is its generation; an
/// entry removed or written again leaves a stale place behind, skipped).
pub(super) struct RecordCache {
    map: std::collections::HashMap<Oid, (u64, Arc<[u8]>, u64)>,
    order: std::collections::VecDeque<(Oid, u64)>,
    generation: u64,
    bytes: usize,
    limit: usize,
}

impl Default for RecordCache {
    fn default() -> Self {
        RecordCache {
            map: Default::default(),
            order: Default::default(),
            generation: 0,
            bytes: 0,
            limit: DEFAULT_CACHE_BYTES,
        }
    }
}

impl RecordCache {
    pub(super) fn get(&self, oid: Oid) -> Option<(u64, Arc<[u8]>)> {
        self.map
            .get(&oid)
            .map(|(tid, data, _)| (*tid, data.clone()))
    }

    /// The largest record it keeps: one record never takes more than an
    /// eighth of it.
    pub(super) fn largest(&self) -> usize {
        (self.limit / 8).saturating_sub(ENTRY_BYTES)
    }

    pub(super) fn insert(&mut self, oid: Oid, tid: u64, data: Arc<[u8]>) {
        self.remove(oid);
        if data.len() > self.largest() {
            return;
        }
        self.generation += 1;
        self.bytes += data.len() + ENTRY_BYTES;
        self.map.insert(oid, (tid, data, self.generation));
        self.order.push_back((oid, self.generation));
        while self.bytes > self.limit {
            let Some((old, generation)) = self.order.pop_front() else {
                break;
            };
            if self.map.get(&old).is_some_and(|e| e.2 == generation) {
                self.remove(old);
            }
        }
        // Stale places are dropped when they outnumber the entries.
        if self.order.len() > 2 * self.map.len() + 1024 {
            let map = &self.map;
            self.order
                .retain(|(oid, generation)| map.get(oid).is_some_and(|e| e.2 == *generation));
        }
    }

    pub(super) fn remove(&mut self, oid: Oid) {
        if let Some((_, old, _)) = self.map.remove(&oid) {
            self.bytes -= old.len() + ENTRY_BYTES;
        }
    }

    pub(super) fn clear(&mut self) {
        self.map.clear();
        self.order.clear();
        self.bytes = 0;
    }

    pub(super) fn set_limit(&mut self, bytes: usize) {
        self.limit = bytes;
        self.clear();
    }
}

impl PgBackend {
    /// Whether this front end holds the database alone now (and may answer
    /// from memory what only the database's present could tell).
    pub(super) fn alone(&self) -> bool {
        self.state.lock().alone()
    }

    /// The bytes of records kept for loads while alone.
    pub(crate) fn set_cache_bytes(&self, bytes: usize) {
        self.state.lock().cache.set_limit(bytes);
    }

    /// Tests: the thread holding the database alone ticks every 5 ms and
    /// looks at every tick.
    #[cfg(test)]
    pub(crate) fn alone_quickly(&self) {
        self.alone_quick.store(true, Ordering::Relaxed);
    }

    /// The thread's tick and how often it looks: (`RENEW_EVERY`,
    /// `LOOK_EVERY`), quicker in some tests.
    fn alone_pace(&self) -> (Duration, Duration) {
        #[cfg(test)]
        if self.alone_quick.load(Ordering::Relaxed) {
            return (Duration::from_millis(5), Duration::ZERO);
        }
        (RENEW_EVERY, LOOK_EVERY)
    }

    /// Loads answered from memory, with no database round trip.
    #[cfg(test)]
    pub(crate) fn loads_from_memory(&self) -> u64 {
        self.loads_from_memory.load(Ordering::Relaxed)
    }

    /// Commits written in one statement, without taking the order.
    #[cfg(test)]
    pub(crate) fn alone_commits(&self) -> u64 {
        self.alone_commits.load(Ordering::Relaxed)
    }

    /// Runs on a thread of its own, for as long as the backend lives: takes
    /// the database alone once no other front end committed for `after`,
    /// renews the hold, gives way when asked. Returns the thread (it ends
    /// within [`RENEW_EVERY`] of the backend's close or drop).
    pub(crate) fn start_alone(
        backend: &Arc<PgBackend>,
        after: Duration,
    ) -> Option<std::thread::JoinHandle<()>> {
        backend.keep_records.store(true, Ordering::Release);
        let weak = Arc::downgrade(backend);
        let front_end = backend.front_end;
        let first_tick = backend.alone_pace().0;
        let spawned = std::thread::Builder::new()
            .name("durus-alone".into())
            .spawn(move || {
                let mut conn: Option<Conn> = None;
                let mut holding = false;
                let mut foreign_seen = None;
                let mut quiet_since = Instant::now();
                let mut next_look = Instant::now();
                let mut failing = false;
                // Another front end's hold as last seen: (holder, renewals,
                // when that was read).
                let mut other: Option<(i64, i64, Instant)> = None;
                // Gives the database up on the thread's own connection when
                // the backend is closed or gone (serving from memory ended
                // with it).
                let leave = |conn: &mut Option<Conn>, holding: bool| {
                    if let (true, Some(c)) = (holding, conn.as_mut())
                        && let Err(e) = give_up(c, front_end)
                    {
                        tracing::debug!("giving the database up failed: {e}");
                    }
                };
                let mut tick = first_tick;
                loop {
                    std::thread::sleep(tick);
                    let Some(backend) = weak.upgrade() else {
                        leave(&mut conn, holding);
                        return;
                    };
                    if backend.closed.load(Ordering::Acquire) {
                        backend.state.lock().alone_until = None;
                        leave(&mut conn, holding);
                        return;
                    }
                    #[cfg(test)]
                    if backend.alone_dies.load(Ordering::Acquire) {
                        return;
                    }
                    tick = backend.alone_pace().0;
                    let (foreign, recheck) = {
                        let mut st = backend.state.lock();
                        (st.foreign, std::mem::take(&mut st.alone_recheck))
                    };
                    if foreign_seen != Some(foreign) {
                        foreign_seen = Some(foreign);
                        quiet_since = Instant::now();
                    }
                    if !holding && quiet_since.elapsed() < after {
                        continue;
                    }
                    let fresh = conn.as_ref().is_none_or(|c| c.client.is_closed());
                    if fresh && holding {
                        // Renewed only on the connection that took it.
                        backend.state.lock().alone_until = None;
                    }
                    if fresh || !holding {
                        if Instant::now() < next_look {
                            continue;
                        }
                        next_look = Instant::now() + backend.alone_pace().1;
                    }
                    if fresh {
                        match backend.alone_conn() {
                            Ok(c) => {
                                conn = Some(c);
                                // What was seen on the last connection may
                                // be rolled back (renewals are not flushed):
                                // a takeover counts from a read on this one.
                                other = None;
                            }
                            Err(e) => {
                                tracing::debug!("no connection to hold the database alone: {e}");
                                continue;
                            }
                        }
                    }
                    let c = conn.as_mut().expect("just connected");
                    // A hold is renewed only on the connection that took it
                    // or last renewed it, and only while nothing put what
                    // this front end knows in doubt: on a new connection
                    // (the database may have restarted or failed over, and
                    // lost commits this front end knows of), or after a
                    // commit whose outcome is unknown, it is taken again,
                    // from the log.
                    let renewing = holding && !fresh && !recheck;
                    let result = if renewing {
                        backend.renew_alone(c)
                    } else {
                        backend.try_alone(c, fresh, &mut other)
                    };
                    match result {
                        Ok(now) => {
                            if holding && !now {
                                quiet_since = Instant::now();
                                if !renewing && let Err(e) = give_up(c, front_end) {
                                    tracing::debug!("giving the database up failed: {e}");
                                }
                            }
                            holding = now;
                            failing = false;
                            // Closed while it was taken: given up at once.
                            if backend.closed.load(Ordering::Acquire) {
                                backend.state.lock().alone_until = None;
                                leave(&mut conn, holding);
                                return;
                            }
                        }
                        Err(e) => {
                            let _ = c.batch("ROLLBACK");
                            // Nothing is answered from memory until the hold
                            // is taken again on a new connection.
                            backend.state.lock().alone_until = None;
                            if holding && !failing {
                                tracing::warn!(
                                    "renewing the hold of the database alone failed ({e}): \
                                     loads read the database until it is taken again"
                                );
                            } else {
                                tracing::debug!("holding the database alone failed: {e}");
                            }
                            failing = true;
                            other = None;
                            conn = None;
                        }
                    }
                }
            });
        match spawned {
            Ok(thread) => Some(thread),
            Err(e) => {
                tracing::warn!(
                    "no thread to hold the database alone ({e}): loads read the database"
                );
                None
            }
        }
    }

    fn alone_conn(&self) -> Result<Conn> {
        let mut conn = Conn::connect(&self.pool.config)?;
        // The log is read in a simple query, as text: hex.
        conn.batch("SET bytea_output = hex; SET application_name = 'durus-redb alone'")?;
        // A renewal need not wait for the WAL's flush: one lost in a crash
        // was sent before the crash, and its hold ends a lease after. (The
        // take itself is flushed.)
        if let Err(e) = conn.batch("SET synchronous_commit = off") {
            tracing::debug!("the database refused synchronous_commit = off ({e})");
        }
        Ok(conn)
    }

    /// Takes the database alone if no other front end committed since the
    /// last look, none holds it (or only this one, whose hold is taken
    /// again, unless asked to give way), and every front end alive knows
    /// of the hold (one of an earlier build would commit without asking).
    /// Under the commit order: every commit before is read from the log.
    /// On a `fresh` connection, the records kept are forgotten first (a
    /// failover may have lost commits they were read from, and the log
    /// grown back to the same tid since). Another front end's hold whose
    /// renewals have stopped for [`TAKEOVER`] (`other`: as last seen) is
    /// taken over, as a waiting commit would.
    fn try_alone(
        &self,
        conn: &mut Conn,
        fresh: bool,
        other: &mut Option<(i64, i64, Instant)>,
    ) -> Result<bool> {
        // A commit that entered while this front end held the database
        // (and that has not taken the order: see `commit_alone`) ends
        // first: no other front end is let in before it, and none enters
        // so since (serving from memory has stopped).
        self.alone_commits_ended();
        if fresh {
            self.state.lock().forget();
        }
        // Another's hold, read without the order: the order is not taken
        // (delaying commits) while that hold is alive.
        let (holder, renewals, _) = read_alone(conn)?;
        if holder != 0 && holder != self.front_end {
            match *other {
                Some((h, r, since)) if (h, r) == (holder, renewals) => {
                    if since.elapsed() < TAKEOVER {
                        return Ok(false);
                    }
                }
                _ => {
                    *other = Some((holder, renewals, Instant::now()));
                    return Ok(false);
                }
            }
        }
        let foreign = self.state.lock().foreign;
        let sent = Instant::now();
        let (tid, holder) = self.read_log(conn, true)?;
        /// What the take found.
        enum Take {
            Taken,
            Not,
            /// This front end held it and was asked to give way.
            GiveWay,
        }
        let taken = (|| -> Result<Take> {
            {
                let st = self.state.lock();
                if st.foreign != foreign || st.known != tid {
                    return Ok(Take::Not);
                }
            }
            if holder != 0 && holder != self.front_end {
                // Renewals unchanged since `other` was read, for longer
                // than a lease: taken over, if still so.
                let Some((h, r, _)) = *other else {
                    return Ok(Take::Not);
                };
                if !take_over(conn, h, r)? {
                    return Ok(Take::Not);
                }
            }
            let unaware: i64 = conn.query(
                "SELECT count(*) FROM durus_front_ends f \
                 WHERE f.alive_at > now() - interval '1 second' * $1 \
                 AND NOT EXISTS (SELECT 1 FROM durus_aware a WHERE a.id = f.id)",
                &[&(super::ALIVE_SECONDS as f64)],
            )?[0]
                .get(0);
            if unaware > 0 {
                return Ok(Take::Not);
            }
            // Taken again (this front end held it): a request to give way
            // stands.
            let rows = conn.query(
                "UPDATE durus_alone SET holder = $1, renewals = renewals + 1, \
                 wanted = CASE WHEN holder = $1 THEN wanted ELSE 0 END \
                 WHERE id = 1 RETURNING wanted",
                &[&self.front_end],
            )?;
            if rows.first().is_some_and(|r| r.get::<_, i64>(0) == 0) {
                Ok(Take::Taken)
            } else {
                give_up(conn, self.front_end)?;
                Ok(Take::GiveWay)
            }
        })();
        *other = None;
        match taken {
            Ok(Take::Taken) => {
                // The take is flushed before it is relied on: a waiting
                // front end must never find it lost.
                conn.batch("SET LOCAL synchronous_commit = on; COMMIT")?;
                // Not if a commit's outcome became unknown meanwhile, nor
                // once closed (as for a renewal).
                let mut st = self.state.lock();
                if !st.alone_recheck && !self.closed.load(Ordering::Acquire) {
                    st.alone_until = Some(sent + LEASE);
                }
                tracing::info!(
                    "no other front end commits: this one holds the database alone, and \
                     serves loads and syncs from memory"
                );
                Ok(true)
            }
            Ok(Take::GiveWay) => {
                conn.batch("COMMIT")?;
                Ok(false)
            }
            Ok(Take::Not) => {
                conn.batch("ROLLBACK")?;
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// Renews the hold; gives way if another front end asked. Returns
    /// whether it is still held.
    fn renew_alone(&self, conn: &mut Conn) -> Result<bool> {
        let sent = Instant::now();
        let Some(wanted) = renew(conn, self.front_end)? else {
            self.state.lock().alone_until = None;
            if !self.closed.load(Ordering::Acquire) {
                tracing::warn!(
                    "another front end took the database over from this one (its renewals \
                     were late): loads read the database"
                );
            }
            return Ok(false);
        };
        if wanted != 0 {
            // Serving from memory stops before the row says so, and the
            // commits that entered alone end.
            self.state.lock().alone_until = None;
            // The commits that entered alone end first, the hold renewed
            // meanwhile: a client may take long to send its commit, and
            // the front end that asked must not take the hold over from
            // under it (the commit would be refused).
            let tick = self.alone_pace().0;
            while self.order.try_lock_for(tick).is_none() {
                if renew(conn, self.front_end)?.is_none() {
                    return Ok(false);
                }
            }
            give_up(conn, self.front_end)?;
            tracing::info!("another front end commits: loads read the database again");
            return Ok(false);
        }
        let mut st = self.state.lock();
        // Not if a commit's outcome became unknown meanwhile (the hold is
        // taken again, from the log, first), nor once closed.
        if st.alone_recheck || self.closed.load(Ordering::Acquire) {
            st.alone_until = None;
        } else {
            st.alone_until = Some(sent + LEASE);
        }
        Ok(true)
    }

    /// Stops serving from memory and gives the database up if this front
    /// end holds it (closing).
    pub(super) fn leave_alone(&self) {
        self.state.lock().alone_until = None;
        if !self.keep_records.load(Ordering::Acquire) {
            return;
        }
        self.alone_commits_ended();
        let given = self
            .pool
            .get()
            .and_then(|mut conn| give_up(&mut conn, self.front_end));
        if let Err(e) = given {
            tracing::warn!(
                "giving the database up failed ({e}): the next front end to commit waits \
                 for this one's hold to run out"
            );
        }
    }

    /// Returns once every commit that entered without taking the order
    /// (this front end held the database alone: see `commit_alone`) has
    /// ended. Called once serving from memory has stopped, so that none
    /// enters so meanwhile; never with the order row taken (such a commit
    /// may be waiting for it).
    fn alone_commits_ended(&self) {
        debug_assert!(!self.state.lock().alone());
        drop(self.order.lock());
    }

    /// A commit's `COMMIT` failed: whether it was applied is unknown.
    /// Nothing is answered from memory until the log was read again (a
    /// sync reads it meanwhile), and what was kept is forgotten.
    pub(super) fn outcome_unknown(&self) {
        let mut st = self.state.lock();
        st.forget();
        st.alone_until = None;
        st.alone_recheck = true;
    }

    /// Waits, with the commit order given back, until front end `holder`
    /// no longer holds the database alone: asks it to give way, and takes
    /// the row over if its renewals stop for [`TAKEOVER`].
    pub(super) fn wait_for_alone(&self, conn: &mut Conn, holder: i64) -> Result<()> {
        let started = Instant::now();
        let ask = |conn: &mut Conn, holder: i64| {
            conn.execute(
                "UPDATE durus_alone SET wanted = 1 WHERE id = 1 AND holder = $1",
                &[&holder],
            )
        };
        ask(conn, holder)?;
        let (h, r, _) = read_alone(conn)?;
        let mut seen = (h, r);
        // Counted from the answer: a renewal it shows was sent before.
        let mut since = Instant::now();
        loop {
            let (holder, renewals) = seen;
            if holder == 0 || holder == self.front_end {
                return Ok(());
            }
            if since.elapsed() >= TAKEOVER && take_over(conn, holder, renewals)? {
                return Ok(());
            }
            if started.elapsed() >= GIVE_WAY_LIMIT {
                return Err(database(format!(
                    "front end {holder} holds the database alone (it serves loads from \
                     memory) and did not give way within {} s",
                    GIVE_WAY_LIMIT.as_secs()
                )));
            }
            std::thread::sleep(POLL);
            let (h, r, wanted) = read_alone(conn)?;
            if (h, r) != seen {
                since = Instant::now();
                seen = (h, r);
            }
            // Asked again if the request is gone (the holder took the
            // database again, or another front end took it).
            if wanted == 0 && h != 0 && h != self.front_end {
                ask(conn, h)?;
            }
        }
    }
}

/// The holder of `durus_alone`, its renewals, and whether it is asked to
/// give way.
fn read_alone(conn: &mut Conn) -> Result<(i64, i64, i64)> {
    let rows = conn.query(
        "SELECT holder, renewals, wanted FROM durus_alone WHERE id = 1",
        &[],
    )?;
    let row = rows
        .first()
        .ok_or_else(|| database("the row of durus_alone (id 1) is missing"))?;
    Ok((row.get(0), row.get(1), row.get(2)))
}

/// Clears the hold of front end `holder` if its renewals are still at
/// `renewals` (they stopped: see [`TAKEOVER`]). Returns whether it did.
fn take_over(conn: &mut Conn, holder: i64, renewals: i64) -> Result<bool> {
    let over = conn.execute(
        "UPDATE durus_alone SET holder = 0, wanted = 0 \
         WHERE id = 1 AND holder = $1 AND renewals = $2",
        &[&holder, &renewals],
    )?;
    if over == 1 {
        tracing::warn!(
            "front end {holder} held the database alone and stopped renewing its hold: \
             taken over"
        );
    }
    Ok(over == 1)
}

/// One renewal of `front_end`'s hold of the database: `None` if it no
/// longer holds it, else whether another front end asked it to give way
/// (`wanted`, 0 if not).
fn renew(conn: &mut Conn, front_end: i64) -> Result<Option<i64>> {
    let rows = conn.query(
        "UPDATE durus_alone SET renewals = renewals + 1 WHERE id = 1 AND holder = $1 \
         RETURNING wanted",
        &[&front_end],
    )?;
    Ok(rows.first().map(|row| row.get(0)))
}

/// Clears the row if front end `front_end` holds it (serving from memory
/// has stopped).
fn give_up(conn: &mut Conn, front_end: i64) -> Result<()> {
    conn.execute(
        "UPDATE durus_alone SET holder = 0, wanted = 0 WHERE id = 1 AND holder = $1",
        &[&front_end],
    )?;
    Ok(())
}
