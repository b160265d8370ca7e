//! Deadlines on a connection's reads: the socket's read timeout, set
//! only when a wait needs a shorter one, and a reader bound by the
//! request's deadline.

use std::io::{self, BufReader, Read};
use std::time::{Duration, Instant};

use crate::transport::Stream;

/// A request not complete within `--request-timeout`.
pub(super) fn request_timed_out() -> io::Error {
    io::Error::new(
        io::ErrorKind::TimedOut,
        "the request was not complete within --request-timeout",
    )
}

/// The socket's read timeout, kept so that it is set only when a wait
/// needs a shorter one: a `setsockopt` before every read cost three
/// system calls a commit. A read waits at most the timeout set, so a wait
/// with a limit sets one no longer than what is left of it; one without a
/// limit loops on timeouts. What is set is what is left rounded down to a
/// quarter of `--request-timeout`, so the next requests find it short
/// enough without setting it again (a read that times out with time left
/// reads again).
pub(super) struct ReadTimeout {
    /// What the socket has, `None` before it is first set (no timeout).
    set: std::cell::Cell<Option<Duration>>,
    step: Duration,
    /// What a wait without a limit sets if the socket has a shorter one:
    /// an idle connection wakes this often.
    idle: Duration,
    /// How many times the timeout was set.
    #[cfg(test)]
    puts: std::cell::Cell<u32>,
}

impl ReadTimeout {
    pub(super) fn new(request_timeout: Duration) -> Self {
        ReadTimeout {
            set: std::cell::Cell::new(None),
            step: (request_timeout / 4).max(Duration::from_millis(1)),
            idle: request_timeout.max(Duration::from_millis(100)),
            #[cfg(test)]
            puts: std::cell::Cell::new(0),
        }
    }

    /// Makes the next read from `socket` wait at most `left` (not zero).
    pub(super) fn at_most(&self, socket: &Stream, left: Duration) -> io::Result<()> {
        if matches!(self.set.get(), Some(t) if t <= left) {
            return Ok(());
        }
        let t = if left >= self.step {
            let steps = left.as_nanos() / self.step.as_nanos();
            self.step * u32::try_from(steps).unwrap_or(u32::MAX)
        } else {
            left
        };
        self.put(socket, t)
    }

    /// Makes the next read from `socket` wait long: a wait without a limit
    /// reads again when it times out.
    pub(super) fn long(&self, socket: &Stream) -> io::Result<()> {
        match self.set.get() {
            Some(t) if t < self.step => self.put(socket, self.idle),
            _ => Ok(()),
        }
    }

    fn put(&self, socket: &Stream, t: Duration) -> io::Result<()> {
        // Forget the old value first: if setting fails, the next wait sets
        // it again.
        self.set.set(None);
        socket.set_read_timeout(Some(t))?;
        self.set.set(Some(t));
        #[cfg(test)]
        self.puts.set(self.puts.get() + 1);
        Ok(())
    }
}

/// A read that timed out (the socket's read timeout).
pub(super) fn timed_out(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
    )
}

/// Reads the rest of a request within its deadline: before each read from
/// the socket the read timeout is made no longer than what is left of the
/// request's time, so a client that trickles its request a byte at a time
/// cannot hold it (and the commit order) for longer than
/// `--request-timeout` in all.
pub(super) struct DeadlineRead<'a> {
    pub(super) inner: &'a mut BufReader<Stream>,
    pub(super) control: &'a Stream,
    pub(super) timeout: &'a ReadTimeout,
    pub(super) deadline: Instant,
}

impl Read for DeadlineRead<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.inner.buffer().is_empty() {
                let left = self.deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Err(request_timed_out());
                }
                self.timeout.at_most(self.control, left)?;
            }
            match self.inner.read(buf) {
                // The timeout set may be shorter than what was left.
                Err(e) if timed_out(&e) => {}
                r => return r,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::read_u8;

    #[test]
    fn a_read_never_waits_longer_than_is_left_and_the_timeout_is_set_only_when_it_must_be() {
        let (mine, _peer) = std::os::unix::net::UnixStream::pair().unwrap();
        let probe = mine.try_clone().unwrap();
        let socket = Stream::Unix(mine);
        let secs = Duration::from_secs;
        let ms = Duration::from_millis;
        // --request-timeout 16 s: steps of 4 s.
        let t = ReadTimeout::new(secs(16));
        let on_socket = || probe.read_timeout().unwrap();
        // Each wait: what is left, then what the socket must have and how
        // many times it has been set in all.
        let waits = [
            (ms(15_999), secs(12), 1),
            (ms(12_001), secs(12), 1),
            (ms(11_999), secs(8), 2),
            (ms(8_000), secs(8), 2),
            (ms(300), ms(300), 3),
            (ms(299), ms(299), 4),
            (secs(16), ms(299), 4),
        ];
        for (left, expect, puts) in waits {
            t.at_most(&socket, left).unwrap();
            assert_eq!(t.set.get(), Some(expect), "after a wait with {left:?} left");
            assert_eq!(t.puts.get(), puts, "after a wait with {left:?} left");
            // The kernel keeps timeouts in clock ticks, rounded up.
            let kept = on_socket().unwrap();
            assert!(kept >= expect && kept < expect + ms(20), "{kept:?}");
        }
        // A wait without a limit does not wake every 299 ms...
        t.long(&socket).unwrap();
        assert_eq!(t.set.get(), Some(secs(16)));
        assert_eq!(on_socket(), Some(secs(16)));
        assert_eq!(t.puts.get(), 5);
        // ...and leaves a long timeout alone.
        t.long(&socket).unwrap();
        t.at_most(&socket, secs(16)).unwrap();
        assert_eq!(t.puts.get(), 5);

        // Far more steps than a u32 counts (a long --snapshot-idle beside
        // a short --request-timeout): still no longer than what is left.
        let short = ReadTimeout::new(ms(4));
        let long_left = secs(200 * 24 * 3600);
        short.at_most(&socket, long_left).unwrap();
        let kept = short.set.get().unwrap();
        assert!(
            kept <= long_left && kept >= secs(40 * 24 * 3600),
            "{kept:?}"
        );

        // A read with 50 ms left comes back as a timeout in about that.
        t.at_most(&socket, ms(50)).unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let started = Instant::now();
        let e = read_u8(&mut reader).unwrap_err();
        assert!(timed_out(&e), "{e}");
        let waited = started.elapsed();
        assert!(waited >= ms(40) && waited < secs(5), "waited {waited:?}");
    }
}
