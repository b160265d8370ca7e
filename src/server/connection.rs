//! One client connection: its session, its requests, in order.

use std::collections::BTreeMap;
use std::io::{self, BufReader, BufWriter, Write};
use std::sync::Arc;

use crate::error::StorageError;
use crate::protocol::{
    PROTOCOL, STATUS_INVALID, STATUS_KEYERROR, STATUS_OKAY, read_bytes, read_oid, read_oids,
    read_u8, read_u32, write_oids,
};
use crate::record::{Oid, Record};
use crate::redb_store::{Engine, InvalidSet, SessionId};
use crate::storage::checked_record;

use super::Shared;
use super::net::Stream;

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

impl From<StorageError> for End {
    fn from(e: StorageError) -> End {
        match e {
            StorageError::ReadOnly => End::Client(
                "the store is served read-only (--readonly): commits and new oids are refused"
                    .into(),
            ),
            e => End::Storage(e),
        }
    }
}

/// The session of one connection; unregistered when dropped.
struct Session<'a> {
    engine: &'a Engine,
    id: SessionId,
    invalid: InvalidSet,
}

impl Drop for Session<'_> {
    fn drop(&mut self) {
        self.engine.unregister_session(self.id);
    }
}

impl Session<'_> {
    fn take_invalid(&self) -> Vec<Oid> {
        let mut set = self.invalid.lock();
        let mut oids: Vec<Oid> = set.drain().collect();
        oids.sort_unstable();
        oids
    }
}

/// Serves one connection until it ends, and logs why it ended.
pub(super) fn serve(shared: &Arc<Shared>, stream: Stream, peer: &str) {
    let engine = &*shared.engine;
    let (id, invalid) = engine.register_session();
    let session = Session {
        engine,
        id,
        invalid,
    };
    let end = match stream.try_clone() {
        Ok(read_half) => {
            let mut conn = Conn {
                shared,
                session: &session,
                control: &stream,
                r: BufReader::new(read_half),
                w: BufWriter::new(stream.try_clone().expect("a cloned socket clones again")),
            };
            conn.run()
        }
        Err(e) => End::Io(e),
    };
    match &end {
        End::Closed(why) => tracing::debug!("connection from {peer} closed: {why}"),
        End::Client(why) => tracing::warn!("closing the connection from {peer}: {why}"),
        End::Io(e)
            if matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
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

struct Conn<'a> {
    shared: &'a Arc<Shared>,
    session: &'a Session<'a>,
    control: &'a Stream,
    r: BufReader<Stream>,
    w: BufWriter<Stream>,
}

impl Conn<'_> {
    fn engine(&self) -> &Engine {
        &self.shared.engine
    }

    fn run(&mut self) -> End {
        let timeout = Some(self.shared.config.request_timeout);
        let _ = self.control.set_write_timeout(timeout);
        loop {
            // Waiting for the next request has no limit; the rest of a
            // request, once begun, must come within the timeout.
            if let Err(e) = self.control.set_read_timeout(None) {
                return End::Io(e);
            }
            let code = match read_u8(&mut self.r) {
                Ok(c) => c,
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    return End::Closed("the client closed the connection".into());
                }
                Err(e) => return End::Io(e),
            };
            if let Err(e) = self.control.set_read_timeout(timeout) {
                return End::Io(e);
            }
            let result = self.request(code).and_then(|go_on| {
                self.w.flush()?;
                Ok(go_on)
            });
            match result {
                Ok(true) => {}
                Ok(false) => return End::Closed(format!("command {:?}", code as char)),
                Err(e) => return e,
            }
        }
    }

    /// Handles one request; false ends the connection.
    fn request(&mut self, code: u8) -> Result<bool, End> {
        match code {
            b'V' => {
                let theirs = read_u32(&mut self.r)?;
                self.w.write_all(&PROTOCOL.to_be_bytes())?;
                if theirs != PROTOCOL {
                    self.w.flush()?;
                    return Err(End::Client(format!(
                        "protocol version {theirs} asked; this server speaks {PROTOCOL}"
                    )));
                }
            }
            b'L' => {
                let oid = read_oid(&mut self.r)?;
                self.answer_loads(&[oid])?;
            }
            b'B' => {
                let max = self.shared.config.max_frame_bytes as usize / 8;
                let oids = read_oids(&mut self.r, max).map_err(|e| match e.kind() {
                    io::ErrorKind::InvalidData => End::Client(format!("bulk load: {e}")),
                    _ => End::Io(e),
                })?;
                self.answer_loads(&oids)?;
            }
            b'N' => self.new_oids(1)?,
            b'M' => {
                let n = read_u8(&mut self.r)?;
                self.new_oids(n as usize)?;
            }
            b'S' => {
                let oids = self.session.take_invalid();
                write_oids(&mut self.w, &oids)?;
            }
            b'C' => self.commit()?,
            b'P' => {
                self.w.write_all(&[STATUS_OKAY])?;
                self.w.flush()?;
                self.shared.start_pack("requested by a client");
            }
            b'Q' => {
                tracing::info!("shutdown requested by a client (Q)");
                self.shared.request_stop();
                return Ok(false);
            }
            _ => return Ok(false),
        }
        Ok(true)
    }

    fn answer_loads(&mut self, oids: &[Oid]) -> Result<(), End> {
        let invalid: Vec<bool> = {
            let set = self.session.invalid.lock();
            oids.iter().map(|o| set.contains(o)).collect()
        };
        let wanted: Vec<Oid> = oids
            .iter()
            .zip(&invalid)
            .filter(|(_, inv)| !**inv)
            .map(|(o, _)| *o)
            .collect();
        let mut found = self.engine().load_many(&wanted)?.into_iter();
        for inv in invalid {
            if inv {
                self.w.write_all(&[STATUS_INVALID])?;
                continue;
            }
            match found.next().flatten() {
                Some(record) => {
                    self.w.write_all(&[STATUS_OKAY])?;
                    self.w.write_all(&(record.len() as u32).to_be_bytes())?;
                    self.w.write_all(record.as_bytes())?;
                }
                None => self.w.write_all(&[STATUS_KEYERROR])?,
            }
        }
        Ok(())
    }

    fn new_oids(&mut self, n: usize) -> Result<(), End> {
        if n == 0 {
            return Ok(());
        }
        let oids = self.engine().allocate(self.session.id, n)?;
        let mut buf = Vec::with_capacity(8 * n);
        for o in oids {
            buf.extend_from_slice(&o.to_bytes());
        }
        self.w.write_all(&buf)?;
        Ok(())
    }

    /// `C`: send the invalidations and apply the commit under one hold of the
    /// commit lock; answer once the commit is durable enough.
    fn commit(&mut self) -> Result<(), End> {
        let shared = self.shared.clone();
        let engine = &*shared.engine;
        let mut order = engine.lock_commits();
        let invalid = self.session.take_invalid();
        write_oids(&mut self.w, &invalid)?;
        self.w.flush()?;
        let len = read_u32(&mut self.r)?;
        if len == 0 {
            // The client found a conflict in the invalidations and gave up.
            return Ok(());
        }
        if len > shared.config.max_frame_bytes {
            return Err(End::Client(format!(
                "commit of {len} bytes is larger than the {} allowed (--max-frame-bytes)",
                shared.config.max_frame_bytes
            )));
        }
        let data = read_bytes(&mut self.r, len as usize)?;
        let records = parse_commit(&data).map_err(End::Client)?;
        match order.apply(self.session.id, &records) {
            Ok(ticket) => {
                drop(order);
                engine.finish(ticket)?;
                self.w.write_all(&[STATUS_OKAY])?;
                tracing::debug!("committed {} objects, {len} bytes", records.len());
                shared.committed_bytes(len as u64 + 8);
                Ok(())
            }
            Err(e) if e.is_conflict() => {
                drop(order);
                tracing::info!("commit refused as a conflict: {e}");
                self.w.write_all(&[STATUS_INVALID])?;
                Ok(())
            }
            Err(StorageError::Invalid(e)) => Err(End::Client(format!("commit refused: {e}"))),
            Err(e) => Err(e.into()),
        }
    }
}

