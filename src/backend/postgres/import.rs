//! `durus-redb migrate SOURCE postgresql://...`: a Durus file, or a
//! durus-redb store, into a PostgreSQL database.
//!
//! The records are streamed in batches, each one database transaction that
//! also records where in the source the next batch starts: an interrupted
//! run, started again with the same source, goes on from there; memory
//! holds one batch. The database must be empty (or hold the unfinished
//! import of the same source). Front ends refuse to serve it until the
//! import is complete. The import ends by checking every reference, one
//! batch of records at a time.

use std::collections::HashSet;
use std::path::Path;
use std::time::Instant;

use super::{CHUNK, Conn, db_error, ensure_schema, key, oid_of};
use crate::error::StorageError;
use crate::filestorage::{ReadOptions, SourceEvent, open_source};
use crate::migrate::{MigrateError, MigrateOptions, MigrateProgress, MigrateReport};
use crate::record::{Oid, Record, refs_of};
use crate::storage::Storage;

/// The `durus_meta` row saying an import is underway: where in the source
/// the next batch starts.
pub(super) const MIGRATION: &str = "migration_offset";
/// The source's size when the import began (a resumed import refuses a
/// source that changed).
const MIGRATION_SIZE: &str = "migration_source_bytes";

/// Records per statement in the reference check.
const CHECK_BATCH: usize = 2000;

/// Migrates the Durus file, or durus-redb store, at `source` into the
/// PostgreSQL database at `url`. `progress` is called after every batch.
pub fn migrate_to_database(
    source: &Path,
    url: &str,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    let dest_err = |e: StorageError| MigrateError::Destination {
        path: super::redact_database_url(url),
        source: e,
    };
    let config = super::url::Database::parse(url).map_err(dest_err)?;
    let mut conn = Conn::connect(&config).map_err(dest_err)?;
    ensure_schema(&mut conn).map_err(dest_err)?;
    let meta = |conn: &mut Conn, name: &str| -> Result<Option<i64>, StorageError> {
        Ok(conn
            .client
            .query_opt("SELECT value FROM durus_meta WHERE name = $1", &[&name])
            .map_err(db_error)?
            .map(|r| r.get(0)))
    };
    let resume = meta(&mut conn, MIGRATION).map_err(dest_err)?;
    let source_bytes =
        std::fs::metadata(source)
            .map(|m| m.len())
            .map_err(|e| MigrateError::Source {
                path: source.display().to_string(),
                source: e.into(),
            })?;
    if resume.is_none() {
        let any = conn
            .query("SELECT 1 FROM durus_records LIMIT 1", &[])
            .map_err(dest_err)?;
        if !any.is_empty() {
            return Err(MigrateError::Refused(format!(
                "{} already holds records: migrate into an empty database",
                super::redact_database_url(url)
            )));
        }
    } else if meta(&mut conn, MIGRATION_SIZE).map_err(dest_err)? != Some(source_bytes as i64) {
        return Err(MigrateError::Refused(format!(
            "{} holds an unfinished import of another source (or {} changed since): \
             migrate into a new database",
            super::redact_database_url(url),
            source.display()
        )));
    }
    let mut report = MigrateReport {
        resumed_from: resume.filter(|o| *o > 0).map(|o| o as u64),
        ..MigrateReport::default()
    };
    let write =
        |conn: &mut Conn, batch: &mut Vec<(Oid, Vec<u8>)>, next: u64| -> Result<(), StorageError> {
            conn.batch("BEGIN")?;
            let result = (|| {
                write_batch(conn, batch)?;
                conn.execute(
                    "INSERT INTO durus_meta (name, value) VALUES ($1, $2), ($3, $4) \
                 ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                    &[
                        &MIGRATION,
                        &(next as i64),
                        &MIGRATION_SIZE,
                        &(source_bytes as i64),
                    ],
                )?;
                conn.batch("COMMIT")
            })();
            if result.is_err() {
                let _ = conn.batch("ROLLBACK");
            }
            batch.clear();
            result
        };
    let mut batch: Vec<(Oid, Vec<u8>)> = Vec::new();
    let mut batch_bytes = 0usize;
    if is_store(source) {
        // A durus-redb store: its records in oid order; a resumed import
        // starts again from the first (the records are the same).
        let mut store =
            crate::RedbStorage::open_read_only(source).map_err(MigrateError::SourceStorage)?;
        let records = store.iter_records().map_err(MigrateError::SourceStorage)?;
        for record in records {
            let record = record.map_err(MigrateError::SourceStorage)?;
            report.records_read += 1;
            report.bytes_read += record.len() as u64;
            batch_bytes += record.len();
            batch.push((record.oid(), record.into_bytes()));
            if batch.len() >= options.batch_records || batch_bytes >= options.batch_bytes {
                write(&mut conn, &mut batch, 0).map_err(dest_err)?;
                batch_bytes = 0;
                progress(MigrateProgress::Import {
                    position: report.records_read,
                    total: 0,
                    records: report.records_read,
                });
            }
        }
        write(&mut conn, &mut batch, 0).map_err(dest_err)?;
    } else {
        let src_err = |e| MigrateError::Source {
            path: source.display().to_string(),
            source: e,
        };
        let mut src = open_source(
            source,
            ReadOptions::default().with_torn_tail(options.accept_torn_tail),
        )
        .map_err(src_err)?;
        if let Some(at) = report.resumed_from {
            src.resume_from(at).map_err(src_err)?;
        }
        while let Some(event) = src.next_event().map_err(src_err)? {
            match event {
                SourceEvent::Item(item) => {
                    report.records_read += 1;
                    report.bytes_read += item.record.len() as u64;
                    batch_bytes += item.record.len();
                    batch.push((item.oid, item.record));
                }
                SourceEvent::TransactionEnd { offset } | SourceEvent::SafePoint { offset } => {
                    if batch.len() >= options.batch_records || batch_bytes >= options.batch_bytes {
                        write(&mut conn, &mut batch, offset).map_err(dest_err)?;
                        batch_bytes = 0;
                        progress(MigrateProgress::Import {
                            position: offset.min(source_bytes),
                            total: source_bytes,
                            records: report.records_read,
                        });
                    }
                }
            }
        }
        write(&mut conn, &mut batch, source_bytes).map_err(dest_err)?;
        progress(MigrateProgress::Import {
            position: source_bytes,
            total: source_bytes,
            records: report.records_read,
        });
    }
    check_references(&mut conn, options, &mut report, progress).map_err(|e| match e {
        Checked::Store(e) => dest_err(e),
        Checked::Dangling => MigrateError::Dangling {
            listed: report.dangling.clone(),
            count: report.dangling_count,
        },
    })?;
    finish(&mut conn, &mut report).map_err(dest_err)?;
    report.elapsed = started.elapsed();
    Ok(report)
}

