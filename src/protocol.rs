//! Durus's storage-server protocol (version 1), parsed and encoded in one
//! place for the server and [`ClientStorage`](crate::ClientStorage). Numbers
//! are big-endian.
//!
//! | request | bytes after the code | answer |
//! |---|---|---|
//! | `V` version | `u32` | `u32` the server's version |
//! | `L` load | `oid` | a [`LoadAnswer`] |
//! | `B` bulk load | `u32 n`, `n` oids | `n` [`LoadAnswer`]s |
//! | `N` new oid | | `oid` |
//! | `M` new oids | `u8 n` | `n` oids |
//! | `S` sync | | `u32 n`, `n` oids (invalidations) |
//! | `C` commit | | `u32 n`, `n` oids; then the client sends [commit data](read_commit_data), the server `O` or `I` |
//! | `P` pack | | `O` |
//! | `Q` quit | | the server closes and shuts down |
//! | `X` live state (durus-redb's own; Durus clients never send it) | | `u32 n`, `n` bytes of UTF-8 text: one `name value` pair a line |
//! | `Y` snapshot (durus-redb's own, for `backup`) | | `u64` the record count, then every record of one snapshot in oid order, each `u32 n` and `n` bytes, then `u32 0` |
//! | `.` or other | | the server closes the connection |

use std::collections::BTreeMap;
use std::io::{self, Read, Write};

use crate::record::{Oid, Record};
use crate::storage::checked_record;

/// The protocol version this crate speaks.
pub(crate) const PROTOCOL: u32 = 1;

/// Status: done / here is the record.
pub(crate) const STATUS_OKAY: u8 = b'O';
/// Status: no such oid.
pub(crate) const STATUS_KEYERROR: u8 = b'K';
/// Status: invalidated (a load) or a conflict (a commit).
pub(crate) const STATUS_INVALID: u8 = b'I';

/// A request: the command byte and what follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Request {
    /// `V`: the client's protocol version.
    Version(u32),
    /// `L`: one record.
    Load(Oid),
    /// `B`: many records.
    BulkLoad(Vec<Oid>),
    /// `N`: one new oid.
    NewOid,
    /// `M`: `n` new oids.
    NewOids(u8),
    /// `S`: the invalidations since the last sync.
    Sync,
    /// `C`: a commit (the exchange goes on, see the module's table).
    Commit,
    /// `P`: a full collection.
    Pack,
    /// `Q`: shut the server down.
    Quit,
    /// `X`: the server's live state (an extension of durus-redb's).
    Stats,
    /// `Y`: every record of one snapshot (an extension of durus-redb's).
    Snapshot,
    /// `.` or any other byte: the connection ends.
    Close(u8),
}

/// Why a request could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReadError {
    /// The socket failed or the peer went away mid-request.
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The peer sent something that can never be accepted.
    #[error("{0}")]
    Invalid(String),
}

impl Request {
    /// Reads the rest of the request whose command byte is `code`. A bulk
    /// load of more than `max_oids` oids is refused before anything is
    /// allocated for it.
    pub(crate) fn read_after(
        code: u8,
        r: &mut impl Read,
        max_oids: usize,
    ) -> Result<Request, ReadError> {
        Ok(match code {
            b'V' => Request::Version(read_u32(r)?),
            b'L' => Request::Load(read_oid(r)?),
            b'B' => {
                let n = read_u32(r)? as usize;
                if n > max_oids {
                    return Err(ReadError::Invalid(format!(
                        "bulk load: {n} oids announced, more than the {max_oids} allowed"
                    )));
                }
                let bytes = read_bytes(r, n * 8)?;
                Request::BulkLoad(oids_of(&bytes))
            }
            b'N' => Request::NewOid,
            b'M' => Request::NewOids(read_u8(r)?),
            b'S' => Request::Sync,
            b'C' => Request::Commit,
            b'P' => Request::Pack,
            b'Q' => Request::Quit,
            b'X' => Request::Stats,
            b'Y' => Request::Snapshot,
            other => Request::Close(other),
        })
    }

    /// The request as the client sends it.
    pub(crate) fn encode(&self) -> Vec<u8> {
        match self {
            Request::Version(v) => [&[b'V'][..], &v.to_be_bytes()].concat(),
            Request::Load(oid) => [&[b'L'][..], &oid.to_bytes()].concat(),
            Request::BulkLoad(oids) => {
                let mut v = vec![b'B'];
                v.extend(encode_oids(oids));
                v
            }
            Request::NewOid => vec![b'N'],
            Request::NewOids(n) => vec![b'M', *n],
            Request::Sync => vec![b'S'],
            Request::Commit => vec![b'C'],
            Request::Pack => vec![b'P'],
            Request::Quit => vec![b'Q'],
            Request::Stats => vec![b'X'],
            Request::Snapshot => vec![b'Y'],
            Request::Close(code) => vec![*code],
        }
    }
}

