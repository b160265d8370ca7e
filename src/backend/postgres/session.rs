//! A client's session on a PostgreSQL front end, and its commits.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::time::Instant;

use parking_lot::MutexGuard;

use super::batch::{Batch, Member, OrderSlot, Outcome};
use super::{Chunks, Conn, PgBackend, cut_shrunk, database, key, oid_of, oids_bytes, refs_bytes};
use crate::backend::{Entry, Found, Grant, Order, Session, Snapshot, Walk};
use crate::error::{InvalidInput, Result, StorageError};
use crate::record::{Oid, Record};
use crate::storage::{Holder, may_create, validate_commit};

/// One client's session.
pub(super) struct PgSession<'a> {
    pub(super) backend: &'a PgBackend,
    pub(super) id: u64,
    /// Set when the session takes the commit order, cleared by its sync.
    pub(super) just_ordered: std::cell::Cell<bool>,
    /// The oids of the open batch the session's commit joins: changed
    /// before its commit in the order, told with its invalidations.
    pub(super) told_pending: std::cell::RefCell<Vec<Oid>>,
}

impl Drop for PgSession<'_> {
    fn drop(&mut self) {
        let mut st = self.backend.state.lock();
        if st.sessions.remove(&self.id).is_some_and(|s| s.held > 0) {
            st.held.retain(|_, s| *s != self.id);
        }
    }
}

impl PgSession<'_> {
    /// Fails if the front end lost track of the log while this session
    /// was open.
    fn check_lost(&self) -> Result<()> {
        let st = self.backend.state.lock();
        if st.sessions.get(&self.id).is_some_and(|s| s.lost) {
            return Err(database(
                "this front end can no longer tell this session what changed (the database \
                 lost commits it had read, or commit log entries it had not): reconnect",
            ));
        }
        Ok(())
    }

    fn take_invalid(&self) -> Vec<Oid> {
        let mut st = self.backend.state.lock();
        let known = st.known;
        st.sessions
            .get_mut(&self.id)
            .map(|s| {
                s.seen = known;
                std::mem::take(&mut s.invalid).into_iter().collect()
            })
            .unwrap_or_default()
    }
}

