//! The durus-redb command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use durus_redb::{
    Address, ClientStorage, Durability, ManualGc, MigrateOptions, MigrateProgress, Options,
    Periodic, RedbStorage, Server, ServerConfig, StorageError, check_store, repair_store,
};

/// A Durus-compatible object store and server on redb.
#[derive(Parser, Debug)]
#[command(name = "durus-redb", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve a store to Durus clients (Durus's protocol, as `durus -s` does).
    ///
    /// The store is created if absent. Logs `Ready on ADDRESS` once
    /// listening. SIGINT, SIGTERM and a client's `Q` (`durus-redb stop`) shut
    /// it down gracefully: commits being applied finish, the store is
    /// checkpointed and closed.
    Serve(ServeArgs),
    /// Migrate a Durus store file into a new durus-redb store.
    ///
    /// Reads FileStorage (SHELF-1), FileStorage2 (DFS20) and SqliteStorage
    /// files, told by their first bytes, as a stream: memory does not grow
    /// with the file. Commits in batches; an interrupted run, rerun with the
    /// same arguments, resumes from its last batch. Ends by verifying the
    /// store (record count and checksum, every reference, every reference
    /// count). Exits 1 if the migration failed, 2 on bad arguments.
    Migrate {
        /// The Durus file to read (it is not changed).
        source: PathBuf,
        /// The durus-redb store to write (new, or an unfinished migration of the same source).
        dest: PathBuf,
        /// Largest number of records per batch.
        #[arg(long, default_value_t = 10_000)]
        batch_records: usize,
        /// Largest number of record bytes per batch.
        #[arg(long, default_value_t = 16 << 20)]
        batch_bytes: usize,
        /// If the source's last transaction was cut short, import up to the
        /// last complete transaction instead of failing.
        #[arg(long)]
        accept_torn_tail: bool,
        /// Import even if records reference oids the source does not hold.
        #[arg(long)]
        allow_dangling: bool,
    },
    /// Export a durus-redb store to a new Durus FileStorage (SHELF-1) file
    /// that Python Durus opens.
    Export {
        /// The durus-redb store (must not be open by a server).
        source: PathBuf,
        /// The Durus file to write (must not exist).
        dest: PathBuf,
    },
    /// Copy the store of a running durus-redb server, consistently (from
    /// one snapshot) while it goes on serving, to a new file. Restore by
    /// serving the copy (or, with --format durus, by migrating it).
    Backup {
        /// The file to write (must not exist; written under a temporary
        /// name and renamed when complete).
        dest: PathBuf,
        #[command(flatten)]
        at: ConnectArgs,
        /// A new durus-redb store, or a Durus FileStorage (SHELF-1) file.
        #[arg(long, value_enum, default_value = "redb")]
        format: BackupChoice,
    },
    /// Collect garbage in a store (not open elsewhere).
    ///
    /// By default runs the incremental collector until its queue is empty:
    /// objects whose last reference went away, and what only they reached.
    /// With --full, runs a full collection, which also reclaims cycles and
    /// objects that were never referenced: everything not reachable from the
    /// root is removed.
    Gc {
        /// The store file.
        path: PathBuf,
        /// A full collection (cycles included) instead of the incremental one.
        #[arg(long)]
        full: bool,
    },
    /// Stop a running server (sends the protocol's `Q`).
    Stop {
        #[command(flatten)]
        at: ConnectArgs,
    },
    /// Print the object count, size on disk and format version of a store
    /// file; or, without a file, ask a running durus-redb server for its
    /// live state (objects, connections, commits and loads per second,
    /// durability lag, collector progress, garbage waiting).
    Stats {
        /// The store file (not open by a server). Without it, the server at
        /// --host/--port or --address is asked.
        path: Option<PathBuf>,
        #[command(flatten)]
        at: ConnectArgs,
        /// The grace window to count the garbage still waiting out (the
        /// server's --gc-grace), in seconds.
        #[arg(long, default_value_t = 600.0)]
        gc_grace: f64,
    },
    /// Check a store: redb integrity (every page checksum), every stored
    /// reference resolves, and the reference counts equal a recount from
    /// scratch. Never writes to the store: a store that was not closed
    /// cleanly is repaired in memory to be checked, and commits waiting in
    /// its commit log are counted; a log damaged before its end (zeros or a
    /// bad entry followed by entries, a segment missing, swapped or
    /// copied), or missing after an unclean close, is reported. With
    /// --repair it writes: the file is repaired, the waiting commits
    /// applied, an older format upgraded; a damaged log is replayed up to
    /// the damage, the commits after it are named and given up, and the log
    /// is kept aside. Exits 1 if anything is wrong, 2 if the file cannot be
    /// checked at all.
    Check {
        /// The store file (must not be open by a server).
        path: PathBuf,
        /// Repair the file for good (redb's repair, the commit log applied,
        /// the format upgraded; a damaged or missing log given up, with the
        /// commits it loses named), then check it.
        #[arg(long)]
        repair: bool,
    },
}