/// The answer to one load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum LoadAnswer {
    /// `O`, `u32` length, the record.
    Record(Record),
    /// `K`: no such oid.
    KeyError,
    /// `I`: invalidated for this connection (a read conflict).
    Invalid,
}

impl LoadAnswer {
    /// Writes the answer.
    pub(crate) fn write(&self, w: &mut impl Write) -> io::Result<()> {
        match self {
            LoadAnswer::Record(record) => write_record(w, record),
            LoadAnswer::KeyError => w.write_all(&[STATUS_KEYERROR]),
            LoadAnswer::Invalid => w.write_all(&[STATUS_INVALID]),
        }
    }

    /// Reads the answer to a load of `oid`; the record must name `oid`.
    pub(crate) fn read(r: &mut impl Read, oid: Oid) -> Result<LoadAnswer, ReadError> {
        match read_u8(r)? {
            STATUS_OKAY => {
                let n = read_u32(r)? as usize;
                let bytes = read_bytes(r, n)?;
                checked_record(oid, bytes)
                    .map(LoadAnswer::Record)
                    .map_err(|e| ReadError::Invalid(format!("a bad record: {e}")))
            }
            STATUS_KEYERROR => Ok(LoadAnswer::KeyError),
            STATUS_INVALID => Ok(LoadAnswer::Invalid),
            s => Err(ReadError::Invalid(format!(
                "unexpected load status {s:#04x}"
            ))),
        }
    }
}

/// Writes the `O` answer carrying `record`.
pub(crate) fn write_record(w: &mut impl Write, record: &Record) -> io::Result<()> {
    write_record_bytes(w, record.as_bytes())
}

/// Writes a record answer from a record's bytes.
pub(crate) fn write_record_bytes(w: &mut impl Write, bytes: &[u8]) -> io::Result<()> {
    w.write_all(&[STATUS_OKAY])?;
    w.write_all(&(bytes.len() as u32).to_be_bytes())?;
    w.write_all(bytes)
}

pub(crate) fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

pub(crate) fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub(crate) fn read_oid(r: &mut impl Read) -> io::Result<Oid> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(Oid::from_bytes(b))
}

/// Reads `n` bytes, growing the buffer only as bytes arrive (a peer that
/// claims a huge length and sends little costs little memory).
pub(crate) fn read_bytes(r: &mut impl Read, n: usize) -> io::Result<Vec<u8>> {
    let mut v = Vec::with_capacity(n.min(1 << 20));
    let got = r.take(n as u64).read_to_end(&mut v)?;
    if got < n {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("frame cut short: {got} of {n} bytes"),
        ));
    }
    Ok(v)
}

fn oids_of(bytes: &[u8]) -> Vec<Oid> {
    bytes
        .chunks_exact(8)
        .map(|c| Oid::from_bytes(c.try_into().expect("8 bytes")))
        .collect()
}

/// `u32 n` and `n` oids.
pub(crate) fn encode_oids(oids: &[Oid]) -> Vec<u8> {
    let mut buf = Vec::with_capacity(4 + 8 * oids.len());
    buf.extend_from_slice(&(oids.len() as u32).to_be_bytes());
    for o in oids {
        buf.extend_from_slice(&o.to_bytes());
    }
    buf
}

/// Reads `u32 n` and `n` oids, refusing more than `max`.
pub(crate) fn read_oids(r: &mut impl Read, max: usize) -> Result<Vec<Oid>, ReadError> {
    let n = read_u32(r)? as usize;
    if n > max {
        return Err(ReadError::Invalid(format!(
            "{n} oids announced, more than the {max} allowed"
        )));
    }
    Ok(oids_of(&read_bytes(r, n * 8)?))
}

/// A commit's data as the client sends it after the invalidations: `u32`
/// length (0: the client withdrew the commit), then `u32 rlen | oid | record`
/// for each record, where `rlen` counts the oid and the record.
pub(crate) fn encode_commit_data<'a>(
    records: impl IntoIterator<Item = &'a Record>,
) -> io::Result<Vec<u8>> {
    let mut data = vec![0u8; 4];
    for r in records {
        let rlen = u32::try_from(r.len() + 8)
            .map_err(|_| io::Error::other("a record larger than 4 GiB"))?;
        data.extend_from_slice(&rlen.to_be_bytes());
        data.extend_from_slice(&r.oid().to_bytes());
        data.extend_from_slice(r.as_bytes());
    }
    let len = u32::try_from(data.len() - 4)
        .map_err(|_| io::Error::other("a commit larger than 4 GiB"))?;
    data[..4].copy_from_slice(&len.to_be_bytes());
    Ok(data)
}

