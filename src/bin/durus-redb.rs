//! The durus-redb command line.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use durus_redb::{RedbStorage, check_store};

/// A Durus-compatible object store and server on redb.
#[derive(Parser, Debug)]
#[command(name = "durus-redb", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Print the object count, size on disk and format version of a store.
    Stats {
        /// The store file.
        path: PathBuf,
    },
    /// Check a store: redb integrity, every stored reference resolves, and
    /// the reference counts equal a recount from scratch. Exits 1 if anything
    /// is wrong, 2 if the file cannot be checked at all.
    Check {
        /// The store file (must not be open by a server).
        path: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(None, 20);
    match cli.command {
        Command::Stats { path } => stats(path),
        Command::Check { path } => check(path),
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
            builder.with_writer(std::io::stderr).init();
            tracing::error!("cannot open the log file: {e}; logging to stderr");
        }
        None => builder.with_writer(std::io::stderr).init(),
    }
}

fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("durus-redb: {msg}");
    ExitCode::from(2)
}

fn stats(path: PathBuf) -> ExitCode {
    let s = match RedbStorage::open_read_only(&path).and_then(|s| s.stats()) {
        Ok(s) => s,
        Err(e) => return fail(format_args!("{}: {e}", path.display())),
    };
    println!("store:            {}", path.display());
    println!("format version:   {}", s.format_version);
    println!("objects:          {}", s.objects);
    println!("bytes on disk:    {}", s.file_bytes);
    println!("bytes stored:     {}", s.stored_bytes);
    println!("fragmented bytes: {}", s.fragmented_bytes);
    println!("referenced oids:  {}", s.referenced_objects);
    println!("gc queue:         {}", s.gc_queue);
    println!("next oid:         {}", s.oid_mark);
    ExitCode::SUCCESS
}

fn check(path: PathBuf) -> ExitCode {
    let c = match check_store(&path) {
        Ok(c) => c,
        Err(e) => return fail(format_args!("{}: {e}", path.display())),
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
    if c.integrity_ok && r.is_clean() {
        println!("result:     clean");
        ExitCode::SUCCESS
    } else {
        println!(
            "result:     {} dangling references, {} wrong counts, {} damaged records",
            r.dangling_count, r.mismatch_count, r.damaged_count
        );
        ExitCode::FAILURE
    }
}
