//! Durability: the log's group flushes, checkpoints, the background thread
//! that takes them (and syncs the log in `Durability::Os`), and close.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};

use super::layout::{KEY_LOG_OPEN, KEY_OIDS, LOG_STATE, META, OidMeta, encode};
use super::{CommitTicket, Db, Engine};
use crate::checkpoint::{CompactionFacts, Durability as Mode};
use crate::error::{Result, StorageError};
use crate::ranked::{Condvar, Mutex, rank};

enum Control {
    Stop,
    /// A commit found a checkpoint due.
    Wake,
}

/// Owns the background thread: dropping it stops and joins the thread.
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

/// The commit log with its group syncs and the checkpoints: what is
/// durable, who syncs now, the checkpoint thread. Owned here; the rest of
/// the engine goes through its methods.
pub(crate) struct Syncer {
    /// The commit log (none for `Durability::Manual` and read-only opens).
    log: Option<Arc<super::log::CommitLog>>,
    /// redb transactions (counted by `CommitState::applied_seq`) that are durable.
    durable_seq: std::sync::atomic::AtomicU64,
    /// Logged commits (by sequence number) that are durable: in the log on
    /// disk or in the file by a checkpoint.
    log_durable: std::sync::atomic::AtomicU64,
    /// Whether a committer is syncing the log for a group right now.
    syncing: Mutex<bool, { rank::SYNCING }>,
    /// The same, read without the lock by a committer that waits for it
    /// (see [`FLUSH_SPIN`]): a spinning waiter must not take the lock.
    flushing: std::sync::atomic::AtomicBool,
    /// Signalled after every sync of the log.
    synced: Condvar,
    /// One checkpoint at a time.
    checkpoint_lock: Mutex<(), { rank::CHECKPOINT }>,
    checkpointer: Mutex<Option<Checkpointer>, { rank::LEAF }>,
}

impl Syncer {
    /// `log_seq`: the last commit already durable (replayed or checkpointed).
    pub(crate) fn new(log: Option<Arc<super::log::CommitLog>>, log_seq: u64) -> Syncer {
        Syncer {
            log,
            durable_seq: std::sync::atomic::AtomicU64::new(0),
            log_durable: std::sync::atomic::AtomicU64::new(log_seq),
            syncing: Mutex::new(false),
            flushing: std::sync::atomic::AtomicBool::new(false),
            synced: Condvar::new(),
            checkpoint_lock: Mutex::new(()),
            checkpointer: Mutex::new(None),
        }
    }

    /// The commit log, if the store keeps one.
    pub(crate) fn log(&self) -> Option<&Arc<super::log::CommitLog>> {
        self.log.as_ref()
    }

    /// Logged commits up to this one are durable.
    #[cfg(test)]
    pub(crate) fn log_durable(&self) -> u64 {
        self.log_durable.load(Ordering::Acquire)
    }

    /// A durable redb commit made every transaction up to `applied_seq`
    /// and every logged commit up to `log_seq` durable.
    pub(crate) fn made_durable(&self, applied_seq: u64, log_seq: u64) {
        self.durable_seq.fetch_max(applied_seq, Ordering::AcqRel);
        self.log_durable.fetch_max(log_seq, Ordering::AcqRel);
    }
}

/// How long a committer whose commit waits for a group sync that is
/// running waits for it without sleeping (yielding its core to any other
/// thread that can run) before it sleeps: about one `fdatasync` of the
/// log. Measured, with the values tried: docs/benchmarks.md
/// (`FLUSH_SPIN`).
pub(super) const FLUSH_SPIN: Duration = Duration::from_micros(150);

impl Engine {
    /// Starts the thread that checkpoints when the policy asks for it and,
    /// in `Durability::Os`, syncs the log every interval, if either is wanted.
    pub(super) fn start_checkpointer(self: &Arc<Self>) -> Result<()> {
        let sync_every = match self.durability {
            Mode::Os { fsync_interval } if self.sync.log.is_some() => {
                Some(fsync_interval.max(Duration::from_millis(1)))
            }
            _ => None,
        };
        let checkpoint_every = self.policy.background_interval();
        let interval = match (sync_every, checkpoint_every) {
            (Some(a), Some(b)) => a.min(b),
            (Some(a), None) | (None, Some(a)) => a,
            (None, None) => return Ok(()),
        };
        let (tx, rx): (Sender<Control>, Receiver<Control>) = crossbeam_channel::bounded(1);
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("durus-redb-checkpoint".into())
            .spawn(move || {
                let mut last_sync = Instant::now();
                loop {
                    match rx.recv_timeout(interval) {
                        Ok(Control::Stop) | Err(RecvTimeoutError::Disconnected) => return,
                        Ok(Control::Wake) | Err(RecvTimeoutError::Timeout) => {}
                    }
                    let Some(engine) = weak.upgrade() else { return };
                    if let Some(every) = sync_every
                        && last_sync.elapsed() >= every
                    {
                        last_sync = Instant::now();
                        if let Err(e) = engine.sync_log() {
                            tracing::error!(error = %e, "syncing the commit log failed");
                            engine.poison(&e);
                            return;
                        }
                    }
                    let due = engine.policy.checkpoint_due(&engine.commit.lock().facts());
                    if due && let Err(e) = engine.checkpoint() {
                        // Without checkpoints (and, in Os mode, syncs) the
                        // promises no longer hold: refuse commits from now on.
                        tracing::error!(error = %e, "background checkpoint failed");
                        engine.poison(&e);
                        return;
                    }
                }
            })?;
        *self.sync.checkpointer.lock() = Some(Checkpointer {
            tx,
            handle: Some(handle),
        });
        Ok(())
    }

