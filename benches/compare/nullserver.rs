//! The null server: the ceiling of the Python-client rows. It speaks the
//! Durus protocol with Durus's semantics (invalid sets, commit order), answers
//! loads from a hash map in memory and keeps commits there, never on disk.
//! Part of the benchmark only, not of the product.
//!
//! [`NullServer::start_logged`] adds the one thing a durable commit cannot do
//! without: each commit's data is written to a log file under the commit
//! order and answered once an `fdatasync` covers it, one sync for every
//! commit that arrived while the last one ran (a group commit, led by one of
//! the waiting committers). It is the ceiling of a server that acknowledges
//! a commit only once it is on disk, on this machine's disk.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Condvar, Mutex, RwLock};

use crate::wire::{PROTOCOL, read_u8, read_u32, read_u64};

#[derive(Default)]
struct Shared {
    records: RwLock<HashMap<u64, Vec<u8>>>,
    invalid: Mutex<HashMap<u64, HashSet<u64>>>,
    commit: Mutex<()>,
    next_oid: AtomicU64,
    stop: AtomicBool,
    log: Option<Log>,
}

/// The log of [`NullServer::start_logged`]: a preallocated file written in
/// place (wrapping around at its end), as a real commit log is, so that a
/// sync flushes data blocks and not the file's size.
struct Log {
    file: File,
    /// Bytes written so far, and the number of the last commit written.
    written: Mutex<(u64, u64)>,
    /// The number of the last commit a sync covered.
    durable: AtomicU64,
    /// Whether a committer is syncing the file now.
    syncing: Mutex<bool>,
    synced: Condvar,
}

/// The size of the log file.
const LOG_BYTES: u64 = 64 << 20;

impl Log {
    fn create(path: &Path) -> io::Result<Log> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        let zeros = vec![0u8; 1 << 20];
        for i in 0..LOG_BYTES >> 20 {
            file.write_all_at(&zeros, i << 20)?;
        }
        file.sync_all()?;
        Ok(Log {
            file,
            written: Mutex::new((0, 0)),
            durable: AtomicU64::new(0),
            syncing: Mutex::new(false),
            synced: Condvar::new(),
        })
    }

    /// Writes one commit's data (under the commit order); its number.
    fn append(&self, data: &[u8]) -> io::Result<u64> {
        let mut w = self.written.lock();
        let mut at = w.0 % LOG_BYTES;
        if at + data.len() as u64 > LOG_BYTES {
            at = 0;
        }
        self.file.write_all_at(data, at)?;
        w.0 = at + data.len() as u64;
        w.1 += 1;
        Ok(w.1)
    }

    /// Returns once commit `seq` is on disk: the first committer to find
    /// no sync running syncs for everyone written so far.
    fn wait_durable(&self, seq: u64) -> io::Result<()> {
        let mut syncing = self.syncing.lock();
        loop {
            if self.durable.load(Ordering::Acquire) >= seq {
                return Ok(());
            }
            if !*syncing {
                *syncing = true;
                drop(syncing);
                let upto = self.written.lock().1;
                let r = self.file.sync_data();
                if r.is_ok() {
                    self.durable.fetch_max(upto, Ordering::AcqRel);
                }
                syncing = self.syncing.lock();
                *syncing = false;
                self.synced.notify_all();
                r?;
                continue;
            }
            self.synced.wait(&mut syncing);
        }
    }
}

/// A running null server.
pub struct NullServer {
    pub port: u16,
    shared: Arc<Shared>,
    accept: Option<JoinHandle<()>>,
}

impl NullServer {
    /// Starts a null server holding `records`.
    pub fn start(records: HashMap<u64, Vec<u8>>) -> io::Result<NullServer> {
        Self::launch(records, None)
    }

    /// Starts a null server that logs every commit to a file at `log` (made
    /// afresh) and answers it once the file is synced.
    pub fn start_logged(records: HashMap<u64, Vec<u8>>, log: &Path) -> io::Result<NullServer> {
        Self::launch(records, Some(Log::create(log)?))
    }

