//! The Durus storage-server protocol, as much as the benchmark's own client
//! (the load generator) and its null server need.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

pub const PROTOCOL: u32 = 1;

pub fn read_u32(r: &mut impl Read) -> io::Result<u32> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b)?;
    Ok(u32::from_be_bytes(b))
}

pub fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_be_bytes(b))
}

pub fn read_u8(r: &mut impl Read) -> io::Result<u8> {
    let mut b = [0u8; 1];
    r.read_exact(&mut b)?;
    Ok(b[0])
}

/// A Durus record: `oid | u32 len | data | refs` (no refs here).
pub fn make_record(oid: u64, data: &[u8]) -> Vec<u8> {
    let mut r = Vec::with_capacity(12 + data.len());
    r.extend_from_slice(&oid.to_be_bytes());
    r.extend_from_slice(&(data.len() as u32).to_be_bytes());
    r.extend_from_slice(data);
    r
}

/// The result of a load.
#[derive(Debug, PartialEq, Eq)]
pub enum Loaded {
    Record(Vec<u8>),
    Missing,
    Invalid,
}

/// A client connection speaking the protocol.
pub struct Client {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Client {
    pub fn connect(port: u16) -> io::Result<Client> {
        let s = TcpStream::connect(("127.0.0.1", port))?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut c = Client {
            r: BufReader::new(s.try_clone()?),
            w: BufWriter::new(s),
        };
        c.w.write_all(b"V")?;
        c.w.write_all(&PROTOCOL.to_be_bytes())?;
        c.w.flush()?;
        let p = read_u32(&mut c.r)?;
        if p != PROTOCOL {
            return Err(io::Error::other(format!("server speaks protocol {p}")));
        }
        Ok(c)
    }

    pub fn new_oids(&mut self, n: u8) -> io::Result<Vec<u64>> {
        self.w.write_all(&[b'M', n])?;
        self.w.flush()?;
        (0..n).map(|_| read_u64(&mut self.r)).collect()
    }

    pub fn load(&mut self, oid: u64) -> io::Result<Loaded> {
        self.w.write_all(b"L")?;
        self.w.write_all(&oid.to_be_bytes())?;
        self.w.flush()?;
        match read_u8(&mut self.r)? {
            b'O' => {
                let n = read_u32(&mut self.r)? as usize;
                let mut v = vec![0u8; n];
                self.r.read_exact(&mut v)?;
                Ok(Loaded::Record(v))
            }
            b'K' => Ok(Loaded::Missing),
            b'I' => Ok(Loaded::Invalid),
            s => Err(io::Error::other(format!("bad load status {s}"))),
        }
    }

    pub fn sync(&mut self) -> io::Result<Vec<u64>> {
        self.w.write_all(b"S")?;
        self.w.flush()?;
        let n = read_u32(&mut self.r)?;
        (0..n).map(|_| read_u64(&mut self.r)).collect()
    }

    /// Commits `records` (full records, each starting with its oid). Returns
    /// false if the server answered a conflict.
    pub fn commit(&mut self, records: &[Vec<u8>]) -> io::Result<bool> {
        self.w.write_all(b"C")?;
        self.w.flush()?;
        let n = read_u32(&mut self.r)?;
        for _ in 0..n {
            read_u64(&mut self.r)?;
        }
        let mut data = Vec::new();
        for r in records {
            data.extend_from_slice(&((r.len() + 8) as u32).to_be_bytes());
            data.extend_from_slice(&r[..8]);
            data.extend_from_slice(r);
        }
        self.w.write_all(&(data.len() as u32).to_be_bytes())?;
        self.w.write_all(&data)?;
        self.w.flush()?;
        if data.is_empty() {
            return Ok(true);
        }
        match read_u8(&mut self.r)? {
            b'O' => Ok(true),
            b'I' => Ok(false),
            s => Err(io::Error::other(format!("bad commit status {s}"))),
        }
    }

    /// Asks the server to shut down.
    pub fn quit(mut self) -> io::Result<()> {
        self.w.write_all(b"Q")?;
        self.w.flush()
    }
}