impl Session for PgSession<'_> {
    fn sync(&self) -> Vec<Oid> {
        // Just after taking the order (a commit's invalidations) the log
        // was read up to its end, and nothing commits meanwhile.
        let ordered = self.just_ordered.replace(false);
        // Alone, nothing commits but through this front end, which tells
        // its sessions as it commits.
        if !ordered
            && !self.backend.alone()
            && let Err(e) = self.backend.catch_up()
        {
            tracing::warn!("a sync could not read the commit log: {e}");
        }
        let mut oids = self.take_invalid();
        let pending = std::mem::take(&mut *self.told_pending.borrow_mut());
        if ordered && !pending.is_empty() {
            oids.extend(pending);
            oids.sort_unstable();
            oids.dedup();
        }
        oids
    }

    fn sync_to_snapshot(&self) -> Result<(Vec<Oid>, Box<dyn Snapshot>)> {
        self.check_lost()?;
        let backend = self.backend;
        // No commit of this front end becomes visible and told meanwhile:
        // the session is told exactly the commits the snapshot shows.
        let _log = backend.catch_up.lock();
        let (snapshot, tid) = backend.snapshot_at_log_end()?;
        let oids = self.take_invalid();
        debug_assert_eq!(backend.state.lock().known, tid);
        Ok((oids, Box::new(snapshot)))
    }

    /// The state the session was brought to when it took the order (it is
    /// held: nothing commits meanwhile).
    fn snapshot(&self) -> Result<Box<dyn Snapshot>> {
        let backend = self.backend;
        let _log = backend.catch_up.lock();
        let (snapshot, _) = backend.snapshot_at_log_end()?;
        Ok(Box::new(snapshot))
    }

    /// Read with every snapshot load: the log is read first, so that an
    /// oid another front end made or removed since the session's snapshot
    /// is flagged, as one server would.
    fn invalid_flags(&self, oids: &[Oid]) -> Vec<bool> {
        if let Err(e) = self.backend.catch_up() {
            tracing::warn!("a snapshot load could not read the commit log: {e}");
        }
        let st = self.backend.state.lock();
        let invalid = st.sessions.get(&self.id).map(|s| &s.invalid);
        oids.iter()
            .map(|o| invalid.is_some_and(|i| i.contains(o)))
            .collect()
    }

    fn load(&self, oids: &[Oid], each: &mut dyn FnMut(Found<'_>) -> bool) -> Result<()> {
        self.check_lost()?;
        let backend = self.backend;
        // Alone, the records kept are the database's (see `alone`); else
        // every record is read with its tid.
        let (hits, epoch, known) = {
            let st = backend.state.lock();
            let mut hits: HashMap<Oid, (u64, Arc<[u8]>)> = HashMap::new();
            if st.alone() {
                for oid in oids {
                    if let Some(hit) = st.cache.get(*oid) {
                        hits.insert(*oid, hit);
                    }
                }
            }
            (hits, st.epoch, st.known)
        };
        let missing: Vec<Oid> = oids
            .iter()
            .filter(|o| !hits.contains_key(o))
            .copied()
            .collect();
        let read = if missing.is_empty() {
            backend
                .loads_from_memory
                .fetch_add(1, AtomicOrdering::Relaxed);
            HashMap::new()
        } else {
            let read = backend.pool.read(|conn| backend.fetch(conn, &missing))?;
            // Kept only if nothing changed meanwhile: as of `known` (copied
            // only then).
            let mut st = backend.state.lock();
            if st.epoch == epoch && backend.keep_records.load(AtomicOrdering::Acquire) {
                for (oid, (tid, bytes)) in &read {
                    if *tid <= known {
                        st.cache.insert(*oid, *tid, Arc::from(&bytes[..]));
                    }
                }
            }
            read
        };
        let found = |oid: &Oid| -> Option<(u64, &[u8])> {
            match hits.get(oid) {
                Some((tid, data)) => Some((*tid, &data[..])),
                None => read.get(oid).map(|(tid, data)| (*tid, &data[..])),
            }
        };
        let flags = || -> (Vec<bool>, u64) {
            let st = self.backend.state.lock();
            let data = st.sessions.get(&self.id);
            (
                oids.iter()
                    .map(|o| data.is_some_and(|s| s.invalid.contains(o)) || st.pending.contains(o))
                    .collect(),
                data.map_or(0, |s| s.seen),
            )
        };
        let (mut invalid, seen) = flags();
        // A record missing may have been removed by a pack through another
        // front end, which this one has not read of yet: it is invalid to
        // the session then, not missing (as with one server).
        if oids
            .iter()
            .zip(&invalid)
            .any(|(o, i)| !i && found(o).is_none())
        {
            self.backend.catch_up()?;
            invalid = flags().0;
        }
        for (oid, invalid) in oids.iter().zip(invalid) {
            let answer = match found(oid) {
                _ if invalid => Found::Invalid,
                // Written by a commit this session was not told of yet.
                Some((tid, _)) if tid > seen => Found::Invalid,
                Some((_, bytes)) => Found::Record(bytes),
                None => Found::Missing,
            };
            if !each(answer) {
                break;
            }
        }
        Ok(())
    }

    fn new_oids(&self, n: usize, cap: u64) -> Result<Vec<Oid>> {
        let held = {
            let st = self.backend.state.lock();
            st.sessions.get(&self.id).map_or(0, |s| s.held)
        };
        let asked = n as u64;
        if held.saturating_add(asked) > cap {
            return Err(InvalidInput::TooManyOidsHeld { held, asked, cap }.into());
        }
        let oids = self.backend.allocate(n)?;
        let mut st = self.backend.state.lock();
        for oid in &oids {
            st.held.insert(*oid, self.id);
        }
        if let Some(s) = st.sessions.get_mut(&self.id) {
            s.held += asked;
        }
        Ok(oids)
    }

    fn backup(&self, each: &mut dyn FnMut(Walk<'_>) -> bool) -> Result<()> {
        let mut conn = self.backend.pool.get()?;
        let client = &mut conn.client;
        let mut tx = client
            .build_transaction()
            .isolation_level(postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .map_err(super::db_error)?;
        let count: i64 = tx
            .query_one("SELECT count(*) FROM durus_records WHERE chunk = 0", &[])
            .map_err(super::db_error)?
            .get(0);
        if !each(Walk::Count(count as u64)) {
            return Ok(());
        }
        let mut rows = tx
            .query_raw(
                "SELECT oid, chunk, data FROM durus_records ORDER BY oid, chunk",
                std::iter::empty::<i64>(),
            )
            .map_err(super::db_error)?;
        let mut current: Option<(i64, Vec<u8>)> = None;
        use postgres::fallible_iterator::FallibleIterator;
        while let Some(row) = rows.next().map_err(super::db_error)? {
            let oid: i64 = row.get(0);
            let data: &[u8] = row.get(2);
            match &mut current {
                Some((o, bytes)) if *o == oid => bytes.extend_from_slice(data),
                _ => {
                    if let Some((_, bytes)) = current.take()
                        && !each(Walk::Record(&bytes))
                    {
                        return Ok(());
                    }
                    current = Some((oid, data.to_vec()));
                }
            }
        }
        if let Some((_, bytes)) = current {
            each(Walk::Record(&bytes));
        }
        Ok(())
    }

    /// Blocks until this front end's turn and the database's order row
    /// are both had: no queue, no grant.
    fn enter_order(&self, _grant: &mut dyn FnMut() -> Grant) -> Entry<'_> {
        let backend = self.backend;
        let mut order = backend.order.try_lock().unwrap_or_else(|| {
            backend.order_waiting.fetch_add(1, AtomicOrdering::AcqRel);
            let order = backend.order.lock();
            backend.order_waiting.fetch_sub(1, AtomicOrdering::AcqRel);
            order
        });
        // What the front end knew when it entered alone (see `commit_alone`).
        let mut epoch = 0;
        // A session that lost track of the database fails here, leaving the
        // order's connection (and what the front end knows) as it is.
        let taken = self.check_lost().map_err(|e| (e, false)).and_then(|()| {
            // A batch left the transaction open for this commit: the order
            // row is held; the batch's oids are this commit's to be told.
            if let Some(batch) = &order.open {
                let mut pending: Vec<Oid> = backend.state.lock().pending.iter().copied().collect();
                pending.sort_unstable();
                *self.told_pending.borrow_mut() = pending;
                backend.batched.fetch_add(1, AtomicOrdering::Relaxed);
                return Ok((batch.tid, false));
            }
            if order.conn.as_ref().is_none_or(|c| c.client.is_closed()) {
                order.conn = Some(backend.order_conn().map_err(|e| (e, true))?);
            } else {
                // Alone, no other front end commits: the sessions were
                // told every commit, and the order is taken only if the
                // commit needs it (see `commit_alone`).
                let st = backend.state.lock();
                if st.alone() {
                    epoch = st.epoch;
                    return Ok((st.known, true));
                }
            }
            backend
                .take_order(order.conn.as_mut().expect("just connected"))
                .map(|tid| (tid, false))
                .map_err(|e| (e, true))
        });
        // The hold of a batch this commit opens counts from here: the wait
        // for the row (held by another front end's batch, or a reconnection)
        // is not time the row was held.
        let entered = Instant::now();
        let (tid, alone, failed) = match taken {
            Ok((tid, alone)) => {
                self.just_ordered.set(true);
                (tid, alone, None)
            }
            Err((e, database)) => {
                if database {
                    tracing::warn!("the commit order could not be taken: {e}");
                    if order.open.is_none() {
                        order.conn = None;
                    }
                }
                (0, false, Some(e))
            }
        };
        Entry::Now(Box::new(PgOrder {
            session: self,
            order: Some(order),
            tid,
            alone,
            epoch,
            entered,
            failed,
        }))
    }
}

/// The commit order, held: this front end's turn and, in the open
/// transaction of its connection, the database's order row.
struct PgOrder<'a> {
    session: &'a PgSession<'a>,
    order: Option<MutexGuard<'a, OrderSlot>>,
    /// The last commit's tid when the order was taken (in the database, or
    /// in the open batch).
    tid: u64,
    /// Entered while this front end held the database alone: the order
    /// row is not taken (no transaction is open), the sessions were told
    /// up to `tid` (see `commit_alone`).
    alone: bool,
    /// `State::epoch` when it entered alone: a change since puts what the
    /// commit is checked from in doubt.
    epoch: u64,
    /// When the order was taken (a batch's start, if this commit opens one).
    entered: Instant,
    /// Why the order could not be taken (the commit then fails with it).
    failed: Option<StorageError>,
}

