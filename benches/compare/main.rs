//! durus-redb beside Durus itself, on the same work, in one run.
//!
//! `cargo bench --bench compare` (needs the Python venv of
//! `scripts/setup-python.sh`, or `DURUS_PYTHON` and `DURUS_BIN`):
//!
//! 1. builds one Durus store with the real Python Durus (a BTree of
//!    PersistentDicts), copies it into a SqliteStorage, and migrates it into a
//!    durus-redb store with `durus-redb migrate`;
//! 2. Python rows: the real Durus client (`benches/compare/workload.py`) runs
//!    read, write (1, 10, 100 objects per commit) and mixed workloads with 1,
//!    4 and 16 client processes against the null server (the ceiling),
//!    durus-redb, and `durus -s` on its FileStorage and on its SqliteStorage;
//! 3. Rust rows: a load generator speaking the protocol directly, and the
//!    commit capacity: commits of 10 records at 1, 4 and 16 connections
//!    against `durus -s`, durus-redb in its log modes, and two ceilings (the
//!    null server without storage, and with a group-fsynced log);
//! 4. start-up time and resident memory against store size;
//! 5. the engine against raw redb doing the same key/value work.
//!
//! Everything talks to 127.0.0.1, every run is bounded in time, and every
//! server started is stopped (`Q`, then SIGKILL) whatever happens. The table
//! is printed and written to `target/bench-compare.md`.
//! `DURUS_BENCH_QUICK=1` runs a smaller, shorter version.

#[path = "../common/mod.rs"]
#[allow(dead_code)]
mod common;
mod loadgen;
mod nullserver;
mod wire;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use durus_redb::{
    Oid, Options, ReadOptions, Record, RedbStorage, ShelfWriter, SourceEvent, Storage, open_source,
};

use common::percentiles;
use loadgen::{LoadReport, Mix};
use nullserver::NullServer;
use wire::{Client, Loaded};

struct Config {
    objects: usize,
    seconds: f64,
    clients: Vec<usize>,
    startup_sizes: Vec<u64>,
    loadgen_seconds: u64,
}

impl Config {
    fn from_env() -> Config {
        if std::env::var_os("DURUS_BENCH_QUICK").is_some() {
            Config {
                objects: 20_000,
                seconds: 1.5,
                clients: vec![1, 4],
                startup_sizes: vec![10_000, 100_000],
                loadgen_seconds: 2,
            }
        } else {
            Config {
                objects: 100_000,
                seconds: 5.0,
                clients: vec![1, 4, 16],
                startup_sizes: vec![100_000, 1_000_000],
                loadgen_seconds: 5,
            }
        }
    }
}

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The Python interpreter with durus 4.3, and Durus's `durus` command.
fn python_tools() -> (PathBuf, PathBuf) {
    let (python, durus) = common::durus_paths();
    for p in [&python, &durus] {
        if !p.exists() {
            eprintln!(
                "compare: {} not found; run scripts/setup-python.sh or set DURUS_PYTHON and DURUS_BIN",
                p.display()
            );
            std::process::exit(2);
        }
    }
    (python, durus)
}

fn durus_redb_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_durus-redb"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port on 127.0.0.1")
}

