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

mod reader;
mod writer;

use std::fs::File;
use std::io;
use std::path::{Path, PathBuf};

pub(crate) use reader::{LogRead, LogStop, commits_after, read_log};
pub(crate) use writer::CommitLog;

use crate::error::Result;
use crate::record::Record;

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

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
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
