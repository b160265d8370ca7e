//! One client connection: its session, its requests, in order.

use std::io::{self, BufReader, BufWriter, Write};
use std::sync::Arc;
use std::time::Instant;

use super::Shared;
use super::deadline::{DeadlineRead, ReadTimeout, request_timed_out, timed_out};
use crate::backend::{Entry, Found, Grant, Queued, Session, Snapshot, Standing, Walk};
use crate::error::StorageError;
use crate::protocol::{
    LoadAnswer, PROTOCOL, ReadError, Request, STATUS_INVALID, STATUS_OKAY, encode_oids,
    read_commit_data, read_u8, write_record_bytes,
};
use crate::record::Oid;
use crate::transport::Stream;

/// Why a connection ends.
#[derive(Debug, thiserror::Error)]
enum End {
    /// The peer went away, closed cleanly or sent `.` / an unknown code.
    #[error("{0}")]
    Closed(String),
    /// The peer broke the protocol or sent input that can never be accepted.
    #[error("{0}")]
    Client(String),
    /// The socket failed (including a timeout mid-request).
    #[error("{0}")]
    Io(#[from] io::Error),
    /// The store failed.
    #[error("{0}")]
    Storage(StorageError),
}

impl From<ReadError> for End {
    fn from(e: ReadError) -> End {
        match e {
            ReadError::Io(e) => End::Io(e),
            ReadError::Invalid(why) => End::Client(why),
        }
    }
}

impl From<StorageError> for End {
    fn from(e: StorageError) -> End {
        match e {
            StorageError::ReadOnly => End::Client(
                "the store is served read-only (--readonly): commits and new oids are refused"
                    .into(),
            ),
            StorageError::Invalid(e @ crate::error::InvalidInput::TooManyOidsHeld { .. }) => {
                End::Client(format!("{e} (--max-oids-held)"))
            }
            e => End::Storage(e),
        }
    }
}

/// In a backend's walk: whether to go on after one item's `r`; a failure
/// stops the walk and is kept in `failed`.
fn keep(failed: &mut Option<End>, r: Result<(), End>) -> bool {
    match r {
        Ok(()) => true,
        Err(e) => {
            *failed = Some(e);
            false
        }
    }
}

/// The result of a walk made with [`keep`]: its callback's failure first.
fn walked(failed: Option<End>, r: crate::Result<()>) -> Result<(), End> {
    match failed {
        Some(e) => Err(e),
        None => Ok(r?),
    }
}

/// Serves one connection until it ends, and logs why it ended.
pub(super) fn serve(shared: &Arc<Shared>, stream: Stream, peer: &str) {
    #[cfg(feature = "tls")]
    let stream = match (stream, &shared.config.tls) {
        (Stream::Tcp(sock), Some(tls)) => match tls.accept(sock, shared.config.request_timeout) {
            Ok(s) => Stream::Tls(s),
            Err(e) => {
                let why = if timed_out(&e) {
                    format!(
                        "no TLS handshake within {:?} (--request-timeout)",
                        shared.config.request_timeout
                    )
                } else {
                    format!("TLS handshake failed: {e}")
                };
                tracing::warn!("closing the connection from {peer}: {why}");
                return;
            }
        },
        (stream, _) => stream,
    };
    // A TLS client is named in the log by its certificate too.
    let names = stream.peer_common_names();
    let named;
    let peer = if names.is_empty() {
        peer
    } else {
        named = format!("{peer} (certificate CN {})", names.join(", "));
        named.as_str()
    };
    #[cfg(feature = "tls")]
    let admin_by_certificate = names
        .iter()
        .any(|n| shared.config.admin_cert_names.contains(n));
    #[cfg(not(feature = "tls"))]
    let admin_by_certificate = false;
    let session = shared.backend.open_session();
    let end = match (stream.try_clone(), stream.try_clone(), stream.try_clone()) {
        (Ok(read_half), Ok(write_half), Ok(grant_half)) => {
            let mut conn = Conn {
                shared,
                peer,
                local: stream.is_local(),
                admin_by_certificate,
                session: &*session,
                control: &stream,
                r: BufReader::new(read_half),
                w: BufWriter::new(write_half),
                grant_half: Arc::new(grant_half),
                deadline: Instant::now(),
                timeout: ReadTimeout::new(shared.config.request_timeout),
                snapshot: None,
            };
            conn.run()
        }
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => End::Io(e),
    };
    match &end {
        End::Closed(why) => tracing::debug!("connection from {peer} closed: {why}"),
        End::Client(why) => tracing::warn!("closing the connection from {peer}: {why}"),
        End::Io(e) if timed_out(e) => {
            tracing::warn!(
                "closing the connection from {peer}: no complete request within {:?}",
                shared.config.request_timeout
            )
        }
        End::Io(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
            tracing::warn!("closing the connection from {peer}: truncated request ({e})")
        }
        End::Io(e) => tracing::info!("connection from {peer} ended: {e}"),
        End::Storage(e) => tracing::error!("closing the connection from {peer}: {e}"),
    }
    stream.shutdown();
}

/// Counts a request as being handled while it lives (also through a panic).
struct Busy<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Busy<'a> {
    fn new(count: &'a std::sync::atomic::AtomicUsize) -> Self {
        count.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Busy(count)
    }
}

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