/// Reads a commit's data: `None` if the client withdrew the commit. More
/// than `max_bytes` is refused before anything is allocated.
pub(crate) fn read_commit_data(
    r: &mut impl Read,
    max_bytes: u32,
) -> Result<Option<BTreeMap<Oid, Record>>, ReadError> {
    let len = read_u32(r)?;
    if len == 0 {
        return Ok(None);
    }
    if len > max_bytes {
        return Err(ReadError::Invalid(format!(
            "commit of {len} bytes is larger than the {max_bytes} allowed (--max-frame-bytes)"
        )));
    }
    let data = read_bytes(r, len as usize)?;
    parse_commit(&data).map(Some).map_err(ReadError::Invalid)
}

/// Splits a commit's data (without its length) into validated records.
pub(crate) fn parse_commit(data: &[u8]) -> Result<BTreeMap<Oid, Record>, String> {
    let mut records = BTreeMap::new();
    let mut i = 0usize;
    while i < data.len() {
        let Some(head) = data.get(i..i + 12) else {
            return Err(format!(
                "commit data cut short at byte {i} of {}",
                data.len()
            ));
        };
        let rlen = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let oid = Oid::from_bytes(head[4..12].try_into().expect("8 bytes"));
        let end = i.checked_add(4 + rlen).filter(|&e| e <= data.len());
        let Some(end) = end.filter(|_| rlen >= 8) else {
            return Err(format!(
                "record of oid {oid} claims {rlen} bytes at byte {i} of a {}-byte commit",
                data.len()
            ));
        };
        let bytes = data[i + 12..end].to_vec();
        let record = checked_record(oid, bytes).map_err(|e| e.to_string())?;
        records.insert(oid, record);
        i = end;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_request_reads_back_as_encoded() {
        let requests = [
            Request::Version(1),
            Request::Load(Oid(7)),
            Request::BulkLoad(vec![Oid(1), Oid(2), Oid(u64::MAX)]),
            Request::NewOid,
            Request::NewOids(32),
            Request::Sync,
            Request::Commit,
            Request::Pack,
            Request::Stats,
            Request::Snapshot,
            Request::Quit,
            Request::Close(b'.'),
        ];
        for req in requests {
            let bytes = req.encode();
            let mut rest = &bytes[1..];
            let back = Request::read_after(bytes[0], &mut rest, 1000).unwrap();
            assert_eq!(back, req);
            assert!(rest.is_empty(), "{req:?} left bytes unread");
        }
    }

    #[test]
    fn a_bulk_load_over_the_limit_is_refused_before_reading_it() {
        let bytes = Request::BulkLoad(vec![Oid(1); 10]).encode();
        let mut rest = &bytes[1..];
        assert!(matches!(
            Request::read_after(b'B', &mut rest, 9),
            Err(ReadError::Invalid(_))
        ));
    }

    #[test]
    fn commit_data_parses_into_records() {
        let a = Record::new(Oid(1), b"a", &[Oid(2)]);
        let b = Record::new(Oid(2), b"bb", &[]);
        let data = encode_commit_data([&a, &b]).unwrap();
        let parsed = read_commit_data(&mut &data[..], 1 << 20).unwrap().unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[&Oid(1)], a);
        assert_eq!(parsed[&Oid(2)], b);
        let empty = encode_commit_data([]).unwrap();
        assert_eq!(read_commit_data(&mut &empty[..], 1 << 20).unwrap(), None);
        assert!(read_commit_data(&mut &data[..], 8).is_err());
    }

    #[test]
    fn malformed_commit_data_is_refused() {
        let a = Record::new(Oid(1), b"a", &[]);
        let good = encode_commit_data([&a]).unwrap()[4..].to_vec();
        // Cut short, length overrunning, record of another oid, bad record.
        assert!(parse_commit(&good[..good.len() - 1]).is_err());
        assert!(parse_commit(&good[..7]).is_err());
        let mut over = good.clone();
        over[..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_commit(&over).is_err());
        let mut other = good.clone();
        other[4..12].copy_from_slice(&2u64.to_be_bytes());
        assert!(parse_commit(&other).is_err());
        let mut huge = good.clone();
        huge[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_commit(&huge).is_err());
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_commit(&tiny).is_err());
    }

    #[test]
    fn load_answers_read_back() {
        let r = Record::new(Oid(3), b"x", &[]);
        for a in [
            LoadAnswer::Record(r.clone()),
            LoadAnswer::KeyError,
            LoadAnswer::Invalid,
        ] {
            let mut buf = Vec::new();
            a.write(&mut buf).unwrap();
            assert_eq!(LoadAnswer::read(&mut &buf[..], Oid(3)).unwrap(), a);
        }
        let mut buf = Vec::new();
        LoadAnswer::Record(r).write(&mut buf).unwrap();
        assert!(LoadAnswer::read(&mut &buf[..], Oid(4)).is_err());
    }
}
