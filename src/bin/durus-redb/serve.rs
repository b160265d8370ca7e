//! `durus-redb serve`: Durus's storage server on a store file (or in memory).

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use durus_redb::{
    Address, AdminFrom, Durability, ManualGc, Options, Periodic, RedbStorage, Server, ServerConfig,
    StorageError,
};

use crate::common::*;

/// Who may send `Q` (stop) and `X` (live state).
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum AdminChoice {
    /// Every client, as Durus's server.
    Any,
    /// Clients on this machine: the Unix socket, or TCP from a loopback
    /// address.
    Local,
    /// Nobody: stop the server with SIGTERM, read its state from
    /// --metrics-address.
    None,
}

/// What `serve` does once the store is poisoned.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum OnPoison {
    /// Close every connection and exit with status 1 and the reason.
    Stop,
    /// Go on serving loads; refuse commits; report `healthy 0`.
    ServeLoads,
}

/// When an acknowledged commit is safe.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum DurabilityChoice {
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
pub(crate) struct ServeArgs {
    /// The store file (created if absent).
    #[arg(long, required_unless_present_any = ["memory", "database"])]
    file: Option<PathBuf>,
    /// Serve a PostgreSQL database instead of a file: a libpq-style URL
    /// (`postgresql://user@host:port/dbname`, several hosts with
    /// `target_session_attrs=read-write` for failover) or `key=value`
    /// string. The tables are created in an empty database. Several
    /// servers over one database are interchangeable front ends.
    #[arg(long, value_name = "URL", conflicts_with_all = ["file", "memory", "readonly"])]
    database: Option<String>,
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
    /// plus the data of a commit being applied). With --database: the
    /// records kept for loads while the front end holds the database alone
    /// (see --alone-after).
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
    /// Who may send the administrative requests `Q` (stop the server, as
    /// `durus-redb stop` does) and `X` (its live state, as `durus-redb
    /// stats --port` reads it). A refused request is logged with the
    /// client's address and closes that client's connection only.
    #[arg(long, value_enum, default_value_t = AdminChoice::Local)]
    admin_from: AdminChoice,
    /// PEM file of the server's certificate (its chain): with --tls-key,
    /// the TCP port speaks TLS, and clients connect with
    /// `durus_redb.client.TLSClientStorage` (Python) or
    /// `ClientStorage::connect_tls` (Rust). A Unix socket stays plain:
    /// the owner, group and mode of its file are its access control.
    #[arg(long, requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// PEM file of a CA: only clients with a certificate it signed are
    /// admitted (mutual TLS, which is then the authentication). Needs
    /// --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_client_ca: Option<PathBuf>,
    /// A client whose certificate (signed by --tls-client-ca) has this
    /// common name may also send `Q` and `X`, from wherever it connects
    /// (beside --admin-from). Repeatable.
    #[arg(
        long = "admin-cert-cn",
        value_name = "NAME",
        requires = "tls_client_ca"
    )]
    admin_cert_cn: Vec<String>,
    /// Seconds between fsyncs of the commit log with --durability os.
    #[arg(long, default_value_t = 1.0)]
    fsync_interval: f64,
    /// Longest time, in seconds, between checkpoints while commits come in
    /// (also after 100,000 commits or 64 MiB of records, whichever comes
    /// first). A checkpoint makes the store file durable and trims the
    /// commit log; while its fsync runs, commits wait (redb has one writer).
    /// Longer: fewer such waits, a longer log to replay after a crash.
    #[arg(long, default_value_t = 1.0)]
    checkpoint_interval: f64,
    /// How garbage is collected in the background. With --database, both
    /// `incremental` and `idle` run a full collection with the grace window
    /// after --gc-after-commits commits (or a day with any commit) since the
    /// last one of any front end (looked at every 10 s, or a quarter of
    /// --gc-grace if shorter, at least 0.1 s), one front end at a time;
    /// `idle` starts it only when no commit came between two looks. A
    /// collection's own removals count as commits.
    #[arg(long, value_enum, default_value = "incremental")]
    gc: GcChoice,
    /// Seconds an object stays after a commit removed its last reference,
    /// before the background collector reclaims it. Within it the object
    /// stays loadable and a commit may reference it again (Durus keeps every
    /// object until a pack); 0 reclaims at once. A pack (`P`), --gcbytes and
    /// `durus-redb gc` ignore it. With --database: an object goes only once
    /// no commit referenced it for this long (0: at the next collection).
    #[arg(long, default_value_t = 600.0)]
    gc_grace: f64,
    /// With --database: commits (through any front end) after which the
    /// background collector starts a collection.
    #[arg(long, default_value_t = 100_000, value_parser = clap::value_parser!(u64).range(1..))]
    gc_after_commits: u64,
    /// With --database: once no other front end has committed for this
    /// many seconds, this one holds the database alone and answers loads
    /// and syncs from memory, with no database round trip. Another front
    /// end's first commit then waits for it to give way (up to about 0.1 s;
    /// 1.5 s if it died holding it). `never`: loads always read the
    /// database.
    #[arg(long, default_value = "10", value_parser = parse_alone_after)]
    alone_after: AloneAfter,
}

/// `--alone-after`: seconds, or never.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AloneAfter(Option<std::time::Duration>);