impl Drop for PgOrder<'_> {
    /// Given back without a commit: the transaction is rolled back, or,
    /// if a batch holds it, left to the next committer or committed.
    fn drop(&mut self) {
        let Some(mut slot) = self.order.take() else {
            return;
        };
        let backend = self.session.backend;
        if let Some(b) = &slot.open {
            let waiting = backend.order_waiting.load(AtomicOrdering::Acquire);
            if !backend.may_grow(b.members.len(), b.started, waiting)
                && let Err(e) = backend.end_batch(&mut slot)
            {
                tracing::warn!("a batch of commits was not committed: {e}");
            }
        } else if !self.alone
            && let Some(conn) = slot.conn.as_mut()
            && conn.batch("ROLLBACK").is_err()
        {
            slot.conn = None;
        }
    }
}

impl PgOrder<'_> {
    /// The one rule for a commit, from what is stored of the oids it writes
    /// and references.
    fn validate(&self, records: &BTreeMap<Oid, Record>, stored: &HashMap<Oid, i32>) -> Result<()> {
        let st = self.session.backend.state.lock();
        let holder = |oid: Oid| match st.held.get(&oid) {
            Some(&s) if s == self.session.id => Holder::ThisSession,
            Some(_) => Holder::AnotherSession,
            None => Holder::Nobody,
        };
        validate_commit(
            records,
            |oid| Ok(stored.contains_key(&oid)),
            |oid, present| {
                if present {
                    Ok(())
                } else {
                    may_create(oid, holder(oid))
                }
            },
        )
    }

    /// Validates and writes the commit in the transaction that took the
    /// order; returns the oids it wrote. What it read and wrote of its
    /// oids goes in `batch` (to be learned once committed).
    fn write(
        &mut self,
        conn: &mut Conn,
        records: BTreeMap<Oid, Record>,
        batch: &mut Batch,
    ) -> Result<Vec<Oid>> {
        let mut asked: Vec<Oid> = records.keys().copied().collect();
        for record in records.values() {
            asked.extend(record.refs());
        }
        asked.sort();
        asked.dedup();
        let keys: Vec<i64> = asked.iter().map(|o| key(*o)).collect();
        let tid = self.tid + 1;
        let oids: Vec<Oid> = records.keys().copied().collect();
        let mut chunks = Chunks::default();
        let mut record_oids: Vec<i64> = Vec::with_capacity(records.len());
        let mut record_chunks: Vec<i32> = Vec::with_capacity(records.len());
        for (oid, record) in &records {
            record_chunks.push(chunks.push(*oid, record));
            record_oids.push(key(*oid));
        }
        // One statement: what is stored of the oids asked (as it was before
        // the statement), the records written, the log entry, the order
        // row. A commit found invalid from the first part is rolled back.
        let stored: HashMap<Oid, i32> = conn
            .query(
                "WITH stored AS (SELECT oid, max(chunk) AS last FROM durus_records \
                                 WHERE oid = ANY($5) GROUP BY oid), \
                      written AS (INSERT INTO durus_records (oid, chunk, tid, data) \
                                  SELECT o, c, $3, d \
                                  FROM unnest($1::bigint[], $2::int[], $4::bytea[]) AS t(o, c, d) \
                                  ON CONFLICT (oid, chunk) \
                                  DO UPDATE SET tid = excluded.tid, data = excluded.data), \
                      logged AS (INSERT INTO durus_log (tid, oids, refs) \
                                 VALUES ($3, $7, $9)), \
                      ordered AS (UPDATE durus_order SET tid = $3, objects = objects + $8 - \
                                  (SELECT count(*) FROM stored WHERE oid = ANY($6)) \
                                  WHERE id = 1) \
                 SELECT oid, last FROM stored",
                &[
                    &chunks.oids,
                    &chunks.numbers,
                    &(tid as i64),
                    &chunks.data,
                    &keys,
                    &record_oids,
                    &oids_bytes(&oids),
                    &(oids.len() as i64),
                    &refs_bytes(&records),
                ],
            )?
            .iter()
            .map(|row| (oid_of(row.get(0)), row.get::<_, i32>(1)))
            .collect();
        self.validate(&records, &stored)?;
        batch
            .known
            .extend(asked.iter().map(|o| (*o, stored.get(o).copied())));
        batch.written.extend(
            record_oids
                .iter()
                .zip(&record_chunks)
                .map(|(o, n)| (oid_of(*o), n - 1)),
        );
        let shrunk: Vec<(i64, i32)> = record_oids
            .into_iter()
            .zip(record_chunks)
            .filter(|(oid, n)| stored.get(&oid_of(*oid)).is_some_and(|last| last >= n))
            .collect();
        cut_shrunk(conn, &shrunk)?;
        Ok(oids)
    }
}

