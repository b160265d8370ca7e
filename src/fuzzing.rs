//! Fuzz targets: each takes arbitrary bytes and must neither panic nor hang,
//! whatever they hold. Driven on stable Rust by `tests/fuzz.rs` (a mutation
//! fuzzer with a time budget, run by CI) and, where a nightly toolchain and
//! cargo-fuzz exist, by the libFuzzer targets in `fuzz/`. Not part of the
//! supported interface.

use std::io::{Cursor, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::checkpoint::{Durability, Manual};
use crate::filestorage::{ReadOptions, SourceEvent, open_source};
use crate::gc::ManualGc;
use crate::protocol::{Request, parse_commit, read_commit_data};
use crate::record::{Oid, Record, refs_of};
use crate::server::{Server, ServerConfig, ShutdownHandle};
use crate::storage::Storage;
use crate::store::{Options, RedbStorage};
use crate::transport::Address;

/// The record parser: `Record::check`, `Record::from_bytes` and the refs.
pub fn record(data: &[u8]) {
    let checked = Record::check(data);
    match Record::from_bytes(data.to_vec()) {
        Ok(r) => {
            assert!(checked.is_ok(), "from_bytes accepted what check refused");
            assert_eq!(Oid::from_slice(data), Some(r.oid()));
            let n = r.refs().count();
            assert_eq!(n, r.refs().len());
            assert_eq!(refs_of(data).map(|i| i.count()).ok(), Some(n));
        }
        Err(_) => assert!(checked.is_err(), "check accepted what from_bytes refused"),
    }
}

/// A commit's data as the server parses it (`parse_commit`), and as a frame
/// after `C` (`read_commit_data`, with a 1 MiB limit).
pub fn commit_data(data: &[u8]) {
    if let Ok(records) = parse_commit(data) {
        for (oid, r) in &records {
            assert_eq!(*oid, r.oid());
        }
    }
    let _ = read_commit_data(&mut Cursor::new(data), 1 << 20);
}

/// A stream of requests as a connection reads them: a command byte, then
/// its arguments, until the bytes end or a request is refused.
pub fn requests(data: &[u8]) {
    let mut r = Cursor::new(data);
    let mut code = [0u8; 1];
    while r.read_exact(&mut code).is_ok() {
        match Request::read_after(code[0], &mut r, 4096) {
            Ok(Request::Commit) => {
                if read_commit_data(&mut r, 1 << 20).is_err() {
                    break;
                }
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
}

/// A Durus storage file (SHELF-1, DFS20 or SQLite, by its first bytes)
/// read from end to end through `open_source`, with and without
/// `accept_torn_tail`. The reader must end: more events than the file
/// could hold is a hang.
pub fn durus_file(data: &[u8], scratch: &Path) {
    let path = scratch.join("fuzz-input.durus");
    std::fs::write(&path, data).expect("write the input file");
    for torn in [false, true] {
        let Ok(mut source) = open_source(&path, ReadOptions::default().with_torn_tail(torn)) else {
            continue;
        };
        let limit = 2 * data.len() as u64 + 16;
        let mut events = 0u64;
        let mut last_offset = 0u64;
        while let Ok(Some(e)) = source.next_event() {
            events += 1;
            assert!(
                events <= limit,
                "more than {limit} events from {} bytes",
                data.len()
            );
            match e {
                SourceEvent::Item(item) => {
                    let r = Record::from_bytes(item.record).expect("a checked record");
                    assert_eq!(r.oid(), item.oid);
                }
                SourceEvent::TransactionEnd { offset } | SourceEvent::SafePoint { offset } => {
                    assert!(offset >= last_offset, "offsets went back");
                    last_offset = offset;
                }
            }
        }
    }
}

/// SQLite rows of a Durus SqliteStorage: `data` is cut into rows (a 2-byte
/// id, a 2-byte length, that many record bytes), written to a real SQLite
/// file, and read back through `open_source`.
#[cfg(feature = "sqlite")]
pub fn sqlite_rows(data: &[u8], scratch: &Path) {
    let path = scratch.join("fuzz-input.sqlite");
    let _ = std::fs::remove_file(&path);
    {
        let conn = rusqlite::Connection::open(&path).expect("create the SQLite file");
        conn.execute_batch("CREATE TABLE objects (id INTEGER PRIMARY KEY, data BLOB); BEGIN")
            .expect("the table");
        let mut rest = data;
        while rest.len() >= 4 {
            let id = i64::from(i16::from_be_bytes([rest[0], rest[1]]));
            let len = (u16::from_be_bytes([rest[2], rest[3]]) as usize).min(rest.len() - 4);
            let blob = &rest[4..4 + len];
            rest = &rest[4 + len..];
            let _ = conn.execute(
                "INSERT OR REPLACE INTO objects (id, data) VALUES (?1, ?2)",
                rusqlite::params![id, blob],
            );
        }
        conn.execute_batch("COMMIT").expect("commit");
    }
    durus_file(&std::fs::read(&path).expect("read back"), scratch);
}

/// A durus-redb server in this process, on a Unix socket, to which every
/// input is sent as a whole connection: the version handshake, then the
/// input's bytes, then the end of the stream. Every answer is read until
/// the server closes the connection. `Q` ends only the connection.
pub struct ServerTarget {
    path: PathBuf,
    socket: PathBuf,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<crate::Result<()>>>,
}

impl ServerTarget {
    /// Serves a new store in `dir`.
    pub fn start(dir: &Path) -> ServerTarget {
        let path = dir.join("fuzz.redb");
        let socket = dir.join("fuzz.sock");
        let store = RedbStorage::open(
            &path,
            Options::new()
                .durability(Durability::Manual)
                .checkpoint(Manual)
                .gc(ManualGc),
        )
        .expect("open the store");
        let mut config = ServerConfig::new(Address::unix(&socket));
        config.allow_quit = false;
        config.request_timeout = Duration::from_secs(2);
        config.max_frame_bytes = 1 << 20;
        let server = Server::bind(&store, config).expect("bind");
        drop(store);
        let shutdown = server.shutdown_handle();
        let thread = std::thread::spawn(move || server.run());
        ServerTarget {
            path,
            socket,
            shutdown,
            thread: Some(thread),
        }
    }

    /// Sends one input as a connection and reads until the server closes it.
    pub fn run(&self, data: &[u8]) {
        use std::os::unix::net::UnixStream;
        let mut s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        s.set_write_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut all = Vec::with_capacity(5 + data.len());
        all.push(b'V');
        all.extend_from_slice(&crate::protocol::PROTOCOL.to_be_bytes());
        all.extend_from_slice(data);
        // The server may close early (a refused request): a failed write is
        // an answer too.
        let _ = s.write_all(&all);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut sink = [0u8; 8192];
        loop {
            match s.read(&mut sink) {
                Ok(0) => break,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!("the server neither answered nor closed within 10 s")
                }
                Err(_) => break,
            }
        }
    }

    /// Stops the server; then the store must be whole: no panic in any
    /// connection, every reference resolves, every count matches. Returns
    /// how many commits the inputs made.
    pub fn finish(mut self) -> Result<u64, String> {
        let (panics, commits) = {
            let mut c = crate::client::ClientStorage::connect(Address::unix(&self.socket))
                .map_err(|e| e.to_string())?;
            let state = c.server_state().map_err(|e| e.to_string())?;
            let value = |key: &str| {
                state
                    .lines()
                    .find_map(|l| l.strip_prefix(key)?.strip_prefix(' '))
                    .and_then(|v| v.parse::<u64>().ok())
                    .ok_or(format!("no {key} in the live state: {state}"))
            };
            (value("connection_panics")?, value("commits_total")?)
        };
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            t.join()
                .map_err(|_| "the server thread panicked".to_string())?
                .map_err(|e| e.to_string())?;
        }
        if panics > 0 {
            return Err(format!("{panics} connections ended by a panic"));
        }
        let mut store = RedbStorage::open(&self.path, Options::new().gc(ManualGc))
            .map_err(|e| e.to_string())?;
        let report = store.check_references().map_err(|e| e.to_string())?;
        store.close().map_err(|e| e.to_string())?;
        if !report.is_clean() {
            return Err(format!("the store is not whole: {report:?}"));
        }
        Ok(commits)
    }
}

impl Drop for ServerTarget {
    fn drop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A commit's data as a client sends it after `C`: its length, then
/// `u32 rlen | oid | record` for each record.
pub fn commit_frame(records: &[Record]) -> Vec<u8> {
    crate::protocol::encode_commit_data(records).expect("a small commit")
}

/// Seeds for [`ServerTarget::run`]: request streams a Durus client sends.
pub fn server_seeds() -> Vec<Vec<u8>> {
    fn commit(records: &[(u64, &[u8], &[u64])]) -> Vec<u8> {
        let records: Vec<Record> = records
            .iter()
            .map(|(oid, data, refs)| {
                let refs: Vec<Oid> = refs.iter().map(|r| Oid(*r)).collect();
                Record::new(Oid(*oid), data, &refs)
            })
            .collect();
        let mut out = vec![b'C'];
        out.extend(commit_frame(&records));
        out
    }
    let mut create_root = vec![b'N'];
    create_root.extend(commit(&[(0, b"root", &[])]));
    // Rewrites of the root commit whatever came before; the oids `M` hands
    // out are not known in advance, so a commit naming them is refused.
    let mut update = b"M\x02S".to_vec();
    update.extend(commit(&[(0, b"root again", &[])]));
    update.extend(commit(&[(0, &[0x80; 30], &[0])]));
    let mut loads = b"L\0\0\0\0\0\0\0\0B\0\0\0\x02".to_vec();
    loads.extend_from_slice(&0u64.to_be_bytes());
    loads.extend_from_slice(&1u64.to_be_bytes());
    vec![
        create_root,
        update,
        loads,
        b"SXY.".to_vec(),
        b"C\0\0\0\0P".to_vec(),
    ]
}

/// The commit log's replay: each input becomes the only segment of the
/// log of a store image taken while commits were being logged, and the
/// store is opened for writing (which replays it). The open must succeed
/// or fail with an error, never panic; a store that opens must check clean.
pub struct LogReplayTarget {
    dir: PathBuf,
    image: PathBuf,
    segment: std::ffi::OsString,
    seed: Vec<u8>,
}

impl LogReplayTarget {
    /// Makes the image in `dir`: a store with a root and a few objects
    /// whose last commits are only in its log.
    pub fn new(dir: &Path) -> LogReplayTarget {
        use crate::engine::log::log_dir;
        let path = dir.join("source.redb");
        let mut s = RedbStorage::open(
            &path,
            Options::new()
                .durability(Durability::Fsync)
                .checkpoint(Manual)
                .gc(ManualGc),
        )
        .expect("open the source store");
        let root = s.new_oid().expect("the root oid");
        let oids = s.new_oids(4).expect("oids");
        for (i, o) in oids.iter().enumerate() {
            s.begin();
            s.store(*o, Record::new(*o, &[i as u8; 9], &[]).into_bytes())
                .expect("store");
            s.store(root, Record::new(root, b"root", &oids[..=i]).into_bytes())
                .expect("store the root");
            s.end().expect("commit");
        }
        // The image: the file and the log as a crash would leave them.
        let image = dir.join("image.redb");
        std::fs::copy(&path, &image).expect("copy the store file");
        let segment = std::fs::read_dir(log_dir(&path))
            .expect("the log directory")
            .flatten()
            .map(|e| e.file_name())
            .min()
            .expect("a segment");
        let seed = std::fs::read(log_dir(&path).join(&segment)).expect("read the segment");
        drop(s);
        let target = LogReplayTarget {
            dir: dir.to_path_buf(),
            image,
            segment,
            seed,
        };
        // Without its log the image lacks the last commits; the seed
        // replays them: every commit of the source is back.
        target.run(&[]);
        let mut s = RedbStorage::open(target.dir.join("work/s.redb"), Options::new().gc(ManualGc))
            .expect("the image without its log");
        let without = s.load(root).map(|r| r.refs().count()).unwrap_or(0);
        s.close().expect("close");
        assert!(without < 4, "the image holds every commit without its log");
        target.run(&target.seed);
        let mut s = RedbStorage::open(target.dir.join("work/s.redb"), Options::new().gc(ManualGc))
            .expect("the replayed image");
        let refs = s.load(root).expect("the root").refs().count();
        assert_eq!(refs, 4, "the seed segment did not replay its four commits");
        s.close().expect("close");
        target
    }

    /// The segment the source store wrote: four logged commits.
    pub fn seed(&self) -> Vec<u8> {
        self.seed.clone()
    }

    /// Replays `data` as the log of a fresh copy of the image.
    pub fn run(&self, data: &[u8]) {
        use crate::engine::log::log_dir;
        let work = self.dir.join("work");
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).expect("a work directory");
        let path = work.join("s.redb");
        std::fs::copy(&self.image, &path).expect("copy the image");
        std::fs::create_dir_all(log_dir(&path)).expect("the log directory");
        std::fs::write(log_dir(&path).join(&self.segment), data).expect("write the segment");
        if let Ok(mut s) = RedbStorage::open(&path, Options::new().gc(ManualGc)) {
            let report = s.check_references().expect("check a replayed store");
            assert!(
                report.is_clean(),
                "a replayed store is not whole: {report:?}"
            );
            s.close().expect("close");
        }
    }
}
