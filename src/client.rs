//! `ClientStorage`: a [`Storage`] on a Durus storage server (durus-redb's or
//! Durus's own), over TCP or a Unix socket.

use std::collections::{BTreeMap, HashSet};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::time::Duration;

use crate::error::{Conflict, Result, StorageError};
use crate::protocol::{
    PROTOCOL, STATUS_INVALID, STATUS_KEYERROR, STATUS_OKAY, read_bytes, read_oid, read_u8, read_u32,
};
use crate::record::{Oid, Record};
use crate::server::{Address, Stream};
use crate::storage::{PackReport, Storage, checked_record};

/// How many oids are asked for at once (as Durus's client does).
const OID_POOL: u8 = 32;

/// A client of a Durus storage server.
///
/// `end()` fails with [`Conflict::Invalidated`] when the server's
/// invalidations name an oid stored in the commit (the commit is then
/// withdrawn, as Durus's client does), and with [`Conflict::Refused`] when the
/// server answers the commit with a conflict. Invalidations received with a
/// commit are kept and returned by the next `sync()`.
pub struct ClientStorage {
    address: Address,
    r: BufReader<Stream>,
    w: BufWriter<Stream>,
    pending: BTreeMap<Oid, Record>,
    oid_pool: Vec<Oid>,
    invalid: HashSet<Oid>,
}

impl std::fmt::Debug for ClientStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientStorage({})", self.address)
    }
}

fn protocol_error(what: impl Into<String>) -> StorageError {
    StorageError::Protocol(what.into())
}

impl ClientStorage {
    /// Connects to a server at `host:port`.
    pub fn connect_tcp(host: &str, port: u16) -> Result<ClientStorage> {
        ClientStorage::connect(Address::tcp(host, port))
    }

    /// Connects to a server on a Unix socket.
    pub fn connect_unix(path: impl Into<std::path::PathBuf>) -> Result<ClientStorage> {
        ClientStorage::connect(Address::unix(path))
    }

    /// Connects to a server and checks its protocol version.
    pub fn connect(address: Address) -> Result<ClientStorage> {
        let stream = address.connect()?;
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut c = ClientStorage {
            address,
            r: BufReader::new(stream.try_clone()?),
            w: BufWriter::new(stream),
            pending: BTreeMap::new(),
            oid_pool: Vec::new(),
            invalid: HashSet::new(),
        };
        c.w.write_all(b"V")?;
        c.w.write_all(&PROTOCOL.to_be_bytes())?;
        c.w.flush()?;
        let theirs = read_u32(&mut c.r)?;
        if theirs != PROTOCOL {
            return Err(protocol_error(format!(
                "the server speaks protocol {theirs}, this client {PROTOCOL}"
            )));
        }
        Ok(c)
    }

    /// The server's address.
    pub fn address(&self) -> &Address {
        &self.address
    }

    fn send(&mut self, bytes: &[u8]) -> Result<()> {
        self.w.write_all(bytes)?;
        self.w.flush()?;
        Ok(())
    }

    fn read_load(&mut self, oid: Oid) -> Result<Record> {
        match read_u8(&mut self.r)? {
            STATUS_OKAY => {
                let n = read_u32(&mut self.r)? as usize;
                let bytes = read_bytes(&mut self.r, n)?;
                checked_record(oid, bytes)
                    .map_err(|e| protocol_error(format!("the server sent a bad record: {e}")))
            }
            STATUS_KEYERROR => Err(StorageError::NotFound(oid)),
            STATUS_INVALID => Err(StorageError::ReadConflict(oid)),
            s => Err(protocol_error(format!("unexpected load status {s:#04x}"))),
        }
    }

    fn read_oid_list(&mut self) -> Result<Vec<Oid>> {
        let n = read_u32(&mut self.r)? as usize;
        let bytes = read_bytes(
            &mut self.r,
            n.checked_mul(8)
                .ok_or_else(|| protocol_error("oid count overflows"))?,
        )?;
        bytes
            .chunks_exact(8)
            .map(|c| {
                let mut r: &[u8] = c;
                read_oid(&mut r).map_err(StorageError::from)
            })
            .collect()
    }

