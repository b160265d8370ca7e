//! SqliteStorage's format: a streaming reader.
//!
//! Durus's SqliteStorage keeps one table,
//! `objects(id integer primary key, data blob, refs blob)`, with one row per
//! live oid and no history. A record is rebuilt as
//! `id as 8-byte big-endian oid | u32 len(data) | data | refs`.
//!
//! Rows are read in id order, in batches of [`BATCH`] inside one read
//! transaction (a consistent snapshot for one run). A
//! [`SourceEvent::TransactionEnd`] follows each batch; its offset, like
//! [`RecordSource::position`], is the smallest id not yet read, and any id is
//! a valid resume point.

use std::collections::VecDeque;
use std::path::Path;

use rusqlite::types::ValueRef;
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::{FileError, FileFormat, RecordSource, SourceEvent, SourceItem, check_record};
use crate::record::Oid;

/// Rows fetched per query, and per reported transaction.
const BATCH: i64 = 1000;

/// A streaming reader of a Durus SQLite store.
pub(super) struct SqliteSource {
    conn: Connection,
    /// The smallest id not yet handed out.
    next_id: u64,
    /// The smallest id not yet fetched.
    fetched_to: u64,
    total: u64,
    batch: VecDeque<SourceItem>,
    batch_open: bool,
}

impl SqliteSource {
    pub(super) fn open(path: &Path) -> Result<SqliteSource, FileError> {
        let conn = Connection::open_with_flags(
            path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.execute_batch("BEGIN")?;
        let table: Option<String> = conn
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = 'objects'",
                [],
                |row| row.get(0),
            )
            .optional()?;
        if table.is_none() {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: "an SQLite file without an `objects` table: not a Durus SqliteStorage"
                    .into(),
            });
        }
        let (min, max): (Option<i64>, Option<i64>) =
            conn.query_row("SELECT min(id), max(id) FROM objects", [], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
        if let Some(min) = min.filter(|&m| m < 0) {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: format!("negative object id {min}"),
            });
        }
        let total = max.map_or(0, |m| m as u64 + 1);
        Ok(SqliteSource {
            conn,
            next_id: 0,
            fetched_to: 0,
            total,
            batch: VecDeque::new(),
            batch_open: false,
        })
    }

    /// Fetches the next batch of rows into `self.batch`.
    fn fetch(&mut self) -> Result<(), FileError> {
        let Ok(from) = i64::try_from(self.fetched_to) else {
            return Ok(());
        };
        let mut stmt = self.conn.prepare_cached(
            "SELECT id, data, refs FROM objects WHERE id >= ?1 ORDER BY id LIMIT ?2",
        )?;
        let mut rows = stmt.query((from, BATCH))?;
        while let Some(row) = rows.next()? {
            let id: i64 = row.get(0)?;
            let id = id as u64; // ids are >= `from` >= 0
            let blob = |i: usize, what: &str| -> Result<&[u8], FileError> {
                match row.get_ref(i)? {
                    ValueRef::Blob(b) | ValueRef::Text(b) => Ok(b),
                    other => Err(FileError::Corrupt {
                        offset: id,
                        reason: format!(
                            "row {id} has {what} of type {:?}, not a blob",
                            other.data_type()
                        ),
                    }),
                }
            };
            let data = blob(1, "data")?;
            let refs = blob(2, "refs")?;
            let oid = Oid(id);
            let len = u32::try_from(data.len()).map_err(|_| FileError::Corrupt {
                offset: id,
                reason: format!(
                    "row {id} has {} bytes of data, more than a record holds",
                    data.len()
                ),
            })?;
            let mut record = Vec::with_capacity(12 + data.len() + refs.len());
            record.extend_from_slice(&oid.to_bytes());
            record.extend_from_slice(&len.to_be_bytes());
            record.extend_from_slice(data);
            record.extend_from_slice(refs);
            check_record(id, oid, &record)?;
            self.batch.push_back(SourceItem { oid, record });
            self.fetched_to = id + 1;
        }
        Ok(())
    }
}

