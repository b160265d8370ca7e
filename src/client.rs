//! `ClientStorage`: a [`Storage`] on a Durus storage server (durus-redb's or
//! Durus's own), over TCP or a Unix socket.

use std::collections::HashSet;
use std::io::{BufReader, BufWriter, Read, Write};
use std::time::Duration;

use crate::error::{Conflict, Result, StorageError};
use crate::protocol::{
    LoadAnswer, PROTOCOL, ReadError, Request, STATUS_INVALID, STATUS_OKAY, encode_commit_data,
    read_bytes, read_oid, read_oids, read_u8, read_u32,
};
use crate::record::{Oid, Record};
use crate::storage::{PackReport, PendingCommit, Storage};
use crate::transport::{Address, Stream};

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
    pending: PendingCommit,
    oid_pool: Vec<Oid>,
    invalid: HashSet<Oid>,
}

impl std::fmt::Debug for ClientStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ClientStorage({})", self.address)
    }
}

fn protocol_error(what: impl Into<String>) -> StorageError {
    StorageError::protocol(what)
}

impl From<ReadError> for StorageError {
    fn from(e: ReadError) -> StorageError {
        match e {
            ReadError::Io(e) => StorageError::Io(e),
            ReadError::Invalid(why) => protocol_error(format!("the server sent {why}")),
        }
    }
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
        ClientStorage::start(address, stream)
    }

    /// Connects to a server whose TCP port speaks TLS (`serve --tls-cert`):
    /// its certificate is checked against the CA of `tls`, and the
    /// client's own certificate is shown when `tls` has one.
    #[cfg(feature = "tls")]
    pub fn connect_tls(address: Address, tls: &crate::tls::TlsClient) -> Result<ClientStorage> {
        let Address::Tcp { host, .. } = &address else {
            return Err(StorageError::Io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("TLS is spoken over TCP only, not on the Unix socket {address}"),
            )));
        };
        let stream = address.connect()?;
        let Stream::Tcp(sock) = stream else {
            unreachable!("a TCP address connects a TCP stream")
        };
        let tls = tls.connect(sock, host, Duration::from_secs(30))?;
        ClientStorage::start(address, Stream::Tls(tls))
    }

    fn start(address: Address, stream: Stream) -> Result<ClientStorage> {
        stream.set_read_timeout(Some(Duration::from_secs(120)))?;
        let mut c = ClientStorage {
            address,
            r: BufReader::new(stream.try_clone()?),
            w: BufWriter::new(stream),
            pending: PendingCommit::default(),
            oid_pool: Vec::new(),
            invalid: HashSet::new(),
        };
        c.send(&Request::Version(PROTOCOL))?;
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

    fn send(&mut self, request: &Request) -> Result<()> {
        self.w.write_all(&request.encode())?;
        self.w.flush()?;
        Ok(())
    }

    fn read_load(&mut self, oid: Oid) -> Result<Record> {
        match LoadAnswer::read(&mut self.r, oid)? {
            LoadAnswer::Record(r) => Ok(r),
            LoadAnswer::KeyError => Err(StorageError::NotFound(oid)),
            LoadAnswer::Invalid => Err(StorageError::ReadConflict(oid)),
        }
    }

    fn read_oid_list(&mut self) -> Result<Vec<Oid>> {
        Ok(read_oids(&mut self.r, u32::MAX as usize)?)
    }

    /// The live state of a durus-redb server (its own `X` request, which
    /// Durus's server does not know): one `name value` pair a line.
    pub fn server_state(&mut self) -> Result<String> {
        self.send(&Request::Stats)?;
        let n = read_u32(&mut self.r)? as usize;
        let bytes = read_bytes(&mut self.r, n)?;
        String::from_utf8(bytes).map_err(|e| StorageError::protocol(format!("live state: {e}")))
    }

    /// Every record of a durus-redb server, from one snapshot, in oid order
    /// (its own `Y` request, for backups): the record count, then the
    /// records as they arrive. Read the iterator to its end before using
    /// the connection again.
    pub fn snapshot(&mut self) -> Result<(u64, SnapshotRecords<'_>)> {
        self.send(&Request::Snapshot)?;
        let mut n = [0u8; 8];
        std::io::Read::read_exact(&mut self.r, &mut n)?;
        Ok((
            u64::from_be_bytes(n),
            SnapshotRecords {
                client: self,
                done: false,
            },
        ))
    }

    /// Asks the server to shut down (`Q`) and closes this connection.
    pub fn stop_server(mut self) -> Result<()> {
        self.send(&Request::Quit)?;
        // The server closes the connection; wait for that, briefly.
        let mut buf = [0u8; 1];
        let _ = self.r.read(&mut buf);
        Ok(())
    }
}