    /// Asks the server to shut down (`Q`) and closes this connection.
    pub fn stop_server(mut self) -> Result<()> {
        self.send(b"Q")?;
        // The server closes the connection; wait for that, briefly.
        let mut buf = [0u8; 1];
        let _ = self.r.read(&mut buf);
        Ok(())
    }
}

impl Storage for ClientStorage {
    fn load(&mut self, oid: Oid) -> Result<Record> {
        let mut req = [0u8; 9];
        req[0] = b'L';
        req[1..].copy_from_slice(&oid.to_bytes());
        self.send(&req)?;
        self.read_load(oid)
    }

    fn bulk_load(&mut self, oids: &[Oid]) -> Result<Vec<Record>> {
        let mut req = Vec::with_capacity(5 + 8 * oids.len());
        req.push(b'B');
        req.extend_from_slice(&(oids.len() as u32).to_be_bytes());
        for o in oids {
            req.extend_from_slice(&o.to_bytes());
        }
        self.send(&req)?;
        // Read every answer before reporting the first failure, so the
        // connection stays in step.
        let answers: Vec<Result<Record>> = oids.iter().map(|&o| self.read_load(o)).collect();
        answers.into_iter().collect()
    }

    fn begin(&mut self) {
        self.pending.clear();
    }

    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()> {
        let record = checked_record(oid, record)?;
        self.pending.insert(oid, record);
        Ok(())
    }

    fn end(&mut self) -> Result<()> {
        let pending = std::mem::take(&mut self.pending);
        self.send(b"C")?;
        let invalid = self.read_oid_list()?;
        let clash: Vec<Oid> = invalid
            .iter()
            .copied()
            .filter(|o| pending.contains_key(o))
            .collect();
        self.invalid.extend(invalid);
        if !clash.is_empty() {
            self.send(&0u32.to_be_bytes())?;
            return Err(Conflict::Invalidated { oids: clash }.into());
        }
        let mut data = Vec::new();
        for (oid, r) in &pending {
            data.extend_from_slice(&((r.len() + 8) as u32).to_be_bytes());
            data.extend_from_slice(&oid.to_bytes());
            data.extend_from_slice(r.as_bytes());
        }
        let len = u32::try_from(data.len())
            .map_err(|_| StorageError::Io(io::Error::other("a commit larger than 4 GiB")))?;
        self.w.write_all(&len.to_be_bytes())?;
        self.w.write_all(&data)?;
        self.w.flush()?;
        if data.is_empty() {
            return Ok(());
        }
        match read_u8(&mut self.r)? {
            STATUS_OKAY => Ok(()),
            STATUS_INVALID => Err(Conflict::Refused.into()),
            s => Err(protocol_error(format!("unexpected commit status {s:#04x}"))),
        }
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<Vec<Oid>> {
        self.send(b"S")?;
        let oids = self.read_oid_list()?;
        self.invalid.extend(oids);
        let mut all: Vec<Oid> = self.invalid.drain().collect();
        all.sort_unstable();
        Ok(all)
    }

    fn new_oid(&mut self) -> Result<Oid> {
        if self.oid_pool.is_empty() {
            self.send(&[b'M', OID_POOL])?;
            let mut oids: Vec<Oid> = (0..OID_POOL)
                .map(|_| read_oid(&mut self.r))
                .collect::<io::Result<_>>()?;
            oids.reverse();
            self.oid_pool = oids;
        }
        Ok(self.oid_pool.pop().expect("the pool was just filled"))
    }

    fn new_oids(&mut self, n: usize) -> Result<Vec<Oid>> {
        (0..n).map(|_| self.new_oid()).collect()
    }

    fn iter_records(&mut self) -> Result<Box<dyn Iterator<Item = Result<Record>> + '_>> {
        Ok(Box::new(self.traverse(Oid::ROOT)))
    }

    /// Asks the server to pack. The server answers at once and collects in the
    /// background, so the report is empty.
    fn pack(&mut self) -> Result<PackReport> {
        self.send(b"P")?;
        match read_u8(&mut self.r)? {
            STATUS_OKAY => Ok(PackReport::default()),
            s => Err(protocol_error(format!("unexpected pack status {s:#04x}"))),
        }
    }

    fn close(&mut self) -> Result<()> {
        self.pending.clear();
        let _ = self.send(b".");
        Ok(())
    }
}
