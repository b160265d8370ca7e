//! The commit log: every commit, in commit order, appended to a file beside
//! the store before it is acknowledged, so that no commit waits for redb's
//! own fsync. redb is made durable by checkpoints; opening after a crash
//! replays the log past the last checkpoint.
//!
//! The log is a directory `<store>-log/` of segment files named by the
//! sequence number of their first entry (`00000000000000000042.seg`). A
//! checkpoint starts a new segment and, once redb is durable, deletes the
//! older ones. A clean close checkpoints and removes the directory.
//!
//! Segment: a 16-byte header (`DRLOG\0\0\0`, u32 LE version, u32 LE 0), then
//! entries:
//!
//! ```text
//! u32 LE payload length | u64 LE seq | payload | u64 LE xxh3-64 of (seq LE ++ payload)
//! payload = records, each u32 LE length | record bytes (oid | u32 len | data | refs)
//! ```
//!
//! A reader stops at the first entry that is cut short or whose checksum or
//! sequence number is wrong: everything before it is the log.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};

const MAGIC: &[u8; 8] = b"DRLOG\0\0\0";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 16;
/// Length prefix, seq, checksum.
const ENTRY_OVERHEAD: usize = 4 + 8 + 8;

/// The log directory of the store at `path`.
pub(crate) fn log_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("-log");
    path.with_file_name(name)
}

fn segment_name(first_seq: u64) -> String {
    format!("{first_seq:020}.seg")
}

fn checksum(seq: u64, payload: &[u8]) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(&seq.to_le_bytes());
    h.update(payload);
    h.digest()
}

/// Appends one entry for `records` with `seq` to `buf`.
pub(crate) fn encode_entry<'a>(
    buf: &mut Vec<u8>,
    seq: u64,
    records: impl Iterator<Item = &'a Record>,
) -> Result<()> {
    let start = buf.len();
    buf.extend_from_slice(&[0; 12]);
    for r in records {
        let len = u32::try_from(r.len())
            .map_err(|_| io::Error::other("a record of 4 GiB or more cannot be logged"))?;
        buf.extend_from_slice(&len.to_le_bytes());
        buf.extend_from_slice(r.as_bytes());
    }
    let payload_len = buf.len() - start - 12;
    let len = u32::try_from(payload_len)
        .map_err(|_| io::Error::other("a commit of 4 GiB or more cannot be logged"))?;
    buf[start..start + 4].copy_from_slice(&len.to_le_bytes());
    buf[start + 4..start + 12].copy_from_slice(&seq.to_le_bytes());
    let sum = checksum(seq, &buf[start + 12..]);
    buf.extend_from_slice(&sum.to_le_bytes());
    Ok(())
}

/// The segment being appended to.
struct Writer {
    file: Arc<File>,
    first_seq: u64,
    /// Bytes in the file (where the next entry goes).
    len: u64,
    /// The last sequence number written.
    written: u64,
    buf: Vec<u8>,
}

/// The open commit log of a store (appends under the commit lock).
pub(crate) struct CommitLog {
    dir: PathBuf,
    writer: Mutex<Writer>,
}

impl std::fmt::Debug for CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitLog").field("dir", &self.dir).finish()
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