/// What a backup writes.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum BackupChoice {
    /// A new durus-redb store.
    Redb,
    /// A Durus FileStorage (SHELF-1) file.
    Durus,
}

/// What `serve` does once the store is poisoned.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum OnPoison {
    /// Close every connection and exit with status 1 and the reason.
    Stop,
    /// Go on serving loads; refuse commits; report `healthy 0`.
    ServeLoads,
}

/// When an acknowledged commit is safe.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum DurabilityChoice {
    /// A commit is acknowledged once it is in the commit log on disk
    /// (commits arriving together share one fsync): nothing acknowledged is
    /// lost, by a crash of the server, the OS or the power.
    Fsync,
    /// A commit is acknowledged once written to the OS, and the log is
    /// fsynced every --fsync-interval: survives a kill -9 of the server (as
    /// Durus's own server does); a power cut or OS crash loses up to the
    /// interval.
    Os,
    /// No commit log: commits are durable at the next checkpoint (every
    /// second at most); any crash loses what came since.
    Checkpoint,
}

#[derive(Args, Debug)]
struct ConnectArgs {
    /// Host of a TCP server.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port of a TCP server.
    #[arg(long, default_value_t = 2972)]
    port: u16,
    /// Path of a Unix domain socket (instead of host and port).
    #[arg(long)]
    address: Option<PathBuf>,
}

impl ConnectArgs {
    /// The server's address: the Unix socket if given, else host and port.
    fn address(self) -> Address {
        match self.address {
            Some(p) => Address::unix(p),
            None => Address::tcp(self.host, self.port),
        }
    }
}

#[derive(Args, Debug)]
struct ServeArgs {
    /// The store file (created if absent).
    #[arg(long, required_unless_present = "memory")]
    file: Option<PathBuf>,
    /// Serve a new, empty store kept in memory instead of a file: lost when
    /// the server stops, nothing written to disk. For tests and trials; it
    /// keeps Durus's semantics (invalidations, conflicts, oids, pack).
    #[arg(long, conflicts_with_all = ["file", "readonly"])]
    memory: bool,
    /// Host to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on.
    #[arg(long, default_value_t = 2972)]
    port: u16,
    /// Listen on this Unix domain socket instead of TCP.
    #[arg(long)]
    address: Option<PathBuf>,
    /// Owner of the Unix socket (user name or uid), looked up through the
    /// system's user database (NSS: files, LDAP, ...).
    #[arg(long, requires = "address", value_parser = parse_owner)]
    owner: Option<u32>,
    /// Group of the Unix socket (group name or gid), looked up through the
    /// system's group database.
    #[arg(long, requires = "address", value_parser = parse_group)]
    group: Option<u32>,
    /// umask for the Unix socket's permissions (e.g. 0o077 or 077).
    #[arg(long, requires = "address", value_parser = parse_umask)]
    umask: Option<u32>,
    /// Start a full garbage collection after this many committed bytes (0: never).
    #[arg(long, default_value_t = 0)]
    gcbytes: u64,
    /// Open the store read-only (commits are refused).
    #[arg(long)]
    readonly: bool,
    /// Log to this file instead of stderr.
    #[arg(long)]
    logfile: Option<PathBuf>,
    /// Logging level: 10 debug, 20 info, 30 warning, 40 error (as Durus's).
    #[arg(long, default_value_t = 20)]
    logginglevel: u8,
    /// Connections served at once; more are refused.
    #[arg(long, default_value_t = 512)]
    max_connections: usize,
    /// Serve the live state as Prometheus text at http://HOST:PORT/metrics.
    #[arg(long)]
    metrics_address: Option<String>,
    /// The most new oids one connection may hold handed out and not yet
    /// stored; asking for more closes the connection.
    #[arg(long, default_value_t = 1 << 20)]
    max_oids_held: u64,
    /// The largest request accepted (a commit's data), in bytes.
    #[arg(long, default_value_t = 256 << 20)]
    max_frame_bytes: u32,
    /// Seconds a client may take to finish a request it has begun (a stalled
    /// committer holds the commit order at most this long).
    #[arg(long, default_value_t = 10.0)]
    request_timeout: f64,
    /// When an acknowledged commit is safe (see README for each mode's loss
    /// window).
    #[arg(long, value_enum, default_value = "fsync")]
    durability: DurabilityChoice,
    /// redb's page cache, in MiB: the largest part of the server's memory
    /// once the store has been read (the rest: some 26 KiB per connection,
    /// plus the data of a commit being applied).
    #[arg(long, default_value_t = 256)]
    cache_size: usize,
    /// Snapshot reads: each connection loads from the state of its last
    /// sync or commit, so read-only work never meets ReadConflictError (a
    /// load of an object changed since returns the version of that state).
    /// Invalidations are sent as without it: write conflicts are caught as
    /// before.
    #[arg(long)]
    snapshot_reads: bool,
    /// Seconds without a request after which a connection gives up its
    /// snapshot (its loads then answer "invalid" for objects changed since,
    /// as Durus does). While a snapshot is held the file can grow by what is
    /// written meanwhile.
    #[arg(long, default_value_t = durus_redb::DEFAULT_SNAPSHOT_IDLE.as_secs_f64())]
    snapshot_idle: f64,
    /// Seconds after which a connection's snapshot is given up however
    /// busy the connection is (it reads as Durus does until its next sync
    /// or commit): a snapshot keeps the pages later commits free from
    /// reuse, so this bounds how much the file grows under one.
    #[arg(long, default_value_t = durus_redb::DEFAULT_SNAPSHOT_MAX_AGE.as_secs_f64())]
    snapshot_max_age: f64,
    /// Seconds after which a backup (`durus-redb backup`) still copying is
    /// stopped, for the same reason; its partial copy is removed.
    #[arg(long, default_value_t = durus_redb::DEFAULT_BACKUP_MAX_AGE.as_secs_f64())]
    backup_max_age: f64,
    /// Microseconds a connection that is the only one at work polls its
    /// socket for the client's next bytes before it sleeps (a sleeping
    /// thread wakes late, tens of microseconds on a virtual machine; one
    /// client committing alone gains most). Only one connection polls at a time.
    /// 0: never poll; at most 1000000.
    #[arg(long, default_value_t = 50)]
    poll_us: u64,
    /// What the server does when the store is poisoned (a failed fsync, a
    /// full disk at a checkpoint, a commit log segment removed or shrunk
    /// under it): `stop` closes every connection and exits with status 1
    /// and the reason, so that a supervisor's restart replays the commit
    /// log; `serve-loads` goes on answering loads, refuses commits, and
    /// reports `healthy 0` in `stats` and the metrics.
    #[arg(long, value_enum, default_value_t = OnPoison::Stop)]
    on_poison: OnPoison,
    /// Seconds between fsyncs of the commit log with --durability os.
    #[arg(long, default_value_t = 1.0)]
    fsync_interval: f64,
    /// How garbage is collected in the background.
    #[arg(long, value_enum, default_value = "incremental")]
    gc: GcChoice,
    /// Seconds an object stays after a commit removed its last reference,
    /// before the background collector reclaims it. Within it the object
    /// stays loadable and a commit may reference it again (Durus keeps every
    /// object until a pack); 0 reclaims at once. A pack (`P`), --gcbytes and
    /// `durus-redb gc` ignore it.
    #[arg(long, default_value_t = 600.0)]
    gc_grace: f64,
}

