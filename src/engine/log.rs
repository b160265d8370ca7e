//! The commit log: every commit, in commit order, appended to a file beside
//! the store before it is acknowledged, so that no commit waits for redb's
//! own fsync. redb is made durable by checkpoints; opening after a crash
//! replays the log past the last checkpoint.
//!
//! The log is a directory `<store>-log/` of segment files numbered in the
//! order they were started (`00000000000000000042.seg`). A checkpoint starts
//! a new segment and, once redb is durable, deletes the older ones. A clean
//! close checkpoints and removes the directory.
//!
//! Segments are preallocated with zeros, a megabyte at a time, so that an
//! append overwrites blocks the file already has and its `fdatasync` need
//! not also commit a new file size (half the cost on ext4). An entry header
//! of zeros ends a segment's entries.
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
/// Segments grow by this much of zeros at a time.
const PREALLOC: u64 = 1 << 20;

/// The log directory of the store at `path`.
pub(crate) fn log_dir(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push("-log");
    path.with_file_name(name)
}

fn segment_name(number: u64) -> String {
    format!("{number:020}.seg")
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
    /// The segment's number.
    number: u64,
    /// Where the next entry goes.
    len: u64,
    /// Bytes of the file written (header, entries, then zeros).
    allocated: u64,
    /// The last sequence number written.
    written: u64,
    /// Bytes of the segment known to be on disk (a sync covered them).
    synced_len: u64,
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

/// A new segment: its header and a first megabyte of zeros, durable, and
/// durable in the directory.
pub(crate) struct Segment {
    file: File,
    number: u64,
}

fn create_segment(dir: &Path, number: u64) -> io::Result<Segment> {
    let path = dir.join(segment_name(number));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut start = vec![0u8; PREALLOC as usize];
    start[..8].copy_from_slice(MAGIC);
    start[8..12].copy_from_slice(&VERSION.to_le_bytes());
    file.write_all_at(&start, 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok(Segment { file, number })
}

/// Overwrites `from..to` of `file` with zeros.
fn zero(file: &File, from: u64, to: u64) -> io::Result<()> {
    if to > from {
        file.write_all_at(&vec![0u8; (to - from) as usize], from)?;
    }
    Ok(())
}

impl CommitLog {
    /// Starts a fresh log in `dir` whose first entry will be `next_seq`.
    /// Segments already there must have been applied (see [`read_log`]);
    /// they are deleted.
    pub(crate) fn start(dir: &Path, next_seq: u64) -> Result<CommitLog> {
        std::fs::create_dir_all(dir)?;
        if let Some(parent) = dir.parent()
            && !parent.as_os_str().is_empty()
        {
            sync_dir(parent)?;
        }
        let number = segments(dir)?.last().map_or(1, |(n, _)| n + 1);
        let seg = create_segment(dir, number)?;
        let log = CommitLog {
            dir: dir.to_path_buf(),
            writer: Mutex::new(Writer {
                file: Arc::new(seg.file),
                number,
                len: HEADER_LEN,
                allocated: PREALLOC,
                written: next_seq - 1,
                synced_len: HEADER_LEN,
                buf: Vec::new(),
            }),
        };
        log.remove_old()?;
        Ok(log)
    }

    /// Writes the entries of commits `first`, `first + 1`, ... (one for
    /// each item of `commits`, in order) to the OS in one write (no fsync).
    /// On failure nothing of them stays in the log.
    pub(crate) fn append_all<'a, R: Iterator<Item = &'a Record>>(
        &self,
        first: u64,
        commits: impl Iterator<Item = R>,
    ) -> Result<()> {
        let mut w = self.writer.lock();
        let w = &mut *w;
        w.buf.clear();
        let mut seq = first - 1;
        for records in commits {
            seq += 1;
            encode_entry(&mut w.buf, seq, records)?;
        }
        let end = w.len + w.buf.len() as u64;
        // Room for the entry and a zero header after it.
        if end + ENTRY_OVERHEAD as u64 > w.allocated {
            let to = (end + ENTRY_OVERHEAD as u64).max(w.allocated + PREALLOC);
            zero(&w.file, w.allocated, to)?;
            w.allocated = to;
        }
        if let Err(e) = w.file.write_all_at(&w.buf, w.len) {
            // Wipe whatever part was written, so that later entries do not
            // follow a torn one.
            zero(&w.file, w.len, end)?;
            return Err(e.into());
        }
        w.len = end;
        w.written = seq;
        if w.buf.capacity() > 1 << 20 {
            w.buf = Vec::new();
        }
        Ok(())
    }

    /// Removes the entries from `first` on if they are the last ones
    /// written (their redb commit failed after they were logged);
    /// `prev_len` is [`position`](Self::position) before them.
    pub(crate) fn unappend(&self, first: u64, prev_len: u64) -> Result<()> {
        let mut w = self.writer.lock();
        if w.written >= first {
            zero(&w.file, prev_len, w.len)?;
            w.len = prev_len;
            w.written = first - 1;
        }
        Ok(())
    }

    /// Where the next entry starts in the current segment.
    pub(crate) fn position(&self) -> u64 {
        self.writer.lock().len
    }

    /// Makes every entry written so far durable; returns the last sequence
    /// number it covers.
    pub(crate) fn sync(&self) -> Result<u64> {
        let (file, written, len, number) = {
            let w = self.writer.lock();
            (w.file.clone(), w.written, w.len, w.number)
        };
        file.sync_data()?;
        let mut w = self.writer.lock();
        if w.number == number {
            w.synced_len = w.synced_len.max(len);
        }
        Ok(written)
    }

    /// Creates the next segment (slow: call it without the commit lock),
    /// for [`switch`](Self::switch).
    pub(crate) fn prepare(&self) -> Result<Segment> {
        let number = self.writer.lock().number + 1;
        Ok(create_segment(&self.dir, number)?)
    }

    /// Appends go to `next` from now on, after the current segment is made
    /// durable. Call under the commit lock, so that the entries written so
    /// far are exactly those of the commits applied so far.
    pub(crate) fn switch(&self, next: Segment) -> Result<()> {
        let mut w = self.writer.lock();
        w.file.sync_data()?;
        w.file = Arc::new(next.file);
        w.number = next.number;
        w.len = HEADER_LEN;
        w.allocated = PREALLOC;
        w.synced_len = HEADER_LEN;
        Ok(())
    }

    /// Deletes every segment before the current one (a checkpoint made their
    /// entries durable in the store).
    pub(crate) fn remove_old(&self) -> Result<()> {
        let current = self.writer.lock().number;
        for (number, path) in segments(&self.dir)? {
            if number < current {
                std::fs::remove_file(path)?;
            }
        }
        Ok(())
    }

    /// Tests: the log as a power cut now would leave it, at worst: every
    /// segment file, the current one with zeros past what a sync covered.
    #[cfg(test)]
    pub(crate) fn power_cut_image(&self) -> Vec<(std::ffi::OsString, Vec<u8>)> {
        let w = self.writer.lock();
        let mut out = Vec::new();
        for (number, path) in segments(&self.dir).expect("list the log") {
            let mut data = std::fs::read(&path).expect("read a segment");
            if number == w.number {
                let keep = (w.synced_len as usize).min(data.len());
                data[keep..].fill(0);
            }
            out.push((path.file_name().expect("a name").to_owned(), data));
        }
        out
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
    for (i, (_, path)) in all.iter().enumerate() {
        let mut data = Vec::new();
        File::open(path)?.read_to_end(&mut data)?;
        if data.len() < HEADER_LEN as usize || &data[..8] != MAGIC {
            // A segment created by a checkpoint that died before its header
            // was durable holds nothing yet.
            if data.iter().all(|&b| b == 0) {
                continue;
            }
        } else {
            let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
            if version != VERSION {
                return Err(StorageError::damaged(format!(
                    "commit log segment {} has version {version}; this build reads version {VERSION}",
                    path.display()
                )));
            }
        }
        let (bad, reason) = match read_segment(&data, &mut last, &mut |c: LoggedCommit, len| {
            batch_len += len;
            batch.push(c);
            if batch_len >= batch_bytes {
                batch_len = 0;
                apply(std::mem::take(&mut batch))
            } else {
                Ok(())
            }
        })? {
            None => continue,
            Some(stop) => stop,
        };
        // A bad entry. If a later segment goes on where this one stops (this
        // segment was already applied, or only its unapplied tail is bad and
        // the next one repeats nothing), read on from there.
        let next_first = all[i + 1..].iter().find_map(|(_, p)| first_seq(p));
        if let Some(first) = next_first
            && first <= last + 1
        {
            tracing::warn!(
                segment = %path.display(),
                offset = bad,
                reason = %reason,
                "a damaged commit log entry was skipped: the next segment goes on from it"
            );
            continue;
        }
        // Damage, not a torn tail, if entries follow: after this entry in
        // this segment, or in a later segment.
        let later_data = next_first.is_some()
            || all[i + 1..].iter().any(|(_, p)| has_entries(p))
            || entry_end(&data, bad).is_some_and(|end| data[end..].iter().any(|&b| b != 0));
        apply(std::mem::take(&mut batch))?;
        return Ok((
            last,
            Some(LogStop {
                segment: path.clone(),
                offset: bad as u64,
                reason,
                later_data,
            }),
        ));
    }
    apply(batch)?;
    Ok((last, None))
}

/// Reads the entries of one segment, handing each one after `last` to
/// `take` (with its payload length) and advancing `last`. Returns where and
/// why it stopped before the segment's end, if it did.
fn read_segment(
    data: &[u8],
    last: &mut u64,
    take: &mut dyn FnMut(LoggedCommit, usize) -> Result<()>,
) -> Result<Option<(usize, String)>> {
    if data.len() < HEADER_LEN as usize || &data[..8] != MAGIC {
        return Ok(Some((0, "no segment header".into())));
    }
    let mut at = HEADER_LEN as usize;
    while at < data.len() {
        let rest = &data[at..];
        if rest.len() < ENTRY_OVERHEAD {
            if rest.iter().all(|&b| b == 0) {
                break;
            }
            return Ok(Some((at, "entry cut short".into())));
        }
        let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
        let seq = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
        if len == 0 && seq == 0 {
            // Preallocated zeros: the end of this segment's entries.
            break;
        }
        if rest.len() < ENTRY_OVERHEAD + len {
            return Ok(Some((at, "entry cut short".into())));
        }
        let payload = &rest[12..12 + len];
        let sum = u64::from_le_bytes(rest[12 + len..20 + len].try_into().expect("8 bytes"));
        if checksum(seq, payload) != sum {
            return Ok(Some((at, format!("checksum mismatch (seq {seq})"))));
        }
        if seq <= *last {
            // Already in the store (applied before the last checkpoint).
            at += ENTRY_OVERHEAD + len;
            continue;
        }
        if seq != *last + 1 {
            return Ok(Some((
                at,
                format!("entry {seq} where {} was expected", *last + 1),
            )));
        }
        let records = match decode_records(payload) {
            Ok(r) => r,
            Err(why) => return Ok(Some((at, why))),
        };
        *last = seq;
        take(LoggedCommit { seq, records }, len)?;
        at += ENTRY_OVERHEAD + len;
    }
    Ok(None)
}

/// Where the entry at `at` ends, if its declared length fits in `data`.
fn entry_end(data: &[u8], at: usize) -> Option<usize> {
    let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    let end = at.checked_add(ENTRY_OVERHEAD)?.checked_add(len)?;
    (end <= data.len()).then_some(end)
}

/// The sequence number of the first entry of the segment at `path`, if it
/// is intact.
fn first_seq(path: &Path) -> Option<u64> {
    let data = std::fs::read(path).ok()?;
    if data.len() < HEADER_LEN as usize || &data[..8] != MAGIC {
        return None;
    }
    let at = HEADER_LEN as usize;
    let end = entry_end(&data, at)?;
    let len = end - at - ENTRY_OVERHEAD;
    let seq = u64::from_le_bytes(data[at + 4..at + 12].try_into().ok()?);
    let sum = u64::from_le_bytes(data[end - 8..end].try_into().ok()?);
    (!(len == 0 && seq == 0) && checksum(seq, &data[at + 12..at + 12 + len]) == sum).then_some(seq)
}

/// Whether the segment at `path` holds at least one entry (its first entry
/// header is not zeros).
fn has_entries(path: &Path) -> bool {
    let mut first = [0u8; 12];
    File::open(path)
        .and_then(|f| f.read_exact_at(&mut first, HEADER_LEN))
        .map(|()| first.iter().any(|&b| b != 0))
        .unwrap_or(false)
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
