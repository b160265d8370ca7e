//! The writing side of the commit log: segments created, appended to,
//! synced (one `fdatasync` a group), switched at checkpoints and removed.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ranked::{Mutex, rank};

use super::{
    ENTRY_OVERHEAD, FIRST_SEQ_AT, HEADER_LEN, MAGIC, PREALLOC, VERSION, encode_entry, remove_log,
    segment_name, segments, sync_dir,
};
use crate::error::{Result, StorageError};
use crate::record::Record;

/// How often at most a group sync checks that its segment is still the
/// file of its name and has not shrunk. The check is two `statx` calls,
/// which cost commits 15-25% at 1 and 4 connections when made at every
/// sync (measured against the build without it: docs/benchmarks.md);
/// once every 10 ms costs nothing measurable. Damage is then found within
/// 10 ms and one sync, and the commits acknowledged meanwhile are made
/// durable in the store file when it is (see `Engine::log_failed`).
const VERIFY_EVERY: Duration = Duration::from_millis(10);

/// A segment file. In the crate's own tests it also keeps what its syncs
/// made durable, apart from what was written: the power-cut tests take the
/// log a power cut would leave from the writes and syncs the log actually
/// issued, not from the log's own bookkeeping.
pub(super) struct SegFile {
    file: File,
    #[cfg(test)]
    disk: Mutex<SimulatedDurability, { rank::LEAF }>,
}

/// What a power cut would leave of a segment file: the bytes a sync
/// covered, and the writes issued since.
#[cfg(test)]
#[derive(Default)]
struct SimulatedDurability {
    durable: Vec<u8>,
    pending: Vec<(u64, Vec<u8>)>,
}

impl SegFile {
    fn new(file: File) -> SegFile {
        SegFile {
            file,
            #[cfg(test)]
            disk: Mutex::default(),
        }
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        #[cfg(test)]
        let _instant = crate::engine::powercut::INSTANT.read();
        self.file.write_all_at(buf, offset)?;
        #[cfg(test)]
        self.disk.lock().pending.push((offset, buf.to_vec()));
        Ok(())
    }

    /// `fdatasync`: every write issued before it is durable after it.
    fn sync_data(&self) -> io::Result<()> {
        #[cfg(test)]
        let covered = {
            let _instant = crate::engine::powercut::INSTANT.read();
            std::mem::take(&mut self.disk.lock().pending)
        };
        self.file.sync_data()?;
        #[cfg(test)]
        {
            let _instant = crate::engine::powercut::INSTANT.read();
            let mut disk = self.disk.lock();
            for (at, bytes) in covered {
                let (at, end) = (at as usize, at as usize + bytes.len());
                if disk.durable.len() < end {
                    disk.durable.resize(end, 0);
                }
                disk.durable[at..end].copy_from_slice(&bytes);
            }
        }
        Ok(())
    }

    fn metadata(&self) -> io::Result<std::fs::Metadata> {
        self.file.metadata()
    }

    /// Tests: the bytes a power cut now would leave of the file.
    #[cfg(test)]
    fn durable_image(&self) -> Vec<u8> {
        self.disk.lock().durable.clone()
    }
}

/// The segment being appended to.
struct Writer {
    file: Arc<SegFile>,
    /// Segments switched away from whose last entries no sync has covered
    /// yet: the next sync covers them first.
    retired: Vec<Arc<SegFile>>,
    /// The segment's number.
    number: u64,
    /// Where the next entry goes.
    len: u64,
    /// Bytes of the file written (header, entries, then zeros).
    allocated: u64,
    /// The last sequence number written.
    written: u64,
    buf: Vec<u8>,
}

/// The open commit log of a store (appends under the commit lock).
pub(crate) struct CommitLog {
    dir: PathBuf,
    writer: Mutex<Writer, { rank::LOG }>,
    /// When a sync last checked the segment's file (see [`VERIFY_EVERY`]).
    verified_at: Mutex<Instant, { rank::LEAF }>,
    /// Tests: every segment this log created, by number.
    #[cfg(test)]
    created: Mutex<Vec<(u64, Arc<SegFile>)>, { rank::LOG_FILES }>,
}

