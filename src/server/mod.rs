//! The Durus storage server: Durus's protocol version 1 over TCP or a Unix
//! socket, on a durus-redb store.
//!
//! One thread per connection. Loads run in parallel, each from its own redb
//! read snapshot. A commit (`C`) takes the engine's commit order before the
//! connection's invalidations are sent and holds it until the commit is
//! read, checked and given its turn, so nothing else commits in between
//! (Durus's order). A connection that finds the order taken queues for it,
//! and whoever hands the order over sends that client its invalidations, so
//! the queued thread sleeps only until its client answers. The commit is
//! applied in turn after the order is released (with
//! `--snapshot-reads`, under it), commits of many connections share one
//! fsync, and `O` is sent only once the commit is as durable as the
//! durability mode promises.

mod connection;
mod deadline;
mod metrics;

use std::collections::HashMap;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;

use crate::backend::{Backend, LiveState};
use crate::store::RedbStorage;
use crate::transport::{Address, Listener, Stream};

/// How long an idle connection keeps its snapshot by default. A Durus
/// client syncs at every commit and abort, so a connection at work renews
/// its snapshot every transaction; one silent this long is idle. While a
/// snapshot is held, pages freed by later commits cannot be reused, so the
/// file can grow by what is written in that time.
pub const DEFAULT_SNAPSHOT_IDLE: Duration = Duration::from_secs(10);
/// [`ServerConfig::snapshot_max_age`]'s default: five minutes.
pub const DEFAULT_SNAPSHOT_MAX_AGE: Duration = Duration::from_secs(300);
/// [`ServerConfig::backup_max_age`]'s default: one hour.
pub const DEFAULT_BACKUP_MAX_AGE: Duration = Duration::from_secs(3600);

/// Who may send a server its administrative requests, `Q` (stop) and `X`
/// (live state). Durus's server answers them from anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum AdminFrom {
    /// Every client, as Durus's server.
    Any,
    /// Clients on this machine: a Unix socket, or TCP from a loopback
    /// address (the default).
    #[default]
    Local,
    /// Nobody: stop the server with a signal; read its live state from
    /// the metrics page.
    Nobody,
}

/// The background collector of a front end on a database: a full
/// collection (cycles included) that removes only what no commit referenced
/// for at least `grace`, started after `after_commits` commits, or after
/// `interval` if any commit came, since the last collection of any front
/// end; one at a time across front ends. Start from `DatabaseGc::default()`.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct DatabaseGc {
    /// An object is removed only once no commit referenced it for this long
    /// (10 minutes).
    pub grace: Duration,
    /// Commits (through any front end) after which a collection starts
    /// (100,000).
    pub after_commits: u64,
    /// Time after which a collection starts if any commit came (a day).
    pub interval: Duration,
    /// Start only when no commit came since the last look (`--gc idle`).
    pub idle_only: bool,
    /// How often the front end looks whether a collection is due (10 s;
    /// `serve` takes a quarter of the window if that is shorter).
    pub check_every: Duration,
}

impl Default for DatabaseGc {
    fn default() -> Self {
        DatabaseGc {
            grace: Duration::from_secs(600),
            after_commits: 100_000,
            interval: Duration::from_secs(24 * 3600),
            idle_only: false,
            check_every: Duration::from_secs(10),
        }
    }
}