/// Splits a commit's data (`u32 rlen | oid | record` repeated, where `rlen`
/// counts the oid and the record) into validated records.
fn parse_commit(data: &[u8]) -> Result<BTreeMap<Oid, Record>, String> {
    let mut records = BTreeMap::new();
    let mut i = 0usize;
    while i < data.len() {
        let Some(head) = data.get(i..i + 12) else {
            return Err(format!(
                "commit data cut short at byte {i} of {}",
                data.len()
            ));
        };
        let rlen = u32::from_be_bytes(head[..4].try_into().expect("4 bytes")) as usize;
        let oid = Oid::from_bytes(head[4..12].try_into().expect("8 bytes"));
        if rlen < 8 || i + 4 + rlen > data.len() {
            return Err(format!(
                "record of oid {oid} claims {rlen} bytes at byte {i} of a {}-byte commit",
                data.len()
            ));
        }
        let bytes = data[i + 12..i + 4 + rlen].to_vec();
        let record = checked_record(oid, bytes).map_err(|e| e.to_string())?;
        records.insert(oid, record);
        i += 4 + rlen;
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(oid: u64, record: &[u8]) -> Vec<u8> {
        let mut v = ((record.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(&oid.to_be_bytes());
        v.extend_from_slice(record);
        v
    }

    #[test]
    fn commit_data_parses_into_records() {
        let a = Record::new(Oid(1), b"a", &[Oid(2)]);
        let b = Record::new(Oid(2), b"bb", &[]);
        let mut data = frame(1, a.as_bytes());
        data.extend(frame(2, b.as_bytes()));
        let parsed = parse_commit(&data).unwrap();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[&Oid(1)], a);
        assert_eq!(parsed[&Oid(2)], b);
    }

    #[test]
    fn malformed_commit_data_is_refused() {
        let a = Record::new(Oid(1), b"a", &[]);
        let good = frame(1, a.as_bytes());
        // Cut short, length overrunning, record of another oid, bad record.
        assert!(parse_commit(&good[..good.len() - 1]).is_err());
        assert!(parse_commit(&good[..7]).is_err());
        let mut over = good.clone();
        over[..4].copy_from_slice(&1000u32.to_be_bytes());
        assert!(parse_commit(&over).is_err());
        assert!(parse_commit(&frame(2, a.as_bytes())).is_err());
        assert!(parse_commit(&frame(1, &[0u8; 5])).is_err());
        let mut tiny = good.clone();
        tiny[..4].copy_from_slice(&3u32.to_be_bytes());
        assert!(parse_commit(&tiny).is_err());
    }
}
