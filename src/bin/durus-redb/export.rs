//! `durus-redb export`: a store into a new Durus FileStorage file.

use std::process::ExitCode;

use crate::common::*;

/// Exports a store file, or the PostgreSQL database `source` names.
pub(crate) fn export_cmd(source: &std::path::Path, dest: &std::path::Path) -> ExitCode {
    let progress = bar(0, "exporting [{bar:40}] {percent:>3}% {pos}/{len} records");
    let result = match source
        .to_str()
        .filter(|_| crate::database::is_database_url(source))
    {
        Some(url) => durus_redb::export_database(url, dest, &mut follow(&progress)),
        None => durus_redb::export(source, dest, &mut follow(&progress)),
    };
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
