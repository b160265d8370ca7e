//! The commit order as a queue that is handed from one holder to the next.
//!
//! The server holds the order from sending a client its invalidations until
//! that client's commit has its turn, a whole round trip. A committer that
//! found the order taken used to sleep on a lock, be woken when it was
//! released, send its client the invalidations and sleep again until the
//! client answered: two thread wake-ups, one of them while the order sat
//! idle. Here a waiter can leave what it would do first (send the
//! invalidations) to the holder: whoever releases the order runs the next
//! waiter's grant on its behalf, in order, and the waiter sleeps only once,
//! until its client's commit data arrives. A waiter with nothing to hand
//! over (the library, the shutdown) waits on a condition variable.
//!
//! Lock order: `queue`, then a waiter's `state`, never the other way round;
//! a grant runs with neither held.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::{Condvar, Mutex};

use crate::ranked::{Token, rank};

use super::Engine;

/// What the holder runs for the next waiter as it hands the order over;
/// false if it failed (the waiter then does not get the order, and the
/// next one is served).
pub(crate) type Grant = Box<dyn FnOnce(&Engine) -> bool + Send>;

/// The commit order: held or not, and who waits for it, first first.
#[derive(Default)]
pub(crate) struct Order {
    queue: Mutex<Queue>,
}

#[derive(Default)]
struct Queue {
    held: bool,
    waiting: VecDeque<Arc<Waiter>>,
}

/// One waiter for the order.
struct Waiter {
    state: Mutex<State>,
    changed: Condvar,
}

enum State {
    /// In the queue, with what to run when its turn comes.
    Waiting(Grant),
    /// Its grant is running on the releasing thread.
    Granting,
    /// It holds the order since its grant ended at this instant.
    Granted(Instant),
    /// Its grant failed: it does not hold the order.
    Failed,
    /// It gave up waiting; the releaser passes it by.
    Cancelled,
    /// Its holding was taken up by a guard (or given back).
    Taken,
}

/// How a waiter stands, as [`Place::peek`] sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Standing {
    /// Not yet served.
    Waiting,
    /// Holds the order since its grant ended at this instant.
    Granted(Instant),
    /// Its grant failed; it will not hold the order.
    Failed,
}

/// The order, held: released (handed to the next waiter) when dropped.
/// Its rank ([`rank::ORDER`]) is counted while it lives.
pub(crate) struct Held<'a> {
    engine: &'a Engine,
    _rank: Token,
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.engine.seq.order().release(self.engine);
    }
}

/// A place in the order's queue, not yet served. Dropping it gives the
/// place up, or the order back if it was granted meanwhile.
pub(crate) struct Place<'a> {
    engine: &'a Engine,
    waiter: Option<Arc<Waiter>>,
}

/// What [`Order::enter`] gives.
pub(crate) enum Entry<'a> {
    /// The order was free and is held now; the grant was not run.
    Now(Held<'a>),
    /// The order is held by another; the grant runs when it is handed over.
    Queued(Place<'a>),
}

impl Order {
    /// Takes the order at once if it is free; otherwise queues the grant
    /// `grant` makes, to be run on the releasing thread as the order is
    /// handed over (a free order makes none: nothing to allocate).
    pub(crate) fn enter<'a>(&self, engine: &'a Engine, grant: impl FnOnce() -> Grant) -> Entry<'a> {
        let mut q = self.queue.lock();
        if !q.held {
            // Checked before the order is marked held: a violation panics
            // with the order still free.
            let rank = Token::take(rank::ORDER);
            q.held = true;
            drop(q);
            return Entry::Now(Held {
                engine,
                _rank: rank,
            });
        }
        let waiter = Arc::new(Waiter {
            state: Mutex::new(State::Waiting(grant())),
            changed: Condvar::new(),
        });
        q.waiting.push_back(waiter.clone());
        Entry::Queued(Place {
            engine,
            waiter: Some(waiter),
        })
    }

    /// How many wait for the order now (queued, not given up).
    pub(crate) fn waiting(&self) -> usize {
        let q = self.queue.lock();
        q.waiting
            .iter()
            .filter(|w| matches!(*w.state.lock(), State::Waiting(_) | State::Granting))
            .count()
    }

    /// Takes the order, waiting for it as long as it takes.
    pub(crate) fn lock<'a>(&self, engine: &'a Engine) -> Held<'a> {
        match self.enter(engine, || Box::new(|_| true)) {
            Entry::Now(held) => held,
            Entry::Queued(q) => q.wait().expect("a grant that cannot fail did not fail").0,
        }
    }

    /// Hands the order to the first waiter whose grant succeeds, or frees
    /// it if nobody waits.
    fn release(&self, engine: &Engine) {
        loop {
            let next = {
                let mut q = self.queue.lock();
                match q.waiting.pop_front() {
                    Some(w) => w,
                    None => {
                        q.held = false;
                        return;
                    }
                }
            };
            let grant = {
                let mut st = next.state.lock();
                match std::mem::replace(&mut *st, State::Granting) {
                    State::Waiting(grant) => grant,
                    other => {
                        // Cancelled: pass it by.
                        *st = other;
                        continue;
                    }
                }
            };
            // The order is held on the waiter's behalf while its grant runs.
            // A grant that panics counts as failed: the order goes on.
            let ok = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| grant(engine)))
                .unwrap_or(false);
            let mut st = next.state.lock();
            *st = if ok {
                State::Granted(Instant::now())
            } else {
                State::Failed
            };
            next.changed.notify_all();
            if ok {
                return;
            }
        }
    }
}

