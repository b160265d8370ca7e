//! The durus-redb command line: one file per command.

mod backup;
mod check;
mod common;
mod database;
mod export;
mod gc;
mod migrate;
mod serve;
mod stats;
mod stop;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use durus_redb::MigrateOptions;

use crate::backup::{BackupChoice, backup_cmd};
use crate::check::check;
use crate::common::{ConnectArgs, init_logging, prepare_process};
use crate::database::is_database_url;
use crate::export::export_cmd;
use crate::gc::gc_cmd;
use crate::migrate::migrate_cmd;
use crate::serve::{ServeArgs, serve};
use crate::stats::{live_stats, stats};
use crate::stop::stop;

/// A Durus-compatible object store and server on redb.
#[derive(Parser, Debug)]
#[command(name = "durus-redb", version, about, long_about = None)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Command {
    /// Serve a store to Durus clients (Durus's protocol, as `durus -s` does).
    ///
    /// The store is created if absent. Logs `Ready on ADDRESS` once
    /// listening. SIGINT, SIGTERM and a client's `Q` (`durus-redb stop`) shut
    /// it down gracefully: commits being applied finish, the store is
    /// checkpointed and closed.
    Serve(Box<ServeArgs>),
    /// Migrate a Durus store file into a new durus-redb store, or into a
    /// PostgreSQL database.
    ///
    /// The source may also be a durus-redb store (into a database).
    /// Reads FileStorage (SHELF-1), FileStorage2 (DFS20) and SqliteStorage
    /// files, told by their first bytes, as a stream: memory does not grow
    /// with the file. Commits in batches; an interrupted run, rerun with the
    /// same arguments, resumes from its last batch. Ends by verifying the
    /// store (record count and checksum, every reference, every reference
    /// count). Exits 1 if the migration failed, 2 on bad arguments.
    Migrate {
        /// The Durus file to read (it is not changed).
        source: PathBuf,
        /// The durus-redb store to write (new, or an unfinished migration of
        /// the same source), or a PostgreSQL database URL
        /// (`postgresql://...`, an empty database or an unfinished import
        /// of the same source) to serve with `serve --database`.
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
    /// Stop a running server (sends the protocol's `Q`), and wait until it
    /// no longer accepts connections.
    ///
    /// `Q` has no answer in Durus's protocol: a server that refuses it
    /// (durus-redb answers it only from this machine by default, see `serve
    /// --admin-from`) is told from one that stops only by still accepting
    /// connections after `--wait` seconds; `stop` then fails.
    Stop {
        #[command(flatten)]
        at: ConnectArgs,
        /// How long to wait for the server to stop, in seconds.
        #[arg(long, default_value_t = 30.0)]
        wait: f64,
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
        return serve(*args);
    }
    init_logging(None, 20);
    prepare_process();
    match cli.command {
        Command::Serve(_) => unreachable!("handled above"),
        Command::Stop { at, wait } => stop(at, wait),
        Command::Gc { path, full } if is_database_url(&path) => database::gc_database(&path, full),
        Command::Stats {
            path: Some(path), ..
        } if is_database_url(&path) => database::stats_database(&path),
        Command::Check { path, repair } if is_database_url(&path) => {
            if repair {
                crate::common::fail(
                    "check --repair works on a store file; a database is repaired by its own tools",
                )
            } else {
                database::check_database(&path)
            }
        }
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