/// How a server behaves. Start from `ServerConfig::default()` and set the
/// fields that differ.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServerConfig {
    /// Where to listen.
    pub address: Address,
    /// Connections served at once; more are refused (closed at once, logged).
    pub max_connections: usize,
    /// The largest frame accepted (a commit's data, a bulk load's oid list);
    /// checked before anything is allocated. A larger one closes the connection.
    pub max_frame_bytes: u32,
    /// How long a client may take to send the rest of a request once it has
    /// sent its command byte; in particular the data of a commit, during
    /// which it holds the commit order (Durus: 10 s).
    pub request_timeout: Duration,
    /// Start a full collection after this many committed bytes (0: never),
    /// as Durus's `--gcbytes`.
    pub gcbytes: u64,
    /// The most new oids one connection may hold handed out and not yet
    /// stored (the server remembers each); asking for more closes the
    /// connection. A Durus client asks for the oids of the new objects of
    /// its next commit.
    pub max_oids_held: u64,
    /// Where to serve the live state as Prometheus text (`GET /metrics`),
    /// as `HOST:PORT`; `None`: nowhere.
    pub metrics_address: Option<String>,
    /// Snapshot reads: each connection loads from the state of its last
    /// sync or commit, so a load of an oid changed since returns the
    /// version of that state instead of Durus's "invalid" (no
    /// ReadConflictError for read-only work). Invalidations are handed out
    /// as without it, so write conflicts are caught as before.
    pub snapshot_reads: bool,
    /// A connection that sends no request for this long gives up its
    /// snapshot (its loads then answer "invalid" for oids changed since, as
    /// Durus does), so an idle client cannot keep old pages from reuse.
    pub snapshot_idle: Duration,
    /// A connection's snapshot older than this is given up, however busy
    /// the connection: it reads as Durus does (read conflicts) until its
    /// next sync or commit. Bounds what one snapshot pins: pages freed by
    /// later commits cannot be reused while it is held, so the store file
    /// grows by what is rewritten meanwhile.
    pub snapshot_max_age: Duration,
    /// A backup (`Y`) still copying after this long is stopped (its
    /// connection closed, the partial copy removed by the client), for the
    /// same reason.
    pub backup_max_age: Duration,
    /// Whether a client's `Q` stops the server, as in Durus (default true);
    /// when false, `Q` ends that client's connection only.
    pub allow_quit: bool,
    /// Who may send the administrative requests `Q` (stop) and `X` (live
    /// state): by default only clients on this machine (a Unix socket, or
    /// TCP from a loopback address). A refused request is logged with the
    /// peer's address and closes that connection only.
    pub admin_from: AdminFrom,
    /// How long a connection that is the only one at work polls its socket
    /// for the client's next bytes before it sleeps (after answering a
    /// commit, and for the commit data while it holds the commit order).
    /// A thread woken from sleep starts late (tens of microseconds on a
    /// virtual machine); one client committing alone gains most. Only one connection polls
    /// at a time; zero never polls.
    pub poll: Duration,
    /// Whether the server stops when the store is poisoned (a failed
    /// fsync, a full disk at a checkpoint, a damaged log segment): its
    /// connections are closed and [`Server::run`] returns the reason, so
    /// that a supervisor's restart replays the commit log (default true).
    /// When false it goes on serving loads, refuses commits, and reports
    /// `healthy 0` in its live state.
    pub stop_when_poisoned: bool,
    /// On a database (`bind_database`): the background collector, full
    /// collections with a grace window run now and then (`None`: none;
    /// garbage stays until a pack). A file store's collector is chosen
    /// when the store is opened (`Options::gc`), not here.
    pub database_gc: Option<DatabaseGc>,
    /// On a database: once no other front end has committed for this
    /// long, this one holds the database alone and serves loads and syncs
    /// from memory (another front end's commit first asks it to give way,
    /// a wait of up to a tenth of a second). `None`: loads always read the
    /// database. Default 10 s.
    pub database_alone_after: Option<Duration>,
    /// On a database: the bytes of records a front end keeps for loads
    /// while it holds the database alone (default 64 MiB).
    pub database_cache_bytes: usize,
    /// TLS on the TCP listener (`None`: plain). A Unix socket stays
    /// plain. A client whose handshake does not finish within
    /// `request_timeout`, or fails, is closed with one log line.
    #[cfg(feature = "tls")]
    pub tls: Option<crate::tls::TlsServer>,
    /// Clients whose TLS certificate (verified against the client CA) has
    /// one of these common names may also send `Q` and `X`, wherever
    /// they connect from.
    #[cfg(feature = "tls")]
    pub admin_cert_names: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            address: Address::tcp("127.0.0.1", 2972),
            max_connections: 512,
            max_frame_bytes: 256 << 20,
            request_timeout: Duration::from_secs(10),
            gcbytes: 0,
            max_oids_held: 1 << 20,
            metrics_address: None,
            snapshot_reads: false,
            snapshot_idle: DEFAULT_SNAPSHOT_IDLE,
            snapshot_max_age: DEFAULT_SNAPSHOT_MAX_AGE,
            backup_max_age: DEFAULT_BACKUP_MAX_AGE,
            allow_quit: true,
            admin_from: AdminFrom::Local,
            poll: Duration::from_micros(50),
            stop_when_poisoned: true,
            database_gc: None,
            database_alone_after: Some(Duration::from_secs(10)),
            database_cache_bytes: 64 << 20,
            #[cfg(feature = "tls")]
            tls: None,
            #[cfg(feature = "tls")]
            admin_cert_names: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// The defaults, listening on `address`.
    pub fn new(address: Address) -> Self {
        ServerConfig {
            address,
            ..ServerConfig::default()
        }
    }
}

