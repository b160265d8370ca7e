//! Migration: a Durus store (a FileStorage, FileStorage2 or SqliteStorage
//! file, or any [`Storage`]) into a durus-redb store, in bounded batches,
//! resumable; and export back to a Durus FileStorage (`SHELF-1`) file.
//!
//! # How an import runs
//!
//! Records stream from the source in its order; a later record for an oid
//! replaces the earlier one. They are written in batches bounded by a number
//! of records and of bytes, each batch in one redb write transaction through
//! the engine's import path, which skips the per-commit checks (a record may
//! reference an oid a later batch brings; imported oids were never handed out
//! by `new_oid`) but keeps the reference counts exact. The same transaction
//! stores the import state under the `migration` metadata key: the source's
//! identity, the offset of the last boundary of the source consumed (where a
//! rerun resumes), and running totals. While that key exists the collector
//! leaves the store alone and a writable open other than `migrate` is refused.
//!
//! A batch may end inside a source transaction (when the transaction is
//! larger than a batch); the stored resume offset is still the last boundary
//! before it, and a rerun imports that transaction's records again, which
//! yields the same records. So an interrupted run, rerun, ends in the same
//! store as an uninterrupted one.
//!
//! # Verification
//!
//! With every batch the state keeps the number of records the store holds
//! and a checksum of them (a wrapping sum of a 64-bit hash of each record and
//! its oid: adding a record adds its hash; replacing one subtracts the old
//! hash). At the end the store is scanned afresh, in oid order, and its count
//! and checksum must equal the totals; then every reference is checked and
//! every reference count recounted. References to oids the source does not
//! hold fail the migration with the oids listed, unless dangling references
//! are explicitly allowed. Only then is the `migration` key removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

mod backup;
mod export;
mod verify;

pub use backup::{BackupFormat, BackupReport, backup};
#[cfg(feature = "postgres")]
pub(crate) use export::write_shelf;
pub use export::{ExportReport, export};

use crate::engine::Engine;
use crate::engine::layout::{
    IMPORT_STATE_VERSION, ImportState, KEY_IMPORTED, KEY_MIGRATION, RecordHash, SourceIdentity,
    decode, encode,
};
use crate::error::StorageError;
use crate::filestorage::{FileError, ReadOptions, RecordSource, SourceEvent, open_source};
use crate::record::{Oid, Record};
use crate::storage::Storage;
use crate::store::{Options, RedbStorage};
use verify::verify;

/// How to migrate.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct MigrateOptions {
    /// Largest number of records in one batch.
    pub batch_records: usize,
    /// Largest number of record bytes in one batch.
    pub batch_bytes: usize,
    /// Make every this many batches durable (the rest ride on the next
    /// durable one; the last batch and the end are always durable).
    pub durable_every: usize,
    /// If the source's last transaction is cut short, import up to the last
    /// complete transaction instead of failing.
    pub accept_torn_tail: bool,
    /// Import even if records reference oids the source does not hold.
    pub allow_dangling: bool,
}

impl Default for MigrateOptions {
    fn default() -> Self {
        MigrateOptions {
            batch_records: 10_000,
            batch_bytes: 16 << 20,
            durable_every: 8,
            accept_torn_tail: false,
            allow_dangling: false,
        }
    }
}

/// Progress of a migration, for a progress bar.
#[derive(Debug, Clone, Copy)]
#[non_exhaustive]
pub enum MigrateProgress {
    /// Importing: `position` of `total` in the source's unit (bytes for the
    /// file formats; for SQLite, row ids); records read so far.
    Import {
        /// How far the source has been read.
        position: u64,
        /// The size of the source.
        total: u64,
        /// Records read so far (this run).
        records: u64,
    },
    /// Rewriting the records in oid order (full pages), before the
    /// verification: records copied of the total.
    Repack {
        /// Records copied.
        copied: u64,
        /// Records in the store.
        total: u64,
    },
    /// Verifying: records scanned of the total.
    Verify {
        /// Records scanned.
        scanned: u64,
        /// Records in the store.
        total: u64,
    },
}