/// Background garbage collection.
#[derive(ValueEnum, Clone, Copy, Debug)]
enum GcChoice {
    /// Reclaim objects once --gc-grace has passed after their last reference
    /// went, in small steps; a full collection (cycles) now and then.
    Incremental,
    /// Collect only while no commit came for a while.
    Idle,
    /// Never by itself: garbage stays until a pack (`P`, connection.pack()),
    /// `--gcbytes`, or `durus-redb gc` (Durus's own behaviour).
    Manual,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // redb panics on some damaged pages: say so plainly and exit 2 (as for
    // any file that cannot be used), not with a Rust panic's exit 101.
    std::panic::set_hook(Box::new(|info| {
        let what = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "durus-redb: internal error: {what}{at}. If it comes from redb, the store file is \
             probably damaged: run `durus-redb check` on it, and restore from a copy if it \
             reports damage."
        );
    }));
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(code) => code,
        Err(_) => ExitCode::from(2),
    }
}

fn run(cli: Cli) -> ExitCode {
    if let Command::Serve(args) = cli.command {
        return serve(args);
    }
    init_logging(None, 20);
    prepare_process();
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Stop { at } => stop(at),
        Command::Gc { path, full } => gc_cmd(&path, full),
        Command::Migrate {
            source,
            dest,
            batch_records,
            batch_bytes,
            accept_torn_tail,
            allow_dangling,
        } => migrate_cmd(&source, &dest, &{
            let mut o = MigrateOptions::default();
            o.batch_records = batch_records;
            o.batch_bytes = batch_bytes;
            o.accept_torn_tail = accept_torn_tail;
            o.allow_dangling = allow_dangling;
            o
        }),
        Command::Export { source, dest } => export_cmd(&source, &dest),
        Command::Backup { dest, at, format } => backup_cmd(&dest, at, format),
        Command::Stats {
            path: Some(path),
            gc_grace,
            ..
        } => stats(path, gc_grace),
        Command::Stats { path: None, at, .. } => live_stats(at),
        Command::Check { path, repair } => check(path, repair),
    }
}