impl<'a> Place<'a> {
    /// The engine whose order this is.
    pub(crate) fn engine(&self) -> &'a Engine {
        self.engine
    }

    fn waiter(&self) -> &Waiter {
        self.waiter.as_ref().expect("a queued place has its waiter")
    }

    /// How the waiter stands now, without waiting.
    pub(crate) fn peek(&self) -> Standing {
        match &*self.waiter().state.lock() {
            State::Waiting(_) | State::Granting => Standing::Waiting,
            State::Granted(at) => Standing::Granted(*at),
            State::Failed | State::Cancelled | State::Taken => Standing::Failed,
        }
    }

    /// Waits until the waiter is served: the order, held, and when its
    /// grant ended; `None` if the grant failed.
    pub(crate) fn wait(mut self) -> Option<(Held<'a>, Instant)> {
        // Checked before it blocks.
        drop(Token::take(rank::ORDER));
        let waiter = self.waiter.take().expect("a queued place has its waiter");
        let mut st = waiter.state.lock();
        loop {
            match &*st {
                State::Waiting(_) | State::Granting => waiter.changed.wait(&mut st),
                State::Granted(at) => {
                    let at = *at;
                    *st = State::Taken;
                    return Some((
                        Held {
                            engine: self.engine,
                            _rank: Token::take(rank::ORDER),
                        },
                        at,
                    ));
                }
                State::Failed | State::Cancelled | State::Taken => return None,
            }
        }
    }
}