impl ClientStorage {
    /// A commit: refused when the invalidations the server sends in the
    /// commit order name an oid it stores, or (checked) one of `reads` or
    /// one kept from before and not synced yet.
    fn commit(&mut self, reads: Option<&[Oid]>) -> Result<()> {
        let pending = self.pending.take();
        self.send(&Request::Commit)?;
        let invalid = self.read_oid_list()?;
        let (earlier, reads): (Vec<Oid>, HashSet<Oid>) = match reads {
            Some(reads) => (
                self.invalid.iter().copied().collect(),
                reads.iter().copied().collect(),
            ),
            None => (Vec::new(), HashSet::new()),
        };
        let mut clash: Vec<Oid> = invalid
            .iter()
            .chain(&earlier)
            .copied()
            .filter(|o| pending.contains_key(o) || reads.contains(o))
            .collect();
        clash.sort_unstable();
        clash.dedup();
        self.invalid.extend(invalid);
        let data = if clash.is_empty() {
            encode_commit_data(pending.values())?
        } else {
            encode_commit_data([])?
        };
        self.w.write_all(&data)?;
        self.w.flush()?;
        if !clash.is_empty() {
            return Err(Conflict::Invalidated { oids: clash }.into());
        }
        if pending.is_empty() {
            return Ok(());
        }
        match read_u8(&mut self.r)? {
            STATUS_OKAY => Ok(()),
            STATUS_INVALID => Err(Conflict::Refused.into()),
            s => Err(protocol_error(format!("unexpected commit status {s:#04x}"))),
        }
    }
}

impl Storage for ClientStorage {
    fn load(&mut self, oid: Oid) -> Result<Record> {
        self.send(&Request::Load(oid))?;
        self.read_load(oid)
    }

    fn bulk_load(&mut self, oids: &[Oid]) -> Result<Vec<Record>> {
        self.send(&Request::BulkLoad(oids.to_vec()))?;
        // Read every answer before reporting the first failure, so the
        // connection stays in step.
        let answers: Vec<Result<Record>> = oids.iter().map(|&o| self.read_load(o)).collect();
        answers.into_iter().collect()
    }

    fn begin(&mut self) {
        self.pending.clear();
    }

    fn store(&mut self, oid: Oid, record: Vec<u8>) -> Result<()> {
        self.pending.store(oid, record)
    }

    fn end(&mut self) -> Result<()> {
        self.commit(None)
    }

    fn end_checked(&mut self, reads: &[Oid]) -> Result<()> {
        self.commit(Some(reads))
    }

    fn abort(&mut self) {
        self.pending.clear();
    }

    fn sync(&mut self) -> Result<Vec<Oid>> {
        self.send(&Request::Sync)?;
        let oids = self.read_oid_list()?;
        self.invalid.extend(oids);
        let mut all: Vec<Oid> = self.invalid.drain().collect();
        all.sort_unstable();
        Ok(all)
    }

    fn new_oid(&mut self) -> Result<Oid> {
        if self.oid_pool.is_empty() {
            self.send(&Request::NewOids(OID_POOL))?;
            let mut oids: Vec<Oid> = (0..OID_POOL)
                .map(|_| read_oid(&mut self.r))
                .collect::<std::io::Result<_>>()?;
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
        self.send(&Request::Pack)?;
        match read_u8(&mut self.r)? {
            STATUS_OKAY => Ok(PackReport::default()),
            s => Err(protocol_error(format!("unexpected pack status {s:#04x}"))),
        }
    }

    fn close(&mut self) -> Result<()> {
        self.pending.clear();
        let _ = self.send(&Request::Close(b'.'));
        Ok(())
    }
}

/// The records of a [`ClientStorage::snapshot`], in oid order.
#[derive(Debug)]
pub struct SnapshotRecords<'a> {
    client: &'a mut ClientStorage,
    done: bool,
}

impl Iterator for SnapshotRecords<'_> {
    type Item = Result<Record>;

    fn next(&mut self) -> Option<Result<Record>> {
        if self.done {
            return None;
        }
        let r = (|| -> Result<Option<Record>> {
            let n = read_u32(&mut self.client.r)? as usize;
            if n == 0 {
                return Ok(None);
            }
            let bytes = read_bytes(&mut self.client.r, n)?;
            let record = Record::from_bytes(bytes)
                .map_err(|e| StorageError::protocol(format!("snapshot: a bad record: {e}")))?;
            Ok(Some(record))
        })();
        match r {
            Ok(Some(record)) => Some(Ok(record)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