impl RecordSource for SqliteSource {
    fn format(&self) -> FileFormat {
        FileFormat::Sqlite
    }

    fn next_event(&mut self) -> Result<Option<SourceEvent>, FileError> {
        if self.batch.is_empty() {
            if self.batch_open {
                self.batch_open = false;
                return Ok(Some(SourceEvent::TransactionEnd {
                    offset: self.next_id,
                }));
            }
            self.fetch()?;
        }
        match self.batch.pop_front() {
            Some(item) => {
                self.batch_open = true;
                self.next_id = item.oid.0 + 1;
                Ok(Some(SourceEvent::Item(item)))
            }
            None => {
                self.next_id = self.next_id.max(self.total);
                Ok(None)
            }
        }
    }

    fn position(&self) -> u64 {
        self.next_id
    }

    fn total_len(&self) -> u64 {
        self.total
    }

    fn resume_from(&mut self, offset: u64) -> Result<(), FileError> {
        self.batch.clear();
        self.batch_open = false;
        self.next_id = offset;
        self.fetched_to = offset;
        Ok(())
    }

    fn torn_tail(&self) -> Option<u64> {
        None
    }
}

impl From<rusqlite::Error> for FileError {
    fn from(e: rusqlite::Error) -> FileError {
        FileError::Sqlite {
            detail: e.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filestorage::{ReadOptions, open_source};

    #[test]
    fn reads_rows_in_batches_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.durus");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE objects (id integer primary key, data blob, refs blob); BEGIN",
        )
        .unwrap();
        for id in (0..2500i64).step_by(2) {
            conn.execute(
                "INSERT INTO objects VALUES (?1, ?2, ?3)",
                (id, vec![id as u8; 3], 7u64.to_be_bytes().to_vec()),
            )
            .unwrap();
        }
        conn.execute_batch("COMMIT").unwrap();
        drop(conn);
        let mut s = open_source(&path, ReadOptions::default()).unwrap();
        assert_eq!(s.format(), FileFormat::Sqlite);
        assert_eq!(s.total_len(), 2499);
        let mut items = 0;
        let mut ends = Vec::new();
        while let Some(e) = s.next_event().unwrap() {
            match e {
                SourceEvent::Item(i) => {
                    assert_eq!(
                        i.record[..12],
                        [&i.oid.to_bytes()[..], &[0, 0, 0, 3]].concat()
                    );
                    items += 1;
                }
                SourceEvent::TransactionEnd { offset } => ends.push(offset),
                SourceEvent::SafePoint { .. } => panic!("no safe points in sqlite"),
            }
        }
        assert_eq!(items, 1250);
        assert_eq!(ends, vec![1999, 2499]);
        s.resume_from(1999).unwrap();
        let mut rest = 0;
        while let Some(e) = s.next_event().unwrap() {
            rest += matches!(e, SourceEvent::Item(_)) as usize;
        }
        assert_eq!(rest, 250);
    }

    #[test]
    fn bad_rows_are_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.durus");
        let conn = Connection::open(&path).unwrap();
        conn.execute_batch(
            "CREATE TABLE objects (id integer primary key, data blob, refs blob);
             INSERT INTO objects VALUES (5, x'00', x'0102');",
        )
        .unwrap();
        drop(conn);
        let mut s = open_source(&path, ReadOptions::default()).unwrap();
        assert!(matches!(
            s.next_event(),
            Err(FileError::Corrupt { offset: 5, .. })
        ));
        let other = dir.path().join("o.sqlite");
        Connection::open(&other)
            .unwrap()
            .execute_batch("CREATE TABLE t (x)")
            .unwrap();
        assert!(matches!(
            open_source(&other, ReadOptions::default()),
            Err(FileError::Corrupt { offset: 0, .. })
        ));
    }
}
