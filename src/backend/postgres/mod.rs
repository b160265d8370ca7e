//! A PostgreSQL database behind the server's seam: `durus-redb serve
//! --database postgresql://...`. Several servers over one database are
//! interchangeable front ends; the database holds everything that must
//! outlive one of them.
//!
//! The tables (format [`FORMAT`], in `durus_meta`):
//! - `durus_records (oid, chunk, tid, data)`: each record in chunks of at
//!   most 1 MiB, with the tid of the commit that wrote it.
//! - `durus_order (id = 1, tid, objects)`: the commit order. A commit locks
//!   this one row (`SELECT ... FOR UPDATE`) from choosing the invalidations
//!   its client is sent until it is applied, so commits through any front
//!   end fall in one order, as with one Durus server (a front end alone,
//!   which no other may commit beside, moves it in the commit's one
//!   statement instead: see `alone`); `tid` is the last commit's number,
//!   `objects` how many records there are.
//! - `durus_log (tid, oids, refs)`: what each commit changed, and what its
//!   records reference (empty for a collection's entry; `NULL` for one
//!   written by a front end of format 1). A front end reads the oids from
//!   its own position, under the order when it commits and on a client's
//!   sync otherwise, and tells its sessions; a collection with a grace
//!   window reads the references (see `collect`).
//! - `durus_oids (id = 1, next)`: oids are taken from it in blocks, each
//!   block durable before one oid of it is handed out: never twice, across
//!   front ends, restarts and failovers.
//! - `durus_front_ends (id, flushes, position, alive_at)`: one row per front
//!   end: its flush barrier, how far it has read the log, when it last said
//!   so. The log is trimmed below the lowest position of the front ends
//!   alive in the last 10 minutes.
//! - `durus_alone (id = 1, holder, renewals, wanted)`: the front end that
//!   serves loads and syncs from memory because it is the only one
//!   committing (see `alone`); 0 for none. `durus_aware (id)`: the front
//!   ends that know of it.
//!
//! Durability: a commit is applied with `synchronous_commit = off`, so the
//! order row is not held through the WAL flush; it is acknowledged only
//! after a barrier, a one-row update committed synchronously on another
//! connection after it, which returns only once the WAL is flushed (and,
//! with a synchronous standby, replicated) past the commit. Commits that
//! finish together share one barrier, which confirms only those sent after
//! its connection was had (so on the server they were applied to, not a
//! standby promoted since). A commit with nobody waiting behind
//! it is flushed by its own `COMMIT` instead (nobody would be let in
//! early), and a front end alone writes such a commit in one statement
//! outside a transaction, flushed before it returns (see `alone`).
//!
//! Loads read the record with its tid: one written after the session's last
//! sync is answered `Invalid`, as one invalidated is, so a session never
//! reads a state newer than what it was told of, even when the commit came
//! through another front end that this one has not heard of yet. A front
//! end that holds the database alone (no other one may commit: see
//! `alone`) answers syncs and loads from memory instead.
//!
//! Only what PostgreSQL, CockroachDB and YugabyteDB all have is used: plain
//! tables with bigint keys and bytea values, `INSERT ... ON CONFLICT`,
//! `SELECT ... FOR UPDATE` on one row, prepared statements, explicit
//! transactions. The order is taken with two statements prepared in SQL
//! (`PREPARE`: the row's lock, then the log); a database that refuses to
//! prepare or run them gets plain statements instead.
//!
//! Lock order (this module's own locks, plain `parking_lot`): `collector`
//! (one full collection at a time), `order` (the local side of the commit
//! order, with its connection), `catch_up`, `alloc`, `state`; the barrier's
//! locks are taken with none of these held but `collector` and `order`.

mod alone;
mod batch;
mod collect;
pub(crate) mod import;
mod session;
mod snapshot;
#[cfg(test)]
pub(crate) mod testdb;
#[cfg(test)]
mod tests;
pub(crate) mod tools;
pub(crate) mod url;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use parking_lot::{Condvar, Mutex};
use postgres::{Client, SimpleQueryMessage, Statement};

use super::{Backend, Hold, LiveState, PoisonWatch};
use crate::error::{Result, StorageError};
use crate::gc::FullReport;
use crate::record::Oid;

/// The version of the tables this build writes and reads.
/// Format 2 added `durus_log.refs`, format 3 `durus_alone`; a database of
/// format 1 or 2 is upgraded in place when a front end of this build opens
/// it (see [`ensure_schema`]).
pub(crate) const FORMAT: i64 = 3;

/// The largest piece of a record in one row (CockroachDB advises against
/// larger values).
const CHUNK: usize = 1 << 20;

/// Oids taken from `durus_oids` at a time.
const OID_BLOCK: u64 = 1024;

/// For an order's connection: `durus_take_order` locks the order row,
/// `durus_read_log` reads the commit log past `$1`. Run one after the other
/// in one simple query, the second's snapshot is taken once the row is
/// had, so it reads every entry up to the row's tid, also those its last
/// holder committed while this one waited.
const TAKE_ORDER: &str = "PREPARE durus_take_order AS \
     SELECT tid FROM durus_order WHERE id = 1 FOR UPDATE; \
     PREPARE durus_read_log(bigint) AS \
     SELECT tid, oids FROM durus_log WHERE tid > $1 ORDER BY tid; \
     PREPARE durus_alone_holder AS SELECT holder FROM durus_alone WHERE id = 1";

/// The order row and the log past `$1`, in one snapshot.
const READ_LOG: &str = "SELECT o.tid, l.tid, l.oids FROM durus_order o \
     LEFT JOIN durus_log l ON l.tid > $1 WHERE o.id = 1 ORDER BY l.tid";

/// Oids a front end knows the stored state of at most (about 40 bytes
/// each): beyond, it forgets them all and learns again.
const STORED_FACTS: usize = 1 << 20;

/// Idle connections kept for loads and syncs.
const IDLE_CONNECTIONS: usize = 16;

/// Oids loaded in one statement during a pack's walk.
const WALK_BATCH: usize = 1000;

/// How often a front end reads the log, says how far it has read, and
/// trims the log, when its clients do not make it read the log sooner.
const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(10);

/// A front end not heard of for this long no longer holds the log back
/// (if it comes back, it finds entries gone and closes its sessions).
const ALIVE_SECONDS: i64 = 600;

/// Tries of the order's first statements when the database asks for a
/// retry (serialization failure, deadlock): nothing was sent to a client.
const ENTRY_TRIES: u32 = 5;