/// A commit entered alone, and the database's order found elsewhere than
/// the tid it was given, or what the front end knew was put in doubt
/// meanwhile: another front end committed (a hold lost), or the database
/// lost commits (a failover). A conflict: its client syncs and tries again.
fn changed_meanwhile() -> StorageError {
    crate::Conflict::OrderMoved.into()
}

impl PgOrder<'_> {
    /// A commit entered alone, with nobody waiting behind it: checked from
    /// what this front end knows is stored (the oids it does not know read
    /// first, in one round trip), then written in one statement outside a
    /// transaction, flushed when it returns. The statement writes only if
    /// the order row is still at the commit's tid (see `alone`). `None`:
    /// nothing done, the commit needs the order taken (a record that
    /// shrank: its extra chunks are removed in the same transaction).
    fn commit_alone(
        &mut self,
        slot: &mut OrderSlot,
        records: &BTreeMap<Oid, Record>,
    ) -> Option<Result<()>> {
        let backend = self.session.backend;
        let conn = slot.conn.as_mut().expect("entered alone on a connection");
        let mut asked: Vec<Oid> = records
            .keys()
            .copied()
            .chain(records.values().flat_map(|r| r.refs()))
            .collect();
        asked.sort_unstable();
        asked.dedup();
        {
            let st = backend.state.lock();
            if st.known != self.tid || st.epoch != self.epoch {
                // The log was read since (a snapshot load) and showed a
                // commit of another front end, or what this front end
                // knew was forgotten.
                return Some(Err(changed_meanwhile()));
            }
        }
        let mut known: HashMap<Oid, Option<i32>> = HashMap::with_capacity(asked.len());
        if let Err(e) = backend.stored_of(conn, self.tid, asked, &mut known) {
            if conn.client.is_closed() {
                slot.conn = None;
            }
            return Some(Err(e));
        }
        let stored: HashMap<Oid, i32> = known
            .iter()
            .filter_map(|(o, last)| last.map(|l| (*o, l)))
            .collect();
        if let Err(e) = self.validate(records, &stored) {
            return Some(Err(e));
        }
        let tid = self.tid + 1;
        let mut chunks = Chunks::default();
        let mut written = Vec::with_capacity(records.len());
        let mut created = 0i64;
        for (oid, record) in records {
            let n = chunks.push(*oid, record);
            match known.get(oid).copied().flatten() {
                None => created += 1,
                Some(last) if last >= n => return None,
                Some(_) => {}
            }
            written.push((*oid, n - 1));
        }
        let oids: Vec<Oid> = records.keys().copied().collect();
        // Visible and told under `catch_up`, as a batch is.
        let _log = backend.catch_up.lock();
        let wrote = conn.query(
            "WITH written AS (INSERT INTO durus_records (oid, chunk, tid, data) \
                              SELECT o, c, $3, d \
                              FROM unnest($1::bigint[], $2::int[], $4::bytea[]) AS t(o, c, d) \
                              ON CONFLICT (oid, chunk) \
                              DO UPDATE SET tid = excluded.tid, data = excluded.data), \
                  logged AS (INSERT INTO durus_log (tid, oids, refs) VALUES ($3, $5, $6)), \
                  ordered AS (UPDATE durus_order SET tid = $3, objects = objects + $7 \
                              WHERE id = 1 AND tid = $3 - 1 RETURNING tid) \
             SELECT 1 / count(*) FROM ordered",
            &[
                &chunks.oids,
                &chunks.numbers,
                &(tid as i64),
                &chunks.data,
                &oids_bytes(&oids),
                &refs_bytes(records),
                &created,
            ],
        );
        if let Err(e) = wrote {
            // An error without the database's code: the connection, not
            // the statement, failed.
            if conn.client.is_closed() || super::sqlstate(&e).is_none() {
                // Whether it was applied is unknown: the log says.
                slot.conn = None;
                backend.outcome_unknown();
                return Some(Err(e));
            }
            let code = super::sqlstate(&e);
            if code == Some("22012") || code == Some("23505") {
                // The order row moved on, or the log entry's tid was taken:
                // another front end committed. What was kept may be stale.
                tracing::warn!("a commit entered alone was refused: {e}");
                backend.outcome_unknown();
                return Some(Err(changed_meanwhile()));
            }
            return Some(Err(e));
        }
        backend.alone_commits.fetch_add(1, AtomicOrdering::Relaxed);
        let mut batch = Batch::new(self.tid, self.entered);
        batch.known = known;
        batch.written = written;
        batch.through = backend.through([(tid, records)]);
        batch.members.push(Member {
            session: self.session.id,
            oids,
            records: None,
            answer: None,
        });
        backend.committed(&batch, tid, Vec::new());
        Some(Ok(()))
    }

    /// A commit entered alone that needs the order (a batch, a record that
    /// shrank): takes it, as a commit entering would have, and refuses the
    /// commit if another front end committed since its tid (what its
    /// client was told would be short of it).
    fn take_late(&mut self, slot: &mut OrderSlot) -> Result<()> {
        let backend = self.session.backend;
        let conn = slot.conn.as_mut().expect("entered alone on a connection");
        match backend.take_order(conn) {
            Ok(tid) if tid == self.tid && backend.state.lock().epoch == self.epoch => {
                self.alone = false;
                Ok(())
            }
            Ok(_) => {
                if conn.batch("ROLLBACK").is_err() {
                    slot.conn = None;
                }
                // The hold did not keep others out: what was kept may be
                // stale.
                backend.outcome_unknown();
                Err(changed_meanwhile())
            }
            Err(e) => {
                tracing::warn!("the commit order could not be taken: {e}");
                slot.conn = None;
                Err(e)
            }
        }
    }
}