    fn launch(records: HashMap<u64, Vec<u8>>, log: Option<Log>) -> io::Result<NullServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let next = records.keys().max().map_or(0, |m| m + 1);
        let shared = Arc::new(Shared {
            records: RwLock::new(records),
            next_oid: AtomicU64::new(next),
            log,
            ..Shared::default()
        });
        let sh = shared.clone();
        let accept = std::thread::spawn(move || {
            let mut id = 0u64;
            for stream in listener.incoming() {
                if sh.stop.load(Ordering::Acquire) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                id += 1;
                sh.invalid.lock().insert(id, HashSet::new());
                let sh = sh.clone();
                std::thread::spawn(move || {
                    let _ = serve(&sh, id, stream);
                    sh.invalid.lock().remove(&id);
                });
            }
        });
        Ok(NullServer {
            port,
            shared,
            accept: Some(accept),
        })
    }
}

impl Drop for NullServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

fn serve(sh: &Shared, id: u64, stream: TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let mut r = BufReader::new(stream.try_clone()?);
    let mut w = BufWriter::new(stream);
    loop {
        let code = match read_u8(&mut r) {
            Ok(c) => c,
            Err(_) => return Ok(()),
        };
        match code {
            b'V' => {
                let p = read_u32(&mut r)?;
                w.write_all(&PROTOCOL.to_be_bytes())?;
                if p != PROTOCOL {
                    return w.flush();
                }
            }
            b'L' => {
                let oid = read_u64(&mut r)?;
                answer_load(sh, id, oid, &mut w)?;
            }
            b'B' => {
                let n = read_u32(&mut r)?;
                for _ in 0..n {
                    let oid = read_u64(&mut r)?;
                    answer_load(sh, id, oid, &mut w)?;
                }
            }
            b'N' | b'M' => {
                let n = if code == b'N' {
                    1
                } else {
                    read_u8(&mut r)? as u64
                };
                let start = sh.next_oid.fetch_add(n, Ordering::Relaxed);
                for oid in start..start + n {
                    w.write_all(&oid.to_be_bytes())?;
                }
            }
            b'S' => {
                let oids: Vec<u64> = sh
                    .invalid
                    .lock()
                    .get_mut(&id)
                    .map(|s| s.drain().collect())
                    .unwrap_or_default();
                write_oids(&mut w, &oids)?;
            }
            b'C' => {
                let _order = sh.commit.lock();
                let oids: Vec<u64> = sh
                    .invalid
                    .lock()
                    .get_mut(&id)
                    .map(|s| s.drain().collect())
                    .unwrap_or_default();
                write_oids(&mut w, &oids)?;
                w.flush()?;
                let len = read_u32(&mut r)? as usize;
                if len == 0 {
                    continue;
                }
                let mut data = vec![0u8; len];
                r.read_exact(&mut data)?;
                let mut i = 0;
                let mut stored = Vec::new();
                let mut records = sh.records.write();
                while i + 12 <= data.len() {
                    let rlen = u32::from_be_bytes(data[i..i + 4].try_into().unwrap()) as usize;
                    let oid = u64::from_be_bytes(data[i + 4..i + 12].try_into().unwrap());
                    let end = (i + 4 + rlen).min(data.len());
                    records.insert(oid, data[i + 12..end].to_vec());
                    stored.push(oid);
                    i = end;
                }
                drop(records);
                for (other, set) in sh.invalid.lock().iter_mut() {
                    if *other != id {
                        set.extend(stored.iter().copied());
                    }
                }
                if let Some(log) = &sh.log {
                    let seq = log.append(&data)?;
                    drop(_order);
                    log.wait_durable(seq)?;
                }
                w.write_all(b"O")?;
            }
            b'P' => w.write_all(b"O")?,
            _ => return Ok(()),
        }
        w.flush()?;
    }
}

fn answer_load(sh: &Shared, id: u64, oid: u64, w: &mut impl Write) -> io::Result<()> {
    if sh.invalid.lock().get(&id).is_some_and(|s| s.contains(&oid)) {
        return w.write_all(b"I");
    }
    match sh.records.read().get(&oid) {
        Some(rec) => {
            w.write_all(b"O")?;
            w.write_all(&(rec.len() as u32).to_be_bytes())?;
            w.write_all(rec)
        }
        None => w.write_all(b"K"),
    }
}

fn write_oids(w: &mut impl Write, oids: &[u64]) -> io::Result<()> {
    w.write_all(&(oids.len() as u32).to_be_bytes())?;
    for o in oids {
        w.write_all(&o.to_be_bytes())?;
    }
    Ok(())
}
