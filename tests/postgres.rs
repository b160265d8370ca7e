//! `serve --database` against crashes: a PostgreSQL cluster of the test's
//! own (its postmaster a child of this process, so that a kill -9 can take
//! it and its backends at once, as a crash of its machine would), and
//! front ends killed with -9. No acknowledged commit may be lost.

mod common;
use common::OutputWithin;

use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

use durus_redb::{ClientStorage, Oid, Record, Storage};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_durus-redb"))
}

/// The PostgreSQL server programs (the Debian layout, or pg_config's).
fn pg_bin(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.flatten().map(|e| e.path().join("bin")).collect())
        .unwrap_or_default();
    dirs.sort();
    if let Some(d) = dirs.iter().rev().find(|d| d.join(name).exists()) {
        return d.join(name);
    }
    let out = Command::new("pg_config").arg("--bindir").output();
    match out {
        Ok(o) if o.status.success() => {
            PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()).join(name)
        }
        _ => panic!("no PostgreSQL server installed ({name} not found): install postgresql"),
    }
}

/// The uid and gid the cluster runs as: `postgres` when this is root
/// (initdb refuses root), else this user.
fn cluster_user() -> Option<(u32, u32)> {
    let me = Command::new("id").arg("-u").output_within(common::LIMIT);
    if String::from_utf8_lossy(&me.stdout).trim() != "0" {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let o = Command::new("id")
            .args([flag, "postgres"])
            .output_within(common::LIMIT);
        assert!(
            o.status.success(),
            "running as root needs a `postgres` user"
        );
        String::from_utf8_lossy(&o.stdout).trim().parse().unwrap()
    };
    Some((id("-u"), id("-g")))
}

