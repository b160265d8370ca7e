//! Oids and records: the two values every part of the engine speaks in.
//!
//! A Durus record is `oid (8) | n: u32 big-endian | data (n bytes) | refs`,
//! where `refs` is zero or more 8-byte big-endian oids. The storage never
//! interprets `data`; it reads `refs` for reference bookkeeping.

use std::fmt;

/// An object id: an unsigned 64-bit integer, 8 bytes big-endian on the wire.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Oid(pub u64);

impl Oid {
    /// The root object's oid. Everything reachable from it is live.
    pub const ROOT: Oid = Oid(0);

    /// The 8-byte big-endian encoding used on the wire and in records.
    pub fn to_bytes(self) -> [u8; 8] {
        self.0.to_be_bytes()
    }

    /// Decodes 8 big-endian bytes.
    pub fn from_bytes(bytes: [u8; 8]) -> Oid {
        Oid(u64::from_be_bytes(bytes))
    }

    /// Decodes the first 8 bytes of `bytes`, or `None` if there are fewer.
    pub fn from_slice(bytes: &[u8]) -> Option<Oid> {
        let head: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
        Some(Oid::from_bytes(head))
    }
}

impl fmt::Debug for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Oid({})", self.0)
    }
}

impl fmt::Display for Oid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl From<u64> for Oid {
    fn from(value: u64) -> Self {
        Oid(value)
    }
}

/// Why a byte string is not a valid Durus record.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum RecordError {
    /// Fewer than the 12 bytes of oid and data length.
    #[error("record of {len} bytes is shorter than the 12-byte header")]
    TooShort {
        /// The record's length.
        len: usize,
    },
    /// The declared data length runs past the end of the record.
    #[error("record declares {declared} data bytes but only {available} follow the header")]
    DataOverrun {
        /// The data length the header declares.
        declared: u64,
        /// The bytes after the header.
        available: usize,
    },
    /// The refs part is not a whole number of 8-byte oids.
    #[error("record's refs part is {len} bytes, not a multiple of 8")]
    RefsNotAligned {
        /// Length of the refs part.
        len: usize,
    },
    /// The record names another oid than the one it is stored under.
    #[error("record names oid {found} but is stored as oid {expected}")]
    OidMismatch {
        /// The oid it is stored under.
        expected: Oid,
        /// The oid the record itself names.
        found: Oid,
    },
}

/// A validated Durus record, owning its bytes exactly as given.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Record {
    bytes: Vec<u8>,
    data_end: usize,
}

impl Record {
    /// Validates `bytes` as a record: at least 12 bytes, the declared data
    /// length fits, the refs part is a multiple of 8.
    pub fn from_bytes(bytes: Vec<u8>) -> Result<Record, RecordError> {
        let data_end = Self::check(&bytes)?;
        Ok(Record { bytes, data_end })
    }

    /// Validates `bytes` and checks that the record names `oid`.
    pub fn for_oid(oid: Oid, bytes: Vec<u8>) -> Result<Record, RecordError> {
        let record = Record::from_bytes(bytes)?;
        if record.oid() != oid {
            return Err(RecordError::OidMismatch {
                expected: oid,
                found: record.oid(),
            });
        }
        Ok(record)
    }

    /// Builds a record from its parts.
    pub fn new(oid: Oid, data: &[u8], refs: &[Oid]) -> Record {
        let mut bytes = Vec::with_capacity(12 + data.len() + 8 * refs.len());
        bytes.extend_from_slice(&oid.to_bytes());
        let len = u32::try_from(data.len()).expect("record data larger than 4 GiB");
        bytes.extend_from_slice(&len.to_be_bytes());
        bytes.extend_from_slice(data);
        for r in refs {
            bytes.extend_from_slice(&r.to_bytes());
        }
        let data_end = 12 + data.len();
        Record { bytes, data_end }
    }

