//! FileStorage2's DFS20 format (Durus 3.7): a streaming reader.
//!
//! Layout:
//!
//! ```text
//! "DFS20\0" | index_offset (int8)
//! transactions                        before the index: what a pack wrote
//! index_len (int8) | index_len bytes  at index_offset: a zlib-compressed
//!                                     pickle of {oid: offset}, skipped here
//! transactions                        appended by later commits
//! transaction = items, then int4 0
//! item = len (int4, not 0) | record (len bytes, beginning with its oid)
//! ```
//!
//! A new file gets its (empty) index at once, at offset 14; a packed file has
//! one transaction of every live record before its index. Transactions before
//! the index are *base* transactions: safe points separate their items.
//!
//! A transaction has no length up front, so before handing out its first item
//! the reader scans ahead over the item lengths (seeking, not reading the
//! records) to its terminating `int4 0`: a torn tail is found before any of
//! its items is handed out.

use std::path::Path;

use super::{
    FileError, FileFormat, PosReader, ReadOptions, RecordSource, SourceEvent, SourceItem, TornTail,
    TxnCursor, check_record,
};
use crate::record::Oid;

/// The magic string a DFS20 file starts with.
pub(super) const MAGIC: &[u8] = b"DFS20\0";
/// Where the first transaction (or the index of a new file) starts.
const HEADER_LEN: u64 = 6 + 8;

#[derive(Debug, Clone, Copy)]
enum State {
    /// At a transaction start, the index, or the end of the file. (After a
    /// resume, possibly between two items of a base transaction.)
    TxnStart,
    /// Inside a transaction; its items end 4 bytes before its end.
    InTxn(TxnCursor),
    Done,
}

/// A streaming reader of a DFS20 file.
pub(super) struct Dfs20Source {
    r: PosReader,
    state: State,
    index_offset: u64,
    tail: TornTail,
}

impl Dfs20Source {
    pub(super) fn open(path: &Path, options: ReadOptions) -> Result<Dfs20Source, FileError> {
        let mut r = PosReader::open(path)?;
        if r.remaining() < HEADER_LEN {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: format!("file of {} bytes is shorter than the DFS20 header", r.len),
            });
        }
        let mut magic = [0; 6];
        r.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: format!("bad magic {magic:02x?}, expected \"DFS20\\0\""),
            });
        }
        let index_offset = r.read_u64()?;
        if index_offset < HEADER_LEN || index_offset > r.len {
            return Err(FileError::Corrupt {
                offset: 6,
                reason: format!(
                    "index offset {index_offset} is outside the file's {HEADER_LEN}..={} bytes",
                    r.len
                ),
            });
        }
        Ok(Dfs20Source {
            r,
            state: State::TxnStart,
            index_offset,
            tail: TornTail::new(options),
        })
    }

    fn torn(&mut self, offset: u64) -> Result<Option<SourceEvent>, FileError> {
        self.state = State::Done;
        self.tail.meet(offset, self.r.len)
    }

    /// The end of the index record at the index offset; `None` if torn.
    fn index_end(&mut self) -> Result<Option<u64>, FileError> {
        self.r.seek(self.index_offset)?;
        if self.r.remaining() < 8 {
            return Ok(None);
        }
        let len = self.r.read_u64()?;
        Ok((len <= self.r.remaining()).then(|| self.r.pos + len))
    }

    /// Scans from the current position over item lengths to the end of the
    /// transaction's terminator, then seeks back. `None` if the file ends
    /// first; corrupt if a base transaction runs into the index.
    fn scan_transaction(&mut self) -> Result<Option<u64>, FileError> {
        let start = self.r.pos;
        let base = start < self.index_offset;
        let limit = if base { self.index_offset } else { self.r.len };
        let mut found = None;
        loop {
            let p = self.r.pos;
            if limit - p < 4 {
                break;
            }
            let n = u64::from(self.r.read_u32()?);
            if n == 0 {
                found = Some(self.r.pos);
                break;
            }
            if n > limit - self.r.pos {
                break;
            }
            self.r.seek(self.r.pos + n)?;
        }
        self.r.seek(start)?;
        if found.is_none() && base {
            return Err(FileError::Corrupt {
                offset: start,
                reason: format!(
                    "transaction runs into the index record at {}",
                    self.index_offset
                ),
            });
        }
        Ok(found)
    }
}

/// Reads one item (its length is known to lie inside the transaction).
fn read_item(r: &mut PosReader, _items_end: u64) -> Result<SourceItem, FileError> {
    let start = r.pos;
    let n = u64::from(r.read_u32()?);
    let record = r.read_vec(n)?;
    let Some(oid) = Oid::from_slice(&record) else {
        return Err(FileError::Corrupt {
            offset: start,
            reason: format!("record of {n} bytes is shorter than an oid"),
        });
    };
    check_record(start, oid, &record)?;
    Ok(SourceItem { oid, record })
}

impl RecordSource for Dfs20Source {
    fn format(&self) -> FileFormat {
        FileFormat::FileStorage2
    }

