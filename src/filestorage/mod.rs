//! Streaming readers for Durus's on-disk storage files, and a SHELF-1 writer.
//!
//! Three formats are read (each submodule writes out its byte layout):
//!
//! - FileStorage, `SHELF-1\n` ([`FileFormat::Shelf`]), the default since Durus 3.8;
//! - FileStorage2, `DFS20\0` ([`FileFormat::FileStorage2`]), Durus 3.7;
//! - SqliteStorage ([`FileFormat::Sqlite`]).
//!
//! A reader is a [`RecordSource`]: it walks the file once, in file order, and
//! hands out one [`SourceEvent`] at a time: an item (one oid and its record),
//! or a boundary at which a migration may commit and later resume. It never
//! indexes the file: a later record for an oid simply comes later, and the
//! consumer overwrites. Memory stays bounded by the largest single record,
//! whatever the size of the file or of one transaction.
//!
//! # Resume offsets
//!
//! Every boundary event carries an `offset`; [`RecordSource::resume_from`]
//! with that offset, on a freshly opened source of the same file, yields
//! exactly the events that followed the boundary. Two kinds exist:
//!
//! - [`SourceEvent::TransactionEnd`]: a whole transaction of the source has
//!   been handed out.
//! - [`SourceEvent::SafePoint`]: between two items of a *base* transaction:
//!   the initial transaction of a SHELF-1 file, or a transaction before the
//!   index record of a DFS20 file. These are what packing writes, one
//!   transaction holding every live record, so they can be as large as the
//!   store. Because a later record for an oid always replaces an earlier one,
//!   importing a prefix of such a transaction, committing, and resuming after
//!   it gives the same final state; the destination is merely not
//!   transaction-consistent until the base transaction is complete (a
//!   migration should verify or hold off readers until the end). Records in a
//!   base transaction may also reference oids stored later in it.
//!
//! For the byte formats, offsets, [`RecordSource::position`] and
//! [`RecordSource::total_len`] are byte offsets in the file. For SQLite,
//! which keeps no history, they are oids: the position is the smallest id not
//! yet read, the total is the largest id plus one, and a boundary follows each
//! batch of rows.
//!
//! Offset `0` always means "from the beginning". After a resume,
//! [`RecordSource::position`] is the offset resumed from. Any offset the reader did not
//! report may be refused with [`FileError::InvalidResume`] or, if it falls
//! between items, read as garbage and reported as [`FileError::Corrupt`].
//!
//! # Torn tails
//!
//! A length field that runs past the end of the file can only be told from a
//! torn tail by where it is; like Durus, the readers take it as a torn tail.
//!
//! A file whose last transaction is cut short (an interrupted write) gives
//! [`FileError::Truncated`] naming the offset where that transaction starts,
//! before any item of it is handed out. With
//! [`ReadOptions::accept_torn_tail`] the source instead ends cleanly after
//! the last complete transaction, and [`RecordSource::torn_tail`] tells where
//! the ignored tail began.

mod dfs20;
mod shelf;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::fs::File;
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::Path;

use crate::record::{Oid, RecordError};

pub use shelf::ShelfWriter;

/// The storage file formats of Durus that can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FileFormat {
    /// FileStorage (Durus 3.8 and later): starts with `SHELF-1\n`.
    Shelf,
    /// FileStorage2 (Durus 3.7): starts with `DFS20\0`.
    FileStorage2,
    /// SqliteStorage: an SQLite 3 database file.
    Sqlite,
}