/// What a migration did.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct MigrateReport {
    /// Records read from the source by this run.
    pub records_read: u64,
    /// Bytes of records read by this run.
    pub bytes_read: u64,
    /// Records in the store at the end.
    pub objects: u64,
    /// The checksum of every record of the store.
    pub checksum: u64,
    /// The source offset this run resumed from, if it resumed.
    pub resumed_from: Option<u64>,
    /// Where an ignored torn tail of the source began.
    pub torn_tail: Option<u64>,
    /// Dangling references found (and allowed).
    pub dangling: Vec<(Oid, Oid)>,
    /// How many references dangle in all.
    pub dangling_count: u64,
    /// The highest oid imported; new oids continue above it.
    pub max_oid: Option<Oid>,
    /// Time taken by this run.
    pub elapsed: Duration,
    /// The destination already held the finished, verified migration of
    /// this source; nothing was done.
    pub already_complete: bool,
}

/// Why a migration failed. The destination is left resumable: rerunning
/// with the same source continues from the last batch.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MigrateError {
    /// The source file cannot be read (unknown format, corrupt, torn tail).
    #[error("{path}: {source}")]
    Source {
        /// The source file.
        path: String,
        /// What is wrong.
        source: FileError,
    },
    /// The source storage failed.
    #[error("reading the source storage: {0}")]
    SourceStorage(StorageError),
    /// The destination failed.
    #[error("{path}: {source}")]
    Destination {
        /// The destination file.
        path: String,
        /// What failed.
        source: StorageError,
    },
    /// The destination holds a finished store, or an unfinished import of
    /// another source.
    #[error("{0}")]
    Refused(String),
    /// The source holds references to oids it does not hold.
    #[error(
        "the source holds {count} references to oids it does not hold (first: {}); \
         rerun with dangling references allowed to import it anyway",
        show_dangling(.listed)
    )]
    Dangling {
        /// `(holder, missing)` pairs, the first ones.
        listed: Vec<(Oid, Oid)>,
        /// How many in all.
        count: u64,
    },
    /// The verification found the store different from what was imported.
    #[error("verification failed: {0}")]
    Verification(String),
}

fn show_dangling(pairs: &[(Oid, Oid)]) -> String {
    pairs
        .iter()
        .take(10)
        .map(|(h, m)| format!("{h} -> {m}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// redb's page cache while importing or exporting.
const IMPORT_CACHE_BYTES: usize = 32 << 20;
/// How much a write transaction of the repack copies.
const REPACK_BATCH_BYTES: usize = 8 << 20;

/// The hash new imports use for their checksums.
const NEW_IMPORT_HASH: RecordHash = RecordHash::Xxh3;

/// Where records come from.
trait Source {
    /// Identifies the source; file heads are hashed with `hash`.
    fn identity(&self, hash: RecordHash) -> SourceIdentity;
    /// The next event (items and boundaries, as [`RecordSource`]).
    fn next(&mut self) -> Result<Option<SourceEvent>, MigrateError>;
    fn resume_from(&mut self, offset: u64) -> Result<(), MigrateError>;
    fn position(&self) -> u64;
    fn total(&self) -> u64;
    fn torn_tail(&self) -> Option<u64>;
}

struct FileSource {
    path: PathBuf,
    inner: Box<dyn RecordSource>,
    /// The first 64 KiB of the file (empty for SQLite).
    head: Vec<u8>,
}

impl FileSource {
    fn err(&self, source: FileError) -> MigrateError {
        MigrateError::Source {
            path: self.path.display().to_string(),
            source,
        }
    }
}

impl Source for FileSource {
    fn identity(&self, hash: RecordHash) -> SourceIdentity {
        let name = std::fs::canonicalize(&self.path)
            .unwrap_or_else(|_| self.path.clone())
            .display()
            .to_string();
        SourceIdentity {
            name,
            format: format!("{:?}", self.inner.format()),
            total: self.inner.total_len(),
            head_hash: if self.head.is_empty() {
                0
            } else {
                hash.of(Oid(0), &self.head)
            },
        }
    }
    fn next(&mut self) -> Result<Option<SourceEvent>, MigrateError> {
        self.inner.next_event().map_err(|e| self.err(e))
    }
    fn resume_from(&mut self, offset: u64) -> Result<(), MigrateError> {
        self.inner.resume_from(offset).map_err(|e| self.err(e))
    }
    fn position(&self) -> u64 {
        self.inner.position()
    }
    fn total(&self) -> u64 {
        self.inner.total_len()
    }
    fn torn_tail(&self) -> Option<u64> {
        self.inner.torn_tail()
    }
}

/// A [`Storage`] as a source: every record it lists, one boundary per 1000
/// records; a rerun starts again from the first record (offset 0), which
/// yields the same store if the source did not change.
struct StorageSource<'a> {
    name: String,
    records: Box<dyn Iterator<Item = crate::Result<Record>> + 'a>,
    read: u64,
}

impl Source for StorageSource<'_> {
    fn identity(&self, _: RecordHash) -> SourceIdentity {
        SourceIdentity {
            name: self.name.clone(),
            format: "Storage".into(),
            total: 0,
            head_hash: 0,
        }
    }
    fn next(&mut self) -> Result<Option<SourceEvent>, MigrateError> {
        if self.read > 0 && self.read.is_multiple_of(1000) {
            self.read += 1;
            return Ok(Some(SourceEvent::SafePoint { offset: 0 }));
        }
        match self.records.next() {
            None => Ok(None),
            Some(Err(e)) => Err(MigrateError::SourceStorage(e)),
            Some(Ok(r)) => {
                self.read += 1;
                Ok(Some(SourceEvent::Item(crate::filestorage::SourceItem {
                    oid: r.oid(),
                    record: r.into_bytes(),
                })))
            }
        }
    }
    fn resume_from(&mut self, _offset: u64) -> Result<(), MigrateError> {
        Ok(())
    }
    fn position(&self) -> u64 {
        self.read
    }
    fn total(&self) -> u64 {
        0
    }
    fn torn_tail(&self) -> Option<u64> {
        None
    }
}

fn file_head(path: &Path) -> Result<Vec<u8>, FileError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 << 10);
    std::fs::File::open(path)?
        .take(64 << 10)
        .read_to_end(&mut head)?;
    Ok(head)
}