fn parse_alone_after(text: &str) -> Result<AloneAfter, String> {
    if text == "never" {
        return Ok(AloneAfter(None));
    }
    match text.parse::<f64>() {
        Ok(s) if s.is_finite() && s >= 0.0 => {
            Ok(AloneAfter(Some(std::time::Duration::from_secs_f64(s))))
        }
        _ => Err(format!(
            "`{text}` is neither a number of seconds (0 or more) nor `never`"
        )),
    }
}

/// Background garbage collection.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum GcChoice {
    /// Reclaim objects once --gc-grace has passed after their last reference
    /// went, in small steps; a full collection (cycles) now and then. (On a
    /// database: full collections only, see --gc.)
    Incremental,
    /// Collect only while no commit came for a while.
    Idle,
    /// Never by itself: garbage stays until a pack (`P`, connection.pack()),
    /// `--gcbytes`, or `durus-redb gc` (Durus's own behaviour).
    Manual,
}

pub(crate) fn serve(args: ServeArgs) -> ExitCode {
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
    if !(args.checkpoint_interval > 0.0 && args.checkpoint_interval.is_finite()) {
        return fail("--checkpoint-interval must be a positive number of seconds");
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
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => {
            if args.address.is_some() {
                return fail(
                    "--tls-cert is for the TCP port; a Unix socket (--address) stays plain \
                     (its file's owner, group and mode are its access control)",
                );
            }
            match durus_redb::TlsServer::from_pem_files(cert, key, args.tls_client_ca.as_deref()) {
                Ok(t) => Some(t),
                Err(e) => return fail(format_args!("TLS: {e}")),
            }
        }
        _ => None,
    };
    let mut config = config_of(&args, tls);
    if let Some(url) = &args.database {
        config.database_gc = match args.gc {
            GcChoice::Manual => None,
            choice => {
                let mut gc = durus_redb::DatabaseGc::default();
                gc.grace = grace;
                gc.after_commits = args.gc_after_commits;
                // A short window is not made longer by the wait for the
                // next look.
                gc.check_every = (grace / 4).clamp(
                    std::time::Duration::from_millis(100),
                    std::time::Duration::from_secs(10),
                );
                gc.idle_only = matches!(choice, GcChoice::Idle);
                Some(gc)
            }
        };
        config.database_alone_after = args.alone_after.0;
        config.database_cache_bytes = args.cache_size.max(1) << 20;
        return serve_on(Source::Database(url), config);
    }
    let Some(file) = args.file.clone() else {
        return serve_on(Source::Memory, config);
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
                .checkpoint({
                    let mut p = Periodic::default();
                    p.max_interval = std::time::Duration::from_secs_f64(args.checkpoint_interval);
                    p
                })
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
    serve_on(Source::File(Box::new(store), file, created), config)
}

/// The server's configuration from the command line.
pub(crate) fn config_of(args: &ServeArgs, tls: Option<durus_redb::TlsServer>) -> ServerConfig {
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
    config.admin_from = match args.admin_from {
        AdminChoice::Any => AdminFrom::Any,
        AdminChoice::Local => AdminFrom::Local,
        AdminChoice::None => AdminFrom::Nobody,
    };
    config.tls = tls;
    config.admin_cert_names = args.admin_cert_cn.clone();
    config
}

/// What `serve` serves.
pub(crate) enum Source<'a> {
    /// A store file opened, its path, and whether this command created it.
    File(Box<RedbStorage>, PathBuf, bool),
    /// A new in-memory store.
    Memory,
    /// The PostgreSQL database at this URL.
    Database(&'a str),
}

/// Serves `source` until shut down.
pub(crate) fn serve_on(source: Source<'_>, config: ServerConfig) -> ExitCode {
    let bound = match &source {
        Source::File(store, _, _) => {
            Server::bind(store.as_ref(), config).map_err(|e| e.to_string())
        }
        Source::Memory => Server::bind_memory(config).map_err(|e| e.to_string()),
        Source::Database(url) => Server::bind_database(url, config).map_err(|e| e.to_string()),
    };
    let server = match bound {
        Ok(s) => s,
        Err(e) => {
            if let Source::File(store, file, created) = source {
                drop(store); // closes the store
                if created {
                    let _ = std::fs::remove_file(&file);
                }
            }
            return fail(e);
        }
    };
    match source {
        Source::File(store, file, _) => {
            // The server holds the store open from here on.
            drop(store);
            tracing::info!(
                "Storage file={} address={}",
                file.display(),
                server.address()
            );
        }
        Source::Memory => tracing::info!(
            "Storage in memory (lost when the server stops) address={}",
            server.address()
        ),
        Source::Database(url) => tracing::info!(
            "Storage database={} address={}",
            durus_redb::redact_database_url(url),
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

/// Parses a umask as Durus's command line does: `0o22`, `022` (octal with a
/// leading zero), `0x12`, or decimal.
pub(crate) fn parse_umask(s: &str) -> Result<u32, String> {
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
pub(crate) fn parse_owner(s: &str) -> Result<u32, String> {
    parse_id(s, "user", |n| {
        nix::unistd::User::from_name(n).map(|u| u.map(|u| u.uid.as_raw()))
    })
}

/// A numeric gid, or the gid of a group name.
pub(crate) fn parse_group(s: &str) -> Result<u32, String> {
    parse_id(s, "group", |n| {
        nix::unistd::Group::from_name(n).map(|g| g.map(|g| g.gid.as_raw()))
    })
}

/// A number, or the id `lookup` finds for the name in the system's
/// databases (NSS: files, LDAP, ...).
pub(crate) fn parse_id(
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