    /// Asks the background thread for a checkpoint (without waiting);
    /// false if there is no thread to ask.
    fn wake_checkpointer(&self) -> bool {
        match self.sync.checkpointer.lock().as_ref() {
            Some(c) => match c.tx.try_send(Control::Wake) {
                Ok(()) | Err(TrySendError::Full(_)) => true,
                Err(TrySendError::Disconnected(_)) => false,
            },
            None => false,
        }
    }

    /// Commits applied and not yet durable, and the time since the last
    /// checkpoint began (for the server's live state).
    pub(crate) fn durability_lag(&self) -> (u64, Duration) {
        let st = self.commit.lock();
        let durable = self.sync.log_durable.load(Ordering::Acquire);
        (
            st.log_seq.saturating_sub(durable),
            st.last_checkpoint.elapsed(),
        )
    }

    /// Waits until the commit of `ticket` is as durable as the durability
    /// mode promises, and starts a checkpoint if the policy asked for one.
    pub(crate) fn finish(&self, ticket: CommitTicket) -> Result<()> {
        if ticket.checkpoint {
            // With a log, the background thread takes it. Without a log the
            // checkpoint is what makes the commit durable, so the policy's
            // bounds are exact; and without a thread (a policy with no
            // background interval) nobody else would take it.
            if !(self.sync.log.is_some() && self.wake_checkpointer()) {
                self.checkpoint()?;
            }
        }
        let covered = || self.sync.log_durable.load(Ordering::Acquire) >= ticket.seq;
        if !ticket.wait || covered() {
            return Ok(());
        }
        // Group commit: one committer (the leader) syncs the log for every
        // commit written so far. Those that arrive meanwhile wait, and are
        // all woken at once when it is done: the covered ones return, one of
        // the others leads the next group.
        //
        // A committer that finds a sync running first waits for it without
        // sleeping, for up to FLUSH_SPIN, giving its core to any other
        // thread that can run: sleeping on the condition variable and being
        // woken costs two thread switches, 20-30 us each on a virtual
        // machine, for a wait of about one sync.
        if self.sync.flushing.load(Ordering::Acquire) {
            super::spin_while(FLUSH_SPIN, || {
                self.sync.flushing.load(Ordering::Acquire) && !covered()
            });
        }
        let mut syncing = self.sync.syncing.lock();
        loop {
            if covered() {
                return Ok(());
            }
            if !*syncing {
                *syncing = true;
                self.sync.flushing.store(true, Ordering::Release);
                drop(syncing);
                let r = self.sync_log();
                syncing = self.sync.syncing.lock();
                *syncing = false;
                self.sync.flushing.store(false, Ordering::Release);
                self.sync.synced.notify_all();
                r?;
                continue;
            }
            self.sync.synced.wait(&mut syncing);
        }
    }

    /// Makes every logged commit written so far durable (one `fdatasync`).
    fn sync_log(&self) -> Result<()> {
        let Some(log) = &self.sync.log else {
            return Ok(());
        };
        // After a failed sync the OS may have dropped the unwritten pages and
        // report success on the next one: nothing counts as durable any more.
        self.check_writable()?;
        let r = log.sync();
        let covered = self.log_failed(r)?;
        self.sync.log_durable.fetch_max(covered, Ordering::AcqRel);
        Ok(())
    }

    /// Passes on `r`, a result of the commit log; if it failed, the store
    /// file is first made durable with every commit applied (redb itself is
    /// sound, and the commits acknowledged since the last checkpoint may
    /// have no other copy now: a log segment removed, replaced or shrunk
    /// under the store, a failed fsync of the log), then the store is
    /// poisoned. Call without the commit lock.
    fn log_failed<T>(&self, r: Result<T>) -> Result<T> {
        let healthy = self.poisoned.lock().is_none();
        if let Err(e) = &r
            && healthy
            && self.durable_flush(true).is_ok()
        {
            tracing::error!(
                error = %e,
                "the commit log failed; the store file was made durable with every commit \
                 applied, so none acknowledged is lost"
            );
        }
        self.poisoning(r)
    }

