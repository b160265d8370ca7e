//! The null server: the ceiling of the Python-client rows. It speaks the
//! Durus protocol with Durus's semantics (invalid sets, commit order), answers
//! loads from a hash map in memory and keeps commits there, never on disk.
//! Part of the benchmark only, not of the product.

use std::collections::{HashMap, HashSet};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::{Mutex, RwLock};

use crate::wire::{PROTOCOL, read_u8, read_u32, read_u64};

#[derive(Default)]
struct Shared {
    records: RwLock<HashMap<u64, Vec<u8>>>,
    invalid: Mutex<HashMap<u64, HashSet<u64>>>,
    commit: Mutex<()>,
    next_oid: AtomicU64,
    stop: AtomicBool,
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
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let next = records.keys().max().map_or(0, |m| m + 1);
        let shared = Arc::new(Shared {
            records: RwLock::new(records),
            next_oid: AtomicU64::new(next),
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
