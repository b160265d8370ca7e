//! The read gate: a bound on the memory that loads of large records take
//! at once, across every session, connection and store of the process.
//!
//! A load of a record redb has not cached reads the whole record into
//! memory, and the copy lives until the answer is written; twenty
//! connections loading one 50 MB record at once would hold twenty copies.
//! So a `get` holds one of [`GET_SLOTS`] slots while it runs, and a record
//! of [`BIG_RECORD`] bytes or more is handed on only with one of
//! [`BIG_SLOTS`] slots, held until its reader is done with it. A reader
//! that finds a big record and no big slot free lets its copy go and waits
//! for a slot before it reads again: what loads hold at once stays under
//! `(GET_SLOTS + BIG_SLOTS)` times the largest record, whatever the cache
//! holds. Small records pass with one uncontended lock each.

use crate::ranked::{Condvar, Mutex, rank};

/// Records of this many bytes or more pass only with a big slot.
pub(crate) const BIG_RECORD: usize = 1 << 20;
/// `get`s running at once (each may read a big record whole).
pub(crate) const GET_SLOTS: usize = 4;
/// Big records handed on at once.
pub(crate) const BIG_SLOTS: usize = 2;

/// A counting semaphore.
struct Slots {
    free: Mutex<usize, { rank::LEAF }>,
    freed: Condvar,
}

impl Slots {
    const fn new(n: usize) -> Slots {
        Slots {
            free: Mutex::new(n),
            freed: Condvar::new(),
        }
    }

    fn take(&self) -> Slot<'_> {
        let mut free = self.free.lock();
        while *free == 0 {
            self.freed.wait(&mut free);
        }
        *free -= 1;
        Slot(self)
    }

    fn try_take(&self) -> Option<Slot<'_>> {
        let mut free = self.free.lock();
        (*free > 0).then(|| {
            *free -= 1;
            Slot(self)
        })
    }
}

/// A slot taken; given back when dropped.
pub(crate) struct Slot<'a>(&'a Slots);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock() += 1;
        self.0.freed.notify_one();
    }
}

static GETS: Slots = Slots::new(GET_SLOTS);
static BIGS: Slots = Slots::new(BIG_SLOTS);

/// Runs `read` (a `get` of one record, returning it and its length) under
/// the gate, and hands what it returned to `each` with the slots that
/// reading it needs held. `read` may run twice: a big record read without
/// a big slot free is dropped, and read again once one is.
pub(crate) fn read<T, R>(
    mut read: impl FnMut() -> R,
    len: impl Fn(&R) -> Option<usize>,
    each: impl FnOnce(R) -> T,
) -> T {
    let mut big = None;
    loop {
        // The get slot is held until the copy is handed on or dropped, so
        // that copies not yet placed are counted.
        let get = GETS.take();
        let found = read();
        let is_big = len(&found).is_some_and(|n| n >= BIG_RECORD);
        if !is_big || big.is_some() {
            drop(get);
            let out = each(found);
            drop(big);
            return out;
        }
        if let Some(slot) = BIGS.try_take() {
            drop(get);
            let out = each(found);
            drop(slot);
            return out;
        }
        // Wait for a big slot without holding the copy.
        drop(found);
        drop(get);
        big = Some(BIGS.take());
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// Many threads "read" a big record at once: never more than
    /// GET_SLOTS + BIG_SLOTS copies are alive, and every reader is served.
    #[test]
    fn big_records_alive_at_once_stay_within_the_slots() {
        let alive = Arc::new(AtomicUsize::new(0));
        let peak = Arc::new(AtomicUsize::new(0));
        let served = Arc::new(AtomicUsize::new(0));
        struct Copy(Arc<AtomicUsize>);
        impl Drop for Copy {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let threads: Vec<_> = (0..24)
            .map(|_| {
                let (alive, peak, served) = (alive.clone(), peak.clone(), served.clone());
                std::thread::spawn(move || {
                    for _ in 0..20 {
                        read(
                            || {
                                let n = alive.fetch_add(1, Ordering::SeqCst) + 1;
                                peak.fetch_max(n, Ordering::SeqCst);
                                Copy(alive.clone())
                            },
                            |_| Some(BIG_RECORD),
                            |copy| {
                                // Handing it on takes a while (a slow client).
                                std::thread::yield_now();
                                served.fetch_add(1, Ordering::SeqCst);
                                drop(copy);
                            },
                        );
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(served.load(Ordering::SeqCst), 24 * 20);
        let peak = peak.load(Ordering::SeqCst);
        assert!(peak <= GET_SLOTS + BIG_SLOTS, "{peak} copies alive at once");
        assert_eq!(alive.load(Ordering::SeqCst), 0);
    }
}
