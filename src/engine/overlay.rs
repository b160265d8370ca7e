//! A redb storage backend that reads a store file and never writes it: every
//! write lands in memory over the file. `check` opens a store through it, so
//! redb can verify every page checksum (`Database::check_integrity`, which
//! needs a writable database) and even repair a store that was not closed
//! cleanly, in memory, while the file stays exactly as it was.
//!
//! Memory: the pages redb writes while opening and checking (its header, and
//! after a crash the allocator state it rebuilds), in 4 KiB blocks.

use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use parking_lot::Mutex;

use crate::error::{Result, StorageError};

const BLOCK: u64 = 4096;

/// The pieces of `len` bytes at `offset`, one a block: (block number,
/// offset within the block, length, offset within the whole).
fn pieces(offset: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let at = offset + done as u64;
        let within = (at % BLOCK) as usize;
        let take = (BLOCK as usize - within).min(len - done);
        let piece = (at / BLOCK, within, take, done);
        done += take;
        Some(piece)
    })
}

/// The file, read-only, with writes kept in memory over it.
#[derive(Debug)]
pub(crate) struct OverlayBackend {
    file: File,
    file_len: u64,
    state: Mutex<Overlay>,
}

#[derive(Debug)]
struct Overlay {
    /// The length redb sees.
    len: u64,
    /// Blocks written, by block number.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl OverlayBackend {
    /// Opens `path` for reading, with a shared lock: a store open for
    /// writing elsewhere (a server) holds an exclusive lock and is refused.
    pub(crate) fn open(path: &Path) -> Result<OverlayBackend> {
        let file = File::open(path)?;
        match file.try_lock_shared() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(StorageError::AlreadyOpen {
                    path: path.display().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(e.into()),
        }
        let file_len = file.metadata()?.len();
        Ok(OverlayBackend {
            file,
            file_len,
            state: Mutex::new(Overlay {
                len: file_len,
                blocks: HashMap::new(),
            }),
        })
    }

    /// A block as redb last saw it: written, or from the file (zeros past
    /// the file's end).
    fn base_block(&self, n: u64) -> std::io::Result<Box<[u8]>> {
        let mut buf = vec![0u8; BLOCK as usize].into_boxed_slice();
        let start = n * BLOCK;
        if start < self.file_len {
            let end = (start + BLOCK).min(self.file_len);
            self.file
                .read_exact_at(&mut buf[..(end - start) as usize], start)?;
        }
        Ok(buf)
    }
}

impl redb::StorageBackend for OverlayBackend {
    fn len(&self) -> std::io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> std::io::Result<()> {
        let st = self.state.lock();
        if offset + out.len() as u64 > st.len {
            return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
        }
        for (n, within, take, done) in pieces(offset, out.len()) {
            let at = offset + done as u64;
            let dst = &mut out[done..done + take];
            match st.blocks.get(&n) {
                Some(b) => dst.copy_from_slice(&b[within..within + take]),
                None if at < self.file_len => {
                    let from_file = ((self.file_len - at) as usize).min(take);
                    self.file.read_exact_at(&mut dst[..from_file], at)?;
                    dst[from_file..].fill(0);
                }
                None => dst.fill(0),
            }
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> std::io::Result<()> {
        let mut st = self.state.lock();
        if len < st.len {
            // Whatever lies past the new end reads as zeros if it grows again.
            let first_gone = len.div_ceil(BLOCK);
            st.blocks.retain(|n, _| *n < first_gone);
            if !len.is_multiple_of(BLOCK) {
                let n = len / BLOCK;
                let mut b = match st.blocks.remove(&n) {
                    Some(b) => b,
                    None => self.base_block(n)?,
                };
                b[(len % BLOCK) as usize..].fill(0);
                st.blocks.insert(n, b);
            }
            // Blocks of the file past `len` must read as zeros from now on.
            let mut n = first_gone;
            while n * BLOCK < self.file_len {
                st.blocks
                    .insert(n, vec![0u8; BLOCK as usize].into_boxed_slice());
                n += 1;
            }
        }
        st.len = len;
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> std::io::Result<()> {
        let mut st = self.state.lock();
        for (n, within, take, done) in pieces(offset, data.len()) {
            let b = match st.blocks.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                std::collections::hash_map::Entry::Vacant(e) => e.insert(self.base_block(n)?),
            };
            b[within..within + take].copy_from_slice(&data[done..done + take]);
        }
        if offset + data.len() as u64 > st.len {
            st.len = offset + data.len() as u64;
        }
        Ok(())
    }

    fn close(&self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::StorageBackend;

    #[test]
    fn writes_stay_in_memory_and_read_back_over_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &original).unwrap();
        let o = OverlayBackend::open(&path).unwrap();
        o.write(4090, &[7u8; 20]).unwrap();
        let mut buf = vec![0u8; 40];
        o.read(4080, &mut buf).unwrap();
        assert_eq!(&buf[..10], &original[4080..4090]);
        assert_eq!(&buf[10..30], &[7u8; 20]);
        assert_eq!(&buf[30..], &original[4110..4120]);
        // Growing, shrinking and growing again: zeros past the cut.
        o.set_len(20_000).unwrap();
        o.write(15_000, &[9u8; 4]).unwrap();
        o.set_len(5_000).unwrap();
        o.set_len(12_000).unwrap();
        let mut tail = vec![1u8; 7_000];
        o.read(5_000, &mut tail).unwrap();
        assert!(tail.iter().all(|b| *b == 0));
        assert_eq!(o.len().unwrap(), 12_000);
        drop(o);
        assert_eq!(
            std::fs::read(&path).unwrap(),
            original,
            "the file is untouched"
        );
    }
}