    /// Checks a record's framing and returns where its data ends.
    pub fn check(bytes: &[u8]) -> Result<usize, RecordError> {
        if bytes.len() < 12 {
            return Err(RecordError::TooShort { len: bytes.len() });
        }
        let declared = u32::from_be_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as u64;
        let available = bytes.len() - 12;
        if declared > available as u64 {
            return Err(RecordError::DataOverrun {
                declared,
                available,
            });
        }
        let data_end = 12 + declared as usize;
        let refs_len = bytes.len() - data_end;
        if !refs_len.is_multiple_of(8) {
            return Err(RecordError::RefsNotAligned { len: refs_len });
        }
        Ok(data_end)
    }

    /// The oid this record names.
    pub fn oid(&self) -> Oid {
        Oid::from_slice(&self.bytes).expect("validated record has an oid")
    }

    /// The opaque data part.
    pub fn data(&self) -> &[u8] {
        &self.bytes[12..self.data_end]
    }

    /// The oids this record references, in the order they are written.
    pub fn refs(&self) -> impl ExactSizeIterator<Item = Oid> + '_ {
        refs_of_validated(&self.bytes[self.data_end..])
    }

    /// The refs part, as written: 8 bytes an oid.
    pub(crate) fn refs_bytes(&self) -> &[u8] {
        &self.bytes[self.data_end..]
    }

    /// The whole record, as stored and sent on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Gives the record's bytes back.
    pub fn into_bytes(self) -> Vec<u8> {
        self.bytes
    }

    /// Length of the whole record in bytes.
    pub fn len(&self) -> usize {
        self.bytes.len()
    }

    /// Always false: a record has at least its 12-byte header.
    pub fn is_empty(&self) -> bool {
        false
    }
}

/// The refs of a record given as raw bytes that passed [`Record::check`].
pub(crate) fn refs_of_validated(refs: &[u8]) -> impl ExactSizeIterator<Item = Oid> + '_ {
    refs.chunks_exact(8)
        .map(|c| Oid::from_bytes(c.try_into().expect("chunk of 8")))
}

/// The refs of stored record bytes; errors if the bytes are not a record.
pub(crate) fn refs_of(
    bytes: &[u8],
) -> Result<impl ExactSizeIterator<Item = Oid> + '_, RecordError> {
    let data_end = Record::check(bytes)?;
    Ok(refs_of_validated(&bytes[data_end..]))
}

impl fmt::Debug for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Record")
            .field("oid", &self.oid())
            .field("data_len", &self.data().len())
            .field("refs", &self.refs().collect::<Vec<_>>())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_round_trips_its_parts() {
        let r = Record::new(Oid(7), b"hello", &[Oid(1), Oid(2)]);
        assert_eq!(r.oid(), Oid(7));
        assert_eq!(r.data(), b"hello");
        assert_eq!(r.refs().collect::<Vec<_>>(), vec![Oid(1), Oid(2)]);
        let again = Record::from_bytes(r.as_bytes().to_vec()).unwrap();
        assert_eq!(again, r);
    }

    #[test]
    fn short_record_is_rejected() {
        assert_eq!(
            Record::from_bytes(vec![0; 11]),
            Err(RecordError::TooShort { len: 11 })
        );
    }

    #[test]
    fn overrunning_data_length_is_rejected() {
        let mut b = Oid(1).to_bytes().to_vec();
        b.extend_from_slice(&5u32.to_be_bytes());
        b.extend_from_slice(b"abcd");
        assert!(matches!(
            Record::from_bytes(b),
            Err(RecordError::DataOverrun {
                declared: 5,
                available: 4
            })
        ));
    }

    #[test]
    fn unaligned_refs_are_rejected() {
        let mut b = Record::new(Oid(1), b"x", &[Oid(3)]).into_bytes();
        b.push(0);
        assert_eq!(
            Record::from_bytes(b),
            Err(RecordError::RefsNotAligned { len: 9 })
        );
    }

    #[test]
    fn record_for_other_oid_is_rejected() {
        let b = Record::new(Oid(1), b"x", &[]).into_bytes();
        assert_eq!(
            Record::for_oid(Oid(2), b),
            Err(RecordError::OidMismatch {
                expected: Oid(2),
                found: Oid(1)
            })
        );
    }
}