struct Conn<'a> {
    shared: &'a Arc<Shared>,
    /// The peer's address, for the log.
    peer: &'a str,
    /// The peer is on this machine (a Unix socket, or loopback).
    local: bool,
    /// The peer's certificate names an administrator (--admin-cert-cn).
    admin_by_certificate: bool,
    session: &'a dyn Session,
    control: &'a Stream,
    r: BufReader<Stream>,
    w: BufWriter<Stream>,
    /// Where another connection's thread writes this client's
    /// invalidations when it hands the commit order over.
    grant_half: Arc<Stream>,
    /// When the request being read must be complete.
    deadline: Instant,
    /// The socket's read timeout, as last set.
    timeout: ReadTimeout,
    /// With `--snapshot-reads`: the state of the last sync or commit, which
    /// loads read; `None` before the first and after `--snapshot-idle`.
    snapshot: Option<Box<dyn Snapshot>>,
}

/// The holder of the commit order could not send a queued client its
/// invalidations (the client went away or stopped reading).
fn grant_failed() -> End {
    End::Closed("the invalidations could not be sent to the client".into())
}

impl Conn<'_> {
    /// The request's reader, bound by its deadline.
    fn reader(&mut self) -> DeadlineRead<'_> {
        DeadlineRead {
            inner: &mut self.r,
            control: self.control,
            timeout: &self.timeout,
            deadline: self.deadline,
        }
    }

    /// Whether this connection may send `Q` and `X` (`--admin-from`, or a
    /// certificate named by `--admin-cert-cn`).
    fn admin_allowed(&self) -> bool {
        if self.admin_by_certificate {
            return true;
        }
        match self.shared.config.admin_from {
            super::AdminFrom::Any => true,
            super::AdminFrom::Local => self.local,
            super::AdminFrom::Nobody => false,
        }
    }

    fn run(&mut self) -> End {
        let _ = self
            .control
            .set_write_timeout(Some(self.shared.config.request_timeout));
        loop {
            // Waiting for the next request has no limit; the rest of a
            // request, once begun, must come within the timeout.
            let code = match self.next_code() {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return End::Closed("the client closed the connection".into());
                }
                Err(e) => return End::Io(e),
            };
            self.deadline = Instant::now() + self.shared.config.request_timeout;
            let busy = Busy::new(&self.shared.busy);
            let result = self.request(code).and_then(|go_on| {
                self.w.flush()?;
                Ok(go_on)
            });
            drop(busy);
            if code == b'C' && matches!(result, Ok(true)) {
                // A committing client's next request follows at once.
                self.poll(0);
            }
            match result {
                Ok(true) => {}
                Ok(false) => return End::Closed(format!("command {:?}", code as char)),
                Err(e) => return e,
            }
        }
    }

    /// Waits for the next request's command byte. Without a snapshot there
    /// is no limit; with one, the wait is cut at `--snapshot-idle` to give
    /// the snapshot up, and then goes on without a limit.
    fn next_code(&mut self) -> io::Result<u8> {
        let config = &self.shared.config;
        let idle_until = self.snapshot.as_ref().map(|s| {
            let now = Instant::now();
            let old_at = now + config.snapshot_max_age.saturating_sub(s.age());
            (now + config.snapshot_idle).min(old_at)
        });
        loop {
            // Nothing is taken from the buffer by a read that times out.
            match idle_until.filter(|_| self.snapshot.is_some()) {
                Some(until) => {
                    let left = until.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        tracing::debug!("an idle or old snapshot given up");
                        self.snapshot = None;
                        continue;
                    }
                    self.timeout.at_most(self.control, left)?;
                }
                None => self.timeout.long(self.control)?,
            }
            match read_u8(&mut self.r) {
                Err(e) if timed_out(&e) => {}
                r => return r,
            }
        }
    }

    /// With `--snapshot-reads`, the state the session has just been synced
    /// to becomes what its loads read.
    fn renew_snapshot(
        &mut self,
        snapshot: impl FnOnce() -> crate::Result<Box<dyn Snapshot>>,
    ) -> Result<(), End> {
        if self.shared.config.snapshot_reads {
            self.snapshot = None;
            self.snapshot = Some(snapshot()?);
        }
        Ok(())
    }

    /// Handles one request; false ends the connection.
    fn request(&mut self, code: u8) -> Result<bool, End> {
        let max_oids = self.shared.config.max_frame_bytes as usize / 8;
        match Request::read_after(code, &mut self.reader(), max_oids)? {
            Request::Version(theirs) => {
                self.w.write_all(&PROTOCOL.to_be_bytes())?;
                if theirs != PROTOCOL {
                    self.w.flush()?;
                    return Err(End::Client(format!(
                        "protocol version {theirs} asked; this server speaks {PROTOCOL}"
                    )));
                }
            }
            Request::Load(oid) => self.answer_loads(&[oid])?,
            Request::BulkLoad(oids) => self.answer_loads(&oids)?,
            Request::NewOid => self.new_oids(1)?,
            Request::NewOids(n) => self.new_oids(n as usize)?,
            Request::Sync => {
                let oids = if self.shared.config.snapshot_reads {
                    self.snapshot = None;
                    let (oids, snapshot) = self.session.sync_to_snapshot()?;
                    self.snapshot = Some(snapshot);
                    oids
                } else {
                    self.session.sync()
                };
                self.w.write_all(&encode_oids(&oids))?;
            }
            Request::Commit => self.commit()?,
            Request::Snapshot => {
                let w = &mut self.w;
                let (started, limit) = (Instant::now(), self.shared.config.backup_max_age);
                let mut failed = None;
                let r = self.session.backup(&mut |item| {
                    let r = (|| {
                        if started.elapsed() > limit {
                            tracing::warn!(
                                "a backup still copying after --backup-max-age ({} s) was stopped: \
                             its snapshot kept freed pages from reuse",
                                limit.as_secs_f64()
                            );
                            return Err(End::Closed("the backup took too long".into()));
                        }
                        match item {
                            Walk::Count(n) => w.write_all(&n.to_be_bytes())?,
                            Walk::Record(bytes) => {
                                w.write_all(&(bytes.len() as u32).to_be_bytes())?;
                                w.write_all(bytes)?;
                            }
                        }
                        Ok(())
                    })();
                    keep(&mut failed, r)
                });
                walked(failed, r)?;
                self.w.write_all(&0u32.to_be_bytes())?;
            }
            Request::Stats | Request::Quit if !self.admin_allowed() => {
                let what = if code == b'Q' {
                    "stop (Q)"
                } else {
                    "live state (X)"
                };
                tracing::warn!(
                    "refusing an administrative request, {what}, from {}: not allowed from there \
                     (--admin-from); closing that connection",
                    self.peer
                );
                return Ok(false);
            }
            Request::Stats => {
                let text = self.shared.live_state()?;
                self.w.write_all(&(text.len() as u32).to_be_bytes())?;
                self.w.write_all(text.as_bytes())?;
            }
            Request::Pack => {
                self.w.write_all(&[STATUS_OKAY])?;
                self.w.flush()?;
                self.shared.start_pack("requested by a client");
            }
            Request::Quit if !self.shared.config.allow_quit => {
                tracing::info!("a client asked the server to stop (Q); not allowed here");
                return Ok(false);
            }
            Request::Quit => {
                tracing::info!("shutdown requested by a client (Q)");
                self.shared.request_stop();
                return Ok(false);
            }
            // 0x16 begins a TLS handshake record: a TLS client on a plain
            // port is told of in the log, not closed in silence.
            Request::Close(0x16) => {
                return Err(End::Client(
                    "it began a TLS handshake, and this port is plain (serve --tls-cert and \
                     --tls-key make it speak TLS)"
                        .into(),
                ));
            }
            Request::Close(_) => return Ok(false),
        }
        Ok(true)
    }

    fn answer_loads(&mut self, oids: &[Oid]) -> Result<(), End> {
        self.shared
            .loads
            .fetch_add(oids.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let session = self.session;
        if self
            .snapshot
            .as_ref()
            .is_some_and(|s| s.age() >= self.shared.config.snapshot_max_age)
        {
            tracing::info!(
                "a connection's snapshot reached --snapshot-max-age: it reads as Durus does \
                 (read conflicts) until its next sync"
            );
            self.snapshot = None;
        }
        let w = &mut self.w;
        if let Some(snapshot) = &self.snapshot {
            // Every answer from the snapshot: the state the client was last
            // synced to. An oid it lacks is "invalid" if it was made since
            // (the client must sync to see it), else absent.
            let mut flags = session.invalid_flags(oids).into_iter();
            let mut failed = None;
            let r = snapshot.load_each(oids, &mut |_, bytes| {
                let changed = flags.next().unwrap_or(false);
                let r = match bytes {
                    Some(b) => write_record_bytes(w, b),
                    None if changed => LoadAnswer::Invalid.write(w),
                    None => LoadAnswer::KeyError.write(w),
                };
                keep(&mut failed, r.map_err(End::from))
            });
            return walked(failed, r);
        }
        // Each answer is written as its record is read: one record in
        // memory at a time.
        let mut failed = None;
        let r = session.load(oids, &mut |found| {
            let r = match found {
                Found::Invalid => LoadAnswer::Invalid.write(w),
                Found::Record(b) => write_record_bytes(w, b),
                Found::Missing => LoadAnswer::KeyError.write(w),
            };
            keep(&mut failed, r.map_err(End::from))
        });
        walked(failed, r)
    }

    fn new_oids(&mut self, n: usize) -> Result<(), End> {
        if n == 0 {
            return Ok(());
        }
        let oids = self.session.new_oids(n, self.shared.config.max_oids_held)?;
        let mut buf = Vec::with_capacity(8 * n);
        for o in oids {
            buf.extend_from_slice(&o.to_bytes());
        }
        self.w.write_all(&buf)?;
        Ok(())
    }

    /// Polls the socket for up to `--poll-us` until the client's next bytes
    /// arrive, instead of sleeping in the read that follows, if at most
    /// `alone` requests (this one) are being handled and no other
    /// connection polls: a sleeping thread wakes late (tens of
    /// microseconds on a virtual machine), and a client alone waits for
    /// each of those.
    fn poll(&mut self, alone: usize) {
        use std::io::BufRead;
        use std::sync::atomic::Ordering::{AcqRel, Acquire, Release};
        let limit = self.shared.config.poll;
        if limit.is_zero()
            || !self.r.buffer().is_empty()
            || self.shared.busy.load(Acquire) > alone
            || self.shared.polling.swap(true, AcqRel)
        {
            return;
        }
        if self.control.set_nonblocking(true).is_ok() {
            let start = Instant::now();
            // Whatever ends the poll (bytes, end of stream, an error) is
            // met again by the blocking read that follows.
            while let Err(e) = self.r.fill_buf() {
                if e.kind() != io::ErrorKind::WouldBlock || start.elapsed() > limit {
                    break;
                }
                std::hint::spin_loop();
            }
            if let Err(e) = self.control.set_nonblocking(false) {
                // A socket left non-blocking would fail its next read as a
                // timeout: end the connection instead.
                tracing::warn!("cannot make a socket blocking again: {e}");
                self.control.shutdown();
            }
        }
        self.shared.polling.store(false, Release);
    }

    /// What the holder of the commit order runs for this connection as it
    /// hands the order over: this client's invalidations, sent.
    fn grant_to(grant_half: &Arc<Stream>) -> Grant {
        let stream = grant_half.clone();
        Box::new(
            move |invalid: &[Oid]| match (&*stream).write_all(&encode_oids(invalid)) {
                Ok(()) => true,
                Err(e) => {
                    tracing::debug!("could not send a waiting client its invalidations: {e}");
                    false
                }
            },
        )
    }

    /// Waits, queued for the commit order, until the client's first bytes
    /// after `C` arrive. Until the order is granted the wait has no limit
    /// (it is not the client's time); from then on it has the request's.
    fn await_commit_data(&mut self, place: &dyn Queued<'_>) -> Result<(), End> {
        use std::io::BufRead;
        let timeout = self.shared.config.request_timeout;
        loop {
            let wait = match place.peek() {
                Standing::Waiting => timeout,
                Standing::Granted(at) => {
                    let left = (at + timeout).saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(End::Io(request_timed_out()));
                    }
                    left
                }
                Standing::Failed => return Err(grant_failed()),
            };
            self.timeout.at_most(self.control, wait)?;
            match self.r.fill_buf() {
                Ok([]) => {
                    return Err(End::Io(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "the client closed the connection while waiting to commit",
                    )));
                }
                Ok(_) => return Ok(()),
                Err(e) if timed_out(&e) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// `C`: send the invalidations and read the commit under one hold of
    /// the commit order, then commit it (the backend releases the order as
    /// early as it can); answer once it is durable enough.
    fn commit(&mut self) -> Result<(), End> {
        let shared = self.shared.clone();
        let session = self.session;
        let timeout = shared.config.request_timeout;
        let grant_half = &self.grant_half;
        let order = match session.enter_order(&mut || Self::grant_to(grant_half)) {
            Entry::Now(order) => {
                let invalid = session.sync();
                self.w.write_all(&encode_oids(&invalid))?;
                self.w.flush()?;
                // Waiting for the commit order is not the client's time.
                self.deadline = Instant::now() + timeout;
                // The commit order is held from here: the commit data must
                // come within what is left of the request's time.
                self.poll(1);
                order
            }
            Entry::Queued(place) => {
                // Whoever hands the order over sends the invalidations:
                // sleep until the client answers them.
                self.await_commit_data(&*place)?;
                // Data sent before the invalidations (by a client that does
                // not wait for them) waits here for the order.
                let Some((order, granted)) = place.wait() else {
                    return Err(grant_failed());
                };
                self.deadline = granted + timeout;
                order
            }
        };
        let Some(records) = read_commit_data(&mut self.reader(), shared.config.max_frame_bytes)?
        else {
            // The client found a conflict in the invalidations and gave up:
            // it is synced to the state they bring it to, which the
            // snapshot, taken before the order is given back, is exactly.
            let renewed = self.renew_snapshot(|| session.snapshot());
            drop(order);
            renewed?;
            return Ok(());
        };
        let bytes: u64 = records.values().map(|r| r.len() as u64 + 12).sum();
        let objects = records.len();
        let snapshot_reads = shared.config.snapshot_reads;
        if snapshot_reads {
            self.snapshot = None;
        }
        let (committed, snapshot) = order.commit(records, snapshot_reads);
        if let Some(s) = snapshot {
            self.snapshot = Some(s?);
        }
        match committed {
            Ok(()) => {
                self.w.write_all(&[STATUS_OKAY])?;
                shared
                    .commits
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::debug!("committed {objects} objects, {bytes} bytes");
                shared.committed_bytes(bytes + 8);
                Ok(())
            }
            Err(e) if e.is_conflict() => {
                tracing::info!("commit refused as a conflict: {e}");
                self.w.write_all(&[STATUS_INVALID])?;
                Ok(())
            }
            Err(StorageError::Invalid(e)) => Err(End::Client(format!("commit refused: {e}"))),
            Err(e) => Err(e.into()),
        }
    }
}
