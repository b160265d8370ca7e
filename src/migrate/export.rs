//! Export of a store to a Durus FileStorage (`SHELF-1`) file.

use std::path::Path;
use std::time::{Duration, Instant};

use super::MigrateError;
use crate::error::StorageError;
use crate::filestorage::{FileError, ShelfWriter};
use crate::store::RedbStorage;

/// What an export did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct ExportReport {
    /// Records written.
    pub records: u64,
    /// Bytes of the file written.
    pub file_bytes: u64,
    /// Time taken.
    pub elapsed: Duration,
}

/// Writes every record of the store at `source` to a new Durus FileStorage
/// (`SHELF-1`) file at `dest`, in oid order, streaming. `progress` gets the
/// records written and the total.
pub fn export(
    source: &Path,
    dest: &Path,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ExportReport, MigrateError> {
    let src_err = |e: StorageError| MigrateError::Destination {
        path: source.display().to_string(),
        source: e,
    };
    write_shelf(dest, |write| {
        let store = RedbStorage::open_read_only(source).map_err(src_err)?;
        let total = store.stats().map_err(src_err)?.objects;
        let engine = store.engine().clone();
        let mut after = None;
        let mut records = 0u64;
        loop {
            let batch = engine.records_after(after, 4096).map_err(src_err)?;
            let Some(last) = batch.last() else { break };
            after = Some(last.oid());
            for r in &batch {
                write(r.oid(), r.as_bytes())?;
                records += 1;
            }
            progress(records, total);
        }
        Ok(())
    })
}

/// Writes a new Durus FileStorage (`SHELF-1`) file at `dest` (refused if
/// it exists) from the records `fill` hands to the writer it is given:
/// under a temporary name, renamed when complete, removed if anything
/// failed. Every export goes through it.
pub(crate) fn write_shelf(
    dest: &Path,
    fill: impl FnOnce(
        &mut dyn FnMut(crate::Oid, &[u8]) -> Result<(), MigrateError>,
    ) -> Result<(), MigrateError>,
) -> Result<ExportReport, MigrateError> {
    let started = Instant::now();
    if dest.exists() {
        return Err(MigrateError::Refused(format!(
            "{} exists; export writes a new file",
            dest.display()
        )));
    }
    let file_err = |e: FileError| MigrateError::Source {
        path: dest.display().to_string(),
        source: e,
    };
    let tmp = dest.with_extension("export-partial");
    let mut writer = ShelfWriter::create(&tmp).map_err(file_err)?;
    let mut records = 0u64;
    let result = fill(&mut |oid, bytes| {
        writer.write(oid, bytes).map_err(file_err)?;
        records += 1;
        Ok(())
    });
    if let Err(e) = result {
        drop(writer);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let file_bytes = match writer.finish() {
        Ok(bytes) => bytes,
        Err(e) => {
            // Its index cannot be written (oids too large for the offset
            // map, a full disk): nothing is left behind either.
            let _ = std::fs::remove_file(&tmp);
            return Err(file_err(e));
        }
    };
    std::fs::rename(&tmp, dest).map_err(|e| file_err(FileError::Io(e)))?;
    Ok(ExportReport {
        records,
        file_bytes,
        elapsed: started.elapsed(),
    })
}
