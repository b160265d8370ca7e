//! What every command shares: logging, errors, progress bars, the server address.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;
use durus_redb::{Address, StorageError};

#[derive(Args, Debug)]
pub(crate) struct ConnectArgs {
    /// Host of a TCP server.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port of a TCP server.
    #[arg(long, default_value_t = 2972)]
    port: u16,
    /// Path of a Unix domain socket (instead of host and port).
    #[arg(long)]
    address: Option<PathBuf>,
    /// PEM file of the CA that signed the server's certificate: connect
    /// with TLS (to a `serve --tls-cert` port).
    #[arg(long, conflicts_with = "address")]
    tls_ca: Option<PathBuf>,
    /// PEM file of this client's certificate, for a server that admits
    /// only clients with one (`serve --tls-client-ca`).
    #[arg(long, requires = "tls_key", requires = "tls_ca")]
    tls_cert: Option<PathBuf>,
    /// PEM file of the private key of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    tls_key: Option<PathBuf>,
}

impl ConnectArgs {
    /// The server's address: the Unix socket if given, else host and port.
    pub(crate) fn address(&self) -> Address {
        match &self.address {
            Some(p) => Address::unix(p),
            None => Address::tcp(self.host.clone(), self.port),
        }
    }

    /// Connects to the server, with TLS if --tls-ca is given.
    pub(crate) fn connect(&self) -> Result<durus_redb::ClientStorage, String> {
        let address = self.address();
        let Some(ca) = &self.tls_ca else {
            return durus_redb::ClientStorage::connect(address).map_err(|e| e.to_string());
        };
        let client = match (&self.tls_cert, &self.tls_key) {
            (Some(c), Some(k)) => Some((c.as_path(), k.as_path())),
            _ => None,
        };
        let tls =
            durus_redb::TlsClient::from_pem_files(ca, client).map_err(|e| format!("TLS: {e}"))?;
        durus_redb::ClientStorage::connect_tls(address, &tls).map_err(|e| e.to_string())
    }
}

/// Sets up logging to stderr or `logfile`, at a Durus logging level
/// (10 debug, 20 info, 30 warning, 40 error).
pub(crate) fn init_logging(logfile: Option<&std::path::Path>, level: u8) {
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
pub(crate) fn stderr_is_terminal() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stderr())
}

pub(crate) fn fail(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("durus-redb: {msg}");
    ExitCode::from(2)
}

/// Why the store at `path` did not open, said once, with what to do next:
/// a Durus file is named as one (with the `migrate` that makes a store of
/// it), a path in a missing folder names the folder.
pub(crate) fn store_error(path: &std::path::Path, e: &StorageError) -> String {
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
pub(crate) fn prepare_process() {
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

pub(crate) fn bar(total: u64, template: &str) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    bar.set_style(
        indicatif::ProgressStyle::with_template(template)
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar
}

/// A progress callback `(done, total)` that moves `bar`.
pub(crate) fn follow(bar: &indicatif::ProgressBar) -> impl FnMut(u64, u64) + '_ {
    |done, total| {
        bar.set_length(total);
        bar.set_position(done);
    }
}