/// A database URL fit for a log line or a message: its password, if any,
/// replaced by `***`.
pub fn redact_database_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (main, query) = match rest.split_once('?') {
            Some((m, q)) => (m.to_string(), Some(q)),
            None => (rest.to_string(), None),
        };
        let main = match main.split_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => main.clone(),
            },
            None => main,
        };
        let query = query.map(|q| {
            q.split('&')
                .map(|kv| match kv.split_once('=') {
                    Some((k, _)) if k == "password" => format!("{k}=***"),
                    _ => kv.to_string(),
                })
                .collect::<Vec<_>>()
                .join("&")
        });
        return match query {
            Some(q) => format!("{scheme}://{main}?{q}"),
            None => format!("{scheme}://{main}"),
        };
    }
    url.split_whitespace()
        .map(|kv| {
            if kv.starts_with("password=") {
                "password=***"
            } else {
                kv
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// A database error as this crate's error, with the database's message.
pub(crate) fn db_error(e: postgres::Error) -> StorageError {
    let detail = match e.as_db_error() {
        Some(db) => format!("{} ({}): {}", db.message(), db.code().code(), db.severity()),
        None => {
            let mut text = e.to_string();
            let mut source = std::error::Error::source(&e);
            while let Some(s) = source {
                text.push_str(": ");
                text.push_str(&s.to_string());
                source = s.source();
            }
            text
        }
    };
    StorageError::Database { detail }
}

fn database(detail: impl Into<String>) -> StorageError {
    StorageError::Database {
        detail: detail.into(),
    }
}

/// True if the database asked for the transaction to be tried again (a
/// serialization failure or a deadlock; see [`db_error`]'s format).
fn is_retry(e: &StorageError) -> bool {
    matches!(e, StorageError::Database { detail }
        if detail.contains("(40001)") || detail.contains("(40P01)"))
}

/// True if a statement waited longer than `lock_timeout` for a lock
/// (SQLSTATE 55P03; see [`db_error`]'s format).
fn is_lock_timeout(e: &StorageError) -> bool {
    matches!(e, StorageError::Database { detail } if detail.contains("(55P03)"))
}

/// True if the database refused a statement as one it cannot run: no such
/// prepared statement (SQLSTATE class 26), a feature it lacks (0A), or a
/// syntax or access rule (42); not a timeout, a lost lock or a broken
/// connection (see [`db_error`]'s format: `message (CODE): severity`).
fn is_unsupported(e: &StorageError) -> bool {
    sqlstate(e).is_some_and(|c| c.starts_with("26") || c.starts_with("0A") || c.starts_with("42"))
}

/// The SQLSTATE of a database's error (see [`db_error`]'s format:
/// `message (CODE): severity`).
fn sqlstate(e: &StorageError) -> Option<&str> {
    let StorageError::Database { detail } = e else {
        return None;
    };
    detail
        .rsplit_once("): ")
        .and_then(|(head, _)| head.rsplit_once(" ("))
        .map(|(_, code)| code)
        .filter(|c| c.len() == 5)
}

/// An oid as the database's bigint (the same 64 bits).
fn key(oid: Oid) -> i64 {
    oid.0 as i64
}

fn oid_of(key: i64) -> Oid {
    Oid(key as u64)
}

/// A number in a simple query's text answer.
fn text_u64(text: Option<&str>) -> Result<u64> {
    text.and_then(|t| t.parse::<i64>().ok())
        .map(|n| n as u64)
        .ok_or_else(|| database(format!("expected a number, the database sent {text:?}")))
}

/// A bytea in a simple query's text answer (the hex format, `\x...`).
fn text_bytea(text: Option<&str>) -> Result<Vec<u8>> {
    let bad = || {
        database(format!(
            "expected a bytea in hex, the database sent {text:?}"
        ))
    };
    let hex = text.and_then(|t| t.strip_prefix("\\x")).ok_or_else(bad)?;
    if !hex.len().is_multiple_of(2) {
        return Err(bad());
    }
    (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).map_err(|_| bad()))
        .collect()
}

/// A commit log entry: a tid and the oids its commit changed.
type LogEntry = (u64, Vec<Oid>);

/// The order's tid and the log entries from a simple query's answer whose
/// statement number `at` reads the order row and the next the log.
fn order_and_log(messages: &[SimpleQueryMessage], at: usize) -> Result<(u64, Vec<LogEntry>)> {
    let mut statement = 0;
    let mut tid = None;
    let mut entries = Vec::new();
    for m in messages {
        match m {
            SimpleQueryMessage::CommandComplete(_) => statement += 1,
            SimpleQueryMessage::Row(row) if statement == at => {
                tid = Some(text_u64(row.get(0))?);
            }
            SimpleQueryMessage::Row(row) if statement == at + 1 => {
                let oids = text_bytea(row.get(1))?;
                entries.push((text_u64(row.get(0))?, oids_from(&oids)?));
            }
            _ => {}
        }
    }
    let tid =
        tid.ok_or_else(|| database("the commit order's row (durus_order, id 1) is missing"))?;
    Ok((tid, entries))
}

/// The front end holding the database alone (`durus_alone.holder`, 0 for
/// none) from the answer of a simple query whose statement number `at`
/// reads it.
fn holder_of(messages: &[SimpleQueryMessage], at: usize) -> Result<i64> {
    let mut statement = 0;
    for m in messages {
        match m {
            SimpleQueryMessage::CommandComplete(_) => statement += 1,
            SimpleQueryMessage::Row(row) if statement == at => {
                return Ok(text_u64(row.get(0))? as i64);
            }
            _ => {}
        }
    }
    Err(database("the row of durus_alone (id 1) is missing"))
}

/// `begin` (`BEGIN`, and the statements that set the transaction up), a
/// lock of the order row, the log past `known` and the holder of
/// `durus_alone`, by the statements of [`TAKE_ORDER`] on `conn`, in one
/// round trip: the row's tid, the entries up to it, the holder.
fn take_prepared(conn: &mut Conn, begin: &str, known: u64) -> Result<(u64, Vec<LogEntry>, i64)> {
    let messages = conn
        .client
        .simple_query(&format!(
            "{begin}; EXECUTE durus_take_order; EXECUTE durus_read_log({known}); \
             EXECUTE durus_alone_holder"
        ))
        .map_err(db_error)?;
    let at = begin.split(';').count();
    let (tid, entries) = order_and_log(&messages, at)?;
    Ok((tid, entries, holder_of(&messages, at + 2)?))
}

/// The order's tid and the log entries from the rows of [`READ_LOG`].
fn log_rows(rows: &[postgres::Row]) -> Result<(u64, Vec<LogEntry>)> {
    let tid = rows
        .first()
        .map(|r| r.get::<_, i64>(0) as u64)
        .ok_or_else(|| database("the commit order's row (durus_order, id 1) is missing"))?;
    let mut entries = Vec::new();
    for r in rows {
        if let Some(t) = r.get::<_, Option<i64>>(1) {
            entries.push((t as u64, oids_from(r.get::<_, &[u8]>(2))?));
        }
    }
    Ok((tid, entries))
}

/// Records cut in chunks of at most [`CHUNK`] bytes, as the columns of
/// an `unnest` insert.
#[derive(Default)]
struct Chunks<'a> {
    oids: Vec<i64>,
    numbers: Vec<i32>,
    data: Vec<&'a [u8]>,
    /// The bytes of `data`.
    bytes: usize,
}

impl<'a> Chunks<'a> {
    /// Adds the record of `oid`; returns its number of chunks.
    fn push(&mut self, oid: Oid, record: &'a crate::record::Record) -> i32 {
        let mut n = 0i32;
        for piece in record.as_bytes().chunks(CHUNK) {
            self.oids.push(key(oid));
            self.numbers.push(n);
            self.data.push(piece);
            self.bytes += piece.len();
            n += 1;
        }
        n
    }
}

/// Removes the chunks past the end of each `(oid, chunks)` record written
/// over a longer one (rare: records over 1 MiB that shrank).
fn cut_shrunk(conn: &mut Conn, shrunk: &[(i64, i32)]) -> Result<()> {
    for (oid, n) in shrunk {
        conn.execute(
            "DELETE FROM durus_records WHERE oid = $1 AND chunk >= $2",
            &[oid, n],
        )?;
    }
    Ok(())
}

/// Oids as a commit log entry: 8 bytes each, big-endian.
fn oids_bytes(oids: &[Oid]) -> Vec<u8> {
    oids.iter().flat_map(|o| o.to_bytes()).collect()
}

/// What the records of one commit reference, for its log entry: their
/// references one after the other, 8 bytes an oid (an oid may come more
/// than once).
fn refs_bytes(records: &std::collections::BTreeMap<Oid, crate::record::Record>) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(records.values().map(|r| r.refs_bytes().len()).sum());
    for record in records.values() {
        bytes.extend_from_slice(record.refs_bytes());
    }
    bytes
}

