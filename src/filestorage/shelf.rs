//! FileStorage's SHELF-1 format: a streaming reader and a writer.
//!
//! Layout (all integers 8-byte unsigned big-endian):
//!
//! ```text
//! "SHELF-1\n"
//! n0 | items (n0 bytes)              the initial transaction
//! L | bpw | count | words (L bytes)  the offset map, L = 16 + bpw * count
//! n | items (n bytes)                zero or more further transactions
//! item = len | oid (8) | record (len - 8 bytes), the record naming oid again
//! ```
//!
//! The offset map is an array indexed by oid, `count = max_oid + 2` words of
//! `bpw` bytes (the fewest bytes that hold `map_start + max_oid + 3`). A word
//! below `map_start` is the offset of the oid's item in the initial
//! transaction; every other slot is a *hole*, and holes form a ring: each
//! hole's word is `map_start +` the index of the previous hole, the first
//! hole pointing to the last slot (`count - 1`, always a hole). Durus hands
//! out holes as new oids. A reader may skip the map, and this one does after
//! checking its dimensions.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use super::{
    FileError, FileFormat, PosReader, ReadOptions, RecordSource, SourceEvent, SourceItem, TornTail,
    TxnCursor, check_record,
};
use crate::record::{Oid, Record};

/// The prefix of a SHELF-1 file.
pub(super) const MAGIC: &[u8] = b"SHELF-1\n";
const PREFIX_LEN: u64 = 8;
/// Where the first item of the initial transaction starts.
const BASE_ITEMS: u64 = PREFIX_LEN + 8;

#[derive(Debug, Clone, Copy)]
enum State {
    /// At the length of the initial transaction.
    Initial,
    /// At the offset map, after the initial transaction.
    OffsetMap,
    /// At the start of a further transaction, or at the end of the file.
    TxnStart,
    /// Inside a transaction; the initial one is a base transaction.
    InTxn(TxnCursor),
    Done,
}

/// A streaming reader of a SHELF-1 file.
pub(super) struct ShelfSource {
    r: PosReader,
    state: State,
    /// The end of the initial transaction, if its header is in the file.
    init_end: Option<u64>,
    tail: TornTail,
}

impl ShelfSource {
    pub(super) fn open(path: &Path, options: ReadOptions) -> Result<ShelfSource, FileError> {
        let mut r = PosReader::open(path)?;
        let mut magic = [0; PREFIX_LEN as usize];
        if r.remaining() < PREFIX_LEN {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: "file is shorter than the SHELF-1 prefix".into(),
            });
        }
        r.read_exact(&mut magic)?;
        if magic != MAGIC {
            return Err(FileError::Corrupt {
                offset: 0,
                reason: format!(
                    "bad magic {:?}, expected \"SHELF-1\\n\"",
                    String::from_utf8_lossy(&magic)
                ),
            });
        }
        let init_end = if r.remaining() >= 8 {
            let n = r.read_u64()?;
            r.seek(PREFIX_LEN)?;
            BASE_ITEMS.checked_add(n)
        } else {
            None
        };
        Ok(ShelfSource {
            r,
            state: State::Initial,
            init_end,
            tail: TornTail::new(options),
        })
    }

    /// The file ends inside the structure starting at `offset`.
    fn torn(&mut self, offset: u64) -> Result<Option<SourceEvent>, FileError> {
        self.state = State::Done;
        self.tail.meet(offset, self.r.len)
    }

    /// Reads a transaction's length; `None` if the file ends inside it.
    fn txn_header(&mut self) -> Result<Option<u64>, FileError> {
        if self.r.remaining() < 8 {
            return Ok(None);
        }
        let n = self.r.read_u64()?;
        // `then`, not `then_some`: the end is computed only when it fits
        // (a length near 2^64 would overflow).
        Ok((n <= self.r.remaining()).then(|| self.r.pos + n))
    }

    /// Checks the offset map's dimensions and skips it; `None` if torn.
    fn skip_offset_map(&mut self) -> Result<Option<()>, FileError> {
        let start = self.r.pos;
        if self.r.remaining() < 8 {
            return Ok(None);
        }
        let len = self.r.read_u64()?;
        if len > self.r.remaining() {
            return Ok(None);
        }
        let corrupt = |reason: String| FileError::Corrupt {
            offset: start,
            reason,
        };
        if len < 16 {
            return Err(corrupt(format!(
                "offset map of {len} bytes lacks its 16-byte header"
            )));
        }
        let bpw = self.r.read_u64()?;
        let count = self.r.read_u64()?;
        let expected = bpw.checked_mul(count).and_then(|b| b.checked_add(16));
        if !(1..=8).contains(&bpw) || expected != Some(len) {
            return Err(corrupt(format!(
                "offset map of {len} bytes declares {count} words of {bpw} bytes"
            )));
        }
        self.r.seek(start + 8 + len)?;
        Ok(Some(()))
    }
}