/// Why a Durus storage file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FileError {
    /// Reading or writing the file failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
    /// The file starts with none of the known magic strings.
    #[error("{}", unknown_format(.first_bytes))]
    UnknownFormat {
        /// Up to the first 16 bytes of the file.
        first_bytes: Vec<u8>,
    },
    /// The file ends inside a transaction (or a header or index): it was cut
    /// short, typically by an interrupted write.
    #[error(
        "file ends at byte {file_len} inside the transaction that starts at byte {offset} \
         (a torn tail; open with accept_torn_tail to stop before it)"
    )]
    Truncated {
        /// Where the incomplete transaction (or structure) starts.
        offset: u64,
        /// The length of the file.
        file_len: u64,
    },
    /// The file holds something no Durus storage writes.
    #[error("corrupt storage file at byte {offset}: {reason}")]
    Corrupt {
        /// Where the bad item or structure starts (for SQLite: the row id).
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// [`RecordSource::resume_from`] got an offset that is no boundary.
    #[error("cannot resume at offset {offset}: {reason}")]
    InvalidResume {
        /// The offset asked for.
        offset: u64,
        /// Why it was refused.
        reason: String,
    },
    /// [`ShelfWriter::write`] got oids out of order; they must strictly ascend.
    #[error("oid {oid} written after oid {previous}: oids must be written in ascending order")]
    OidOrder {
        /// The oid written before.
        previous: Oid,
        /// The offending oid.
        oid: Oid,
    },
    /// [`ShelfWriter::write`] got bytes that are not a record for the oid.
    #[error("invalid record for oid {oid}: {source}")]
    InvalidRecord {
        /// The oid it was to be written under.
        oid: Oid,
        /// What is wrong with it.
        source: RecordError,
    },
    /// The SQLite library failed.
    #[error("SQLite error: {detail}")]
    Sqlite {
        /// SQLite's message.
        detail: String,
    },
    /// The file is of a format this build cannot read (SQLite sources need
    /// the `sqlite` feature).
    #[error(
        "{format:?} files cannot be read by this build: it was built without the `{feature}` feature"
    )]
    Unsupported {
        /// The format.
        format: FileFormat,
        /// The Cargo feature that reads it.
        feature: &'static str,
    },
}

fn show_bytes(bytes: &[u8]) -> String {
    if bytes.is_empty() {
        return "nothing (the file is empty)".to_string();
    }
    format!("{:?} ({})", String::from_utf8_lossy(bytes), hex(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// How to read a source file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadOptions {
    /// If the file's last transaction is cut short, end cleanly after the
    /// last complete transaction instead of failing with
    /// [`FileError::Truncated`].
    pub accept_torn_tail: bool,
}

impl ReadOptions {
    /// These options with [`accept_torn_tail`](Self::accept_torn_tail) set.
    pub fn with_torn_tail(mut self, accept: bool) -> Self {
        self.accept_torn_tail = accept;
        self
    }
}

/// One record read from a source file.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SourceItem {
    /// The oid the record is stored under.
    pub oid: Oid,
    /// The whole record (`oid | u32 len | data | refs`), checked with
    /// [`Record::check`](crate::Record::check) and naming `oid`.
    pub record: Vec<u8>,
}

/// What a [`RecordSource`] hands out next.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceEvent {
    /// A record. A later item for the same oid replaces this one.
    Item(SourceItem),
    /// A transaction of the source is complete; `offset` is where the next
    /// one starts and a valid argument to [`RecordSource::resume_from`].
    TransactionEnd {
        /// The resume offset (see the module docs for its unit).
        offset: u64,
    },
    /// Between two items of a base transaction (see the module docs): a
    /// valid argument to [`RecordSource::resume_from`], but the transaction
    /// is not complete.
    SafePoint {
        /// The resume offset.
        offset: u64,
    },
}

/// A streaming reader of a Durus storage file. See the module documentation
/// for the meaning of offsets and boundaries.
pub trait RecordSource: Send {
    /// The format being read.
    fn format(&self) -> FileFormat;

    /// The next event, or `None` at the end of the source. After an error the
    /// source should not be used further.
    fn next_event(&mut self) -> Result<Option<SourceEvent>, FileError>;

    /// How far the reader has come, in the unit of [`total_len`](Self::total_len).
    fn position(&self) -> u64;

    /// The size of the source: its length in bytes when opened (for SQLite,
    /// the largest id plus one). Data appended after opening is not read.
    fn total_len(&self) -> u64;

    /// Restarts reading at `offset`, which must be `0` or an offset reported
    /// by a [`SourceEvent::TransactionEnd`] or [`SourceEvent::SafePoint`] of
    /// this file.
    fn resume_from(&mut self, offset: u64) -> Result<(), FileError>;

    /// Where an ignored torn tail starts, once the reader has met one with
    /// [`ReadOptions::accept_torn_tail`] set; `None` otherwise.
    fn torn_tail(&self) -> Option<u64>;
}

