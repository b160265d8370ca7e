//! `check`, `stats`, `gc --full` and `export` on a PostgreSQL database, as
//! on a store file. Each reads the database as it is (none creates tables);
//! `check`, `stats` and `export` write nothing.

use std::collections::HashSet;
use std::path::Path;

use super::{Conn, PgBackend, database, db_error, key, oid_of};
use crate::backend::Backend;
use crate::error::{Result, StorageError};
use crate::gc::FullReport;
use crate::migrate::{ExportReport, MigrateError};
use crate::record::{Oid, Record};

/// Records read at a time.
const BATCH: i64 = 2000;

/// What `stats` shows of a database.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DatabaseStats {
    /// The tables' format version.
    pub format: i64,
    /// Records stored.
    pub objects: u64,
    /// The last commit's tid.
    pub last_tid: u64,
    /// Every oid below it may have been handed out.
    pub next_oid: u64,
    /// Entries in the commit log table (trimmed as front ends read it).
    pub log_entries: u64,
    /// Front ends heard of in the last 10 minutes.
    pub front_ends_alive: u64,
    /// An import (`migrate`) is unfinished.
    pub import_unfinished: bool,
    /// The last completed collection (a pack or the background
    /// collector's): the tid of its snapshot and how many seconds ago it
    /// ended. `None` if none ran since the database had format 2.
    pub last_collection: Option<(u64, u64)>,
    /// The front end holding the collector's lease (and alive), and
    /// whether its collection is a background one (with a grace window).
    pub collecting: Option<(i64, bool)>,
    /// The front end holding the database alone (serving loads from
    /// memory; format 3), if any.
    pub alone: Option<i64>,
}

/// What `check` found in a database.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct DatabaseCheck {
    /// Records checked.
    pub records: u64,
    /// References checked.
    pub references: u64,
    /// What is wrong (empty: clean).
    pub problems: Vec<String>,
}

/// Connects to the durus-redb database at `url`, refusing one without the
/// tables or of another format.
fn open_existing(url: &str) -> Result<Conn> {
    let config = super::url::Database::parse(url)?;
    let mut conn = Conn::connect(&config)?;
    match conn
        .client
        .query_opt("SELECT value FROM durus_meta WHERE name = 'format'", &[])
    {
        Ok(Some(row)) => {
            let found: i64 = row.get(0);
            // Formats 1 and 2 differ only by the log's references and
            // `durus_alone`, which these tools do not read.
            if !(1..=super::FORMAT).contains(&found) {
                return Err(database(format!(
                    "the database holds durus-redb tables of format {found}; this build \
                     reads formats 1 to {} (see UPGRADING.md)",
                    super::FORMAT
                )));
            }
            Ok(conn)
        }
        Ok(None) => Err(database(
            "the database has a durus_meta table without a format row: not a durus-redb store",
        )),
        Err(e) if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) => Err(database(
            "the database has no durus-redb tables (serve --database or migrate creates them)",
        )),
        Err(e) => Err(db_error(e)),
    }
}