/// Reads one item of a transaction whose items end at `end`.
fn read_item(r: &mut PosReader, end: u64) -> Result<SourceItem, FileError> {
    let start = r.pos;
    let corrupt = |reason: String| FileError::Corrupt {
        offset: start,
        reason,
    };
    if end - start < 8 {
        return Err(corrupt(format!(
            "item length field overruns the transaction ending at {end}"
        )));
    }
    let len = r.read_u64()?;
    if len > end - r.pos {
        return Err(corrupt(format!(
            "item of {len} bytes overruns the transaction ending at {end}"
        )));
    }
    if len < 8 {
        return Err(corrupt(format!(
            "item of {len} bytes is shorter than its oid"
        )));
    }
    let mut oid = [0; 8];
    r.read_exact(&mut oid)?;
    let oid = Oid::from_bytes(oid);
    let record = r.read_vec(len - 8)?;
    check_record(start, oid, &record)?;
    Ok(SourceItem { oid, record })
}

impl RecordSource for ShelfSource {
    fn format(&self) -> FileFormat {
        FileFormat::Shelf
    }

    fn next_event(&mut self) -> Result<Option<SourceEvent>, FileError> {
        loop {
            match self.state {
                State::Done => return Ok(None),
                State::Initial => match self.txn_header()? {
                    Some(end) => self.state = State::InTxn(TxnCursor::new(end, end, true)),
                    None => return self.torn(PREFIX_LEN),
                },
                State::OffsetMap => {
                    let start = self.r.pos;
                    match self.skip_offset_map()? {
                        Some(()) => self.state = State::TxnStart,
                        None => return self.torn(start),
                    }
                }
                State::TxnStart => {
                    let start = self.r.pos;
                    if self.r.remaining() == 0 {
                        self.state = State::Done;
                        return Ok(None);
                    }
                    match self.txn_header()? {
                        Some(end) => self.state = State::InTxn(TxnCursor::new(end, end, false)),
                        None => return self.torn(start),
                    }
                }
                State::InTxn(mut cursor) => {
                    let (event, ended) = cursor.step(&mut self.r, read_item)?;
                    self.state = match (ended, cursor.base) {
                        (false, _) => State::InTxn(cursor),
                        (true, true) => State::OffsetMap,
                        (true, false) => State::TxnStart,
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
        self.tail.at = None;
        if offset == 0 || offset == PREFIX_LEN {
            self.r.seek(PREFIX_LEN)?;
            self.state = State::Initial;
            return Ok(());
        }
        let Some(init_end) = self.init_end.filter(|&e| e <= self.r.len) else {
            return Err(invalid("the initial transaction is incomplete"));
        };
        if (BASE_ITEMS..init_end).contains(&offset) {
            self.r.seek(offset)?;
            self.state = State::InTxn(TxnCursor::new(init_end, init_end, true));
        } else if offset == init_end {
            self.r.seek(offset)?;
            self.state = State::OffsetMap;
        } else if offset > init_end {
            self.r.seek(init_end)?;
            if self.r.remaining() < 8 {
                return Err(invalid("the offset map is incomplete"));
            }
            let map_end = self.r.read_u64()?.saturating_add(init_end + 8);
            if offset < map_end {
                return Err(invalid("inside the offset map"));
            }
            self.r.seek(offset)?;
            self.state = State::TxnStart;
        } else {
            return Err(invalid("inside the file header"));
        }
        Ok(())
    }

    fn torn_tail(&self) -> Option<u64> {
        self.tail.at
    }
}

/// Writes a new SHELF-1 file that Durus's FileStorage (4.3) opens: the
/// records become the initial transaction, followed by its offset map, as
/// Durus's own pack writes it.
///
/// Records must be written in strictly ascending oid order (as a store
/// iterated by oid gives them). That is what keeps memory bounded: the map
/// is indexed by oid, so [`finish`](ShelfWriter::finish) builds it in one
/// sequential pass over the written records, read back from the file, and
/// keeps no per-oid state. The map has one slot per oid up to the largest,
/// so its size follows the largest oid, as in Durus.
///
/// The file is valid only once `finish` returns: write to a temporary name
/// and rename it into place if others may look at it.
pub struct ShelfWriter {
    out: BufWriter<File>,
    path: PathBuf,
    pos: u64,
    last: Option<Oid>,
}

impl ShelfWriter {
    /// Creates the file, which must not exist yet.
    pub fn create(path: impl AsRef<Path>) -> Result<ShelfWriter, FileError> {
        let path = path.as_ref().to_path_buf();
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        let mut out = BufWriter::with_capacity(256 * 1024, file);
        out.write_all(MAGIC)?;
        out.write_all(&0u64.to_be_bytes())?; // the length, written by finish
        Ok(ShelfWriter {
            out,
            path,
            pos: BASE_ITEMS,
            last: None,
        })
    }

    /// Appends the record for `oid`. Oids must strictly ascend, and the
    /// record must be well formed and name `oid`.
    pub fn write(&mut self, oid: Oid, record: &[u8]) -> Result<(), FileError> {
        if let Some(previous) = self.last.filter(|&p| p >= oid) {
            return Err(FileError::OidOrder { previous, oid });
        }
        Record::check(record).map_err(|source| FileError::InvalidRecord { oid, source })?;
        let named = Oid::from_slice(record).unwrap_or_default();
        if named != oid {
            return Err(FileError::InvalidRecord {
                oid,
                source: crate::record::RecordError::OidMismatch {
                    expected: oid,
                    found: named,
                },
            });
        }
        let len = 8 + record.len() as u64;
        self.out.write_all(&len.to_be_bytes())?;
        self.out.write_all(&oid.to_bytes())?;
        self.out.write_all(record)?;
        self.pos += 8 + len;
        self.last = Some(oid);
        Ok(())
    }

    /// Writes the offset map and the initial transaction's length, and syncs
    /// the file to disk. Returns the file's length.
    pub fn finish(mut self) -> Result<u64, FileError> {
        let map_start = self.pos;
        let too_big = || std::io::Error::other("oids too large for a SHELF-1 offset map");
        // Dimensions as Durus computes them (OffsetMap.generate).
        let (count, max_int) = match self.last {
            None => (0, map_start),
            Some(max) => {
                let count = max.0.checked_add(2).ok_or_else(too_big)?;
                (count, map_start.checked_add(count).ok_or_else(too_big)?)
            }
        };
        let bpw = significant_bytes(max_int.checked_add(1).ok_or_else(too_big)?);
        let map_len = bpw
            .checked_mul(count)
            .and_then(|b| b.checked_add(16))
            .ok_or_else(too_big)?;
        self.out.write_all(&map_len.to_be_bytes())?;
        self.out.write_all(&bpw.to_be_bytes())?;
        self.out.write_all(&count.to_be_bytes())?;
        self.out.flush()?;

        // Second pass: read the items back in oid order, fill the slots.
        let mut items = BufReader::with_capacity(64 * 1024, File::open(&self.path)?);
        items.seek(SeekFrom::Start(BASE_ITEMS))?;
        let mut item_pos = BASE_ITEMS;
        let mut next_item = |items: &mut BufReader<File>| -> Result<Option<(u64, u64)>, FileError> {
            if item_pos >= map_start {
                return Ok(None);
            }
            let mut head = [0; 16];
            items.read_exact(&mut head)?;
            let len = u64::from_be_bytes(head[..8].try_into().unwrap_or_default());
            let oid = u64::from_be_bytes(head[8..].try_into().unwrap_or_default());
            items.seek_relative(len as i64 - 8)?;
            let at = item_pos;
            item_pos += 8 + len;
            Ok(Some((oid, at)))
        };
        let mut next = next_item(&mut items)?;
        let mut last_hole = count.saturating_sub(1);
        let skip = 8 - bpw as usize;
        for index in 0..count {
            let word = match next {
                Some((oid, at)) if oid == index => {
                    next = next_item(&mut items)?;
                    at
                }
                _ => {
                    let word = map_start + last_hole;
                    last_hole = index;
                    word
                }
            };
            self.out.write_all(&word.to_be_bytes()[skip..])?;
        }
        let file_len = map_start + 8 + map_len;
        self.out.seek(SeekFrom::Start(PREFIX_LEN))?;
        self.out
            .write_all(&(map_start - BASE_ITEMS).to_be_bytes())?;
        self.out.flush()?;
        self.out.get_ref().sync_all()?;
        Ok(file_len)
    }
}

/// The number of bytes of `n` without its leading zero bytes.
fn significant_bytes(n: u64) -> u64 {
    8 - u64::from(n.leading_zeros() / 8)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filestorage::open_source;

    fn rec(oid: u64, data: &[u8]) -> Vec<u8> {
        Record::new(Oid(oid), data, &[]).into_bytes()
    }

    fn item(oid: u64, record: &[u8]) -> Vec<u8> {
        let mut v = (8 + record.len() as u64).to_be_bytes().to_vec();
        v.extend_from_slice(&oid.to_be_bytes());
        v.extend_from_slice(record);
        v
    }

    fn txn(items: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = items.concat();
        let mut v = (body.len() as u64).to_be_bytes().to_vec();
        v.extend(body);
        v
    }

    /// Found by the fuzzer: a transaction length of 2^64-1 overflowed the
    /// end offset (a panic in debug builds) before it was found too long.
    #[test]
    fn a_transaction_length_near_2_pow_64_is_a_torn_tail_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.durus");
        let mut bytes = MAGIC.to_vec();
        bytes.extend_from_slice(&u64::MAX.to_be_bytes());
        bytes.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0xcb, 0, 0, 0, 0]);
        std::fs::write(&path, &bytes).unwrap();
        assert!(matches!(
            events(&path, ReadOptions::default()),
            Err(FileError::Truncated { .. })
        ));
        assert!(events(&path, ReadOptions::default().with_torn_tail(true)).is_ok());
    }

    fn events(path: &Path, options: ReadOptions) -> Result<Vec<SourceEvent>, FileError> {
        let mut s = open_source(path, options)?;
        let mut v = Vec::new();
        while let Some(e) = s.next_event()? {
            v.push(e);
        }
        Ok(v)
    }

    #[test]
    fn writer_output_reads_back_with_boundaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("w.durus");
        let mut w = ShelfWriter::create(&path).unwrap();
        w.write(Oid(0), &rec(0, b"root")).unwrap();
        w.write(Oid(3), &rec(3, b"three")).unwrap();
        assert!(matches!(
            w.write(Oid(3), &rec(3, b"again")),
            Err(FileError::OidOrder { .. })
        ));
        assert!(matches!(
            w.write(Oid(4), &rec(5, b"x")),
            Err(FileError::InvalidRecord { .. })
        ));
        let len = w.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, len);
        // Map: 5 slots (max oid 3 + 2) of 1 byte; holes 1, 2, 4 form a ring.
        let map_start = 16 + 32 + 33;
        assert_eq!(
            &bytes[map_start..map_start + 24],
            &[
                0, 0, 0, 0, 0, 0, 0, 21, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 5
            ]
        );
        let m = map_start as u8;
        assert_eq!(&bytes[map_start + 24..], &[16, m + 4, m + 1, 48, m + 2]);
        let ev = events(&path, ReadOptions::default()).unwrap();
        assert_eq!(ev.len(), 4);
        assert_eq!(ev[1], SourceEvent::SafePoint { offset: 48 });
        assert_eq!(ev[3], SourceEvent::TransactionEnd { offset: 81 });
    }

    #[test]
    fn reads_transactions_after_the_map_and_detects_tears_and_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.durus");
        let mut w = ShelfWriter::create(&path).unwrap();
        w.write(Oid(0), &rec(0, b"root")).unwrap();
        w.finish().unwrap();
        let mut bytes = std::fs::read(&path).unwrap();
        let second = bytes.len() as u64;
        bytes.extend(txn(&[
            item(0, &rec(0, b"new root")),
            item(1, &rec(1, b"one")),
        ]));
        std::fs::write(&path, &bytes).unwrap();
        let ev = events(&path, ReadOptions::default()).unwrap();
        let oids: Vec<u64> = ev
            .iter()
            .filter_map(|e| match e {
                SourceEvent::Item(i) => Some(i.oid.0),
                _ => None,
            })
            .collect();
        assert_eq!(oids, vec![0, 0, 1]);
        assert_eq!(
            ev.last(),
            Some(&SourceEvent::TransactionEnd {
                offset: bytes.len() as u64
            })
        );

        // Torn: the last transaction cut short.
        std::fs::write(&path, &bytes[..bytes.len() - 3]).unwrap();
        assert!(matches!(
            events(&path, ReadOptions::default()),
            Err(FileError::Truncated { offset, .. }) if offset == second
        ));
        let ev = events(
            &path,
            ReadOptions {
                accept_torn_tail: true,
            },
        )
        .unwrap();
        assert_eq!(ev.last(), Some(&SourceEvent::TransactionEnd { offset: 48 }));

        // An item whose oid differs from its record's.
        let mut bad = bytes.clone();
        bad.truncate(second as usize);
        bad.extend(txn(&[item(2, &rec(1, b"one"))]));
        std::fs::write(&path, &bad).unwrap();
        assert!(matches!(
            events(&path, ReadOptions::default()),
            Err(FileError::Corrupt { offset, .. }) if offset == second + 8
        ));
    }
}