    /// An empty durable write transaction: redb makes every transaction
    /// committed before it durable with it. A failure poisons the store.
    /// With `log_not_needed`, the same commit records that the store needs
    /// no commit log to be whole (as a clean close does).
    fn durable_flush(&self, log_not_needed: bool) -> Result<()> {
        let r = (|| -> Result<()> {
            // Under the commit lock only to begin: a parked collector
            // transaction is committed first, and none is parked after.
            let mut st = self.commit.lock();
            self.settle_parked(&mut st)?;
            let db = self.db()?;
            let mut w = db.rw()?.begin_write()?;
            drop(st);
            w.set_quick_repair(self.quick_repair);
            if log_not_needed {
                w.open_table(LOG_STATE)?.insert(KEY_LOG_OPEN, 0)?;
            }
            w.commit()?;
            Ok(())
        })();
        self.poisoning(r)
    }

    /// A checkpoint: makes the file durable with every commit applied so far
    /// (one fsync of the file) and trims the log. The commit lock is held
    /// only to start a new log segment (no fsync under it: the old segment
    /// is synced by the next group sync). But redb has one writer and its
    /// durable commit holds it through the fsync, so a commit that comes
    /// meanwhile waits in `begin_write` (holding the commit lock) until the
    /// fsync ends: what that costs at p99 is measured in
    /// docs/benchmarks.md (`--checkpoint-interval`).
    pub(crate) fn checkpoint(&self) -> Result<()> {
        if self.read_only {
            return Ok(());
        }
        let _one = self.sync.checkpoint_lock.lock();
        let started = Instant::now();
        if self.commit.lock().applied_seq == self.sync.durable_seq.load(Ordering::Acquire) {
            return Ok(());
        }
        // The next segment is made before the commit lock is taken.
        let next = match &self.sync.log {
            Some(log) => {
                let r = log.prepare();
                Some(self.log_failed(r)?)
            }
            None => None,
        };
        let (switched, log_seq, applied, commits, bytes) = {
            let st = self.commit.lock();
            let switched = match (&self.sync.log, next) {
                (Some(log), Some(next)) => log.switch(next),
                _ => Ok(()),
            };
            let st = &*st;
            (
                switched,
                st.log_seq,
                st.applied_seq,
                st.commits_since,
                st.bytes_since,
            )
        };
        self.log_failed(switched)?;
        self.durable_flush(false)?;
        self.sync.durable_seq.fetch_max(applied, Ordering::AcqRel);
        self.sync.log_durable.fetch_max(log_seq, Ordering::AcqRel);
        if let Some(log) = &self.sync.log
            && let Err(e) = log.remove_old()
        {
            // Harmless: a replay skips what the file already holds.
            tracing::warn!(error = %e, "could not delete an old commit log segment");
        }
        let mut st = self.commit.lock();
        st.commits_since = st.commits_since.saturating_sub(commits);
        st.bytes_since = st.bytes_since.saturating_sub(bytes);
        st.last_checkpoint = started;
        Ok(())
    }

    /// Stops the workers, checkpoints, compacts if the policy asks, and
    /// closes the database. Later calls on any session fail with
    /// [`StorageError::Closed`]; a second close does nothing.
    pub(crate) fn close(&self) -> Result<()> {
        if let Some(hook) = self.hook.get() {
            hook.on_close();
        }
        drop(self.sync.checkpointer.lock().take());
        // The commit lock first, then the database: the order of every
        // commit path, so a close racing a commit cannot deadlock.
        let mut st = self.commit.lock();
        if self.poisoned.lock().is_some() {
            st.parked = None;
        }
        self.settle_parked(&mut st)?;
        let mut slot = self.db.write();
        let Some(db) = slot.take() else { return Ok(()) };
        let Db::Rw(mut db) = db else { return Ok(()) };
        if self.read_only {
            // A check's database: nothing of its own to write.
            return Ok(());
        }
        if let Some(why) = self.poisoned.lock().as_ref() {
            return Err(StorageError::Poisoned {
                reason: why.clone(),
            });
        }
        // Persist the exact oid mark and make every applied commit durable,
        // unless both already are.
        // With a log, the same durable commit says the store was closed
        // cleanly, before the log goes.
        let pending = st.applied_seq != self.sync.durable_seq.load(Ordering::Acquire);
        if pending || st.next_oid != st.reserved || self.sync.log.is_some() {
            let mut w = db.begin_write()?;
            w.set_quick_repair(self.quick_repair);
            if self.sync.log.is_some() {
                w.open_table(LOG_STATE)?.insert(KEY_LOG_OPEN, 0)?;
            }
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
            st.commits_since = 0;
            st.bytes_since = 0;
        }
        // Everything logged is in the durable file now.
        if let Some(log) = &self.sync.log {
            log.remove()?;
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
        db.close()?;
        tracing::debug!(path = %self.path.display(), "store closed");
        Ok(())
    }
}
