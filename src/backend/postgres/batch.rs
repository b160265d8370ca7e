//! A front end's commits in one database transaction.
//!
//! The commit order is held from a client's invalidations until its commit
//! is written; while it is, other committers of this front end wait for it.
//! When one of them is waiting, the commit that holds the order does not
//! end the transaction: it is checked against what was stored when the
//! batch began and what the batch's earlier commits write (the database
//! does not change while the batch holds the order), its records are kept
//! in memory, and it hands the order (the transaction, holding the order
//! row) to the next committer here, which is told the batch's oids as
//! changed, and is checked and kept in turn. A commit refused there is
//! answered at once and told to no one: it disturbs no other commit. When
//! the batch ends (nobody waiting, or the bounds reached), its commits are
//! written in one statement, each with its own tid and log entry, and the
//! transaction is committed once for all; they are answered together. A
//! commit with nobody waiting behind it is checked and written at once, in
//! one statement. Loads of an oid a batch has written are answered
//! `Invalid` until the batch is committed: whoever was told of the change
//! cannot read what came before it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::{Chunks, Conn, PgBackend, cut_shrunk, key, oid_of, oids_bytes, refs_bytes};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};
use crate::storage::{Holder, may_create, validate_commit};

/// Commits at most in one batch.
pub(super) const MAX_COMMITS: usize = 32;

/// How long a batch may hold the order row at most (other front ends wait
/// for it meanwhile).
pub(super) const MAX_HOLD: Duration = Duration::from_millis(5);

/// The record bytes a batch writes in one statement at most (beyond, in
/// several): a batch of large commits stays far below the database's
/// limits on one value and one message.
pub(super) const STATEMENT_BYTES: usize = 16 << 20;

/// The longest a commit waits for the batch it joined to end.
pub(super) const WAIT_LIMIT: Duration = Duration::from_secs(60);

/// This front end's side of the commit order: its connection, and the
/// transaction a batch left open.
#[derive(Default)]
pub(crate) struct OrderSlot {
    /// The order's connection (`None` until connected, or after it broke).
    pub(super) conn: Option<Conn>,
    /// A batch whose transaction is open on `conn`, holding the order row.
    pub(super) open: Option<Batch>,
}

/// The commits of the open transaction, not yet committed.
pub(super) struct Batch {
    /// The last tid written in the transaction (the order's tid if none
    /// is): the commits kept get the next tids when the batch ends.
    pub(super) tid: u64,
    pub(super) started: Instant,
    /// Its commits in order.
    pub(super) members: Vec<Member>,
    /// What was stored when it began of each oid its commits named: the
    /// number of its record's last chunk, `None` if it was not stored (the
    /// database does not change while the batch holds the order).
    pub(super) known: HashMap<Oid, Option<i32>>,
    /// The bytes of the records it keeps in memory.
    pub(super) kept_bytes: usize,
    /// The number of the last chunk of each record written at once (a
    /// commit nobody waited behind), learned when the batch is committed.
    pub(super) written: Vec<(Oid, i32)>,
    /// Records it wrote, with their commits' tids, to be kept in the
    /// record cache once committed (see [`PgBackend::through`]).
    pub(super) through: Vec<(Oid, u64, Arc<[u8]>)>,
}

/// One commit of a batch.
pub(super) struct Member {
    pub(super) session: u64,
    /// The oids it writes.
    pub(super) oids: Vec<Oid>,
    /// Its records while it is kept, not written yet.
    pub(super) records: Option<BTreeMap<Oid, Record>>,
    /// Where it is answered (`None`: the commit that ends the batch, which
    /// is answered by [`PgBackend::end_batch`]'s result).
    pub(super) answer: Option<Arc<Outcome>>,
}