    fn next_event(&mut self) -> Result<Option<SourceEvent>, FileError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::TxnStart => {
                    let start = self.r.pos;
                    if start == self.index_offset {
                        match self.index_end()? {
                            Some(end) => self.r.seek(end)?,
                            None => return self.torn(start),
                        }
                        continue;
                    }
                    if self.r.remaining() == 0 {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    match self.scan_transaction()? {
                        Some(end) => {
                            let base = start < self.index_offset;
                            self.state = State::InTxn(TxnCursor::new(end - 4, end, base));
                        }
                        None => return self.torn(start),
                    }
                }
                State::InTxn(mut cursor) => {
                    let (event, ended) = cursor.step(&mut self.r, read_item)?;
                    self.state = if ended {
                        State::TxnStart
                    } else {
                        State::InTxn(cursor)
                    };
                    return Ok(Some(event));
                }
            }
        }
    }

    fn position(&self) -> u64 {
        self.r.pos
    }

    fn total_len(&self) -> u64 {
        self.r.len
    }

    fn resume_from(&mut self, offset: u64) -> Result<(), FileError> {
        let invalid = |reason: &str| FileError::InvalidResume {
            offset,
            reason: reason.to_string(),
        };
        if offset > self.r.len {
            return Err(invalid("beyond the end of the file"));
        }
        let offset = if offset == 0 { HEADER_LEN } else { offset };
        if offset < HEADER_LEN {
            return Err(invalid("inside the file header"));
        }
        if offset > self.index_offset {
            match self.index_end()? {
                None => return Err(invalid("the index record is incomplete")),
                Some(end) if offset < end => return Err(invalid("inside the index record")),
                Some(_) => {}
            }
        }
        self.r.seek(offset)?;
        self.tail.at = None;
        self.state = State::TxnStart;
        Ok(())
    }

    fn torn_tail(&self) -> Option<u64> {
        self.tail.at
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Record;
    use crate::filestorage::open_source;

    fn txn(records: &[Vec<u8>]) -> Vec<u8> {
        let mut v = Vec::new();
        for r in records {
            v.extend_from_slice(&(r.len() as u32).to_be_bytes());
            v.extend_from_slice(r);
        }
        v.extend_from_slice(&[0; 4]);
        v
    }

    fn rec(oid: u64, data: &[u8]) -> Vec<u8> {
        Record::new(Oid(oid), data, &[Oid(0)]).into_bytes()
    }

    /// A packed-style file: one base transaction, the index, one more.
    fn file() -> (Vec<u8>, u64, u64) {
        let base = txn(&[rec(0, b"root"), rec(1, b"one")]);
        let index_offset = 14 + base.len() as u64;
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&index_offset.to_be_bytes());
        v.extend(base);
        v.extend_from_slice(&3u64.to_be_bytes());
        v.extend_from_slice(b"zip");
        let later = v.len() as u64;
        v.extend(txn(&[rec(1, b"uno")]));
        (v, index_offset, later)
    }

    fn run(path: &Path, options: ReadOptions, from: u64) -> Result<Vec<SourceEvent>, FileError> {
        let mut s = open_source(path, options)?;
        s.resume_from(from)?;
        let mut v = Vec::new();
        while let Some(e) = s.next_event()? {
            v.push(e);
        }
        Ok(v)
    }

    #[test]
    fn reads_base_index_and_later_transactions_and_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.durus");
        let (bytes, index_offset, later) = file();
        std::fs::write(&path, &bytes).unwrap();
        let ev = run(&path, ReadOptions::default(), 0).unwrap();
        let first_len = 4 + rec(0, b"root").len() as u64;
        assert_eq!(
            ev[1],
            SourceEvent::SafePoint {
                offset: 14 + first_len
            }
        );
        assert_eq!(
            ev[3],
            SourceEvent::TransactionEnd {
                offset: index_offset
            }
        );
        assert_eq!(
            ev[5],
            SourceEvent::TransactionEnd {
                offset: bytes.len() as u64
            }
        );
        assert_eq!(ev.len(), 6);
        for (i, e) in ev.iter().enumerate() {
            if let SourceEvent::SafePoint { offset } | SourceEvent::TransactionEnd { offset } = e {
                assert_eq!(
                    run(&path, ReadOptions::default(), *offset).unwrap(),
                    ev[i + 1..]
                );
            }
        }
        assert!(matches!(
            run(&path, ReadOptions::default(), index_offset + 3),
            Err(FileError::InvalidResume { .. })
        ));
        // Torn tail.
        std::fs::write(&path, &bytes[..bytes.len() - 2]).unwrap();
        assert!(matches!(
            run(&path, ReadOptions::default(), 0),
            Err(FileError::Truncated { offset, .. }) if offset == later
        ));
        let ev = run(
            &path,
            ReadOptions {
                accept_torn_tail: true,
            },
            0,
        )
        .unwrap();
        assert_eq!(ev.len(), 4);
    }

    #[test]
    fn corruption_is_reported_with_offsets() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.durus");
        let (bytes, index_offset, later) = file();
        // A record with unaligned refs, after the index.
        let mut bad = bytes[..later as usize].to_vec();
        let mut r = rec(2, b"x");
        r.push(0);
        bad.extend(txn(&[r]));
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            run(&path, ReadOptions::default(), 0),
            Err(FileError::Corrupt { offset, .. }) if offset == later
        ));
        // A base transaction whose item length runs into the index.
        let mut bad = bytes.clone();
        bad[14..18].copy_from_slice(&1000u32.to_be_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            run(&path, ReadOptions::default(), 0),
            Err(FileError::Corrupt { offset: 14, .. })
        ));
        // An index offset beyond the file.
        let mut bad = bytes.clone();
        bad[6..14].copy_from_slice(&(index_offset + 10_000).to_be_bytes());
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            run(&path, ReadOptions::default(), 0),
            Err(FileError::Corrupt { offset: 6, .. })
        ));
    }
}
