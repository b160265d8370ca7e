//! Online backup: a consistent copy of a running server's store, taken from
//! one snapshot (durus-redb's own `Y` request) while commits go on.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{MigrateError, MigrateOptions, StorageSource, run};
use crate::client::ClientStorage;
use crate::filestorage::{FileError, ShelfWriter};

/// What [`backup`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum BackupFormat {
    /// A new durus-redb store: restore by serving it.
    Store,
    /// A Durus FileStorage (`SHELF-1`) file: restore by migrating it (or by
    /// serving it with Durus).
    Durus,
}

/// What a backup did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BackupReport {
    /// Records copied.
    pub records: u64,
    /// Bytes of the records copied.
    pub bytes: u64,
    /// Wall time.
    pub elapsed: Duration,
}

/// Copies every record of the durus-redb server `client` is connected to,
/// all from one snapshot of its store, into a new file at `dest`, while
/// the server goes on serving. The copy is written under a temporary name
/// in `dest`'s directory and renamed into place once complete (a stopped
/// backup leaves no `dest`). `progress` gets the records copied and the
/// total.
pub fn backup(
    client: &mut ClientStorage,
    dest: &Path,
    format: BackupFormat,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<BackupReport, MigrateError> {
    let started = Instant::now();
    if dest.exists() {
        return Err(MigrateError::Refused(format!(
            "{} exists; a backup writes a new file",
            dest.display()
        )));
    }
    let tmp = temporary(dest);
    remove(&tmp);
    remove_stale(dest);
    let (total, records) = client.snapshot().map_err(MigrateError::SourceStorage)?;
    let mut report = BackupReport::default();
    let result = match format {
        BackupFormat::Store => {
            let (mut n, mut bytes) = (0u64, 0u64);
            let counted = records.inspect(|r| {
                if let Ok(r) = r {
                    n += 1;
                    bytes += r.len() as u64;
                    if n.is_multiple_of(1000) || n == total {
                        progress(n, total);
                    }
                }
            });
            let mut src = StorageSource {
                name: format!("a snapshot of {}", client_name(dest)),
                records: Box::new(counted),
                read: 0,
            };
            let r = run(&mut src, &tmp, &MigrateOptions::default(), &mut |_| {});
            drop(src);
            report.records = n;
            report.bytes = bytes;
            r.map(|_| ())
        }
        BackupFormat::Durus => (|| {
            let file_err = |e: FileError| MigrateError::Source {
                path: tmp.display().to_string(),
                source: e,
            };
            let mut w = ShelfWriter::create(&tmp).map_err(file_err)?;
            for r in records {
                let r = r.map_err(MigrateError::SourceStorage)?;
                w.write(r.oid(), r.as_bytes()).map_err(file_err)?;
                report.records += 1;
                report.bytes += r.len() as u64;
                if report.records.is_multiple_of(1000) || report.records == total {
                    progress(report.records, total);
                }
            }
            w.finish().map_err(file_err)?;
            Ok(())
        })(),
    };
    if let Err(e) = result {
        remove(&tmp);
        return Err(e);
    }
    if report.records != total {
        remove(&tmp);
        return Err(MigrateError::Verification(format!(
            "the snapshot announced {total} records and {} came",
            report.records
        )));
    }
    std::fs::rename(&tmp, dest).map_err(|e| MigrateError::Destination {
        path: dest.display().to_string(),
        source: e.into(),
    })?;
    if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    report.elapsed = started.elapsed();
    tracing::info!(
        records = report.records,
        bytes = report.bytes,
        seconds = report.elapsed.as_secs_f64(),
        "backup to {} finished",
        dest.display()
    );
    Ok(report)
}

fn client_name(dest: &Path) -> String {
    format!("a durus-redb server (backup to {})", dest.display())
}

/// The temporary name of a backup to `dest`, in the same directory.
fn temporary(dest: &Path) -> PathBuf {
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "backup".into());
    dest.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Removes what killed backups to `dest` left: temporary files (and their
/// stores' logs) named for a process that no longer runs. Where there is
/// no `/proc` to tell, nothing is removed.
fn remove_stale(dest: &Path) {
    let (Some(dir), Some(name)) = (dest.parent(), dest.file_name()) else {
        return;
    };
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let proc = Path::new("/proc");
    if !proc.join("self").exists() {
        return;
    }
    let prefix = format!(".{}.partial-", name.to_string_lossy());
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let file = e.file_name().to_string_lossy().into_owned();
        let Some(pid) = file.strip_prefix(&prefix) else {
            continue;
        };
        if pid
            .parse::<u32>()
            .is_ok_and(|pid| !proc.join(pid.to_string()).exists())
        {
            tracing::info!(
                "removing {}, left by a backup that did not finish",
                e.path().display()
            );
            remove(&e.path());
        }
    }
}

/// Removes a temporary file and the commit log a store there may have.
fn remove(tmp: &Path) {
    let _ = std::fs::remove_file(tmp);
    let _ = std::fs::remove_dir_all(crate::engine::log::log_dir(tmp));
}