/// Sets up logging to stderr or `logfile`, at a Durus logging level
/// (10 debug, 20 info, 30 warning, 40 error).
fn init_logging(logfile: Option<&std::path::Path>, level: u8) {
    use tracing::Level;
    let level = match level {
        0..=9 => Level::TRACE,
        10..=19 => Level::DEBUG,
        20..=29 => Level::INFO,
        30..=39 => Level::WARN,
        _ => Level::ERROR,
    };
    let builder = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_target(false);
    match logfile.map(|p| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    }) {
        Some(Ok(file)) => builder
            .with_ansi(false)
            .with_writer(std::sync::Mutex::new(file))
            .init(),
        Some(Err(e)) => {
            builder
                .with_ansi(stderr_is_terminal())
                .with_writer(std::io::stderr)
                .init();
            tracing::error!("cannot open the log file: {e}; logging to stderr");
        }
        None => builder
            .with_ansi(stderr_is_terminal())
            .with_writer(std::io::stderr)
            .init(),
    }
}

/// Colours only for a person: plain lines when stderr goes to a file or a
/// pipe.
fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("durus-redb: {msg}");
    ExitCode::from(2)
}

/// Why the store at `path` did not open, said once, with what to do next:
/// a Durus file is named as one (with the `migrate` that makes a store of
/// it), a path in a missing folder names the folder.
fn store_error(path: &std::path::Path, e: &StorageError) -> String {
    let shown = path.display().to_string();
    match e {
        StorageError::NotAStore { .. } => {
            if let Ok(format) = durus_redb::detect_format(path) {
                return format!(
                    "{shown} is a Durus {} file, not a durus-redb store: \
                     `durus-redb migrate {shown} NEW.redb` makes a store of it",
                    match format {
                        durus_redb::FileFormat::Shelf => "FileStorage (SHELF-1)",
                        durus_redb::FileFormat::FileStorage2 => "FileStorage2 (DFS20)",
                        durus_redb::FileFormat::Sqlite => "SqliteStorage",
                        _ => "storage",
                    }
                );
            }
        }
        StorageError::Io(io) if io.kind() == std::io::ErrorKind::NotFound => {
            if let Some(parent) = path.parent()
                && !parent.as_os_str().is_empty()
                && !parent.is_dir()
            {
                return format!("{shown}: the folder {} does not exist", parent.display());
            }
        }
        _ => {}
    }
    let text = e.to_string();
    if text.contains(&shown) {
        text
    } else {
        format!("{shown}: {text}")
    }
}

/// Raises the soft limit on open files to the hard limit (each connection
/// needs a few; the server caps its connections to what fits), and ignores
/// SIGXFSZ, so that a write beyond a file-size limit fails with an error
/// the store handles instead of killing the server.
fn prepare_process() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    use nix::sys::signal::{SigHandler, Signal, signal};
    if let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE)
        && soft < hard
        && let Err(e) = setrlimit(Resource::RLIMIT_NOFILE, hard, hard)
    {
        tracing::warn!("cannot raise the open-files limit from {soft} to {hard}: {e}");
    }
    // SAFETY: SIG_IGN installs no handler code; nothing else in this
    // process sets a disposition for SIGXFSZ.
    if let Err(e) = unsafe { signal(Signal::SIGXFSZ, SigHandler::SigIgn) } {
        tracing::warn!("cannot ignore SIGXFSZ: {e}");
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    init_logging(args.logfile.as_deref(), args.logginglevel);
    prepare_process();
    if !(args.request_timeout > 0.0 && args.request_timeout.is_finite()) {
        return fail("--request-timeout must be a positive number of seconds");
    }
    if !(args.snapshot_idle > 0.0 && args.snapshot_idle.is_finite()) {
        return fail("--snapshot-idle must be a positive number of seconds");
    }
    if !(args.snapshot_max_age > 0.0 && args.snapshot_max_age.is_finite()) {
        return fail("--snapshot-max-age must be a positive number of seconds");
    }
    if !(args.backup_max_age > 0.0 && args.backup_max_age.is_finite()) {
        return fail("--backup-max-age must be a positive number of seconds");
    }
    if args.poll_us > 1_000_000 {
        return fail("--poll-us must be at most 1000000 (one second)");
    }
    if !(args.fsync_interval > 0.0 && args.fsync_interval.is_finite()) {
        return fail("--fsync-interval must be a positive number of seconds");
    }
    let durability = match args.durability {
        DurabilityChoice::Fsync => Durability::Fsync,
        DurabilityChoice::Os => Durability::Os {
            fsync_interval: std::time::Duration::from_secs_f64(args.fsync_interval),
        },
        DurabilityChoice::Checkpoint => Durability::Manual,
    };
    if !(args.gc_grace >= 0.0 && args.gc_grace.is_finite()) {
        return fail("--gc-grace must be a number of seconds, 0 or more");
    }
    let grace = std::time::Duration::from_secs_f64(args.gc_grace);
    let gc: std::sync::Arc<dyn durus_redb::GcPolicy> = match args.gc {
        GcChoice::Incremental => {
            let mut p = durus_redb::IncrementalGc::default();
            p.grace = grace;
            std::sync::Arc::new(p)
        }
        GcChoice::Idle => {
            let mut p = durus_redb::IdleGc::default();
            p.grace = grace;
            std::sync::Arc::new(p)
        }
        GcChoice::Manual => std::sync::Arc::new(ManualGc),
    };
    let Some(file) = args.file.clone() else {
        return serve_on(None, config_of(&args));
    };
    // A store this command creates is removed again if it cannot serve it.
    let created = !file.exists();
    let opened = if args.readonly {
        RedbStorage::open_read_only(&file)
    } else {
        RedbStorage::open(
            &file,
            Options::new()
                .durability(durability)
                .checkpoint(Periodic::default())
                .cache_bytes(args.cache_size.max(1) << 20)
                .gc_shared(gc),
        )
    };
    let store = match opened {
        Ok(s) => s,
        Err(e) => return fail(store_error(&file, &e)),
    };
    if created {
        tracing::info!("created a new store: {}", file.display());
    }
    serve_on(Some((store, file, created)), config_of(&args))
}