fn as_cluster_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = cluster_user() {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// A cluster whose postmaster is this process's child, in a process group
/// of its own (with its backends).
struct Cluster {
    dir: PathBuf,
    port: u16,
    postmaster: Option<Child>,
}

impl Cluster {
    fn create(dir: &Path) -> Cluster {
        Cluster::create_with(dir, |_| {})
    }

    /// [`create`](Self::create), with `setup` given the data directory
    /// before the first start.
    fn create_with(dir: &Path, setup: impl FnOnce(&Path)) -> Cluster {
        let dir = dir.join("pg");
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = cluster_user() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
            std::os::unix::fs::chown(dir.parent().unwrap(), Some(uid), Some(gid)).unwrap();
        }
        let out = as_cluster_user(
            Command::new(pg_bin("initdb"))
                .arg("-D")
                .arg(dir.join("data"))
                .args([
                    "-U",
                    "postgres",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--auth=trust",
                ]),
        )
        .output_within(common::LIMIT);
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let mut c = Cluster {
            dir,
            port,
            postmaster: None,
        };
        setup(&c.dir.join("data"));
        c.start();
        c
    }

    /// A standby of `primary`, streaming from it (pg_basebackup -R), in
    /// `dir`, started on `port` (a free one if `None`).
    fn standby_of(primary: &Cluster, dir: &Path, name: &str, port: Option<u16>) -> Cluster {
        let dir = dir.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        if let Some((uid, gid)) = cluster_user() {
            std::os::unix::fs::chown(&dir, Some(uid), Some(gid)).unwrap();
        }
        let out = as_cluster_user(
            Command::new(pg_bin("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-p", &primary.port.to_string()])
                .args(["-U", "postgres", "-X", "stream", "-c", "fast", "-R", "-D"])
                .arg(dir.join("data")),
        )
        .output_within(common::LIMIT);
        assert!(
            out.status.success(),
            "pg_basebackup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        });
        let mut c = Cluster {
            dir,
            port,
            postmaster: None,
        };
        c.start();
        c
    }

    fn start(&mut self) {
        let child = as_cluster_user(
            Command::new(pg_bin("postgres"))
                .arg("-D")
                .arg(self.dir.join("data"))
                .args(["-c", "listen_addresses=127.0.0.1"])
                .args(["-p", &self.port.to_string()])
                .arg("-k")
                .arg(&self.dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0),
        )
        .spawn()
        .expect("start postgres");
        self.postmaster = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while postgres::Client::connect(&self.url("postgres"), postgres::NoTls).is_err() {
            assert!(Instant::now() < deadline, "postgres did not start in 60 s");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Makes the standby synchronous, and waits until it is and has
    /// flushed all the WAL written so far: commits acknowledged before
    /// (while this primary, just promoted, had no synchronous standby) are
    /// then on it too, and a crash right after loses none of them.
    fn synchronous(&self) {
        let mut c = postgres::Client::connect(&self.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute("ALTER SYSTEM SET synchronous_standby_names = '*'")
            .unwrap();
        c.batch_execute("SELECT pg_reload_conf()").unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut written: Option<String> = None;
        loop {
            let row = c
                .query_opt(
                    "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync'",
                    &[],
                )
                .unwrap();
            if row.is_some() && written.is_none() {
                // The standby shows as synchronous once the walsender has
                // read the new setting; commits wait for it once the
                // checkpointer has (woken by the same reload): a moment
                // later. What was written until then is waited for below.
                std::thread::sleep(Duration::from_secs(1));
                written = Some(
                    c.query_one("SELECT pg_current_wal_lsn()::text", &[])
                        .unwrap()
                        .get(0),
                );
            }
            if let Some(lsn) = &written {
                let flushed = c
                    .query_opt(
                        "SELECT 1 FROM pg_stat_replication WHERE sync_state = 'sync' \
                         AND flush_lsn >= $1::text::pg_lsn",
                        &[lsn],
                    )
                    .unwrap();
                if flushed.is_some() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the standby never became synchronous"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn url(&self, db: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// kill -9 of the postmaster and every backend, then waits for them.
    fn crash(&mut self) {
        let mut child = self.postmaster.take().expect("running");
        let group = child.id() as i32;
        let status = Command::new("kill")
            .args(["-9", "--", &format!("-{group}")])
            .status()
            .unwrap();
        assert!(status.success());
        child.wait().unwrap();
        // The backends are gone once the port no longer answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "postgres still answers after kill -9"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.postmaster.is_some() {
            self.crash();
        }
    }
}

/// A front end (`durus-redb serve --database`), killed on drop. It holds
/// the database alone (answering loads and syncs from memory) half a
/// second after no other front end committed, so the crash tests go
/// through that too: a front end killed while it holds it is taken over
/// by the next one's first commit, and the acknowledged commits are
/// loaded back through a front end alone.
struct FrontEnd {
    child: Child,
    port: u16,
    /// What it logged (after "Ready"), for a failure's message.
    log: Arc<Mutex<Vec<String>>>,
}

impl FrontEnd {
    fn start(url: &str) -> FrontEnd {
        let mut child = Command::new(bin())
            .args(["serve", "--database", url, "--port", "0"])
            .args(["--alone-after", "0.5"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let into = log.clone();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sent {
                    into.lock().unwrap().push(line);
                    continue;
                }
                if let Some(port) = common::ready_port(&line) {
                    let _ = tx.send(port);
                    sent = true;
                }
            }
        });
        let port = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the front end is ready within 30 s");
        FrontEnd { child, port, log }
    }

    /// Its warnings and errors so far.
    fn complaints(&self) -> String {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("WARN") || l.contains("ERROR"))
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for FrontEnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Commits one new object after another through `port` until `stop`, each
/// holding its sequence number; records every commit acknowledged. Errors
/// (the database or the front end down) are retried on a new connection.
fn committer(port: Arc<Mutex<u16>>, stop: Arc<AtomicBool>, acked: Arc<Mutex<Vec<(Oid, u64)>>>) {
    let mut n = 0u64;
    let mut client: Option<ClientStorage> = None;
    while !stop.load(Ordering::Relaxed) {
        let c = match &mut client {
            Some(c) => c,
            None => {
                let p = *port.lock().unwrap();
                match ClientStorage::connect_tcp("127.0.0.1", p) {
                    Ok(c) => client.insert(c),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                }
            }
        };
        n += 1;
        let result = (|| {
            let oid = c.new_oid()?;
            c.begin();
            c.store(oid, Record::new(oid, &n.to_be_bytes(), &[]).into_bytes())?;
            c.end()?;
            Ok::<Oid, durus_redb::StorageError>(oid)
        })();
        match result {
            Ok(oid) => acked.lock().unwrap().push((oid, n)),
            Err(_) => {
                client = None;
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Every acknowledged commit loads, with its own sequence number.
/// Loads a thousand at a time (a bulk load each: the list grows with every
/// round and every commit), and one by one where a bulk load fails, to
/// name the commit lost.
fn assert_all_there(front: &FrontEnd, acked: &[(Oid, u64)]) {
    let mut c = ClientStorage::connect_tcp("127.0.0.1", front.port).unwrap();
    for part in acked.chunks(1000) {
        let oids: Vec<Oid> = part.iter().map(|(o, _)| *o).collect();
        let records = match c.bulk_load(&oids) {
            Ok(records) => records,
            Err(_) => part
                .iter()
                .map(|(oid, n)| {
                    c.load(*oid).unwrap_or_else(|e| {
                        panic!(
                            "acknowledged commit {n} (oid {oid}) is lost: {e}; the front end \
                             said:\n{}",
                            front.complaints()
                        )
                    })
                })
                .collect(),
        };
        assert_eq!(records.len(), part.len());
        for ((oid, n), record) in part.iter().zip(&records) {
            assert_eq!(record.oid(), *oid);
            assert_eq!(record.data(), n.to_be_bytes(), "oid {oid}");
        }
    }
}

/// Rounds of a crash test: `DURUS_PG_CRASH_ROUNDS` (for a longer run),
/// else `default`.
fn rounds(default: usize) -> usize {
    std::env::var("DURUS_PG_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Committers running against a front end whose port may change.
struct Load {
    port: Arc<Mutex<u16>>,
    stop: Arc<AtomicBool>,
    acked: Arc<Mutex<Vec<(Oid, u64)>>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(port: u16, committers: usize) -> Load {
        let port = Arc::new(Mutex::new(port));
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(Mutex::new(Vec::new()));
        let workers = (0..committers)
            .map(|_| {
                let (port, stop, acked) = (port.clone(), stop.clone(), acked.clone());
                std::thread::spawn(move || committer(port, stop, acked))
            })
            .collect();
        Load {
            port,
            stop,
            acked,
            workers,
        }
    }

    fn count(&self) -> usize {
        self.acked.lock().unwrap().len()
    }

    /// Waits for 50 more commits than `than` (at most 90 s: longer than
    /// a commit can wait for a batch, 60 s), showing the front end's
    /// complaints if they do not come.
    fn wait_for_more(&self, than: usize, front: &FrontEnd, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(90);
        while self.count() < than + 50 {
            assert!(
                Instant::now() < deadline,
                "{what}: commits stopped being acknowledged ({} since); the front end said:\n{}",
                self.count() - than,
                front.complaints()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> Vec<(Oid, u64)> {
        self.stop.store(true, Ordering::Relaxed);
        for w in self.workers {
            w.join().unwrap();
        }
        std::mem::take(&mut *self.acked.lock().unwrap())
    }
}

/// `durus-redb check URL` is clean.
fn check_clean(url: &str) {
    let out = Command::new(bin())
        .arg("check")
        .arg(url)
        .output_within(common::LIMIT);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.contains("result:     clean"),
        "{text}"
    );
}

/// 16 connections commit throughout. kill -9 of PostgreSQL (postmaster and
/// backends) and a restart, 10 rounds: the same front end goes on. kill -9
/// of the front end and a new one, 20 rounds. Both at once, once. Nothing
/// acknowledged is lost, no oid is handed out twice, `check` is clean.
#[test]
fn acknowledged_commits_survive_kill_9_of_postgres_and_of_the_front_end() {
    let dir = tempfile::tempdir().unwrap();
    let mut cluster = Cluster::create(dir.path());
    let url = cluster.url("postgres");
    let mut front = FrontEnd::start(&url);
    let load = Load::start(front.port, 16);
    load.wait_for_more(0, &front, "at the start");

    for round in 0..rounds(10) {
        cluster.crash();
        let at_crash = load.count();
        std::thread::sleep(Duration::from_millis(100 + 37 * (round as u64 % 7)));
        cluster.start();
        load.wait_for_more(at_crash, &front, &format!("PostgreSQL round {round}"));
    }
    assert_all_there(&front, &load.acked.lock().unwrap());

    for round in 0..rounds(20) {
        let before = load.count();
        front.kill();
        front = FrontEnd::start(&url);
        *load.port.lock().unwrap() = front.port;
        load.wait_for_more(before, &front, &format!("front end round {round}"));
    }

    // Both at once.
    let before = load.count();
    front.kill();
    cluster.crash();
    cluster.start();
    let front = FrontEnd::start(&url);
    *load.port.lock().unwrap() = front.port;
    load.wait_for_more(before, &front, "both");

    let acked = load.stop();
    assert!(acked.len() > 1000, "{} commits acknowledged", acked.len());
    assert_all_there(&front, &acked);
    // And no oid was handed out twice.
    let mut oids: Vec<Oid> = acked.iter().map(|(o, _)| *o).collect();
    oids.sort_unstable();
    oids.dedup();
    assert_eq!(oids.len(), acked.len(), "an oid was handed out twice");
    drop(front);
    check_clean(&url);
}

/// A primary with a synchronous standby; the front end is given both
/// hosts with `target_session_attrs=read-write`. The primary is killed
/// (-9, with its backends) while 16 connections commit, the standby
/// promoted: the same front end goes on through it, and every commit
/// acknowledged before the failover is there. Then a new standby takes
/// the dead primary's place (and port) and the next round fails over
/// back: 10 rounds.
#[test]
fn acknowledged_commits_survive_the_loss_of_the_primary_with_a_synchronous_standby() {
    let dir = tempfile::tempdir().unwrap();
    let mut primary = Cluster::create(dir.path());
    let mut standby = Cluster::standby_of(&primary, dir.path(), "standby-0", None);
    primary.synchronous();
    let url = format!(
        "postgresql://postgres@127.0.0.1:{},127.0.0.1:{}/postgres?target_session_attrs=read-write",
        primary.port, standby.port
    );
    let front = FrontEnd::start(&url);
    let load = Load::start(front.port, 16);
    load.wait_for_more(0, &front, "at the start");
    for round in 0..rounds(10) {
        primary.crash();
        let at_failover = load.acked.lock().unwrap().clone();
        let mut c = postgres::Client::connect(&standby.url("postgres"), postgres::NoTls).unwrap();
        c.batch_execute("SELECT pg_promote()").unwrap();
        load.wait_for_more(
            at_failover.len(),
            &front,
            &format!("failover round {round}"),
        );
        // Everything acknowledged before the primary died is on the standby.
        assert_all_there(&front, &at_failover);
        // A new standby where the old primary was, and back again next round.
        let port = primary.port;
        drop(primary);
        let next = Cluster::standby_of(
            &standby,
            dir.path(),
            &format!("standby-{}", round + 1),
            Some(port),
        );
        primary = standby;
        standby = next;
        primary.synchronous();
    }
    let acked = load.stop();
    assert_all_there(&front, &acked);
    drop(front);
    check_clean(&primary.url("postgres"));
}

/// A file of the cluster: owned by its user, readable by it alone.
fn cluster_file(path: &Path, text: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    if let Some((uid, gid)) = cluster_user() {
        std::os::unix::fs::chown(path, Some(uid), Some(gid)).unwrap();
    }
}

/// TLS to the database: a cluster that admits the user `durus` only over
/// TLS with a client certificate of its CA (pg_hba `hostssl ... cert`).
/// `serve`, `check` and `migrate` reach it with libpq's parameters
/// (`sslmode=verify-full`, `sslrootcert`, `sslcert`, `sslkey`); every
/// connection of the front end is encrypted (pg_stat_ssl); without TLS, or
/// trusting another CA, they are refused with the reason.
#[test]
fn the_database_is_reached_over_tls_with_a_client_certificate() {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
    let dir = tempfile::tempdir().unwrap();
    let ca = |name: &str| {
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let pem = p.self_signed(&key).unwrap().pem();
        (pem, Issuer::new(p, key))
    };
    let leaf = |issuer: &Issuer<'static, KeyPair>, names: Vec<String>, cn: &str| {
        let mut p = CertificateParams::new(names).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        let key = KeyPair::generate().unwrap();
        (
            p.signed_by(&key, issuer).unwrap().pem(),
            key.serialize_pem(),
        )
    };
    let (ca_pem, issuer) = ca("database CA");
    let (server_pem, server_key) = leaf(
        &issuer,
        vec!["localhost".into(), "127.0.0.1".into()],
        "database",
    );
    let (client_pem, client_key) = leaf(&issuer, vec![], "durus");
    let (other_ca, _) = ca("another CA");
    let files = dir.path().join("client");
    std::fs::create_dir_all(&files).unwrap();
    for (name, text) in [
        ("ca.pem", &ca_pem),
        ("other-ca.pem", &other_ca),
        ("durus.pem", &client_pem),
        ("durus.key", &client_key),
    ] {
        std::fs::write(files.join(name), text).unwrap();
    }
    let cluster = Cluster::create_with(dir.path(), |data| {
        cluster_file(&data.join("server.crt"), &server_pem);
        cluster_file(&data.join("server.key"), &server_key);
        cluster_file(&data.join("root.crt"), &ca_pem);
        let mut conf = std::fs::read_to_string(data.join("postgresql.conf")).unwrap();
        conf.push_str(
            "\nssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n\
             ssl_ca_file = 'root.crt'\n",
        );
        cluster_file(&data.join("postgresql.conf"), &conf);
        cluster_file(
            &data.join("pg_hba.conf"),
            "local all all trust\n\
             hostssl all durus 127.0.0.1/32 cert\n\
             hostnossl all durus 127.0.0.1/32 reject\n\
             host all postgres 127.0.0.1/32 trust\n",
        );
    });
    let mut admin = postgres::Client::connect(&cluster.url("postgres"), postgres::NoTls).unwrap();
    admin.batch_execute("CREATE ROLE durus LOGIN").unwrap();
    admin
        .batch_execute("CREATE DATABASE durus_tls OWNER durus")
        .unwrap();
    let f = |name: &str| files.join(name).to_str().unwrap().to_string();
    let base = format!("postgresql://durus@localhost:{}/durus_tls", cluster.port);
    let tls_url = format!(
        "{base}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        f("ca.pem"),
        f("durus.pem"),
        f("durus.key")
    );

    // Served over TLS: a commit and its load; every backend of the front
    // end is encrypted.
    let fe = FrontEnd::start(&tls_url);
    let mut c = ClientStorage::connect_tcp("127.0.0.1", fe.port).unwrap();
    let root = c.new_oid().unwrap();
    assert_eq!(root, Oid::ROOT);
    let oid = c.new_oid().unwrap();
    c.begin();
    c.store(oid, Record::new(oid, b"over TLS", &[]).into_bytes())
        .unwrap();
    c.store(
        Oid::ROOT,
        Record::new(Oid::ROOT, b"root", &[oid]).into_bytes(),
    )
    .unwrap();
    c.end().unwrap();
    assert_eq!(c.load(oid).unwrap().data(), b"over TLS");
    let rows = admin
        .query(
            "SELECT s.ssl FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
             WHERE a.datname = 'durus_tls' AND a.usename = 'durus'",
            &[],
        )
        .unwrap();
    assert!(!rows.is_empty(), "no connection of the front end seen");
    assert!(
        rows.iter().all(|r| r.get::<_, bool>(0)),
        "a connection of the front end is not encrypted"
    );
    drop(c);
    drop(fe);

    // check and stats over TLS too.
    let out = Command::new(bin())
        .arg("check")
        .arg(&tls_url)
        .output_within(common::LIMIT);
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && text.contains("clean"), "{text}");

    // Without TLS, and trusting another CA: refused, saying why.
    let refused = |url: &str| {
        let out = Command::new(bin())
            .args(["serve", "--database", url, "--port", "0"])
            .output_within(common::LIMIT);
        assert!(!out.status.success(), "{url}: served");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let said = refused(&base);
    assert!(said.contains("pg_hba.conf"), "{said}");
    let said = refused(&format!(
        "{base}?sslmode=verify-full&sslrootcert={}&sslcert={}&sslkey={}",
        f("other-ca.pem"),
        f("durus.pem"),
        f("durus.key")
    ));
    assert!(said.to_lowercase().contains("certificate"), "{said}");
    let said = refused(&format!("{base}?sslmode=require"));
    assert!(said.contains("sslrootcert"), "{said}");
}