/// How a commit waiting in a batch ended.
#[derive(Default)]
pub(super) struct Outcome {
    /// `Ok(Some(sent))`: committed, the flush barrier still to be waited
    /// for (its `COMMIT` sent then); `Ok(None)`: committed and flushed;
    /// `Err`: not committed (refused, or the batch failed).
    result: Mutex<Option<Result<Option<Instant>>>>,
    ended: Condvar,
}

impl Outcome {
    fn set(&self, result: Result<Option<Instant>>) {
        *self.result.lock() = Some(result);
        self.ended.notify_all();
    }

    /// Waits until the commit is answered, at most [`WAIT_LIMIT`]: a
    /// commit is never left waiting for ever (its answer then says that
    /// whether it was committed is unknown).
    pub(super) fn wait(&self) -> Result<Option<Instant>> {
        let deadline = Instant::now() + WAIT_LIMIT;
        let mut result = self.result.lock();
        loop {
            if let Some(r) = result.take() {
                return r;
            }
            if self.ended.wait_until(&mut result, deadline).timed_out() && result.is_none() {
                tracing::error!(
                    "a batch of commits was not ended within {} s: answering its commit as unknown",
                    WAIT_LIMIT.as_secs()
                );
                return Err(super::database(format!(
                    "the batch of commits this one joined was not ended within {} s: whether \
                     it was committed is unknown (sync and look)",
                    WAIT_LIMIT.as_secs()
                )));
            }
        }
    }
}

/// The answers of a batch's waiting commits, to be given: each not given
/// when this is dropped (a panic while the batch was being ended) is given
/// as failed, so that no commit waits for it.
struct Answers(Vec<Option<Arc<Outcome>>>);

impl Answers {
    fn give(&mut self, i: usize, result: Result<Option<Instant>>) {
        if let Some(o) = self.0[i].take() {
            o.set(result);
        }
    }
}

impl Drop for Answers {
    fn drop(&mut self) {
        for o in self.0.iter_mut().filter_map(Option::take) {
            o.set(Err(super::database(
                "the front end failed while ending the batch of commits this one joined: \
                 whether it was committed is unknown (sync and look)",
            )));
        }
    }
}

impl Batch {
    /// A batch to be opened under the order taken at `tid`.
    pub(super) fn new(tid: u64, started: Instant) -> Batch {
        Batch {
            tid,
            started,
            members: Vec::new(),
            known: HashMap::new(),
            kept_bytes: 0,
            written: Vec::new(),
            through: Vec::new(),
        }
    }
}

impl PgBackend {
    /// Whether the commit that just wrote may leave the transaction open
    /// for the next: someone waits, and the bounds allow one more.
    pub(super) fn may_grow(&self, commits: usize, started: Instant, waiting: u64) -> bool {
        let hold = Duration::from_micros(
            self.max_hold_micros
                .load(std::sync::atomic::Ordering::Relaxed),
        );
        waiting > 0 && commits < MAX_COMMITS && started.elapsed() < hold
    }