pub(crate) struct Shared {
    /// The store served; kept open while the server lives.
    backend: Arc<dyn Backend>,
    config: ServerConfig,
    address: Address,
    stopping: AtomicBool,
    connections: Mutex<HashMap<u64, Stream>>,
    packing: AtomicBool,
    bytes_since_pack: AtomicU64,
    /// Commits acknowledged and records sent since the server started.
    pub(crate) commits: AtomicU64,
    pub(crate) loads: AtomicU64,
    /// Connections ended by a panic since the server started.
    pub(crate) panics: AtomicU64,
    /// Requests being handled right now (from their first byte to the
    /// last of their answer).
    pub(crate) busy: std::sync::atomic::AtomicUsize,
    /// A connection is polling its socket instead of sleeping.
    pub(crate) polling: AtomicBool,
    started: std::time::Instant,
    /// Pack threads, joined at shutdown.
    workers: Mutex<Vec<JoinHandle<()>>>,
}

impl Shared {
    /// Starts a full collection in the background unless one runs.
    pub(crate) fn start_pack(self: &Arc<Self>, why: &str) {
        if self.packing.swap(true, Ordering::AcqRel) {
            tracing::info!("pack already in progress");
            return;
        }
        self.bytes_since_pack.store(0, Ordering::Relaxed);
        tracing::info!("pack started ({why})");
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("durus-pack".into())
            .spawn(move || {
                // A shutdown stops the pack between chunks of work (the
                // background collector finishes it after the next open).
                let mut stop = || shared.stopping.load(Ordering::Acquire);
                match shared.backend.full_collection(&mut stop) {
                    Ok(r) if r.completed => tracing::info!(
                        removed = r.removed_objects,
                        bytes = r.removed_bytes,
                        live = r.live_objects,
                        "pack completed"
                    ),
                    Ok(r) => {
                        tracing::info!(removed = r.removed_objects, "pack stopped by the shutdown")
                    }
                    Err(e) => tracing::error!("pack failed: {e}"),
                }
                shared.packing.store(false, Ordering::Release);
            });
        match spawned {
            Ok(t) => {
                let mut workers = self.workers.lock();
                workers.retain(|t| !t.is_finished());
                workers.push(t);
            }
            Err(e) => {
                tracing::error!("cannot start the pack thread: {e}");
                self.packing.store(false, Ordering::Release);
            }
        }
    }

