//! Framing of Durus's storage-server protocol (version 1), shared by the
//! server and [`ClientStorage`](crate::ClientStorage). Numbers are big-endian.

use std::io::{self, Read, Write};

use crate::record::Oid;

/// The protocol version this crate speaks.
pub(crate) const PROTOCOL: u32 = 1;

/// Status: done / here is the record.
pub(crate) const STATUS_OKAY: u8 = b'O';
/// Status: no such oid.
pub(crate) const STATUS_KEYERROR: u8 = b'K';
/// Status: invalidated (a load) or a conflict (a commit).
pub(crate) const STATUS_INVALID: u8 = b'I';

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

/// Writes `u32 n` and `n` oids.
pub(crate) fn write_oids(w: &mut impl Write, oids: &[Oid]) -> io::Result<()> {
    let mut buf = Vec::with_capacity(4 + 8 * oids.len());
    buf.extend_from_slice(&(oids.len() as u32).to_be_bytes());
    for o in oids {
        buf.extend_from_slice(&o.to_bytes());
    }
    w.write_all(&buf)
}

/// Reads `u32 n` and `n` oids, refusing more than `max`.
pub(crate) fn read_oids(r: &mut impl Read, max: usize) -> io::Result<Vec<Oid>> {
    let n = read_u32(r)? as usize;
    if n > max {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{n} oids announced, more than the {max} allowed"),
        ));
    }
    (0..n).map(|_| read_oid(r)).collect()
}
