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
//! of zeros ends a segment's entries, if only zeros follow it.
//!
//! Segment, version 2: a 32-byte header, then entries:
//!
//! ```text
//! header = "DRLOG\0\0\0" | u32 LE version (2) | u32 LE 0 | u64 LE number | u64 LE first seq
//! entry  = u32 LE payload length | u64 LE seq | payload | u64 LE xxh3-64 of (seq LE ++ payload)
//! payload = records, each u32 LE length | record bytes (oid | u32 len | data | refs)
//! ```
//!
//! `number` is the one in the file's name; `first seq` is the sequence
//! number of the segment's first entry, written when the segment becomes
//! the one appended to (0 before: a segment prepared by a checkpoint that
//! died before it switched). Version 1 segments (durus-redb 0.5 and
//! earlier) have a 16-byte header without the two numbers; they are read
//! as before and replaced by version 2 at the next open.
//!
//! The reader checks, not assumes: a segment must bear its own number,
//! start where the one before it ended, and hold entries numbered one
//! after another. It stops at the first entry that is cut short, corrupt or
//! out of sequence. If anything follows that stop other than zeros and
//! entries the store already holds (an intact entry of a later commit
//! anywhere in the log, or data that is no entry), the stop is damage, not
//! a tail torn by a crash: commits that were acknowledged may be lost, and
//! the open is refused (see `engine/open.rs`).
//! While the store runs, every group sync checks that the segment it
//! synced is still the file in the log directory and has not shrunk.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;

use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};

const MAGIC: &[u8; 8] = b"DRLOG\0\0\0";
const VERSION: u32 = 2;
const HEADER_LEN: u64 = 32;
/// Version 1 segments' header: magic, version, 0.
const V1_HEADER_LEN: u64 = 16;
/// Where a version 2 header keeps the segment's first sequence number.
const FIRST_SEQ_AT: u64 = 24;
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

fn create_segment(dir: &Path, number: u64, first_seq: u64) -> io::Result<Segment> {
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
    start[16..24].copy_from_slice(&number.to_le_bytes());
    start[24..32].copy_from_slice(&first_seq.to_le_bytes());
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
        let seg = create_segment(dir, number, next_seq)?;
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
    /// Fails if the segment was removed, replaced or shrunk under the
    /// store: what it covers is then not known to be on disk.
    pub(crate) fn sync(&self) -> Result<u64> {
        let (file, written, len, number, allocated) = {
            let w = self.writer.lock();
            (w.file.clone(), w.written, w.len, w.number, w.allocated)
        };
        file.sync_data()?;
        if let Err(e) = self.verify(&file, number, allocated)
            && self.writer.lock().number == number
        {
            // (A segment switched away from meanwhile was synced by the
            // switch, and a checkpoint may have removed it since.)
            return Err(e);
        }
        let mut w = self.writer.lock();
        if w.number == number {
            w.synced_len = w.synced_len.max(len);
        }
        Ok(written)
    }

    /// Checks that `file`, segment `number` with `allocated` bytes written,
    /// is still the file of that name in the log directory, at least that
    /// long.
    fn verify(&self, file: &File, number: u64, allocated: u64) -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let path = self.dir.join(segment_name(number));
        let open = file.metadata()?;
        let named = match std::fs::metadata(&path) {
            Ok(m) => Some(m),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(e.into()),
        };
        let what = match named {
            None => "was removed".to_string(),
            Some(m) if (m.dev(), m.ino()) != (open.dev(), open.ino()) => {
                "was replaced by another file".to_string()
            }
            Some(_) if open.len() < allocated => {
                format!("shrank to {} bytes, {allocated} were written", open.len())
            }
            Some(_) => return Ok(()),
        };
        Err(StorageError::damaged(format!(
            "the commit log segment {} {what} while the store was open: \
             commits logged in it are not known to be on disk",
            path.display()
        )))
    }

    /// Creates the next segment (slow: call it without the commit lock),
    /// for [`switch`](Self::switch).
    pub(crate) fn prepare(&self) -> Result<Segment> {
        let number = self.writer.lock().number + 1;
        Ok(create_segment(&self.dir, number, 0)?)
    }

    /// Appends go to `next` from now on, after the current segment is made
    /// durable. Call under the commit lock, so that the entries written so
    /// far are exactly those of the commits applied so far.
    pub(crate) fn switch(&self, next: Segment) -> Result<()> {
        let mut w = self.writer.lock();
        w.file.sync_data()?;
        // Its first entry's number; the first sync of its entries makes it
        // durable with them.
        next.file
            .write_all_at(&(w.written + 1).to_le_bytes(), FIRST_SEQ_AT)?;
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
    /// Damage before the log's end (entries follow the stop, a segment is
    /// out of place or missing), not a tail torn by a crash: commits that
    /// were acknowledged may be lost.
    pub(crate) damage: bool,
    /// Intact entries after the commits read, found beyond the stop:
    /// `(how many, the highest sequence number)`.
    pub(crate) found_after: Option<(u64, u64)>,
}