fn oids_from(bytes: &[u8]) -> Result<Vec<Oid>> {
    if !bytes.len().is_multiple_of(8) {
        return Err(StorageError::damaged(format!(
            "a commit log entry of {} bytes (not a list of oids)",
            bytes.len()
        )));
    }
    Ok(bytes
        .chunks_exact(8)
        .map(|c| Oid::from_bytes(c.try_into().expect("8 bytes")))
        .collect())
}

/// Makes the commits of `conn` wait for the WAL's flush whatever the
/// database's default: a role or a server set to `synchronous_commit =
/// off` would have a commit answered before it is durable. The other
/// values (`local`, `remote_write`, `on`, `remote_apply`: what a standby
/// must confirm) are the operator's, and kept.
fn durable_commits(conn: &mut Conn) {
    let off = conn
        .client
        .simple_query("SHOW synchronous_commit")
        .ok()
        .and_then(|messages| {
            messages.iter().find_map(|m| match m {
                SimpleQueryMessage::Row(row) => row.get(0).map(|v| v == "off"),
                _ => None,
            })
        })
        .unwrap_or(false);
    if off {
        tracing::info!(
            "the database's synchronous_commit is off: set on for this front end's commits"
        );
        if let Err(e) = conn.batch("SET synchronous_commit = on") {
            tracing::warn!("the database refused synchronous_commit = on ({e})");
        }
    }
}

/// A connection with its prepared statements.
pub(crate) struct Conn {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
    /// `durus_take_order` and `durus_read_log` are prepared on it (an
    /// order's connection).
    take_prepared: bool,
}

impl Conn {
    fn connect(db: &url::Database) -> Result<Conn> {
        let client = db.connect().map_err(db_error)?;
        Ok(Conn {
            client,
            prepared: HashMap::new(),
            take_prepared: false,
        })
    }

    /// The statement `sql`, prepared once per connection.
    fn statement(&mut self, sql: &'static str) -> Result<Statement> {
        if let Some(s) = self.prepared.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).map_err(db_error)?;
        self.prepared.insert(sql, s.clone());
        Ok(s)
    }

    fn query(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<Vec<postgres::Row>> {
        let s = self.statement(sql)?;
        self.client.query(&s, params).map_err(db_error)
    }

    fn execute(
        &mut self,
        sql: &'static str,
        params: &[&(dyn postgres::types::ToSql + Sync)],
    ) -> Result<u64> {
        let s = self.statement(sql)?;
        self.client.execute(&s, params).map_err(db_error)
    }

    fn batch(&mut self, sql: &str) -> Result<()> {
        self.client.batch_execute(sql).map_err(db_error)
    }
}

/// Connections for loads, syncs and oid blocks, opened as needed.
pub(super) struct Pool {
    config: url::Database,
    idle: Mutex<Vec<Conn>>,
}

/// A connection of the pool, given back when dropped (unless broken).
struct Pooled<'a> {
    pool: &'a Pool,
    conn: Option<Conn>,
}

impl Pool {
    /// A connection of its own (a snapshot's), given back with
    /// [`give_back`](Self::give_back).
    fn take(&self) -> Result<Conn> {
        let idle = self.idle.lock().pop();
        match idle {
            Some(c) if !c.client.is_closed() => Ok(c),
            _ => Conn::connect(&self.config),
        }
    }

    fn give_back(&self, conn: Conn) {
        if !conn.client.is_closed() {
            let mut idle = self.idle.lock();
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(conn);
            }
        }
    }

    /// Runs the read `f` on a connection of the pool. If it fails on an
    /// idle connection and the failure closed it (the database restarted
    /// or failed over since that connection was last used), the other
    /// idle ones are dropped too and `f` runs once more on a new
    /// connection: a client's load is not failed for a connection it never
    /// chose. `f` must be safe to run twice (a read).
    fn read<T>(&self, mut f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
        let idle = self.idle.lock().pop();
        if let Some(mut conn) = idle.filter(|c| !c.client.is_closed()) {
            match f(&mut conn) {
                Ok(v) => {
                    self.give_back(conn);
                    return Ok(v);
                }
                Err(e) if !conn.client.is_closed() => {
                    self.give_back(conn);
                    return Err(e);
                }
                Err(e) => {
                    tracing::info!("a pooled database connection was lost ({e}); connecting again");
                    self.idle.lock().clear();
                }
            }
        }
        let mut conn = Conn::connect(&self.config)?;
        let result = f(&mut conn);
        self.give_back(conn);
        result
    }

    fn get(&self) -> Result<Pooled<'_>> {
        let idle = self.idle.lock().pop();
        let conn = match idle {
            Some(c) if !c.client.is_closed() => c,
            _ => Conn::connect(&self.config)?,
        };
        Ok(Pooled {
            pool: self,
            conn: Some(conn),
        })
    }
}

impl std::ops::Deref for Pooled<'_> {
    type Target = Conn;
    fn deref(&self) -> &Conn {
        self.conn.as_ref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for Pooled<'_> {
    fn deref_mut(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("held until dropped")
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        if let Some(conn) = self.conn.take()
            && !conn.client.is_closed()
        {
            let mut idle = self.pool.idle.lock();
            if idle.len() < IDLE_CONNECTIONS {
                idle.push(conn);
            }
        }
    }
}

/// What this front end knows of the commit log and its sessions.
#[derive(Default)]
struct State {
    /// Every commit up to this tid has been told to the sessions.
    known: u64,
    /// Oids handed out and not yet stored, with the session holding each.
    held: HashMap<Oid, u64>,
    /// Oids written by the open batch, not yet committed: loads of them
    /// are answered `Invalid` (see `batch`).
    pending: std::collections::HashSet<Oid>,
    sessions: HashMap<u64, SessionData>,
    next_session: u64,
    full_collections: u64,
    removed_full: u64,
    /// While a full collection runs: every oid changed since its snapshot
    /// (each once: at most the store's oids).
    collecting: Option<std::collections::HashSet<Oid>>,
    /// This front end lost track of the log while a collection ran.
    collect_lost: bool,
    /// While a collection with a grace window runs: it has read the
    /// references of the log up to this tid, so the front end's position
    /// (below which the log is trimmed) stays there.
    refs_read: Option<u64>,
    /// What is stored of oids as of `known`, learned by this front end's
    /// commits: the number of each record's last chunk, `None` for an oid
    /// not stored. A commit joining a batch is checked from it without
    /// reading the database. Kept coherent by the log (an oid a commit or
    /// a collection changed is forgotten when it is told); emptied when
    /// the front end loses track of the log, when the order's connection is
    /// made again (the database may have lost commits it had shown), and
    /// when it would hold more than [`STORED_FACTS`].
    stored: HashMap<Oid, Option<i32>>,
    /// Records as of `known`, forgotten as `stored` is: loads are answered
    /// from it while this front end holds the database alone.
    cache: alone::RecordCache,
    /// Counts every change of what this front end knows (a commit told, a
    /// loss of track): a record read from the database goes into `cache`
    /// only if none came while it was read.
    epoch: u64,
    /// Commits of other front ends (and their collections) read from the
    /// log.
    foreign: u64,
    /// While this front end holds the database alone: until when, by its
    /// own clock, no other front end may commit (see `alone`).
    alone_until: Option<std::time::Instant>,
    /// A commit's outcome is unknown: the hold is taken again, from the
    /// log, before it is renewed.
    alone_recheck: bool,
}