    /// The live state for `X`: one `name value` pair a line.
    pub(crate) fn live_state(&self) -> crate::Result<String> {
        use std::fmt::Write as _;
        let LiveState {
            healthy,
            objects,
            file_bytes,
            snapshots_held,
            snapshot_oldest,
            order_waiting,
            commits_not_durable,
            since_checkpoint,
            gc_queue,
            gc_waiting,
            gc_oldest,
            gc_full_running,
            gc_removed_incremental,
            gc_removed_full,
            gc_full_collections,
        } = self.backend.live_state()?;
        let mut out = String::new();
        let mut line = |name: &str, value: String| {
            let _ = writeln!(out, "{name} {value}");
        };
        line("healthy", u8::from(healthy).to_string());
        line("objects", objects.to_string());
        line("file_bytes", file_bytes.to_string());
        line("connections", self.connections.lock().len().to_string());
        line(
            "commits_total",
            self.commits.load(Ordering::Relaxed).to_string(),
        );
        line(
            "loads_total",
            self.loads.load(Ordering::Relaxed).to_string(),
        );
        line(
            "uptime_seconds",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        line("snapshots_held", snapshots_held.to_string());
        line(
            "snapshot_oldest_seconds",
            snapshot_oldest.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64())),
        );
        line(
            "connection_panics",
            self.panics.load(Ordering::Relaxed).to_string(),
        );
        line("commits_waiting_for_order", order_waiting.to_string());
        line("commits_not_durable", commits_not_durable.to_string());
        line(
            "seconds_since_checkpoint",
            format!("{:.3}", since_checkpoint.as_secs_f64()),
        );
        line("gc_queue", gc_queue.to_string());
        line("gc_waiting", gc_waiting.to_string());
        line(
            "gc_oldest_seconds",
            gc_oldest.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64())),
        );
        line("gc_full_running", u8::from(gc_full_running).to_string());
        line("gc_removed_incremental", gc_removed_incremental.to_string());
        line("gc_removed_full", gc_removed_full.to_string());
        line("gc_full_collections", gc_full_collections.to_string());
        Ok(out)
    }

    /// Counts committed bytes; starts a collection after `gcbytes`.
    pub(crate) fn committed_bytes(self: &Arc<Self>, n: u64) {
        let gcbytes = self.config.gcbytes;
        let total = self.bytes_since_pack.fetch_add(n, Ordering::Relaxed) + n;
        if gcbytes > 0 && total >= gcbytes {
            self.start_pack("gcbytes reached");
        }
    }

    fn request_stop(&self) {
        if self.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        // Wake the accept loop.
        let wake = match &self.address {
            Address::Tcp { host, port } if host == "0.0.0.0" || host.is_empty() => {
                Address::tcp("127.0.0.1", *port)
            }
            Address::Tcp { host, port } if host == "::" => Address::tcp("::1", *port),
            other => other.clone(),
        };
        let _ = wake.connect();
    }
}

/// Stops a running server from another thread (a signal handler, a test).
#[derive(Clone)]
pub struct ShutdownHandle(Arc<Shared>);

impl ShutdownHandle {
    /// Asks the server to shut down gracefully; [`Server::run`] returns once done.
    pub fn shutdown(&self) {
        self.0.request_stop();
    }
}

impl std::fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ShutdownHandle({})", self.0.address)
    }
}

/// File descriptors one connection holds: its socket, the copy the server
/// keeps to close it, and the reading and writing halves.
const FDS_PER_CONNECTION: u64 = 4;

/// File descriptors kept free for the store (the file, the commit log's
/// segments, a new segment at rotation), the listeners and the log output.
const FD_RESERVE: u64 = 32;

/// How many connections fit in `soft` open files beside the reserve (at
/// least 1).
fn connections_within(soft: u64) -> usize {
    (soft.saturating_sub(FD_RESERVE) / FDS_PER_CONNECTION).max(1) as usize
}

/// The soft limit on open files of this process (Linux: read from
/// /proc/self/limits, so the library needs no system-call crate), or
/// `None` where unknown or unlimited.
fn open_files_limit() -> Option<u64> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A bound server, ready to [`run`](Server::run).
pub struct Server {
    shared: Arc<Shared>,
    listener: Listener,
    metrics: Option<std::net::TcpListener>,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Server({})", self.shared.address)
    }
}

impl Server {
    /// Binds the address of `config` to serve the open store `store`. The
    /// server keeps the store open until [`run`](Server::run) ends, and
    /// closes it then.
    pub fn bind(store: &RedbStorage, config: ServerConfig) -> io::Result<Server> {
        Server::bind_backend(
            Arc::new(crate::store::backend::RedbBackend::new(store)),
            config,
        )
    }

    /// Binds the address of `config` to serve a new, empty in-memory store,
    /// lost when the server stops (nothing is ever written to disk): for
    /// tests and trials. It keeps Durus's semantics (invalidations,
    /// conflicts, oids, pack) with none of the redb store's background
    /// work: a pack removes at once what the root does not reach.
    pub fn bind_memory(config: ServerConfig) -> io::Result<Server> {
        Server::bind_backend(
            Arc::new(crate::backend::memory::MemoryBackend::new()),
            config,
        )
    }

