//! The verification at the end of an import.

use super::{MigrateError, MigrateOptions, MigrateProgress, MigrateReport};
use crate::engine::CheckReport;
use crate::engine::layout::ImportState;
use crate::error::StorageError;
use crate::store::RedbStorage;

/// The store's record count and the checksum of its records, as an import
/// that wrote `state` sums them.
pub(super) fn count_and_checksum(
    handle: &RedbStorage,
    state: &ImportState,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<(u64, u64), StorageError> {
    let engine = handle.engine();
    let mut count = 0u64;
    let mut checksum = 0u64;
    let mut after = None;
    loop {
        let records = engine.records_after(after, 4096)?;
        let Some(last) = records.last() else { break };
        after = Some(last.oid());
        for r in &records {
            count += 1;
            checksum = checksum.wrapping_add(state.hash.of(r.oid(), r.as_bytes()));
        }
        progress(MigrateProgress::Verify {
            scanned: count,
            total: state.objects,
        });
    }
    Ok((count, checksum))
}

/// Scans the store: count and checksum against the running totals; then
/// references and reference counts.
pub(super) fn verify(
    handle: &RedbStorage,
    state: &ImportState,
    options: &MigrateOptions,
    report: &mut MigrateReport,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<(), MigrateError> {
    let engine = handle.engine();
    let dest_err = |e: StorageError| MigrateError::Destination {
        path: engine.path().display().to_string(),
        source: e,
    };
    let (count, checksum) = count_and_checksum(handle, state, progress).map_err(dest_err)?;
    if count != state.objects || checksum != state.checksum {
        return Err(MigrateError::Verification(format!(
            "the store holds {count} records with checksum {checksum:016x}; the import wrote \
             {} records with checksum {:016x}",
            state.objects, state.checksum
        )));
    }
    let check: CheckReport = handle.check_references().map_err(dest_err)?;
    if check.damaged_count > 0 || check.mismatch_count > 0 {
        return Err(MigrateError::Verification(format!(
            "{} damaged records, {} wrong reference counts (first: {:?} {:?})",
            check.damaged_count,
            check.mismatch_count,
            check.damaged.first(),
            check.count_mismatches.first()
        )));
    }
    if check.dangling_count > 0 {
        if !options.allow_dangling {
            return Err(MigrateError::Dangling {
                listed: check.dangling.clone(),
                count: check.dangling_count,
            });
        }
        tracing::warn!(
            count = check.dangling_count,
            "imported with dangling references, as asked"
        );
    }
    report.dangling = check.dangling;
    report.dangling_count = check.dangling_count;
    Ok(())
}