fn run_ok(cmd: &mut Command, what: &str) {
    let out = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .unwrap_or_else(|e| panic!("{what}: cannot start: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A server child process, stopped on drop whatever happens.
struct ServerProcess {
    name: String,
    child: Child,
    port: u16,
    startup: Duration,
    /// Its port speaks TLS: ready once it accepts, stopped with SIGTERM.
    tls: bool,
}

impl ServerProcess {
    /// Starts `cmd` (which must listen on `port`) and waits until it answers
    /// a load of the root.
    fn start(name: &str, cmd: Command, port: u16, log: &Path) -> ServerProcess {
        ServerProcess::start_as(name, cmd, port, log, false)
    }

    fn start_as(name: &str, mut cmd: Command, port: u16, log: &Path, tls: bool) -> ServerProcess {
        let log = std::fs::File::create(log).expect("server log file");
        let started = Instant::now();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{name}: cannot start: {e}"));
        let mut server = ServerProcess {
            name: name.to_string(),
            child,
            port,
            startup: Duration::ZERO,
            tls,
        };
        let deadline = started + Duration::from_secs(300);
        loop {
            if let Ok(Some(status)) = server.child.try_wait() {
                panic!("{name} exited during start-up: {status}");
            }
            if tls && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            if let Ok(mut c) = Client::connect(port)
                && let Ok(Loaded::Record(_)) = c.load(0)
            {
                break;
            }
            assert!(Instant::now() < deadline, "{name} did not start in 300 s");
            std::thread::sleep(Duration::from_millis(5));
        }
        server.startup = started.elapsed();
        server
    }

    /// Resident memory (VmRSS) in MiB.
    fn rss_mib(&self) -> f64 {
        rss_mib(self.child.id())
    }
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(f64::NAN, |kb| kb / 1024.0)
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if self.tls {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
        } else if let Ok(c) = Client::connect(self.port) {
            let _ = c.quit();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!("compare: {} did not stop on Q; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One of the servers compared.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
enum Server {
    Null,
    DurusRedb,
    DurusFile,
    DurusSqlite,
    /// `durus-redb serve --database` on a PostgreSQL cluster (capacity only).
    DurusPostgres,
}

impl Server {
    const ALL: [Server; 5] = [
        Server::Null,
        Server::DurusRedb,
        Server::DurusFile,
        Server::DurusSqlite,
        Server::DurusPostgres,
    ];

    fn key(self) -> &'static str {
        match self {
            Server::Null => "null",
            Server::DurusRedb => "redb",
            Server::DurusFile => "file",
            Server::DurusSqlite => "sqlite",
            Server::DurusPostgres => "pg",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Server::Null => "null server (ceiling)",
            Server::DurusRedb => "durus-redb serve",
            Server::DurusFile => "durus -s FileStorage",
            Server::DurusSqlite => "durus -s SqliteStorage",
            Server::DurusPostgres => "durus-redb serve --database",
        }
    }
}

/// A running server of any kind.
enum Running {
    Null(NullServer),
    Process(ServerProcess),
}

impl Running {
    fn port(&self) -> u16 {
        match self {
            Running::Null(n) => n.port,
            Running::Process(p) => p.port,
        }
    }
}

struct Stores {
    dir: PathBuf,
    durus: PathBuf,
    /// The PostgreSQL cluster of `--servers pg`.
    postgres: Option<Postgres>,
    /// `-- --pg-never-alone`: the one front end runs with `--alone-after
    /// never` (every load reads the database, as before 0.11); else it is
    /// measured once it holds the database alone.
    pg_never_alone: bool,
}

/// A PostgreSQL cluster: `DURUS_BENCH_POSTGRES` (a URL ending in
/// `/DBNAME`), else a throwaway one from scripts/pg.sh, stopped on drop.
struct Postgres {
    url: String,
    started: Option<PathBuf>,
}

impl Postgres {
    fn new(dir: &Path) -> Postgres {
        if let Ok(url) = std::env::var("DURUS_BENCH_POSTGRES") {
            return Postgres { url, started: None };
        }
        let at = dir.join("pg");
        let out = Command::new("bash")
            .arg(root().join("scripts/pg.sh"))
            .arg("start")
            .arg(&at)
            .output()
            .expect("run scripts/pg.sh");
        assert!(
            out.status.success(),
            "scripts/pg.sh start: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Postgres {
            url: String::from_utf8_lossy(&out.stdout).trim().to_string(),
            started: Some(at),
        }
    }

    /// Migrates `items` into the database `items` once: the template of
    /// every run's database (the same objects as the other servers').
    fn load_items(&self, items: &Path) {
        let url = self.database("items", None);
        run_ok(
            Command::new(durus_redb_bin())
                .arg("migrate")
                .arg(items)
                .arg(&url),
            "durus-redb migrate into PostgreSQL",
        );
    }

    /// A new database, a copy of `template` (empty without one), and its URL.
    fn database(&self, tag: &str, template: Option<&str>) -> String {
        let name: String = tag
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '_'
                }
            })
            .collect();
        let mut c = postgres::Client::connect(&self.url, postgres::NoTls).expect("connect");
        c.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .unwrap();
        let from = template.map_or(String::new(), |t| format!(" TEMPLATE {t}"));
        c.batch_execute(&format!("CREATE DATABASE {name}{from}"))
            .unwrap();
        let (base, _) = self.url.rsplit_once('/').expect("a URL ending in /DBNAME");
        format!("{base}/{name}")
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(at) = &self.started {
            let _ = Command::new("bash")
                .arg(root().join("scripts/pg.sh"))
                .arg("stop")
                .arg(at)
                .output();
        }
    }
}

impl Stores {
    /// Fresh copies of the stores for one server (workloads change them).
    fn start(&self, server: Server, durus_bin: &Path, tag: &str) -> Running {
        self.start_with(server, durus_bin, tag, &[])
    }

    /// [`start`](Self::start) with extra arguments for `durus-redb serve`.
    fn start_with(&self, server: Server, durus_bin: &Path, tag: &str, extra: &[&str]) -> Running {
        let port = free_port();
        let log = self.dir.join(format!("{tag}.log"));
        match server {
            Server::Null => Running::Null(NullServer::start(read_all(&self.durus)).expect("null")),
            Server::DurusRedb => {
                let file = self.dir.join(format!("{tag}.redb"));
                std::fs::copy(self.dir.join("items.redb"), &file).expect("copy redb store");
                let mut cmd = Command::new(durus_redb_bin());
                cmd.arg("serve")
                    .arg("--file")
                    .arg(&file)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--logginglevel")
                    .arg("30")
                    .args(extra);
                let tls = extra.contains(&"--tls-cert");
                Running::Process(ServerProcess::start_as(
                    server.label(),
                    cmd,
                    port,
                    &log,
                    tls,
                ))
            }
            Server::DurusPostgres => {
                let pg = self
                    .postgres
                    .as_ref()
                    .expect("--servers pg starts a cluster");
                let url = pg.database(tag, Some("items"));
                let mut cmd = Command::new(durus_redb_bin());
                cmd.arg("serve")
                    .arg("--database")
                    .arg(&url)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--logginglevel")
                    .arg("30")
                    .args(extra);
                if self.pg_never_alone {
                    cmd.args(["--alone-after", "never"]);
                }
                let running =
                    Running::Process(ServerProcess::start(server.label(), cmd, port, &log));
                if !self.pg_never_alone {
                    wait_alone(&url);
                }
                running
            }
            Server::DurusFile | Server::DurusSqlite => {
                let (src, ext) = if server == Server::DurusFile {
                    ("items.durus", "durus")
                } else {
                    ("items.sqlite", "sqlite")
                };
                let file = self.dir.join(format!("{tag}.{ext}"));
                std::fs::copy(self.dir.join(src), &file).expect("copy durus store");
                let mut cmd = Command::new(durus_bin);
                cmd.arg("-s")
                    .arg("--file")
                    .arg(&file)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--logginglevel")
                    .arg("30");
                Running::Process(ServerProcess::start(server.label(), cmd, port, &log))
            }
        }
    }
}

/// Waits until the one front end over the database at `url` holds it
/// alone (`--alone-after`, 10 s after it started, with no other front
/// end): its steady state, measured as such.
fn wait_alone(url: &str) {
    let started = Instant::now();
    loop {
        let out = Command::new(durus_redb_bin())
            .arg("stats")
            .arg(url)
            .output()
            .expect("durus-redb stats");
        if String::from_utf8_lossy(&out.stdout).contains("alone:") {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the front end did not hold the database alone within a minute: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

impl Stores {
    /// Two front ends (`serve --database`) over one new copy of the
    /// items database.
    fn start_front_end_pair(&self, tag: &str) -> (Running, Running) {
        let pg = self
            .postgres
            .as_ref()
            .expect("--servers pg starts a cluster");
        let url = pg.database(tag, Some("items"));
        let start = |n: usize| {
            let port = free_port();
            let mut cmd = Command::new(durus_redb_bin());
            cmd.arg("serve")
                .arg("--database")
                .arg(&url)
                .arg("--port")
                .arg(port.to_string())
                .arg("--logginglevel")
                .arg("30");
            let log = self.dir.join(format!("{tag}-{n}.log"));
            Running::Process(ServerProcess::start(
                Server::DurusPostgres.label(),
                cmd,
                port,
                &log,
            ))
        };
        (start(1), start(2))
    }
}

/// A CA and a server certificate for 127.0.0.1, in `dir`: (ca, cert, key).
fn tls_files(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(rcgen::DnType::CommonName, "compare CA");
    let ca_key = KeyPair::generate().unwrap();
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    server
        .distinguished_name
        .push(rcgen::DnType::CommonName, "compare server");
    let cert = server.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("server.pem"),
        dir.join("server.key"),
    );
    std::fs::write(&paths.0, ca_pem).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Loads and commits of the Python client through `TLSClientStorage`
/// against plain `ClientStorage`, 4 clients, one server each, alternating
/// in two rounds.
fn tls_against_plain(
    md: &mut String,
    stores: &Stores,
    durus_bin: &Path,
    python: &Path,
    cfg: &Config,
) {
    let (ca, cert, key) = tls_files(&stores.dir);
    let (ca, cert, key) = (
        ca.to_str().unwrap().to_string(),
        cert.to_str().unwrap().to_string(),
        key.to_str().unwrap().to_string(),
    );
    let tls_args = ["--tls-cert", cert.as_str(), "--tls-key", key.as_str()];
    writeln!(
        md,
        "\n### TLS against plain TCP (the Python client, 4 clients, durus-redb serve; ops/s, mean of 2 rounds; p50 / p99 in ms of the last)\n"
    )
    .unwrap();
    writeln!(md, "| workload | plain | TLS | TLS / plain |").unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    for w in WORKLOADS
        .iter()
        .filter(|w| w.name == "read" || w.name == "write 1")
    {
        let (mut plain, mut tls) = (Vec::new(), Vec::new());
        for round in 0..2 {
            for on in [false, true] {
                let tag = format!("tls-{}-{}-{round}", on, w.mode);
                let extra: &[&str] = if on { &tls_args } else { &[] };
                let running = stores.start_with(Server::DurusRedb, durus_bin, &tag, extra);
                let client: &[&str] = if on { &["--tls-ca", ca.as_str()] } else { &[] };
                let cell = python_cell_with(python, cfg, running.port(), *w, 4, client);
                eprintln!(
                    "  {:<8} tls {on:<5}: {:>8.0} ops/s p50 {:.2} ms p99 {:.2} ms",
                    w.name, cell.ops_per_s, cell.p50, cell.p99
                );
                if on { &mut tls } else { &mut plain }.push(cell);
            }
        }
        let mean = |c: &[Cell]| c.iter().map(|c| c.ops_per_s).sum::<f64>() / c.len() as f64;
        let (p, t) = (mean(&plain), mean(&tls));
        let (lp, lt) = (plain.last().unwrap(), tls.last().unwrap());
        writeln!(
            md,
            "| {} | {p:.0}; {:.2} / {:.2} | {t:.0}; {:.2} / {:.2} | {:.2}x |",
            w.name,
            lp.p50,
            lp.p99,
            lt.p50,
            lt.p99,
            t / p
        )
        .unwrap();
    }
}

/// Every record of a Durus file, the last version of each oid.
fn read_all(path: &Path) -> HashMap<u64, Vec<u8>> {
    let mut source = open_source(path, ReadOptions::default()).expect("open the Durus file");
    let mut map = HashMap::new();
    while let Some(event) = source.next_event().expect("read the Durus file") {
        if let SourceEvent::Item(item) = event {
            map.insert(item.oid.0, item.record);
        }
    }
    map
}

#[derive(Clone, Copy)]
struct Workload {
    name: &'static str,
    mode: &'static str,
    batch: usize,
}

const WORKLOADS: [Workload; 5] = [
    Workload {
        name: "read",
        mode: "read",
        batch: 1,
    },
    Workload {
        name: "write 1",
        mode: "write",
        batch: 1,
    },
    Workload {
        name: "write 10",
        mode: "write",
        batch: 10,
    },
    Workload {
        name: "write 100",
        mode: "write",
        batch: 100,
    },
    Workload {
        name: "mixed",
        mode: "mixed",
        batch: 2,
    },
];

struct Cell {
    ops_per_s: f64,
    p50: f64,
    p99: f64,
    conflicts: usize,
}

/// Runs `clients` Python client processes of `workload` against `port`.
fn python_cell(python: &Path, cfg: &Config, port: u16, w: Workload, clients: usize) -> Cell {
    python_cell_with(python, cfg, port, w, clients, &[])
}

/// [`python_cell`] with extra arguments for each client (`--tls-ca PEM`).
fn python_cell_with(
    python: &Path,
    cfg: &Config,
    port: u16,
    w: Workload,
    clients: usize,
    extra: &[&str],
) -> Cell {
    let script = root().join("benches/compare/workload.py");
    let start_at = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64()
        + 1.0
        + 0.15 * clients as f64;
    let children: Vec<Child> = (0..clients)
        .map(|i| {
            Command::new(python)
                .arg(&script)
                .args(["run", "--port", &port.to_string(), "--mode", w.mode])
                .args(["--seconds", &cfg.seconds.to_string()])
                .args([
                    "--client",
                    &i.to_string(),
                    "--clients",
                    &clients.to_string(),
                ])
                .args(["--objects", &cfg.objects.to_string()])
                .args(["--batch", &w.batch.to_string()])
                .args(["--start-at", &format!("{start_at:.3}")])
                .args(extra)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start a Python client")
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs_f64(cfg.seconds + 120.0);
    let mut ops = 0usize;
    let mut conflicts = 0usize;
    let mut lat = Vec::new();
    for mut child in children {
        // Bounded wait: a client that hangs is killed and the run fails.
        loop {
            if child.try_wait().expect("wait").is_some() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("a Python client did not finish in time");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut out = String::new();
        child
            .stdout
            .take()
            .expect("stdout")
            .read_to_string(&mut out)
            .expect("client output");
        let mut err = String::new();
        let _ = child
            .stderr
            .take()
            .expect("stderr")
            .read_to_string(&mut err);
        let status = child.wait().expect("wait");
        assert!(status.success(), "Python client failed: {err}");
        let mut lines = out.lines();
        let head: Vec<usize> = lines
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .map(|x| x.parse().expect("a count"))
            .collect();
        ops += head[0];
        conflicts += head[1];
        lat.extend(
            lines
                .next()
                .unwrap_or_default()
                .split_whitespace()
                .map(|x| x.parse::<u64>().expect("a latency")),
        );
    }
    let (p50, p99) = percentiles(&mut lat);
    Cell {
        ops_per_s: ops as f64 / cfg.seconds,
        p50,
        p99,
        conflicts,
    }
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .next()
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or("?".into(), |kb| format!("{:.0} GiB", kb as f64 / 1048576.0));
    let kernel = Command::new("uname")
        .arg("-sr")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cpu}, {cores} cores, {mem} RAM, {kernel}")
}

fn main() {
    // `cargo bench --bench compare -- --servers null,redb,file,sqlite` runs a
    // subset (every row needs the null server's figure, so it always runs).
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs benchmarks without `--bench`: then
        // only check the machinery (the load generator against the null server).
        smoke();
        return;
    }
    let servers: Vec<Server> = match args.iter().position(|a| a == "--servers") {
        Some(i) => {
            let list = args.get(i + 1).map(String::as_str).unwrap_or("");
            Server::ALL
                .into_iter()
                .filter(|s| *s == Server::Null || list.split(',').any(|k| k == s.key()))
                .collect()
        }
        None => Server::ALL.to_vec(),
    };
    let with_redb = servers.contains(&Server::DurusRedb);
    // `-- --only capacity,engine` runs some sections only: python, loadgen,
    // tls, capacity, snapshot, startup, engine.
    let only: Option<Vec<String>> = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
        .map(|l| l.split(',').map(str::to_string).collect());
    let want = |section: &str| only.as_ref().is_none_or(|o| o.iter().any(|s| s == section));
    let cfg = Config::from_env();
    let (python, durus_bin) = python_tools();
    let tmp = tempfile::Builder::new()
        .prefix("durus-compare")
        .tempdir()
        .expect("temporary directory");
    let dir = tmp.path().to_path_buf();
    let mut md = String::new();
    let t0 = Instant::now();
    writeln!(md, "Machine: {}  ", machine()).unwrap();
    writeln!(
        md,
        "Command: `{}cargo bench --bench compare`; {} PersistentDicts in a BTree, {} s per cell.\n",
        if cfg.objects < 100_000 {
            "DURUS_BENCH_QUICK=1 "
        } else {
            ""
        },
        cfg.objects,
        cfg.seconds
    )
    .unwrap();

    // 1. The stores.
    eprintln!("compare: building the stores ({} objects)", cfg.objects);
    let durus = dir.join("items.durus");
    let script = root().join("benches/compare/workload.py");
    run_ok(
        Command::new(&python)
            .arg(&script)
            .args(["populate", "--objects", &cfg.objects.to_string(), "--file"])
            .arg(&durus),
        "populate the Durus FileStorage",
    );
    run_ok(
        Command::new(&python)
            .arg(&script)
            .args(["copy", "--src"])
            .arg(&durus)
            .arg("--dest")
            .arg(dir.join("items.sqlite")),
        "copy into a SqliteStorage",
    );
    if with_redb {
        run_ok(
            Command::new(durus_redb_bin())
                .arg("migrate")
                .arg(&durus)
                .arg(dir.join("items.redb")),
            "durus-redb migrate",
        );
    }
    let stores = Stores {
        dir: dir.clone(),
        durus,
        postgres: servers.contains(&Server::DurusPostgres).then(|| {
            let pg = Postgres::new(&dir);
            pg.load_items(&dir.join("items.durus"));
            pg
        }),
        pg_never_alone: args.iter().any(|a| a == "--pg-never-alone"),
    };

    // 2. Python clients.
    if want("python") {
        let mut cells: HashMap<(usize, usize, Server), Cell> = HashMap::new();
        for &server in &servers {
            eprintln!("compare: Python clients against {}", server.label());
            let running = stores.start(server, &durus_bin, &format!("py-{server:?}"));
            for (wi, w) in WORKLOADS.iter().enumerate() {
                for &n in &cfg.clients {
                    let cell = python_cell(&python, &cfg, running.port(), *w, n);
                    eprintln!(
                        "  {:<10} {:>2} clients: {:>8.0} ops/s p50 {:.2} ms p99 {:.2} ms",
                        w.name, n, cell.ops_per_s, cell.p50, cell.p99
                    );
                    cells.insert((wi, n, server), cell);
                }
            }
        }
        writeln!(
        md,
        "### The real Python Durus client (ops/s; share of the null server's; p50 / p99 latency in ms)\n"
    )
    .unwrap();
        writeln!(
        md,
        "| workload | clients | null server (ceiling) | durus-redb | durus -s FileStorage | durus -s SqliteStorage | durus-redb --database (PostgreSQL) | durus-redb / FileStorage |"
    )
    .unwrap();
        writeln!(md, "|---|---:|---:|---:|---:|---:|---:|---:|").unwrap();
        for (wi, w) in WORKLOADS.iter().enumerate() {
            for &n in &cfg.clients {
                let ceiling = cells[&(wi, n, Server::Null)].ops_per_s;
                let mut row = format!("| {} | {n} |", w.name);
                for server in Server::ALL {
                    let Some(c) = cells.get(&(wi, n, server)) else {
                        row.push_str(" - |");
                        continue;
                    };
                    let conflicts = if c.conflicts > 0 {
                        format!(", {} conflicts", c.conflicts)
                    } else {
                        String::new()
                    };
                    if server == Server::Null {
                        write!(
                            row,
                            " {:.0}; {:.2} / {:.2}{conflicts} |",
                            c.ops_per_s, c.p50, c.p99
                        )
                        .unwrap();
                    } else {
                        write!(
                            row,
                            " {:.0} ({:.0}%); {:.2} / {:.2}{conflicts} |",
                            c.ops_per_s,
                            100.0 * c.ops_per_s / ceiling,
                            c.p50,
                            c.p99
                        )
                        .unwrap();
                    }
                }
                let ratio = match (
                    cells.get(&(wi, n, Server::DurusRedb)),
                    cells.get(&(wi, n, Server::DurusFile)),
                ) {
                    (Some(a), Some(b)) => format!("{:.2}x", a.ops_per_s / b.ops_per_s),
                    _ => "-".into(),
                };
                writeln!(row, " {ratio} |").unwrap();
                md.push_str(&row);
            }
        }
    }

    // 2b. TLS against plain TCP: the Python client, 4 connections.
    if want("tls") {
        tls_against_plain(&mut md, &stores, &durus_bin, &python, &cfg);
    }

    // 3. The Rust load generator.
    if want("loadgen") {
        writeln!(
        md,
        "\n### Rust load generator (the protocol directly; {} s per run; loads/s and commits/s; p50 / p99 in ms)\n",
        cfg.loadgen_seconds
    )
    .unwrap();
        writeln!(
        md,
        "| mix | connections | server | loads/s | load p50 / p99 | commits/s | commit p50 / p99 |"
    )
    .unwrap();
        writeln!(md, "|---|---:|---|---:|---:|---:|---:|").unwrap();
        let mixes = [
            ("90% loads, 10% commits of 10", 0.10, 10usize),
            ("commits of 10 only", 1.0, 10usize),
        ];
        // The load generator's table has no PostgreSQL column.
        for &server in servers.iter().filter(|s| **s != Server::DurusPostgres) {
            eprintln!("compare: load generator against {}", server.label());
            let running = stores.start(server, &durus_bin, &format!("lg-{server:?}"));
            for (name, fraction, per_commit) in mixes {
                for connections in [1usize, 16] {
                    let mix = Mix {
                        connections,
                        commit_fraction: fraction,
                        records_per_commit: per_commit,
                        objects_per_connection: 200,
                        duration: Duration::from_secs(cfg.loadgen_seconds),
                    };
                    let mut r: LoadReport = loadgen::run(running.port(), mix)
                        .unwrap_or_else(|e| panic!("load generator against {server:?}: {e}"));
                    let (lp50, lp99) = percentiles(&mut r.load_lat_us);
                    let (cp50, cp99) = percentiles(&mut r.commit_lat_us);
                    writeln!(
                    md,
                    "| {name} | {connections} | {} | {:.0} | {lp50:.2} / {lp99:.2} | {:.0} | {cp50:.2} / {cp99:.2} |",
                    server.label(),
                    r.loads as f64 / r.seconds,
                    r.commits as f64 / r.seconds,
                )
                .unwrap();
                }
            }
        }
    }

    // 3b. Commit capacity: durable commits against Durus's non-durable ones.
    if want("capacity") {
        commit_capacity(&mut md, &stores, &durus_bin, &cfg, &servers);
    }

    // 3c. Snapshot reads: read-only work under writes, and the mixed load.
    if want("snapshot") {
        snapshot_reads(&mut md, &stores, &durus_bin, &python, &cfg, &servers);
    }

    // 4. Start-up time and memory against store size.
    if want("startup") {
        writeln!(
            md,
            "\n### Start-up (until the root loads) and resident memory after start-up\n"
        )
        .unwrap();
        writeln!(
            md,
            "| objects | server | file MiB | start-up ms | RSS MiB |"
        )
        .unwrap();
        writeln!(md, "|---:|---|---:|---:|---:|").unwrap();
        for &n in &cfg.startup_sizes {
            eprintln!("compare: start-up with {n} objects");
            let shelf = dir.join(format!("startup-{n}.durus"));
            let mut w = ShelfWriter::create(&shelf).expect("create SHELF-1");
            for oid in 0..n {
                let refs: Vec<Oid> = if oid + 1 < n {
                    vec![Oid(oid + 1)]
                } else {
                    vec![]
                };
                let mut data = vec![b's'; 120];
                data[..8].copy_from_slice(&oid.to_be_bytes());
                w.write(Oid(oid), Record::new(Oid(oid), &data, &refs).as_bytes())
                    .expect("write SHELF-1");
            }
            w.finish().expect("finish SHELF-1");
            let redb = dir.join(format!("startup-{n}.redb"));
            if with_redb {
                run_ok(
                    Command::new(durus_redb_bin())
                        .arg("migrate")
                        .arg(&shelf)
                        .arg(&redb),
                    "durus-redb migrate",
                );
            }
            for (label, file, is_redb) in [
                ("durus-redb serve", &redb, true),
                ("durus -s FileStorage", &shelf, false),
            ] {
                if is_redb && !with_redb {
                    continue;
                }
                let port = free_port();
                let mut cmd = Command::new(if is_redb {
                    durus_redb_bin()
                } else {
                    durus_bin.clone()
                });
                if is_redb {
                    cmd.arg("serve");
                } else {
                    cmd.arg("-s");
                }
                cmd.arg("--file")
                    .arg(file)
                    .arg("--port")
                    .arg(port.to_string())
                    .arg("--logginglevel")
                    .arg("30");
                let p =
                    ServerProcess::start(label, cmd, port, &dir.join(format!("startup-{n}.log")));
                let size = std::fs::metadata(file).map_or(0, |m| m.len()) as f64 / 1048576.0;
                writeln!(
                    md,
                    "| {n} | {label} | {size:.0} | {:.0} | {:.0} |",
                    p.startup.as_secs_f64() * 1000.0,
                    p.rss_mib()
                )
                .unwrap();
            }
        }
    }

    // 5. The engine against raw redb.
    if want("engine") {
        eprintln!("compare: engine against raw redb");
        let (engine_commit, raw_commit, engine_load, raw_load) = engine_vs_raw(&dir);
        writeln!(
            md,
            "\n### The engine against raw redb (same key/value work, durable commits)\n"
        )
        .unwrap();
        writeln!(md, "| operation | durus-redb | raw redb | ratio |").unwrap();
        writeln!(md, "|---|---:|---:|---:|").unwrap();
        writeln!(
        md,
        "| durable commit of 10 records (engine: log fsync; redb: Immediate) | {:.0} us | {:.0} us | {:.2}x |",
        engine_commit,
        raw_commit,
        engine_commit / raw_commit
    )
    .unwrap();
        writeln!(
            md,
            "| load of one record | {:.2} us | {:.2} us | {:.2}x |",
            engine_load,
            raw_load,
            engine_load / raw_load
        )
        .unwrap();
        writeln!(md, "\nTotal run time: {:.0} s.", t0.elapsed().as_secs_f64()).unwrap();

        println!("{md}");
    }

    let out = root().join("target/bench-compare.md");
    if std::fs::write(&out, &md).is_ok() {
        eprintln!("compare: table written to {}", out.display());
    }
}

/// The snapshot-reads tables. First the reader workload of
/// tests/python/balance.py (one reader summing 40 balances, 0.5 ms between
/// loads, while 4 writers move amounts between them): sums completed,
/// exact, read conflicts, and the writers' commit rate, against `durus -s`
/// and durus-redb without and with `--snapshot-reads`. Then the Python
/// `mixed` workload with 4 clients on the same three.
fn snapshot_reads(
    md: &mut String,
    stores: &Stores,
    durus_bin: &Path,
    python: &Path,
    cfg: &Config,
    servers: &[Server],
) {
    let mut runs: Vec<(&str, Server, Vec<&str>)> = Vec::new();
    if servers.contains(&Server::DurusFile) {
        runs.push(("durus -s FileStorage", Server::DurusFile, vec![]));
    }
    if servers.contains(&Server::DurusRedb) {
        runs.push(("durus-redb", Server::DurusRedb, vec![]));
        runs.push((
            "durus-redb --snapshot-reads",
            Server::DurusRedb,
            vec!["--snapshot-reads"],
        ));
    }
    let seconds = if cfg.objects < 100_000 { 3.0 } else { 6.0 };
    writeln!(
        md,
        "\n### Snapshot reads: one reader summing 40 balances while 4 writers move amounts ({seconds} s per run; tests/python/balance.py)\n"
    )
    .unwrap();
    writeln!(
        md,
        "| server | sums completed | exact | read conflicts | writers' commits/s | write conflicts |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|---:|---:|").unwrap();
    let script = root().join("tests/python/balance.py");
    for (i, (label, server, extra)) in runs.iter().enumerate() {
        eprintln!("compare: balance workload against {label}");
        let running = stores.start_with(*server, durus_bin, &format!("balance-{i}"), extra);
        let out = Command::new(python)
            .arg(&script)
            .args(["--port", &running.port().to_string()])
            .args(["--seconds", &seconds.to_string()])
            .output()
            .expect("run balance.py");
        assert!(
            out.status.success(),
            "balance.py failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let field = |k: &str| -> f64 {
            let at = text
                .find(&format!("\"{k}\": "))
                .unwrap_or_else(|| panic!("{k} in {text}"));
            let rest = &text[at + k.len() + 4..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(rest.len());
            rest[..end].parse().expect("a number")
        };
        eprintln!("  {text}");
        writeln!(
            md,
            "| {label} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            field("sums"),
            field("exact"),
            field("read_conflicts"),
            field("commits_per_s"),
            field("write_conflicts")
        )
        .unwrap();
    }
    writeln!(
        md,
        "\n### Snapshot reads: the Python `mixed` workload, 4 clients ({} s per run; ops/s, p50 / p99 in ms, conflicts)\n",
        cfg.seconds
    )
    .unwrap();
    writeln!(md, "| server | ops/s | p50 / p99 | conflicts |").unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    let mixed = WORKLOADS[4];
    for (i, (label, server, extra)) in runs.iter().enumerate() {
        eprintln!("compare: mixed workload against {label}");
        let running = stores.start_with(*server, durus_bin, &format!("mixed-{i}"), extra);
        let c = python_cell(python, cfg, running.port(), mixed, 4);
        writeln!(
            md,
            "| {label} | {:.0} | {:.2} / {:.2} | {} |",
            c.ops_per_s, c.p50, c.p99, c.conflicts
        )
        .unwrap();
    }
}

/// The commit-capacity table: the load generator committing 10 records per
/// commit as fast as it can, at 1, 4 and 16 connections, against `durus -s`
/// (FileStorage, which never fsyncs), the null server without storage and
/// with a group-fsynced log (the ceilings of a non-durable and of a durable
/// commit on this machine), and durus-redb in its two log modes.
fn commit_capacity(
    md: &mut String,
    stores: &Stores,
    durus_bin: &Path,
    cfg: &Config,
    servers: &[Server],
) {
    /// What a row runs against.
    enum Target {
        Null,
        NullLogged,
        Process(Server, Vec<&'static str>),
        /// Two front ends over one PostgreSQL database, the connections
        /// split between them.
        TwoFrontEnds,
    }
    let mut runs: Vec<(String, Target)> = Vec::new();
    if servers.contains(&Server::DurusFile) {
        runs.push((
            "durus -s FileStorage (no fsync)".into(),
            Target::Process(Server::DurusFile, vec![]),
        ));
    }
    if servers.contains(&Server::Null) {
        runs.push(("null server, no storage (ceiling)".into(), Target::Null));
        runs.push((
            "null server, fsynced log only (ceiling of fsync)".into(),
            Target::NullLogged,
        ));
    }
    if servers.contains(&Server::DurusRedb) {
        runs.push((
            "durus-redb --durability fsync".into(),
            Target::Process(Server::DurusRedb, vec!["--durability", "fsync"]),
        ));
        runs.push((
            "durus-redb --durability os".into(),
            Target::Process(Server::DurusRedb, vec!["--durability", "os"]),
        ));
        // The checkpoint's fsync holds redb's one writer: commits wait for
        // it. This row shows what that costs (p99 above all).
        runs.push((
            "durus-redb --durability fsync --checkpoint-interval 3600".into(),
            Target::Process(
                Server::DurusRedb,
                vec!["--durability", "fsync", "--checkpoint-interval", "3600"],
            ),
        ));
    }
    if servers.contains(&Server::DurusPostgres) {
        runs.push((
            "durus-redb --database (PostgreSQL, one front end)".into(),
            Target::Process(Server::DurusPostgres, vec![]),
        ));
        runs.push((
            "durus-redb --database (PostgreSQL, two front ends)".into(),
            Target::TwoFrontEnds,
        ));
    }
    let counts = [1usize, 4, 16];
    // Per server: (commits/s, p50 ms, p99 ms) at each connection count.
    type Cells = Vec<(f64, f64, f64)>;
    let mut rows: Vec<(String, Cells)> = Vec::new();
    for (label, target) in &runs {
        eprintln!("compare: commit capacity of {label}");
        let mut cells = Vec::new();
        for &connections in &counts {
            // A fresh store (or log) for every run.
            let mut second = None;
            let running = match target {
                Target::TwoFrontEnds => {
                    let (one, two) = stores.start_front_end_pair(&format!("cap-pg2-{connections}"));
                    second = Some(two);
                    one
                }
                Target::Null => Running::Null(NullServer::start(HashMap::new()).expect("null")),
                Target::NullLogged => Running::Null(
                    NullServer::start_logged(
                        HashMap::new(),
                        &stores.dir.join(format!("cap-null-{connections}.log")),
                    )
                    .expect("null server with a log"),
                ),
                Target::Process(server, extra) => stores.start_with(
                    *server,
                    durus_bin,
                    &format!("cap-{server:?}-{}-{connections}", extra.join("")),
                    extra,
                ),
            };
            let mix = Mix {
                connections,
                commit_fraction: 1.0,
                records_per_commit: 10,
                objects_per_connection: 200,
                duration: Duration::from_secs(cfg.loadgen_seconds),
            };
            let ports: Vec<u16> = std::iter::once(running.port())
                .chain(second.as_ref().map(|s| s.port()))
                .collect();
            let mut r = loadgen::run_on(&ports, mix)
                .unwrap_or_else(|e| panic!("load generator against {label}: {e}"));
            drop(second);
            drop(running);
            let (p50, p99) = percentiles(&mut r.commit_lat_us);
            let rate = r.commits as f64 / r.seconds;
            eprintln!(
                "  {connections:>2} connections: {rate:>8.0} commits/s p50 {p50:.2} ms p99 {p99:.2} ms"
            );
            cells.push((rate, p50, p99));
        }
        rows.push((label.clone(), cells));
    }
    writeln!(
        md,
        "\n### Commit capacity (the Rust load generator, commits of 10 records only, {} s per run; commits/s, p50 / p99 in ms, ratio to durus -s)\n",
        cfg.loadgen_seconds
    )
    .unwrap();
    writeln!(
        md,
        "| server | 1 connection | 4 connections | 16 connections |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    // The cells of the row whose label starts with `prefix`, if it ran.
    let cells_of = |prefix: &str| {
        rows.iter()
            .find(|(l, _)| l.starts_with(prefix))
            .map(|(_, c)| c)
    };
    let base = cells_of("durus -s");
    for (label, cells) in &rows {
        let mut row = format!("| {label} |");
        for (i, (rate, p50, p99)) in cells.iter().enumerate() {
            let ratio = match base {
                Some(b) if !label.starts_with("durus -s") => format!(", {:.2}x", rate / b[i].0),
                _ => String::new(),
            };
            write!(row, " {rate:.0}{ratio}; {p50:.2} / {p99:.2} |").unwrap();
        }
        writeln!(md, "{row}").unwrap();
    }
    // What the targets are read from: how each server scales from 4 to 16
    // connections, and each durable row's share of the fsync ceiling.
    let ceiling = cells_of("null server, fsynced log");
    writeln!(
        md,
        "\n| server | 16 connections against 4 | share of the fsync ceiling (1 / 4 / 16) | p99 / p50 at 16 |"
    )
    .unwrap();
    writeln!(md, "|---|---:|---:|---:|").unwrap();
    for (label, cells) in &rows {
        let share = match ceiling {
            Some(c) if label.contains("--durability fsync") => cells
                .iter()
                .zip(c)
                .map(|(a, b)| format!("{:.0}%", 100.0 * a.0 / b.0))
                .collect::<Vec<_>>()
                .join(" / "),
            _ => "-".into(),
        };
        let (rate4, rate16) = (cells[1].0, cells[2].0);
        let (p50, p99) = (cells[2].1, cells[2].2);
        writeln!(
            md,
            "| {label} | {:.2}x | {share} | {:.1}x |",
            rate16 / rate4,
            p99 / p50
        )
        .unwrap();
        eprintln!(
            "compare: {label}: 16 connections {:.2}x of 4; p99 {:.1}x p50 at 16; fsync ceiling share {share}",
            rate16 / rate4,
            p99 / p50
        );
    }
}

/// A short run of the load generator against the null server, without and
/// with its log.
fn smoke() {
    let dir = tempfile::tempdir().expect("temporary directory");
    for logged in [false, true] {
        let server = if logged {
            NullServer::start_logged(HashMap::new(), &dir.path().join("null.log"))
        } else {
            NullServer::start(HashMap::new())
        }
        .expect("null server");
        let mix = Mix {
            connections: 2,
            commit_fraction: 0.2,
            records_per_commit: 3,
            objects_per_connection: 50,
            duration: Duration::from_millis(300),
        };
        let r = loadgen::run(server.port, mix).expect("load generator");
        assert!(r.loads > 0 && r.commits > 0, "no work done: {r:?}");
        println!(
            "compare (test mode): load generator did {} loads and {} commits against the null server{}; run `cargo bench --bench compare` for the comparison",
            r.loads,
            r.commits,
            if logged { " with its log" } else { "" }
        );
    }
}

/// Mean microseconds per commit of 10 records and per load, for the engine
/// and for raw redb doing the same key/value writes.
fn engine_vs_raw(dir: &Path) -> (f64, f64, f64, f64) {
    use redb::{ReadableDatabase, TableDefinition};
    const RAW: TableDefinition<u64, &[u8]> = TableDefinition::new("raw");
    const N: u64 = 10_000;
    const COMMITS: u64 = 300;
    const LOADS: u64 = 100_000;
    let rec = |oid: u64, g: u64| {
        let mut data = vec![0u8; 100];
        data[..8].copy_from_slice(&g.to_be_bytes());
        Record::new(Oid(oid), &data, &[Oid((oid + 1) % N)])
    };

    // The default durability (Fsync: each commit's log entry fsynced)
    // against raw redb's durable commit.
    let mut s = RedbStorage::open(dir.join("engine.redb"), Options::new()).expect("open");
    let oids = s.new_oids(N as usize).expect("oids");
    s.begin();
    for o in &oids {
        s.store(*o, rec(o.0, 0).into_bytes()).expect("store");
    }
    s.end().expect("commit");
    let t = Instant::now();
    for g in 1..=COMMITS {
        s.begin();
        for k in 0..10 {
            let o = (g * 97 + k * 1009) % N;
            s.store(Oid(o), rec(o, g).into_bytes()).expect("store");
        }
        s.end().expect("commit");
    }
    let engine_commit = t.elapsed().as_secs_f64() * 1e6 / COMMITS as f64;
    let t = Instant::now();
    for i in 0..LOADS {
        std::hint::black_box(s.load(Oid((i * 7919) % N)).expect("load"));
    }
    let engine_load = t.elapsed().as_secs_f64() * 1e6 / LOADS as f64;
    s.close().expect("close");

    let mut db = redb::Database::create(dir.join("raw.redb")).expect("raw redb");
    let write = |db: &mut redb::Database, items: &mut dyn Iterator<Item = (u64, Record)>| {
        let mut w = db.begin_write().expect("write");
        w.set_quick_repair(true);
        {
            let mut t = w.open_table(RAW).expect("table");
            for (k, r) in items {
                t.insert(k, r.as_bytes()).expect("insert");
            }
        }
        w.commit().expect("commit");
    };
    write(&mut db, &mut (0..N).map(|o| (o, rec(o, 0))));
    let t = Instant::now();
    for g in 1..=COMMITS {
        write(
            &mut db,
            &mut (0..10).map(|k| {
                let o = (g * 97 + k * 1009) % N;
                (o, rec(o, g))
            }),
        );
    }
    let raw_commit = t.elapsed().as_secs_f64() * 1e6 / COMMITS as f64;
    let t = Instant::now();
    for i in 0..LOADS {
        let txn = db.begin_read().expect("read");
        let table = txn.open_table(RAW).expect("table");
        let v = table.get((i * 7919) % N).expect("get").expect("present");
        std::hint::black_box(v.value().to_vec());
    }
    let raw_load = t.elapsed().as_secs_f64() * 1e6 / LOADS as f64;
    (engine_commit, raw_commit, engine_load, raw_load)
}