const SQLITE_MAGIC: &[u8] = b"SQLite format 3\0";
/// How a redb database file begins (a durus-redb store is one).
const REDB_MAGIC: &[u8] = b"redb\x1a\x0a\xa9\x0d\x0a";

fn unknown_format(first_bytes: &[u8]) -> String {
    if first_bytes.starts_with(REDB_MAGIC) {
        "this is already a durus-redb store (a redb database), not a Durus storage file: \
         serve it as it is, or copy it with `durus-redb backup`"
            .to_string()
    } else {
        format!(
            "not a Durus storage file: it starts with {}",
            show_bytes(first_bytes)
        )
    }
}

/// Tells the format of a Durus storage file by its first bytes.
pub fn detect_format(path: impl AsRef<Path>) -> Result<FileFormat, FileError> {
    let mut head = Vec::with_capacity(16);
    File::open(path.as_ref())?.take(16).read_to_end(&mut head)?;
    if head.starts_with(shelf::MAGIC) {
        Ok(FileFormat::Shelf)
    } else if head.starts_with(dfs20::MAGIC) {
        Ok(FileFormat::FileStorage2)
    } else if head.starts_with(SQLITE_MAGIC) {
        Ok(FileFormat::Sqlite)
    } else {
        Err(FileError::UnknownFormat { first_bytes: head })
    }
}

/// Opens a Durus storage file of any readable format as a [`RecordSource`],
/// positioned at its beginning.
pub fn open_source(
    path: impl AsRef<Path>,
    options: ReadOptions,
) -> Result<Box<dyn RecordSource>, FileError> {
    let path = path.as_ref();
    Ok(match detect_format(path)? {
        FileFormat::Shelf => Box::new(shelf::ShelfSource::open(path, options)?),
        FileFormat::FileStorage2 => Box::new(dfs20::Dfs20Source::open(path, options)?),
        #[cfg(feature = "sqlite")]
        FileFormat::Sqlite => Box::new(sqlite::SqliteSource::open(path)?),
        #[cfg(not(feature = "sqlite"))]
        FileFormat::Sqlite => {
            return Err(FileError::Unsupported {
                format: FileFormat::Sqlite,
                feature: "sqlite",
            });
        }
    })
}

/// A reader's place inside one transaction of a SHELF-1 or DFS20 file: both
/// formats hand out a transaction's items, a safe point after each item of a
/// base transaction, and the transaction's end the same way.
#[derive(Debug, Clone, Copy)]
struct TxnCursor {
    /// Where the items stop (before DFS20's terminator).
    items_end: u64,
    /// Where the transaction ends: the offset of its `TransactionEnd`.
    end: u64,
    /// A base transaction, whose items are separated by safe points.
    base: bool,
    /// An item was just handed out: a safe point is due (base only).
    after_item: bool,
}

impl TxnCursor {
    fn new(items_end: u64, end: u64, base: bool) -> TxnCursor {
        TxnCursor {
            items_end,
            end,
            base,
            after_item: false,
        }
    }

    /// The next event inside the transaction, reading an item with
    /// `read_item`; `true` with the event once the transaction has ended
    /// (the reader is then at its end).
    fn step(
        &mut self,
        r: &mut PosReader,
        read_item: impl FnOnce(&mut PosReader, u64) -> Result<SourceItem, FileError>,
    ) -> Result<(SourceEvent, bool), FileError> {
        if r.pos == self.items_end {
            r.seek(self.end)?;
            return Ok((SourceEvent::TransactionEnd { offset: self.end }, true));
        }
        if self.after_item {
            self.after_item = false;
            return Ok((SourceEvent::SafePoint { offset: r.pos }, false));
        }
        let item = read_item(r, self.items_end)?;
        self.after_item = self.base;
        Ok((SourceEvent::Item(item), false))
    }
}

/// What both readers do when the file ends inside a structure: fail, or,
/// with [`ReadOptions::accept_torn_tail`], remember where and end cleanly.
#[derive(Debug, Clone, Copy, Default)]
struct TornTail {
    accept: bool,
    at: Option<u64>,
}