/// The figures of the database at `url`.
pub fn database_stats(url: &str) -> Result<DatabaseStats> {
    let mut conn = open_existing(url)?;
    let one = |conn: &mut Conn, sql: &'static str| -> Result<i64> {
        Ok(conn.query(sql, &[])?.first().map_or(0, |r| r.get(0)))
    };
    let (tid, objects): (i64, i64) = {
        let rows = conn.query("SELECT tid, objects FROM durus_order WHERE id = 1", &[])?;
        let row = rows
            .first()
            .ok_or_else(|| database("durus_order has no row"))?;
        (row.get(0), row.get(1))
    };
    let meta = |conn: &mut Conn, name: &str| -> Result<Option<i64>> {
        Ok(conn
            .query("SELECT value FROM durus_meta WHERE name = $1", &[&name])?
            .first()
            .map(|r| r.get(0)))
    };
    let format = meta(&mut conn, "format")?.unwrap_or(0);
    let last_collection = match (
        meta(&mut conn, "collected_tid")?,
        meta(&mut conn, "collected_at")?,
    ) {
        (Some(tid), Some(at)) => {
            let now = one(&mut conn, "SELECT extract(epoch FROM now())::bigint")?;
            Some((tid as u64, now.saturating_sub(at).max(0) as u64))
        }
        _ => None,
    };
    // A lease whose front end fell silent is no collection running (the
    // next one takes it over).
    let holder: Option<i64> = conn
        .query(
            "SELECT m.value FROM durus_meta m JOIN durus_front_ends f ON f.id = m.value \
             WHERE m.name = 'collector' \
             AND f.alive_at > now() - interval '1 second' * $1",
            &[&super::collect::LEASE_SECONDS],
        )?
        .first()
        .map(|r| r.get(0));
    let collecting = match holder {
        Some(holder) => Some((
            holder,
            meta(&mut conn, "collector_background")? == Some(holder),
        )),
        None => None,
    };
    // A holder whose front end fell silent holds nothing any more (the
    // next one takes it over).
    let alone = if format >= 3 {
        conn.query(
            "SELECT a.holder FROM durus_alone a JOIN durus_front_ends f ON f.id = a.holder \
             WHERE a.id = 1 AND f.alive_at > now() - interval '30 seconds'",
            &[],
        )?
        .first()
        .map(|r| r.get(0))
    } else {
        None
    };
    Ok(DatabaseStats {
        format,
        alone,
        last_collection,
        collecting,
        objects: objects as u64,
        last_tid: tid as u64,
        next_oid: one(&mut conn, "SELECT next FROM durus_oids WHERE id = 1")? as u64,
        log_entries: one(&mut conn, "SELECT count(*) FROM durus_log")? as u64,
        front_ends_alive: one(
            &mut conn,
            "SELECT count(*) FROM durus_front_ends WHERE alive_at > now() - interval '600 seconds'",
        )? as u64,
        import_unfinished: one(
            &mut conn,
            "SELECT count(*) FROM durus_meta WHERE name = 'migration_offset'",
        )? > 0,
    })
}

/// The oids and whole records with keys from `from` to `upto` (both
/// included; an oid's key is its bits as a bigint, so oids from 2^63 up
/// are negative), `BATCH` of them, in key
/// order, with their chunks checked to run from 0 without a gap.
fn records_in(
    conn: &mut Conn,
    from: i64,
    upto: i64,
    problems: &mut Vec<String>,
) -> Result<Vec<(Oid, Vec<u8>)>> {
    // A range of the primary key, not `oid IN (...)`: with the statistics
    // of a freshly imported table, PostgreSQL planned that as a merge join
    // scanning the key from its start, every batch.
    let rows = conn.query(
        "SELECT oid, chunk, data FROM durus_records WHERE oid >= $1 AND oid <= \
         (SELECT max(oid) FROM (SELECT DISTINCT oid FROM durus_records WHERE oid >= $1 \
         AND oid <= $3 ORDER BY oid LIMIT $2) AS batch) \
         ORDER BY oid, chunk",
        &[&from, &BATCH, &upto],
    )?;
    let mut records: Vec<(Oid, Vec<u8>)> = Vec::new();
    let mut expect = 0i32;
    for row in &rows {
        let oid = oid_of(row.get(0));
        let chunk: i32 = row.get(1);
        let data: &[u8] = row.get(2);
        match records.last_mut() {
            Some((o, bytes)) if *o == oid => {
                if chunk != expect {
                    problems.push(format!("oid {oid}: chunk {chunk} where {expect} was due"));
                }
                bytes.extend_from_slice(data);
            }
            _ => {
                if chunk != 0 {
                    problems.push(format!("oid {oid}: its first chunk is {chunk}, not 0"));
                }
                records.push((oid, data.to_vec()));
            }
        }
        expect = chunk + 1;
    }
    Ok(records)
}

