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

use serde::{Deserialize, Serialize};

use crate::error::StorageError;
use crate::filestorage::{FileError, ReadOptions, RecordSource, SourceEvent, open_source};
use crate::record::{Oid, Record};
use crate::redb_store::{CheckReport, Engine, Options, RedbStorage};
use crate::storage::Storage;

/// How to migrate.
#[derive(Debug, Clone)]
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

/// The import state stored under the `migration` metadata key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct ImportState {
    /// Version of this structure.
    version: u32,
    /// What is being imported.
    source: SourceIdentity,
    /// The source offset to resume from (a boundary; 0: the beginning).
    resume_offset: u64,
    /// Records the store holds.
    objects: u64,
    /// Wrapping sum of the hashes of the records the store holds.
    checksum: u64,
    /// Batches written.
    batches: u64,
    /// The whole source has been imported; verification remains.
    complete: bool,
    /// Where an ignored torn tail began.
    torn_tail: Option<u64>,
}

/// Identifies a source, so that a rerun resumes only from the same one.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
struct SourceIdentity {
    /// What it is: the file's path, or a description of a storage.
    name: String,
    /// Its format.
    format: String,
    /// Its size when the import began (file bytes, or row ids for SQLite).
    total: u64,
    /// A hash of its first 64 KiB (files).
    head_hash: u64,
}

const STATE_VERSION: u32 = 1;

/// redb's page cache while importing or exporting.
const IMPORT_CACHE_BYTES: usize = 32 << 20;

fn encode_state(state: &ImportState) -> Vec<u8> {
    rmp_serde::to_vec_named(state).expect("the import state encodes")
}

fn decode_state(bytes: &[u8]) -> Option<ImportState> {
    rmp_serde::from_slice(bytes).ok()
}

/// A one-line description of an import state, for messages.
pub(crate) fn describe_state(bytes: &[u8]) -> String {
    match decode_state(bytes) {
        Some(s) => format!("{} ({})", s.source.name, s.source.format),
        None => "an unknown source".into(),
    }
}