#[derive(Default)]
struct SessionData {
    /// Changed by others (or collected) since the session's last sync.
    invalid: BTreeSet<Oid>,
    /// Every commit up to this tid is in `invalid` or the session's own.
    seen: u64,
    /// How many oids of `held` are this session's.
    held: u64,
    /// The front end lost track of the database while this session was
    /// open (commit log entries trimmed before it read them, or commits it
    /// had read lost in a failover): what the session's client holds can no
    /// longer be checked.
    lost: bool,
}

impl State {
    /// Tells every session but `by` (all of them for `None`) that `oids`
    /// changed.
    fn publish(&mut self, by: Option<u64>, oids: &[Oid]) {
        if let Some(changed) = &mut self.collecting {
            changed.extend(oids.iter().copied());
        }
        self.epoch += 1;
        for oid in oids {
            self.stored.remove(oid);
            self.cache.remove(*oid);
        }
        for (id, s) in &mut self.sessions {
            if Some(*id) != by {
                s.invalid.extend(oids.iter().copied());
            }
        }
    }

    /// The database's last commit is older than what this front end has
    /// read: it lost commits (a failover to a standby that had not received
    /// them; none was acknowledged if the standby was synchronous). What
    /// the sessions were told no longer matches the database, and the lost
    /// tids will be given to new commits: every session is closed, and the
    /// front end goes on from the database's state.
    fn went_back(&mut self, tid: u64) {
        tracing::error!(
            "the database's last commit is {tid}, but this front end had read up to {}: it \
             lost commits (a failover to a standby that did not have them?); closing its {} \
             sessions, whose clients must reconnect",
            self.known,
            self.sessions.len()
        );
        for s in self.sessions.values_mut() {
            s.lost = true;
        }
        self.collect_lost = true;
        self.forget();
        self.known = tid;
    }

    /// Whether this front end holds the database alone now (see `alone`).
    fn alone(&self) -> bool {
        self.alone_until
            .is_some_and(|until| std::time::Instant::now() < until)
    }

    /// Forgets what was learned of the stored records (the database may
    /// no longer hold what they were learned from).
    fn forget(&mut self) {
        self.stored.clear();
        self.cache.clear();
        self.epoch += 1;
    }

    /// Tells every session but those of `told` that `oids` changed.
    fn publish_except(&mut self, told: &[u64], oids: &[Oid]) {
        if let Some(changed) = &mut self.collecting {
            changed.extend(oids.iter().copied());
        }
        self.epoch += 1;
        for oid in oids {
            self.stored.remove(oid);
            self.cache.remove(*oid);
        }
        for (id, s) in &mut self.sessions {
            if !told.contains(id) {
                s.invalid.extend(oids.iter().copied());
            }
        }
    }

    /// Learns what is stored of oids as of `known` (see `stored`).
    fn learn(&mut self, facts: impl IntoIterator<Item = (Oid, Option<i32>)>) {
        self.stored.extend(facts);
        if self.stored.len() > STORED_FACTS {
            self.stored.clear();
        }
    }

    /// Takes in commit log entries read from the database, in tid order.
    fn take_log(&mut self, entries: &[LogEntry]) {
        for (tid, oids) in entries {
            if *tid <= self.known {
                continue;
            }
            if *tid != self.known + 1 {
                tracing::error!(
                    "the commit log's entries {} to {} are gone (trimmed before this front end \
                     read them): its {} sessions are closed",
                    self.known + 1,
                    tid - 1,
                    self.sessions.len()
                );
                for s in self.sessions.values_mut() {
                    s.lost = true;
                }
                self.collect_lost = true;
                self.forget();
            }
            self.foreign += 1;
            self.publish(None, oids);
            self.known = *tid;
        }
    }
}

/// The oid block this front end hands out from.
#[derive(Default)]
struct Alloc {
    next: u64,
    end: u64,
}

/// The flush barrier's shared state: runs are numbered from 1.
#[derive(Default)]
struct BarrierState {
    started: u64,
    finished: u64,
    running: bool,
    last_ok: u64,
    /// When the connection the last run that succeeded ran on was made.
    last_ok_connected: Option<Instant>,
    last_error: Option<String>,
}

/// The database-backed store of one front end.
pub(crate) struct PgBackend {
    /// The local side of the commit order: the connection that holds the
    /// database's side, and a batch's open transaction.
    order: Mutex<batch::OrderSlot>,
    /// Commits that went into a batch another commit had opened.
    batched: AtomicU64,
    /// Commits refused while a batch was open (before they joined it).
    refused_in_batch: AtomicU64,
    /// How long a batch may hold the order row at most, in µs:
    /// [`batch::MAX_HOLD`] (tests lengthen it to make batches certain).
    max_hold_micros: AtomicU64,
    /// Reads of the database by joining commits' checks (the oids they
    /// named that the batch and `State::stored` did not know).
    join_reads: AtomicU64,
    /// Snapshot reads are served (`serve --snapshot-reads`): no batches.
    snapshot_reads: std::sync::atomic::AtomicBool,
    /// Held while reading the commit log and while a commit becomes
    /// visible and is told: the log is taken in order, once.
    catch_up: Mutex<()>,
    alloc: Mutex<Alloc>,
    state: Mutex<State>,
    pool: Arc<Pool>,
    /// This front end's row in `durus_front_ends`.
    front_end: i64,
    /// Oids taken from `durus_oids` at a time.
    oid_block: u64,
    barrier: Mutex<BarrierState>,
    barrier_done: Condvar,
    barrier_conn: Mutex<Option<(Conn, Instant)>>,
    /// Whether the order's connection may defer its WAL flush (false where
    /// the database refused `synchronous_commit = off`: every commit is
    /// then flushed before the order is released).
    deferred_flush: std::sync::atomic::AtomicBool,
    order_waiting: AtomicU64,
    /// Held by a full collection: one at a time on this front end.
    collector: Mutex<()>,
    /// Packs waiting for `collector`: a background collection stops for
    /// them.
    packs_waiting: AtomicU64,
    /// Closed (`Backend::close`): the background collector stops.
    closed: std::sync::atomic::AtomicBool,
    /// Load requests answered from memory (see `alone`).
    loads_from_memory: AtomicU64,
    /// Commits written in one statement, without taking the order (see
    /// `alone`).
    alone_commits: AtomicU64,
    /// Records read are kept (`State::cache`): this front end may hold the
    /// database alone.
    keep_records: std::sync::atomic::AtomicBool,
    /// Tests: the thread holding the database alone ticks every 5 ms (not
    /// `alone::RENEW_EVERY`) and looks at every tick (not every
    /// `alone::LOOK_EVERY`), so that holds come and go between steps.
    #[cfg(test)]
    alone_quick: std::sync::atomic::AtomicBool,
    /// Tests: the thread holding the database alone stops as if the
    /// process had died (no renewal, no giving way).
    #[cfg(test)]
    alone_dies: std::sync::atomic::AtomicBool,
    /// Tests: run once on the order's connection just before a batch's
    /// `COMMIT` is sent.
    #[cfg(test)]
    #[allow(clippy::type_complexity)]
    before_commit: Mutex<Option<Box<dyn FnOnce(&mut Conn) + Send>>>,
}