    /// Binds the address of `config` to serve the PostgreSQL database at
    /// `url` (a libpq-style URL or `key=value` string), creating the
    /// durus-redb tables in an empty database. Several servers over one
    /// database are interchangeable front ends: a client may connect to
    /// any of them and sees every commit made through any other.
    #[cfg(feature = "postgres")]
    pub fn bind_database(url: &str, config: ServerConfig) -> crate::Result<Server> {
        let backend = Arc::new(crate::backend::postgres::PgBackend::open(url)?);
        backend.serve_snapshot_reads(config.snapshot_reads);
        crate::backend::postgres::PgBackend::start_heartbeat(&backend);
        if let Some(gc) = &config.database_gc {
            crate::backend::postgres::PgBackend::start_collector(&backend, gc.clone());
        }
        backend.set_cache_bytes(config.database_cache_bytes);
        if let Some(after) = config.database_alone_after {
            let _thread = crate::backend::postgres::PgBackend::start_alone(&backend, after);
        }
        Ok(Server::bind_backend(backend, config)?)
    }

    fn bind_backend(backend: Arc<dyn Backend>, mut config: ServerConfig) -> io::Result<Server> {
        if let Some(soft) = open_files_limit() {
            let fit = connections_within(soft);
            if config.max_connections > fit {
                tracing::warn!(
                    "serving at most {fit} connections instead of {} (--max-connections): \
                     the process may open {soft} files, each connection takes \
                     {FDS_PER_CONNECTION} and the store keeps {FD_RESERVE} in reserve; \
                     raise the limit (ulimit -n) to serve more",
                    config.max_connections
                );
                config.max_connections = fit;
            }
        }
        let (listener, address) = Listener::bind(&config.address).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!("cannot listen on {}: {e}", config.address),
            )
        })?;
        let metrics = match &config.metrics_address {
            Some(a) => Some(std::net::TcpListener::bind(a.as_str()).map_err(|e| {
                let hint = if e.kind() == io::ErrorKind::InvalidInput {
                    " (the metrics address is HOST:PORT, for example 127.0.0.1:9100)"
                } else {
                    ""
                };
                io::Error::new(
                    e.kind(),
                    format!("cannot listen for metrics on {a}: {e}{hint}"),
                )
            })?),
            None => None,
        };
        let server = Server {
            shared: Arc::new(Shared {
                backend,
                config,
                address,
                stopping: AtomicBool::new(false),
                connections: Mutex::new(HashMap::new()),
                packing: AtomicBool::new(false),
                bytes_since_pack: AtomicU64::new(0),
                commits: AtomicU64::new(0),
                loads: AtomicU64::new(0),
                panics: AtomicU64::new(0),
                busy: std::sync::atomic::AtomicUsize::new(0),
                polling: AtomicBool::new(false),
                workers: Mutex::new(Vec::new()),
                started: std::time::Instant::now(),
            }),
            listener,
            metrics,
        };
        if server.shared.config.stop_when_poisoned {
            let shared = Arc::downgrade(&server.shared);
            server
                .shared
                .backend
                .watch_poison(Arc::new(move |why: &str| {
                    if let Some(shared) = shared.upgrade() {
                        tracing::error!(
                            "the store takes no more commits ({why}): the server stops, so that a \
                         restart replays the commit log (see --on-poison)"
                        );
                        shared.request_stop();
                    }
                }));
        }
        Ok(server)
    }

    /// Where the metrics page listens, if it does.
    pub fn metrics_address(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().and_then(|m| m.local_addr().ok())
    }

    /// The address actually bound (with the port picked, if 0 was asked).
    pub fn address(&self) -> &Address {
        &self.shared.address
    }

    /// A handle that shuts this server down.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle(self.shared.clone())
    }

    /// Serves until shut down (by a [`ShutdownHandle`] or a client's `Q`),
    /// then stops gracefully: no new connections, commits being applied
    /// finish, every connection is closed, and the store is checkpointed and
    /// closed.
    pub fn run(self) -> crate::Result<()> {
        let shared = &self.shared;
        tracing::info!("Ready on {}", shared.address);
        if let Some(m) = self.metrics.as_ref().and_then(|m| m.try_clone().ok()) {
            if let Ok(a) = m.local_addr() {
                #[cfg(feature = "tls")]
                let scheme = if shared.config.tls.is_some() {
                    "https"
                } else {
                    "http"
                };
                #[cfg(not(feature = "tls"))]
                let scheme = "http";
                tracing::info!("metrics on {scheme}://{a}/metrics");
            }
            let sh = shared.clone();
            match std::thread::Builder::new()
                .name("durus-metrics".into())
                .spawn(move || metrics::serve(sh, m))
            {
                Ok(t) => shared.workers.lock().push(t),
                Err(e) => tracing::error!("cannot start the metrics thread: {e}"),
            }
        }
        let mut threads: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id = 0u64;
        let mut failed_accepts = 0u64;
        let mut last_accept_warning: Option<std::time::Instant> = None;
        loop {
            let accepted = self.listener.accept();
            if shared.stopping.load(Ordering::Acquire) {
                break;
            }
            let stream = match accepted {
                Ok(s) => s,
                Err(e) => {
                    // Out of file descriptors (or another transient
                    // failure): the connections being served go on; the
                    // new one waits in the backlog. One log line per 10 s.
                    failed_accepts += 1;
                    if last_accept_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                        tracing::warn!(
                            "cannot accept a connection ({failed_accepts} failures so far): {e}"
                        );
                        last_accept_warning = Some(std::time::Instant::now());
                    }
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            threads.retain(|t| !t.is_finished());
            let peer = stream.peer();
            let active = shared.connections.lock().len();
            if active >= shared.config.max_connections {
                tracing::warn!(
                    "refusing a connection from {peer}: {active} connections already (--max-connections)"
                );
                stream.shutdown();
                continue;
            }
            next_id += 1;
            let id = next_id;
            let registered = stream
                .try_clone()
                .map(|s| shared.connections.lock().insert(id, s));
            if let Err(e) = registered {
                tracing::warn!("dropping a connection from {peer}: {e}");
                continue;
            }
            tracing::debug!("connection {id} from {peer}");
            let sh = shared.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("durus-conn-{id}"))
                .spawn(move || {
                    // A panic (redb panics on some damaged pages) ends this
                    // connection only: its socket is closed and its slot
                    // under --max-connections freed, so the client is not
                    // left waiting and others can still connect.
                    let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        connection::serve(&sh, stream, &peer)
                    }));
                    if let Some(s) = sh.connections.lock().remove(&id) {
                        s.shutdown();
                    }
                    if let Err(panic) = served {
                        sh.panics.fetch_add(1, Ordering::Relaxed);
                        let what = panic
                            .downcast_ref::<&str>()
                            .map(|s| s.to_string())
                            .or_else(|| panic.downcast_ref::<String>().cloned())
                            .unwrap_or_else(|| "a panic".into());
                        tracing::error!(
                            "connection {id} from {peer} ended by a panic: {what}; \
                             the store may be damaged: stop the server and run `durus-redb check`"
                        );
                    }
                });
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => {
                    tracing::error!("cannot start a connection thread: {e}");
                    if let Some(s) = shared.connections.lock().remove(&id) {
                        s.shutdown();
                    }
                }
            }
        }
        tracing::info!("shutting down");
        drop(self.listener);
        {
            // A client between its invalidations and its commit holds the
            // order: wait for it and for every commit in line to be
            // applied, then close every connection so none starts another.
            let _held = shared.backend.hold_commits();
            for s in shared.connections.lock().values() {
                s.shutdown();
            }
        }
        for t in threads {
            let _ = t.join();
        }
        // The pack (stopped between chunks) and the metrics page.
        let workers = std::mem::take(&mut *shared.workers.lock());
        for t in workers {
            let _ = t.join();
        }
        shared.backend.close()?;
        tracing::info!("store closed");
        Ok(())
    }
}
