//! The reading side of the commit log: the replay after a crash, which
//! checks every segment and entry and tells damage from a torn tail.

use std::path::{Path, PathBuf};

use super::{ENTRY_OVERHEAD, HEADER_LEN, MAGIC, V1_HEADER_LEN, VERSION, checksum, segments};
use crate::error::{Result, StorageError};
use crate::record::{Oid, Record};

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
    // Counted a batch of about 8 MiB at a time: the commits are not kept.
    let read = read_log(dir, applied, 8 << 20, |batch| {
        n += batch.len() as u64;
        Ok(())
    })?;
    Ok((n, read.stop))
}