impl Order for PgOrder<'_> {
    fn commit(
        mut self: Box<Self>,
        records: BTreeMap<Oid, Record>,
        snapshot: bool,
    ) -> (Result<()>, Option<Result<Box<dyn Snapshot>>>) {
        let want_snapshot = snapshot;
        let mut snapshot = None;
        if let Some(e) = self.failed.take() {
            // No transaction was begun for it: nothing to roll back, unless
            // a batch is open (then left to `Drop`).
            if self.order.as_ref().is_some_and(|slot| slot.open.is_none()) {
                self.order = None;
            }
            return (Err(e), None);
        }
        let backend = self.session.backend;
        let mut slot = self.order.take().expect("held until the commit");
        let waiting = backend.order_waiting.load(AtomicOrdering::Acquire);
        // Someone waits here, or a batch is open: the commit is kept, and
        // checked and written with the batch's others when it ends (a
        // commit refused then changes nothing).
        let keep = slot.open.is_some()
            || (backend.batching() && backend.may_grow(1, self.entered, waiting));
        if self.alone {
            if !keep && let Some(result) = self.commit_alone(&mut slot, &records) {
                let tid = self.tid + 1;
                let snapshot = match &result {
                    Ok(()) if want_snapshot => backend.snapshot_if_at(tid),
                    Err(e) if want_snapshot && e.is_conflict() => backend.snapshot_if_at(self.tid),
                    _ => None,
                };
                return (result, snapshot);
            }
            // The commit goes into a batch, or needs more than one
            // statement: the order is taken now.
            if let Err(e) = self.take_late(&mut slot) {
                return (Err(e), None);
            }
        }
        let result = if keep {
            let opens = slot.open.is_none();
            let slot_ref = &mut *slot;
            let (Some(conn), batch) = (
                slot_ref.conn.as_mut(),
                slot_ref
                    .open
                    .get_or_insert_with(|| Batch::new(self.tid, self.entered)),
            ) else {
                return (Err(database("the order's connection was lost")), None);
            };
            if let Err(e) = backend.check_kept(conn, batch, self.session.id, &records) {
                if opens {
                    // Nothing else in the transaction: it ends here.
                    slot.open = None;
                    if let Some(conn) = slot.conn.as_mut()
                        && conn.batch("ROLLBACK").is_err()
                    {
                        slot.conn = None;
                    }
                } else {
                    // Refused before it joined: the batch goes on, or ends.
                    backend
                        .refused_in_batch
                        .fetch_add(1, AtomicOrdering::Relaxed);
                    let b = slot.open.as_ref().expect("joined");
                    let waiting = backend.order_waiting.load(AtomicOrdering::Acquire);
                    if !backend.may_grow(b.members.len(), b.started, waiting)
                        && let Err(end) = backend.end_batch(&mut slot)
                    {
                        tracing::warn!("a batch of commits was not committed: {end}");
                    }
                }
                return (Err(e), None);
            }
            let oids: Vec<Oid> = records.keys().copied().collect();
            backend.state.lock().pending.extend(oids.iter().copied());
            batch.kept_bytes += records.values().map(|r| r.as_bytes().len()).sum::<usize>();
            // Bounded in the bytes it keeps too: a batch of large commits
            // ends early.
            let grow = backend.may_grow(batch.members.len() + 1, batch.started, waiting)
                && batch.kept_bytes < super::batch::STATEMENT_BYTES;
            let answer = grow.then(|| Arc::new(Outcome::default()));
            batch.members.push(Member {
                session: self.session.id,
                oids,
                records: Some(records),
                answer: answer.clone(),
            });
            match answer {
                Some(answer) => {
                    drop(slot);
                    answer.wait()
                }
                None => {
                    let ended = backend.end_batch(&mut slot);
                    drop(slot);
                    ended
                }
            }
        } else {
            let Some(conn) = slot.conn.as_mut() else {
                return (Err(database("the order's connection was lost")), None);
            };
            let tid = self.tid + 1;
            let mut batch = Batch::new(tid, self.entered);
            batch.through = backend.through([(tid, &records)]);
            let written = match self.write(conn, records, &mut batch) {
                Ok(oids) => oids,
                Err(e) => {
                    if conn.batch("ROLLBACK").is_err() {
                        slot.conn = None;
                    }
                    // Refused as a conflict: the state before it, if
                    // nothing committed since.
                    let snapshot = (want_snapshot && e.is_conflict())
                        .then(|| backend.snapshot_if_at(self.tid))
                        .flatten();
                    return (Err(e), snapshot);
                }
            };
            batch.members.push(Member {
                session: self.session.id,
                oids: written,
                records: None,
                answer: None,
            });
            slot.open = Some(batch);
            let ended = backend.end_batch(&mut slot);
            // The state just after this commit, if no other front end
            // committed since (this one's order is still held).
            if want_snapshot && ended.is_ok() {
                snapshot = backend.snapshot_if_at(tid);
            }
            // The barrier is waited for without holding the order.
            drop(slot);
            ended
        };
        let result = result.and_then(|barrier| match barrier {
            Some(sent) => backend.flush_barrier(sent),
            None => Ok(()),
        });
        (result, snapshot)
    }
}