impl TornTail {
    fn new(options: ReadOptions) -> TornTail {
        TornTail {
            accept: options.accept_torn_tail,
            at: None,
        }
    }

    /// The file (of `file_len` bytes) ends inside the structure at `offset`.
    fn meet(&mut self, offset: u64, file_len: u64) -> Result<Option<SourceEvent>, FileError> {
        if self.accept {
            self.at = Some(offset);
            Ok(None)
        } else {
            Err(FileError::Truncated { offset, file_len })
        }
    }
}

/// A buffered reader of a file that knows its position and the file's
/// length at opening, and reads no further than that length.
struct PosReader {
    inner: BufReader<File>,
    pos: u64,
    len: u64,
}

impl PosReader {
    fn open(path: &Path) -> Result<PosReader, FileError> {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        Ok(PosReader {
            inner: BufReader::with_capacity(64 * 1024, file),
            pos: 0,
            len,
        })
    }

    /// Bytes left before the end of the file.
    fn remaining(&self) -> u64 {
        self.len.saturating_sub(self.pos)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<(), FileError> {
        self.inner.read_exact(buf)?;
        self.pos += buf.len() as u64;
        Ok(())
    }

    fn read_u64(&mut self) -> Result<u64, FileError> {
        let mut b = [0; 8];
        self.read_exact(&mut b)?;
        Ok(u64::from_be_bytes(b))
    }

    fn read_u32(&mut self) -> Result<u32, FileError> {
        let mut b = [0; 4];
        self.read_exact(&mut b)?;
        Ok(u32::from_be_bytes(b))
    }

    /// Reads `n` bytes; the caller has checked that they are in the file.
    fn read_vec(&mut self, n: u64) -> Result<Vec<u8>, FileError> {
        let n = usize::try_from(n).map_err(|_| io::Error::other("item too large"))?;
        let mut v = vec![0; n];
        self.read_exact(&mut v)?;
        Ok(v)
    }

    fn seek(&mut self, pos: u64) -> Result<(), FileError> {
        let delta = pos as i128 - self.pos as i128;
        match i64::try_from(delta) {
            Ok(d) => self.inner.seek_relative(d)?,
            Err(_) => {
                self.inner.seek(SeekFrom::Start(pos))?;
            }
        }
        self.pos = pos;
        Ok(())
    }
}

/// Checks record bytes read for `oid` at `offset`, as a [`FileError::Corrupt`].
fn check_record(offset: u64, oid: Oid, record: &[u8]) -> Result<(), FileError> {
    crate::record::Record::check(record).map_err(|e| FileError::Corrupt {
        offset,
        reason: format!("malformed record for oid {oid}: {e}"),
    })?;
    match Oid::from_slice(record) {
        Some(found) if found == oid => Ok(()),
        found => Err(FileError::Corrupt {
            offset,
            reason: format!(
                "item for oid {oid} holds a record naming oid {}",
                found.map_or_else(|| "?".to_string(), |o| o.to_string())
            ),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats_and_names_unknown_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let cases: [(&[u8], Option<FileFormat>); 5] = [
            (b"SHELF-1\n\0\0", Some(FileFormat::Shelf)),
            (b"DFS20\0xx", Some(FileFormat::FileStorage2)),
            (b"SQLite format 3\0more", Some(FileFormat::Sqlite)),
            (b"SHELF-2\nxxxxxxxxxxxxxxxxxxxxxxxx", None),
            (b"", None),
        ];
        for (i, (bytes, want)) in cases.iter().enumerate() {
            let path = dir.path().join(format!("f{i}"));
            std::fs::write(&path, bytes).unwrap();
            match (detect_format(&path), want) {
                (Ok(got), Some(want)) => assert_eq!(got, *want),
                (Err(FileError::UnknownFormat { first_bytes }), None) => {
                    assert_eq!(first_bytes, bytes[..bytes.len().min(16)].to_vec());
                    let msg = FileError::UnknownFormat { first_bytes }.to_string();
                    assert!(msg.contains("not a Durus storage file"), "{msg}");
                }
                (got, want) => panic!("case {i}: got {got:?}, want {want:?}"),
            }
        }
    }
}