/// Migrates the Durus file at `source` (FileStorage, FileStorage2 or
/// SqliteStorage, told by its first bytes) into the durus-redb store at
/// `dest` (created if absent). Resumes an unfinished import of the same
/// source. `progress` is called after every batch and during verification.
pub fn migrate(
    source: &Path,
    dest: &Path,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrateReport, MigrateError> {
    let src_err = |e| MigrateError::Source {
        path: source.display().to_string(),
        source: e,
    };
    let inner = open_source(
        source,
        ReadOptions::default().with_torn_tail(options.accept_torn_tail),
    )
    .map_err(src_err)?;
    let head = if inner.format() == crate::filestorage::FileFormat::Sqlite {
        Vec::new()
    } else {
        file_head(source).map_err(src_err)?
    };
    let mut src = FileSource {
        path: source.to_path_buf(),
        inner,
        head,
    };
    let report = run(&mut src, dest, options, progress)?;
    log_finished(&report);
    Ok(report)
}

/// Migrates every record of `source` (for example a [`ClientStorage`](crate::ClientStorage)
/// on a live Durus server, which lists what is reachable from the root) into
/// the store at `dest`. An interrupted run restarts from the first record.
pub fn migrate_storage<S: Storage>(
    source: &mut S,
    name: &str,
    dest: &Path,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrateReport, MigrateError> {
    let records = source.iter_records().map_err(MigrateError::SourceStorage)?;
    let mut src = StorageSource {
        name: name.to_string(),
        records,
        read: 0,
    };
    let report = run(&mut src, dest, options, progress)?;
    log_finished(&report);
    Ok(report)
}

fn log_finished(report: &MigrateReport) {
    tracing::info!(
        records = report.records_read,
        objects = report.objects,
        seconds = report.elapsed.as_secs_f64(),
        "migration finished"
    );
}

fn run(
    src: &mut dyn Source,
    dest: &Path,
    options: &MigrateOptions,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<MigrateReport, MigrateError> {
    let started = Instant::now();
    let dest_err = |e: StorageError| MigrateError::Destination {
        path: dest.display().to_string(),
        source: e,
    };
    let existed = dest.exists();
    let open = Options::new()
        // A small page cache: memory must not grow with the store.
        .cache_bytes(IMPORT_CACHE_BYTES)
        // No commit log: every batch is its own (durable or not) redb
        // transaction, and the import state says where to resume.
        .durability(crate::Durability::Manual)
        .checkpoint(crate::Manual)
        .gc(crate::ManualGc);
    // Holds the store open for this run (the last handle closes it).
    let handle = RedbStorage::open_with(dest, &open, true).map_err(dest_err)?;
    let engine = handle.engine().clone();
    let mut report = MigrateReport::default();
    let mut state = match engine.meta_bytes(KEY_MIGRATION).map_err(dest_err)? {
        Some(bytes) => {
            let state: ImportState = decode(KEY_MIGRATION, &bytes).map_err(|_| {
                MigrateError::Refused(format!(
                    "{} holds an import state this version cannot read",
                    dest.display()
                ))
            })?;
            let identity = src.identity(state.hash);
            if state.source != identity {
                return Err(MigrateError::Refused(format!(
                    "{} holds an unfinished import of {} ({}, {} bytes); it cannot continue \
                     from {} ({}, {} bytes){}",
                    dest.display(),
                    state.source.name,
                    state.source.format,
                    state.source.total,
                    identity.name,
                    identity.format,
                    identity.total,
                    if state.source.name == identity.name {
                        ": the file changed since"
                    } else {
                        ""
                    }
                )));
            }
            tracing::info!(
                offset = state.resume_offset,
                objects = state.objects,
                "resuming an unfinished import"
            );
            report.resumed_from = Some(state.resume_offset);
            state
        }
        None => {
            let done = engine
                .meta_bytes(KEY_IMPORTED)
                .map_err(dest_err)?
                .and_then(|b| decode::<ImportState>(KEY_IMPORTED, &b).ok());
            if let Some(done) = done
                && done.source == src.identity(done.hash)
            {
                // An earlier run finished (perhaps killed just after), and
                // the store is still what it wrote, or clients changed it.
                let (count, checksum) =
                    verify::count_and_checksum(&handle, &done, progress).map_err(dest_err)?;
                if (count, checksum) != (done.objects, done.checksum) {
                    return Err(MigrateError::Refused(format!(
                        "{} holds a finished migration of {}, but it changed since ({}): \
                         clients committed to it. A migration cannot be topped up: migrate \
                         into a new file to start over",
                        dest.display(),
                        done.source.name,
                        if count == done.objects {
                            format!("its {count} records hold other data")
                        } else {
                            format!("{count} records now, {} when migrated", done.objects)
                        }
                    )));
                }
                engine.close().map_err(dest_err)?;
                tracing::info!("the migration of this source was already complete");
                return Ok(MigrateReport {
                    objects: done.objects,
                    checksum: done.checksum,
                    torn_tail: done.torn_tail,
                    already_complete: true,
                    max_oid: None,
                    elapsed: started.elapsed(),
                    ..MigrateReport::default()
                });
            }
            let objects = handle.stats().map_err(dest_err)?.objects;
            if existed && objects > 0 {
                return Err(MigrateError::Refused(format!(
                    "{} already holds a store with {objects} records; migrate into a new file",
                    dest.display()
                )));
            }
            ImportState {
                version: IMPORT_STATE_VERSION,
                source: src.identity(NEW_IMPORT_HASH),
                hash: NEW_IMPORT_HASH,
                resume_offset: 0,
                objects: 0,
                checksum: 0,
                batches: 0,
                complete: false,
                torn_tail: None,
                repacked: false,
            }
        }
    };

    if !state.complete {
        if state.resume_offset > 0 {
            src.resume_from(state.resume_offset)?;
        }
        let imported = import(&engine, src, options, &mut state, &mut report, progress);
        if let Err(e) = imported {
            tracing::warn!(
                "migration stopped: {e}; {} records are imported and a rerun resumes at source offset {}",
                state.objects,
                state.resume_offset
            );
            return Err(e);
        }
    }
    report.torn_tail = state.torn_tail;
    // Records arrive in the Durus file's order, which leaves the tables'
    // pages a half to three quarters full: rewritten in oid order and
    // compacted, the store is about a third smaller (docs/benchmarks.md).
    if !state.repacked {
        state.repacked = true;
        engine
            .repack(REPACK_BATCH_BYTES, &encode(&state), &mut |copied, total| {
                progress(MigrateProgress::Repack { copied, total })
            })
            .map_err(dest_err)?;
    }
    verify(&handle, &state, options, &mut report, progress)?;
    let max = engine.last_oid().map_err(dest_err)?;
    if let Some(m) = max {
        engine.reserve_above(m).map_err(dest_err)?;
    }
    report.max_oid = max;
    engine.finish_import(&encode(&state)).map_err(dest_err)?;
    // After the import is finished: a compaction cut short by a crash
    // leaves a whole store, only a larger file.
    engine.compact().map_err(dest_err)?;
    engine.close().map_err(dest_err)?;
    report.objects = state.objects;
    report.checksum = state.checksum;
    report.elapsed = started.elapsed();
    Ok(report)
}

fn import(
    engine: &Engine,
    src: &mut dyn Source,
    options: &MigrateOptions,
    state: &mut ImportState,
    report: &mut MigrateReport,
    progress: &mut dyn FnMut(MigrateProgress),
) -> Result<(), MigrateError> {
    let dest_err = |e: StorageError| MigrateError::Destination {
        path: engine.path().display().to_string(),
        source: e,
    };
    let batch_records = options.batch_records.max(1);
    let durable_every = options.durable_every.max(1) as u64;
    let mut batch: Vec<(Oid, Record)> = Vec::new();
    let mut batch_bytes = 0usize;
    let mut boundary = state.resume_offset;
    let flush = |batch: &mut Vec<(Oid, Record)>,
                 batch_bytes: &mut usize,
                 boundary: u64,
                 complete: bool,
                 state: &mut ImportState|
     -> Result<(), MigrateError> {
        if batch.is_empty() && !complete && boundary == state.resume_offset {
            return Ok(());
        }
        let mut next = state.clone();
        next.resume_offset = boundary;
        next.batches += 1;
        next.complete = complete;
        let added: u64 = batch.iter().fold(0u64, |s, (o, r)| {
            s.wrapping_add(state.hash.of(*o, r.as_bytes()))
        });
        let durable = complete || next.batches.is_multiple_of(durable_every);
        engine
            .import_batch(batch, durable, next.hash, |b| {
                next.objects += b.new_objects;
                next.checksum = next
                    .checksum
                    .wrapping_add(added)
                    .wrapping_sub(b.replaced_hash);
                encode(&next)
            })
            .map_err(dest_err)?;
        *state = next;
        batch.clear();
        *batch_bytes = 0;
        Ok(())
    };
    loop {
        let event = src.next()?;
        match event {
            Some(SourceEvent::Item(item)) => {
                report.records_read += 1;
                report.bytes_read += item.record.len() as u64;
                let record = Record::for_oid(item.oid, item.record).map_err(|e| {
                    MigrateError::Verification(format!(
                        "the reader handed out an invalid record for oid {}: {e}",
                        item.oid
                    ))
                })?;
                batch_bytes += record.len();
                batch.push((item.oid, record));
                if batch.len() >= batch_records || batch_bytes >= options.batch_bytes {
                    // The resume offset stays at the last boundary: a rerun
                    // imports the rest of this source transaction again.
                    flush(&mut batch, &mut batch_bytes, boundary, false, state)?;
                    progress(MigrateProgress::Import {
                        position: src.position(),
                        total: src.total(),
                        records: report.records_read,
                    });
                }
            }
            Some(SourceEvent::TransactionEnd { offset })
            | Some(SourceEvent::SafePoint { offset }) => {
                boundary = offset;
                if batch.len() >= batch_records / 2 || batch_bytes >= options.batch_bytes / 2 {
                    flush(&mut batch, &mut batch_bytes, boundary, false, state)?;
                    progress(MigrateProgress::Import {
                        position: src.position(),
                        total: src.total(),
                        records: report.records_read,
                    });
                }
            }
            None => {
                state.torn_tail = src.torn_tail();
                if let Some(at) = state.torn_tail {
                    tracing::warn!(
                        "the source's last transaction, at byte {at}, is incomplete and was not imported"
                    );
                }
                flush(&mut batch, &mut batch_bytes, boundary, true, state)?;
                progress(MigrateProgress::Import {
                    position: src.total(),
                    total: src.total(),
                    records: report.records_read,
                });
                return Ok(());
            }
        }
    }
}
