//! `durus-redb migrate`: a Durus file (or a store) into a new store.

use std::process::ExitCode;

use durus_redb::{MigrateOptions, MigrateProgress};

use crate::common::*;

pub(crate) fn migrate_cmd(
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
    let database = dest
        .to_str()
        .filter(|d| d.starts_with("postgresql://") || d.starts_with("postgres://"));
    let shown = match database {
        Some(url) => durus_redb::redact_database_url(url),
        None => dest.display().to_string(),
    };
    let mut on_progress = |p: MigrateProgress| match p {
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
    };
    let result = match database {
        Some(url) => durus_redb::migrate_to_database(source, url, options, &mut on_progress),
        None => durus_redb::migrate(source, dest, options, &mut on_progress),
    };
    import.finish();
    if let Some(v) = verify {
        v.finish();
    }
    match result {
        Ok(r) if r.already_complete => {
            println!(
                "nothing to do: {} already holds the verified migration of {} ({} records, checksum {:016x})",
                shown,
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
            println!("store:      {shown}");
            println!(
                "read:       {} records, {} bytes in {:.1} s ({:.0} records/s, {:.1} MB/s)",
                r.records_read,
                r.bytes_read,
                secs,
                r.records_read as f64 / secs,
                r.bytes_read as f64 / secs / 1e6
            );
            if database.is_some() {
                println!("objects:    {} (every reference checked)", r.objects);
            } else {
                println!(
                    "objects:    {} (checksum {:016x}, verified)",
                    r.objects, r.checksum
                );
            }
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