    /// Whether commits may share transactions: not with snapshot reads,
    /// whose snapshot after a commit must show the state just after it.
    pub(super) fn batching(&self) -> bool {
        !self
            .snapshot_reads
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Ends the open batch of `slot` (if any): writes the commits it kept
    /// (each checked as it joined), commits the transaction, tells every
    /// session, answers the commits waiting in it. Returns the answer of
    /// all its commits: `Some(sent)` if the flush barrier is still to be
    /// waited for (its `COMMIT` sent then), `None` if flushed.
    pub(super) fn end_batch(&self, slot: &mut OrderSlot) -> Result<Option<Instant>> {
        let Some(mut batch) = slot.open.take() else {
            return Ok(None);
        };
        let ending = batch.members.last().is_some_and(|m| m.answer.is_none());
        let mut answers = Answers(batch.members.iter_mut().map(|m| m.answer.take()).collect());
        let n = batch.members.len();
        // What the commit ending the batch is answered, when the batch
        // fails: the same as the others.
        let fail = |answers: &mut Answers, e: &StorageError| {
            for i in 0..n {
                answers.give(i, Err(super::database(e.to_string())));
            }
        };
        let Some(conn) = slot.conn.as_mut() else {
            let e = super::database("the order's connection was lost");
            self.forget_pending();
            fail(&mut answers, &e);
            return Err(e);
        };
        let (last, written) = match self.write_kept(conn, &batch) {
            Ok(w) => {
                // Those of its kept commits (a commit written at once has
                // its records' there already).
                let mut tid = batch.tid;
                let kept = batch
                    .members
                    .iter()
                    .filter_map(|m| m.records.as_ref())
                    .map(|records| {
                        tid += 1;
                        (tid, records)
                    });
                let kept = self.through(kept);
                batch.through.extend(kept);
                w
            }
            Err(e) => {
                if conn.batch("ROLLBACK").is_err() {
                    slot.conn = None;
                }
                self.forget_pending();
                fail(&mut answers, &e);
                return Err(e);
            }
        };
        let conn = slot.conn.as_mut().expect("still connected");
        // With no other committer waiting here, the transaction flushes the
        // WAL itself (nobody would be released early), saving the
        // barrier's round trip; else the order is released before the
        // flush.
        let deferred = self
            .deferred_flush
            .load(std::sync::atomic::Ordering::Relaxed);
        let flush_now = deferred
            && self
                .order_waiting
                .load(std::sync::atomic::Ordering::Acquire)
                == 0;
        let barrier = deferred && !flush_now;
        let sent = Instant::now();
        // Visible and told under `catch_up`: a sync reading the log
        // meanwhile cannot tell a commit to its own session.
        let _log = self.catch_up.lock();
        let end = if flush_now {
            "SET LOCAL synchronous_commit = on; COMMIT"
        } else {
            "COMMIT"
        };
        #[cfg(test)]
        if let Some(hook) = self.before_commit.lock().take() {
            hook(conn);
        }
        if let Err(e) = conn.batch(end) {
            // Whether it was applied is unknown: the log says, to whoever
            // reads it next (this front end included).
            slot.conn = None;
            self.forget_pending();
            self.outcome_unknown();
            fail(&mut answers, &e);
            return Err(e);
        }
        self.committed(&batch, last, written);
        for i in 0..n {
            if !(ending && i == n - 1) {
                answers.give(i, Ok(barrier.then_some(sent)));
            }
        }
        Ok(barrier.then_some(sent))
    }

    /// Takes in the commits of `batch`, just committed (under `catch_up`),
    /// the last with tid `last`: tells the sessions, learns what it read
    /// and wrote (`written`: the last chunk of each record its kept
    /// commits wrote).
    pub(super) fn committed(&self, batch: &Batch, last: u64, written: Vec<(Oid, i32)>) {
        let mut st = self.state.lock();
        st.pending.clear();
        // A commit is told to every session but its own and those of the
        // later commits of the batch, which were told of it when they took
        // the order (also those refused since).
        for (i, m) in batch.members.iter().enumerate() {
            let told: Vec<u64> = batch.members[i..].iter().map(|m| m.session).collect();
            st.publish_except(&told, &m.oids);
            for oid in &m.oids {
                if let Some(s) = st.held.remove(oid)
                    && let Some(data) = st.sessions.get_mut(&s)
                {
                    data.held -= 1;
                }
            }
        }
        for m in &batch.members {
            if let Some(s) = st.sessions.get_mut(&m.session) {
                s.seen = last;
            }
        }
        st.known = last;
        // What the batch read of its oids, as they are after it.
        st.learn(batch.known.iter().map(|(o, last)| (*o, *last)));
        st.learn(
            written
                .into_iter()
                .chain(batch.written.iter().copied())
                .map(|(o, last)| (o, Some(last))),
        );
        // Written through: the records just committed are the database's
        // as of `last` (no commit after them is known yet), so a load of
        // one by a session told of it needs no round trip. In the batch's
        // order, each with its commit's tid: a record written twice is
        // kept as the later commit wrote it.
        for (oid, tid, data) in &batch.through {
            st.cache.insert(*oid, *tid, data.clone());
        }
    }

    /// The records of `commits` (each with its tid, in their order) that
    /// [`Self::committed`] is to keep in the record cache, copied before
    /// the state is locked for it: none unless the front end holds the
    /// database alone (only then does the cache answer loads; a record
    /// missing from it is read from the database), and only those it has
    /// room for.
    pub(super) fn through<'r>(
        &self,
        commits: impl IntoIterator<Item = (u64, &'r BTreeMap<Oid, Record>)>,
    ) -> Vec<(Oid, u64, Arc<[u8]>)> {
        if !self.keep_records.load(std::sync::atomic::Ordering::Acquire) {
            return Vec::new();
        }
        let room = {
            let st = self.state.lock();
            if !st.alone() {
                return Vec::new();
            }
            st.cache.largest()
        };
        commits
            .into_iter()
            .flat_map(|(tid, records)| {
                records
                    .iter()
                    .filter(|(_, r)| r.as_bytes().len() <= room)
                    .map(move |(oid, r)| (*oid, tid, Arc::from(r.as_bytes())))
            })
            .collect()
    }

    /// Checks a commit of `session` before `batch` keeps it, against what
    /// was stored when the batch began and what its commits write (reading
    /// the database only for the oids the batch has not named yet): a
    /// commit refused is answered at once and told to no one, so it
    /// disturbs no other commit.
    pub(super) fn check_kept(
        &self,
        conn: &mut Conn,
        batch: &mut Batch,
        session: u64,
        records: &BTreeMap<Oid, Record>,
    ) -> Result<()> {
        let written: std::collections::HashSet<Oid> = batch
            .members
            .iter()
            .flat_map(|m| m.oids.iter().copied())
            .collect();
        let mut unknown: Vec<Oid> = records
            .keys()
            .copied()
            .chain(records.values().flat_map(|r| r.refs()))
            .filter(|o| !written.contains(o) && !batch.known.contains_key(o))
            .collect();
        unknown.sort_unstable();
        unknown.dedup();
        // As of the batch's start (nothing was committed since: the batch
        // holds the order).
        self.stored_of(conn, batch.tid, unknown, &mut batch.known)?;
        let st = self.state.lock();
        let holder = |oid: Oid| match st.held.get(&oid) {
            Some(&s) if s == session => Holder::ThisSession,
            Some(_) => Holder::AnotherSession,
            None => Holder::Nobody,
        };
        validate_commit(
            records,
            |oid| Ok(written.contains(&oid) || batch.known.get(&oid).is_some_and(Option::is_some)),
            |oid, present| {
                if present {
                    Ok(())
                } else {
                    may_create(oid, holder(oid))
                }
            },
        )
    }

    /// Learns into `facts` what is stored of `oids` as of tid `at` (the
    /// number of each record's last chunk, `None` for an oid not stored):
    /// from what this front end knows, if it knows up to `at`; the rest
    /// from the database, in one statement.
    pub(super) fn stored_of(
        &self,
        conn: &mut Conn,
        at: u64,
        mut oids: Vec<Oid>,
        facts: &mut HashMap<Oid, Option<i32>>,
    ) -> Result<()> {
        {
            let st = self.state.lock();
            if st.known == at {
                oids.retain(|o| match st.stored.get(o) {
                    Some(last) => {
                        facts.insert(*o, *last);
                        false
                    }
                    None => true,
                });
            }
        }
        if oids.is_empty() {
            return Ok(());
        }
        self.join_reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let keys: Vec<i64> = oids.iter().map(|o| key(*o)).collect();
        let stored: HashMap<Oid, i32> = conn
            .query(
                "SELECT oid, max(chunk) FROM durus_records WHERE oid = ANY($1) GROUP BY oid",
                &[&keys],
            )?
            .iter()
            .map(|row| (oid_of(row.get(0)), row.get::<_, i32>(1)))
            .collect();
        for oid in oids {
            facts.insert(oid, stored.get(&oid).copied());
        }
        Ok(())
    }

    /// Writes the commits `batch` kept (each checked as it joined), in
    /// order, in one statement, each with its own tid and log entry.
    /// Returns the tid of its last commit, and the number of the last
    /// chunk of each record written.
    fn write_kept(&self, conn: &mut Conn, batch: &Batch) -> Result<(u64, Vec<(Oid, i32)>)> {
        // Each oid's last record written here, with its commit's tid.
        let mut latest: BTreeMap<Oid, (u64, &Record)> = BTreeMap::new();
        let mut log_tids: Vec<i64> = Vec::new();
        let mut log_oids: Vec<Vec<u8>> = Vec::new();
        let mut log_refs: Vec<Vec<u8>> = Vec::new();
        let mut last = batch.tid;
        for m in &batch.members {
            let Some(records) = &m.records else {
                continue;
            };
            last += 1;
            for (oid, record) in records {
                latest.insert(*oid, (last, record));
            }
            log_tids.push(last as i64);
            log_oids.push(oids_bytes(&m.oids));
            log_refs.push(refs_bytes(records));
        }
        if log_tids.is_empty() {
            return Ok((last, Vec::new()));
        }
        let mut chunks = Chunks::default();
        let mut chunk_tids: Vec<i64> = Vec::new();
        let mut shrunk: Vec<(i64, i32)> = Vec::new();
        let mut created = 0i64;
        let mut written = Vec::with_capacity(latest.len());
        for (oid, (tid, record)) in &latest {
            if chunks.bytes >= STATEMENT_BYTES {
                // Large commits: their records go in statements of their
                // own, before the last.
                conn.execute(
                    "INSERT INTO durus_records (oid, chunk, tid, data) \
                     SELECT o, c, t, d \
                     FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bytea[]) \
                          AS r(o, c, t, d) \
                     ON CONFLICT (oid, chunk) \
                     DO UPDATE SET tid = excluded.tid, data = excluded.data",
                    &[&chunks.oids, &chunks.numbers, &chunk_tids, &chunks.data],
                )?;
                chunks = Chunks::default();
                chunk_tids.clear();
            }
            let c = chunks.push(*oid, record);
            written.push((*oid, c - 1));
            chunk_tids.extend(std::iter::repeat_n(*tid as i64, c as usize));
            // Every oid a kept commit writes was read (or written) when
            // it joined.
            match batch.known.get(oid).copied().flatten() {
                None => created += 1,
                Some(stored_last) if stored_last >= c => shrunk.push((key(*oid), c)),
                Some(_) => {}
            }
        }
        conn.execute(
            "WITH written AS (INSERT INTO durus_records (oid, chunk, tid, data) \
                              SELECT o, c, t, d \
                              FROM unnest($1::bigint[], $2::int[], $3::bigint[], $4::bytea[]) \
                                   AS r(o, c, t, d) \
                              ON CONFLICT (oid, chunk) \
                              DO UPDATE SET tid = excluded.tid, data = excluded.data), \
                  logged AS (INSERT INTO durus_log (tid, oids, refs) \
                             SELECT t, o, r \
                             FROM unnest($5::bigint[], $6::bytea[], $9::bytea[]) \
                                  AS l(t, o, r)) \
             UPDATE durus_order SET tid = $7, objects = objects + $8 WHERE id = 1",
            &[
                &chunks.oids,
                &chunks.numbers,
                &chunk_tids,
                &chunks.data,
                &log_tids,
                &log_oids,
                &(last as i64),
                &created,
                &log_refs,
            ],
        )?;
        cut_shrunk(conn, &shrunk)?;
        Ok((last, written))
    }

    fn forget_pending(&self) {
        self.state.lock().pending.clear();
    }
}