/// True if `path` is a durus-redb store (a redb file), not a Durus file.
fn is_store(path: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 9];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .is_ok_and(|()| &head == b"redb\x1A\x0A\xA9\x0D\x0A")
}

/// Upserts `batch` (later records of an oid win) with tid 0: imported
/// records come before every commit.
fn write_batch(conn: &mut Conn, batch: &[(Oid, Vec<u8>)]) -> Result<(), StorageError> {
    let mut last: std::collections::HashMap<Oid, &[u8]> = std::collections::HashMap::new();
    for (oid, bytes) in batch {
        Record::check(bytes).map_err(|e| {
            StorageError::Invalid(crate::InvalidInput::Record {
                oid: *oid,
                source: e,
            })
        })?;
        last.insert(*oid, bytes);
    }
    let mut oids = Vec::new();
    let mut chunks = Vec::new();
    let mut data: Vec<&[u8]> = Vec::new();
    let mut counts_oid = Vec::new();
    for (oid, bytes) in &last {
        for (n, piece) in bytes.chunks(CHUNK).enumerate() {
            oids.push(key(*oid));
            chunks.push(n as i32);
            data.push(piece);
        }
        counts_oid.push(key(*oid));
    }
    // Every chunk of a record is written again: those past the first go
    // first (a later version may have fewer).
    conn.execute(
        "DELETE FROM durus_records WHERE oid = ANY($1) AND chunk > 0",
        &[&counts_oid],
    )?;
    conn.execute(
        "INSERT INTO durus_records (oid, chunk, tid, data) \
         SELECT o, c, 0, d FROM unnest($1::bigint[], $2::int[], $3::bytea[]) AS t(o, c, d) \
         ON CONFLICT (oid, chunk) DO UPDATE SET tid = excluded.tid, data = excluded.data",
        &[&oids, &chunks, &data],
    )?;
    Ok(())
}