/// The 64-bit hash of a record under its oid (FNV-1a, then a 64-bit mix),
/// stable across builds and platforms.
pub(crate) fn record_hash(oid: Oid, bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in oid.0.to_be_bytes().iter().chain(bytes) {
        h ^= *b as u64;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // splitmix64's finalizer spreads FNV's weak high bits.
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

/// Where records come from.
trait Source {
    fn identity(&self) -> SourceIdentity;
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
    head_hash: u64,
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
    fn identity(&self) -> SourceIdentity {
        let name = std::fs::canonicalize(&self.path)
            .unwrap_or_else(|_| self.path.clone())
            .display()
            .to_string();
        SourceIdentity {
            name,
            format: format!("{:?}", self.inner.format()),
            total: self.inner.total_len(),
            head_hash: self.head_hash,
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
    fn identity(&self) -> SourceIdentity {
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

fn head_hash(path: &Path) -> Result<u64, FileError> {
    use std::io::Read;
    let mut head = Vec::with_capacity(64 << 10);
    std::fs::File::open(path)?
        .take(64 << 10)
        .read_to_end(&mut head)?;
    Ok(record_hash(Oid(0), &head))
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
        ReadOptions {
            accept_torn_tail: options.accept_torn_tail,
        },
    )
    .map_err(src_err)?;
    let head_hash = if inner.format() == crate::filestorage::FileFormat::Sqlite {
        0
    } else {
        head_hash(source).map_err(src_err)?
    };
    let mut src = FileSource {
        path: source.to_path_buf(),
        inner,
        head_hash,
    };
    run(&mut src, dest, options, progress)
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
    run(&mut src, dest, options, progress)
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
    let open = Options {
        // A small page cache: memory must not grow with the store.
        cache_bytes: IMPORT_CACHE_BYTES,
        ..Options::with_checkpoint(crate::Manual).gc(crate::ManualGc)
    };
    let engine = Engine::open_with(dest, &open, true).map_err(dest_err)?;
    // Holds the store open for this run (the last handle closes it).
    let handle = RedbStorage::session_of(engine.clone());
    let identity = src.identity();
    let mut report = MigrateReport::default();
    let mut state = match engine
        .meta_bytes(crate::redb_store::layout::KEY_MIGRATION)
        .map_err(dest_err)?
    {
        Some(bytes) => {
            let state = decode_state(&bytes).ok_or_else(|| {
                MigrateError::Refused(format!(
                    "{} holds an import state this version cannot read",
                    dest.display()
                ))
            })?;
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
                .meta_bytes(crate::redb_store::layout::KEY_IMPORTED)
                .map_err(dest_err)?
                .and_then(|b| decode_state(&b));
            if let Some(done) = done
                && done.source == identity
            {
                // An earlier run finished (perhaps killed just after).
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
                version: STATE_VERSION,
                source: identity,
                resume_offset: 0,
                objects: 0,
                checksum: 0,
                batches: 0,
                complete: false,
                torn_tail: None,
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
    verify(&handle, &state, options, &mut report, progress)?;
    let max = engine.last_oid().map_err(dest_err)?;
    if let Some(m) = max {
        engine.reserve_above(m).map_err(dest_err)?;
    }
    report.max_oid = max;
    engine
        .finish_import(&encode_state(&state))
        .map_err(dest_err)?;
    engine.close().map_err(dest_err)?;
    report.objects = state.objects;
    report.checksum = state.checksum;
    report.elapsed = started.elapsed();
    tracing::info!(
        records = report.records_read,
        objects = report.objects,
        seconds = report.elapsed.as_secs_f64(),
        "migration finished"
    );
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
            s.wrapping_add(record_hash(*o, r.as_bytes()))
        });
        let durable = complete || next.batches.is_multiple_of(durable_every);
        engine
            .import_batch(batch, durable, |b| {
                next.objects += b.new_objects;
                next.checksum = next
                    .checksum
                    .wrapping_add(added)
                    .wrapping_sub(b.replaced_hash);
                encode_state(&next)
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

/// Scans the store: count and checksum against the running totals; then
/// references and reference counts.
fn verify(
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
    let mut count = 0u64;
    let mut checksum = 0u64;
    let mut after = None;
    loop {
        let records = engine.records_after(after, 4096).map_err(dest_err)?;
        let Some(last) = records.last() else { break };
        after = Some(last.oid());
        for r in &records {
            count += 1;
            checksum = checksum.wrapping_add(record_hash(r.oid(), r.as_bytes()));
        }
        progress(MigrateProgress::Verify {
            scanned: count,
            total: state.objects,
        });
    }
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

/// What an export did.
#[derive(Debug, Clone, Default)]
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
    let started = Instant::now();
    let src_err = |e: StorageError| MigrateError::Destination {
        path: source.display().to_string(),
        source: e,
    };
    if dest.exists() {
        return Err(MigrateError::Refused(format!(
            "{} exists; export writes a new file",
            dest.display()
        )));
    }
    let store = RedbStorage::open(
        source,
        Options {
            cache_bytes: IMPORT_CACHE_BYTES,
            ..Options::read_only()
        },
    )
    .map_err(src_err)?;
    let total = store.stats().map_err(src_err)?.objects;
    let engine = store.engine().clone();
    let file_err = |e: FileError| MigrateError::Source {
        path: dest.display().to_string(),
        source: e,
    };
    let tmp = dest.with_extension("export-partial");
    let mut writer = crate::filestorage::ShelfWriter::create(&tmp).map_err(file_err)?;
    let mut after = None;
    let mut records = 0u64;
    let result = (|| {
        loop {
            let batch = engine.records_after(after, 4096).map_err(src_err)?;
            let Some(last) = batch.last() else { break };
            after = Some(last.oid());
            for r in &batch {
                writer.write(r.oid(), r.as_bytes()).map_err(file_err)?;
                records += 1;
            }
            progress(records, total);
        }
        Ok::<_, MigrateError>(())
    })();
    if let Err(e) = result {
        drop(writer);
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let file_bytes = writer.finish().map_err(file_err)?;
    std::fs::rename(&tmp, dest).map_err(|e| file_err(FileError::Io(e)))?;
    Ok(ExportReport {
        records,
        file_bytes,
        elapsed: started.elapsed(),
    })
}
