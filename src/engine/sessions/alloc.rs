//! The oid allocator: oids handed out and not yet stored, and the durable
//! reservation mark every oid handed out stays below.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::SessionId;
use crate::engine::layout::{KEY_OIDS, META, OID_BLOCK, OID_BLOCK_MAX, OidMeta, RECORDS, encode};
use crate::engine::{CommitState, Engine};
use crate::error::{InvalidInput, Result};
use crate::ranked::{Mutex, rank};
use crate::record::Oid;

/// Reservations of oids closer together than this reserve further ahead.
pub(super) const RESERVE_EVERY: Duration = Duration::from_secs(1);

/// The oid allocator's record of oids handed out and not yet stored (the
/// mark itself is in the commit state, under the commit lock).
pub(crate) struct Allocator {
    /// Oids handed out and not yet stored.
    pub(super) allocs: Mutex<crate::engine::commit::Allocations, { rank::ALLOCS }>,
    /// Every oid handed out so far is below this (`CommitState::next_oid`,
    /// readable without the commit lock).
    pub(super) oids_out: std::sync::atomic::AtomicU64,
}

impl Allocator {
    pub(crate) fn new(next_oid: u64) -> Allocator {
        Allocator {
            allocs: Mutex::new(Default::default()),
            oids_out: std::sync::atomic::AtomicU64::new(next_oid),
        }
    }

    /// Raises the mark (an import stored oids up to `end`).
    pub(crate) fn raise(&self, end: u64) {
        self.oids_out.fetch_max(end, Ordering::AcqRel);
    }

    /// Whether `session` may store `oid`, which is not stored yet (the
    /// rule of `storage::may_create`).
    pub(crate) fn may_create(&self, session: SessionId, oid: Oid) -> Result<()> {
        self.allocs.lock().may_create(session, oid)
    }

    /// Forgets `oids` as handed out: they are stored now.
    pub(crate) fn stored(&self, oids: impl IntoIterator<Item = Oid>) {
        let mut allocs = self.allocs.lock();
        for oid in oids {
            if let Some(s) = allocs.by_oid.remove(&oid)
                && let Some(n) = allocs.by_session.get_mut(&s)
            {
                *n = n.saturating_sub(1);
            }
        }
    }
}

impl Engine {
    /// Hands out `n` new oids to `session`. The reserved mark is made durable
    /// before any oid above it is handed out. Refused once the oid range is
    /// used up. Never an oid that is stored: the first oid of a store is
    /// the root (0), handed out only while no root is stored (a root
    /// committed directly, without `new_oid`, is passed over).
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
        // `allocs` is not held across the mark's write below: that write
        // commits a parked collector deletion first, which publishes (and
        // nothing is taken under `allocs`). Under the commit lock nothing
        // else raises this session's count meanwhile.
        let held = (self.alloc.allocs.lock().by_session.get(&session).copied()).unwrap_or(0);
        if held.saturating_add(n) > cap {
            return Err(InvalidInput::TooManyOidsHeld {
                held,
                asked: n,
                cap,
            }
            .into());
        }
        st.next_oid = crate::storage::next_free_oid(st.next_oid, || {
            Ok(self
                .db()?
                .begin_read()?
                .open_table(RECORDS)?
                .get(0)?
                .is_some())
        })?;
        let end = st
            .next_oid
            .checked_add(n)
            .ok_or(InvalidInput::OidsExhausted {
                highest: Oid(st.next_oid.saturating_sub(1)),
            })?;
        if end > st.reserved {
            // A reservation is a durable redb commit under the commit lock
            // (an fsync every commit waits for): one that comes within a
            // second of the last reserves twice as far ahead, so that a
            // store handing out oids fast reserves about once a second. A
            // crash skips what was reserved and not handed out.
            let now = Instant::now();
            st.oid_block = match st.reserved_at {
                Some(at) if now.duration_since(at) < RESERVE_EVERY => {
                    (st.oid_block * 2).min(OID_BLOCK_MAX)
                }
                _ => OID_BLOCK,
            };
            let reserved = end.saturating_add(st.oid_block);
            let r = self.write_oid_meta(reserved, &mut st);
            self.poisoning(r)?;
            st.reserved = reserved;
            st.reserved_at = Some(now);
        }
        let start = st.next_oid;
        st.next_oid = end;
        self.alloc.oids_out.fetch_max(end, Ordering::AcqRel);
        let oids: Vec<Oid> = (start..end).map(Oid).collect();
        let mut allocs = self.alloc.allocs.lock();
        for &oid in &oids {
            allocs.by_oid.insert(oid, session);
        }
        *allocs.by_session.entry(session).or_default() += n;
        Ok(oids)
    }

    /// Durably records the oid reservation mark; every commit before it is
    /// durable in the file with it.
    pub(in crate::engine) fn write_oid_meta(
        &self,
        reserved: u64,
        st: &mut CommitState,
    ) -> Result<()> {
        self.settle_parked(st)?;
        let db = self.db()?;
        let mut w = db.rw()?.begin_write()?;
        w.set_quick_repair(self.quick_repair);
        {
            let mut m = w.open_table(META)?;
            m.insert(KEY_OIDS, encode(&OidMeta { reserved }).as_slice())?;
        }
        w.commit()?;
        self.sync.made_durable(st.applied_seq, st.log_seq);
        Ok(())
    }
}