enum Checked {
    Store(StorageError),
    Dangling,
}

impl From<StorageError> for Checked {
    fn from(e: StorageError) -> Checked {
        Checked::Store(e)
    }
}

/// Checks every reference of every record, a batch of records at a time
/// (memory holds one batch and its references), and counts the objects.
fn check_references(
    conn: &mut Conn,
    options: &MigrateOptions,
    report: &mut MigrateReport,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<(), Checked> {
    let total: i64 =
        conn.query("SELECT count(*) FROM durus_records WHERE chunk = 0", &[])?[0].get(0);
    // From the lowest key: oids from 2^63 up are negative bigints.
    let mut from = Some(i64::MIN);
    let mut scanned = 0u64;
    while let Some(at) = from {
        // A range of the primary key, not `oid IN (...)`: with the
        // statistics of the table just filled, PostgreSQL planned that as a
        // merge join scanning the key from its start, every batch (2,000,000
        // records took three minutes).
        let rows = conn.query(
            "SELECT oid, chunk, data FROM durus_records WHERE oid >= $1 AND oid <= \
             (SELECT max(oid) FROM (SELECT oid FROM durus_records WHERE chunk = 0 \
             AND oid >= $1 ORDER BY oid LIMIT $2) AS batch) \
             ORDER BY oid, chunk",
            &[&at, &(CHECK_BATCH as i64)],
        )?;
        if rows.is_empty() {
            break;
        }
        let mut records: Vec<(Oid, Vec<u8>)> = Vec::new();
        for row in &rows {
            let oid = oid_of(row.get(0));
            let chunk: i32 = row.get(1);
            let data: &[u8] = row.get(2);
            match records.last_mut() {
                Some((o, bytes)) if *o == oid && chunk > 0 => bytes.extend_from_slice(data),
                // A chunk of no record (no chunk 0): not a record.
                _ if chunk > 0 => {}
                _ => records.push((oid, data.to_vec())),
            }
        }
        let mut wanted: HashSet<Oid> = HashSet::new();
        for (oid, bytes) in &records {
            let refs = refs_of(bytes).map_err(|e| {
                StorageError::damaged(format!("the record of oid {oid} does not decode: {e}"))
            })?;
            wanted.extend(refs);
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
        for (oid, bytes) in &records {
            for r in refs_of(bytes).expect("decoded above") {
                if !present.contains(&r) {
                    report.dangling_count += 1;
                    if report.dangling.len() < 100 {
                        report.dangling.push((*oid, r));
                    }
                }
            }
        }
        scanned += records.len() as u64;
        from = key(records.last().expect("not empty").0).checked_add(1);
        progress(MigrateProgress::Verify {
            scanned,
            total: total as u64,
        });
    }
    report.objects = total as u64;
    if report.dangling_count > 0 && !options.allow_dangling {
        return Err(Checked::Dangling);
    }
    Ok(())
}

/// Ends the import: the oid counter above every oid, the object count, and
/// the import's rows gone (front ends serve the database from then on).
fn finish(conn: &mut Conn, report: &mut MigrateReport) -> Result<(), StorageError> {
    let max: Option<i64> = conn.query("SELECT max(oid) FROM durus_records", &[])?[0].get(0);
    report.max_oid = max.map(oid_of);
    let next = max.map_or(0, |m| m + 1);
    conn.batch("BEGIN")?;
    let result = (|| {
        conn.execute(
            "UPDATE durus_oids SET next = GREATEST(next, $1) WHERE id = 1",
            &[&next],
        )?;
        conn.execute(
            "UPDATE durus_order SET objects = $1 WHERE id = 1",
            &[&(report.objects as i64)],
        )?;
        conn.execute(
            "DELETE FROM durus_meta WHERE name IN ($1, $2)",
            &[&MIGRATION, &MIGRATION_SIZE],
        )?;
        conn.batch("COMMIT")
    })();
    if result.is_err() {
        let _ = conn.batch("ROLLBACK");
        return result;
    }
    // The table's statistics still describe it empty: the planner's
    // choices for the front ends' statements follow them until the
    // database's own analysis comes round. Not needed for correctness: a
    // database that refuses it is told in the log only.
    if let Err(e) = conn.batch("ANALYZE durus_records") {
        tracing::warn!(
            "ANALYZE after the import was refused ({e}); the database analyzes the table in its own time"
        );
    }
    Ok(())
}