impl PgBackend {
    /// Connects to the database at `url` (a libpq-style URL or key=value
    /// string), creating the tables if the database has none, refusing one
    /// of another format.
    pub(crate) fn open(url: &str) -> Result<PgBackend> {
        PgBackend::open_with(url::Database::parse(url)?, OID_BLOCK)
    }

    /// [`open`](Self::open) with the database's configuration, taking
    /// `oid_block` oids from `durus_oids` at a time.
    pub(crate) fn open_with(mut config: url::Database, oid_block: u64) -> Result<PgBackend> {
        if config.config.get_application_name().is_none() {
            config.config.application_name("durus-redb");
        }
        let mut conn = Conn::connect(&config)?;
        tracing::info!(
            "database reached {}",
            if config.uses_tls() {
                "over TLS, its certificate verified"
            } else {
                "without TLS (sslmode=verify-full and sslrootcert=PATH ask for it)"
            }
        );
        ensure_schema(&mut conn)?;
        if !conn
            .query(
                "SELECT 1 FROM durus_meta WHERE name = $1",
                &[&import::MIGRATION],
            )?
            .is_empty()
        {
            return Err(database(
                "the database holds an unfinished import (`durus-redb migrate`): run the same \
                 migrate again to finish it before serving the database",
            ));
        }
        let row = conn.query(
            "UPDATE durus_meta SET value = value + 1 WHERE name = 'front_ends' RETURNING value",
            &[],
        )?;
        let front_end: i64 = row[0].get(0);
        // With its row, it says it knows of `durus_alone` (see `alone`).
        conn.batch("BEGIN")?;
        let registered = conn
            .execute(
                "INSERT INTO durus_front_ends (id, flushes, position, alive_at) \
                 VALUES ($1, 0, (SELECT tid FROM durus_order WHERE id = 1), now())",
                &[&front_end],
            )
            .and_then(|_| conn.execute("INSERT INTO durus_aware (id) VALUES ($1)", &[&front_end]))
            .and_then(|_| conn.batch("COMMIT"));
        if let Err(e) = registered {
            let _ = conn.batch("ROLLBACK");
            return Err(e);
        }
        let known: i64 = conn.query("SELECT tid FROM durus_order WHERE id = 1", &[])?[0].get(0);
        let backend = PgBackend {
            order: Mutex::new(batch::OrderSlot::default()),
            batched: AtomicU64::new(0),
            refused_in_batch: AtomicU64::new(0),
            max_hold_micros: AtomicU64::new(batch::MAX_HOLD.as_micros() as u64),
            join_reads: AtomicU64::new(0),
            snapshot_reads: std::sync::atomic::AtomicBool::new(false),
            catch_up: Mutex::new(()),
            alloc: Mutex::new(Alloc::default()),
            state: Mutex::new(State {
                known: known as u64,
                ..State::default()
            }),
            pool: Arc::new(Pool {
                config,
                idle: Mutex::new(vec![conn]),
            }),
            front_end,
            oid_block: oid_block.max(1),
            barrier: Mutex::new(BarrierState::default()),
            barrier_done: Condvar::new(),
            barrier_conn: Mutex::new(None),
            deferred_flush: std::sync::atomic::AtomicBool::new(true),
            order_waiting: AtomicU64::new(0),
            collector: Mutex::new(()),
            packs_waiting: AtomicU64::new(0),
            closed: std::sync::atomic::AtomicBool::new(false),
            loads_from_memory: AtomicU64::new(0),
            alone_commits: AtomicU64::new(0),
            keep_records: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            alone_quick: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            alone_dies: std::sync::atomic::AtomicBool::new(false),
            #[cfg(test)]
            before_commit: Mutex::new(None),
        };
        // Made before any commit is sent, so that the first ones' flushes
        // can be confirmed on it (see `flush_barrier`).
        match backend.barrier_conn() {
            Ok(made) => *backend.barrier_conn.lock() = Some(made),
            Err(e) => tracing::warn!("no connection to confirm flushes on yet: {e}"),
        }
        Ok(backend)
    }

    /// Reads the log, records how far in `durus_front_ends`, and removes
    /// the log entries every front end alive has read. Returns how many
    /// entries went.
    pub(crate) fn heartbeat(&self) -> Result<u64> {
        self.catch_up()?;
        let position = {
            let st = self.state.lock();
            st.refs_read.map_or(st.known, |read| read.min(st.known)) as i64
        };
        let mut conn = self.pool.get()?;
        conn.execute(
            "UPDATE durus_front_ends SET position = $2, alive_at = now() WHERE id = $1",
            &[&self.front_end, &position],
        )?;
        let trimmed = conn.execute(
            "DELETE FROM durus_log WHERE tid < (SELECT min(position) FROM durus_front_ends \
             WHERE alive_at > now() - interval '1 second' * $1)",
            &[&(ALIVE_SECONDS as f64)],
        )?;
        if trimmed > 0 {
            tracing::debug!("trimmed {trimmed} commit log entries every front end has read");
        }
        Ok(trimmed)
    }

