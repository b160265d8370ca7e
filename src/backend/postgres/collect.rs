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
//! One collection runs at a time across front ends: it holds a lease, the
//! `collector` row of `durus_meta` naming its front end, and keeps its
//! front end's `alive_at` fresh; a front end silent for
//! [`LEASE_SECONDS`] loses the lease to the next collection. (Two at once,
//! from front ends of an older version, would still be safe: each batch's
//! check is under the order.)

use std::collections::HashMap;
use std::time::{Duration, Instant};

use super::{Conn, PgBackend, WALK_BATCH, database, fetch, key, oid_of, oids_bytes};
use crate::error::{InvalidInput, Result, StorageError};
use crate::gc::FullReport;
use crate::record::{Oid, refs_of};

/// Candidates deleted under the order at a time: the order is held for
/// the check and one `DELETE` of at most this many oids.
const SWEEP_BATCH: usize = 2000;

/// Oids read from the snapshot at a time while looking for candidates.
const SCAN_BATCH: i64 = 10_000;

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
    pub(super) fn take_lease(&self) -> Result<Option<i64>> {
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
                let alive = conn.query(
                    "SELECT 1 FROM durus_front_ends WHERE id = $1 \
                     AND alive_at > now() - interval '1 second' * $2",
                    &[&holder, &LEASE_SECONDS],
                )?;
                if !alive.is_empty() {
                    return Ok(Some(holder));
                }
                tracing::warn!(
                    "front end {holder} held the collector's lease and has been silent for \
                     {LEASE_SECONDS} s: its collection is taken over"
                );
                conn.execute(
                    "UPDATE durus_meta SET value = $1 WHERE name = 'collector'",
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

    /// Says this front end is alive (its collection goes on).
    fn renew_lease(&self) -> Result<()> {
        self.pool.get()?.execute(
            "UPDATE durus_front_ends SET alive_at = now() WHERE id = $1",
            &[&self.front_end],
        )?;
        Ok(())
    }

    /// Gives the lease up, if this front end holds it.
    fn release_lease(&self) -> Result<()> {
        self.pool.get()?.execute(
            "DELETE FROM durus_meta WHERE name = 'collector' AND value = $1",
            &[&self.front_end],
        )?;
        Ok(())
    }

    /// A full collection: see the module's documentation. Refused while
    /// another front end's collection holds the lease.
    pub(super) fn collect(&self, stop: &mut dyn FnMut() -> bool) -> Result<FullReport> {
        let _one = self.collector.lock();
        if let Some(holder) = self.take_lease()? {
            return Err(database(format!(
                "a full collection is running on front end {holder} (it holds the \
                 collector's lease): this one is not started; run it again when that \
                 one has finished"
            )));
        }
        let result = {
            let mut renewed = Instant::now();
            let mut stop = || {
                if renewed.elapsed() >= RENEW_EVERY {
                    renewed = Instant::now();
                    if let Err(e) = self.renew_lease() {
                        tracing::warn!("the collector's lease was not renewed: {e}");
                    }
                }
                stop()
            };
            self.collect_holding(&mut stop)
        };
        if let Err(e) = self.release_lease() {
            tracing::warn!(
                "the collector's lease was not given up ({e}): another front end takes it \
                 over after {LEASE_SECONDS} s"
            );
        }
        result
    }

    /// [`collect`](Self::collect), the lease held.
    fn collect_holding(&self, stop: &mut dyn FnMut() -> bool) -> Result<FullReport> {
        let started = Instant::now();

        let snapshot = {
            let _log = self.catch_up.lock();
            let (snapshot, _) = self.snapshot_at_log_end()?;
            let mut st = self.state.lock();
            st.collecting = Some(std::collections::HashSet::new());
            st.collect_lost = false;
            snapshot
        };
        /// Stops the noting of changes however the collection ends.
        struct Noting<'a>(&'a PgBackend);
        impl Drop for Noting<'_> {
            fn drop(&mut self) {
                self.0.state.lock().collecting = None;
            }
        }
        let noting = Noting(self);
        let mut conn = snapshot.into_conn();
        let result = self.collect_from(&mut conn, stop, started);
        drop(noting);
        if conn.batch("ROLLBACK").is_ok() {
            self.pool.give_back(conn);
        }
        let mut report = result?;
        report.elapsed = started.elapsed();
        if report.completed {
            self.state.lock().full_collections += 1;
        }
        Ok(report)
    }

    /// Marks in the snapshot on `snap`, then removes the unmarked in
    /// batches under the order.
    fn collect_from(
        &self,
        snap: &mut Conn,
        stop: &mut dyn FnMut() -> bool,
        started: Instant,
    ) -> Result<FullReport> {
        let mut report = FullReport {
            completed: true,
            passes: 1,
            ..FullReport::default()
        };
        let any = snap.query("SELECT oid FROM durus_records WHERE chunk = 0 LIMIT 1", &[])?;
        if any.is_empty() {
            report.elapsed = started.elapsed();
            return Ok(report);
        }
        let mut marks = Marks::default();
        marks.set(Oid::ROOT);
        let mut root_seen = false;
        if !mark_from(snap, &mut marks, vec![Oid::ROOT], stop, &mut root_seen)? {
            report.completed = false;
            return Ok(report);
        }
        if !root_seen {
            return Err(InvalidInput::NoRoot.into());
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
                    if !marks.get(oid) {
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
            let Some((objects, bytes)) = self.sweep(&mut marks, &candidates, stop)? else {
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
        marks: &mut Marks,
        candidates: &[Oid],
        stop: &mut dyn FnMut() -> bool,
    ) -> Result<Option<(u64, u64)>> {
        let mut order = self.order.lock();
        if self.end_batch(&mut order)? {
            self.flush_barrier()?;
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
                    return Err(database(
                        "this front end lost track of the commit log during the collection \
                         (entries trimmed, or commits lost in a failover): nothing more is \
                         removed; run it again",
                    ));
                }
                std::mem::take(st.collecting.as_mut().expect("set while collecting"))
            };
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
                "INSERT INTO durus_log (tid, oids) VALUES ($1, $2)",
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
        {
            let _log = self.catch_up.lock();
            if let Err(e) = conn.batch("COMMIT") {
                order.conn = None;
                return Err(e);
            }
            let mut st = self.state.lock();
            st.publish(None, &dead);
            st.known = tid + 1;
            st.removed_full += dead.len() as u64;
        }
        drop(order);
        self.flush_barrier()?;
        Ok(Some((dead.len() as u64, bytes)))
    }
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