impl LogStop {
    /// What the stop gives up, for messages: `after` is the last commit read.
    pub(crate) fn describe(&self, after: u64) -> String {
        let mut out = format!(
            "{} at offset {} of {}",
            self.reason,
            self.offset,
            self.segment.display()
        );
        if let Some((n, max)) = self.found_after {
            out.push_str(&format!(
                "; the commits after {after} are not readable in order, yet {n} intact \
                 entr{} up to commit {max} follow",
                if n == 1 { "y" } else { "ies" }
            ));
        }
        out
    }
}

/// What [`read_log`] found.
#[derive(Debug)]
pub(crate) struct LogRead {
    /// The last sequence number handed out (or `applied`).
    pub(crate) last: u64,
    /// Where and why it stopped before the end, if it did.
    pub(crate) stop: Option<LogStop>,
}

/// A segment's header.
struct SegmentHeader {
    /// Where its entries start.
    len: usize,
    /// Version 2: the number it was created as, and the sequence number of
    /// its first entry (0 until its first commit was known).
    number: Option<u64>,
    first_seq: u64,
}

/// Reads a segment's header: `Ok(None)` for a file of zeros (a segment
/// whose creation did not become durable).
fn read_header(
    data: &[u8],
    path: &Path,
) -> Result<std::result::Result<Option<SegmentHeader>, String>> {
    if data.len() < V1_HEADER_LEN as usize || &data[..8] != MAGIC {
        if data.iter().all(|&b| b == 0) {
            return Ok(Ok(None));
        }
        return Ok(Err("no segment header".into()));
    }
    let version = u32::from_le_bytes(data[8..12].try_into().expect("4 bytes"));
    match version {
        1 => Ok(Ok(Some(SegmentHeader {
            len: V1_HEADER_LEN as usize,
            number: None,
            first_seq: 0,
        }))),
        VERSION if data.len() >= HEADER_LEN as usize => Ok(Ok(Some(SegmentHeader {
            len: HEADER_LEN as usize,
            number: Some(u64::from_le_bytes(
                data[16..24].try_into().expect("8 bytes"),
            )),
            first_seq: u64::from_le_bytes(data[24..32].try_into().expect("8 bytes")),
        }))),
        VERSION => Ok(Err("segment header cut short".into())),
        _ => Err(StorageError::damaged(format!(
            "commit log segment {} has version {version}; this build reads versions 1 and {VERSION}",
            path.display()
        ))),
    }
}

/// One entry of a segment, read at an offset.
enum Entry<'a> {
    /// A header of zeros: the end of the segment's entries, if only zeros
    /// follow.
    Zeros,
    /// Cut short or corrupt.
    Bad(String),
    Intact {
        seq: u64,
        payload: &'a [u8],
        /// Where the next entry starts.
        end: usize,
    },
}

fn entry_at(data: &[u8], at: usize) -> Entry<'_> {
    let rest = &data[at..];
    if rest.len() < ENTRY_OVERHEAD {
        if rest.iter().all(|&b| b == 0) {
            return Entry::Zeros;
        }
        return Entry::Bad("entry cut short".into());
    }
    let len = u32::from_le_bytes(rest[..4].try_into().expect("4 bytes")) as usize;
    let seq = u64::from_le_bytes(rest[4..12].try_into().expect("8 bytes"));
    if len == 0 && seq == 0 {
        return Entry::Zeros;
    }
    if rest.len() - ENTRY_OVERHEAD < len {
        return Entry::Bad("entry cut short".into());
    }
    let payload = &rest[12..12 + len];
    let sum = u64::from_le_bytes(rest[12 + len..20 + len].try_into().expect("8 bytes"));
    if checksum(seq, payload) != sum {
        return Entry::Bad(format!("checksum mismatch (seq {seq})"));
    }
    Entry::Intact {
        seq,
        payload,
        end: at + ENTRY_OVERHEAD + len,
    }
}

/// What follows a stop in a segment.
#[derive(Default)]
struct After {
    /// Intact entries of commits after the last one read: how many, and
    /// the highest sequence number.
    later: u64,
    max: u64,
    /// Bytes that are neither zeros nor part of an intact entry.
    unexplained: bool,
}

