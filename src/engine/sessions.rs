//! Sessions (an in-process handle or a server connection), their invalid
//! sets, and oid allocation.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use parking_lot::Mutex;

use super::layout::{KEY_OIDS, META, OID_BLOCK, OidMeta, encode};
use super::{CommitState, Engine};
use crate::error::{InvalidInput, Result};
use crate::record::Oid;

/// An identifier of a session.
pub(crate) type SessionId = u64;

/// An invalid set: oids a session must treat as invalid until it syncs.
pub(crate) type InvalidSet = Arc<Mutex<HashSet<Oid>>>;

impl Engine {
    /// Registers a session and returns its id and invalid set.
    pub(crate) fn register_session(&self) -> (SessionId, InvalidSet) {
        let id = self.next_session.fetch_add(1, Ordering::Relaxed);
        let set: InvalidSet = Arc::new(Mutex::new(HashSet::new()));
        self.sessions.lock().insert(id, set.clone());
        (id, set)
    }

    /// How many sessions receive invalidations.
    #[cfg(test)]
    pub(crate) fn session_count(&self) -> usize {
        self.sessions.lock().len()
    }

    /// Forgets a session and the oids it held allocated but unused.
    pub(crate) fn unregister_session(&self, id: SessionId) {
        self.sessions.lock().remove(&id);
        let mut st = self.commit.lock();
        if st.allocated_by.remove(&id).is_some_and(|n| n > 0) {
            st.allocated.retain(|_, s| *s != id);
        }
    }

    /// Adds `oids` to the invalid set of every session but `except`.
    pub(crate) fn invalidate_others(&self, except: Option<SessionId>, oids: &[Oid]) {
        if oids.is_empty() {
            return;
        }
        for (id, set) in self.sessions.lock().iter() {
            if Some(*id) != except {
                set.lock().extend(oids.iter().copied());
            }
        }
    }

    /// Hands out `n` new oids to `session`. The reserved mark is made durable
    /// before any oid above it is handed out. Refused once the oid range is
    /// used up.
    pub(crate) fn allocate(&self, session: SessionId, n: usize) -> Result<Vec<Oid>> {
        self.allocate_capped(session, n, u64::MAX)
    }

    /// [`allocate`](Self::allocate), refused if the session would then hold
    /// more than `cap` oids handed out and not yet stored (a server's bound
    /// on what one connection can make it remember).
    pub(crate) fn allocate_capped(
        &self,
        session: SessionId,
        n: usize,
        cap: u64,
    ) -> Result<Vec<Oid>> {
        self.check_writable()?;
        let n = n as u64;
        let mut st = self.commit.lock();
        let held = st.allocated_by.get(&session).copied().unwrap_or(0);
        if held.saturating_add(n) > cap {
            return Err(InvalidInput::TooManyOidsHeld {
                held,
                asked: n,
                cap,
            }
            .into());
        }
        let end = st
            .next_oid
            .checked_add(n)
            .ok_or(InvalidInput::OidsExhausted {
                highest: Oid(st.next_oid.saturating_sub(1)),
            })?;
        if end > st.reserved {
            let reserved = end.saturating_add(OID_BLOCK);
            let r = self.write_oid_meta(reserved, &mut st);
            self.poisoning(r)?;
            st.reserved = reserved;
        }
        let start = st.next_oid;
        st.next_oid = end;
        let oids: Vec<Oid> = (start..end).map(Oid).collect();
        for &oid in &oids {
            st.allocated.insert(oid, session);
        }
        *st.allocated_by.entry(session).or_default() += n;
        Ok(oids)
    }

    /// Durably records the oid reservation mark; every commit before it is
    /// durable in the file with it.
    pub(super) fn write_oid_meta(&self, reserved: u64, st: &mut CommitState) -> Result<()> {
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_quick_repair(self.quick_repair);
        {
            let mut m = w.open_table(META)?;
            m.insert(KEY_OIDS, encode(&OidMeta { reserved }).as_slice())?;
        }
        w.commit()?;
        self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
        self.log_durable.fetch_max(st.log_seq, Ordering::AcqRel);
        Ok(())
    }
}