/// The server's configuration from the command line.
fn config_of(args: &ServeArgs) -> ServerConfig {
    let address = match args.address.clone() {
        Some(path) => Address::Unix {
            path,
            owner: args.owner,
            group: args.group,
            umask: args.umask,
        },
        None => Address::tcp(args.host.clone(), args.port),
    };
    let mut config = ServerConfig::default();
    config.address = address;
    config.max_connections = args.max_connections.max(1);
    config.max_frame_bytes = args.max_frame_bytes;
    config.request_timeout = std::time::Duration::from_secs_f64(args.request_timeout);
    config.gcbytes = args.gcbytes;
    config.metrics_address = args.metrics_address.clone();
    config.max_oids_held = args.max_oids_held.max(1);
    config.snapshot_reads = args.snapshot_reads;
    config.snapshot_idle = std::time::Duration::from_secs_f64(args.snapshot_idle);
    config.snapshot_max_age = std::time::Duration::from_secs_f64(args.snapshot_max_age);
    config.backup_max_age = std::time::Duration::from_secs_f64(args.backup_max_age);
    config.poll = std::time::Duration::from_micros(args.poll_us);
    config.stop_when_poisoned = matches!(args.on_poison, OnPoison::Stop);
    config
}

/// Serves `store` (a file opened, its path, and whether this command
/// created it), or a new in-memory store, until shut down.
fn serve_on(store: Option<(RedbStorage, PathBuf, bool)>, config: ServerConfig) -> ExitCode {
    let bound = match &store {
        Some((store, _, _)) => Server::bind(store, config),
        None => Server::bind_memory(config),
    };
    let server = match bound {
        Ok(s) => s,
        Err(e) => {
            if let Some((store, file, created)) = store {
                drop(store); // closes the store
                if created {
                    let _ = std::fs::remove_file(&file);
                }
            }
            return fail(e);
        }
    };
    match store {
        Some((store, file, _)) => {
            // The server holds the store open from here on.
            drop(store);
            tracing::info!(
                "Storage file={} address={}",
                file.display(),
                server.address()
            );
        }
        None => tracing::info!(
            "Storage in memory (lost when the server stops) address={}",
            server.address()
        ),
    }
    let handle = server.shutdown_handle();
    match signal_hook::iterator::Signals::new([
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGTERM,
    ]) {
        Ok(mut signals) => {
            std::thread::spawn(move || {
                if let Some(sig) = signals.forever().next() {
                    tracing::info!("signal {sig} received: shutting down");
                    handle.shutdown();
                }
            });
        }
        Err(e) => tracing::warn!("cannot handle SIGINT/SIGTERM: {e}"),
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e @ StorageError::Poisoned { .. }) => {
            tracing::error!(
                "stopped: {e}. Start the server again: opening the store replays its commit log, \
                 so no acknowledged commit is lost"
            );
            ExitCode::FAILURE
        }
        Err(e) => {
            tracing::error!("closing the store failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn stop(at: ConnectArgs) -> ExitCode {
    let address = at.address();
    match ClientStorage::connect(address.clone()).and_then(|c| c.stop_server()) {
        Ok(()) => {
            println!("asked the server on {address} to stop");
            ExitCode::SUCCESS
        }
        Err(e) => fail(format_args!("no server answers on {address}: {e}")),
    }
}

fn bar(total: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A progress callback `(done, total)` that moves `bar`.
fn follow(bar: &indicatif::ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}

fn migrate_cmd(
    source: &std::path::Path,
    dest: &std::path::Path,
    options: &MigrateOptions,
) -> ExitCode {
    let import = bar(
        0,
        "{msg:10} [{bar:40}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
    );
    import.set_message("importing");
    let mut verify: Option<indicatif::ProgressBar> = None;
    let mut repack: Option<indicatif::ProgressBar> = None;
    let result = durus_redb::migrate(source, dest, options, &mut |p| match p {
        MigrateProgress::Import {
            position, total, ..
        } => {
            import.set_length(total);
            import.set_position(position);
        }
        MigrateProgress::Repack { copied, total } => {
            let r = repack.get_or_insert_with(|| {
                import.finish();
                let r = bar(
                    total,
                    "{msg:10} [{bar:40}] {percent:>3}% {pos}/{len} records",
                );
                r.set_message("repacking");
                r
            });
            r.set_position(copied);
        }
        MigrateProgress::Verify { scanned, total } => {
            let v = verify.get_or_insert_with(|| {
                import.finish();
                if let Some(r) = &repack {
                    r.finish();
                }
                let v = bar(
                    total,
                    "{msg:10} [{bar:40}] {percent:>3}% {pos}/{len} records",
                );
                v.set_message("verifying");
                v
            });
            v.set_position(scanned);
        }
        _ => {}
    });
    import.finish();
    if let Some(v) = verify {
        v.finish();
    }
    match result {
        Ok(r) if r.already_complete => {
            println!(
                "nothing to do: {} already holds the verified migration of {} ({} records, checksum {:016x})",
                dest.display(),
                source.display(),
                r.objects,
                r.checksum
            );
            ExitCode::SUCCESS
        }
        Ok(r) => {
            let secs = r.elapsed.as_secs_f64().max(1e-9);
            if let Some(at) = r.resumed_from {
                println!("resumed:    from source offset {at}");
            }
            println!("source:     {}", source.display());
            println!("store:      {}", dest.display());
            println!(
                "read:       {} records, {} bytes in {:.1} s ({:.0} records/s, {:.1} MB/s)",
                r.records_read,
                r.bytes_read,
                secs,
                r.records_read as f64 / secs,
                r.bytes_read as f64 / secs / 1e6
            );
            println!(
                "objects:    {} (checksum {:016x}, verified)",
                r.objects, r.checksum
            );
            if r.resumed_from.is_none() && r.records_read > r.objects {
                println!(
                    "            {} of the records read were older versions of objects the \
                     file holds again later (a Durus file keeps every version until it is \
                     packed); the store keeps the last of each",
                    r.records_read - r.objects
                );
            }
            if let Some(m) = r.max_oid {
                println!("next oid:   above {m}");
            }
            if let Some(t) = r.torn_tail {
                println!("torn tail:  ignored from byte {t} (an incomplete last transaction)");
            }
            if r.dangling_count > 0 {
                println!(
                    "dangling:   {} references to missing oids (allowed)",
                    r.dangling_count
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("durus-redb: migration failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn gc_cmd(path: &std::path::Path, full: bool) -> ExitCode {
    let options = Options::new().create(false).gc(ManualGc);
    let store = match RedbStorage::open(path, options) {
        Ok(s) => s,
        Err(e) => return fail(store_error(path, &e)),
    };
    let before = store.stats().map(|s| s.objects).unwrap_or(0);
    let started = std::time::Instant::now();
    let (removed, bytes) = if full {
        let progress = bar(before, "{msg:12} [{bar:40}] {pos}/{len} {per_sec}");
        let result = store.full_collection(&mut |p| {
            match p.phase {
                durus_redb::FullPhase::Mark => {
                    progress.set_message("marking");
                    progress.set_position(p.marked.min(before));
                }
                durus_redb::FullPhase::Sweep { pass } => {
                    progress.set_message(format!("sweep {pass}"));
                    progress.set_position(p.scanned.min(before));
                }
                _ => {}
            }
            std::ops::ControlFlow::Continue(())
        });
        progress.finish();
        match result {
            Ok(r) => {
                println!("live objects: {}", r.live_objects);
                (r.removed_objects, r.removed_bytes)
            }
            Err(e) => return fail(format_args!("full collection failed: {e}")),
        }
    } else {
        let progress = bar(
            0,
            "collecting   {spinner} {pos} objects removed, queue {msg}",
        );
        let result = store.collect_garbage_with(&mut |r| {
            progress.set_position(r.removed_objects);
            progress.set_message(r.queue_left.to_string());
        });
        progress.finish();
        match result {
            Ok(r) => (r.removed_objects, r.removed_bytes),
            Err(e) => return fail(format_args!("collection failed: {e}")),
        }
    };
    let after = store.stats().map(|s| s.objects).unwrap_or(0);
    println!(
        "reclaimed {removed} objects ({bytes} bytes) in {:.2} s; {after} objects remain{}",
        started.elapsed().as_secs_f64(),
        if full {
            ""
        } else {
            " (cycles and never-referenced objects need --full)"
        }
    );
    ExitCode::SUCCESS
}

fn export_cmd(source: &std::path::Path, dest: &std::path::Path) -> ExitCode {
    let progress = bar(0, "exporting [{bar:40}] {percent:>3}% {pos}/{len} records");
    let result = durus_redb::export(source, dest, &mut follow(&progress));
    progress.finish();
    match result {
        Ok(r) => {
            println!(
                "exported {} records to {} ({} bytes) in {:.1} s",
                r.records,
                dest.display(),
                r.file_bytes,
                r.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("durus-redb: export failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn backup_cmd(dest: &std::path::Path, at: ConnectArgs, format: BackupChoice) -> ExitCode {
    let address = at.address();
    let mut client = match ClientStorage::connect(address.clone()) {
        Ok(c) => c,
        Err(e) => return fail(format_args!("no server answers on {address}: {e}")),
    };
    let format = match format {
        BackupChoice::Redb => durus_redb::BackupFormat::Store,
        BackupChoice::Durus => durus_redb::BackupFormat::Durus,
    };
    let progress = bar(0, "backing up [{bar:40}] {percent:>3}% {pos}/{len} records");
    let result = durus_redb::backup(&mut client, dest, format, &mut follow(&progress));
    progress.finish();
    match result {
        Ok(r) => {
            println!(
                "backed up {} records ({} bytes) from {address} to {} in {:.1} s",
                r.records,
                r.bytes,
                dest.display(),
                r.elapsed.as_secs_f64()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("durus-redb: backup failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Asks a running server for its live state twice, a second apart, and
/// prints it with the rates over that second.
fn live_stats(at: ConnectArgs) -> ExitCode {
    let address = at.address();
    let parse = |text: &str| -> std::collections::BTreeMap<String, String> {
        text.lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    let sample = |c: &mut ClientStorage| {
        c.server_state()
            .map(|t| (std::time::Instant::now(), parse(&t)))
    };
    let mut client = match ClientStorage::connect(address.clone()) {
        Ok(c) => c,
        Err(e) => return fail(format_args!("no server answers on {address}: {e}")),
    };
    let first = sample(&mut client);
    eprintln!("sampling {address} for a second, for the rates...");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let (first, second) = match (first, sample(&mut client)) {
        (Ok(a), Ok(b)) => (a, b),
        (Err(e), _) | (_, Err(e)) => {
            return fail(format_args!(
                "{address} did not give its live state (is it a durus-redb server?): {e}"
            ));
        }
    };
    let get = |m: &std::collections::BTreeMap<String, String>, k: &str| -> f64 {
        m.get(k).and_then(|v| v.parse().ok()).unwrap_or(0.0)
    };
    let secs = second.0.duration_since(first.0).as_secs_f64();
    let rate = |k: &str| (get(&second.1, k) - get(&first.1, k)) / secs;
    println!("server:           {address}");
    for (k, v) in &second.1 {
        println!("{:<26} {v}", format!("{k}:"));
    }
    println!("{:<26} {:.1}", "commits_per_second:", rate("commits_total"));
    println!("{:<26} {:.1}", "loads_per_second:", rate("loads_total"));
    ExitCode::SUCCESS
}

fn stats(path: PathBuf, gc_grace: f64) -> ExitCode {
    if !(gc_grace >= 0.0 && gc_grace.is_finite()) {
        return fail("--gc-grace must be a number of seconds, 0 or more");
    }
    let grace = std::time::Duration::from_secs_f64(gc_grace);
    let (s, waiting) = match RedbStorage::open_read_only(&path)
        .and_then(|s| Ok((s.stats()?, s.gc_waiting(grace)?)))
    {
        Ok(s) => s,
        Err(e) => return fail(store_error(&path, &e)),
    };
    println!("store:            {}", path.display());
    println!("format version:   {}", s.format_version);
    println!("objects:          {}", s.objects);
    println!("bytes on disk:    {}", s.file_bytes);
    println!("bytes stored:     {}", s.stored_bytes);
    println!("fragmented bytes: {}", s.fragmented_bytes);
    println!("referenced oids:  {}", s.referenced_objects);
    match s.gc_oldest {
        Some(age) => println!(
            "gc queue:         {} unreachable, {waiting} of them waiting out a {gc_grace} s grace window; the oldest for {:.0} s",
            s.gc_queue,
            age.as_secs_f64()
        ),
        None => println!("gc queue:         {}", s.gc_queue),
    }
    println!("next oid:         {}", s.oid_mark);
    ExitCode::SUCCESS
}

fn check(path: PathBuf, repair: bool) -> ExitCode {
    let checked = if repair {
        repair_store(&path)
    } else {
        check_store(&path)
    };
    let c = match checked {
        Ok(c) => c,
        Err(e) if e.is_damage() => {
            return fail(format_args!(
                "{}: {e}\nThe store is damaged and cannot be checked{}. Restore it from a \
                 backup (`durus-redb backup` copies a running server's store).",
                path.display(),
                if repair {
                    " or repaired"
                } else {
                    "; the file was left as it was"
                }
            ));
        }
        Err(e) => return fail(store_error(&path, &e)),
    };
    let r = &c.references;
    println!(
        "store:      {} (format version {})",
        path.display(),
        c.stats.format_version
    );
    println!(
        "integrity:  {}",
        if c.integrity_ok {
            "ok"
        } else {
            "FAILED (redb checksums or allocator state)"
        }
    );
    if c.unapplied_log_commits > 0 {
        println!(
            "commit log: {} commits not yet in the file (checked here without them; \
             `durus-redb check --repair` or any writable open applies them)",
            c.unapplied_log_commits
        );
    }
    if let Some(damage) = &c.log_damage {
        println!("commit log: {damage}");
    }
    println!("objects:    {}", r.objects);
    println!("references: {}", r.refs);
    for (holder, missing) in &r.dangling {
        println!("dangling:   oid {holder} references missing oid {missing}");
    }
    for (oid, stored, actual) in &r.count_mismatches {
        println!("refcount:   oid {oid} has count {stored}, recount says {actual}");
    }
    for (oid, why) in &r.damaged {
        println!("damaged:    oid {oid}: {why}");
    }
    let log_ok = repair || c.log_damage.is_none();
    if c.integrity_ok && r.is_clean() && log_ok {
        if c.log_damage.is_some() {
            println!("result:     clean, after giving up the commits named above");
        } else {
            println!("result:     clean");
        }
        ExitCode::SUCCESS
    } else {
        if !log_ok {
            println!(
                "advice:     the commit log holds acknowledged commits that cannot all be \
                 replayed. Keep a copy of the log directory; `durus-redb check --repair` gives \
                 up the commits after the damage and keeps the log aside"
            );
        }
        if !c.integrity_ok {
            println!(
                "advice:     redb's page checksums do not match: the file is damaged. \
                 Restore it from a backup (`durus-redb backup`); {}",
                if repair {
                    "the repair kept what redb could"
                } else {
                    "`durus-redb check --repair` keeps what redb can"
                }
            );
        }
        println!(
            "result:     {}{} dangling references, {} wrong counts, {} damaged records",
            if log_ok { "" } else { "commit log damaged, " },
            r.dangling_count,
            r.mismatch_count,
            r.damaged_count
        );
        ExitCode::FAILURE
    }
}

/// Parses a umask as Durus's command line does: `0o22`, `022` (octal with a
/// leading zero), `0x12`, or decimal.
fn parse_umask(s: &str) -> Result<u32, String> {
    let parsed = if let Some(o) = s.strip_prefix("0o").or_else(|| s.strip_prefix("0O")) {
        u32::from_str_radix(o, 8)
    } else if let Some(x) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u32::from_str_radix(x, 16)
    } else if s.len() > 1 && s.starts_with('0') {
        u32::from_str_radix(&s[1..], 8)
    } else {
        s.parse::<u32>()
    };
    match parsed {
        Ok(v) if v <= 0o777 => Ok(v),
        Ok(v) => Err(format!("umask {v:#o} is larger than 0o777")),
        Err(e) => Err(format!("invalid umask {s:?}: {e}")),
    }
}

/// A numeric uid, or the uid of a user name.
fn parse_owner(s: &str) -> Result<u32, String> {
    parse_id(s, "user", |n| {
        nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw()))
    })
}

/// A numeric gid, or the gid of a group name.
fn parse_group(s: &str) -> Result<u32, String> {
    parse_id(s, "group", |n| {
        nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw()))
    })
}

/// A number, or the id `lookup` finds for the name in the system's
/// databases (NSS: files, LDAP, ...).
fn parse_id(
    s: &str,
    what: &str,
    lookup: impl Fn(&str) -> nix::Result<Option<u32>>,
) -> Result<u32, String> {
    if let Ok(id) = s.parse::<u32>() {
        return Ok(id);
    }
    match lookup(s) {
        Ok(Some(id)) => Ok(id),
        Ok(None) => Err(format!("no {what} named {s:?}")),
        Err(e) => Err(format!("looking up {what} {s:?}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn umasks_parse_as_durus_reads_them() {
        assert_eq!(parse_umask("0o22"), Ok(0o22));
        assert_eq!(parse_umask("077"), Ok(0o77));
        assert_eq!(parse_umask("0x12"), Ok(0x12));
        assert_eq!(parse_umask("18"), Ok(18));
        assert!(parse_umask("0o1000").is_err());
        assert!(parse_umask("x").is_err());
    }

    #[test]
    fn owner_and_group_names_resolve_through_the_system() {
        assert_eq!(parse_owner("root"), Ok(0));
        assert_eq!(parse_owner("1234"), Ok(1234));
        assert_eq!(parse_group("root"), Ok(0));
        assert!(parse_owner("no-such-user-durus-redb").is_err());
        assert!(parse_group("no-such-group-durus-redb").is_err());
    }
}