/// Reads what follows offset `from` of a segment, also past damage: at
/// each offset, an entry with a plausible sequence number (1 or more, and
/// less than 2^32 above `last`) and a right checksum is taken as one;
/// anything else nonzero is unexplained.
fn after(data: &[u8], from: usize, last: u64) -> After {
    let mut out = After::default();
    let mut at = from;
    while at < data.len() {
        // The sequence number first: it rules out almost every offset
        // before a checksum is computed.
        let seq = data
            .get(at + 4..at + 12)
            .map_or(0, |b| u64::from_le_bytes(b.try_into().expect("8 bytes")));
        if seq >= 1
            && seq < last.saturating_add(1 << 32)
            && let Entry::Intact { end, .. } = entry_at(data, at)
        {
            if seq > last {
                out.later += 1;
                out.max = out.max.max(seq);
            }
            at = end;
        } else {
            out.unexplained |= data[at] != 0;
            at += 1;
        }
    }
    out
}

/// Reads the log in `dir` and hands `apply` each commit after `applied`, in
/// order, in groups of about `batch_bytes`. Stops at the first entry that is
/// cut short, corrupt, or out of sequence, and reports where and whether it
/// is damage (see [`LogStop::damage`]): zeros or a bad entry followed by
/// anything but zeros and entries already applied, an entry after a gap, a
/// segment whose header names another number or a sequence number that
/// does not continue its predecessor, or intact entries of later commits
/// anywhere after the stop.
pub(crate) fn read_log(
    dir: &Path,
    applied: u64,
    batch_bytes: usize,
    mut apply: impl FnMut(Vec<LoggedCommit>) -> Result<()>,
) -> Result<LogRead> {
    let mut last = applied;
    let mut batch = Vec::new();
    let mut batch_len = 0usize;
    let mut take = |c: LoggedCommit, len: usize| -> Result<()> {
        batch_len += len;
        batch.push(c);
        if batch_len >= batch_bytes {
            batch_len = 0;
            apply(std::mem::take(&mut batch))
        } else {
            Ok(())
        }
    };
    let all = segments(dir)?;
    // The highest sequence number of an intact entry seen anywhere, and how
    // many intact entries beyond `last` were seen past a stop.
    let mut found = (0u64, 0u64);
    // The last sequence number of the previous segment, when known.
    let mut prev_end: Option<u64> = None;
    // A stop passed by because the next segment goes on from it.
    let mut passed: Option<LogStop> = None;
    let mut stop: Option<LogStop> = None;
    for (i, (number, path)) in all.iter().enumerate() {
        let data = std::fs::read(path)?;
        let Some(bad) = read_segment(&data, path, *number, &mut last, &mut prev_end, &mut take)?
        else {
            continue;
        };
        if let Some((n, max)) = bad.found_after {
            found = (found.0 + n, found.1.max(max));
        }
        // Passed by if the next segment provably goes on from here: it
        // starts at or before the next commit wanted.
        let next_first = all[i + 1..].iter().find_map(|(_, p)| first_seq(p));
        if next_first.is_some_and(|f| f <= last + 1) {
            tracing::warn!(
                segment = %path.display(),
                offset = bad.offset,
                reason = %bad.reason,
                "a damaged commit log segment was passed by: the next segment starts at or before the next commit wanted"
            );
            passed.get_or_insert(bad);
            prev_end = None;
            continue;
        }
        for (_, p) in &all[i + 1..] {
            let rest = after(&std::fs::read(p)?, 0, last);
            found = (found.0 + rest.later, found.1.max(rest.max));
        }
        stop = Some(bad);
        break;
    }
    apply(batch)?;
    // Intact entries beyond the last commit read: damage, whatever the stop.
    let mut stop = stop.or(if found.1 > last { passed } else { None });
    if let Some(s) = &mut stop
        && found.1 > last
    {
        s.damage = true;
        s.found_after = Some(found);
    }
    Ok(LogRead { last, stop })
}