/// Checks the database at `url`: every record well formed and naming its
/// oid, in chunks from 0; every reference stored; the object count, the oid
/// counter and the commit order agree with the records and the log. One
/// batch of records in memory at a time; nothing written.
pub fn check_database(url: &str, progress: &mut dyn FnMut(u64)) -> Result<DatabaseCheck> {
    let mut conn = open_existing(url)?;
    conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")?;
    let mut report = DatabaseCheck::default();
    // From the lowest key: oids from 2^63 up are negative bigints.
    let mut from = Some(i64::MIN);
    let mut max_oid: Option<Oid> = None;
    while let Some(at) = from {
        let records = records_in(&mut conn, at, i64::MAX, &mut report.problems)?;
        let Some((last, _)) = records.last() else {
            break;
        };
        from = key(*last).checked_add(1);
        max_oid = Some(*last);
        let mut wanted: HashSet<Oid> = HashSet::new();
        let mut refs_of: Vec<(Oid, Vec<Oid>)> = Vec::with_capacity(records.len());
        for (oid, bytes) in records {
            match Record::for_oid(oid, bytes) {
                Ok(r) => {
                    let refs: Vec<Oid> = r.refs().collect();
                    wanted.extend(refs.iter().copied());
                    refs_of.push((oid, refs));
                }
                Err(e) => report.problems.push(format!("oid {oid}: {e}")),
            }
            report.records += 1;
        }
        let keys: Vec<i64> = wanted.iter().map(|o| key(*o)).collect();
        let present: HashSet<Oid> = conn
            .query(
                "SELECT oid FROM durus_records WHERE chunk = 0 AND oid = ANY($1)",
                &[&keys],
            )?
            .iter()
            .map(|r| oid_of(r.get(0)))
            .collect();
        for (oid, refs) in refs_of {
            for r in refs {
                report.references += 1;
                if !present.contains(&r) {
                    report
                        .problems
                        .push(format!("oid {oid} references {r}, which is not stored"));
                }
            }
        }
        progress(report.records);
    }
    let (tid, objects): (i64, i64) = {
        let rows = conn.query("SELECT tid, objects FROM durus_order WHERE id = 1", &[])?;
        let row = rows
            .first()
            .ok_or_else(|| database("durus_order has no row"))?;
        (row.get(0), row.get(1))
    };
    if objects as u64 != report.records {
        report.problems.push(format!(
            "durus_order counts {objects} objects; {} records are stored",
            report.records
        ));
    }
    let log_end: Option<i64> = conn.query("SELECT max(tid) FROM durus_log", &[])?[0].get(0);
    if let Some(end) = log_end
        && end != tid
    {
        report.problems.push(format!(
            "the commit order is at tid {tid}, the commit log ends at {end}"
        ));
    }
    let next: i64 = conn.query("SELECT next FROM durus_oids WHERE id = 1", &[])?[0].get(0);
    if let Some(m) = max_oid
        && m != Oid::ROOT
        && (next as u64) <= m.0
    {
        report.problems.push(format!(
            "the oid counter is at {next}, not above the highest stored oid {m}: an oid \
             could be handed out twice"
        ));
    }
    conn.batch("ROLLBACK")?;
    Ok(report)
}

/// A full collection (Durus's pack) of the database at `url`, as one more
/// front end would run it: everything the root does not reach is removed,
/// and every front end's clients are told.
pub fn gc_database(url: &str) -> Result<FullReport> {
    gc_database_with(url, &mut |_| {})
}

/// [`gc_database`], telling `progress` as it goes how many objects it has
/// removed so far (often, also while it marks and removes nothing yet).
pub fn gc_database_with(url: &str, progress: &mut dyn FnMut(u64)) -> Result<FullReport> {
    drop(open_existing(url)?);
    let backend = PgBackend::open(url)?;
    let report = backend.full_collection(&mut || {
        progress(backend.removed_by_collections());
        false
    });
    backend.close()?;
    report
}

/// Writes every record of the database at `url`, from one snapshot, to a
/// new Durus FileStorage (`SHELF-1`) file at `dest`, in oid order.
pub fn export_database(
    url: &str,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> std::result::Result<ExportReport, MigrateError> {
    let db_err = |e: StorageError| MigrateError::Destination {
        path: super::redact_database_url(url),
        source: e,
    };
    crate::migrate::write_shelf(dest, |write| {
        let mut conn = open_existing(url).map_err(db_err)?;
        conn.batch("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
            .map_err(db_err)?;
        let total: i64 = conn
            .query("SELECT objects FROM durus_order WHERE id = 1", &[])
            .map_err(db_err)?
            .first()
            .map_or(0, |r| r.get(0));
        let mut records = 0u64;
        // In oid order: the keys from 0 up, then the negative ones (oids
        // from 2^63 up).
        let mut problems = Vec::new();
        for (start, upto) in [(0, i64::MAX), (i64::MIN, -1)] {
            let mut from = Some(start);
            while let Some(at) = from {
                let batch = records_in(&mut conn, at, upto, &mut problems).map_err(db_err)?;
                if let Some(p) = problems.first() {
                    return Err(db_err(StorageError::damaged(p.clone())));
                }
                let Some((last, _)) = batch.last() else {
                    break;
                };
                from = key(*last).checked_add(1).filter(|k| *k <= upto);
                for (oid, bytes) in &batch {
                    Record::check(bytes).map_err(|e| {
                        db_err(StorageError::damaged(format!(
                            "the record of oid {oid}: {e}"
                        )))
                    })?;
                    write(*oid, bytes)?;
                    records += 1;
                }
                progress(records, total as u64);
            }
        }
        Ok(())
    })
}