    /// Runs [`heartbeat`](Self::heartbeat) every [`HEARTBEAT`] on a thread
    /// of its own, for as long as the backend lives.
    pub(crate) fn start_heartbeat(backend: &Arc<PgBackend>) {
        let weak = Arc::downgrade(backend);
        let spawned = std::thread::Builder::new()
            .name("durus-heartbeat".into())
            .spawn(move || {
                let step = std::time::Duration::from_millis(200);
                let mut waited = std::time::Duration::ZERO;
                loop {
                    std::thread::sleep(step);
                    waited += step;
                    if weak.strong_count() == 0 {
                        return;
                    }
                    if waited < HEARTBEAT {
                        continue;
                    }
                    waited = std::time::Duration::ZERO;
                    let Some(backend) = weak.upgrade() else {
                        return;
                    };
                    if let Err(e) = backend.heartbeat() {
                        tracing::warn!("the front end's heartbeat failed (tried again later): {e}");
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(
                "no heartbeat thread ({e}): the log is trimmed by other front ends only"
            );
        }
    }

    /// Serves snapshot reads (see [`batch`]'s `batching`).
    pub(crate) fn serve_snapshot_reads(&self, on: bool) {
        self.snapshot_reads.store(on, Ordering::Relaxed);
    }

    /// A connection for the commit order, with the WAL flush deferred.
    fn order_conn(&self) -> Result<Conn> {
        // A new connection may reach a database that lost commits the last
        // one showed (a failover, a crash with commits not flushed), with
        // the log grown back to the same tid since: what was learned from
        // them is forgotten.
        self.state.lock().forget();
        let mut conn = Conn::connect(&self.pool.config)?;
        // Log entries read in simple queries come as text: hex, whatever
        // the role's default.
        if let Err(e) = conn.batch("SET bytea_output = hex") {
            tracing::info!("the database refused SET bytea_output = hex ({e})");
        }
        durable_commits(&mut conn);
        // The flush is deferred transaction by transaction (see
        // `begin_order`): a commit written in one statement, outside a
        // transaction (see `alone`), is flushed before it is answered.
        if let Err(e) = conn.batch("BEGIN; SET LOCAL synchronous_commit = off; COMMIT") {
            // Only the database's refusal, not a connection lost on the way.
            if conn.client.is_closed() || sqlstate(&e).is_none() {
                return Err(e);
            }
            let _ = conn.batch("ROLLBACK");
            tracing::warn!(
                "the database refused synchronous_commit = off ({e}): each commit is flushed \
                 while it holds the commit order"
            );
            self.deferred_flush.store(false, Ordering::Relaxed);
        }
        // Taking the order goes with `BEGIN` in one simple query, which
        // cannot carry an extended-protocol statement: a statement
        // prepared in SQL saves parsing and planning it every time.
        match conn.batch(TAKE_ORDER) {
            Ok(()) => conn.take_prepared = true,
            Err(e) => tracing::info!(
                "the database refused PREPARE ({e}): the commit order is taken with plain \
                 statements"
            ),
        }
        Ok(conn)
    }

    /// What begins a transaction taking the order: `BEGIN`, and with the
    /// WAL's flush deferred (see [`flush_barrier`](Self::flush_barrier))
    /// unless the database refused it.
    fn begin_order(&self) -> &'static str {
        if self.deferred_flush.load(Ordering::Relaxed) {
            "BEGIN; SET LOCAL synchronous_commit = off"
        } else {
            "BEGIN"
        }
    }

    /// Reads the order's tid and the commit log past what this front end
    /// knows, in one round trip on `conn` (`begin`: first `BEGIN` and a
    /// lock of the order row, whose tid is then the log's end, and last
    /// the holder of `durus_alone`), and takes them in: see
    /// [`State::take_log`]. Returns the order's tid and the holder (0 when
    /// not `begin`).
    fn read_log(&self, conn: &mut Conn, begin: bool) -> Result<(u64, i64)> {
        let known = self.state.lock().known;
        let start = self.begin_order();
        let prepared = if begin && conn.take_prepared {
            match take_prepared(conn, start, known) {
                Err(e) if !conn.client.is_closed() && is_unsupported(&e) => {
                    // A database that prepared the statements but cannot
                    // run them: the plain statements, from now on (not
                    // for a timeout or a lost lock, which fail this commit
                    // only).
                    tracing::info!(
                        "taking the commit order with a prepared statement failed ({e}): \
                         plain statements from now on"
                    );
                    conn.batch("ROLLBACK")?;
                    conn.take_prepared = false;
                    None
                }
                other => Some(other?),
            }
        } else {
            None
        };
        let (tid, entries, holder) = if let Some(read) = prepared {
            read
        } else if begin {
            // The log is read after the order row is locked, by a statement
            // of its own (so in a snapshot taken after the lock), so it
            // reaches at least the row's tid.
            let messages = conn
                .client
                .simple_query(&format!(
                    "{start}; SELECT tid FROM durus_order WHERE id = 1 FOR UPDATE; \
                     SELECT tid, oids FROM durus_log WHERE tid > {known} ORDER BY tid; \
                     SELECT holder FROM durus_alone WHERE id = 1"
                ))
                .map_err(db_error)?;
            let at = start.split(';').count();
            let (tid, entries) = order_and_log(&messages, at)?;
            (tid, entries, holder_of(&messages, at + 2)?)
        } else {
            // One prepared statement, one snapshot: the order row and the
            // log as one commit left them (a commit moves both at once).
            let (tid, entries) = log_rows(&conn.query(READ_LOG, &[&(known as i64)])?)?;
            (tid, entries, 0)
        };
        let _log = self.catch_up.lock();
        let mut st = self.state.lock();
        // Compared with what was known when the query was sent (every
        // commit known then was visible to it): a commit of this front end
        // may have been told since.
        if tid < known {
            st.went_back(tid);
        }
        st.take_log(&entries);
        Ok((tid, holder))
    }

    /// Brings this front end up to the database's latest commit (a
    /// client's sync, a new session).
    fn catch_up(&self) -> Result<()> {
        self.pool
            .read(|conn| self.read_log(conn, false))
            .map(|_| ())
    }

    /// Returns once everything committed before the call is flushed to the
    /// database's WAL (and its synchronous standbys): one synchronous
    /// commit of this front end's `durus_front_ends` row, shared by the callers
    /// that arrive while one runs.
    ///
    /// `sent`: when the commit's `COMMIT` was sent. A run confirms it only
    /// on a connection made before then, so on the server the commit was
    /// applied to: a connection made since may reach another (a standby
    /// promoted after the commit's server died, which may lack it), whose
    /// flush says nothing of the commit.
    fn flush_barrier(&self, sent: Instant) -> Result<()> {
        let mut st = self.barrier.lock();
        let target = st.started + 1;
        loop {
            if st.finished >= target {
                return if st.last_ok >= target {
                    if st.last_ok_connected.is_some_and(|made| made < sent) {
                        Ok(())
                    } else {
                        Err(database(
                            "the commit was applied but its flush to the database's WAL was not \
                             confirmed: the connection that confirms flushes was made again \
                             after it was sent (if the database failed over meanwhile, the \
                             commit may be lost: sync and look)",
                        ))
                    }
                } else {
                    Err(database(format!(
                        "the commit was applied but its flush to the database's WAL was not \
                         confirmed: {}",
                        st.last_error.as_deref().unwrap_or("unknown failure")
                    )))
                };
            }
            if st.running {
                self.barrier_done.wait(&mut st);
                continue;
            }
            st.running = true;
            st.started += 1;
            let run = st.started;
            drop(st);
            let result = self.run_barrier();
            st = self.barrier.lock();
            st.running = false;
            st.finished = run;
            match result {
                Ok(made) => {
                    st.last_ok = run;
                    st.last_ok_connected = Some(made);
                }
                Err(e) => st.last_error = Some(e.to_string()),
            }
            self.barrier_done.notify_all();
        }
    }

    /// One run of the barrier; returns when its connection was made.
    fn run_barrier(&self) -> Result<Instant> {
        let mut slot = self.barrier_conn.lock();
        if slot.as_ref().is_none_or(|(c, _)| c.client.is_closed()) {
            *slot = None;
            *slot = Some(self.barrier_conn()?);
        }
        let (conn, made) = slot.as_mut().expect("just connected");
        let made = *made;
        let result = conn.execute(
            "UPDATE durus_front_ends SET flushes = flushes + 1 WHERE id = $1",
            &[&self.front_end],
        );
        if result.is_err() {
            *slot = None;
        }
        match result? {
            1 => Ok(made),
            // Nothing written: no commit record, nothing waited for.
            _ => Err(database(format!(
                "this front end's row in durus_front_ends (id {}) is gone: no flush can be \
                 confirmed",
                self.front_end
            ))),
        }
    }

    /// The barrier's connection, with when it was made.
    /// (When it is had: the server is chosen at the end of connecting, so
    /// a commit sent while it connects is not taken as sent after.)
    fn barrier_conn(&self) -> Result<(Conn, Instant)> {
        let mut conn = Conn::connect(&self.pool.config)?;
        durable_commits(&mut conn);
        Ok((conn, Instant::now()))
    }

    /// Takes the database's side of the commit order on `conn` (a
    /// transaction holding the order row) and reads the log up to it, in
    /// one round trip. Returns the last commit's tid.
    ///
    /// While another front end holds the database alone (it serves loads
    /// from memory), the order is given back and that front end asked to
    /// give way first (see `alone`).
    fn take_order(&self, conn: &mut Conn) -> Result<u64> {
        loop {
            let (tid, holder) = retried(conn, |conn| {
                let (tid, holder) = self.read_log(conn, true)?;
                let known = self.state.lock().known;
                if known != tid {
                    return Err(database(format!(
                        "the commit log ends at {known}, the commit order at {tid}: \
                         the database is not a consistent durus-redb store"
                    )));
                }
                Ok((tid, holder))
            })?;
            if holder == 0 || holder == self.front_end {
                return Ok(tid);
            }
            conn.batch("ROLLBACK")?;
            self.wait_for_alone(conn, holder)?;
        }
    }

    /// Hands out `n` oids (the root first, while no root is stored).
    fn allocate(&self, n: usize) -> Result<Vec<Oid>> {
        let mut alloc = self.alloc.lock();
        let mut oids = Vec::with_capacity(n);
        while oids.len() < n {
            if alloc.next == 0 && alloc.end > 0 {
                let mut conn = self.pool.get()?;
                let root = root_stored(&mut conn)?;
                alloc.next = crate::storage::next_free_oid(0, || Ok(root))?;
            }
            if alloc.next >= alloc.end {
                let mut conn = self.pool.get()?;
                let rows = conn.query(
                    "UPDATE durus_oids SET next = next + $1 WHERE id = 1 RETURNING next",
                    &[&(self.oid_block as i64)],
                )?;
                let end: i64 = rows[0].get(0);
                alloc.end = end as u64;
                alloc.next = alloc.end - self.oid_block;
                continue;
            }
            oids.push(Oid(alloc.next));
            alloc.next += 1;
        }
        Ok(oids)
    }

    /// Loads the records of `oids` (each once) with their tids.
    fn fetch(&self, conn: &mut Conn, oids: &[Oid]) -> Result<HashMap<Oid, (u64, Vec<u8>)>> {
        fetch(conn, oids)
    }
}

/// Whether the root is stored, read once the commit order is had: a commit
/// of the root under way (in a batch's open transaction, on this front end
/// or another) is seen once committed, so the root is never handed out as
/// a new oid. (Only while the first oid block is handed out.)
fn root_stored(conn: &mut Conn) -> Result<bool> {
    retried(conn, |conn| {
        conn.batch("BEGIN")?;
        let rows = conn
            .query("SELECT tid FROM durus_order WHERE id = 1 FOR UPDATE", &[])
            .and_then(|_| {
                conn.query(
                    "SELECT 1 FROM durus_records WHERE oid = 0 AND chunk = 0",
                    &[],
                )
            })?;
        conn.batch("COMMIT")?;
        Ok(!rows.is_empty())
    })
}

/// Runs the transaction `f` on `conn` (it begins and, if it ends it,
/// commits it); on an error, rolls it back and runs it again while the
/// database asks for a retry (serialization failure, deadlock), up to
/// [`ENTRY_TRIES`] times. Returns `f`'s error, not the rollback's.
fn retried<T>(conn: &mut Conn, mut f: impl FnMut(&mut Conn) -> Result<T>) -> Result<T> {
    let mut tries = 0;
    loop {
        tries += 1;
        match f(conn) {
            Ok(v) => return Ok(v),
            Err(e) => {
                let _ = conn.batch("ROLLBACK");
                if !is_retry(&e) || tries >= ENTRY_TRIES {
                    return Err(e);
                }
            }
        }
    }
}

/// Loads the records of `oids` with their tids, in one statement.
fn fetch(conn: &mut Conn, oids: &[Oid]) -> Result<HashMap<Oid, (u64, Vec<u8>)>> {
    let keys: Vec<i64> = oids.iter().map(|o| key(*o)).collect();
    let rows = conn.query(
        "SELECT oid, chunk, tid, data FROM durus_records WHERE oid = ANY($1) \
         ORDER BY oid, chunk",
        &[&keys],
    )?;
    let mut found: HashMap<Oid, (u64, Vec<u8>)> = HashMap::with_capacity(rows.len());
    for row in &rows {
        let oid = oid_of(row.get(0));
        let chunk: i32 = row.get(1);
        let tid: i64 = row.get(2);
        let data: &[u8] = row.get(3);
        let entry = found.entry(oid).or_insert_with(|| (tid as u64, Vec::new()));
        if chunk == 0 {
            entry.1.clear();
        }
        entry.1.extend_from_slice(data);
    }
    Ok(found)
}

/// Creates the tables in an empty database, or checks their format.
fn ensure_schema(conn: &mut Conn) -> Result<()> {
    for attempt in 0..2 {
        match conn
            .client
            .query_opt("SELECT value FROM durus_meta WHERE name = 'format'", &[])
        {
            Ok(Some(row)) => {
                let found: i64 = row.get(0);
                if found == 1 || found == 2 {
                    return upgrade(conn);
                }
                if found != FORMAT {
                    return Err(database(format!(
                        "the database holds durus-redb tables of format {found}; this build \
                         serves format {FORMAT} (see UPGRADING.md)"
                    )));
                }
                return Ok(());
            }
            Ok(None) => {
                return Err(database(
                    "the database has a durus_meta table without a format row: \
                     not a durus-redb store (or one whose creation was interrupted)",
                ));
            }
            Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => {
                match create_schema(conn) {
                    Ok(()) => {
                        tracing::info!("created the durus-redb tables (format {FORMAT})");
                        return Ok(());
                    }
                    // Another front end created them at the same moment.
                    Err(e) if attempt == 0 => {
                        tracing::debug!("creating the tables failed ({e}); looking again")
                    }
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(db_error(e)),
        }
    }
    unreachable!("the second attempt returns")
}

/// Format 1 to 2: `durus_log` gains `refs`, `NULL` in the entries already
/// there (and in those front ends of format 1 still running write).
/// Format 2 to 3: `durus_alone` and `durus_aware` are made: a front end of
/// this build says in `durus_aware` that it knows of `durus_alone`, and
/// none holds the database alone while one that did not say so is alive
/// (it would commit without asking). Two front ends upgrading at once: the second finds the format
/// under the format row's lock and does nothing.
fn upgrade(conn: &mut Conn) -> Result<()> {
    for attempt in 1..=UPGRADE_TRIES {
        match upgrade_once(conn) {
            Err(e) if is_lock_timeout(&e) && attempt < UPGRADE_TRIES => {
                tracing::warn!(
                    "upgrading the database waited {UPGRADE_LOCK_WAIT} for the commit log \
                     table, which open transactions of other front ends use (a pack, a \
                     snapshot read); trying again"
                );
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
            Err(e) if is_lock_timeout(&e) => {
                return Err(database(format!(
                    "the database could not be upgraded to format {FORMAT}: the commit \
                     log table stayed in use by other front ends' open transactions (a pack, \
                     a snapshot read) through {UPGRADE_TRIES} waits of {UPGRADE_LOCK_WAIT}; \
                     nothing was changed. Start it again once their packs have finished, or \
                     with the front ends of earlier versions stopped"
                )));
            }
            other => return other,
        }
    }
    unreachable!("the last attempt returns")
}

/// Tries of the upgrade when the commit log table stays in use.
const UPGRADE_TRIES: u32 = 5;

/// How long one try of the upgrade waits for the commit log table: the
/// `ALTER TABLE` waits for the transactions using it, and every statement
/// on it (the commits of every front end) would queue behind it.
const UPGRADE_LOCK_WAIT: &str = "2s";

fn upgrade_once(conn: &mut Conn) -> Result<()> {
    conn.batch("BEGIN")?;
    let upgraded = (|| -> Result<bool> {
        let found: i64 = conn
            .query(
                "SELECT value FROM durus_meta WHERE name = 'format' FOR UPDATE",
                &[],
            )?
            .first()
            .map(|row| row.get(0))
            .unwrap_or(0);
        match found {
            1 | 2 => {
                if found == 1 {
                    conn.batch(&format!(
                        "SET LOCAL lock_timeout = '{UPGRADE_LOCK_WAIT}'; \
                         ALTER TABLE durus_log ADD COLUMN IF NOT EXISTS refs bytea"
                    ))?;
                }
                conn.batch(&format!(
                    "{ALONE_TABLE}; \
                     UPDATE durus_meta SET value = {FORMAT} WHERE name = 'format'"
                ))?;
                Ok(true)
            }
            FORMAT => Ok(false),
            other => Err(database(format!(
                "the database holds durus-redb tables of format {other}; this build \
                 serves format {FORMAT} (see UPGRADING.md)"
            ))),
        }
    })();
    match upgraded {
        Ok(done) => {
            conn.batch("COMMIT")?;
            if done {
                tracing::warn!(
                    "upgraded the database's durus-redb tables to format {FORMAT} (the \
                     commit log keeps each commit's references; a front end may hold the \
                     database alone); front ends of earlier versions are refused from now \
                     on, those still running may go on (see UPGRADING.md)"
                );
            }
            Ok(())
        }
        Err(e) => {
            let _ = conn.batch("ROLLBACK");
            Err(e)
        }
    }
}

/// `durus_alone` and its row, and `durus_aware` (see `alone`).
const ALONE_TABLE: &str = "CREATE TABLE IF NOT EXISTS durus_alone (id int PRIMARY KEY, \
     holder bigint NOT NULL, renewals bigint NOT NULL, wanted bigint NOT NULL); \
     INSERT INTO durus_alone (id, holder, renewals, wanted) VALUES (1, 0, 0, 0) \
     ON CONFLICT (id) DO NOTHING; \
     CREATE TABLE IF NOT EXISTS durus_aware (id bigint PRIMARY KEY)";

fn create_schema(conn: &mut Conn) -> Result<()> {
    let result = conn.batch(&format!(
        "BEGIN;
         CREATE TABLE durus_meta (name text PRIMARY KEY, value bigint NOT NULL);
         CREATE TABLE durus_order (id int PRIMARY KEY, tid bigint NOT NULL,
                                   objects bigint NOT NULL);
         CREATE TABLE durus_oids (id int PRIMARY KEY, next bigint NOT NULL);
         CREATE TABLE durus_records (oid bigint NOT NULL, chunk int NOT NULL,
                                     tid bigint NOT NULL, data bytea NOT NULL,
                                     PRIMARY KEY (oid, chunk));
         CREATE TABLE durus_log (tid bigint PRIMARY KEY, oids bytea NOT NULL, refs bytea);
         CREATE TABLE durus_front_ends (id bigint PRIMARY KEY, flushes bigint NOT NULL,
                                        position bigint NOT NULL,
                                        alive_at timestamptz NOT NULL);
         {ALONE_TABLE};
         INSERT INTO durus_meta (name, value) VALUES ('format', {FORMAT}), ('front_ends', 0);
         INSERT INTO durus_order (id, tid, objects) VALUES (1, 0, 0);
         INSERT INTO durus_oids (id, next) VALUES (1, 0);
         COMMIT;"
    ));
    if result.is_err() {
        let _ = conn.batch("ROLLBACK");
    }
    result
}

impl Backend for PgBackend {
    fn open_session(&self) -> Box<dyn super::Session + '_> {
        if !self.alone()
            && let Err(e) = self.catch_up()
        {
            tracing::warn!("a new session could not read the commit log: {e}");
        }
        let mut st = self.state.lock();
        st.next_session += 1;
        let id = st.next_session;
        let seen = st.known;
        st.sessions.insert(
            id,
            SessionData {
                seen,
                ..SessionData::default()
            },
        );
        Box::new(session::PgSession {
            backend: self,
            id,
            just_ordered: std::cell::Cell::new(false),
            told_pending: Default::default(),
        })
    }

    fn live_state(&self) -> Result<LiveState> {
        let objects: i64 = {
            let mut conn = self.pool.get()?;
            conn.query("SELECT objects FROM durus_order WHERE id = 1", &[])?[0].get(0)
        };
        let st = self.state.lock();
        Ok(LiveState {
            healthy: true,
            objects: objects as u64,
            order_waiting: self.order_waiting.load(Ordering::Acquire),
            gc_removed_full: st.removed_full,
            gc_full_collections: st.full_collections,
            ..LiveState::default()
        })
    }

    /// A pack as Durus's: everything the root does not reach is removed.
    /// It marks in a snapshot while commits flow, and holds the commit
    /// order only to remove a batch (see `collect`).
    fn full_collection(&self, stop: &mut dyn FnMut() -> bool) -> Result<FullReport> {
        self.collect(std::time::Duration::ZERO, false, stop)
    }

    /// Never called: a database failure fails the commits it touches, and
    /// the next ones connect again.
    fn watch_poison(&self, _watch: PoisonWatch) {}

    fn hold_commits(&self) -> Box<dyn Hold + '_> {
        let mut order = self.order.lock();
        // The commits waiting in a batch are answered first.
        match self.end_batch(&mut order) {
            Ok(Some(sent)) => {
                if let Err(e) = self.flush_barrier(sent) {
                    tracing::warn!("the last batch's flush was not confirmed: {e}");
                }
            }
            Ok(None) => {}
            Err(e) => tracing::warn!("the last batch was not committed: {e}"),
        }
        Box::new(order)
    }

    fn close(&self) -> Result<()> {
        self.closed.store(true, Ordering::Release);
        self.leave_alone();
        {
            let mut order = self.order.lock();
            self.end_batch(&mut order)?;
            order.conn = None;
        }
        *self.barrier_conn.lock() = None;
        self.pool.idle.lock().clear();
        Ok(())
    }
}
