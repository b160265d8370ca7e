//! `durus-redb backup`: a consistent copy of a running server's store.

use std::process::ExitCode;

use clap::ValueEnum;

use crate::common::*;

/// What a backup writes.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub(crate) enum BackupChoice {
    /// A new durus-redb store.
    Redb,
    /// A Durus FileStorage (SHELF-1) file.
    Durus,
}

pub(crate) fn backup_cmd(
    dest: &std::path::Path,
    at: ConnectArgs,
    format: BackupChoice,
) -> ExitCode {
    let address = at.address();
    let mut client = match at.connect() {
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