impl Drop for Place<'_> {
    fn drop(&mut self) {
        let Some(waiter) = self.waiter.take() else {
            return;
        };
        let mut st = waiter.state.lock();
        loop {
            match &*st {
                State::Waiting(_) => {
                    *st = State::Cancelled;
                    return;
                }
                // Its grant is running: wait for how it ends.
                State::Granting => waiter.changed.wait(&mut st),
                State::Granted(_) => {
                    *st = State::Taken;
                    drop(st);
                    // Given back: the next waiter is served.
                    drop(Held {
                        engine: self.engine,
                        _rank: Token::taken_unchecked(rank::ORDER),
                    });
                    return;
                }
                State::Failed | State::Cancelled | State::Taken => return,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::time::Duration;

    use parking_lot::Mutex;

    use super::{Entry, Standing};

    use crate::engine::open_temp as open;

    /// A grant that records its name in `log` and succeeds if `ok`.
    fn grant(log: &Arc<Mutex<Vec<&'static str>>>, name: &'static str, ok: bool) -> super::Grant {
        let log = log.clone();
        Box::new(move |_| {
            log.lock().push(name);
            ok
        })
    }

    fn queued<'a>(entry: Entry<'a>) -> super::Place<'a> {
        match entry {
            Entry::Queued(p) => p,
            Entry::Now(_) => panic!("the order was free"),
        }
    }

    /// The holder hands the order to the waiters first come, first served,
    /// running each one's grant as it does: a failed grant passes the
    /// order on, a place given up is passed by, a place granted and then
    /// dropped gives the order back to the next.
    #[test]
    fn the_order_goes_to_the_waiters_in_turn_and_runs_their_grants() {
        let (_dir, engine) = open();
        let order = &engine.seq.order();
        let log = Arc::new(Mutex::new(Vec::new()));
        let Entry::Now(held) = order.enter(&engine, || grant(&log, "first", true)) else {
            panic!("the order was not free");
        };
        let a = queued(order.enter(&engine, || grant(&log, "a", false)));
        let b = queued(order.enter(&engine, || grant(&log, "b", true)));
        let c = queued(order.enter(&engine, || grant(&log, "c", true)));
        let d = queued(order.enter(&engine, || grant(&log, "d", true)));
        assert_eq!(a.peek(), Standing::Waiting);
        // `b` gives its place up before its turn.
        drop(b);
        assert!(
            log.lock().is_empty(),
            "a grant ran before the order was released"
        );
        drop(held);
        // `a`'s grant failed, `b` was passed by, `c` holds the order.
        assert_eq!(*log.lock(), ["a", "c"]);
        assert_eq!(a.peek(), Standing::Failed);
        assert!(a.wait().is_none());
        assert!(matches!(c.peek(), Standing::Granted(_)));
        assert_eq!(d.peek(), Standing::Waiting);
        // `c` is dropped without taking up its holding: `d` gets the order.
        drop(c);
        assert_eq!(*log.lock(), ["a", "c", "d"]);
        let (held, _) = d.wait().expect("d was granted");
        // The order is held until `d`'s holding is dropped, then free.
        let e = queued(order.enter(&engine, || grant(&log, "e", true)));
        drop(held);
        assert_eq!(*log.lock(), ["a", "c", "d", "e"]);
        // `e` gives its holding back when its place is dropped.
        drop(e);
        assert!(matches!(
            order.enter(&engine, || grant(&log, "f", true)),
            Entry::Now(_)
        ));
        assert_eq!(
            *log.lock(),
            ["a", "c", "d", "e"],
            "a free order ran a grant"
        );
    }

    /// Threads taking the order by waiting and by queuing grants, at once:
    /// never two holders, every grant run once, nobody left waiting.
    #[test]
    fn the_order_has_one_holder_at_a_time_under_contention() {
        let (_dir, engine) = open();
        let inside = Arc::new(AtomicBool::new(false));
        let grants = Arc::new(AtomicUsize::new(0));
        let held = Arc::new(AtomicUsize::new(0));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let (engine, inside, grants, held) =
                    (engine.clone(), inside.clone(), grants.clone(), held.clone());
                std::thread::spawn(move || {
                    for i in 0..300 {
                        let hold = || {
                            assert!(!inside.swap(true, Ordering::AcqRel), "two holders");
                            if i % 7 == 0 {
                                std::thread::sleep(Duration::from_micros(50));
                            }
                            held.fetch_add(1, Ordering::Relaxed);
                            inside.store(false, Ordering::Release);
                        };
                        if t % 2 == 0 {
                            let _h = engine.seq.order().lock(&engine);
                            hold();
                            continue;
                        }
                        let counted = grants.clone();
                        let g: super::Grant = Box::new(move |_| {
                            counted.fetch_add(1, Ordering::Relaxed);
                            true
                        });
                        match engine.seq.order().enter(&engine, || g) {
                            Entry::Now(_h) => hold(),
                            // Every fifth place is given up unserved, or
                            // given back if served meanwhile.
                            Entry::Queued(p) if i % 5 == 0 => drop(p),
                            Entry::Queued(p) => {
                                let (_h, _) = p.wait().expect("granted");
                                hold();
                            }
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(held.load(Ordering::Relaxed) >= 4 * 300);
        assert!(grants.load(Ordering::Relaxed) > 0, "no grant ever ran");
        // Free at the end.
        let log = Arc::new(Mutex::new(Vec::new()));
        assert!(matches!(
            engine.seq.order().enter(&engine, || grant(&log, "x", true)),
            Entry::Now(_)
        ));
    }
}