/// Reads one segment (file `number`), handing each entry after `last` to
/// `take` and advancing `last` and `prev_end` (the last sequence number of
/// the segment before). Returns where and why it stopped before the
/// segment's end, if it did.
fn read_segment(
    data: &[u8],
    path: &Path,
    number: u64,
    last: &mut u64,
    prev_end: &mut Option<u64>,
    take: &mut dyn FnMut(LoggedCommit, usize) -> Result<()>,
) -> Result<Option<LogStop>> {
    let here = |offset: usize, reason: String, damage: bool| LogStop {
        segment: path.to_path_buf(),
        offset: offset as u64,
        reason,
        damage,
        found_after: None,
    };
    let header = match read_header(data, path)? {
        Ok(None) => return Ok(None),
        Ok(Some(h)) => h,
        Err(why) => return Ok(Some(here(0, why, false))),
    };
    if let Some(n) = header.number
        && n != number
    {
        return Ok(Some(here(
            16,
            format!(
                "the segment file numbered {number} holds segment {n} \
                 (segments renamed, swapped or copied)"
            ),
            true,
        )));
    }
    if header.first_seq != 0 {
        let gap = match *prev_end {
            Some(end) if header.first_seq != end + 1 => Some(format!(
                "the segment starts at commit {} but the one before it ended at commit {end} \
                 (a segment missing, duplicated or out of order)",
                header.first_seq
            )),
            None if header.first_seq > *last + 1 => Some(format!(
                "the segment starts at commit {} but the store holds commits up to {} only \
                 (a segment is missing)",
                header.first_seq, *last
            )),
            _ => None,
        };
        if let Some(why) = gap {
            return Ok(Some(here(24, why, true)));
        }
    }
    let mut expect = (header.first_seq != 0).then_some(header.first_seq);
    let mut at = header.len;
    let bad = loop {
        if at >= data.len() {
            break None;
        }
        match entry_at(data, at) {
            Entry::Zeros => {
                // The end, if only zeros and entries already applied follow.
                let Some(p) = data[at..].iter().position(|&b| b != 0) else {
                    break None;
                };
                let rest = after(data, at, *last);
                break Some(LogStop {
                    found_after: (rest.later > 0).then_some((rest.later, rest.max)),
                    ..here(
                        at,
                        format!("zeros from offset {at} to {}, then data", at + p),
                        rest.later > 0 || rest.unexplained,
                    )
                });
            }
            Entry::Bad(why) => {
                // A torn tail if nothing follows the entry that is not
                // zeros or already applied; where the entry ends is not
                // known if its length is damaged.
                let end = entry_end(data, at);
                let rest = after(data, end.unwrap_or(at + 1), *last);
                let damage = rest.later > 0 || (end.is_some() && rest.unexplained);
                break Some(LogStop {
                    found_after: (rest.later > 0).then_some((rest.later, rest.max)),
                    ..here(at, why, damage)
                });
            }
            Entry::Intact { seq, payload, end } => {
                let wanted = match expect {
                    Some(e) if seq != e => Some(e),
                    _ if seq > *last + 1 => Some(*last + 1),
                    _ => None,
                };
                if let Some(e) = wanted {
                    let rest = after(data, at, *last);
                    break Some(LogStop {
                        found_after: (rest.later > 0).then_some((rest.later, rest.max)),
                        ..here(at, format!("entry {seq} where {e} was expected"), true)
                    });
                }
                expect = Some(seq + 1);
                if seq == *last + 1 {
                    let records = match decode_records(payload) {
                        Ok(r) => r,
                        Err(why) => break Some(here(at, why, true)),
                    };
                    *last = seq;
                    take(LoggedCommit { seq, records }, payload.len())?;
                }
                at = end;
            }
        }
    };
    *prev_end = expect.map(|e| e - 1).or(*prev_end);
    Ok(bad)
}

/// Where the entry at `at` ends, if its declared length fits in `data`.
fn entry_end(data: &[u8], at: usize) -> Option<usize> {
    let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    let end = at.checked_add(ENTRY_OVERHEAD)?.checked_add(len)?;
    (end <= data.len()).then_some(end)
}

/// The sequence number the segment at `path` starts at: its header's
/// (version 2, when its number matches its name and the number is known),
/// else its first entry's, if that entry is intact.
fn first_seq(path: &Path) -> Option<u64> {
    let data = std::fs::read(path).ok()?;
    let header = read_header(&data, path).ok()?.ok()??;
    let named = path
        .file_name()?
        .to_str()?
        .strip_suffix(".seg")?
        .parse::<u64>()
        .ok()?;
    if header.number.is_some_and(|n| n != named) {
        return None;
    }
    if header.first_seq != 0 {
        return Some(header.first_seq);
    }
    match entry_at(&data, header.len) {
        Entry::Intact { seq, .. } => Some(seq),
        _ => None,
    }
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

/// How many commits the log in `dir` holds after `applied`, and where it
/// stops short, if it does (for a read-only open and `check`, which cannot
/// replay them).
pub(crate) fn commits_after(dir: &Path, applied: u64) -> Result<(u64, Option<LogStop>)> {
    let mut n = 0;
    let read = read_log(dir, applied, usize::MAX, |batch| {
        n += batch.len() as u64;
        Ok(())
    })?;
    Ok((n, read.stop))
}
