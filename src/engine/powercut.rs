//! Simulated power cuts: the store file lives on a simulated disk that keeps
//! what was written and, apart, what the last `sync_data` made durable; the
//! commit log's segment files record the same of the writes and syncs the
//! log issues (`log::writer::SegFile`), independently of the log's own
//! bookkeeping. A power cut leaves the durable image of the file and of
//! every segment, with every unsynced byte lost (the worst case; partly
//! written tails are the replay tests' business). Cuts are taken at any
//! instant, with no lock held: also inside a checkpoint's segment switch or
//! durable flush.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use parking_lot::Mutex;

use super::{Engine, EngineConfig, log};
use crate::checkpoint::{Durability, Periodic};
use crate::record::{Oid, Record};

/// Held (read) by every write and sync of a simulated disk, and (write)
/// while a cut takes its images: a cut is one instant for the store file
/// and every segment alike. (Taken one file after another, a segment could
/// be read before a sync and the next one after it: a log no power cut
/// leaves.)
pub(crate) static INSTANT: parking_lot::RwLock<()> = parking_lot::RwLock::new(());

/// A disk: what was written, and what the last sync made durable.
#[derive(Debug, Default)]
pub(crate) struct Disk {
    live: Mutex<Vec<u8>>,
    durable: Mutex<Vec<u8>>,
}

impl Disk {
    /// A disk holding `image`, all of it durable (after a power cut).
    fn with(image: Vec<u8>) -> Disk {
        Disk {
            live: Mutex::new(image.clone()),
            durable: Mutex::new(image),
        }
    }
}

/// The redb backend of a [`Disk`].
#[derive(Debug)]
pub(crate) struct DiskBackend(pub(crate) Arc<Disk>);

