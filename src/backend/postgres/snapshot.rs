//! Snapshot reads (`serve --snapshot-reads`) from a database snapshot: a
//! `REPEATABLE READ` transaction kept open on a connection of its own for
//! as long as the snapshot is held.
//!
//! A sync in snapshot mode starts the transaction and, in the same round
//! trip and so the same database snapshot, reads the order's tid and the
//! commit log up to it, while holding `catch_up` (no commit of this front
//! end becomes visible and told meanwhile): the session is told exactly the
//! commits its snapshot shows. After a commit, a snapshot is taken the same
//! way, and given only if it shows the state just after that commit (no
//! other front end committed in between, and the commit was the last of its
//! batch); otherwise the session reads live until its next sync, as Durus
//! does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::{Conn, LogEntry, PgBackend, Pool, database, db_error, fetch, order_and_log};
use crate::backend::Snapshot;
use crate::error::Result;
use crate::record::Oid;

/// A database snapshot, held by its open transaction.
pub(super) struct PgSnapshot {
    /// The snapshot's own connection (a mutex only because `load_each`
    /// takes `&self`: one connection thread uses it).
    conn: Mutex<Option<Conn>>,
    pool: Arc<Pool>,
    taken: Instant,
}

impl Drop for PgSnapshot {
    fn drop(&mut self) {
        if let Some(mut conn) = self.conn.get_mut().take()
            && conn.batch("ROLLBACK").is_ok()
        {
            self.pool.give_back(conn);
        }
    }
}

impl PgSnapshot {
    /// The snapshot's connection, its transaction still open: the caller
    /// ends it.
    pub(super) fn into_conn(self) -> Conn {
        self.conn.lock().take().expect("held until dropped")
    }
}

impl Snapshot for PgSnapshot {
    fn age(&self) -> Duration {
        self.taken.elapsed()
    }

    fn load_each(
        &self,
        oids: &[Oid],
        each: &mut dyn FnMut(Oid, Option<&[u8]>) -> bool,
    ) -> Result<()> {
        let found = {
            let mut conn = self.conn.lock();
            let conn = conn.as_mut().expect("held until dropped");
            fetch(conn, oids)?
        };
        for oid in oids {
            if !each(*oid, found.get(oid).map(|(_, b)| &b[..])) {
                break;
            }
        }
        Ok(())
    }
}

impl PgBackend {
    /// Starts a snapshot and reads, in it, the order's tid and the log past
    /// what this front end knows; the caller holds `catch_up`. Returns the
    /// snapshot, the order's tid in it, and the log entries.
    pub(super) fn start_snapshot(&self) -> Result<(PgSnapshot, u64, Vec<LogEntry>)> {
        let mut conn = self.pool.take()?;
        let known = self.state.lock().known;
        let messages = conn
            .client
            .simple_query(&format!(
                "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; \
                 SELECT tid FROM durus_order WHERE id = 1; \
                 SELECT tid, oids FROM durus_log WHERE tid > {known} ORDER BY tid"
            ))
            .map_err(db_error)?;
        let (tid, entries) = order_and_log(&messages, 1)?;
        let snapshot = PgSnapshot {
            conn: Mutex::new(Some(conn)),
            pool: self.pool.clone(),
            taken: Instant::now(),
        };
        if tid < known {
            self.state.lock().went_back(tid);
        }
        Ok((snapshot, tid, entries))
    }
}

impl PgBackend {
    /// A snapshot at the end of the commit log, every commit in it told to
    /// the sessions; the caller holds `catch_up`. Returns it and its tid.
    pub(super) fn snapshot_at_log_end(&self) -> Result<(PgSnapshot, u64)> {
        let (snapshot, tid, entries) = self.start_snapshot()?;
        let mut st = self.state.lock();
        st.take_log(&entries);
        if st.known != tid {
            return Err(database(format!(
                "the commit log ends at {}, the commit order at {tid}: \
                 the database is not a consistent durus-redb store",
                st.known
            )));
        }
        Ok((snapshot, tid))
    }

    /// A snapshot of the state at `tid`, if that is still the latest (the
    /// order is held by this front end, so only another's commit could
    /// have come since); else `None`.
    pub(super) fn snapshot_if_at(&self, tid: u64) -> Option<Result<Box<dyn Snapshot>>> {
        let _log = self.catch_up.lock();
        match self.snapshot_at_log_end() {
            Ok((snapshot, at)) if at == tid => Some(Ok(Box::new(snapshot))),
            Ok(_) => None,
            Err(e) => Some(Err(e)),
        }
    }
}