impl std::fmt::Debug for CommitLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommitLog").field("dir", &self.dir).finish()
    }
}

/// A new segment: its header and a first megabyte of zeros, durable, and
/// durable in the directory.
pub(crate) struct Segment {
    file: Arc<SegFile>,
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
    let file = SegFile::new(file);
    file.write_all_at(&start, 0)?;
    file.sync_data()?;
    sync_dir(dir)?;
    Ok(Segment {
        file: Arc::new(file),
        number,
    })
}

/// Overwrites `from..to` of `file` with zeros.
fn zero(file: &SegFile, from: u64, to: u64) -> io::Result<()> {
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
            #[cfg(test)]
            created: Mutex::new(vec![(number, seg.file.clone())]),
            verified_at: Mutex::new(Instant::now()),
            writer: Mutex::new(Writer {
                file: seg.file,
                retired: Vec::new(),
                number,
                len: HEADER_LEN,
                allocated: PREALLOC,
                written: next_seq - 1,
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
    /// store (checked at most every [`VERIFY_EVERY`]): what it covers is
    /// then not known to be on disk.
    pub(crate) fn sync(&self) -> Result<u64> {
        let (file, retired, written, number, allocated) = {
            let w = self.writer.lock();
            (
                w.file.clone(),
                w.retired.clone(),
                w.written,
                w.number,
                w.allocated,
            )
        };
        // Segments switched away from first: their entries come before.
        // (Dropped from the list only once synced, so that a sync running
        // beside this one cannot count them covered before they are.)
        for old in &retired {
            old.sync_data()?;
        }
        if !retired.is_empty() {
            self.writer
                .lock()
                .retired
                .retain(|r| !retired.iter().any(|s| Arc::ptr_eq(r, s)));
        }
        file.sync_data()?;
        let due = {
            let mut at = self.verified_at.lock();
            let due = at.elapsed() >= VERIFY_EVERY;
            if due {
                *at = Instant::now();
            }
            due
        };
        if due
            && let Err(e) = self.verify(&file, number, allocated)
            && self.writer.lock().number == number
        {
            // (A segment switched away from meanwhile may have been removed
            // by the checkpoint that made its entries durable in the store.)
            return Err(e);
        }
        Ok(written)
    }

    /// Checks that `file`, segment `number` with `allocated` bytes written,
    /// is still the file of that name in the log directory, at least that
    /// long.
    fn verify(&self, file: &SegFile, number: u64, allocated: u64) -> Result<()> {
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
        let seg = create_segment(&self.dir, number, 0)?;
        #[cfg(test)]
        self.created.lock().push((number, seg.file.clone()));
        Ok(seg)
    }

    /// Appends go to `next` from now on. Call under the commit lock, so that
    /// the entries written so far are exactly those of the commits applied
    /// so far; it does no fsync.
    pub(crate) fn switch(&self, next: Segment) -> Result<()> {
        let mut w = self.writer.lock();
        // Its first entry's number; the first sync of its entries makes it
        // durable with them.
        next.file
            .write_all_at(&(w.written + 1).to_le_bytes(), FIRST_SEQ_AT)?;
        // No fsync here (the commit lock is held): the next sync covers the
        // old segment's last entries before the new one's.
        let old = std::mem::replace(&mut w.file, next.file);
        w.retired.push(old);
        w.number = next.number;
        w.len = HEADER_LEN;
        w.allocated = PREALLOC;
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
    /// segment file in the directory as its syncs left it (the writes and
    /// syncs the log issued, recorded by [`SegFile`]).
    #[cfg(test)]
    pub(crate) fn power_cut_image(&self) -> Vec<(std::ffi::OsString, Vec<u8>)> {
        let created = self.created.lock();
        let mut out = Vec::new();
        for (number, path) in segments(&self.dir).expect("list the log") {
            let Some((_, file)) = created.iter().find(|(n, _)| *n == number) else {
                continue;
            };
            let name = path.file_name().expect("a name").to_owned();
            out.push((name, file.durable_image()));
        }
        out
    }

    /// Removes the whole log (after a clean close made everything durable).
    pub(crate) fn remove(&self) -> Result<()> {
        remove_log(&self.dir)
    }
}