impl redb::StorageBackend for DiskBackend {
    fn len(&self) -> std::result::Result<u64, std::io::Error> {
        Ok(self.0.live.lock().len() as u64)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::result::Result<(), std::io::Error> {
        let live = self.0.live.lock();
        let start = offset as usize;
        let end = start + out.len();
        if end > live.len() {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        out.copy_from_slice(&live[start..end]);
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::result::Result<(), std::io::Error> {
        let _instant = INSTANT.read();
        self.0.live.lock().resize(len as usize, 0);
        Ok(())
    }

    fn sync_data(&self) -> std::result::Result<(), std::io::Error> {
        let _instant = INSTANT.read();
        let live = self.0.live.lock().clone();
        *self.0.durable.lock() = live;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::result::Result<(), std::io::Error> {
        let _instant = INSTANT.read();
        let mut live = self.0.live.lock();
        let start = offset as usize;
        if live.len() < start + data.len() {
            live.resize(start + data.len(), 0);
        }
        live[start..start + data.len()].copy_from_slice(data);
        Ok(())
    }
}

/// What a power cut left: the file's durable image, the log's, and what
/// the engine had acknowledged and made durable by then.
struct Cut {
    file: Vec<u8>,
    log: Vec<(std::ffi::OsString, Vec<u8>)>,
    /// Commits acknowledged (their sequence numbers are 1..=acked).
    acked: u64,
    /// Commits the engine counted durable (log synced or checkpointed).
    durable: u64,
}

fn config(durability: Durability, disk: Arc<Disk>) -> EngineConfig {
    EngineConfig {
        read_only: false,
        create: true,
        durability,
        // Checkpoints every few commits, in the background: the cuts fall
        // before, during and after them.
        checkpoint: Arc::new(Periodic::new(Duration::from_millis(20), 15, u64::MAX)),
        cache_bytes: 4 << 20,
        quick_repair: true,
        importing: false,
        checking: false,
        accept_log_damage: false,
        disk: Some(disk),
    }
}

fn record(oid: Oid, n: u64) -> Record {
    Record::new(oid, &n.to_be_bytes(), &[])
}

/// Commits `commits` single-object commits (commit n stores oid n with data
/// n), cutting the power every `every` commits; then restores each cut and
/// checks it against what was acknowledged.
fn run(durability: Durability, commits: u64, every: u64) -> Vec<(u64, u64, u64)> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let disk = Arc::new(Disk::default());
    let engine = Engine::open(&path, &config(durability, disk.clone())).unwrap();
    let (session, _) = engine.register_session();
    let oids = engine.allocate(session, commits as usize + 1).unwrap();
    assert_eq!(oids[0], Oid::ROOT);
    let mut cuts = Vec::new();
    for n in 1..=commits {
        let oid = oids[n as usize];
        let records = BTreeMap::from([(oid, record(oid, n))]);
        engine.commit(session, &records).unwrap();
        if n % every == 0 {
            // A cut at this instant, whatever the background checkpoints
            // are doing. What the engine counted durable is read first, then
            // the log's image, then the file's: each only grows, so each
            // holds at least what was durable when the one before was read.
            let durable = engine.sync.log_durable();
            let (log, file) = {
                let _instant = INSTANT.write();
                let log = engine.sync.log().unwrap().power_cut_image();
                (log, disk.durable.lock().clone())
            };
            cuts.push(Cut {
                file,
                log,
                acked: n,
                durable,
            });
        }
        if n % 7 == 0 {
            std::thread::sleep(Duration::from_millis(3));
        }
    }
    drop(engine);
    let mut seen = Vec::new();
    for (i, cut) in cuts.into_iter().enumerate() {
        let at = dir.path().join(format!("cut{i}.redb"));
        let logdir = log::log_dir(&at);
        std::fs::create_dir_all(&logdir).unwrap();
        for (name, data) in &cut.log {
            std::fs::write(logdir.join(name), data).unwrap();
        }
        let restored = Arc::new(Disk::with(cut.file));
        let engine = Engine::open(&at, &config(durability, restored)).unwrap();
        let mut present = 0;
        for n in 1..=cut.acked {
            match engine.load(oids[n as usize]) {
                Ok(r) => {
                    assert_eq!(r, record(oids[n as usize], n), "cut {i}: commit {n}");
                    assert_eq!(
                        present,
                        n - 1,
                        "cut {i}: commit {n} survived, an earlier one not"
                    );
                    present = n;
                }
                Err(crate::StorageError::NotFound(_)) => {}
                Err(e) => panic!("cut {i}: {e}"),
            }
        }
        assert!(
            present >= cut.durable,
            "cut {i}: {present} of {} acknowledged commits survived, but {} were durable",
            cut.acked,
            cut.durable
        );
        seen.push((cut.acked, cut.durable, present));
    }
    seen
}

#[test]
fn fsync_loses_no_acknowledged_commit_in_a_power_cut() {
    let seen = run(Durability::Fsync, 240, 13);
    assert!(seen.len() >= 15);
    for (acked, durable, present) in seen {
        assert_eq!(present, acked, "Fsync lost an acknowledged commit");
        assert_eq!(
            durable, acked,
            "Fsync acknowledged a commit before it was durable"
        );
    }
}

#[test]
fn os_loses_at_most_the_commits_since_its_last_sync_in_a_power_cut() {
    let seen = run(
        Durability::Os {
            fsync_interval: Duration::from_millis(25),
        },
        240,
        13,
    );
    assert!(seen.len() >= 15);
    // The log syncs every 25 ms, so some cuts lose acknowledged commits:
    // the window is real, and bounded by the syncs.
    assert!(
        seen.iter().any(|(acked, _, present)| present < acked),
        "Os never lost an acknowledged commit: is the power cut simulated? {seen:?}"
    );
}

#[test]
fn without_the_log_fsync_acknowledged_commits_are_lost() {
    // The simulation can fail: drop the log's sync (Os with a sync interval
    // longer than the run, and checkpoints every 15 commits) and cuts lose
    // commits that were acknowledged.
    let seen = run(
        Durability::Os {
            fsync_interval: Duration::from_secs(3600),
        },
        120,
        13,
    );
    assert!(
        seen.iter().any(|(acked, _, present)| present < acked),
        "{seen:?}"
    );
}

/// Several committers at once, so that commits wait for group syncs led by
/// others (the path a single committer never takes): power cuts taken while
/// they commit lose no commit whose `commit` had returned before the cut.
/// Through the library (each commit applied in its turn) and through the
/// server's line (commits placed in the order, several applied together in
/// one redb transaction).
#[test]
fn fsync_loses_no_acknowledged_commit_of_concurrent_committers_in_a_power_cut() {
    for through_line in [false, true] {
        concurrent_committers_in_a_power_cut(through_line);
    }
}

fn concurrent_committers_in_a_power_cut(through_line: bool) {
    const THREADS: usize = 4;
    const EACH: usize = 150;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.redb");
    let disk = Arc::new(Disk::default());
    let engine = Arc::new(Engine::open(&path, &config(Durability::Fsync, disk.clone())).unwrap());
    // Every commit returned so far: (oid, data).
    let acked: Arc<Mutex<Vec<(Oid, u64)>>> = Arc::default();
    let done = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let workers: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, acked, done) = (engine.clone(), acked.clone(), done.clone());
            std::thread::spawn(move || {
                let (session, _) = engine.register_session();
                let oids = engine.allocate(session, EACH).unwrap();
                for (i, &oid) in oids.iter().enumerate() {
                    let n = (t * EACH + i) as u64;
                    let records = BTreeMap::from([(oid, record(oid, n))]);
                    if through_line {
                        // The order released before the apply, as the
                        // server does: commits gather in the line.
                        let placed = engine.lock_order().place(session, records);
                        let ticket = match placed {
                            crate::engine::Placed::Turn(turn) => turn.apply(),
                            crate::engine::Placed::Applied(r) => r,
                        };
                        engine.finish(ticket.unwrap()).unwrap();
                    } else {
                        engine.commit(session, &records).unwrap();
                    }
                    acked.lock().push((oid, n));
                }
                done.fetch_add(1, Ordering::AcqRel);
            })
        })
        .collect();
    // Cuts while they commit: the acknowledged set first, then the images
    // (what is acknowledged by then was durable before it was).
    let mut cuts = Vec::new();
    while done.load(Ordering::Acquire) < THREADS {
        std::thread::sleep(Duration::from_micros(700));
        let acked = acked.lock().clone();
        let (log, file) = {
            let _instant = INSTANT.write();
            let log = engine.sync.log().unwrap().power_cut_image();
            (log, disk.durable.lock().clone())
        };
        cuts.push((acked, file, log));
    }
    for w in workers {
        w.join().unwrap();
    }
    drop(engine);
    assert!(cuts.len() >= 10, "only {} cuts", cuts.len());
    for (i, (acked, file, log_image)) in cuts.into_iter().enumerate() {
        let at = dir.path().join(format!("cut{i}.redb"));
        let logdir = log::log_dir(&at);
        std::fs::create_dir_all(&logdir).unwrap();
        for (name, data) in &log_image {
            std::fs::write(logdir.join(name), data).unwrap();
        }
        let engine =
            Engine::open(&at, &config(Durability::Fsync, Arc::new(Disk::with(file)))).unwrap();
        for &(oid, n) in &acked {
            match engine.load(oid) {
                Ok(r) => assert_eq!(r, record(oid, n), "cut {i}"),
                Err(e) => panic!(
                    "cut {i}: acknowledged commit {n} ({} acknowledged then) lost: {e}",
                    acked.len()
                ),
            }
        }
    }
}