fn create_segment(dir: &Path, first_seq: u64) -> io::Result<File> {
    let path = dir.join(segment_name(first_seq));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut header = [0u8; HEADER_LEN as usize];
    header[..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    file.write_all_at(&header, 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok(file)
}

impl CommitLog {
    /// Starts a fresh log in `dir` whose first entry will be `next_seq`.
    /// Segments already there must have been applied (see [`read_log`]).
    pub(crate) fn start(dir: &Path, next_seq: u64) -> Result<CommitLog> {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent()
            && !parent.as_os_str().is_empty()
        {
            sync_dir(parent)?;
        }
        let file = create_segment(dir, next_seq)?;
        let log = CommitLog {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer {
                file: Arc::new(file),
                first_seq: next_seq,
                len: HEADER_LEN,
                written: next_seq - 1,
                buf: Vec::new(),
            }),
        };
        log.remove_before(next_seq)?;
        Ok(log)
    }

    /// Writes the entry of commit `seq` to the OS (no fsync). On failure
    /// nothing of it stays in the log.
    pub(crate) fn append<'a>(
        &self,
        seq: u64,
        records: impl Iterator<Item = &'a Record>,
    ) -> Result<()> {
        let mut w = self.writer.lock();
        let w = &mut *w;
        w.buf.clear();
        encode_entry(&mut w.buf, seq, records)?;
        if let Err(e) = w.file.write_all_at(&w.buf, w.len) {
            // Cut off whatever part was written, so that later entries do not
            // follow a torn one.
            w.file.set_len(w.len)?;
            return Err(e.into());
        }
        w.len += w.buf.len() as u64;
        w.written = seq;
        if w.buf.capacity() > 1 << 20 {
            w.buf = Vec::new();
        }
        Ok(())
    }

    /// Removes the entry of `seq` if it is the last one written (its commit
    /// failed after it was logged).
    pub(crate) fn unappend(&self, seq: u64, prev_len: u64) -> Result<()> {
        let mut w = self.writer.lock();
        if w.written == seq {
            w.file.set_len(prev_len)?;
            w.len = prev_len;
            w.written = seq - 1;
        }
        Ok(())
    }

    /// Bytes in the current segment (where the next entry starts).
    pub(crate) fn position(&self) -> u64 {
        self.writer.lock().len
    }

    /// Makes every entry written so far durable; returns the last sequence
    /// number it covers.
    pub(crate) fn sync(&self) -> Result<u64> {
        let (file, written) = {
            let w = self.writer.lock();
            (w.file.clone(), w.written)
        };
        file.sync_data()?;
        Ok(written)
    }

    /// Starts a new segment whose first entry will be `next_seq` (every entry
    /// written so far is below it), after making the current one durable.
    pub(crate) fn rotate(&self, next_seq: u64) -> Result<()> {
        let mut w = self.writer.lock();
        if w.first_seq == next_seq {
            return Ok(());
        }
        w.file.sync_data()?;
        let file = create_segment(&self.dir, next_seq)?;
        w.file = Arc::new(file);
        w.first_seq = next_seq;
        w.len = HEADER_LEN;
        Ok(())
    }

    /// Deletes the segments whose entries all come before `seq` (a
    /// checkpoint made them durable in the store).
    pub(crate) fn remove_before(&self, seq: u64) -> Result<()> {
        let current = self.writer.lock().first_seq;
        for (first, path) in segments(&self.dir)? {
            if first < current && first < seq {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// Removes the whole log (after a clean close made everything durable).
    pub(crate) fn remove(&self) -> Result<()> {
        remove_log(&self.dir)
    }
}

/// Removes the log directory at `dir`, if there is one.
pub(crate) fn remove_log(dir: &Path) -> Result<()> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    }
    if let Some(parent) = dir.parent()
        && !parent.as_os_str().is_empty()
    {
        sync_dir(parent)?;
    }
    Ok(())
}

/// The segments in `dir` by first sequence number; none if there is no log.
fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e.into()),
    };
    let mut out = Vec::new();
    for e in entries {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if let Some(first) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u64>().ok())
        {
            out.push((first, e.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// One logged commit.
#[derive(Debug)]
pub(crate) struct LoggedCommit {
    pub(crate) seq: u64,
    pub(crate) records: Vec<Record>,
}

/// Why reading the log stopped before the end of its last segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct LogStop {
    pub(crate) segment: PathBuf,
    pub(crate) offset: u64,
    pub(crate) reason: String,
    /// Later segments hold entries: the log is damaged before its end, not
    /// torn at its end by a crash.
    pub(crate) later_data: bool,
}

/// Reads the log in `dir` and hands `apply` each commit after `applied`, in
/// order, in groups of about `batch_bytes`. Stops at the first entry that is
/// cut short, corrupt, or out of sequence, and reports where; the commits
/// before it are the log. Returns the last sequence number handed out (or
/// `applied`) and the stop, if any.
pub(crate) fn read_log(
    dir: &Path,
    applied: u64,
    batch_bytes: usize,
    mut apply: impl FnMut(Vec<LoggedCommit>) -> Result<()>,
) -> Result<(u64, Option<LogStop>)> {
    let mut last = applied;
    let mut batch = Vec::new();
    let mut batch_len = 0usize;
    let all = segments(dir)?;
    for (i, (first, path)) in all.iter().enumerate() {
        let first = *first;
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        let later_data = all[i + 1..].iter().any(|(_, p)| {
            std::fs::metadata(p)
                .map(|m| m.len() > HEADER_LEN)
                .unwrap_or(false)
        });
        let stop = |offset: usize, reason: String| LogStop {
            segment: path.clone(),
            offset: offset as u64,
            reason,
            later_data,
        };
        if data.len() < HEADER_LEN as usize || &data[..8] != MAGIC {
            // A segment created by a checkpoint that died before its header
            // was durable holds nothing yet.
            if data.len() <= HEADER_LEN as usize && first > last {
                continue;
            }
            apply(std::mem::take(&mut batch))?;
            return Ok((last, Some(stop(0, "no segment header".into()))));
        }
        let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(StorageError::damaged(format!(
                "commit log segment {} has version {version}; this build reads version {VERSION}",
                path.display()
            )));
        }
        let mut at = HEADER_LEN as usize;
        while at < data.len() {
            let rest = &data[at..];
            if rest.len() < ENTRY_OVERHEAD {
                apply(std::mem::take(&mut batch))?;
                return Ok((last, Some(stop(at, "entry cut short".into()))));
            }
            let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
            let seq = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
            if rest.len() < ENTRY_OVERHEAD + len {
                apply(std::mem::take(&mut batch))?;
                return Ok((last, Some(stop(at, "entry cut short".into()))));
            }
            let payload = &rest[12..12 + len];
            let sum = u64::from_le_bytes(rest[12 + len..20 + len].try_into().expect("8 bytes"));
            if checksum(seq, payload) != sum {
                apply(std::mem::take(&mut batch))?;
                return Ok((
                    last,
                    Some(stop(at, format!("checksum mismatch (seq {seq})"))),
                ));
            }
            at += ENTRY_OVERHEAD + len;
            if seq <= last {
                // Already in the store (applied before the last checkpoint).
                continue;
            }
            if seq != last + 1 {
                apply(std::mem::take(&mut batch))?;
                let why = format!("entry {seq} where {} was expected", last + 1);
                return Ok((last, Some(stop(at - ENTRY_OVERHEAD - len, why))));
            }
            let records = match decode_records(payload) {
                Ok(r) => r,
                Err(why) => {
                    apply(std::mem::take(&mut batch))?;
                    return Ok((last, Some(stop(at - ENTRY_OVERHEAD - len, why))));
                }
            };
            last = seq;
            batch_len += len;
            batch.push(LoggedCommit { seq, records });
            if batch_len >= batch_bytes {
                apply(std::mem::take(&mut batch))?;
                batch_len = 0;
            }
        }
    }
    apply(batch)?;
    Ok((last, None))
}

fn decode_records(mut payload: &[u8]) -> std::result::Result<Vec<Record>, String> {
    let mut out = Vec::new();
    while !payload.is_empty() {
        if payload.len() < 4 {
            return Err("record length cut short".into());
        }
        let n = u32::from_le_bytes(payload[..4].try_into().expect("4 bytes")) as usize;
        if payload.len() < 4 + n {
            return Err("record cut short".into());
        }
        let bytes = &payload[4..4 + n];
        let oid = Oid::from_slice(bytes).ok_or("record shorter than an oid")?;
        let record = Record::from_bytes(bytes.to_vec()).map_err(|e| format!("{oid}: {e}"))?;
        out.push(record);
        payload = &payload[4 + n..];
    }
    Ok(out)
}

/// Whether the log in `dir` holds commits after `applied` (for a read-only
/// open, which cannot replay them).
pub(crate) fn commits_after(dir: &Path, applied: u64) -> Result<u64> {
    let mut n = 0;
    read_log(dir, applied, usize::MAX, |batch| {
        n += batch.len() as u64;
        Ok(())
    })?;
    Ok(n)
}
