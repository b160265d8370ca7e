//! Durability: group flushes, checkpoints, the checkpoint thread, and close.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use super::layout::{KEY_OIDS, META, OidMeta, encode};
use super::{CommitTicket, Db, Engine};
use crate::checkpoint::CompactionFacts;
use crate::error::{Result, StorageError};

enum Control {
    Stop,
}

/// Owns the checkpoint thread: dropping it stops and joins the thread.
pub(super) struct Checkpointer {
    tx: Sender<Control>,
    handle: Option<JoinHandle<()>>,
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        let _ = self.tx.send(Control::Stop);
        if let Some(h) = self.handle.take() {
            // The last handle may be dropped on the checkpointer itself.
            if h.thread().id() != std::thread::current().id() {
                let _ = h.join();
            }
        }
    }
}

impl Engine {
    /// Starts the thread that checkpoints when the policy asks for it, if
    /// the policy wants one.
    pub(super) fn start_checkpointer(self: &Arc<Self>) -> Result<()> {
        let Some(interval) = self.policy.background_interval() else {
            return Ok(());
        };
        let (tx, rx): (Sender<Control>, Receiver<Control>) = crossbeam_channel::bounded(1);
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("durus-redb-checkpoint".into())
            .spawn(move || {
                loop {
                    match rx.recv_timeout(interval) {
                        Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Err(RecvTimeoutError::Timeout) => {
                            let Some(engine) = weak.upgrade() else { return };
                            let due = engine.policy.checkpoint_due(&engine.commit.lock().facts());
                            if due && let Err(e) = engine.checkpoint() {
                                tracing::error!(error = %e, "background checkpoint failed");
                                return;
                            }
                        }
                    }
                }
            })?;
        *self.checkpointer.lock() = Some(Checkpointer {
            tx,
            handle: Some(handle),
        });
        Ok(())
    }

    /// Waits until the commit of `ticket` is as durable as its policy asked.
    pub(crate) fn finish(&self, ticket: CommitTicket) -> Result<()> {
        if !ticket.needs_flush || self.durable_seq.load(Ordering::Acquire) >= ticket.seq {
            return Ok(());
        }
        let _leader = self.flush_lock.lock();
        if self.durable_seq.load(Ordering::Acquire) >= ticket.seq {
            return Ok(());
        }
        // The group's flush runs without the commit lock, so that other
        // connections go on sending invalidations and receiving commit data
        // meanwhile (their writes wait for redb's single writer only).
        // Every commit applied before this durable transaction becomes
        // durable with it.
        let target = self.commit.lock().applied_seq;
        self.durable_flush()?;
        self.durable_seq.fetch_max(target, Ordering::AcqRel);
        let mut st = self.commit.lock();
        if st.applied_seq == target {
            // Nothing was applied meanwhile: the policy's counters restart.
            st.checkpointed();
        }
        Ok(())
    }

    /// An empty durable write transaction: redb makes every transaction
    /// committed before it durable with it. A failure poisons the store.
    fn durable_flush(&self) -> Result<()> {
        let r = (|| -> Result<()> {
            let db = self.db()?;
            let mut w = db.rw()?.begin_write()?;
            w.set_quick_repair(self.quick_repair);
            w.commit()?;
            Ok(())
        })();
        self.poisoning(r)
    }

    /// Makes every applied commit durable (one fsync).
    pub(crate) fn checkpoint(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let mut st = self.commit.lock();
        if st.applied_seq == self.durable_seq.load(Ordering::Acquire) && st.commits_since == 0 {
            return Ok(());
        }
        self.durable_flush()?;
        self.durable_seq.fetch_max(st.applied_seq, Ordering::AcqRel);
        st.checkpointed();
        Ok(())
    }

    /// Stops the workers, checkpoints, compacts if the policy asks, and
    /// closes the database. Later calls on any session fail with
    /// [`StorageError::Closed`]; a second close does nothing.
    pub(crate) fn close(&self) -> Result<()> {
        if let Some(hook) = self.hook.get() {
            hook.on_close();
        }
        drop(self.checkpointer.lock().take());
        // The commit lock first, then the database: the order of every
        // commit path, so a close racing a commit cannot deadlock.
        let mut st = self.commit.lock();
        let mut slot = self.db.write();
        let Some(db) = slot.take() else { return Ok(()) };
        let Db::Rw(mut db) = db else { return Ok(()) };
        if let Some(why) = self.poisoned.lock().as_ref() {
            return Err(StorageError::Poisoned {
                reason: why.clone(),
            });
        }
        // Persist the exact oid mark and make every applied commit durable,
        // unless both already are.
        let pending =
            st.applied_seq != self.durable_seq.load(Ordering::Acquire) || st.commits_since > 0;
        if pending || st.next_oid != st.reserved {
            let mut w = db.begin_write()?;
            w.set_quick_repair(self.quick_repair);
            {
                let mut m = w.open_table(META)?;
                m.insert(
                    KEY_OIDS,
                    encode(&OidMeta {
                        reserved: st.next_oid,
                    })
                    .as_slice(),
                )?;
            }
            w.commit()?;
            st.reserved = st.next_oid;
            st.checkpointed();
        }
        let file_bytes = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        // Only a large file can be worth compacting: skip the stats otherwise.
        if file_bytes >= 64 << 20 {
            let fragmented = {
                let w = db.begin_write()?;
                let f = w.stats()?.fragmented_bytes();
                w.abort()?;
                f
            };
            let facts = CompactionFacts {
                file_bytes,
                fragmented_bytes: fragmented,
            };
            if self.policy.compact_on_close(&facts) {
                tracing::info!(?facts, "compacting on close");
                db.compact()?;
            }
        }
        drop(db);
        tracing::debug!(path = %self.path.display(), "store closed");
        Ok(())
    }
}
